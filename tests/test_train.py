"""Training end to end on real audio (tests/data/fsdd_small): asr-train, resume, DDP, checkpoints, asr-eval."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Callable

import pytest
import torch

from asr.data.manifest import read_manifest, write_manifest
from asr.model_file import load_checkpoint, load_for_inference, resolve_checkpoint
from asr.train.build import lr_factor
from asr.train.checkpoint import CheckpointManager, atomic_torch_save
from asr.train.resume import state_digest

DATA = Path(__file__).parent / "data" / "fsdd_small"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Manifests (george -> train, jackson -> dev) and a tokenizer folder shared by the runs."""
    root = tmp_path_factory.mktemp("train")
    entries = read_manifest(DATA / "manifest.jsonl")
    write_manifest(root / "train.jsonl", [e for e in entries if e["speaker"] == "fsdd_george"])
    write_manifest(root / "dev.jsonl", [e for e in entries if e["speaker"] == "fsdd_jackson"])
    return {"root": root, "train": root / "train.jsonl", "dev": root / "dev.jsonl", "tok": root / "tokenizer"}


def _args(work: dict, run_dir: Path, *extra: str) -> list[str]:
    return [
        "model=tiny", "trainer=cpu", "trainer.num_threads=1",
        f"data.train_manifests=[{work['train']}]", f"data.dev_manifests=[{work['dev']}]",
        "data.num_workers=0", "data.max_batch_seconds=4", "data.cmvn_utterances=20",
        "tokenizer.vocab_size=40", f"tokenizer.dir={work['tok']}",
        "optim.warmup_steps=5", "optim.lr=3e-3", f"hydra.run.dir={run_dir}", *extra,
    ]


