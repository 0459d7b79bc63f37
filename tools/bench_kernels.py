"""Benchmark the RWKV-7 wkv recurrence, forward + backward, at ASR shapes (GPU).

    python tools/bench_kernels.py [--iters 20] [--skip-loop]

Forms: fla ``chunk_rwkv7`` with 64-token chunks and the bounded-decay fast path (what the model uses),
fla with 16-token chunks (its default without the bound), our pure-PyTorch chunked form, and the
recurrent loop (reference). Inputs bf16 for fla, fp32 for ours; fp32 state. Timings are medians of
CUDA-event-timed iterations after warm-up (autotuning happens in the warm-up, outside the timing).

Throughput columns: tokens/s counts B*T tokens (all heads); GB/s counts the unavoidable traffic
(read r, w, k, v, a, b and write y forward; read them plus dy and write six gradients backward);
TFLOP/s counts the recurrence's own arithmetic (~10 N^2 FLOPs per token and head forward, twice that
backward), so it says how far a form is from the matrix-unit ceiling, not how much work it does.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asr.ops.wkv7 import wkv7_chunked, wkv7_fla, wkv7_recurrent  # noqa: E402

N = 64


def make_inputs(B: int, T: int, H: int, dtype: torch.dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    rnd = lambda: torch.randn(B, T, H, N, device="cuda", generator=g)  # noqa: E731
    w = -math.exp(-0.5) * torch.sigmoid(rnd())
    kk = torch.nn.functional.normalize(rnd(), dim=-1)
    lr = torch.sigmoid(rnd())
    tensors = [rnd(), w, rnd() * 0.3, rnd(), -kk, kk * lr]
    return [t.to(dtype).requires_grad_(True) for t in tensors]


def time_fwd_bwd(fn, inputs, iters: int, warmup: int = 3) -> tuple[float, float]:
    """Median milliseconds and peak GiB of one forward+backward."""
    def once():
        y, s = fn(*inputs)
        y.backward(torch.ones_like(y))
        for t in inputs:
            t.grad = None

    for _ in range(warmup):
        once()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        once()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    return sorted(times)[len(times) // 2], peak


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--skip-loop", action="store_true", help="skip the (slow) recurrent loop")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_kernels: needs a CUDA GPU", file=sys.stderr)
        return 2
    print(f"# {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    forms = {
        "fla c64 bounded": (lambda *a: wkv7_fla(*a, chunk_size=64, bounded_decay=True), torch.bfloat16),
        "fla c16": (lambda *a: wkv7_fla(*a, chunk_size=16, bounded_decay=False), torch.bfloat16),
        "ours chunked": (lambda *a: wkv7_chunked(*a), torch.float32),
        "recurrent loop": (lambda *a: wkv7_recurrent(*a), torch.float32),
    }
    header = f"{'shape (B,T,H)':16s} {'form':16s} {'ms':>9s} {'Mtok/s':>9s} {'GB/s':>8s} {'TFLOP/s':>8s} {'peak GiB':>9s} {'vs fla c64':>10s}"
    print(header)
    for B, T, H in ((64, 250, 4), (32, 500, 4), (16, 1000, 4), (16, 1500, 4), (16, 1024, 8)):
        ref_ms = None
        for name, (fn, dtype) in forms.items():
            if name == "recurrent loop" and (args.skip_loop or T > 500):
                continue
            inputs = make_inputs(B, T, H, dtype)
            ms, peak = time_fwd_bwd(fn, inputs, args.iters if "loop" not in name else 3)
            tokens = B * T
            elem = inputs[0].element_size()
            bytes_moved = B * T * H * N * elem * (7 + 13)
            flops = 3 * 10 * N * N * B * T * H
            ref_ms = ref_ms or ms
            print(f"{f'{B},{T},{H}':16s} {name:16s} {ms:9.3f} {tokens / ms / 1e3:9.2f} {bytes_moved / ms / 1e6:8.1f} "
                  f"{flops / ms / 1e9:8.2f} {peak:9.3f} {ref_ms / ms:9.2f}x")
            del inputs
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
