"""The conv front end (x4 subsampling) alone, forward + backward, NCHW against channels-last (GPU).

    python tools/bench_frontend.py [--batch 21] [--seconds 30] [--iters 20]

Why: in the profile of a CUDA-graph training step (BENCHMARKS.md) the front end took ~31 %
of the GPU time, ~3 ms of it in NCHW<->NHWC transposes around cuDNN's bf16 kernels. This times
``ConvSubsampling`` as the model runs it (bf16 autocast, the gradient of a random projection of its
output) with ``channels_last`` off and on, side by side in one process, and checks that both give
the same output. Median of CUDA-event-timed iterations after warm-up; peak memory per variant.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asr.model.subsampling import ConvSubsampling  # noqa: E402


def time_variant(module: ConvSubsampling, feats: torch.Tensor, weight: torch.Tensor, iters: int) -> tuple[float, float, torch.Tensor]:
    """(median ms of forward + backward, peak GiB, output)"""
    def step() -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = module(feats)
        (out.float() * weight).sum().backward()
        return out.detach()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2], torch.cuda.max_memory_allocated() / 2**30, out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=21)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--channels", type=int, default=256, help="the convolutions' channels (model's subsample_channels)")
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_frontend: needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    module = ConvSubsampling(80, args.channels, 256).cuda()
    feats = torch.randn(args.batch, int(args.seconds * 100), 80, device="cuda")
    with torch.no_grad():
        weight = torch.randn_like(module(feats))
    print(f"# {torch.cuda.get_device_name(0)}, torch {torch.__version__}; batch {args.batch} x {args.seconds:g} s, "
          f"{args.channels} channels")
    print(f"{'layout':14s} {'fwd+bwd ms':>11s} {'peak GiB':>9s} {'vs NCHW':>8s}")
    base, reference = None, None
    for channels_last in (False, True, False, True):  # twice each, interleaved: drift shows
        module.channels_last = channels_last
        ms, peak, out = time_variant(module, feats, weight, args.iters)
        module.zero_grad(set_to_none=True)
        name = "channels-last" if channels_last else "NCHW"
        base = base if base is not None else ms
        if reference is None:
            reference = out
        elif not torch.allclose(out.float(), reference.float(), rtol=2e-2, atol=2e-2):
            print(f"{name}: output differs from NCHW's (max {(out.float() - reference.float()).abs().max():.3g})")
        print(f"{name:14s} {ms:11.2f} {peak:9.2f} {base / ms:7.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
