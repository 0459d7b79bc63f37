"""``asr``: the umbrella command. ``asr --version``; ``asr transcribe ...`` runs ``asr-transcribe``.

Subcommands delegate to the per-tool entry points (same options, same exit codes), imported only
when chosen so ``asr --version`` and ``asr --help`` stay instant.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional

from asr.version import __version__

#: subcommand -> (module with a ``main(argv) -> int``, one-line help)
SUBCOMMANDS = {
    "transcribe": ("asr.cli.transcribe", "transcribe audio files, folders or stdin (= asr-transcribe)"),
    "live": ("asr.cli.live", "transcribe a microphone or stream live (= asr-live)"),
    "serve": ("asr.cli.serve", "streaming server: Vosk-compatible WebSocket, browser page (= asr-serve)"),
    "eval": ("asr.cli.evaluate", "WER/CER of a checkpoint on manifests (= asr-eval)"),
}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="asr",
        description="rwkv-asr: streaming speech recognition with an RWKV-7 encoder.",
        epilog="Run 'asr COMMAND --help' for a command's options.",
    )
    ap.add_argument("--version", action="version", version=f"rwkv-asr {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return ap


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = build_parser()
    if argv and argv[0] in SUBCOMMANDS:
        module = importlib.import_module(SUBCOMMANDS[argv[0]][0])
        return int(module.main(argv[1:]) or 0)
    args = ap.parse_args(argv)  # handles --version / --help, and exits 2 for unknown commands
    if args.command is None:
        ap.print_help(sys.stderr)
        return 2
    return 0  # unreachable: known commands are dispatched above


if __name__ == "__main__":
    sys.exit(main())
