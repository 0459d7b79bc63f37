"""Streaming recognizer: parity with offline transcription, batching, endpointing, flat memory.

Models: ``overfit_checkpoint`` (conftest; transcribes the three test files from a fresh state) for
parity, where only streaming == offline matters; ``tests/data/stream_tiny.pt`` (made by
tools/make_stream_test_model.py: overfit on the recording with pauses used here, after varied
leading silence, with each utterance's tokens constrained to fire within it) for endpointing,
where the segments must be the utterances; a random tiny model for the 30-minute stream, where
only cost and memory matter.
"""
from __future__ import annotations

import math
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from asr.audio import AudioError, load_audio, resample
from asr.decode.align import Word, words_from_tokens
from asr.decode.beam import ctc_prefix_beam_search
from asr.decode.greedy import ctc_greedy
from asr.features import compute_fbank
from asr.frames import feature_frames_for_samples
from asr.model import CTCModel, ModelConfig
from asr.model_file import load_for_inference
from asr.stream import EndpointConfig, Endpointer, EndpointRule, Recognizer, split_state, stack_states, step_batch
from asr.stream.endpoint import StreamingEnergy
from asr.stream.state import is_stackable
from asr.tokenizer import Tokenizer

DATA = Path(__file__).parent / "data"
FILES = {  # id -> (file, text)
    "seven": ("audio/fsdd_7_jackson_00.flac", "seven"),
    "goforward": ("audio/pocketsphinx_goforward.flac", "go forward ten meters"),
    "cards": ("audio/pocketsphinx_cards_001.flac", "ten of clubs"),
}
STREAM_MODEL = DATA / "stream_tiny.pt"
SR = 16000


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def waves() -> dict[str, torch.Tensor]:
    return {k: load_audio(DATA / f) for k, (f, _) in FILES.items()}


@pytest.fixture(scope="module")
def overfit(overfit_checkpoint):
    return load_for_inference(overfit_checkpoint)


@pytest.fixture(scope="module")
def stream_model():
    return load_for_inference(STREAM_MODEL)


def pauses_recording(waves, gap_noise_seed: int = 7) -> tuple[torch.Tensor, list[str]]:
    """goforward, 2.5 s of digital silence, cards, 3 s of low noise (-60 dBFS), seven."""
    noise = torch.randn(int(3.0 * SR), generator=torch.Generator().manual_seed(gap_noise_seed)) * 1e-3
    z = lambda s: torch.zeros(int(s * SR))  # noqa: E731
    x = torch.cat([z(0.5), waves["goforward"], z(2.5), waves["cards"], noise, waves["seven"], z(1.0)])
    return x, [FILES[k][1] for k in ("goforward", "cards", "seven")]


def offline_words(model: CTCModel, tok: Tokenizer, wave: torch.Tensor) -> list[Word]:
    """The reference: the whole recording through model.forward, ctc_greedy, words_from_tokens
    (grouped at word starts, confidence from the spike posteriors, times clamped to the audio)."""
    feats = compute_fbank(wave)
    with torch.no_grad():
        logits, _ = model(feats[None], torch.tensor([feats.shape[0]]))
    lp = logits[0].log_softmax(-1)
    tokens, frames = ctc_greedy(lp)
    duration = wave.numel() / SR
    words, group = [], []
    for i, t in enumerate(tokens + [None]):
        if group and (t is None or tok.is_word_start(t)):
            got = words_from_tokens([tokens[j] for j in group], [frames[j] for j in group], tok,
                                    num_frames=lp.shape[0])
            if got:
                w = got[0]
                conf = math.exp(sum(float(lp[frames[j], tokens[j]]) for j in group) / len(group))
                words.append(Word(w.word, min(w.start, duration), min(w.end, duration), conf))
            group = []
        if t is not None:
            group.append(i)
    return words


def stream(rec: Recognizer, wave, sizes, rate: int = SR):
    """Feed ``wave`` in pieces of the given sizes (cycled), then finalize; return (transcript, partials)."""
    pos, k, partials = 0, 0, []
    while pos < len(wave):
        n = sizes[k % len(sizes)]
        partials.append(rec.accept_waveform(wave[pos : pos + n], rate))
        pos, k = pos + n, k + 1
    return rec.finalize(), partials


