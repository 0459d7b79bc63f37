"""``asr-export``: write a trained model in a format for other runtimes.

    asr-export CHECKPOINT_OR_RUN_DIR OUT_DIR --format onnx            # float32 and int8 graphs
    asr-export asr/pretrained/model.pt exp/onnx --format onnx --frames 1 4 16 --no-int8

``--format onnx`` writes the streaming step as ONNX graphs of ``--frames`` encoder frames (40 ms
each) per call (:mod:`asr.export.onnx`), each also as ONNX Runtime's dynamic int8 quantization
unless ``--no-int8``, the tokenizer and ``onnx_model.json``. Run them with
:class:`asr.export.runtime.OnnxEncoder` (the smallest graph streams, the largest serves whole
utterances). Needs ``pip install rwkv-asr[onnx]`` (onnx, onnxruntime).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="asr-export", description=__doc__.split("\n")[0].split(": ", 1)[1])
    ap.add_argument("checkpoint", type=Path, help="a checkpoint file or training run folder")
    ap.add_argument("out", type=Path, help="the folder to write")
    ap.add_argument("--format", choices=["onnx"], default="onnx", help="output format (default: onnx)")
    ap.add_argument("--frames", type=int, nargs="+", default=[1, 16], metavar="T",
                    help="encoder frames per call of each graph (default: 1 16: streaming and whole files)")
    ap.add_argument("--no-int8", action="store_true", help="skip the int8 graphs")
    return ap


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if min(args.frames) < 1:
        print(f"asr-export: error: --frames must be >= 1, got {args.frames}", file=sys.stderr)
        return 2
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as err:
        print(f"asr-export: error: --format onnx needs onnx and onnxruntime ({err}); "
              "pip install 'rwkv-asr[onnx]'", file=sys.stderr)
        return 2
    from asr.export.onnx import export_onnx
    from asr.model_file import CheckpointError, load_for_inference

    try:
        model, tokenizer = load_for_inference(args.checkpoint)
    except (CheckpointError, OSError, ValueError) as err:
        print(f"asr-export: error: {err}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        meta = export_onnx(model, args.out, frames=args.frames, int8=not args.no_int8,
                           tokenizer_bytes=tokenizer.to_bytes())
    except OSError as err:
        print(f"asr-export: error: cannot write {args.out}: {err}", file=sys.stderr)
        return 2
    for frames, files in meta["files"].items():
        sizes = ", ".join(f"{name} ({(args.out / name).stat().st_size / 1e6:.1f} MB)" for name in files.values())
        print(f"{frames} frame(s) per call: {sizes}")
    print(f"wrote {args.out} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
