"""Check the CUDA path (fla's chunk_rwkv7) against our own wkv forms and the whole model on a GPU.

Run on a CUDA machine with flash-linear-attention installed:

    python tools/check_gpu.py [--json OUT.json]

It prints one table of relative errors (max|got - want| / max|want|) and a few timings, and exits
non-zero when an error is above its bound. Bounds are for bf16 kernel inputs against an fp32/fp64
reference: fla rounds r, w, k, v, a, b to bf16, so ~1e-2 relative is the expected floor there.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asr.ops.wkv7 import fla_available, wkv7_chunked, wkv7_fla, wkv7_recurrent  # noqa: E402

GOLDEN = Path(__file__).resolve().parents[1] / "tests" / "data" / "rwkv7_blocks.pt"


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()


def random_inputs(B, T, H, N=64, seed=0, device="cuda"):
    g = torch.Generator(device="cpu").manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    r, k, v = rnd(B, T, H, N), rnd(B, T, H, N) * 0.5, rnd(B, T, H, N)
    w = -math.exp(-0.5) * torch.sigmoid(rnd(B, T, H, N) * 2)
    kk = torch.nn.functional.normalize(rnd(B, T, H, N), dim=-1)
    lr = torch.sigmoid(rnd(B, T, H, N))
    state = rnd(B, H, N, N) * 0.1
    return [t.to(device) for t in (r, w, k, v, -kk, kk * lr)], state.to(device)


def check_golden(rows: list) -> None:
    d = torch.load(GOLDEN)
    view = lambda t: t.view(2, 37, 2, 64).cuda()  # noqa: E731
    r, w, k, v, a, kk = (view(d[f"act.0.{n}"]) for n in ("r", "w", "k", "v", "a", "kk"))
    for chunk in (16, 64):
        y, S = wkv7_fla(r, w, k, v, -kk, kk * a, chunk_size=chunk)
        rows.append((f"golden y, fla chunk {chunk}", rel(y.reshape(2, 37, 128).cpu(), d["act.0.y"]), 2e-2))
        rows.append((f"golden state, fla chunk {chunk}", rel(S.cpu(), d["state.0.S"]), 2e-2))
    y, S = wkv7_fla(*(t[:, 20:] for t in (r, w, k, v, -kk, kk * a)), state=d["stream.state.0.S"].cuda())
    rows.append(("golden y from mid-stream state, fla", rel(y.reshape(2, 17, 128).cpu(), d["act.0.y"][:, 20:]), 2e-2))
    rows.append(("golden final state from mid-stream, fla", rel(S.cpu(), d["state.0.S"]), 2e-2))


def check_random(rows: list) -> None:
    inputs, state = random_inputs(B=4, T=333, H=4)
    y_ref, s_ref = wkv7_recurrent(*(t.double() for t in inputs), state=state.double())
    y_chk, s_chk = wkv7_chunked(*inputs, state=state)
    rows.append(("random y, our chunked fp32 on CUDA", rel(y_chk, y_ref), 1e-4))
    rows.append(("random state, our chunked fp32 on CUDA", rel(s_chk, s_ref), 1e-4))
    for chunk in (16, 64):
        y, s = wkv7_fla(*(t.bfloat16() for t in inputs), state=state, chunk_size=chunk)
        rows.append((f"random y, fla bf16 chunk {chunk}", rel(y, y_ref), 2e-2))
        rows.append((f"random state, fla bf16 chunk {chunk}", rel(s, s_ref), 2e-2))
    # Gradients: fla (bf16 inputs) against our chunked form in fp32, same bf16-rounded inputs.
    leaves_fla = [t.bfloat16().clone().requires_grad_(True) for t in inputs]
    leaves_ref = [t.bfloat16().float().clone().requires_grad_(True) for t in inputs]
    weight = torch.randn(y_ref.shape, device="cuda")
    y, s = wkv7_fla(*leaves_fla, state=state)
    ((y.float() * weight).sum() + s.sum()).backward()
    y, s = wkv7_chunked(*leaves_ref, state=state)
    ((y * weight).sum() + s.sum()).backward()
    for name, a, b in zip("rwkvab", leaves_fla, leaves_ref):
        rows.append((f"grad d{name}, fla vs our chunked", rel(a.grad.float(), b.grad), 5e-2))
    # The asr::wkv7 op (what torch.compile sees): its backward calls fla's backward on the saved
    # inputs, so its gradients should equal fla's own to bf16 rounding.
    leaves_op = [t.bfloat16().clone().requires_grad_(True) for t in inputs]
    state_leaf = state.clone().requires_grad_(True)
    y, s = torch.ops.asr.wkv7(*leaves_op, state_leaf, "fla")
    ((y.float() * weight).sum() + s.sum()).backward()
    for name, a, b in zip("rwkvab", leaves_op, leaves_fla):
        rows.append((f"grad d{name}, asr::wkv7 op (fla) vs fla", rel(a.grad.float(), b.grad.float()), 1e-2))


def check_compiled(rows: list) -> None:
    """trainer.compile=true: the blocks compiled (inductor, the fla op inside) against eager,
    one bf16-autocast training step's loss and gradients."""
    import copy

    from asr.model import CTCModel, ModelConfig, ctc_loss
    from asr.train.compile import compile_model

    torch.manual_seed(0)
    eager = CTCModel(ModelConfig(vocab_size=64, d_model=256, n_layers=4, subsample_channels=64)).cuda()
    with torch.no_grad():
        for p in eager.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    compiled = copy.deepcopy(eager)
    compile_model(compiled)
    feats = torch.randn(3, 801, 80, device="cuda")
    lengths = torch.tensor([801, 640, 333], device="cuda")
    targets = torch.randint(1, 64, (3, 20), device="cuda")
    target_lengths = torch.tensor([20, 15, 9], device="cuda")
    losses = []
    for model in (eager, compiled):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits, out_lengths = model(feats, lengths)
        loss = ctc_loss(logits, out_lengths, targets, target_lengths)
        loss.backward()
        losses.append(loss.detach())
    rows.append(("compiled model (trainer.compile) loss vs eager, bf16", rel(losses[1], losses[0]), 1e-2))
    grads_e = torch.cat([p.grad.flatten() for p in eager.parameters()])
    grads_c = torch.cat([p.grad.flatten() for p in compiled.parameters()])
    rows.append(("compiled model gradients vs eager, bf16", rel(grads_c, grads_e), 5e-2))


