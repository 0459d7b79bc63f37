#!/usr/bin/env python
"""Average the weights of several checkpoints (e.g. the last N of a run) into one.

Averaging the last few checkpoints of a run usually lowers WER a little at no cost (it smooths the
noise of the final updates). Floating-point tensors are averaged in float64 and cast back;
integer buffers (counters) are taken from the newest checkpoint. The output keeps the model
config, tokenizer and CMVN of the newest checkpoint and drops optimizer/sampler/RNG state, so it
is for inference or ``trainer.init_from``, not for ``resume``.

    python tools/average_checkpoints.py --dir exp/real/RUN/checkpoints --last 5 --out avg.pt
    python tools/average_checkpoints.py ckpt-a.pt ckpt-b.pt --out avg.pt
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from asr.model_file import CheckpointError, load_checkpoint
from asr.train.checkpoint import CheckpointManager, atomic_torch_save


def average(paths: list[Path]) -> dict:
    """Averaged checkpoint of ``paths`` (in the order given; the last one supplies metadata)."""
    if not paths:
        raise CheckpointError("no checkpoints to average")
    sums: dict[str, torch.Tensor] = {}
    last: dict = {}
    for i, p in enumerate(paths):
        ckpt = load_checkpoint(p)
        sd = ckpt["model"]
        if i == 0:
            ref_keys, ref_config = set(sd), ckpt.get("config")
        elif set(sd) != ref_keys or ckpt.get("config") != ref_config:
            raise CheckpointError(f"{p} has a different model than {paths[0]}; cannot average")
        for k, v in sd.items():
            if v.is_floating_point():
                sums[k] = sums[k] + v.double() if k in sums else v.double()
        last = ckpt
    model = {k: (sums[k] / len(paths)).to(v.dtype) if v.is_floating_point() else v.clone()
             for k, v in last["model"].items()}
    out = {k: last[k] for k in ("config", "tokenizer", "step", "train_config") if k in last}
    out["model"] = model
    out["averaged_from"] = [str(p) for p in paths]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoints", nargs="*", type=Path, help="checkpoint files (or use --dir)")
    ap.add_argument("--dir", type=Path, help="a checkpoints folder (or run folder): average its newest --last")
    ap.add_argument("--last", type=int, default=5)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    paths = list(args.checkpoints)
    if args.dir is not None:
        folder = args.dir / "checkpoints" if (args.dir / "checkpoints").is_dir() else args.dir
        found = [p for _, p in CheckpointManager(folder, writable=False).checkpoints()]
        paths += found[-args.last :]
    try:
        avg = average(paths)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    atomic_torch_save(avg, args.out)
    print(f"averaged {len(paths)} checkpoints ({', '.join(p.name for p in paths)}) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
