"""Export a training checkpoint as a compact inference model (fp16 weights, tokenizer, CMVN).

    python tools/export_model.py CHECKPOINT_OR_RUN_DIR OUT.pt

Only what inference needs is kept: the model config, the weights in float16 (CMVN statistics stay
float32: they are tiny and their precision matters), and the tokenizer. ``load_for_inference``
reads the result like any checkpoint; loading copies the fp16 values into the float32 model.
To export an average of the last checkpoints, run ``tools/average_checkpoints.py`` first.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asr.train.checkpoint import atomic_torch_save, load_checkpoint, resolve_checkpoint  # noqa: E402


def compact_state(ckpt: dict) -> dict:
    state = {}
    for name, tensor in ckpt["model"].items():
        keep_fp32 = name.startswith("cmvn.") or not tensor.is_floating_point()
        state[name] = tensor if keep_fp32 else tensor.half()
    return {"config": ckpt["config"], "model": state, "tokenizer": ckpt["tokenizer"],
            "step": ckpt.get("step"), "format": "rwkv-asr inference v1 (fp16 weights)"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    ckpt = load_checkpoint(resolve_checkpoint(args.checkpoint))
    atomic_torch_save(compact_state(ckpt), args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
