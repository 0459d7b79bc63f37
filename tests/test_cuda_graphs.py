"""trainer.cuda_graphs on a real GPU: torch.cuda.make_graphed_callables replays give the eager
training steps (skipped without CUDA; the CPU tests in test_train.py check the trainer's handling of
the recorder with a stand-in)."""
from __future__ import annotations

import copy

import pytest
import torch

from asr.model import CTCModel, ModelConfig, ctc_loss
from asr.train.cuda_graphs import GraphedTrainForward, keep_grads_allocated

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _batches(shapes: list[tuple[int, int]]) -> list[tuple]:
    out = []
    for b, frames in shapes:
        lengths = torch.randint(frames // 2, frames + 1, (b,), device="cuda")
        lengths[0] = frames
        u = frames // 16
        out.append((torch.randn(b, frames, 16, device="cuda"), lengths,
                    torch.randint(1, 16, (b, u), device="cuda"), torch.full((b,), u, device="cuda")))
    return out


@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_graphed_steps_follow_the_eager_ones(autocast) -> None:
    """Three shapes, revisited, two micro-batches per optimizer step (the backward of the second adds
    into the first's gradients), AdamW: the graphed model's losses and weights stay on the eager
    model's (fp32 to float rounding; bf16 autocast loosely, its casts differ only in order)."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=16, n_mels=16, d_model=128, n_layers=2, head_size=64, subsample_channels=8, dropout=0.0)
    eager = CTCModel(cfg).cuda()
    for p in eager.parameters():
        p.data.add_(torch.randn_like(p) * 0.05)
    graphed_model = copy.deepcopy(eager)
    graphed = GraphedTrainForward(graphed_model, autocast)
    batches = _batches([(4, 128), (8, 64), (4, 128), (2, 256), (8, 64), (2, 256), (4, 128), (8, 64)])
    runs = {}
    for name, model, forward in (("eager", eager, None), ("graphed", graphed_model, graphed)):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
        if forward is not None:
            keep_grads_allocated(list(model.parameters()))
        losses = []
        for i in range(0, len(batches), 2):
            for feats, lengths, targets, target_lengths in batches[i:i + 2]:
                with torch.autocast("cuda", dtype=autocast or torch.float32, enabled=autocast is not None):
                    logits, out_lengths = (forward or model)(feats, lengths)
                loss = ctc_loss(logits, out_lengths, targets, target_lengths)
                (loss / 2).backward()
                losses.append(loss.item())
            opt.step()
            opt.zero_grad(set_to_none=forward is None)
        runs[name] = (losses, {k: v.detach().clone() for k, v in model.state_dict().items()})
    assert len(graphed.graphs) == 3
    tol = dict(rtol=1e-4, atol=1e-5) if autocast is None else dict(rtol=3e-2, atol=3e-3)
    torch.testing.assert_close(torch.tensor(runs["graphed"][0]), torch.tensor(runs["eager"][0]), **tol)
    for name, w in runs["eager"][1].items():
        torch.testing.assert_close(runs["graphed"][1][name], w, msg=name, **tol)
