"""Where one training step of the encoder spends its GPU time (torch.profiler), for the next fix.

    python tools/profile_train_step.py [--model bundled] [--batch 64] [--seconds 4] [--steps 3]

Builds the model from ``conf/model/<name>.yaml``, runs a few warm-up steps (fla autotuning happens
there), then profiles ``--steps`` full steps (bf16 autocast forward, CTC loss, backward, clipping,
fused AdamW) on random features and prints: the step time, the number of CUDA kernels launched per
step, and the kernels (and CPU-side ops) that take the most time. ``--trace FILE`` also writes a
Chrome trace. bench_train.py gives the comparable throughput numbers; this says why.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asr.model import CTCModel, ModelConfig  # noqa: E402
from asr.ops.wkv7 import mark_constants_for_compile  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import training_step  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="bundled", help="conf/model/<name>.yaml")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=4.0, help="utterance length")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--trace", default=None, help="write a Chrome trace here")
    parser.add_argument("--compile", nargs="?", const="blocks", default=None, choices=["blocks", "static"],
                        help="also time the step compiled (same batch): blocks as trainer.compile=true does, or "
                             "static: the whole model for this one shape, the kernels CUDA graphs would replay "
                             "(bench_train.py's rwkv7_cudagraphs row without the graphs, so the profiler sees them)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("profile_train_step: needs a CUDA GPU", file=sys.stderr)
        return 2
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "model" / f"{args.model}.yaml")
    config = ModelConfig.from_dict(OmegaConf.to_container(cfg))
    model = CTCModel(config).cuda().train()
    step = training_step(model, args.batch, int(args.seconds * 100), config.vocab_size, tokens_per_frame=1 / 24)

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(args.steps):
        step()
    end.record()
    torch.cuda.synchronize()
    step_ms = start.elapsed_time(end) / args.steps

    if args.compile:  # same model and batch, compiled
        from asr.train.compile import compile_model

        print(f"eager step {step_ms:.1f} ms; compiling the model ...", flush=True)

        if args.compile == "static":
            mark_constants_for_compile()  # fla_available() a constant to the tracer
            model.compile(dynamic=False, fullgraph=True)
        else:
            compile_model(model)
        t0 = time.perf_counter()
        for _ in range(3):  # compilation (forward and backward graphs) happens here
            step()
        torch.cuda.synchronize()
        compile_s = time.perf_counter() - t0
        start.record()
        for _ in range(args.steps * 3):
            step()
        end.record()
        torch.cuda.synchronize()
        compiled_ms = start.elapsed_time(end) / (args.steps * 3)
        print(f"eager step {step_ms:.1f} ms, compiled step {compiled_ms:.1f} ms: {step_ms / compiled_ms:.2f}x "
              f"(first 3 compiled steps incl. compilation {compile_s:.0f} s); profile below is compiled")
        step_ms = compiled_ms

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    cuda = torch.autograd.DeviceType.CUDA
    kernel_events = [e for e in prof.events() if getattr(e, "device_type", None) == cuda]
    kernels = len(kernel_events)
    # The kernels' own durations: summing key_averages' self device time counted each kernel twice,
    # once on its row and once on the op that launched it (a profile once read 71 ms for 34).
    gpu_us = sum(e.time_range.elapsed_us() for e in kernel_events) / args.steps
    print(f"# {torch.cuda.get_device_name(0)}, torch {torch.__version__}, model {args.model} "
          f"({model.num_parameters() / 1e6:.1f}M), batch {args.batch} x {args.seconds:g} s")
    print(f"step {step_ms:.1f} ms ({args.batch * args.seconds / step_ms * 1e3:.0f} audio-s/s), "
          f"GPU busy {gpu_us / 1e3:.1f} ms/step, {kernels / args.steps:.0f} kernels/step")
    print(events.table(sort_by="self_device_time_total", row_limit=args.rows, max_name_column_width=60))
    print(events.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))
    if args.trace:
        prof.export_chrome_trace(args.trace)
    return 0


if __name__ == "__main__":
    sys.exit(main())
