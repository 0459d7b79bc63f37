"""One full training step (features in, CTC loss, backward, AdamW) for our RWKV-7 encoder against
torchaudio's Conformer and Emformer with the same conv front end and CTC head (GPU).

    python tools/bench_train.py [--iters 10] [--models conformer,emformer,rwkv7] [--lengths 10,30]

All models: 80-dim features -> causal x4 conv subsampling (ours) -> encoder -> linear CTC head of
256 classes; bf16 autocast, fp32 master weights, fused AdamW. Sizes are matched by parameter count
(~12M): ours d=256 x 12 blocks; Conformer d=256, ffn 1024, kernel 31, 8 layers; Emformer d=256,
ffn 1024, 12 layers, segments of 4 frames + 1 right context. Reported: audio-seconds per second
(batch x seconds / step time, median of CUDA-event-timed steps after warm-up) and peak memory.

``--models`` picks the rows: ``rwkv7_compiled`` is our model as ``trainer.compile=true`` trains it
(each block one dynamic-shape graph, the wkv kernel an opaque op inside), ``rwkv7_compiled_model``
the whole model as one graph (``trainer.compile=model``), ``rwkv7_cudagraphs`` the whole model
compiled for this one shape with CUDA graphs (``mode="reduce-overhead"``: what a trainer that pads
batches to a few fixed shapes could reach), ``rwkv7_cudagraphs_dynamic`` / ``_blocks`` the whole
model / each block compiled for any shape with CUDA graphs recorded per shape (what a trainer with
changing batch shapes would use; on torch 2.11 the whole model's did not finish compiling within 5
minutes; in training the blocks' variant gave 1.02x eager, BENCHMARKS.md "Run 9"),
``rwkv7_graphed`` the *eager* model with its forward and backward each captured as a CUDA graph for
the one shape, as ``trainer.cuda_graphs`` trains (``asr.train.cuda_graphs``, on
``torch.cuda.make_graphed_callables``: no compiler, 0.2 s of warm-up per shape instead of minutes;
1.79x eager on an H100), ``rwkv7_checkpointed`` eager with activation
checkpointing (``trainer.activation_checkpointing``), ``rwkv7_cudagraphs_checkpointed`` both the
static compile with CUDA graphs and checkpointing, ``rwkv7_cudagraphs_budget50`` / ``_budget25`` /
``_budget20`` the static compile with CUDA graphs under the compiler's activation memory budget
(0.5 / 0.25 / 0.2: it recomputes what it chooses in the backward), ``conformer_compiled`` the anchor compiled
too, for fairness, ``rwkv7_d320x8_cudagraphs`` / ``_budget25`` the same two with the bundled
model's blocks (d=320 x 8: fewer, wider blocks at about the same size, 12.9 M, the Conformer's
depth), ``rwkv7_bundled_cudagraphs`` / ``_budget50`` / ``_budget35`` / ``_budget25`` the bundled model's whole
architecture (its conv front end has 128 channels: 11.7 M) and ``conformer_c128`` the anchor with
that front end (13.0 M), ``conformer12`` the issue's own anchor (12 layers, 20 M parameters;
``conformer``, the ratios' anchor, is matched to our size with 8). Compilation happens in the
warm-up steps, outside the timing; their time is printed.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asr.model import CTCModel, ModelConfig, ctc_loss  # noqa: E402
from asr.model.subsampling import ConvSubsampling  # noqa: E402
from asr.ops.wkv7 import mark_constants_for_compile  # noqa: E402
from asr.train.cuda_graphs import GraphedTrainForward, keep_grads_allocated  # noqa: E402

VOCAB = 256
#: the bundled model's block sizes; its front end has 128 channels, here the anchors' 256 (12.9 M)
D320X8 = dict(d_model=320, n_layers=8)
#: the bundled model's sizes, front end included (11.7 M)
BUNDLED = dict(d_model=320, n_layers=8, subsample_channels=128)


class AnchorCTC(nn.Module):
    """Our subsampling + a torchaudio encoder + LayerNorm + CTC head, with CTCModel's interface."""

    def __init__(self, kind: str, d_model: int = 256, layers: int = 8, channels: int = 256):
        super().__init__()
        import torchaudio

        self.kind = kind
        self.subsampling = ConvSubsampling(80, channels, d_model)
        if kind == "conformer":
            self.encoder = torchaudio.models.Conformer(
                input_dim=d_model, num_heads=4, ffn_dim=1024, num_layers=layers, depthwise_conv_kernel_size=31
            )
        else:
            self.encoder = torchaudio.models.Emformer(
                input_dim=d_model, num_heads=4, ffn_dim=1024, num_layers=12, segment_length=4, right_context_length=1
            )
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, VOCAB)

    def forward(self, features, lengths):
        x = self.subsampling(features)
        out_lengths = self.subsampling.output_length(lengths)
        if self.kind == "emformer":  # Emformer wants the right context appended to the input
            x = nn.functional.pad(x, (0, 0, 0, 1))
        x, _ = self.encoder(x, out_lengths + (1 if self.kind == "emformer" else 0))
        return self.head(self.ln(x)), out_lengths