def check_model(rows: list) -> None:
    from asr.model import CTCModel, ModelConfig

    # cuDNN convolutions default to TF32 (10-bit mantissa), which alone moves the logits by ~1e-3;
    # the streaming-vs-parallel rule is about float32, so compare in true float32.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False

    torch.manual_seed(0)
    model = CTCModel(ModelConfig(vocab_size=64, d_model=256, n_layers=4, subsample_channels=64)).cuda()
    # Give the zero-initialised projections some weight so every term shows in the output.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    feats = torch.randn(3, 801, 80, device="cuda")
    lengths = torch.tensor([801, 640, 333], device="cuda")
    with torch.no_grad():
        ref, _ = model(feats, lengths, impl="chunked")
        out, _ = model(feats, lengths, impl="fla")
        rows.append(("model logits fp32, fla vs chunked", rel(out, ref), 2e-2))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out_bf16, _ = model(feats, lengths, impl="fla")
        rows.append(("model logits bf16 autocast fla vs fp32 chunked", rel(out_bf16.float(), ref), 5e-2))
        state = model.init_state(3)
        pieces = []
        t = 0
        for size in (1, 7, 100, 3, 290, 400):
            logits, state = model.step(feats[:, t : t + size], state)
            pieces.append(logits)
            t += size
        streamed = torch.cat(pieces, dim=1)
        rows.append(("model streaming (recurrent/chunked) vs parallel, fp32", rel(streamed, ref), 1e-4))


def time_fwd_bwd(fn, inputs, state, iters=20) -> float:
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    for _ in range(3):
        y, s = fn(*leaves, state=state)
        (y.float().sum() + s.sum()).backward()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        y, s = fn(*leaves, state=state)
        (y.float().sum() + s.sum()).backward()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def timings(rows_t: list) -> None:
    for B, T, H in ((16, 1024, 8), (32, 250, 4), (8, 1500, 4)):
        inputs, state = random_inputs(B, T, H, seed=1)
        bf = [t.bfloat16() for t in inputs]
        t_fla = time_fwd_bwd(lambda *a, state: wkv7_fla(*a, state=state), bf, state)
        t_fla16 = time_fwd_bwd(lambda *a, state: wkv7_fla(*a, state=state, chunk_size=16, bounded_decay=False), bf, state)
        t_chk = time_fwd_bwd(lambda *a, state: wkv7_chunked(*a, state=state), inputs, state, iters=5)
        rows_t.append((f"B={B} T={T} H={H}", t_fla, t_fla16, t_chk))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--no-timing", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available() or not fla_available():
        print("check_gpu: needs a CUDA GPU and flash-linear-attention (pip install .[gpu])", file=sys.stderr)
        return 2
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    rows: list = []
    t0 = time.time()
    check_golden(rows)
    print(f"(first fla calls incl. Triton autotuning: {time.time() - t0:.1f} s)")
    check_random(rows)
    check_model(rows)
    t0 = time.time()
    check_compiled(rows)
    print(f"(whole-model compile incl. inductor: {time.time() - t0:.1f} s)")
    print(f"{'check':58s} {'rel err':>10s} {'bound':>8s}")
    failed = False
    for name, err, bound in rows:
        ok = err <= bound
        failed |= not ok
        print(f"{name:58s} {err:10.2e} {bound:8.0e} {'ok' if ok else 'FAIL'}")
    rows_t: list = []
    if not args.no_timing:
        timings(rows_t)
        print(f"\nwkv forward+backward, median ms (CUDA events)\n{'shape':22s} {'fla c64 bounded':>16s} {'fla c16':>9s} {'ours chunked fp32':>18s}")
        for shape, a, b, c in rows_t:
            print(f"{shape:22s} {a:16.3f} {b:9.3f} {c:18.3f}")
    if args.json:
        args.json.write_text(json.dumps({"device": torch.cuda.get_device_name(0), "checks": rows, "timings_ms": rows_t}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