def random_sizes(rng: random.Random, choices, n: int = 4000) -> list[int]:
    return [rng.choice(choices) for _ in range(n)]


def assert_same_words(got: list[Word], want: list[Word]) -> None:
    assert [(w.word, w.start, w.end) for w in got] == [(w.word, w.start, w.end) for w in want]
    for a, b in zip(got, want):
        assert a.confidence == pytest.approx(b.confidence, abs=1e-4)


# ---------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("name", list(FILES))
def test_stream_equals_offline_on_real_recordings(overfit, waves, name):
    model, tok = overfit
    wave = waves[name]
    want = offline_words(model, tok, wave)
    assert " ".join(w.word for w in want) == FILES[name][1]  # the reference itself is right
    rng = random.Random(hash(name) % 1000)
    choices = [0, 1, 2, 3, 17, 100, 400] if name == "seven" else [0, 1, 160, 333, 1000, 4000, 16000]
    tr, partials = stream(Recognizer(model, tok), wave, random_sizes(rng, choices))
    assert tr.text == FILES[name][1]
    assert_same_words(tr.words, want)
    assert tr.duration == pytest.approx(len(wave) / SR)
    # greedy partials only grow: each partial's words are a prefix of the final words (times fixed)
    final = [(w.word, w.start) for w in tr.words]
    for p in partials:
        assert [(w.word, w.start) for w in p.words[:-1]] == final[: max(0, len(p.words) - 1)]


def test_stream_equals_offline_on_concatenation_with_pauses(overfit, waves):
    """Whatever the (overfit) model says over silence, the stream says the same, endpoints or not."""
    model, tok = overfit
    wave, _ = pauses_recording(waves)
    want = offline_words(model, tok, wave)
    rng = random.Random(3)
    for endpoint in (None, EndpointConfig.disabled()):
        tr, _ = stream(Recognizer(model, tok, endpoint=endpoint), wave, random_sizes(rng, [0, 1, 800, 3200, 16000]))
        assert_same_words(tr.words, want)
        assert tr.text == " ".join(w.word for w in want)


def test_stream_int16_and_other_sample_rates(overfit, waves):
    model, tok = overfit
    wave = waves["goforward"]
    pcm = (wave * 32768).round().clamp(-32768, 32767).to(torch.int16).numpy()
    tr, _ = stream(Recognizer(model, tok), pcm, [1234, 0, 77])
    assert_same_words(tr.words, offline_words(model, tok, torch.from_numpy(pcm).float() / 32768))
    # 44.1 kHz input: the streaming resampler equals resampling the whole signal (float rounding)
    hi = resample(wave, SR, 44100)
    want = offline_words(model, tok, resample(hi, 44100, SR))
    tr, _ = stream(Recognizer(model, tok), hi.numpy(), [4410, 1, 999], rate=44100)
    assert [(w.word, w.start, w.end) for w in tr.words] == [(w.word, w.start, w.end) for w in want]
    assert tr.duration == pytest.approx(len(resample(hi, 44100, SR)) / SR)


def test_beam_stream_equals_offline_beam(overfit, waves):
    model, tok = overfit
    wave = waves["cards"]
    feats = compute_fbank(wave)
    with torch.no_grad():
        logits, _ = model(feats[None], torch.tensor([feats.shape[0]]))
    best_tokens = ctc_prefix_beam_search(logits[0].log_softmax(-1), beam_size=4)[0][0]
    tr, partials = stream(Recognizer(model, tok, beam_size=4, endpoint=EndpointConfig.disabled()), wave, [500, 3, 2000])
    assert tr.text == tok.decode(best_tokens) == FILES["cards"][1]
    assert partials[-1].text == tr.text
    assert all(w.confidence is not None and 0 < w.confidence <= 1 for w in tr.words)