def _train(args: list[str], cwd: Path, timeout: int = 120, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "asr.cli.train", *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"asr-train failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _in_process_trainer(work: dict, run_dir: Path, *extra: str):
    """A Trainer for ``_args(work, run_dir, *extra)`` built in this process, so a test can monkeypatch
    the training modules (the step's loss, the loop's clock, the dataset) before calling ``fit()``."""
    from hydra import compose, initialize_config_dir

    import asr.cli.train  # noqa: F401  (resolvers)
    from asr.train.trainer import Trainer

    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("config", overrides=[a for a in _args(work, run_dir, *extra) if not a.startswith("hydra.")])
    return Trainer(cfg, run_dir)


def _fake_clock(monkeypatch: pytest.MonkeyPatch, seconds_for_step: Callable[[int], float]) -> list[float]:
    """Make the trainer's monotonic clock advance by ``seconds_for_step(i)`` at the i-th loss (one per
    step here); returns the clock, a one-element list of seconds."""
    import time as real_time
    from types import SimpleNamespace

    import asr.train.loop as loop_mod
    import asr.train.step as step_mod

    clock, steps = [0.0], [0]
    real_loss = step_mod.ctc_loss

    def ticking_loss(*args, **kwargs):
        clock[0] += seconds_for_step(steps[0])
        steps[0] += 1
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(step_mod, "ctc_loss", ticking_loss)
    monkeypatch.setattr(loop_mod, "time", SimpleNamespace(
        monotonic=lambda: clock[0], perf_counter=real_time.perf_counter, time=real_time.time))
    return clock


@pytest.fixture(scope="module")
def trained(work: dict) -> Path:
    """One 40-step run from the console script, started in an unrelated folder (conf/ is found
    from the package), validating and saving every 20 steps."""
    run = work["root"] / "run_main"
    exe = shutil.which("asr-train")
    cmd = [exe] if exe else [sys.executable, "-m", "asr.cli.train"]
    proc = subprocess.run(
        cmd + _args(work, run, "trainer.max_steps=40", "trainer.log_every=5", "trainer.val_every=20"),
        cwd=work["root"], env=ENV, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


# ---------------------------------------------------------------------- unit pieces
def test_lr_schedule() -> None:
    assert lr_factor(0, 10, 100, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100, "cosine", 0.1) == pytest.approx(1.0)
    assert lr_factor(10, 10, 100, "cosine", 0.1) == pytest.approx(1.0)
    assert lr_factor(55, 10, 100, "cosine", 0.1) == pytest.approx(0.55)
    assert lr_factor(100, 10, 100, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(55, 10, 100, "linear", 0.0) == pytest.approx(0.5)
    assert lr_factor(500, 10, 100, "constant", 0.0) == 1.0
    with pytest.raises(ValueError):
        lr_factor(50, 10, 100, "exponential", 0.0)


def test_evaluation_decodes_as_transcription_does() -> None:
    """Dev WER decodes each utterance with the decoder transcription uses (hypothesis_decoder): the
    same tokens as batched greedy decoding and as the one-pass prefix beam search, over each row's
    own frames only."""
    from asr.decode.beam import ctc_prefix_beam_search
    from asr.decode.greedy import ctc_greedy
    from asr.train.evaluate import decode_batch

    class Ids:  # a tokenizer whose text is the token ids
        def decode(self, ids):
            return " ".join(map(str, ids))

    torch.manual_seed(0)
    logits = torch.randn(3, 40, 7) * 3
    lengths = torch.tensor([40, 25, 0])
    greedy, _ = ctc_greedy(logits, lengths)
    assert decode_batch(logits, lengths, Ids()) == [" ".join(map(str, t)) for t in greedy]
    log_probs = logits.log_softmax(-1)
    beams = [ctc_prefix_beam_search(log_probs[b, :n], 4) for b, n in enumerate(lengths.tolist())]
    assert decode_batch(logits, lengths, Ids(), beam_size=4) == [" ".join(map(str, r[0][0])) if r else "" for r in beams]
    assert decode_batch(logits, lengths, Ids())[2] == ""


def test_checkpoint_manager_keeps_last_k_and_best(tmp_path: Path) -> None:
    m = CheckpointManager(tmp_path, keep_last=2, keep_best=1)
    wers = {10: 0.5, 20: 0.3, 30: 0.4, 40: 0.6, 50: None}
    for step, wer in wers.items():
        m.save({"model": {"w": torch.tensor([float(step)])}, "step": step}, step, wer)
    assert [s for s, _ in m.checkpoints()] == [20, 40, 50]  # last two + best (step 20, WER 0.3)
    assert m.best().name == "ckpt-step000000020.pt"
    assert m.latest().name == "ckpt-step000000050.pt"
    assert resolve_checkpoint(tmp_path) == m.best()  # inference picks the best
    # a stray temporary from an interrupted write is removed when a writer opens the folder
    (tmp_path / ".ckpt-step000000060.pt.abc.tmp").write_bytes(b"partial")
    CheckpointManager(tmp_path, writable=False).latest()
    assert (tmp_path / ".ckpt-step000000060.pt.abc.tmp").exists()  # read-only views leave it alone
    CheckpointManager(tmp_path)
    assert not list(tmp_path.glob(".*.tmp"))
    # a damaged file (not written by us atomically) is skipped, not loaded
    (tmp_path / "ckpt-step000000070.pt").write_bytes(b"garbage")
    assert m.latest().name == "ckpt-step000000050.pt"


def test_atomic_save_keeps_the_old_file_when_the_write_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "x.pt"
    atomic_torch_save({"model": {"a": torch.ones(3)}}, path)

    def broken(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        atomic_torch_save({"model": {"a": torch.zeros(3)}}, path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["model"]["a"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.pt"]


# ---------------------------------------------------------------------- asr-train
def test_asr_train_loss_falls_and_writes_its_outputs(trained: Path) -> None:
    losses = [m["train/loss"] for m in _metrics(trained) if "train/loss" in m]
    assert len(losses) == 8
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-2:]) / 2 < 0.6 * losses[0], losses
    waits = [m["train/data_wait_frac"] for m in _metrics(trained) if "train/loss" in m]
    assert all(0.0 <= w <= 1.0 for w in waits), waits  # the input-bound diagnostic is a fraction
    # each batch shape's first step (a compiled run's compile time) is logged once, with its time
    firsts = [line.split("first step of batch shape ")[1] for line in (trained / "train.log").read_text().splitlines()
              if "first step of batch shape" in line]
    shapes = [f.split(":")[0] for f in firsts]
    assert firsts and len(set(shapes)) == len(shapes) and all(f.endswith(f"(shape {i + 1})") for i, f in enumerate(firsts))
    dev = [m for m in _metrics(trained) if "dev/wer" in m]
    assert [m["step"] for m in dev] == [20, 40] and all(math.isfinite(m["dev/loss"]) for m in dev)
    for name in ("config_resolved.yaml", "train.log", "tokenizer.model", "summary.json", ".hydra/config.yaml"):
        assert (trained / name).is_file(), name
    assert list((trained / "tensorboard").glob("events.out.tfevents.*"))
    ckpts = sorted(p.name for p in (trained / "checkpoints").glob("ckpt-*.pt"))
    assert ckpts == ["ckpt-step000000020.pt", "ckpt-step000000040.pt"]
    ckpt = load_checkpoint(trained / "checkpoints" / ckpts[-1])
    assert ckpt["step"] == 40 and ckpt["config"]["d_model"] == 64
    for key in ("model", "tokenizer", "optimizer", "scheduler", "sampler", "rng", "best_wer", "epoch"):
        assert key in ckpt
    assert not torch.equal(ckpt["model"]["cmvn.istd"], torch.ones(80))  # CMVN statistics were computed


def test_load_for_inference_eval_and_averaging(trained: Path, work: dict, capsys: pytest.CaptureFixture,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from asr.cli.evaluate import main as eval_main

    model, tok = load_for_inference(trained)
    assert not model.training and tok.vocab_size == model.config.vocab_size
    report = work["root"] / "report.jsonl"
    assert eval_main([str(trained), str(work["dev"]), "--num-workers", "0", "--worst", "3",
                      "--report", str(report), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "WER" in out and "CER" in out
    rows = [json.loads(line) for line in report.read_text().splitlines()]
    assert len(rows) == 8 and {"id", "ref", "hyp", "word_errors", "words"} <= set(rows[0])
    assert eval_main([str(work["root"] / "nope"), str(work["dev"])]) == 2
    # --int8 scores the int8 model (what asr-transcribe --int8 runs): near the float32 transcripts
    report8 = work["root"] / "report_int8.jsonl"
    from asr.infer import InferenceEncoder
    prepared = []
    original = InferenceEncoder.__init__
    monkeypatch.setattr(InferenceEncoder, "__init__",
                        lambda self, model, backend, **kw: prepared.append(backend) or original(self, model, backend, **kw))
    assert eval_main([str(trained), str(work["dev"]), "--num-workers", "0", "--worst", "0",
                      "--report", str(report8), "--device", "cpu", "--int8"]) == 0
    rows8 = [json.loads(line) for line in report8.read_text().splitlines()]
    assert prepared == ["int8"]
    assert [r["id"] for r in rows8] == [r["id"] for r in rows]
    assert sum(a["hyp"] == b["hyp"] for a, b in zip(rows, rows8)) >= 6
    assert eval_main([str(trained), str(work["dev"]), "--int8", "--device", "cuda"]) == 2

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    try:
        import average_checkpoints
    finally:
        sys.path.pop(0)
    avg_path = work["root"] / "avg.pt"
    assert average_checkpoints.main(["--dir", str(trained), "--last", "2", "--out", str(avg_path)]) == 0
    a, b = (load_checkpoint(p)["model"] for p in sorted((trained / "checkpoints").glob("ckpt-*.pt")))
    avg = load_checkpoint(avg_path)["model"]
    name = "head.weight"
    assert torch.allclose(avg[name], (a[name] + b[name]) / 2, atol=1e-6)
    model, _ = load_for_inference(avg_path)


def test_export_with_int8_weights_halves_the_file_and_keeps_the_outputs(trained: Path, work: dict,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """tools/export_model.py --int8-weights (how the bundled model fits beside its LM): large matrices
    as int8 per row, restored to float32 on load, within half a quantisation step of the fp16 export;
    the logits barely move. A damaged int8 entry is a CheckpointError, not a crash."""
    from asr.model_file import CheckpointError, quantize_weights_int8

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    try:
        import export_model
    finally:
        sys.path.pop(0)
    monkeypatch.setattr(export_model, "quantize_weights_int8",  # the tiny model's matrices are small
                        lambda state: quantize_weights_int8(state, min_numel=1024))
    fp16, int8 = work["root"] / "export_fp16.pt", work["root"] / "export_int8.pt"
    assert export_model.main([str(trained), str(fp16)]) == 0
    assert export_model.main([str(trained), str(int8), "--int8-weights"]) == 0
    raw = torch.load(int8, weights_only=True)
    assert raw["model_int8"] and all(e["q"].dtype == torch.int8 for e in raw["model_int8"].values())
    assert int8.stat().st_size < 0.7 * fp16.stat().st_size
    a, b = load_checkpoint(fp16)["model"], load_checkpoint(int8)["model"]
    assert a.keys() == b.keys()
    for name, q in raw["model_int8"].items():
        step = q["scale"].reshape(-1, *([1] * (q["q"].dim() - 1)))
        assert b[name].dtype == torch.float32
        assert ((a[name].float() - b[name]).abs() <= step * 0.5 + 1e-3 * a[name].float().abs()).all(), name
    feats = torch.randn(1, 120, 80)
    (m16, _), (m8, _) = load_for_inference(fp16), load_for_inference(int8)
    with torch.no_grad():
        l16, l8 = m16(feats, torch.tensor([120]))[0], m8(feats, torch.tensor([120]))[0]
    assert (l16 - l8).abs().max() <= 0.02 * l16.abs().max()
    del raw["model_int8"][next(iter(raw["model_int8"]))]["scale"]
    atomic_torch_save(raw, work["root"] / "broken_int8.pt")
    with pytest.raises(CheckpointError, match="int8 weights are malformed"):
        load_checkpoint(work["root"] / "broken_int8.pt")


def test_kill_during_checkpoint_write_then_resume_is_bit_exact(work: dict) -> None:
    """kill -9 in the middle of writing the second checkpoint; the latest checkpoint stays the first,
    intact; resuming finishes with exactly the weights of an uninterrupted run."""
    common = ("trainer.max_steps=18", "trainer.val_every=6", "trainer.log_every=3", "data.augment.speed.enabled=true")
    ref_dir = work["root"] / "ref"
    _train(_args(work, ref_dir, *common), work["root"])
    ref = json.loads((ref_dir / "summary.json").read_text())

    killer = work["root"] / "kill_during_save.py"
    killer.write_text(textwrap.dedent("""
        import io, os, signal, sys
        import torch
        real_save, calls = torch.save, [0]
        def save(obj, f, *a, **k):
            calls[0] += 1
            if calls[0] == 2:  # second checkpoint: write half of it, then die like kill -9
                buf = io.BytesIO(); real_save(obj, buf); data = buf.getvalue()
                f.write(data[: len(data) // 2]); f.flush(); os.fsync(f.fileno())
                os.kill(os.getpid(), signal.SIGKILL)
            return real_save(obj, f, *a, **k)
        torch.save = save
        from asr.cli.train import main
        sys.argv = ["asr-train"] + sys.argv[1:]
        main()
    """))
    run = work["root"] / "killed"
    proc = subprocess.run([sys.executable, str(killer), *_args(work, run, *common)], cwd=work["root"], env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    ckdir = run / "checkpoints"
    assert sorted(p.name for p in ckdir.glob("ckpt-*.pt")) == ["ckpt-step000000006.pt"]
    assert list(ckdir.glob(".ckpt-step000000012.pt.*.tmp"))  # the interrupted write, never renamed
    assert load_checkpoint(CheckpointManager(ckdir, writable=False).latest())["step"] == 6

    _train(_args(work, run, *common), work["root"])  # trainer.resume=auto picks up step 6
    log_text = (run / "train.log").read_text()
    assert "resumed from" in log_text and "at step 6" in log_text
    assert not list(ckdir.glob(".*.tmp"))
    resumed = json.loads((run / "summary.json").read_text())
    assert resumed["step"] == ref["step"] == 18
    assert resumed["weights_sha256"] == ref["weights_sha256"]
    a = load_checkpoint(ref_dir / "checkpoints" / "ckpt-step000000018.pt")
    b = load_checkpoint(ckdir / "ckpt-step000000018.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["best_wer"] == b["best_wer"]


def test_ctrl_c_saves_a_checkpoint_and_resume_continues(work: dict) -> None:
    """SIGINT to the whole process group (what Ctrl-C does: the DataLoader worker gets it too) stops
    the run after its current step with a saved checkpoint and exit code 130; resume continues."""
    import signal
    import time

    run = work["root"] / "ctrl_c"
    args = _args(work, run, "trainer.max_steps=100000", "trainer.log_every=1", "trainer.val_every=100000",
                 "data.num_workers=1")
    proc = subprocess.Popen([sys.executable, "-m", "asr.cli.train", *args], cwd=work["root"], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            metrics = run / "metrics.jsonl"
            if metrics.exists() and any(r.get("step", 0) >= 4 for r in _metrics(run)):
                break
            time.sleep(0.2)
        else:
            raise AssertionError("training did not reach step 4")
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, out[-3000:]
    assert "SIGINT" in out and "Traceback" not in out, out[-3000:]
    ckdir = run / "checkpoints"
    latest = CheckpointManager(ckdir, writable=False).latest()
    step = load_checkpoint(latest)["step"]
    assert step >= 4 and not list(ckdir.glob(".*.tmp"))
    assert step >= max(r["step"] for r in _metrics(run) if "train/loss" in r)  # nothing trained is lost

    _train(_args(work, run, f"trainer.max_steps={step + 2}", "trainer.val_every=100000"), work["root"])
    assert f"at step {step}" in (run / "train.log").read_text()
    assert json.loads((run / "summary.json").read_text())["step"] == step + 2


def test_non_finite_steps_are_skipped_and_counted(work: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import asr.train.step as step_mod

    real_loss, calls = step_mod.ctc_loss, [0]

    def sometimes_nan(*args, **kwargs):
        calls[0] += 1
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if calls[0] == 3 else loss

    monkeypatch.setattr(step_mod, "ctc_loss", sometimes_nan)
    summary = _in_process_trainer(work, tmp_path, "trainer.max_steps=5", "data.dev_manifests=[]").fit()
    assert summary["step"] == 5 and summary["skipped_steps"] == 1
    model, _ = load_for_inference(tmp_path / "checkpoints")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_torchrun_two_processes_gloo(work: dict) -> None:
    """Two CPU ranks through torchrun: they agree on one output folder and end with identical weights."""
    cwd = work["root"] / "ddp_cwd"
    cwd.mkdir()
    args = [a for a in _args(work, cwd, "trainer.max_steps=6", "trainer.log_every=3", "name=ddp")
            if not a.startswith("hydra.run.dir")]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "asr.cli.train", *args],
        cwd=cwd, env=ENV, capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run,) = list((cwd / "exp" / "ddp").iterdir())  # one folder: both ranks used rank 0's time stamp
    digests = []
    for log_name in ("train.log", "train_rank1.log"):
        text = (run / log_name).read_text()
        line = next(x for x in text.splitlines() if "final weights sha256" in x)
        digests.append(line.split()[-1])
    assert digests[0] == digests[1]
    ckpt = load_checkpoint(run / "checkpoints" / "ckpt-step000000006.pt")
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    assert ckpt["sampler"]["world_size"] == 2
    # the ranks trained (weights moved away from the initialisation)
    from asr.model import CTCModel, ModelConfig

    torch.manual_seed(1234)
    init = CTCModel(ModelConfig.from_dict(ckpt["config"]))
    init.cmvn.load_state_dict({"mean": ckpt["model"]["cmvn.mean"], "istd": ckpt["model"]["cmvn.istd"]})
    assert state_digest(init) != digests[0]


def test_multirun_sweep(work: dict) -> None:
    """``-m`` runs one job per value; the sweep is over gradient accumulation, which also checks
    that one optimizer step consumes that many batches."""
    cwd = work["root"] / "sweep_cwd"
    cwd.mkdir()
    args = [a for a in _args(work, cwd, "trainer.max_steps=2", "data.dev_manifests=[]", "name=sweep",
                             "data.max_batch_seconds=2") if not a.startswith("hydra.run.dir")]
    _train(["-m", *args, "trainer.accumulate_grad_batches=1,2"], cwd)
    (sweep,) = list((cwd / "exp" / "sweep").iterdir())
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir() and (p / "summary.json").is_file())
    assert jobs == ["0", "1"]
    for job, accum in zip(jobs, (1, 2)):
        ckpt = load_checkpoint(sweep / job / "checkpoints" / "ckpt-step000000002.pt")
        assert f"accumulate_grad_batches: {accum}" in ckpt["train_config"]
        assert (ckpt["sampler"]["epoch"], ckpt["sampler"]["position"]) == (0, 2 * accum)


def test_fit_max_steps_ends_the_lr_schedule_at_the_deadline(work: dict, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """trainer.fit_max_steps: with a fake clock (0.5 s per step) and a 1-minute budget, steps 10 to
    110 take 50 s, 5 s are left, so max_steps becomes 110 + 0.9 * 2 steps/s * 5 s = 119; the run
    ends there, on the schedule's last learning rate, and the checkpoint keeps the fitted value."""
    _fake_clock(monkeypatch, lambda step: 0.5)
    summary = _in_process_trainer(
        work, tmp_path, "trainer.max_steps=100000", "trainer.max_minutes=1", "trainer.fit_max_steps=true",
        "trainer.log_every=1", "trainer.val_every=100000", "data.dev_manifests=[]", "optim.min_lr_ratio=0.1").fit()
    assert summary["step"] == 119
    last = _metrics(tmp_path)[-1]
    assert last["step"] == 119 and last["train/lr"] == pytest.approx(3e-3 * 0.1)
    ckpt = load_checkpoint(resolve_checkpoint(tmp_path / "checkpoints"))
    assert ckpt["max_steps"] == 119 and ckpt["max_steps_fitted"]


def test_missing_dev_audio_fails_before_training_in_one_line(work: dict, tmp_path: Path) -> None:
    """A dev manifest naming audio that is not there stops asr-train at the start with one line,
    not at the first validation hours later with a DataLoader traceback."""
    entries = read_manifest(work["dev"])
    entries[3]["audio"] = str(tmp_path / "gone.wav")
    write_manifest(tmp_path / "dev_missing.jsonl", entries)
    run = tmp_path / "run"
    args = [a if not a.startswith("data.dev_manifests=") else f"data.dev_manifests=[{tmp_path / 'dev_missing.jsonl'}]"
            for a in _args(work, run, "trainer.max_steps=5")]
    proc = _train(args, tmp_path, check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()
    assert err[-1].startswith("asr-train: error: data.dev_manifests: 1 of") and "gone.wav" in err[-1], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").glob("ckpt-*.pt"))


def test_failed_validation_saves_the_steps_trained_first(work: dict, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """If validation at the end of the schedule fails, the weights of the last step are saved before
    the error goes up (session 7 lost 947 steps of a run that way)."""
    from asr.data.manifest import ManifestError
    from asr.train.trainer import Trainer

    def broken_validate(self, dev_loader):
        raise ManifestError("dev audio went missing")

    monkeypatch.setattr(Trainer, "validate", broken_validate)
    trainer = _in_process_trainer(work, tmp_path, "trainer.max_steps=7", "trainer.save_every=5", "trainer.val_every=100")
    with pytest.raises(ManifestError):
        trainer.fit()
    ckpt = load_checkpoint(resolve_checkpoint(tmp_path / "checkpoints"))
    assert ckpt["step"] == 7


def test_unreadable_training_audio_saves_the_steps_trained_first(work: dict, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A training file that cannot be read (deleted, damaged) stops the run with its error, but
    only after the steps trained so far are saved: fix the file and resume=auto loses nothing."""
    from asr.audio import AudioError
    from asr.data.dataset import ManifestDataset

    real_getitem = ManifestDataset.__getitem__
    calls = [0]

    def failing_getitem(self, index):
        calls[0] += 1
        if calls[0] > 40:  # some steps in
            raise AudioError("/data/utt-0042.flac: file not found")
        return real_getitem(self, index)

    monkeypatch.setattr(ManifestDataset, "__getitem__", failing_getitem)
    trainer = _in_process_trainer(work, tmp_path, "trainer.max_steps=100", "trainer.save_every=1000",
                                  "trainer.val_every=1000", "data.dev_manifests=[]")
    with pytest.raises(AudioError, match="utt-0042"):
        trainer.fit()
    ckpt = load_checkpoint(resolve_checkpoint(tmp_path / "checkpoints"))
    assert 0 < ckpt["step"] < 100


@pytest.mark.parametrize("window, max_steps, profiled", [("[3,6]", 8, "steps 3-5 (3)"), ("[5,100]", 8, "steps 5-7 (3)")])
def test_profile_steps_writes_a_table_of_those_steps(work: dict, tmp_path: Path, window: str, max_steps: int,
                                                     profiled: str) -> None:
    """trainer.profile_steps profiles a window of the run's own steps (closed early if the run
    ends inside it) and the run trains on as usual."""
    summary = _in_process_trainer(work, tmp_path, f"trainer.max_steps={max_steps}", f"trainer.profile_steps={window}",
                                  "trainer.val_every=1000", "data.dev_manifests=[]").fit()
    assert summary["step"] == max_steps
    text = (tmp_path / "profile.txt").read_text()
    assert text.startswith(profiled) and "ms per step" in text
    assert "aten::" in text and "Self CPU" in text  # the profiler's table of ops


def test_profile_steps_must_be_a_window() -> None:
    from asr.train.profile import StepProfiler

    with pytest.raises(ValueError, match="profile_steps"):
        StepProfiler([6, 3], Path("."), use_cuda=False)


def test_fit_max_steps_fits_again_when_the_pace_changes(work: dict, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Compiled code is slow for its first steps (compiling, recording CUDA graphs) and fast after.
    With a fake clock of 1 s per step up to step 110 and 0.25 s after, and a 3-minute budget, a single
    fit at step 110 ends the schedule at step ~173 (2 minutes in); fitting again from the later pace
    ends it close to the deadline, never past it, on the schedule's last learning rate."""
    clock = _fake_clock(monkeypatch, lambda step: 1.0 if step < 110 else 0.25)
    summary = _in_process_trainer(
        work, tmp_path, "trainer.max_steps=100000", "trainer.max_minutes=3", "trainer.fit_max_steps=true",
        "trainer.log_every=10", "trainer.val_every=100000", "data.dev_manifests=[]", "optim.min_lr_ratio=0.1").fit()
    assert summary["step"] > 300, "the schedule kept the first, slow fit"
    assert 165.0 <= clock[0] <= 180.0, f"schedule ended at {clock[0]} s of a 180 s budget"
    last = _metrics(tmp_path)[-1]
    assert last["step"] == summary["step"] and last["train/lr"] == pytest.approx(3e-3 * 0.1)


@pytest.mark.parametrize("scope", ["model", "blocks", "cudagraphs"])
def test_compile_keeps_parameter_names(scope: str) -> None:
    """trainer.compile compiles in place: checkpoints keep their keys (no ``_orig_mod.``)."""
    from asr.model import CTCModel, ModelConfig
    from asr.train.compile import compile_model

    model = CTCModel(ModelConfig(vocab_size=16, d_model=32, n_layers=2, head_size=16, subsample_channels=8))
    names = list(model.state_dict())
    compile_model(model, scope)
    assert list(model.state_dict()) == names
    compiled = [model] if scope == "model" else list(model.blocks)
    assert all(m._compiled_call_impl is not None for m in compiled)


def test_compiled_model_trains_like_the_eager_one() -> None:
    """trainer.compile=true traces the whole model as one graph (fullgraph: the wkv kernel is the
    ``asr::wkv7`` op, not a graph break) and two training steps on two different lengths (one
    dynamic graph) give the eager model's losses and gradients. ``aot_eager`` runs the traced
    graphs without code generation, so this checks the tracing, not inductor's kernels."""
    import copy

    from asr.model import CTCModel, ModelConfig, ctc_loss
    from asr.train.compile import compile_model

    torch.manual_seed(0)
    eager = CTCModel(ModelConfig(vocab_size=16, n_mels=16, d_model=32, n_layers=2, head_size=16, subsample_channels=8))
    for p in eager.parameters():  # the init zeroes several matrices; make every path carry signal
        p.data.add_(torch.randn_like(p) * 0.05)
    compiled = copy.deepcopy(eager)
    compile_model(compiled, "model", backend="aot_eager")
    try:
        for frames in (96, 71):
            feats, lengths = torch.randn(2, frames, 16), torch.tensor([frames, frames - 9])
            targets, target_lengths = torch.randint(1, 16, (2, 4)), torch.tensor([4, 3])
            losses = []
            for model in (eager, compiled):
                model.zero_grad()
                logits, out_lengths = model(feats, lengths, impl="chunked")
                loss = ctc_loss(logits, out_lengths, targets, target_lengths)
                loss.backward()
                losses.append(loss.detach())
            torch.testing.assert_close(losses[1], losses[0])
            for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
                torch.testing.assert_close(b.grad, a.grad, msg=name)
    finally:
        torch._dynamo.reset()


def test_activation_checkpointing_gives_the_same_gradients_from_less_saved_memory() -> None:
    """trainer.activation_checkpointing: the same loss and gradients as without, while autograd keeps
    under a third of the activation bytes for the backward (what the option is for)."""
    import copy

    from asr.model import CTCModel, ModelConfig, ctc_loss

    torch.manual_seed(0)
    plain = CTCModel(ModelConfig(vocab_size=16, n_mels=16, d_model=32, n_layers=3, head_size=16, subsample_channels=8))
    for p in plain.parameters():
        p.data.add_(torch.randn_like(p) * 0.05)
    checkpointed = copy.deepcopy(plain)
    checkpointed.activation_checkpointing = True
    feats, lengths = torch.randn(2, 120, 16), torch.tensor([120, 97])
    targets, target_lengths = torch.randint(1, 16, (2, 5)), torch.tensor([5, 4])
    saved_bytes, losses = [], []
    for model in (plain, checkpointed):
        held: list[int] = []

        def keep(t: torch.Tensor) -> torch.Tensor:
            if not isinstance(t, torch.nn.Parameter):
                held.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            logits, out_lengths = model(feats, lengths, impl="chunked")
            loss = ctc_loss(logits, out_lengths, targets, target_lengths)
        loss.backward()
        saved_bytes.append(sum(held))
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0])
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(b.grad, a.grad, msg=name)
    assert saved_bytes[1] * 3 < saved_bytes[0], saved_bytes


@pytest.mark.parametrize("scope", ["model", "blocks"])
def test_compile_trains_under_ddp(scope: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """trainer.compile under DDP (world_size > 1), with gradient buckets small enough that DDP's
    hooks fire inside the compiled backward. Before wkv7 became an op, each block graph broke
    around it and a Python int handed across the break made AOTAutograd fail ("'int' object has no
    attribute 'meta'"). One process on gloo reproduces the setting at this toy size."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from asr.model import CTCModel, ModelConfig
    from asr.train.compile import compile_model

    torch.manual_seed(0)
    model = CTCModel(ModelConfig(vocab_size=16, n_mels=16, d_model=64, n_layers=1, head_size=32, subsample_channels=8))
    compile_model(model, scope, backend="aot_eager")
    monkeypatch.setattr(dist, "_DEFAULT_FIRST_BUCKET_BYTES", 16 * 1024)  # DDP's first bucket; 1 MiB by default
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = DDP(model, bucket_cap_mb=0.05)
        logits, _ = ddp(torch.randn(2, 48, 16), torch.full((2,), 48), impl="chunked")
        logits.square().mean().backward()
        assert all(p.grad is not None for p in model.blocks.parameters())
    finally:
        dist.destroy_process_group()
        torch._dynamo.reset()


def test_resume_from_a_checkpoint_of_the_unfused_optimizer(trained: Path, work: dict, tmp_path: Path) -> None:
    """Checkpoints written before the trainer switched to fused AdamW (param groups without
    ``fused``) still resume: the skip-on-non-finite mechanism needs the fused kernel."""
    src = CheckpointManager(trained / "checkpoints", writable=False).latest()
    ckpt = load_checkpoint(src)
    for group in ckpt["optimizer"]["param_groups"]:
        group["fused"], group["foreach"] = None, None
    run = tmp_path / "old_run"
    (run / "checkpoints").mkdir(parents=True)
    atomic_torch_save(ckpt, run / "checkpoints" / src.name)
    _train(_args(work, run, f"trainer.max_steps={ckpt['step'] + 2}", "trainer.val_every=100000"), work["root"])
    assert f"at step {ckpt['step']}" in (run / "train.log").read_text()
    assert json.loads((run / "summary.json").read_text())["step"] == ckpt["step"] + 2


def _same_run_either_way(work: dict, tmp_path: Path, extra: list[str], setting: str, values: tuple[str, str]) -> None:
    """Train the same 6 steps with ``setting`` at each of ``values``: same losses, same weights."""
    weights, losses = {}, {}
    for value in values:
        run = tmp_path / value
        _in_process_trainer(work, run, "trainer.max_steps=6", "trainer.log_every=1", "data.dev_manifests=[]",
                            *extra, f"{setting}={value}").fit()
        model, _ = load_for_inference(run / "checkpoints")
        weights[value] = model.state_dict()
        losses[value] = [m["train/loss"] for m in _metrics(run) if "train/loss" in m]
    first, second = values
    assert len(losses[second]) == 6
    assert losses[second] == pytest.approx(losses[first], rel=1e-4)
    for name, w in weights[first].items():
        torch.testing.assert_close(weights[second][name], w, rtol=1e-4, atol=1e-5, msg=name)


def test_features_on_device_trains_the_same_run(work: dict, tmp_path: Path) -> None:
    """data.features_on_device=true (fbank + SpecAugment in the trainer) trains exactly the run the
    workers' features give: same losses, same weights to float rounding."""
    _same_run_either_way(work, tmp_path, ["data.augment.speed.enabled=true"], "data.features_on_device", ("false", "true"))


def test_padding_frames_for_compiled_shapes_trains_the_same_run(work: dict, tmp_path: Path) -> None:
    """trainer.pad_frames_multiple (fewer batch shapes for compiled code and CUDA graphs) pads every
    batch with frames no utterance owns: the causal model and CTC make that the same run."""
    _same_run_either_way(work, tmp_path, [], "trainer.pad_frames_multiple", ("0", "64"))


def test_padding_batches_with_empty_utterances_trains_the_same_run(work: dict, tmp_path: Path) -> None:
    """trainer.pad_batch_multiple (fewer batch shapes for CUDA graphs) appends utterances with no
    frames and no targets: they cost 0 and the loss counts only the real ones, so the same run."""
    _same_run_either_way(work, tmp_path, [], "trainer.pad_batch_multiple", ("0", "7"))


def test_activation_checkpointing_trains_the_same_run_and_refuses_compile(work: dict, tmp_path: Path) -> None:
    """trainer.activation_checkpointing trains the run it would without (recomputing changes no
    value); with trainer.compile it stops at the start instead of silently doing neither."""
    _same_run_either_way(work, tmp_path, [], "trainer.activation_checkpointing", ("false", "true"))
    trainer = _in_process_trainer(work, tmp_path / "on", "trainer.max_steps=1", "data.dev_manifests=[]",
                                  "trainer.activation_checkpointing=true")
    trainer.fit()
    assert trainer.model.activation_checkpointing  # the run above really recomputed
    with pytest.raises(ValueError, match="activation_checkpointing works with trainer.compile=false only"):
        _in_process_trainer(work, tmp_path / "both", "trainer.max_steps=1", "data.dev_manifests=[]",
                            "trainer.activation_checkpointing=true", "trainer.compile=true").fit()


def test_pad_rows_appends_empty_rows() -> None:
    from asr.train.padding import pad_rows

    feats, lengths = torch.randn(3, 5, 2), torch.tensor([5, 4, 2])
    padded_feats, padded_lengths = pad_rows(4, feats, lengths)
    assert padded_feats.shape == (4, 5, 2) and padded_lengths.tolist() == [5, 4, 2, 0]
    assert torch.equal(padded_feats[:3], feats) and not padded_feats[3].any()
    assert pad_rows(0, feats)[0] is feats and pad_rows(3, feats)[0] is feats


def test_ctc_loss_of_empty_rows_is_zero_and_normalised_by_the_real_ones() -> None:
    from asr.model import ctc_loss

    torch.manual_seed(0)
    logits = torch.randn(2, 9, 6, requires_grad=True)
    out_lengths, targets, target_lengths = torch.tensor([9, 6]), torch.tensor([[1, 2, 3], [4, 5, 0]]), torch.tensor([3, 2])
    plain = ctc_loss(logits, out_lengths, targets, target_lengths)
    padded_logits = torch.cat([logits, torch.randn(3, 9, 6)]).detach().requires_grad_()
    padded = ctc_loss(padded_logits, torch.tensor([9, 6, 0, 0, 0]), torch.cat([targets, torch.zeros(3, 3, dtype=torch.long)]),
                      torch.tensor([3, 2, 0, 0, 0]), utterances=2)
    torch.testing.assert_close(padded, plain)
    plain.backward()
    padded.backward()
    torch.testing.assert_close(padded_logits.grad[:2], logits.grad)
    assert not padded_logits.grad[2:].any()


def test_pad_frames_rounds_up_and_keeps_the_frames() -> None:
    from asr.train.padding import pad_frames

    x = torch.randn(2, 70, 3)
    padded = pad_frames(x, 64)
    assert padded.shape == (2, 128, 3)
    assert torch.equal(padded[:, :70], x) and not padded[:, 70:].any()
    assert pad_frames(x, 0) is x and pad_frames(x, 1) is x and pad_frames(x, 70) is x


def test_unknown_compile_scope_is_an_error() -> None:
    from asr.model import CTCModel, ModelConfig
    from asr.train.compile import compile_model

    model = CTCModel(ModelConfig(vocab_size=16, d_model=32, n_layers=1, head_size=16, subsample_channels=8))
    with pytest.raises(ValueError, match="trainer.compile must be"):
        compile_model(model, "everything")


def _graph_stand_in(captured: list[tuple]) -> Callable:
    """A CPU stand-in for ``torch.cuda.make_graphed_callables`` with the behaviour the trainer must
    cope with: each recorded shape returns its weight gradients in buffers of its own that every
    later backward of that shape overwrites (a graph's static outputs). ``captured`` collects the
    recorded shapes."""

    def make_graphed(module: torch.nn.Module, sample: tuple, pool=None) -> Callable:
        captured.append(tuple(sample[0].shape))
        params = tuple(p for p in module.parameters() if p.requires_grad)
        buffers = [torch.zeros_like(p) for p in params]

        class Replay(torch.autograd.Function):
            @staticmethod
            def forward(ctx, features, lengths, *weights):
                with torch.enable_grad():
                    ctx.logits, out_lengths = module(features, lengths)
                return ctx.logits.detach(), out_lengths

            @staticmethod
            def backward(ctx, grad_logits, _):
                grads = torch.autograd.grad(ctx.logits, params, grad_logits, allow_unused=True)
                for buf, g in zip(buffers, grads):
                    buf.copy_(g if g is not None else torch.zeros_like(buf))
                return (None, None, *(b.detach() for b in buffers))

        return lambda features, lengths: Replay.apply(features, lengths, *params)

    return make_graphed


def test_cuda_graphs_train_the_eager_run_with_gradient_accumulation(work: dict, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """trainer.cuda_graphs, with a CPU stand-in for the graph recorder that hands back reused
    gradient buffers as a CUDA graph does: the same losses and weights as the eager run, also when
    two micro-batches add into one step's gradients (autograd must not adopt a buffer as .grad),
    and one recording per batch shape."""
    from asr.train import cuda_graphs
    from asr.train.trainer import Trainer

    captured: list[tuple] = []
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", _graph_stand_in(captured))
    monkeypatch.setattr(Trainer, "_check_cuda_graphs", lambda self: None)  # it refuses the CPU
    _same_run_either_way(work, tmp_path, ["trainer.accumulate_grad_batches=2", "trainer.pad_frames_multiple=32"],
                         "trainer.cuda_graphs", ("false", "true"))
    assert captured and len(set(captured)) == len(captured)  # one recording per shape ...
    assert len(captured) < 12  # ... and 12 micro-batches reused some of them
    assert all(shape[1] % 32 == 0 for shape in captured)
    assert cuda_graphs.MAX_SHAPES >= 16


def test_cuda_graphs_beyond_max_shapes_run_eagerly() -> None:
    """Past ``max_shapes`` recorded shapes a new shape runs the eager model (memory stays bounded)
    and a known shape still replays its recording."""
    from asr.model import CTCModel, ModelConfig
    from asr.train.cuda_graphs import GraphedTrainForward

    model = CTCModel(ModelConfig(vocab_size=16, n_mels=16, d_model=32, n_layers=1, head_size=16, subsample_channels=8))
    captured: list[tuple] = []
    forward = GraphedTrainForward(model, None, max_shapes=2, capture=_graph_stand_in(captured))
    for frames in (32, 64, 32, 96, 64, 96):
        logits, out_lengths = forward(torch.randn(2, frames, 16), torch.full((2,), frames))
        assert logits.shape[:2] == (2, frames // 4) and out_lengths.tolist() == [frames // 4] * 2
    assert captured == [(2, 32, 16), (2, 64, 16)]
    assert forward.eager_batches == 2


def test_cuda_graphs_refuse_the_cpu_and_compile(work: dict, tmp_path: Path) -> None:
    """trainer.cuda_graphs stops at the start, in one line, where it cannot run."""
    with pytest.raises(ValueError, match="trainer.cuda_graphs needs a CUDA device"):
        _in_process_trainer(work, tmp_path / "cpu", "trainer.max_steps=1", "trainer.cuda_graphs=true").fit()
    assert not (tmp_path / "cpu" / "checkpoints").exists()


def test_padded_size_rounds_to_few_values_per_octave() -> None:
    """trainer.pad_per_octave: every count lands on one of ``per_octave`` values per octave, never
    more than 1/per_octave above itself; a multiple applies after."""
    from asr.train.padding import check_per_octave, padded_size

    for per_octave in (4, 8):
        sizes = {padded_size(n, 0, per_octave) for n in range(1, 4097)}
        for n in range(1, 4097):
            size = padded_size(n, 0, per_octave)
            assert n <= size <= n * (1 + 1 / per_octave) and size in sizes
        assert len([s for s in sizes if 512 < s <= 1024]) == per_octave
    assert padded_size(100, 0, 4) == 112 and padded_size(100, 64, 4) == 128 and padded_size(100, 64) == 128
    assert padded_size(3, 0, 4) == 3 and padded_size(100) == 100
    with pytest.raises(ValueError, match="power of two"):
        check_per_octave(6)


def test_padding_to_few_values_per_octave_trains_the_same_run(work: dict, tmp_path: Path) -> None:
    """trainer.pad_per_octave pads frames and utterances like the two pad_* multiples: same run."""
    _same_run_either_way(work, tmp_path, [], "trainer.pad_per_octave", ("0", "4"))