def training_step(model: nn.Module, batch: int, frames: int, vocab: int = VOCAB, tokens_per_frame: float = 1 / 16):
    """A closure running one full training step on a fixed random batch of ``batch`` x ``frames``
    80-dim features (bf16 autocast forward, CTC loss, backward, clipping, fused AdamW); shared with
    tools/profile_train_step.py so both time the same step."""
    feats = torch.randn(batch, frames, 80, device="cuda")
    lengths = torch.full((batch,), frames, device="cuda")
    U = max(1, int(frames * tokens_per_frame))
    targets = torch.randint(1, vocab, (batch, U), device="cuda")
    target_lengths = torch.full((batch,), U, device="cuda")
    params = model.param_groups(0.01, 1e-3) if isinstance(model, CTCModel) else model.parameters()
    opt = torch.optim.AdamW(params, lr=1e-3, fused=True)
    forward = model
    graphed = getattr(model, "graph_for_shape", False)
    if graphed:
        # The trainer's trainer.cuda_graphs path: forward and backward recorded at the first step
        # (warm-up runs use autograd.grad, so the weights are untouched and loss@1 stays comparable
        # with eager); gradients added into kept .grad buffers. Loss, clipping and AdamW stay eager.
        forward = GraphedTrainForward(model, torch.bfloat16)
        keep_grads_allocated([p for p in model.parameters() if p.requires_grad])

    budget = getattr(model, "memory_budget", None)
    # the compiler's partitioner reads the budget when it compiles, in the first (warm-up) steps
    budgeted = torch._functorch.config.patch(activation_memory_budget=budget) if budget else contextlib.nullcontext()

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16), budgeted:
            logits, out_lengths = forward(feats, lengths)
        loss = ctc_loss(logits, out_lengths, targets, target_lengths)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=not graphed)
        return loss.detach()

    return step


