"""Shared fixtures: a tiny model overfit on the three short recordings in tests/data.

Training it takes a few seconds on CPU; it is trained once per test session and saved as a normal
checkpoint, so tests of transcription and streaming exercise a model that really recognises speech.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from asr.audio import load_audio
from asr.decode.greedy import ctc_greedy
from asr.features import compute_cmvn_stats, compute_fbank
from asr.model import CTCModel, ModelConfig, ctc_loss
from asr.tokenizer import Tokenizer

DATA = Path(__file__).parent / "data"
BUNDLED_MODEL = Path(__file__).resolve().parents[1] / "asr" / "pretrained" / "model.pt"
#: the text of the small word LM of the ``sentences_arpa`` fixture
LM_SENTENCES = ["the cat sat on the mat", "a dog sat on the log", "the cat ran to the dog", "go forward ten meters"]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest magnitude of the reference ``b``."""
    return ((a - b).abs().max() / b.abs().max()).item()


def stream_in_pieces(sub, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """``sub.stream`` (a ConvSubsampling) over ``x`` [B, T, F] cut into pieces of ``sizes``
    (summing to at least T), caches carried along; the outputs concatenated over time."""
    caches, outs, pos = (None, None), [], 0
    for size in sizes:
        y, caches = sub.stream(x[:, pos : pos + size], caches)
        outs.append(y)
        pos += size
    return torch.cat(outs, dim=1)


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (as asr-live and a server's step run); also keeps the shared
    cores free. Streaming test modules use it on every test (``pytest.mark.usefixtures``)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def read_test_manifest() -> list[dict]:
    lines = (DATA / "manifest.jsonl").read_text().splitlines()
    return [dict(json.loads(line), audio=str(DATA / json.loads(line)["audio"])) for line in lines if line.strip()]


def overfit_tiny_model(entries: list[dict], max_steps: int = 400, seed: int = 0):
    """Train a tiny model on ``entries`` until greedy decoding returns every text (or max_steps).

    Returns (model, tokenizer, steps_taken, decoded texts). Trained on one thread: the same model
    whatever the thread count, so that the tests built on it do not change with the machine's cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _overfit(entries, max_steps, seed)
    finally:
        torch.set_num_threads(threads)


def _overfit(entries: list[dict], max_steps: int, seed: int):
    torch.manual_seed(seed)
    texts = [e["text"] for e in entries]
    tokenizer = Tokenizer.train(texts * 20, model_prefix=None, vocab_size=30)
    feats = [compute_fbank(load_audio(e["audio"])) for e in entries]
    model = CTCModel(ModelConfig(vocab_size=tokenizer.vocab_size, d_model=64, n_layers=2, head_size=32,
                                 subsample_channels=16))
    model.cmvn.set_stats(*compute_cmvn_stats(feats))
    lengths = torch.tensor([f.shape[0] for f in feats])
    batch = torch.nn.utils.rnn.pad_sequence(feats, batch_first=True)
    targets = [torch.tensor(tokenizer.encode(t)) for t in texts]
    target_lengths = torch.tensor([len(t) for t in targets])
    targets = torch.nn.utils.rnn.pad_sequence(targets, batch_first=True)
    opt = torch.optim.AdamW(model.param_groups(0.01, 3e-3))
    decoded: list[str] = []
    for step in range(1, max_steps + 1):
        model.train()
        logits, out_lengths = model(batch, lengths)
        loss = ctc_loss(logits, out_lengths, targets, target_lengths)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 25 == 0:
            model.eval()
            with torch.no_grad():
                logits, out_lengths = model(batch, lengths)
            tokens, _ = ctc_greedy(logits, out_lengths)
            decoded = [tokenizer.decode(t) for t in tokens]
            if decoded == texts:
                break
    model.eval()
    return model, tokenizer, step, decoded


@pytest.fixture(scope="session")
def overfit_checkpoint(tmp_path_factory) -> Path:
    """A checkpoint file (config, model, tokenizer) of a tiny model that transcribes tests/data,
    and hears nothing in faint noise: it also learns 1.5 s of it with an empty transcript, so the
    pauses of long test recordings stay pauses whatever the tokenizer's pieces."""
    import soundfile as sf

    folder = tmp_path_factory.mktemp("overfit")
    quiet = folder / "quiet.wav"
    sf.write(quiet, (1e-3 * torch.randn(24000, generator=torch.Generator().manual_seed(0))).numpy(), 16000)
    entries = read_test_manifest() + [{"id": "quiet", "audio": str(quiet), "duration": 1.5, "text": ""}]
    model, tokenizer, _, decoded = overfit_tiny_model(entries)
    assert decoded == [e["text"] for e in entries], f"tiny model did not overfit: {decoded}"
    path = folder / "tiny.pt"
    torch.save({"config": model.config.to_dict(), "model": model.state_dict(), "tokenizer": tokenizer.to_bytes()}, path)
    return path


@pytest.fixture(scope="session")
def build_binary() -> Path:
    """KenLM's build_binary (packing a word LM into a model file needs it), compiled by
    tools/build_kenlm.py from PyPI's kenlm source when it is not there yet."""
    import sys

    from asr.decode.packed_lm import find_build_binary

    try:
        return find_build_binary()
    except FileNotFoundError:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
        try:
            import build_kenlm
        finally:
            sys.path.pop(0)
        assert build_kenlm.main([]) == 0
        return find_build_binary()


@pytest.fixture(scope="session")
def bundled_tokenizer():
    """The bundled model's tokenizer (the LM tests spell words with it)."""
    from asr.model_file import load_for_inference

    return load_for_inference(BUNDLED_MODEL)[1]


@pytest.fixture(scope="session")
def sentences_arpa(tmp_path_factory) -> Path:
    """A word 3-gram of :data:`LM_SENTENCES` as an ARPA file."""
    from asr.decode.ngram import NGramCounts, write_arpa

    path = tmp_path_factory.mktemp("lm") / "lm.arpa"
    with open(path, "w") as f:
        write_arpa(NGramCounts(3).add_all(LM_SENTENCES * 5), f)
    return path