def test_bad_input_is_refused_and_the_stream_goes_on(overfit, waves):
    model, tok = overfit
    rec = Recognizer(model, tok)
    wave = waves["seven"]
    rec.accept_waveform(wave[:3000])
    with pytest.raises(AudioError, match="non-finite"):
        rec.accept_waveform(torch.tensor([0.0, float("nan")]))
    with pytest.raises(AudioError):
        rec.accept_waveform(np.zeros(10, dtype=np.uint8))
    rec.accept_waveform(wave[3000:])
    assert rec.finalize().text == "seven"
    assert rec.finalize().text == "seven"  # idempotent
    with pytest.raises(RuntimeError, match="reset"):
        rec.accept_waveform(wave)
    rec.reset()
    rec.accept_waveform(wave.numpy().reshape(-1, 1).repeat(2, axis=1))  # [n, channels] -> mono
    assert rec.finalize().text == "seven"


def test_api_stream_matches_api_transcribe(overfit_checkpoint, waves):
    api = pytest.importorskip("asr.api")
    m = api.load_model(overfit_checkpoint)
    rec = m.stream()
    assert isinstance(rec, Recognizer)
    wave = waves["goforward"]
    tr, _ = stream(rec, wave.numpy(), [999, 5000])
    ref = m.transcribe(wave.numpy(), sample_rate=SR)
    assert_same_words(tr.words, ref.words)


# ---------------------------------------------------------------------------------------------- batching
def test_stack_split_states_roundtrip_and_batched_step(overfit):
    model, _ = overfit
    torch.manual_seed(0)
    feats = [torch.randn(1, 4 * k, 80) * 3 + 5 for k in (3, 5, 2)]
    states = []
    with torch.inference_mode():
        for f in feats:
            _, s = model.step(f, model.init_state(1))
            states.append(s)
        states.insert(0, model.init_state(1))  # a fresh state (caches None) stacks too
        assert all(is_stackable(s) for s in states)
        stacked = stack_states(model, states)
        parts = split_state(stacked, [s.frames_in for s in states], [s.frames_out for s in states])
        for a, b in zip(parts[1:], states[1:]):
            assert len(a.blocks) == len(b.blocks)  # the rows' block states are made when read
            torch.testing.assert_close(a.blocks[1].wkv, b.blocks[1].wkv, rtol=0, atol=0)
            torch.testing.assert_close(a.blocks[-1].tmix_prev, b.blocks[-1].tmix_prev, rtol=0, atol=0)
            torch.testing.assert_close([blk.cmix_prev for blk in a.blocks[2:]], [blk.cmix_prev for blk in b.blocks[2:]],
                                       rtol=0, atol=0)
            torch.testing.assert_close(a.subsampling[1], b.subsampling[1], rtol=0, atol=0)
            assert (a.frames_in, a.frames_out) == (b.frames_in, b.frames_out)
        x = torch.randn(4, 8, 80) * 3 + 5
        out, new = model.step(x, stacked)
        for i, s in enumerate(states):
            ref, ref_state = model.step(x[i : i + 1], s)
            torch.testing.assert_close(out[i : i + 1], ref, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(split_state(new)[i].blocks[0].wkv, ref_state.blocks[0].wkv, rtol=1e-5, atol=1e-5)
        _, odd = model.step(torch.randn(1, 3, 80), model.init_state(1))
        with pytest.raises(ValueError, match="multiple of 4"):
            stack_states(model, [states[1], odd])


def test_stacking_the_rows_of_a_batch_again_reuses_it(overfit):
    """split_state then stack_states of all rows in order gives back the batch itself (no copy);
    any other selection or order is stacked by copying, row by row as given."""
    model, _ = overfit
    torch.manual_seed(1)
    with torch.inference_mode():
        _, batch = model.step(torch.randn(3, 8, 80) * 3 + 5, model.init_state(3))
        rows = split_state(batch, [8] * 3, [2] * 3)
        again = stack_states(model, rows)
        assert again.blocks[0].wkv.data_ptr() == batch.blocks[0].wkv.data_ptr()
        assert again.subsampling[1].data_ptr() == batch.subsampling[1].data_ptr()
        assert (again.frames_in, again.frames_out) == (0, 0)
        swapped = stack_states(model, [rows[2], rows[0], rows[1]])
        assert swapped.blocks[0].wkv.data_ptr() != batch.blocks[0].wkv.data_ptr()
        for blk, ref in zip(swapped.blocks, batch.blocks):
            torch.testing.assert_close(blk.wkv, ref.wkv[[2, 0, 1]], rtol=0, atol=0)
            torch.testing.assert_close(blk.cmix_prev, ref.cmix_prev[[2, 0, 1]], rtol=0, atol=0)
        torch.testing.assert_close(swapped.subsampling[0], batch.subsampling[0][[2, 0, 1]], rtol=0, atol=0)
        two = stack_states(model, rows[:2])  # a subset of the rows: a copy of those rows
        assert two.blocks[0].wkv.shape[0] == 2
        torch.testing.assert_close(two.blocks[-1].wkv, batch.blocks[-1].wkv[:2], rtol=0, atol=0)
        # a stream stepped on its own since then is no longer a row of the batch
        _, moved = model.step(torch.randn(1, 4, 80) * 3 + 5, rows[1])
        mixed = stack_states(model, [rows[0], moved, rows[2]])
        torch.testing.assert_close(mixed.blocks[0].wkv[1:2], moved.blocks[0].wkv, rtol=0, atol=0)
        torch.testing.assert_close(mixed.blocks[0].wkv[0:1], batch.blocks[0].wkv[0:1], rtol=0, atol=0)


def test_step_batch_equals_separate_streams(overfit, waves):
    """Streams of different lengths, fed blocks of different sizes, one of them started alone with
    odd piece sizes: stepped as one batch they give what each gives alone."""
    model, tok = overfit
    names = ["goforward", "cards", "seven", "goforward"]
    recs = [Recognizer(model, tok) for _ in names]
    recs[3].accept_waveform(waves["goforward"][:1234])  # out of phase: feature frames % 4 != 0
    pos = [0, 0, 0, 1234]
    rng = random.Random(5)
    while any(p < len(waves[n]) for p, n in zip(pos, names)):
        sizes = [rng.choice([0, 160, 1600, 2400, 5000]) for _ in names]
        blocks = [waves[n][p : p + s] for n, p, s in zip(names, pos, sizes)]
        step_batch(recs, blocks)
        pos = [p + s for p, s in zip(pos, sizes)]
    for rec, name in zip(recs, names):
        tr = rec.finalize()
        assert tr.text == FILES[name][1]
        assert_same_words(tr.words, offline_words(model, tok, waves[name]))
    with pytest.raises(ValueError, match="twice"):
        step_batch([recs[0], recs[0]], [np.zeros(1), np.zeros(1)])


def test_step_batch_leaves_streams_as_rows_of_one_batch(overfit, waves):
    """Streams given different frame counts (a second, smaller call for the longer ones; with
    ``max_call_frames=1`` also calls of every stream after the first) still leave as the rows of
    one batched state, in order, so that the next call stacks them without a copy; each row holds
    what the stream's state is when it is stepped alone, in one call."""
    model, tok = overfit
    recs = [Recognizer(model, tok) for _ in range(3)]
    alone = [Recognizer(model, tok) for _ in range(3)]
    wave = waves["goforward"]
    sizes = [1600, 2400, 1600]  # 2, 3 and 2 encoder frames
    for k in range(4):
        blocks = [wave[k * 2400 : k * 2400 + n] for n in sizes]
        step_batch(recs, blocks, max_call_frames=None if k < 2 else 1)
        for rec, block in zip(alone, blocks):
            step_batch([rec], [block])
        parents = {id(r.state.stacked_from[0]) for r in recs}
        assert len(parents) == 1 and [r.state.stacked_from[1] for r in recs] == [0, 1, 2]
        batch = recs[0].state.stacked_from[0]
        again = stack_states(model, [r.state for r in recs])
        assert again.blocks[-1].wkv.data_ptr() == batch.blocks[-1].wkv.data_ptr()
        for rec, ref in zip(recs, alone):
            assert (rec.state.frames_in, rec.state.frames_out) == (ref.state.frames_in, ref.state.frames_out)
            torch.testing.assert_close(rec.state.blocks[-1].wkv, ref.state.blocks[-1].wkv, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(rec.state.subsampling[1], ref.state.subsampling[1], rtol=1e-4, atol=1e-5)


def test_step_batch_bad_block_moves_no_stream(overfit, waves):
    """A NaN block for one stream raises AudioError before any stream consumed its block, so
    the caller can send the good blocks again: all streams then end with what they give alone."""
    model, tok = overfit
    names = ["goforward", "cards"]
    recs = [Recognizer(model, tok) for _ in names]
    half = [len(waves[n]) // 2 for n in names]
    step_batch(recs, [waves[n][:h] for n, h in zip(names, half)])
    before = [r.duration for r in recs]
    with pytest.raises(AudioError, match="non-finite"):
        step_batch(recs, [waves["goforward"][half[0]:], np.full(800, np.nan, dtype=np.float32)])
    assert [r.duration for r in recs] == before  # so the caller can retry the good blocks
    step_batch(recs, [waves[n][h:] for n, h in zip(names, half)])
    for rec, name in zip(recs, names):
        assert rec.finalize().text == FILES[name][1]
    with pytest.raises(RuntimeError, match="finalized"):
        step_batch(recs, [np.zeros(160), np.zeros(160)])


# ---------------------------------------------------------------------------------------------- endpointing
def test_endpoint_rules():
    cfg = EndpointConfig()
    ep = Endpointer(cfg, 0.04)
    fired = [ep.update(True) for _ in range(60)]  # 2.4 s of silence, nothing decoded: rule 1
    assert fired == [0] * 59 + [1] and ep.segment_frames == 0
    assert [ep.update(False) for _ in range(5)] == [0] * 5
    fired = [ep.update(True) for _ in range(30)]  # 1.2 s of silence after speech: rule 2
    assert fired == [0] * 29 + [2]
    fired = [ep.update(i % 3 == 0) for i in range(500)]  # 20 s of speech without a pause: rule 3
    assert fired == [0] * 499 + [3]
    off = Endpointer(EndpointConfig.disabled(), 0.04)
    assert not any(off.update(True) for _ in range(1000))
    strict = Endpointer(EndpointConfig(rule2=EndpointRule(True, 0.5, 2.0)), 0.04)
    strict.update(False)
    assert [strict.update(True) for _ in range(49)] == [0] * 48 + [2]  # needs 2 s of segment too
    with pytest.raises(ValueError):
        EndpointConfig(rule3=EndpointRule(False, 0.0, 0.0))


def test_streaming_energy_matches_frames():
    x = torch.randn(SR) * 0.1
    x[8000:] *= 0.001
    rng = random.Random(0)
    e, got, pos = StreamingEnergy(), [], 0
    while pos < len(x):
        n = rng.choice([0, 1, 50, 399, 1600])
        got.append(e.accept_waveform(x[pos : pos + n]))
        pos += n
    got = torch.cat(got)
    frames = x.unfold(0, 400, 160)
    assert got.shape[0] == compute_fbank(x).shape[0] == frames.shape[0]
    torch.testing.assert_close(got, 10 * torch.log10(frames.double().square().mean(1)).float(), rtol=0, atol=1e-4)


@pytest.mark.parametrize("energy_db", [None, -40.0])
def test_endpointing_splits_recording_with_pauses(stream_model, waves, energy_db):
    model, tok = stream_model
    wave, texts = pauses_recording(waves)
    rec = Recognizer(model, tok, endpoint=EndpointConfig(energy_threshold_db=energy_db))
    finals_during_stream = []
    pos = 0
    while pos < len(wave):
        p = rec.accept_waveform(wave[pos : pos + 1600])  # 0.1 s blocks, as from a microphone
        finals_during_stream += [(s, rec.duration) for s in p.segments]
        pos += 1600
    tr = rec.finalize()
    assert [s.text for s in tr.segments] == texts
    # the first two were final while the stream ran, within ~1.2-2 s after their last word
    assert [s.text for s, _ in finals_during_stream][:2] == texts[:2]
    for seg, at in finals_during_stream[:2]:
        assert 1.1 <= at - seg.end < 2.5
    # endpointing changes nothing in the words: they are the offline words
    assert_same_words(tr.words, offline_words(model, tok, wave))
    # segment times lie inside (or at most 0.4 s after: a causal model fires late) their utterance
    starts = [0.5, 0.5 + 2.786 + 2.5, 0.5 + 2.786 + 2.5 + 1.095 + 3.0]
    durs = [2.786, 1.095, 0.432]
    for seg, s0, d in zip(tr.segments, starts, durs):
        assert s0 - 0.05 <= seg.start and seg.end <= s0 + d + 0.4


def test_endpoint_keeps_the_recurrent_state(stream_model, waves):
    """After an endpoint the model continues from its state (not a fresh one): the logits equal
    those of one uninterrupted offline pass (checked through the words) and the state object is
    carried, never re-initialised."""
    model, tok = stream_model
    wave, texts = pauses_recording(waves)
    rec = Recognizer(model, tok)
    pos, seen_endpoint = 0, False
    while pos < len(wave):
        before = rec.state.frames_in
        p = rec.accept_waveform(wave[pos : pos + 3200])
        seen_endpoint |= p.is_endpoint
        assert rec.state.frames_in >= before  # counts since the stream start: never reset
        pos += 3200
    assert seen_endpoint
    assert rec.state.frames_in == compute_fbank(wave).shape[0]


# ---------------------------------------------------------------------------------------------- long streams
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_thirty_minute_stream_has_flat_state_and_memory():
    """30 minutes of silence, noise and tones in 2 s blocks through a random tiny model (it emits
    tokens all the time, so segments keep being cut by the 20 s rule): the recurrent state keeps
    its size, the recognizer keeps nothing that grows, and the process's memory stays flat."""
    torch.manual_seed(0)
    tok = Tokenizer.train(["go forward ten meters", "ten of clubs", "seven"] * 20, None, vocab_size=30)
    model = CTCModel(ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=1, head_size=32,
                                 subsample_channels=4, ffn_mult=1, lora_decay=8, lora_aaa=8, lora_mv=8, lora_gate=8))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)  # the reference init outputs only blank; make it talk
    model.eval()
    rec = Recognizer(model, tok, keep_segments=False)
    g = torch.Generator().manual_seed(1)
    block = 2 * SR
    t = torch.arange(block) / SR
    n_blocks = 30 * 60 // 2
    sizes, n_segments, rss = set(), 0, {}
    start = time.perf_counter()
    for i in range(n_blocks):
        kind = i % 4
        if kind == 0:
            x = torch.zeros(block)
        elif kind == 1:
            x = torch.randn(block, generator=g) * 0.05
        else:
            x = 0.3 * torch.sin(2 * math.pi * (150 + 40 * (i % 9)) * t) + torch.randn(block, generator=g) * 0.01
        p = rec.accept_waveform(x)
        n_segments += len(p.segments)
        sizes.add(rec.state.size_bytes())
        assert rec._decoder.num_tokens <= 20 / 0.04 and not rec.segments and len(rec._energies) == 0
        if i in (n_blocks // 10, n_blocks - 1):
            rss[i] = _rss_bytes()
    elapsed = time.perf_counter() - start
    assert rec.duration == pytest.approx(30 * 60)
    n_feats = feature_frames_for_samples(30 * 60 * SR)
    assert rec.num_frames == math.ceil(math.ceil(n_feats / 2) / 2)
    assert len(sizes) == 1  # the model state never changes size
    assert rec.state_size_bytes() < sizes.pop() + 4 * 400 + 100
    assert n_segments >= 30 * 60 / 20 * 0.5  # segments were cut and handed out all along
    growth = rss[n_blocks - 1] - rss[n_blocks // 10]
    assert growth < 16 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over 27 minutes of audio"
    assert rec.finalize().duration == pytest.approx(30 * 60)
    print(f"30 min of audio in {elapsed:.1f} s, {n_segments} segments, RSS growth {growth / 2**20:.2f} MiB")


def test_tune_for_streaming_freezes_the_collector_and_tunes_glibc_malloc():
    """In a child process: it changes process-wide settings that tests should not inherit."""
    code = ("import gc, sys; from asr.stream import tune_for_streaming; tuned = tune_for_streaming(); "
            "print(tuned, gc.get_freeze_count() > 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert out == [str(glibc), "True"]