def bench(model: nn.Module, batch: int, seconds: float, iters: int) -> tuple[float, float, float, list[float]]:
    """(audio-seconds per second, peak GiB, seconds the 3 warm-up steps took (compilation,
    autotuning), their losses). The peak counts the warm-up too: CUDA graphs take their memory pool
    while they are recorded there. The losses are a correctness check: a compiled row must show its
    eager row's losses (same seed, same weights and batch); the first checks the forward, the third
    the gradients of the two optimizer steps before it."""
    torch.cuda.reset_peak_memory_stats()
    step = training_step(model, batch, int(seconds * 100))
    t0 = time.perf_counter()
    losses = [float(step()) for _ in range(3)]
    torch.cuda.synchronize()
    warmup = time.perf_counter() - t0
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    median = sorted(times)[len(times) // 2]
    return batch * seconds / median, torch.cuda.max_memory_allocated() / 2**30, warmup, losses


def builders() -> dict:
    """Every model this benchmark knows, by name; the Conformer first (the anchor)."""
    from asr.train.compile import compile_model

    def conformer_compiled() -> nn.Module:
        model = AnchorCTC("conformer")
        mark_constants_for_compile()  # fla_available() a constant to the tracer
        model.compile(dynamic=True)  # torchaudio's padding masks break the graph: no fullgraph
        return model

    def ours_compiled(scope: str):
        def build() -> CTCModel:
            model = CTCModel(ModelConfig(vocab_size=VOCAB))
            compile_model(model, scope)  # compiles in the warm-up steps, outside the timing
            return model
        return build

    def ours_cudagraphs(**sizes: int) -> CTCModel:
        model = CTCModel(ModelConfig(vocab_size=VOCAB, **sizes))
        mark_constants_for_compile()  # fla_available() a constant to the tracer
        model.compile(mode="reduce-overhead", dynamic=False, fullgraph=True)
        return model

    def ours_cudagraphs_checkpointed() -> CTCModel:
        """rwkv7_cudagraphs with torch.utils.checkpoint per block and front end, traced by dynamo
        for the one shape (for any shape dynamo fails on it, torch 2.14): the memory a compiled
        step could reach by recomputing."""
        model = ours_cudagraphs()
        model.activation_checkpointing = True
        return model

    def ours_cudagraphs_fresh(budget: Optional[float], **sizes: int):
        def build() -> CTCModel:
            """rwkv7_cudagraphs of these sizes, compiled afresh, with the compiler's activation
            memory budget (``torch._functorch.config.activation_memory_budget``; None: none): the
            partitioner chooses which activations to recompute in the backward so that at most
            this fraction of what the default saves is kept, cheapest recomputation first."""
            torch._dynamo.reset()  # else dynamo reuses an earlier row's compiled code for this shape
            model = ours_cudagraphs(**sizes)
            model.memory_budget = budget
            return model
        return build

    def ours_checkpointed() -> CTCModel:
        model = CTCModel(ModelConfig(vocab_size=VOCAB))
        model.activation_checkpointing = True  # eager: torch.utils.checkpoint per block and front end
        return model

    def ours_graphed() -> CTCModel:
        model = CTCModel(ModelConfig(vocab_size=VOCAB))
        model.graph_for_shape = True  # training_step graphs it once it has the batch
        return model

    def ours_cudagraphs_dynamic_model() -> CTCModel:
        """The whole model compiled once for any shape, CUDA graphs recorded per shape; the options
        are compile_model's plus inductor's cudagraphs (compile_model's "cudagraphs" is per block)."""
        model = CTCModel(ModelConfig(vocab_size=VOCAB))
        mark_constants_for_compile()  # fla_available() a constant to the tracer
        model.compile(dynamic=True, fullgraph=True,
                      options={"triton.cudagraphs": True, "triton.coalesce_tiling_analysis": False})
        return model

    return {
        "conformer": lambda: AnchorCTC("conformer"),
        # the issue's own anchor: 12 layers, 20 M parameters (ours above is matched by size: 8 layers)
        "conformer12": lambda: AnchorCTC("conformer", layers=12),
        "emformer": lambda: AnchorCTC("emformer"),
        "rwkv7": lambda: CTCModel(ModelConfig(vocab_size=VOCAB)),
        "rwkv7_compiled": ours_compiled("blocks"),
        "rwkv7_compiled_model": ours_compiled("model"),
        "rwkv7_cudagraphs": ours_cudagraphs,
        "rwkv7_cudagraphs_dynamic": ours_cudagraphs_dynamic_model,
        "rwkv7_cudagraphs_blocks": ours_compiled("cudagraphs"),  # trainer.compile=cudagraphs
        "rwkv7_cudagraphs_checkpointed": ours_cudagraphs_checkpointed,
        "rwkv7_cudagraphs_budget50": ours_cudagraphs_fresh(0.5),
        "rwkv7_cudagraphs_budget25": ours_cudagraphs_fresh(0.25),
        "rwkv7_cudagraphs_budget20": ours_cudagraphs_fresh(0.2),
        # the bundled model's blocks (d=320 x 8, 12.9 M with this front end): the anchor's depth
        "rwkv7_d320x8_cudagraphs": ours_cudagraphs_fresh(None, **D320X8),
        "rwkv7_d320x8_cudagraphs_budget25": ours_cudagraphs_fresh(0.25, **D320X8),
        # the bundled model's whole architecture, its 128-channel front end too (11.7 M), and the
        # anchor given the same front end (13.0 M), so the ratio is not the front end's alone
        "rwkv7_bundled_cudagraphs": ours_cudagraphs_fresh(None, **BUNDLED),
        "rwkv7_bundled_cudagraphs_budget50": ours_cudagraphs_fresh(0.5, **BUNDLED),
        "rwkv7_bundled_cudagraphs_budget35": ours_cudagraphs_fresh(0.35, **BUNDLED),
        "rwkv7_bundled_cudagraphs_budget25": ours_cudagraphs_fresh(0.25, **BUNDLED),
        "conformer_c128": lambda: AnchorCTC("conformer", channels=128),
        "rwkv7_graphed": ours_graphed,
        "rwkv7_checkpointed": ours_checkpointed,
        "conformer_compiled": conformer_compiled,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--models", default="conformer,emformer,rwkv7",
                        help="comma list, in order, from: " + ", ".join(builders()))
    parser.add_argument("--lengths", default="10,30", help="utterance seconds (10: batch 64, 30: batch 21)")
    args = parser.parse_args()
    known = builders()
    names = args.models.split(",")
    if unknown := [n for n in names if n not in known]:
        print(f"bench_train: unknown model {unknown[0]!r}; known: {', '.join(known)}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("bench_train: needs a CUDA GPU", file=sys.stderr)
        return 2
    print(f"# {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    print(f"{'model':22s} {'params':>8s} {'utt':>5s} {'batch':>6s} {'audio-s/s':>10s} {'peak GiB':>9s} "
          f"{'vs conformer':>17s} {'warm-up s':>10s} {'loss@1':>9s} {'loss@3':>9s}")
    results: dict = {}
    for utt in (float(x) for x in args.lengths.split(",")):
        batch = {10.0: 64, 30.0: 21}.get(utt, max(1, int(640 / utt)))
        for name in names:
            torch.manual_seed(0)
            model = known[name]().cuda()
            n = sum(p.numel() for p in model.parameters()) / 1e6
            try:
                speed, peak, warmup, losses = bench(model, batch, utt, args.iters)
            except Exception as e:  # a failing variant should not hide the others
                print(f"{name:22s} failed: {type(e).__name__}: {str(e)[:300]}")
                continue
            results[(name, utt)] = (speed, peak)
            base = results.get(("conformer", utt))
            ratio = f"{speed / base[0]:.2f}x / {peak / base[1]:.2f}x mem" if base else ""
            print(f"{name:22s} {n:7.2f}M {utt:5.0f} {batch:6d} {speed:10.0f} {peak:9.2f} {ratio:>17s} {warmup:10.1f} {losses[0]:9.3f} {losses[2]:9.3f}")
            del model
            torch.cuda.empty_cache()
    return 0

if __name__ == "__main__":
    sys.exit(main())
