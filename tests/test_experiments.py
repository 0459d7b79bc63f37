"""Experiment configs (conf/experiment/) reproduce what was trained, and the device entry point
(tools/device/run.sh) refuses what it cannot run."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import asr.cli.train  # noqa: F401  (registers the asr_* resolvers the config uses)
from asr.model import CTCModel, ModelConfig
from asr.model_file import load_checkpoint
from asr.train.build import model_config

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))
SHIPPED = ROOT / "asr" / "pretrained" / "model.pt"


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_there_are_experiments_for_every_chain_stage() -> None:
    assert "bundled" in EXPERIMENTS and len(EXPERIMENTS) >= 20
    for stage in ("bundled_run7_light_8x320", "bundled_run8_cont_b800", "bundled_run8_cont_lr2e3",
                  "bundled_run9_b800_cpu_feats", "bundled_run9_b800_gpu_feats"):
        assert stage in EXPERIMENTS


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_builds_its_model(name: str) -> None:
    """Each experiment composes on top of conf/config.yaml, is named after its file (its runs' folders
    are), names a corpus and describes a model that can be built (on the meta device: shapes only)."""
    cfg = _compose(f"experiment={name}")
    assert cfg.name == name
    assert cfg.data.train_manifests and cfg.data.manifest_dir
    with torch.device("meta"):
        model = CTCModel(model_config(cfg.model, int(cfg.tokenizer.vocab_size)))
    assert 5e6 < model.num_parameters() < 25e6


def test_bundled_experiment_and_model_config_are_what_ships() -> None:
    """conf/model/bundled.yaml and the bundled experiment build exactly the shipped model's config,
    and a chain stage that starts from a checkpoint describes the same model."""
    ckpt = load_checkpoint(SHIPPED)
    shipped = ModelConfig.from_dict(ckpt["config"])
    for overrides in (["experiment=bundled"], ["model=bundled"], ["experiment=bundled_run7_light_8x320"],
                      ["experiment=bundled_run9_b800_cpu_feats"]):
        cfg = _compose(*overrides)
        assert model_config(cfg.model, int(cfg.tokenizer.vocab_size)) == shipped, overrides
    assert model_config(_compose("model=bundled", "model.dropout=0.1").model, 256) != shipped
    # and the shipped weights fit that model, tensor for tensor (shapes on the meta device)
    with torch.device("meta"):
        model = CTCModel(model_config(_compose("experiment=bundled").model, 256))
    assert {k: tuple(v.shape) for k, v in ckpt["model"].items()} == {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_bundled_experiment_holds_the_chain_settings() -> None:
    """What the shipped runs trained with: 800 s batches, lr 2e-3, light SpecAugment, speed
    perturbation, a cosine schedule fitted to 20 minutes; the chain's later stages start from the
    previous stage's export, put where the shipped model is (it travels with the tree)."""
    cfg = _compose("experiment=bundled")
    spec = cfg.data.augment.spec_augment
    assert cfg.data.max_batch_seconds == 800 and cfg.optim.lr == pytest.approx(2e-3)
    assert (spec.freq_masks, spec.freq_width, spec.time_masks, spec.time_width) == (2, 15, 2, 25)
    assert cfg.data.augment.speed.enabled and cfg.optim.schedule == "cosine"
    assert cfg.trainer.fit_max_steps and cfg.trainer.max_minutes == 20 and not cfg.trainer.init_from
    assert _compose("experiment=bundled_run7_light_8x320").data.max_batch_seconds == 400
    for stage in ("bundled_run8_cont_b800", "bundled_run9_b800_cpu_feats", "bundled_run10_b800_lr2e3"):
        assert _compose(f"experiment={stage}").trainer.init_from == "asr/pretrained/model.pt"
    assert _compose("experiment=bundled_run9_b800_gpu_feats").data.features_on_device


def _device(*args: str, out: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    if out:
        env["OUT"] = "/nonexistent-out"
    return subprocess.run(["bash", "tools/device/run.sh", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=30)


def test_device_entry_point_refuses_in_one_line() -> None:
    """Unknown jobs, unknown experiments and a missing $OUT stop run.sh with one line and exit 2,
    before anything is installed or trained."""
    for args, words in ((["nope"], "unknown job 'nope'"), ([], "name a job"),
                        (["variants", "bundled", "no_such"], "no experiment 'no_such'"),
                        (["synth-train"], "name at least one experiment"),
                        (["train", "no_such"], "no experiment 'no_such'")):
        proc = _device(*args)
        assert proc.returncode == 2 and words in proc.stderr, (args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1 and not proc.stdout
    proc = _device("bench", out=False)
    assert proc.returncode == 2 and "$OUT is not set" in proc.stderr
    env = dict(os.environ, OUT="/nonexistent-out", PARTS="tests/data/no_such_part")  # a part not carried
    proc = subprocess.run(["bash", "tools/device/run.sh", "corpus"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 2 and "no corpus part at tests/data/no_such_part" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not proc.stdout
    helped = _device("help")
    assert helped.returncode == 0
    for job in ("bench", "train", "variants", "synth-train", "profile", "speed", "pack-synth"):
        assert job in helped.stdout


def test_variants_job_trains_each_experiment_on_its_own_gpu(tmp_path: Path) -> None:
    """The variants job, with stand-ins for nvidia-smi and python: one `asr-train experiment=<name>`
    per GPU in $ROOT/<name> (TOTAL_MINUTES only when set), the extra experiments beyond the GPUs
    left out, and the safety copy exported into $OUT."""
    bin_dir, out, root = tmp_path / "bin", tmp_path / "out", tmp_path / "runs"
    bin_dir.mkdir()
    out.mkdir()
    calls = tmp_path / "calls.txt"
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: stand-in'\necho 'GPU 1: stand-in'\n")
    (bin_dir / "python").write_text(
        "#!/bin/sh\n"
        f'echo "CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES $*" >> {calls}\n'
        'if [ "$1" = tools/export_model.py ]; then echo model > "$3"; fi\n'
        'case "$*" in *asr.cli.train*) echo "step 100 loss 12.5 lr 1e-3";; esac\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OUT": str(out), "ROOT": str(root),
           "ASR_DEVICE_SETUP_DONE": "1", "CALL_BUDGET": "200"}
    names = ["bundled_run10_b800_lr2e3", "bundled_run10_b800_lr1e3", "bundled_run10_b1600_lr3e3"]
    proc = subprocess.run(["bash", "tools/device/run.sh", "variants", *names], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    trains = [line for line in calls.read_text().splitlines() if "asr.cli.train" in line]
    assert len(trains) == 2 and "using the first 2" in proc.stdout
    for gpu, (line, name) in enumerate(zip(sorted(trains), names)):
        assert line.startswith(f"CUDA_VISIBLE_DEVICES={gpu} -m asr.cli.train experiment={name} ")
        assert f"hydra.run.dir={root / name}" in line and "max_minutes" not in line
    assert list(out.glob("bundled_run10_*.pt.part-*"))
    env["TOTAL_MINUTES"] = "7"
    calls.unlink()
    subprocess.run(["bash", "tools/device/run.sh", "variants", names[0]], cwd=ROOT, env=env,
                   capture_output=True, text=True, timeout=60, check=True)
    assert "trainer.max_minutes=7" in calls.read_text()
    for name in names:  # the job exports to /tmp/<name>.pt (here the stand-in's few bytes)
        Path(f"/tmp/{name}.pt").unlink(missing_ok=True)
