"""The training loop: data, tokenizer stage, CMVN, AdamW + schedule, DDP, validation, checkpoints.

Driven by a composed Hydra config (``conf/``); :mod:`asr.cli.train` is the entry point. The parts
that must hold (tests/test_train.py checks them):

* **Exact resume.** A checkpoint holds the model, optimizer, scheduler, sampler position and the
  RNG states of every rank; the data pipeline draws its randomness from per-sample seeds
  (:mod:`asr.data.sampler`), and the DataLoader gets its own generator so creating an iterator does
  not consume the global RNG. On CPU a resumed run ends bit-identical to an uninterrupted one.
* **Non-finite steps are skipped, not fatal.** After backward, one all-reduced flag says whether the
  loss and the gradient norm are finite on every rank; if not, all ranks drop the update together
  (a rank-local decision would desynchronise DDP) and the step is counted in ``skipped_steps``.
  The flag stays on the device: fused AdamW reads it (``found_inf``, as under a GradScaler) and
  skips the update itself, so the host does not wait for the backward pass; the CPU queues the next
  batch's forward while the GPU finishes this step. (PyTorch's CUDA CTC loss still waits once per
  batch: it copies its batch offsets to the GPU synchronously; we at least hand it CPU lengths.)
* **DDP through torchrun only.** Rank, world size and local rank come from the environment
  torchrun sets; the process group uses NCCL for CUDA tensors and gloo for CPU tensors.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import signal
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from asr.data.augment import AugmentConfig
from asr.data.dataset import Batch, ManifestDataset, collate
from asr.data.manifest import ManifestError, read_manifests
from asr.data.resident import FixedShapeSampler, ResidentBatches, ResidentCorpus, ShapeClasses
from asr.data.sampler import BucketingBatchSampler
from asr.model import CTCModel, ModelConfig, ctc_loss
from asr.stop import StopSignals
from asr.train.profile import StepProfiler
from asr.train.checkpoint import (
    CheckpointError,
    CheckpointManager,
    atomic_write_bytes,
    capture_rng_state,
    load_checkpoint,
    resolve_checkpoint,
    restore_rng_state,
)
from asr.train.cuda_graphs import GraphedTrainForward, keep_grads_allocated
from asr.train.metrics import ErrorCounts, error_counts

log = logging.getLogger("asr.train")

TOKENIZER_FILE = "tokenizer.model"


# ---------------------------------------------------------------------- distributed
@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistEnv:
    """Read torchrun's environment, pick the device, and join the process group when WORLD_SIZE > 1.

    ``device``: ``auto`` (CUDA if available), ``cuda`` or ``cpu``. The group is created with
    ``cpu:gloo,cuda:nccl`` when CUDA exists, so CPU collectives (object gathers, CPU training)
    and CUDA collectives both work; plain ``gloo`` otherwise. Idempotent.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        use_cuda = torch.cuda.is_available()
    elif device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("trainer.device=cuda but torch sees no GPU (use trainer.device=cpu or auto)")
        use_cuda = True
    elif device == "cpu":
        use_cuda = False
    else:
        raise ValueError(f"trainer.device must be auto, cuda or cpu, got {device!r}")
    dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    return DistEnv(rank, world, local, dev)


def _all_reduce(t: torch.Tensor, op: Any = None) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _gather_objects(obj: Any) -> list:
    if dist.is_initialized() and dist.get_world_size() > 1:
        out: list = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


class TrainConfigError(ValueError):
    """Settings that cannot work together; asr-train reports it in one line."""


def compile_model(model: torch.nn.Module, scope: Union[bool, str] = "blocks", backend: str = "inductor") -> None:
    """torch.compile the encoder in place (trainer.compile), for fewer and fused GPU kernels.

    Why: at the bundled size an eager training step launches ~4,000 small kernels and the GPU waits
    on Python (tools/profile_train_step.py). Compiling in place (``Module.compile``) keeps parameter
    names and checkpoints as they are; ``dynamic=True`` keeps the bucketing sampler's changing shapes
    from recompiling. The wkv kernel is an opaque custom op under tracing (``asr::wkv7``), so no
    graph breaks (``fullgraph``: one would be a bug).

    ``scope``: ``"blocks"`` (or ``True``) compiles each block on its own (one graph per block, the
    identical ones served from inductor's cache). ``"model"`` traces the whole forward, front end to
    head, as one graph: no Python between blocks, but every block is compiled again. Inductor's
    coalescing analysis, which torch 2.11 runs on dynamic shapes and fails an assertion on with the
    whole model, is switched off; even so, on torch 2.11 (H100, session 8) compiling the whole model
    for dynamic shapes did not finish within 5 minutes, with or without CUDA graphs on top.
    ``"cudagraphs"``: blocks as ``"blocks"``, and inductor replays each as a CUDA graph, recorded
    once per batch shape (``trainer.pad_frames_multiple`` and ``pad_batch_multiple`` keep the shapes
    few). On an H100 CUDA graphs made the step 2.9-3.4x faster for one fixed shape
    (tools/bench_train.py, BENCHMARKS.md); in training over the trainer's changing shapes (run 9,
    4x H200) they trained correctly but gave 1.02x the eager step: each new shape records again, and
    the rest of the step stays eager. ``"fixed"``: the whole model, front end to head, compiled for
    each batch shape as it comes (``dynamic=False``) and replayed as CUDA graphs
    (``mode="reduce-overhead"``): with ``data.resident``'s few fixed shapes, the step of
    tools/bench_train.py's ``rwkv7_bundled_cudagraphs`` row on real data. ``backend``: torch.compile's (tests use ``"aot_eager"``, which
    traces without generating code).
    """
    options: Optional[dict] = None
    if backend == "inductor":
        options = {"triton.coalesce_tiling_analysis": False}
        if scope == "cudagraphs":
            options["triton.cudagraphs"] = True
    if scope == "model":
        model.compile(dynamic=True, fullgraph=True, backend=backend, options=options)
    elif scope == "fixed":
        # One graph per batch shape, replayed as CUDA graphs: data.resident makes a few shapes.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        mode = "reduce-overhead" if backend == "inductor" else None
        model.compile(mode=mode, dynamic=False, fullgraph=True, backend=backend)
    elif scope in (True, "blocks", "cudagraphs"):
        # Dynamo guards on each block's layer_id, so every block is its own graph (inductor's cache
        # makes the identical ones cheap): allow that many before it gives up.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, len(model.blocks) + 8)
        for block in model.blocks:
            block.compile(dynamic=True, fullgraph=True, backend=backend, options=options)
    else:
        raise ValueError(f"trainer.compile must be false, true, 'blocks', 'model', 'cudagraphs' or 'fixed', not {scope!r}")


