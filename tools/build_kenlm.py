#!/usr/bin/env python
"""Compile KenLM's ``build_binary`` program, which packing a word LM into a model file needs
(``tools/export_model.py --lm``; :mod:`asr.decode.packed_lm`).

    python tools/build_kenlm.py                 # -> .data/kenlm/bin/build_binary

Neither PyPI nor Debian's main section ships KenLM's programs (the ``kenlm`` package on PyPI is the
query module only), so this takes KenLM's source from its PyPI sdist (``pip download
kenlm==KENLM_VERSION --no-binary :all:``) and compiles ``lm/build_binary_main.cc`` with its library
sources: a C++11 compiler (g++) is all it needs, no Boost or CMake (~40 s on 2 cores). Decoding does
not need it: flashlight-text carries KenLM's reader.
"""
from __future__ import annotations

import argparse
import glob
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
KENLM_VERSION = "0.3.0"
OUT = REPO / ".data" / "kenlm" / "bin" / "build_binary"


class BuildError(Exception):
    """A step failed: one line for the user."""


def run(cmd: list[str], cwd: Optional[Path] = None) -> None:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        last = [ln for ln in (done.stderr or done.stdout).splitlines() if ln.strip()][-1:] or [str(done.returncode)]
        raise BuildError(f"{' '.join(cmd[:3])} ... failed: {last[0]}")


def fetch_source(work: Path, version: str) -> Path:
    """KenLM's unpacked sdist from PyPI."""
    run([sys.executable, "-m", "pip", "download", f"kenlm=={version}", "--no-deps", "--no-binary", ":all:",
         "--no-build-isolation", "-d", str(work), "-q"])
    archives = sorted(work.glob("kenlm-*.tar.gz"))
    if not archives:
        raise BuildError(f"pip did not download kenlm=={version}'s source")
    with tarfile.open(archives[0]) as tar:
        tar.extractall(work, filter="data")
    return work / archives[0].name[: -len(".tar.gz")]


def compile_build_binary(src: Path, out: Path, compiler: str) -> None:
    sources = [f for pattern in ("util/*.cc", "lm/*.cc", "util/double-conversion/*.cc")
               for f in sorted(glob.glob(str(src / pattern))) if not f.endswith(("main.cc", "test.cc"))]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    run([compiler, "-O2", "-DNDEBUG", "-DKENLM_MAX_ORDER=6", "-DHAVE_CLOCKGETTIME", "-std=c++11", "-w", f"-I{src}",
         *sources, str(src / "lm" / "build_binary_main.cc"), "-o", str(tmp), "-lrt", "-lpthread"])
    tmp.replace(out)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=OUT, help="where the program goes (default: %(default)s)")
    ap.add_argument("--version", default=KENLM_VERSION, help="KenLM's PyPI version (default: %(default)s)")
    ap.add_argument("--compiler", default="g++")
    args = ap.parse_args(argv)
    if shutil.which(args.compiler) is None:
        print(f"build_kenlm: error: no C++ compiler '{args.compiler}' (apt-get install g++)", file=sys.stderr)
        return 2
    try:
        with tempfile.TemporaryDirectory() as tmp:
            compile_build_binary(fetch_source(Path(tmp), args.version), args.out, args.compiler)
    except (BuildError, OSError, tarfile.TarError) as e:
        print(f"build_kenlm: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
