"""Our RWKV-7 blocks against golden vectors from the reference implementation (shared/testvectors).

The vectors were checked against BlinkDL's RWKV-LM to ~1e-15; every term of the block moves the
output, so a bug in any of them fails here. Both the parallel (chunked) and the recurrent path are
checked, in float64 (1e-12) and float32 (1e-5).
"""
from pathlib import Path

import pytest
import torch

from asr.model.rwkv7 import Block
from asr.ops.wkv7 import wkv7

GOLDEN = Path(__file__).parent / "data" / "rwkv7_blocks.pt"
C, H, N = 128, 2, 64
RANKS = {"decay": 32, "aaa": 32, "mv": 32, "gate": 64}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).abs().max() / want.abs().max()).item()


@pytest.fixture(scope="module")
def golden() -> dict:
    return torch.load(GOLDEN)


def make_blocks(golden: dict, dtype: torch.dtype) -> list[Block]:
    blocks = []
    for layer in (0, 1):
        block = Block(C, N, layer, n_layers=2, ranks=RANKS)
        prefix = f"blocks.{layer}."
        params = {k[len(prefix):]: v for k, v in golden.items() if k.startswith(prefix)}
        missing, unexpected = block.load_state_dict(params, strict=False)
        assert not unexpected, unexpected
        assert not missing, missing
        blocks.append(block.to(dtype))
    return blocks


def run_blocks(blocks, x, states=None, impl="auto"):
    v_first = None
    new_states, outs = [], []
    for i, block in enumerate(blocks):
        x, state, v_first = block(x, None if states is None else states[i], v_first, impl=impl)
        outs.append(x)
        new_states.append(state)
    return outs, new_states


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("impl", ["chunked", "recurrent"])
def test_blocks_match_golden(golden, dtype, tol, impl):
    blocks = make_blocks(golden, dtype)
    with torch.no_grad():
        outs, states = run_blocks(blocks, golden["x"].to(dtype), impl=impl)
    for layer in (0, 1):
        assert rel_err(outs[layer], golden[f"act.{layer}.out"]) < tol
        assert rel_err(states[layer].tmix_prev, golden[f"state.{layer}.tmix_prev"]) < tol
        assert rel_err(states[layer].wkv, golden[f"state.{layer}.S"]) < tol
        assert rel_err(states[layer].cmix_prev, golden[f"state.{layer}.cmix_prev"]) < tol


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_streaming_split_matches_golden(golden, dtype, tol):
    """Tokens 0..19 then 20..36 with the state carried, as the file's stream.* entries."""
    blocks = make_blocks(golden, dtype)
    x = golden["x"].to(dtype)
    with torch.no_grad():
        part1, states = run_blocks(blocks, x[:, :20])
        for layer in (0, 1):
            assert rel_err(part1[layer], golden[f"stream.{layer}.part1"]) < tol
            assert rel_err(states[layer].wkv, golden[f"stream.state.{layer}.S"]) < tol
        part2, states = run_blocks(blocks, x[:, 20:], states)
    for layer in (0, 1):
        assert rel_err(part2[layer], golden[f"stream.{layer}.part2"]) < tol
        assert rel_err(states[layer].wkv, golden[f"state.{layer}.S"]) < tol


def test_token_by_token_matches_golden(golden):
    """The streaming step (T = 1, recurrent kernel) reproduces the whole-sequence outputs."""
    blocks = make_blocks(golden, torch.float64)
    x = golden["x"]
    states, outs = None, []
    with torch.no_grad():
        for t in range(x.shape[1]):
            step_outs, states = run_blocks(blocks, x[:, t : t + 1], states)
            outs.append(step_outs[1])
    assert rel_err(torch.cat(outs, dim=1), golden["act.1.out"]) < 1e-12


@pytest.mark.parametrize("impl", ["chunked", "recurrent"])
def test_wkv_kernel_alone_matches_golden(golden, impl):
    view = lambda t: t.view(2, 37, H, N)  # noqa: E731
    r, w, k, v, a, kk = (view(golden[f"act.0.{n}"]) for n in ("r", "w", "k", "v", "a", "kk"))
    y, S = wkv7(r, w, k, v, -kk, kk * a, impl=impl)
    assert rel_err(y.reshape(2, 37, C), golden["act.0.y"]) < 1e-12
    assert rel_err(S, golden["state.0.S"]) < 1e-12
    # Start from the stored mid-stream state.
    y2, S2 = wkv7(*(t[:, 20:] for t in (r, w, k, v, -kk, kk * a)), state=golden["stream.state.0.S"], impl=impl)
    assert rel_err(y2.reshape(2, 17, C), golden["act.0.y"][:, 20:]) < 1e-12
    assert rel_err(S2, golden["state.0.S"]) < 1e-12