FIT_AGAIN_EVERY = 500  # steps between fits of trainer.fit_max_steps after the first (at most)
FIT_UNTIL_SECONDS_LEFT = 30.0  # no more fits this close to the deadline: the schedule is nearly done


def _check_audio_exists(entries: list[dict], what: str) -> None:
    """Fail before training when audio files of a (dev) manifest are missing.

    Why: validation first reads the dev audio at the first ``val_every`` step or at the end of the
    schedule, possibly hours in; a missing file there stopped a run (session 7). Dev sets are small,
    so checking every file costs nothing; training manifests are too large to stat up front."""
    missing = [e["audio"] for e in entries if not os.path.exists(e["audio"])]
    if missing:
        raise ManifestError(f"{what}: {len(missing)} of {len(entries)} audio files are missing (first: {missing[0]}); "
                            f"fix the manifest or train without them ({what}=[])")


def padded_size(n: int, multiple: int = 0, per_octave: int = 0) -> int:
    """``n`` rounded up for a batch shape: first to one of ``per_octave`` values per octave (a power
    of two; 0: off), then to a multiple of ``multiple`` (0 or 1: off).

    Why both: CUDA graphs are recorded (compiled code specialises) per batch shape, so shapes must
    be few; a fixed multiple that is coarse enough for long batches pads short ones several times
    over (real speech of 0.5 s padded to 128 frames is 2.5x the work), while rounding to a few
    values per octave wastes at most 1/per_octave of any batch (25 % at 4, 12.5 % at 8)."""
    if per_octave > 1 and n > per_octave:
        step = 1 << (n.bit_length() - per_octave.bit_length())  # n in [2^k, 2^(k+1)): 2^k / per_octave
        n = -(-n // step) * step
    if multiple > 1:
        n = -(-n // multiple) * multiple
    return n


def check_per_octave(per_octave: int) -> int:
    """``trainer.pad_per_octave``, refused in one line unless 0 or a power of two."""
    if per_octave < 0 or per_octave & (per_octave - 1):
        raise TrainConfigError(f"trainer.pad_per_octave must be 0 or a power of two, not {per_octave}")
    return per_octave


def pad_frames(features: torch.Tensor, multiple: int, per_octave: int = 0) -> torch.Tensor:
    """Zero-pad features [B, T, F] at the end to :func:`padded_size` frames (as is when that is T).

    Why: compiled code specialises (CUDA graphs record) per batch shape; rounding T up makes the
    shapes few. The model is causal and CTC reads only each utterance's own frames, so the padding
    changes no loss or gradient (tests/test_train.py checks this)."""
    extra = padded_size(features.shape[1], multiple, per_octave) - features.shape[1]
    return torch.nn.functional.pad(features, (0, 0, 0, extra)) if extra else features


def pad_rows(multiple: int, *tensors: torch.Tensor, per_octave: int = 0) -> tuple[torch.Tensor, ...]:
    """Append all-zero rows to every tensor (dim 0) up to :func:`padded_size` rows (as they are
    when that is their count). For a batch's features, lengths, targets and target lengths: empty
    utterances.

    Why: with the bucketing sampler the utterance count of a batch takes many values; CUDA graphs
    record one graph per batch shape. An empty utterance (no frames, no targets) changes nothing:
    the model's rows are independent, its CTC loss is exactly 0 with zero gradient, and the loss is
    normalised by the real utterances (``ctc_loss(utterances=...)``; tests/test_train.py)."""
    rows = tensors[0].shape[0]
    extra = padded_size(rows, multiple, per_octave) - rows
    if not extra:
        return tensors
    return tuple(torch.cat([t, t.new_zeros(extra, *t.shape[1:])]) for t in tensors)


# ---------------------------------------------------------------------- schedule
def lr_factor(step: int, warmup_steps: int, max_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """Multiplier of the base learning rate for optimizer step ``step`` (0-based).

    Linear warm-up from 1/warmup to 1 over ``warmup_steps``, then ``cosine`` or ``linear`` decay to
    ``min_lr_ratio`` at ``max_steps``, or ``constant``.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    if schedule == "cosine":
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return min_lr_ratio + (1.0 - min_lr_ratio) * (1.0 - progress)
    raise ValueError(f"optim.schedule must be cosine, linear or constant, got {schedule!r}")


def state_digest(model: torch.nn.Module) -> str:
    """sha256 over the exact bytes of every state_dict tensor: equal digests mean equal weights."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _as_list(x: Any) -> list[str]:
    if x is None:
        return []
    if isinstance(x, (str, os.PathLike)):
        return [str(x)]
    return [str(v) for v in x]


# ---------------------------------------------------------------------- evaluation (shared with asr-eval)
@dataclass
class UtteranceResult:
    id: str
    ref: str
    hyp: str
    word_errors: int
    words: int


@torch.no_grad()
def evaluate_model(
    model: CTCModel,
    loader: Any,
    tokenizer: Any,
    device: torch.device,
    autocast: Any = contextlib.nullcontext,
    beam_size: int = 1,
    keep_utterances: bool = False,
    text_decoder: Optional[Callable[[torch.Tensor], str]] = None,
) -> tuple[float, int, ErrorCounts, list[UtteranceResult]]:
    """Decode a loader of :class:`Batch` and score it. Returns (summed CTC loss, utterances scored
    for loss, error counts, per-utterance results if ``keep_utterances``).

    ``beam_size`` 1 is greedy decoding (what validation uses); larger uses CTC prefix beam search.
    ``text_decoder`` (log-probabilities [T, V] of one utterance -> text), e.g. the lexicon and
    language-model search of :mod:`asr.decode.lexicon`, replaces both.
    """
    from asr.decode.greedy import ctc_greedy
    from asr.tokenizer import normalize_text

    was_training = model.training
    model.eval()
    loss_sum, n_loss = 0.0, 0
    counts = ErrorCounts()
    results: list[UtteranceResult] = []
    try:
        for batch in loader:
            batch = batch.to(device)
            with autocast():
                logits, out_lens = model(batch.features, batch.feature_lengths)
            logits = logits.float()
            if batch.targets is not None:
                per_utt = ctc_loss(logits, out_lens, batch.targets, batch.target_lengths) * len(batch)
                loss_sum += float(per_utt)
                n_loss += len(batch)
            if text_decoder is not None:
                log_probs = logits.log_softmax(-1).cpu()
                hyps = [normalize_text(text_decoder(log_probs[b, : int(out_lens[b])])) for b in range(len(batch))]
            else:
                if beam_size > 1:
                    from asr.decode.beam import ctc_prefix_beam_search

                    log_probs = logits.log_softmax(-1).cpu()
                    tokens = []
                    for b in range(len(batch)):
                        best = ctc_prefix_beam_search(log_probs[b, : int(out_lens[b])], beam_size)
                        tokens.append(list(best[0][0]) if best else [])
                else:
                    tokens, _ = ctc_greedy(logits, out_lens.cpu())
                hyps = [tokenizer.decode(t) for t in tokens]
            refs = [normalize_text(t) for t in batch.texts]
            counts += error_counts(refs, hyps)
            if keep_utterances:
                for uid, r, h in zip(batch.ids, refs, hyps):
                    c = error_counts([r], [h])
                    results.append(UtteranceResult(uid, r, h, c.word_errors, c.words))
    finally:
        model.train(was_training)
    return loss_sum, n_loss, counts, results


# ---------------------------------------------------------------------- trainer
class Trainer:
    """One training run. ``Trainer(cfg, out_dir).fit()``; see conf/ for every option."""

    def __init__(self, cfg: DictConfig, out_dir: str | os.PathLike) -> None:
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        tc = cfg.trainer
        self.env = init_distributed(str(tc.device))
        if int(tc.get("num_threads", 0) or 0) > 0:
            torch.set_num_threads(int(tc.num_threads))
        self.device = self.env.device
        self.use_cuda = self.device.type == "cuda"
        if self.use_cuda:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        precision = str(tc.precision)
        if precision not in ("bf16", "fp32"):
            raise ValueError(f"trainer.precision must be bf16 or fp32, got {precision!r}")
        self.autocast_enabled = self.use_cuda and precision == "bf16"
        self.seed = int(cfg.seed)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.step = 0
        self.best_wer: Optional[float] = None
        self.skipped_steps = 0
        self.writer = None
        self.graphed_forward: Optional[GraphedTrainForward] = None  # trainer.cuda_graphs, set up in fit
        self.metrics_file = self.out_dir / "metrics.jsonl"

    # ------------------------------------------------------------------ helpers
    def autocast(self):
        if self.autocast_enabled:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _seed_everything(self, seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    def _log_metrics(self, record: dict) -> None:
        if not self.env.is_main:
            return
        with open(self.metrics_file, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.writer.add_scalar(k, v, record["step"])

    def _find_resume(self) -> Optional[Path]:
        r = self.cfg.trainer.get("resume", "auto")
        if r is None or r is False or str(r).lower() in ("", "none", "null", "never", "false"):
            return None
        if str(r) == "auto":
            return CheckpointManager(self.ckpt_dir, writable=False).latest()
        p = Path(str(r))
        if p.is_file():
            return p
        if p.is_dir():
            folder = p / "checkpoints" if (p / "checkpoints").is_dir() else p
            latest = CheckpointManager(folder, writable=False).latest()
            if latest is None:
                raise CheckpointError(f"trainer.resume={r}: no checkpoint in {folder}")
            return latest
        raise CheckpointError(f"trainer.resume={r}: no such file or folder")

    # ------------------------------------------------------------------ stages
    def prepare_tokenizer(self, train_entries: list[dict]):
        """Tokenizer stage: reuse ``<tokenizer.dir>/tokenizer.model`` or train it from the training text."""
        from asr.tokenizer import Tokenizer

        tcfg = self.cfg.tokenizer
        tdir = Path(str(tcfg.dir))
        path = tdir / TOKENIZER_FILE
        if not path.is_file() and self.env.is_main:
            log.info("training a %d-piece BPE tokenizer on %d transcripts -> %s", tcfg.vocab_size, len(train_entries), path)
            tok = Tokenizer.train(
                (e["text"] for e in train_entries), None, int(tcfg.vocab_size),
                max_sentences=int(tcfg.get("max_sentences", 0) or 0),
            )
            atomic_write_bytes(path, lambda f: f.write(tok.to_bytes()))
        _barrier()
        tok = Tokenizer(path)
        if tok.vocab_size != int(tcfg.vocab_size):
            log.warning("tokenizer %s has %d pieces (config asks %d): the text is too small for more, or the file "
                        "was made with another size", path, tok.vocab_size, tcfg.vocab_size)
        return tok

    def build_model(self, vocab_size: int, ckpt_config: Optional[dict]) -> CTCModel:
        model_dict = OmegaConf.to_container(self.cfg.model, resolve=True)
        assert isinstance(model_dict, dict)
        known = {f.name for f in fields(ModelConfig)}
        unknown = set(model_dict) - known - {"name", "_target_"}
        if unknown:
            raise ValueError(f"unknown model option(s) {sorted(unknown)}; ModelConfig has {sorted(known)}")
        if ckpt_config is not None:
            mcfg = ModelConfig.from_dict(ckpt_config)
            differing = {k: (v, ckpt_config.get(k)) for k, v in model_dict.items()
                         if k in known and k != "vocab_size" and ckpt_config.get(k) != v}
            if differing and self.env.is_main:
                log.warning("model config differs from the checkpoint's, which wins (config vs checkpoint): %s", differing)
        else:
            mcfg = ModelConfig.from_dict({**model_dict, "vocab_size": vocab_size})
        torch.manual_seed(self.seed)  # identical initial weights on every rank
        return CTCModel(mcfg)

    def compute_cmvn(self, model: CTCModel, entries: list[dict]) -> None:
        """Global CMVN statistics from a fixed random subset of training utterances (rank 0, broadcast)."""
        from asr.features import compute_cmvn_stats

        n = int(self.cfg.data.get("cmvn_utterances", 500))
        stats = torch.zeros(2, model.cmvn.num_bins, device=self.device)
        if self.env.is_main:
            idx = sorted(random.Random(self.seed).sample(range(len(entries)), min(n, len(entries))))
            ds = ManifestDataset([entries[i] for i in idx])
            nw = int(self.cfg.data.num_workers)
            loader = DataLoader(ds, batch_size=None, num_workers=nw, generator=torch.Generator())
            mean, std = compute_cmvn_stats(item["features"] for item in loader)
            stats[0], stats[1] = mean.to(self.device), std.to(self.device)
            log.info("CMVN statistics from %d utterances", len(ds))
        if self.env.world_size > 1:
            dist.broadcast(stats, src=0)
        model.cmvn.set_stats(stats[0].cpu(), stats[1].cpu())

    def _loader(self, ds: ManifestDataset, sampler: BucketingBatchSampler, workers: int) -> DataLoader:
        g = torch.Generator()
        g.manual_seed(self.seed)
        kwargs: dict[str, Any] = {}
        if workers > 0:
            kwargs["prefetch_factor"] = int(self.cfg.data.get("prefetch_factor", 2))
        # No pinned batches with trainer.cuda_graphs: the DataLoader's pinning thread makes CUDA calls
        # (pinned allocations) as it runs, and on torch 2.11 make_graphed_callables records in
        # "global" mode, where such a call from any thread invalidates the recording (an H100 run
        # failed so at its 12th shape, session 9; none since, over 64 shapes).
        pin = self.use_cuda and self.graphed_forward is None  # set in fit before the loaders
        return DataLoader(ds, batch_sampler=sampler, collate_fn=collate, num_workers=workers,
                          pin_memory=pin, generator=g, **kwargs)

    # ------------------------------------------------------------------ main entry
    def _resident_batches(self, ds: ManifestDataset) -> ResidentBatches:
        """data.resident: ``ds``'s utterances decoded onto the training device, batches of a few
        fixed shapes made there (:mod:`asr.data.resident`); sets ``self.train_sampler``."""
        dc, env = self.cfg.data, self.env
        aug = ds.augment
        if aug.noise.enabled or ds.dither:
            raise TrainConfigError("data.resident makes no noise mixing and no dither: set "
                                   "data.augment.noise.enabled=false and data.dither=0")
        factors = [float(f) for f in aug.speed.factors] if aug.speed.enabled else [1.0]
        shapes = ShapeClasses.build(ds.durations, float(dc.max_batch_seconds), int(dc.get("resident_per_octave", 1)),
                                    min(factors), int(dc.get("max_batch_size", 0) or 0))
        corpus = ResidentCorpus(ds.entries, self.tokenizer, shapes, self.device, factors, aug.spec_augment,
                                jobs=max(1, int(dc.num_workers)))
        self.train_sampler = FixedShapeSampler(corpus.classes, shapes, seed=self.seed, rank=env.rank,
                                               world_size=env.world_size)
        return ResidentBatches(corpus, self.train_sampler)

    def fit(self) -> dict:
        cfg, env = self.cfg, self.env
        tc, dc, oc = cfg.trainer, cfg.data, cfg.optim
        if tc.get("activation_checkpointing", False) and tc.get("compile", False):
            # Dynamo's checkpoint operator fails on dynamic shapes (torch 2.14), and the compiled
            # alternative (a zero activation-memory budget for the partitioner) saved no memory on an
            # H100 (BENCHMARKS.md, session 8): refuse at the start rather than quietly do neither.
            raise TrainConfigError("trainer.activation_checkpointing works with trainer.compile=false only")
        self._check_cuda_graphs()
        check_per_octave(int(tc.get("pad_per_octave", 0) or 0))
        if tc.get("compile", False) == "fixed" and not dc.get("resident", False):
            raise TrainConfigError("trainer.compile=fixed compiles one graph per batch shape: use it with "
                                   "data.resident=true, which makes a few fixed shapes")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._seed_everything(self.seed)

        train_entries = read_manifests(_as_list(dc.train_manifests))
        dev_entries = read_manifests(_as_list(dc.dev_manifests)) if _as_list(dc.get("dev_manifests")) else []
        if not train_entries:
            raise ValueError("the training manifests are empty")
        _check_audio_exists(dev_entries, "data.dev_manifests")

        resume_path = self._find_resume()
        ckpt = load_checkpoint(resume_path) if resume_path else None
        init_ckpt = None
        if ckpt is None and tc.get("init_from"):
            init_ckpt = load_checkpoint(resolve_checkpoint(str(tc.init_from)))

        from asr.tokenizer import Tokenizer

        source = ckpt or init_ckpt
        if source is not None:
            self.tokenizer = Tokenizer.from_bytes(source["tokenizer"])
        else:
            self.tokenizer = self.prepare_tokenizer(train_entries)
        if env.is_main:
            self.tokenizer.save(self.out_dir / TOKENIZER_FILE)

        model = self.build_model(self.tokenizer.vocab_size, source["config"] if source else None)
        if source is not None:
            model.load_state_dict(source["model"])
            if ckpt is None:
                log.info("initialised weights, CMVN and tokenizer from %s", tc.init_from)
        else:
            self.compute_cmvn(model, train_entries)
        model.to(self.device)
        model.activation_checkpointing = bool(tc.get("activation_checkpointing", False))
        if tc.get("compile", False):
            compile_model(model, tc.compile)
        self.model = model
        self.graphed_forward = (GraphedTrainForward(model, torch.bfloat16 if self.autocast_enabled else None)
                                if tc.get("cuda_graphs", False) else None)
        if env.is_main:
            log.info("model: %s, %.2fM parameters, vocabulary %d", model.config, model.num_parameters() / 1e6,
                     self.tokenizer.vocab_size)

        augment = AugmentConfig.from_dict(OmegaConf.to_container(dc.augment, resolve=True))  # type: ignore[arg-type]
        train_ds = ManifestDataset(train_entries, self.tokenizer, float(dc.min_duration), float(dc.max_duration),
                                   augment=augment, dither=float(dc.get("dither", 0.0)),
                                   features_on_device=bool(dc.get("features_on_device", False)))
        self.spec_augment = augment.spec_augment
        train_loader: Iterable[Batch]
        if dc.get("resident", False):
            train_loader = self._resident_batches(train_ds)
        else:
            self.train_sampler = BucketingBatchSampler(
                train_ds.durations, float(dc.max_batch_seconds), int(dc.num_buckets),
                int(dc.get("max_batch_size", 0) or 0), shuffle=True, seed=self.seed, rank=env.rank,
                world_size=env.world_size, shard_mode="drop",
            )
            train_loader = self._loader(train_ds, self.train_sampler, int(dc.num_workers))
        dev_loader = None
        if dev_entries:
            dev_ds = ManifestDataset(dev_entries, self.tokenizer, filter_ctc=False)
            dev_sampler = BucketingBatchSampler(
                dev_ds.durations, float(dc.get("dev_max_batch_seconds") or dc.max_batch_seconds), int(dc.num_buckets),
                shuffle=False, seed=self.seed, rank=env.rank, world_size=env.world_size, shard_mode="uneven",
            )
            dev_loader = self._loader(dev_ds, dev_sampler, int(dc.num_workers))

        # The lr schedule reads self.max_steps, so fitting it to a time budget (_fit_max_steps) moves
        # the end of the schedule too; a resumed run keeps the value its checkpoint fitted.
        self.max_steps_fitted = bool(ckpt is not None and ckpt.get("max_steps_fitted", False))
        self.max_steps = int(ckpt["max_steps"]) if self.max_steps_fitted else int(tc.max_steps)
        # fused (CPU and CUDA): one kernel for all parameters, and it honours ``found_inf`` (see _loop)
        self.optimizer = torch.optim.AdamW(
            model.param_groups(float(oc.weight_decay), float(oc.lr)), lr=float(oc.lr),
            betas=tuple(float(b) for b in oc.betas), eps=float(oc.eps), fused=True,
        )
        warmup, schedule, min_ratio = int(oc.warmup_steps), str(oc.schedule), float(oc.min_lr_ratio)
        lr_factor(0, warmup, self.max_steps, schedule, min_ratio)  # validate the schedule name early
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, warmup, self.max_steps, schedule, min_ratio)
        )

        ddp_model: torch.nn.Module = model
        if env.world_size > 1:
            ddp_model = DDP(model, device_ids=[self.device.index] if self.use_cuda else None,
                            find_unused_parameters=bool(tc.get("find_unused_parameters", False)))

        manager = CheckpointManager(self.ckpt_dir, int(tc.keep_last), int(tc.keep_best)) if env.is_main else None
        _barrier()  # rank 0 removed temporaries of an interrupted write before anyone reads the folder

        # Per-rank streams (dropout) differ; the model init above was identical on all ranks.
        self._seed_everything(self.seed + 1000003 * env.rank)
        if ckpt is not None:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            for group in self.optimizer.param_groups:  # checkpoints from before the fused optimizer
                group["fused"], group["foreach"] = True, None
            self.scheduler.load_state_dict(ckpt["scheduler"])
            self.train_sampler.load_state_dict(ckpt["sampler"])
            self.step = int(ckpt["step"])
            self.best_wer = ckpt.get("best_wer")
            self.skipped_steps = int(ckpt.get("skipped_steps", 0))
            rng = ckpt["rng"]
            if len(rng) == env.world_size:
                restore_rng_state(rng[env.rank])
            else:
                log.warning("checkpoint has RNG states of %d ranks, this run has %d: RNG streams not restored",
                            len(rng), env.world_size)
            log.info("resumed from %s at step %d (epoch %d, batch %d)", resume_path, self.step,
                     self.train_sampler.epoch, self.train_sampler.position)

        if env.is_main:
            OmegaConf.save(cfg, self.out_dir / "config_resolved.yaml", resolve=True)
            if tc.get("tensorboard", True):
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=self.step or None)

        result = self._loop(ddp_model, train_loader, dev_loader, manager)
        if self.writer is not None:
            self.writer.close()
        return result

    def _check_cuda_graphs(self) -> None:
        """Refuse, before any data is read, what trainer.cuda_graphs cannot do (asr.train.cuda_graphs)."""
        tc = self.cfg.trainer
        if not tc.get("cuda_graphs", False):
            return
        if self.device.type != "cuda":
            raise TrainConfigError("trainer.cuda_graphs needs a CUDA device (this run trains on the CPU)")
        if tc.get("compile", False) or tc.get("activation_checkpointing", False):
            raise TrainConfigError("trainer.cuda_graphs records the eager model: use it with trainer.compile=false "
                                   "and trainer.activation_checkpointing=false")
        if self.env.world_size > 1:
            # Tried (session 9, 2x H100): with the replayer wrapped in DDP, recording the first backward
            # failed (cudaErrorStreamCaptureImplicit: work on the legacy stream during the recording).
            raise TrainConfigError("trainer.cuda_graphs works on one GPU only for now (this run has "
                                   f"{self.env.world_size} processes)")

    # ------------------------------------------------------------------ the loop
    def _train_batches(self, loader: DataLoader) -> Iterator[Batch]:
        max_epochs = self.cfg.trainer.get("max_epochs")
        while True:
            if self.train_sampler.remaining() <= 0:
                self.train_sampler.set_epoch(self.train_sampler.epoch + 1)
            if max_epochs and self.train_sampler.epoch >= int(max_epochs):
                return
            for batch in loader:
                self.train_sampler.advance()
                yield batch

    def _checkpoint_state(self, wer: Optional[float]) -> dict:
        rng = _gather_objects(capture_rng_state())
        return {
            "config": self.model.config.to_dict(),
            "model": self.model.state_dict(),
            "tokenizer": self.tokenizer.to_bytes(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.train_sampler.state_dict(),
            "rng": rng,
            "step": self.step,
            "max_steps": self.max_steps,
            "max_steps_fitted": self.max_steps_fitted,
            "epoch": self.train_sampler.epoch,
            "best_wer": self.best_wer,
            "dev_wer": wer,
            "skipped_steps": self.skipped_steps,
            "world_size": self.env.world_size,
            "train_config": OmegaConf.to_yaml(self.cfg, resolve=True),
        }

    def _save(self, manager: Optional[CheckpointManager], wer: Optional[float]) -> None:
        state = self._checkpoint_state(wer)  # collective: every rank takes part
        if manager is not None:
            path = manager.save(state, self.step, wer)
            log.info("saved %s", path)
        _barrier()

    def validate(self, dev_loader: DataLoader) -> dict:
        # Compiled blocks would recompile for eval mode and no_grad; validation is short, run it eagerly.
        eager = torch.compiler.set_stance("force_eager") if self.cfg.trainer.get("compile", False) else contextlib.nullcontext()
        with eager:
            loss_sum, n, counts, _ = evaluate_model(self.model, dev_loader, self.tokenizer, self.device, self.autocast)
        t = torch.tensor([loss_sum, n] + counts.as_list(), dtype=torch.float64, device=self.device)
        _all_reduce(t)
        counts = ErrorCounts.from_list(t[2:].tolist())
        return {"dev/loss": float(t[0] / max(1.0, float(t[1]))), "dev/wer": counts.wer, "dev/cer": counts.cer,
                "dev/utterances": counts.utterances}

    def _save_before_failing(self, manager: Optional[CheckpointManager], what: str) -> None:
        """Save the weights trained so far before an error stops a single-process run (bad data, say),
        so fixing the cause and resuming loses nothing. Under DDP a save is collective and the other
        ranks may be elsewhere: the newest periodic checkpoint is what remains."""
        if manager is not None and self.env.world_size == 1 and self.step > 0:
            log.error("step %d: %s; saving a checkpoint before stopping", self.step, what)
            self._save(manager, None)

    def _validate_and_log(self, dev_loader: DataLoader, manager: Optional[CheckpointManager] = None) -> float:
        """Validate, update the best WER, log; returns this validation's WER.

        If validation itself fails (an unreadable dev file, say), the weights are saved first
        (:meth:`_save_before_failing`, with ``manager``)."""
        try:
            metrics = self.validate(dev_loader)
        except Exception:
            self._save_before_failing(manager, "validation failed")
            raise
        wer = metrics["dev/wer"]
        if self.best_wer is None or wer < self.best_wer:
            self.best_wer = wer
        self._log_metrics({"step": self.step, **metrics, "dev/best_wer": self.best_wer})
        if self.env.is_main:
            log.info("step %d dev loss %.4f WER %.2f%% CER %.2f%% (best WER %.2f%%)", self.step,
                     metrics["dev/loss"], 100 * wer, 100 * metrics["dev/cer"], 100 * self.best_wer)
        return wer

    def _count_skipped(self, skipped_window: torch.Tensor) -> None:
        """Move the device-side count of skipped updates into ``skipped_steps`` (a host sync, so only
        at logging and saving time) and say so when there were any."""
        n = int(skipped_window.item())
        if n:
            self.skipped_steps += n
            log.warning("step %d: %d update(s) skipped since the last log for a non-finite loss or "
                        "gradient (%d in all)", self.step, n, self.skipped_steps)
            skipped_window.zero_()

    def _stop_reason(self, deadline: float, signals: StopSignals) -> Optional[str]:
        """"deadline", "signal" or None. All ranks agree (a flag on any rank stops every rank), so
        none is left waiting in a collective."""
        flags = [float(time.monotonic() > deadline), float(signals.received is not None)]
        if dist.is_initialized():  # a CPU tensor (gloo): agreeing on it never waits for the GPU
            t = torch.tensor(flags)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flags = t.tolist()
        return "signal" if flags[1] else "deadline" if flags[0] else None

    def _fit_max_steps(self, steps_done: int, seconds: float, deadline: float) -> bool:
        """Set max_steps so the lr schedule ends at the wall-clock deadline (trainer.fit_max_steps);
        returns whether to fit again later (more than FIT_UNTIL_SECONDS_LEFT left).

        ``steps_done`` steps took ``seconds`` (measured after the first, compiling steps). A tenth of
        the time left is kept back for validation, checkpoints and the final save. Rank 0 decides
        both and broadcasts, so every rank runs the same number of steps and fits at the same steps.
        """
        left = max(0.0, deadline - time.monotonic())
        fitted = self.step + int(steps_done / max(seconds, 1e-9) * left * 0.9)
        value = torch.tensor([float(max(fitted, self.step + 1)), float(left > FIT_UNTIL_SECONDS_LEFT)],
                             device=self.device)
        if dist.is_initialized():
            dist.broadcast(value, src=0)
        old, self.max_steps, self.max_steps_fitted = self.max_steps, int(value[0].item()), True
        log.info("step %d: %.2f steps/s, %.0f s left: max_steps %d -> %d (lr schedule ends at the deadline)",
                 self.step, steps_done / max(seconds, 1e-9), left, old, self.max_steps)
        return bool(value[1].item())

    def _loop(self, ddp_model, train_loader, dev_loader, manager) -> dict:
        # Ctrl-C / SIGTERM: finish the step, save, stop; torchrun's forwarded copy of the terminal's
        # Ctrl-C (within the grace time) is not a second press.
        def announce(signum: int) -> None:
            log.warning("%s: finishing this step, saving a checkpoint, then stopping (send it again to abort)",
                        signal.Signals(signum).name)

        with StopSignals(grace_seconds=2.0, on_first=announce) as signals:
            return self._loop_until_stopped(ddp_model, train_loader, dev_loader, manager, signals)

    def _loop_until_stopped(self, ddp_model, train_loader, dev_loader, manager, signals: StopSignals) -> dict:
        tc = self.cfg.trainer
        env = self.env
        accum = max(1, int(tc.accumulate_grad_batches))
        clip = float(tc.grad_clip) if tc.grad_clip else 0.0
        pad_multiple = int(tc.get("pad_frames_multiple", 0) or 0)  # shapes for compiled code: pad_frames
        pad_batch = int(tc.get("pad_batch_multiple", 0) or 0)  # ... and pad_rows
        per_octave = int(tc.get("pad_per_octave", 0) or 0)  # ... both
        # CUDA graphs reuse their output memory: tell them each forward starts a new step (no output
        # of the previous one is read after it).
        cuda_graphs = tc.get("compile", False) in ("cudagraphs", "fixed") and self.device.type == "cuda"
        log_every, val_every, save_every = int(tc.log_every), int(tc.val_every), int(tc.save_every)
        params = [p for p in self.model.parameters() if p.requires_grad]
        forward = ddp_model if self.graphed_forward is None else self.graphed_forward
        if self.graphed_forward is not None:
            keep_grads_allocated(params)  # graphed backwards add into .grad, never hand over their buffer
        bar = None
        if env.is_main and tc.get("progress_bar", True):
            from tqdm.auto import tqdm

            bar = tqdm(total=self.max_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)

        # Window sums for logging: loss * utterances, utterances, audio seconds (all-reduced at log time).
        window = torch.zeros(3, dtype=torch.float64, device=self.device)
        window_start = time.perf_counter()
        window_steps = 0
        data_wait = 0.0  # seconds this window spent waiting for the DataLoader (input-bound if large)
        skipped_window = torch.zeros((), device=self.device)  # skipped updates not yet counted on the host
        last_saved = last_validated = -1
        last_wer: Optional[float] = None
        batches = self._train_batches(train_loader)
        exhausted = False
        if self.use_cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        # A wall-clock budget (e.g. a rented GPU for N minutes): stop cleanly, validate and save.
        max_minutes = float(tc.get("max_minutes") or 0)
        deadline = time.monotonic() + 60 * max_minutes if max_minutes > 0 else float("inf")
        # trainer.fit_max_steps: time steps [start+10, start+110) of this run (after the first
        # compilation and warm-up), fit max_steps to the deadline, then fit it again every
        # FIT_AGAIN_EVERY steps from the pace since the last fit: compiled code keeps compiling (CUDA
        # graphs record) for each new batch shape long after step 110, so a first fit alone ended one
        # run's schedule at a third of its time (session 7).
        fit = bool(tc.get("fit_max_steps", False)) and deadline != float("inf") and not self.max_steps_fitted
        fit_from, fit_to, fit_t0 = self.step + 10, self.step + 110, 0.0

        # trainer.profile_steps: torch.profiler over a window of these very steps (asr.train.profile)
        profiler = StepProfiler(tc.get("profile_steps"), self.out_dir, self.use_cuda) if env.is_main else None

        interrupted = False
        while self.step < self.max_steps and not exhausted:
            if profiler is not None:
                profiler.at_step(self.step)
            if fit and self.step == fit_from:
                fit_t0 = time.monotonic()
            elif fit and self.step == fit_to:
                now = time.monotonic()
                fit = self._fit_max_steps(fit_to - fit_from, now - fit_t0, deadline)
                # The next fit comes before the schedule can end: within half the steps it has left.
                fit_from, fit_t0 = self.step, now
                fit_to = self.step + min(FIT_AGAIN_EVERY, max(10, (self.max_steps - self.step) // 2))
                if bar is not None:
                    bar.total = self.max_steps
                if self.step >= self.max_steps:
                    break
            reason = self._stop_reason(deadline, signals)
            if reason == "deadline":
                log.info("step %d: trainer.max_minutes=%g reached, stopping", self.step, max_minutes)
                break
            if reason == "signal":
                interrupted = True
                break
            micro = []
            for _ in range(accum):
                try:
                    wait_start = time.perf_counter()
                    micro.append(next(batches))
                    data_wait += time.perf_counter() - wait_start
                except StopIteration:
                    exhausted = True
                    break
                except Exception:
                    if signals.received is None:
                        if last_saved != self.step:
                            self._save_before_failing(manager, "reading the next training batch failed")
                        raise
                    # Ctrl-C in a terminal also reaches the DataLoader workers, which then exit.
                    interrupted = True
                    break
            if interrupted or not micro:
                break
            loss_total = torch.zeros((), device=self.device)
            for i, batch in enumerate(micro):
                # CTC copies its lengths to the CPU anyway: hand it the batch's CPU ones (no GPU read).
                out_lens = self.model.output_lengths(batch.feature_lengths)
                target_lens = batch.target_lengths
                batch = batch.to(self.device).with_device_features(self.spec_augment)  # data.features_on_device
                last = i == len(micro) - 1
                sync = contextlib.nullcontext() if (last or env.world_size == 1) else ddp_model.no_sync()
                with sync:
                    if cuda_graphs:
                        torch.compiler.cudagraph_mark_step_begin()
                    features, feature_lens, targets, padded_out_lens, padded_target_lens = pad_rows(
                        pad_batch, pad_frames(batch.features, pad_multiple, per_octave), batch.feature_lengths,
                        batch.targets, out_lens, target_lens, per_octave=per_octave)
                    with self.autocast():
                        logits, _ = forward(features, feature_lens)
                    loss = ctc_loss(logits, padded_out_lens, targets, padded_target_lens, utterances=len(batch))
                    (loss / len(micro)).backward()
                loss_total = loss_total + loss.detach().float() / len(micro)
                window[0] += loss.detach().double() * len(batch)
                window[1] += len(batch)
                window[2] += sum(batch.durations)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
            found_inf = (~torch.isfinite(torch.stack([loss_total, grad_norm.float()])).all()).float()
            _all_reduce(found_inf, dist.ReduceOp.MAX if dist.is_initialized() else None)
            self.optimizer.found_inf = found_inf  # fused AdamW leaves weights and moments alone when 1
            self.optimizer.step()
            skipped_window += found_inf
            window.copy_(torch.where(found_inf > 0, torch.zeros_like(window), window))  # no NaN in the log
            self.optimizer.zero_grad(set_to_none=self.graphed_forward is None)
            self.scheduler.step()
            self.step += 1
            window_steps += 1
            if bar is not None:
                bar.update(1)

            if self.step % log_every == 0 or self.step == self.max_steps:
                self._count_skipped(skipped_window)
                w = _all_reduce(window.clone())
                elapsed = time.perf_counter() - window_start
                record = {
                    "step": self.step,
                    "train/loss": float(w[0] / w[1]) if w[1] > 0 else float("nan"),
                    "train/lr": self.scheduler.get_last_lr()[0],
                    "train/grad_norm": float(grad_norm),
                    "train/skipped_steps": self.skipped_steps,
                    "train/audio_sec_per_sec": float(w[2]) / max(elapsed, 1e-9),
                    "train/steps_per_sec": window_steps / max(elapsed, 1e-9),
                    "train/data_wait_frac": data_wait / max(elapsed, 1e-9),
                    "train/epoch": self.train_sampler.epoch,
                }
                if self.use_cuda:
                    record["train/peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
                self._log_metrics(record)
                if bar is not None:
                    bar.set_postfix(loss=f"{record['train/loss']:.3f}", lr=f"{record['train/lr']:.2e}")
                if env.is_main:
                    log.info("step %d loss %.4f lr %.3e grad_norm %.3f %.1f audio-s/s (%.0f%% waiting for data)",
                             self.step, record["train/loss"], record["train/lr"], record["train/grad_norm"],
                             record["train/audio_sec_per_sec"], 100 * record["train/data_wait_frac"])
                window.zero_()
                window_steps = 0
                data_wait = 0.0
                window_start = time.perf_counter()

            wer = None
            if dev_loader is not None and (self.step % val_every == 0 or self.step == self.max_steps):
                wer = last_wer = self._validate_and_log(dev_loader, manager)
                last_validated = self.step
            if self.step % save_every == 0:
                self._count_skipped(skipped_window)
                self._save(manager, wer)
                last_saved = self.step

        if bar is not None:
            bar.close()
        if profiler is not None:
            profiler.close(self.step)
        self._count_skipped(skipped_window)
        if interrupted:
            log.warning("step %d: interrupted; saving a checkpoint (resume=auto continues from it)", self.step)
        elif dev_loader is not None and last_validated != self.step and self.step > 0:
            last_wer = self._validate_and_log(dev_loader, manager)
        if last_saved != self.step and self.step > 0:
            self._save(manager, last_wer if dev_loader is not None else None)
        digest = state_digest(self.model)
        log.info("rank %d final weights sha256 %s", env.rank, digest)
        digests = _gather_objects(digest)
        if len(set(digests)) > 1:
            log.error("ranks hold different weights: %s", digests)
        summary = {"step": self.step, "best_wer": self.best_wer, "last_wer": last_wer,
                   "skipped_steps": self.skipped_steps, "weights_sha256": digest,
                   "interrupted_by": signal.Signals(signals.received).name if interrupted else None}
        if self.use_cuda:
            summary["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        if env.is_main:
            (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary
