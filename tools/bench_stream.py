"""Streaming benchmark on the CPU: per-frame cost, real-time factor, state memory, batched capacity.

    python tools/bench_stream.py                       # default model size (ModelConfig()), random weights
    python tools/bench_stream.py --model ckpt.pt       # a trained checkpoint
    python tools/bench_stream.py --quick               # fewer repetitions (a smoke run)
    python tools/bench_stream.py --latency-only        # word emission delays on .data/real (bundled model)

Tables (markdown), all on ``--threads`` intra-op threads (default 1, as ``asr-live`` runs):

1. Single stream, frame by frame (40 ms of audio per call, after warm-up): first the **default
   path**, ``asr.load_model(--model).stream()`` as users run it (the bundled model and its LM
   unless ``--model``; the engine ``load_model`` picks, ``onnx-int8`` where ONNX Runtime runs),
   then the whole recognizer (``Recognizer.accept_waveform``: fbank, ``encoder.step``, greedy
   decoding, endpointing) and ``encoder.step`` alone, median, mean and p99 per frame and the
   real-time factor (compute / audio), for each backend of :class:`asr.infer.InferenceEncoder`:
   ``onnx-int8`` (the default engine: the int8 step as an ONNX Runtime graph, :mod:`asr.infer.ort`),
   ``reference`` (``CTCModel.step``, the model's own modules), ``float`` (packed float32), ``int8``
   and, unless ``--skip compile``, ``compiled`` and ``compiled-int8`` (inductor, for one and for
   four encoder frames per call; the compile time is printed), all timed in alternating rounds so
   machine-load drift hits them alike; the recognizer is also timed with the compiled backend.
   Unless ``--skip onnx``, the model is exported to ONNX (:mod:`asr.export.onnx`, one and four
   frames per call, float32 and ONNX Runtime's dynamic int8) and
   :class:`asr.export.runtime.OnnxEncoder` ``step`` is timed in the same rounds (one intra-op and
   one inter-op thread, sequential, all graph optimizations); the export time and the sessions'
   creation times (without, writing and reading the optimized-graph cache) are printed below the
   table.
   The floor the issue sets: one fp32 matrix-vector product over as many weights as the model has
   (reading every weight once per frame), measured in the same run, and the int8 floor: one int8
   mat-vec over as many weights with the kernel the int8 path uses (``torch._int_mm``); and the
   same model with ``torch.ao`` dynamic int8 quantization of its ``nn.Linear`` layers.
2. torchaudio's Emformer at about the same size (d=256, 12 layers, 4 heads, FFN 1024, segments of
   4 frames + 1 right-context frame, 32 frames of left context) through ``Emformer.infer``: the
   encoder only, per 160 ms segment and per 40 ms, and its ratio to the default engine's step.
   Then (unless ``--skip emformer``) the two head to head: our default engine (and, unless
   ``--skip compile``, the compiled int8 step), frame by frame and 160 ms per call, and Emformer's
   segment, in short alternating runs.
3. State memory per stream: ours (``EncoderState.size_bytes()`` + frontend buffers) and Emformer's.
4. Concurrent streams: B streams stepped as one batch with ``asr.stream.step_batch`` (every call
   gives each stream ``--batch-block`` seconds of audio), and ``encoder.step`` on the batched state
   alone (what a server that keeps the states stacked would pay). The largest B whose *mean* time
   per call (garbage collections and all) stays under the audio it processes keeps real time;
   found by doubling, then bisection. The float and int8 backends, then (unless ``--skip
   compile``) the compiled ones, whose batched calls run a compiled wkv update. Before it the process calls :func:`asr.stream.tune_for_streaming`, as a server should
   (``gc.freeze()`` and glibc malloc settings: without them, garbage-collection stalls of
   ~150-300 ms every few dozen calls, and the states' memory mapped and zeroed again every call).
5. With ``--latency`` (or alone: ``--latency-only``): each word's emission delay on real
   recordings, as users feel it. ``--latency-utts`` recordings spread over the ``dev_*.jsonl``
   manifests in ``--latency-data`` (default ``.data/real``, made by ``python recipes/real/prepare.py
   --seed 0``) go through the default ``asr.load_model(--model).stream()`` (the bundled model and
   LM unless ``--model``) in 40 ms blocks. A word's delay runs from its end in a forced alignment
   of the reference transcript over the offline pass's log-probs
   (``torchaudio.functional.forced_align``) to the first partial or final segment that shows it
   (same text, overlapping span); median and p95, also with the compute time of the showing call
   added, for all words and apart for words a partial showed and words only a final segment
   (its LM search) showed.

Weights are random (the default) or a checkpoint's; speed does not depend on their values. The
numbers depend on the machine and its load: the 1-minute load average is printed with them.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asr.frames import FRAME_SECONDS as FRAME  # noqa: E402
from asr.frames import SAMPLE_RATE as SR  # noqa: E402
from asr.infer import InferenceEncoder  # noqa: E402
from asr.model import CTCModel, ModelConfig  # noqa: E402
from asr.stream import Recognizer, stack_states, step_batch, tune_for_streaming  # noqa: E402
from asr.tokenizer import Tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))]


def timeit(fn: Callable[[], object], reps: int, warmup: int = 5) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def build_model(path: Optional[str]) -> tuple[CTCModel, Tokenizer]:
    if path:
        from asr.model_file import load_for_inference

        return load_for_inference(path)
    import random

    rng = random.Random(0)  # random words: enough text for a 256-piece BPE vocabulary
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(3000)]
    texts = [" ".join(rng.sample(words, 12)) for _ in range(2000)]
    tok = Tokenizer.train(texts, None, vocab_size=256)
    torch.manual_seed(0)
    model = CTCModel(ModelConfig(vocab_size=tok.vocab_size))
    with torch.no_grad():  # the reference init zeroes some matrices; give every weight a value
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval(), tok


def speech_like(seconds: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * SR)) / SR
    env = 0.5 + 0.5 * torch.sin(2 * math.pi * 3 * t)
    return (0.2 * env * torch.sin(2 * math.pi * 220 * t) + 0.02 * torch.randn(t.shape, generator=g)).float()


#: bench key -> backend of asr.infer.InferenceEncoder (False/True: the "general"/"packed" keys of old tables)
BACKEND = {False: "reference", True: "float", "int8": "int8", "ort_int8": "onnx-int8", "compiled": "compiled",
           "compiled_int8": "compiled-int8"}
#: recognizer timing keys per engine key
RECOGNIZER = {True: "recognizer", "compiled": "recognizer_compiled", "ort_int8": "recognizer_ort_int8"}


#: Encoder-step rows of the single-stream table, in print order: (group, timing key suffix, label at
#: one frame (40 ms) per call, label at several frames per call with ``{}`` for the call's size).
#: Group "" is always measured, "compiled" unless ``--skip compile``, "onnx" unless ``--skip onnx``.
STEP_ROWS = [
    ("", "ort_int8", "encoder.step, **onnx-int8 backend (the default engine)**", "encoder.step, {}, onnx-int8 (4-frame graph)"),
    ("", "False", "encoder.step, reference backend (`CTCModel.step`)", "encoder.step, {}, reference"),
    ("", "True", "encoder.step, float backend (`backend=\"float\"`)", "encoder.step, {}, float"),
    ("", "int8", "encoder.step, int8 backend (`int8=True`)", "encoder.step, {}, int8"),
    ("compiled", "compiled", "encoder.step, compiled backend (`compile=True`)", "encoder.step, {}, compiled"),
    ("compiled", "compiled_int8", "encoder.step, compiled-int8 backend (`int8=True, compile=True`)",
     "encoder.step, {}, compiled-int8"),
    ("onnx", "onnx", "OnnxEncoder.step, ONNX Runtime float32 (`asr-export --format onnx`)",
     "OnnxEncoder.step, {}, ONNX Runtime float32"),
    ("onnx", "onnx_int8", "OnnxEncoder.step, ONNX Runtime int8 (dynamic quantization)",
     "OnnxEncoder.step, {}, ONNX Runtime int8"),
]
#: Whole-recognizer rows printed after a group's one-frame step rows: group -> [(label, timing key)].
GROUP_RECOGNIZER_ROWS = {
    "compiled": [("recognizer, compiled backend", "recognizer_compiled")],
    "onnx": [("recognizer on OnnxEncoder, float32", "recognizer_onnx"),
             ("recognizer on OnnxEncoder, int8", "recognizer_onnx_int8")],
}


def step_rows(single: dict, groups: set[str]) -> list[tuple[str, list[float]]]:
    """(label, per-40-ms seconds) rows of :data:`STEP_ROWS` for group "" and ``groups``, from
    :func:`single_stream`'s timings ``single``: first at 1 frame per call (``step_<key>``), each group
    followed by its :data:`GROUP_RECOGNIZER_ROWS`, then at 4 frames per call (``step4_<key>``)."""
    rows = []
    for frames in (1, 4):
        prefix = "step" if frames == 1 else f"step{frames}"
        call = f"{round(1000 * FRAME * frames)} ms ({frames} frames) per call, per 40 ms"
        for group in ("", "compiled", "onnx"):
            if group and group not in groups:
                continue
            rows += [(label if frames == 1 else several.format(call), single[f"{prefix}_{key}"])
                     for g, key, label, several in STEP_ROWS if g == group]
            if frames == 1:
                rows += [(label, single[key]) for label, key in GROUP_RECOGNIZER_ROWS.get(group, [])]
    return rows


def single_stream(model: CTCModel, tok: Tokenizer, frames: int, compile: bool = False,
                  onnx: Optional[dict] = None, default=None) -> dict:
    """Per-frame cost of the whole recognizer and of encoder.step alone, per backend (and of the
    ``onnx`` encoders' ``step``, by name, in the same rounds); with ``default`` (an
    :class:`asr.ASRModel` from ``asr.load_model``), its ``stream()`` too, as users run it."""
    audio = speech_like(frames * FRAME + 2.0)
    keys = [False, True, "int8", "ort_int8"] + (["compiled", "compiled_int8"] if compile else [])
    engines, out = {}, {"compile_s": {}}
    for key in keys:  # built (and compiled) once each, kept across the rounds
        t = time.perf_counter()
        engines[key] = InferenceEncoder(model, BACKEND[key], compile_frames=(1, 4))
        if key in ("compiled", "compiled_int8", "ort_int8"):
            out["compile_s"][key] = time.perf_counter() - t
    recs = {key: Recognizer(engines[key], tok) for key in RECOGNIZER if key in engines}
    if default is not None:
        recs["default"] = default.stream()
        RECOGNIZER["default"] = "recognizer_default"
    hop = int(FRAME * SR)
    feats = torch.randn(1, 4, 80) * 3 + 5
    feats4 = torch.randn(1, 16, 80) * 3 + 5  # 160 ms per call: 4 encoder frames, Emformer's segment
    for key, rec in recs.items():
        rec.accept_waveform(audio[:SR])  # warm-up: the first second
        out[RECOGNIZER[key]] = []
    out.update({"state_bytes": recs[True].state_size_bytes(), "model_state_bytes": recs[True].state.size_bytes(),
                "engines": engines})
    for key in keys:
        out[f"step_{key}"], out[f"step4_{key}"] = [], []
    onnx = onnx or {}
    onnx_recs = {}
    for key, enc in onnx.items():
        out[f"step_{key}"], out[f"step4_{key}"], out[f"recognizer_{key}"] = [], [], []
        onnx_recs[key] = Recognizer(enc, tok)
        onnx_recs[key].accept_waveform(audio[:SR])
    with torch.inference_mode():
        for rnd in range(4):  # alternate the backends so load drift on a shared machine hits all alike
            for key in keys + (["default"] if default is not None else []):
                if key == "default":
                    out["recognizer_default"] += _feed_timed(recs["default"], audio, max(5, frames // 4))
                    continue
                enc = engines[key]
                state = enc.init_state(1)
                _, state = enc.step(feats, state)

                def one():
                    nonlocal state
                    _, state = enc.step(feats, state)

                def four():
                    nonlocal state
                    _, state = enc.step(feats4, state)

                out[f"step_{key}"] += timeit(one, max(5, frames // 4))
                out[f"step4_{key}"] += [t / 4 for t in timeit(four, max(5, frames // 16))]
                rec = recs.get(key)
                if rec is not None:  # the whole recognizer, frame by frame
                    out[RECOGNIZER[key]] += _feed_timed(rec, audio, max(5, frames // 4))
            for key, enc in onnx.items():
                out[f"step_{key}"] += timeit(_stepper(enc, feats), max(5, frames // 4))
                out[f"step4_{key}"] += [t / 4 for t in timeit(_stepper(enc, feats4), max(5, frames // 16))]
                rec_pos = [SR]

                def feed(rec=onnx_recs[key]) -> None:  # the next 40 ms of the audio, looping
                    if rec_pos[0] + hop > len(audio):
                        rec_pos[0] = SR
                    rec.accept_waveform(audio[rec_pos[0] : rec_pos[0] + hop])
                    rec_pos[0] += hop

                out[f"recognizer_{key}"] += timeit(feed, max(5, frames // 4), warmup=0)
        out["init_state"] = timeit(lambda: model.init_state(1), frames)
    return out


def _feed_timed(rec: Recognizer, audio: torch.Tensor, calls: int) -> list[float]:
    """Seconds of each of ``calls`` ``accept_waveform`` calls of 40 ms, through ``audio`` from 1 s
    on, looping (a recognizer keeps its place in ``rec._bench_pos``)."""
    hop, times = int(FRAME * SR), []
    pos = getattr(rec, "_bench_pos", SR)
    for _ in range(calls):
        if pos + hop > len(audio):
            pos = SR
        t = time.perf_counter()
        rec.accept_waveform(audio[pos : pos + hop])
        times.append(time.perf_counter() - t)
        pos += hop
    rec._bench_pos = pos
    return times


def _stepper(encoder, feats: torch.Tensor) -> Callable[[], None]:
    """A call of ``encoder.step(feats, state)`` that carries its own stream's state along."""
    state = encoder.init_state(1)
    _, state = encoder.step(feats, state)

    def one() -> None:
        nonlocal state
        _, state = encoder.step(feats, state)

    return one


def onnx_encoders(model: CTCModel, threads: int) -> tuple[dict, list[tuple[str, float]]]:
    """The model exported to ONNX (1 and 4 frames per call, float32 and int8) in a temporary
    folder, and ONNX Runtime encoders on it: ({"onnx": float32, "onnx_int8": int8}, [(what, seconds)]
    of export and session creation: without the optimized-graph cache, the first start with it
    (optimizes and writes it) and a later start (reads it))."""
    import tempfile

    from asr.export.onnx import export_onnx
    from asr.export.runtime import OnnxEncoder

    folder = Path(tempfile.mkdtemp(prefix="bench_stream_onnx_"))
    times = []
    t = time.perf_counter()
    export_onnx(model, folder / "model", frames=(1, 4), int8=True)
    times.append(("export (1 and 4 frames per call, float32 + int8)", time.perf_counter() - t))
    encoders = {}
    for key, int8 in (("onnx", False), ("onnx_int8", True)):
        for what, cache in (("no cache", None), ("first start, writes the cache", folder / "cache"),
                            ("later start, reads the cache", folder / "cache")):
            t = time.perf_counter()
            OnnxEncoder(folder / "model", int8=int8, threads=threads, cache_dir=cache)
            times.append((f"{key}: one-frame graph session, {what}", time.perf_counter() - t))
        encoders[key] = OnnxEncoder(folder / "model", int8=int8, threads=threads, cache_dir=folder / "cache",
                                    step_frames=(1, 4))
    return encoders, times


def matvec_floor(n_params: int, reps: int) -> list[float]:
    """One fp32 matrix-vector product over n_params weights (each weight read once)."""
    cols = 1024
    w = torch.randn(max(1, n_params // cols), cols)
    x = torch.randn(cols)
    return timeit(lambda: torch.mv(w, x), reps)


def int8_matvec_floor(n_params: int, reps: int) -> list[float]:
    """One int8 matrix-vector product over n_params weights with ``torch._int_mm`` (the int8 path's
    kernel, in its one-row layout), the activation already quantized."""
    cols = 1024
    w = torch.randint(-127, 128, (max(1, n_params // cols), cols), dtype=torch.int8)
    x = torch.randint(-127, 128, (1, cols), dtype=torch.int8)
    return timeit(lambda: torch._int_mm(x, w.t()), reps)


def int8_step(model: CTCModel, reps: int) -> Optional[list[float]]:
    import copy
    import warnings

    try:
        from torch.ao.quantization import quantize_dynamic

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notices
            q = quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)
    except Exception as err:  # quantization engines differ by build/platform
        print(f"# int8 dynamic quantization unavailable: {err}", file=sys.stderr)
        return None
    feats = torch.randn(1, 4, 80) * 3 + 5
    state = model.init_state(1)  # same state; the quantized head has no .weight tensor to read it from
    with torch.inference_mode():
        _, state = q.step(feats, state)

        def one():
            nonlocal state
            _, state = q.step(feats, state)

        return timeit(one, reps)


def emformer(reps: int) -> Optional[dict]:
    try:
        from torchaudio.models import Emformer
    except Exception as err:
        print(f"# torchaudio Emformer unavailable: {err}", file=sys.stderr)
        return None
    seg, rc, left = 4, 1, 32
    torch.manual_seed(0)
    enc = Emformer(input_dim=256, num_heads=4, ffn_dim=1024, num_layers=12, segment_length=seg,
                   left_context_length=left, right_context_length=rc).eval()
    n_params = sum(p.numel() for p in enc.parameters())
    x = torch.randn(1, seg + rc, 256)
    lengths = torch.tensor([seg + rc])
    states = None
    with torch.inference_mode():
        for _ in range(left // seg + 2):  # fill the left context so every call attends to all of it
            _, _, states = enc.infer(x, lengths, states)

        def one():
            nonlocal states
            _, _, states = enc.infer(x, lengths, states)

        times = timeit(one, reps)
    state_bytes = sum(t.numel() * t.element_size() for layer in states for t in layer)
    return {"params": n_params, "segment": times, "frames_per_call": seg, "state_bytes": state_bytes,
            "call": one}


def head_to_head(model: InferenceEncoder, emformer_segment: Callable[[], object], reps: int, block: int = 20) -> dict:
    """Our step (``model``: the default or the compiled int8 engine) against Emformer's 160 ms segment, in short alternating runs, so
    that this box's load swings (up to 2x between processes, minutes apart) hit both alike: per
    round, ``block`` Emformer segments, then the same audio as one-frame calls of ours, then as
    4-frame calls. Runs, not single calls: each model keeps its weights in the caches through its
    run, as a stream stepping alone would (one Emformer segment streams 38 MB of weights through
    them, and ours is memory-bound). Times per 160 ms of audio. ``model``: the compiled-int8 engine."""
    feats, feats4 = torch.randn(1, 4, 80) * 3 + 5, torch.randn(1, 16, 80) * 3 + 5
    states = {"frames": model.init_state(1), "block": model.init_state(1)}

    def frames() -> None:  # 160 ms as 4 calls of 40 ms
        for _ in range(4):
            _, states["frames"] = model.step(feats, states["frames"])

    def one_block() -> None:  # 160 ms as one call
        _, states["block"] = model.step(feats4, states["block"])

    out: dict[str, list[float]] = {"emformer": [], "frames": [], "block": []}
    with torch.inference_mode():
        for _ in range(max(1, reps // block)):
            for key, fn in (("emformer", emformer_segment), ("frames", frames), ("block", one_block)):
                out[key] += timeit(fn, block, warmup=2)
    return out


def batch_capacity(model: InferenceEncoder, tok: Tokenizer, block: float, reps: int, max_b: int) -> dict:
    """Time per call of step_batch (and of encoder.step on a stacked state) for B streams."""
    hop = int(block * SR)
    audio = speech_like(60.0, seed=1)
    cache: dict[int, tuple[float, float]] = {}

    def measure(b: int) -> tuple[float, float]:
        if b in cache:
            return cache[b]
        recs = [Recognizer(model, tok) for _ in range(b)]
        pos = [int(i * 0.37 * SR) % (len(audio) // 2) for i in range(b)]  # streams at different points

        def call():
            blocks = [audio[p : p + hop] for p in pos]
            step_batch(recs, blocks)
            for i in range(b):
                pos[i] = (pos[i] + hop) % (len(audio) - hop)

        full = statistics.mean(timeit(call, reps, warmup=2))
        feats = torch.randn(b, int(round(block / 0.01)), 80) * 3 + 5
        with torch.inference_mode():
            state = stack_states(model, [r.state for r in recs])

            def step():
                nonlocal state
                _, state = model.step(feats, state)

            step_only = statistics.mean(timeit(step, reps, warmup=2))
        cache[b] = (full, step_only)
        return cache[b]

    def largest(which: int) -> int:
        lo, hi, b = 0, None, 1
        while b <= max_b:  # doubling
            if measure(b)[which] < block:
                lo, b = b, b * 2
            else:
                hi = b
                break
        if hi is None:
            return lo
        while hi - lo > max(1, lo // 8):  # bisection to ~12 %
            mid = (lo + hi) // 2
            if measure(mid)[which] < block:
                lo = mid
            else:
                hi = mid
        return lo

    cap_full, cap_step = largest(0), largest(1)
    return {"block": block, "table": sorted(cache.items()), "capacity": cap_full, "capacity_step_only": cap_step}


# ---------------------------------------------------------------------------------------------
# Latency as users feel it (--latency): each word's emission delay on real recordings.

#: A streaming word counts as a reference word when the texts match and their spans, widened by
#: this many seconds (two encoder frames), overlap: spike times and forced-aligned spans differ by
#: a frame or so, and a repeated word ("five five") must not match its neighbour.
LATENCY_MATCH_TOLERANCE = 0.08


def latency_entries(data: Path, count: int) -> list[dict]:
    """``count`` entries spread evenly over the ``dev_*.jsonl`` manifests in ``data`` (every part)."""
    from asr.data.manifest import read_manifest

    files = sorted(data.glob("dev_*.jsonl"))
    if not files:
        raise FileNotFoundError(f"no dev_*.jsonl in {data} (make them: python recipes/real/prepare.py --seed 0)")
    rows = [e for f in files for e in read_manifest(f)]
    step = max(1, len(rows) // max(1, count))
    return rows[::step][:count]


def reference_words(asr_model, wave: torch.Tensor, text: str) -> list:
    """Words of ``text`` with their spans from ``torchaudio.functional.forced_align`` over the
    offline (one-pass) log-probs of ``wave``; [] when the frames cannot hold the tokens."""
    from asr.decode.align import forced_align_words
    from asr.features import compute_fbank

    feats = compute_fbank(wave)
    ids = asr_model.tokenizer.encode(text)
    if feats.shape[0] == 0 or not ids:
        return []
    with torch.inference_mode():
        logits, lengths = asr_model.model(feats[None], torch.tensor([feats.shape[0]]))
    lp = logits[0, : int(lengths[0])].float().log_softmax(-1)
    try:
        return forced_align_words(lp, ids, asr_model.tokenizer, backend="torchaudio")
    except ValueError:
        return []


def _shows(words: list, ref) -> bool:
    tol = LATENCY_MATCH_TOLERANCE
    return any(w.word == ref.word and w.start < ref.end + tol and w.end > ref.start - tol for w in words)


def word_delays(asr_model, wave: torch.Tensor, refs: list) -> tuple[list[tuple[float, float, bool]], int]:
    """Stream ``wave`` in 40 ms blocks through ``asr_model.stream()`` (the default recognizer).
    For each reference word shown: ``(delay, delay plus the showing call's compute time, whether a
    partial showed it)``, the delay being the audio time at which a partial or a final segment
    first shows it minus the word's aligned end; also the count of words never shown. Audio time:
    the end of the block just fed (the end of the audio for words only ``finalize`` shows)."""
    rec = asr_model.stream()
    hop = int(FRAME * SR)
    first_seen: list[Optional[tuple[float, float, bool]]] = [None] * len(refs)
    final_words: list = []

    def look(partial_words: list, audio_time: float, compute: float) -> None:
        for i, ref in enumerate(refs):
            if first_seen[i] is None:
                by_partial = _shows(partial_words, ref)
                if by_partial or _shows(final_words, ref):
                    first_seen[i] = (audio_time - ref.end, audio_time - ref.end + compute, by_partial)

    for pos in range(0, wave.numel(), hop):
        t0 = time.perf_counter()
        partial = rec.accept_waveform(wave[pos : pos + hop])
        compute = time.perf_counter() - t0
        for seg in partial.segments:
            final_words.extend(seg.words)
        look(partial.words, min(pos + hop, wave.numel()) / SR, compute)
    t0 = time.perf_counter()
    transcript = rec.finalize()
    final_words = [w for seg in transcript.segments for w in seg.words]
    look([], wave.numel() / SR, time.perf_counter() - t0)
    seen = [s for s in first_seen if s is not None]
    return seen, len(refs) - len(seen)


def latency_section(model_path: Optional[str], data: Path, count: int) -> dict:
    """Word emission delays over ``count`` real dev recordings (see :func:`word_delays`)."""
    import asr
    from asr.audio import load_audio

    t0 = time.perf_counter()
    asr_model = asr.load_model(model_path)
    load_s = time.perf_counter() - t0
    seen: list[tuple[float, float, bool]] = []
    missed = words = utts = 0
    audio_s = 0.0
    for entry in latency_entries(data, count):
        wave = load_audio(entry["audio"])
        refs = reference_words(asr_model, wave, entry["text"])
        if not refs:
            continue
        got, m = word_delays(asr_model, wave, refs)
        seen += got
        missed += m
        words += len(refs)
        utts += 1
        audio_s += wave.numel() / SR
    return {"seen": seen, "missed": missed, "words": words, "utts": utts,
            "audio_s": audio_s, "load_s": load_s, "model": repr(asr_model)}


def print_latency(res: dict, data: Path) -> None:
    print(f"\nWord emission delay (word end in a forced alignment of the reference over the offline pass "
          f"-> first partial or final segment showing it; default `asr.load_model().stream()`, 40 ms blocks, "
          f"no lookahead), {res['utts']} recordings ({res['audio_s']:.0f} s) from {data}/dev_*.jsonl, "
          f"{res['words']} words, {res['missed']} never shown (misrecognised):")
    print("| words | count | median ms | p95 ms | median ms with compute | p95 ms with compute |")
    print("|---|---:|---:|---:|---:|---:|")
    groups = (("all words shown", res["seen"]),
              ("first shown by a partial", [s for s in res["seen"] if s[2]]),
              ("shown only by a final segment (LM)", [s for s in res["seen"] if not s[2]]))
    for name, rows in groups:
        if rows:
            d, dc = [r[0] for r in rows], [r[1] for r in rows]
            cells = [round(1000 * v) for v in (statistics.median(d), pct(d, 0.95), statistics.median(dc), pct(dc, 0.95))]
            print(f"| {name} | {len(rows)} | " + " | ".join(str(c) for c in cells) + " |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="checkpoint (default: ModelConfig() with random weights)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--frames", type=int, default=400, help="frames timed per single-stream measurement")
    ap.add_argument("--batch-block", type=float, nargs="+", default=[0.04, 0.16],
                    help="seconds of audio per stream per batched call")
    ap.add_argument("--max-streams", type=int, default=512)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip", nargs="*", default=[], choices=["int8", "emformer", "batch", "compile", "onnx"])
    ap.add_argument("--latency", action="store_true",
                    help="also measure word emission delays on real recordings (the bundled model unless --model)")
    ap.add_argument("--latency-only", action="store_true", help="only the word emission delays")
    ap.add_argument("--latency-data", type=Path, default=REPO / ".data" / "real",
                    help="folder of dev_*.jsonl (python recipes/real/prepare.py --seed 0; default .data/real)")
    ap.add_argument("--latency-utts", type=int, default=100, help="recordings the delays are measured on")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.latency_only:
        return run_latency(args)
    reps = 30 if args.quick else args.frames
    model, tok = build_model(args.model)
    n_params = model.num_parameters()
    cfg = model.config
    print(f"# bench_stream: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, {args.threads} thread(s), load average {os.getloadavg()[0]:.2f}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    print(f"# model: d_model={cfg.d_model}, n_layers={cfg.n_layers}, head_size={cfg.head_size}, "
          f"vocab={cfg.vocab_size}, {n_params / 1e6:.2f} M parameters\n")

    onnx, onnx_times = ({}, []) if "onnx" in args.skip else onnx_encoders(model, args.threads)
    import asr

    t = time.perf_counter()
    default = asr.load_model(args.model)  # the default path: the bundled model and its LM unless --model
    load_s = time.perf_counter() - t
    single = single_stream(model, tok, reps, compile="compile" not in args.skip, onnx=onnx, default=default)
    floor = matvec_floor(n_params, reps)
    floor8 = int8_matvec_floor(n_params, reps)
    q = None if "int8" in args.skip else int8_step(model, reps)
    emf = None if "emformer" in args.skip else emformer(reps)
    fl = statistics.median(floor)
    rows = [(f"**default path**: `asr.load_model({args.model or ''}).stream()` ({default.encoder.backend}"
             f"{', its LM' if default.lexicon is not None else ''}), 40 ms per call", single["recognizer_default"]),
            ("recognizer (fbank + step + greedy + endpoint), onnx-int8 backend (the default engine)",
             single["recognizer_ort_int8"]),
            ("recognizer, float backend (`backend=\"float\"`)", single["recognizer"])]
    groups = set()
    if "compiled" in single["compile_s"]:
        groups.add("compiled")
    if onnx:
        groups.add("onnx")
    rows += step_rows(single, groups)
    if q is not None:
        rows.append(("model.step, torch.ao int8 dynamic (nn.Linear; general path)", q))
    rows.append((f"floor: fp32 matvec over {n_params / 1e6:.1f} M weights", floor))
    rows.append((f"int8 floor: int8 matvec (torch._int_mm) over {n_params / 1e6:.1f} M weights", floor8))
    print("| per 40 ms frame, 1 stream | median ms | mean ms | p99 ms | real-time factor (median) | x floor |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, t in rows:
        med = statistics.median(t)
        print(f"| {name} | {1000 * med:.2f} | {1000 * statistics.mean(t):.2f} | {1000 * pct(t, 0.99):.2f} | "
              f"{med / FRAME:.4f} | {med / fl:.2f} |")
    print(f"\n`asr.load_model({args.model or ''})` in this process: {load_s:.2f} s (imports done; "
          f"onnx-int8 graphs built for the bench's own engine: {single['compile_s']['ort_int8']:.1f} s)")
    if "compiled" in single["compile_s"]:
        pk = statistics.median(single["step_True"])
        print(f"\ncompiled backend: {pk / statistics.median(single['step_compiled']):.2f}x the float backend "
              f"(compiled-int8: {statistics.median(single['step_int8']) / statistics.median(single['step_compiled_int8']):.2f}x "
              f"the int8 backend); at 160 ms per call "
              f"{statistics.median(single['step4_True']) / statistics.median(single['step4_compiled']):.2f}x "
              f"(int8: {statistics.median(single['step4_int8']) / statistics.median(single['step4_compiled_int8']):.2f}x); "
              f"compile time (1 and 4 frames) {single['compile_s']['compiled']:.1f} s (float32), "
              f"{single['compile_s']['compiled_int8']:.1f} s (int8), in this process (inductor's disk cache "
              f"makes later processes faster)")
    if onnx:
        pk8 = statistics.median(single["step_int8"])
        ratios = [f"{name} {pk8 / statistics.median(single[f'step_{key}']):.2f}x"
                  for name, key in (("float32", "onnx"), ("int8", "onnx_int8"))]
        if "compiled" in single["compile_s"]:
            c8 = statistics.median(single["step_compiled_int8"])
            ratios += [f"compiled int8 / ONNX Runtime int8: {c8 / statistics.median(single['step_onnx_int8']):.2f}x"]
        print(f"\nONNX Runtime against the packed int8 step, frame by frame: {', '.join(ratios)}")
        print("\n| ONNX load (s) | seconds |\n|---|---:|")
        for what, seconds in onnx_times:
            print(f"| {what} | {seconds:.2f} |")
    if emf is not None:
        seg = emf["segment"]
        med = statistics.median(seg) / emf["frames_per_call"]
        print(f"| torchaudio Emformer ({emf['params'] / 1e6:.1f} M, encoder only), per 40 ms "
              f"(segment of 4 + 1 right context: {1000 * statistics.median(seg):.2f} ms) | {1000 * med:.2f} | "
              f"{1000 * statistics.mean(seg) / emf['frames_per_call']:.2f} | "
              f"{1000 * pct(seg, 0.99) / emf['frames_per_call']:.2f} | {med / FRAME:.4f} | {med / fl:.2f} |")
        print(f"\nEmformer (160 ms segments) / the default engine (onnx-int8), per 40 ms of audio: frame by frame "
              f"{med / statistics.median(single['step_ort_int8']):.2f}x, 160 ms per call "
              f"{med / statistics.median(single['step4_ort_int8']):.2f}x")
        print("\nEmformer (160 ms segments) / our encoder.step, per 40 ms of audio:")
        for name, key in (("frame by frame (40 ms/call)", "step"), ("160 ms/call", "step4")):
            gen, pk = statistics.median(single[f"{key}_False"]), statistics.median(single[f"{key}_True"])
            i8 = statistics.median(single[f"{key}_int8"])
            print(f"- {name}: reference {med / gen:.2f}x, float {med / pk:.2f}x, int8 "
                  f"{med / i8:.2f}x (float is {gen / pk:.2f}x faster than reference, int8 {pk / i8:.2f}x "
                  f"faster than float)")
            if "compiled" in single["compile_s"]:
                c32, c8 = statistics.median(single[f"{key}_compiled"]), statistics.median(single[f"{key}_compiled_int8"])
                print(f"  compiled: {med / c32:.2f}x, compiled int8 {med / c8:.2f}x")
        if q is not None:
            print(f"- torch.ao int8, frame by frame: {med / statistics.median(q):.2f}x")
    print(f"\nencoder.init_state(1): {1e6 * statistics.median(single['init_state']):.0f} us")
    print("\n| state per stream | bytes |")
    print("|---|---:|")
    print(f"| ours: model state (EncoderState.size_bytes) | {single['model_state_bytes']:,} |")
    print(f"| ours: recognizer (model state + frontend buffers) | {single['state_bytes']:,} |")
    if emf is not None:
        print(f"| Emformer: infer states (left context 32 frames) | {emf['state_bytes']:,} |")

    h2h_engines = [("ort_int8", "onnx-int8, the default engine")]
    if "compiled" in single["compile_s"]:
        h2h_engines.append(("compiled_int8", "compiled int8"))
    for engine_key, engine_name in h2h_engines if emf is not None else []:
        h2h = head_to_head(single["engines"][engine_key], emf["call"], reps)
        e = statistics.median(h2h["emformer"])
        print("\nHead to head, alternating runs of 20 calls (per 160 ms of audio: one Emformer segment, 4 one-frame "
              f"calls of ours, one 4-frame call of ours; {engine_name}, frozen weights):")
        print("| per 160 ms of audio | median ms | per 40 ms | real-time factor | Emformer / this |")
        print("|---|---:|---:|---:|---:|")
        for name, key in (("torchaudio Emformer, one segment (4 + 1 right context)", "emformer"),
                          ("ours, 4 calls of 40 ms (frame by frame)", "frames"), ("ours, one call of 160 ms", "block")):
            med = statistics.median(h2h[key])
            print(f"| {name} | {1000 * med:.2f} | {250 * med:.2f} | {med / (4 * FRAME):.4f} | {e / med:.2f}x |")

    if "batch" not in args.skip:
        tune_for_streaming()  # what a long-running server does after start-up (module docstring, item 4)
        keys = [True, "int8", "ort_int8"] + (["compiled", "compiled_int8"] if "compile" not in args.skip else [])
        for block, key in [(b, k) for b in args.batch_block for k in keys]:
            res = batch_capacity(single["engines"][key], tok, block, max(10, reps // 20), args.max_streams)
            print(f"\nBatched streams, {BACKEND[key]} backend, {1000 * block:.0f} ms of "
                  f"audio per stream per call ({args.threads} thread(s)): real time while the mean call takes "
                  f"< {1000 * block:.0f} ms")
            print("| streams | step_batch mean ms/call | x real time | encoder.step on stacked state mean ms/call |")
            print("|---:|---:|---:|---:|")
            for b, (full, step) in res["table"]:
                print(f"| {b} | {1000 * full:.1f} | {full / block:.3f} | {1000 * step:.1f} |")
            print(f"\nlargest real-time batch: {res['capacity']} streams with step_batch, "
                  f"{res['capacity_step_only']} with encoder.step on a kept stacked state")
    return run_latency(args) if args.latency else 0


def run_latency(args: argparse.Namespace) -> int:
    """The --latency section: its own header, so it can run alone (--latency-only)."""
    if not sorted(args.latency_data.glob("dev_*.jsonl")):
        print(f"bench_stream: error: no dev_*.jsonl in {args.latency_data} (make them: python "
              "recipes/real/prepare.py --seed 0, or pass --latency-data)", file=sys.stderr)
        return 1
    print(f"# latency: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, {args.threads} thread(s), load average {os.getloadavg()[0]:.2f}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    res = latency_section(args.model, args.latency_data, args.latency_utts)
    print(f"# model: {res['model']} (loaded in {res['load_s']:.1f} s)")
    print_latency(res, args.latency_data)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
