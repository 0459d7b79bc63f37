"""Write the ``onnx-int8`` step graph of a model file beside the bundled model, so that
``asr.load_model()`` starts without exporting it (:mod:`asr.infer.ort`)::

    python tools/ship_step_graph.py                      # the bundled model asr/pretrained/model.pt
    python tools/ship_step_graph.py --model ckpt.pt      # another model (its graph, same folder)

Run it again whenever ``asr/pretrained/model.pt`` is replaced (the graph's file name holds a key
of the weights: a stale graph is never used, only left on disk; this tool removes the bundled
folder's graphs of other weights). Needs the ``onnx`` extra (``pip install -e ".[onnx]"``).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asr.api import BUNDLED_MODEL  # noqa: E402
from asr.infer.ort import export_step_graph, graph_name, weights_key  # noqa: E402
from asr.model_file import CheckpointError, load_for_inference  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=BUNDLED_MODEL, help="model file (default: the bundled model)")
    ap.add_argument("--out", type=Path, default=BUNDLED_MODEL.parent, help="folder (default: beside the bundled model)")
    args = ap.parse_args(argv)
    try:
        model, _ = load_for_inference(args.model)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    key = weights_key(model)
    path = args.out / graph_name(key, 1)
    for stale in args.out.glob("step*-int8-*.onnx"):
        if stale != path:
            stale.unlink()
            print(f"removed {stale} (other weights)")
    t0 = time.time()
    export_step_graph(model, path, 1)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB) in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
