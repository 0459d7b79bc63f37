"""One training run: :class:`Trainer` builds the run's parts from a composed Hydra config
(``conf/``; :mod:`asr.cli.train` is the entry point), resumes it, and hands it to the loop.

Where each job lives:

* :mod:`asr.train.build`: manifests, tokenizer, model, CMVN, data loaders, optimizer, lr schedule;
* :mod:`asr.train.loop`: the loop (logging, validation, checkpoints, budget, clean stops);
* :mod:`asr.train.step`: forward + CTC loss + backward of one micro-batch;
* :mod:`asr.train.distributed`: torchrun's environment and the collectives;
* :mod:`asr.train.compile` and :mod:`asr.train.cuda_graphs`: ``trainer.compile``, ``trainer.cuda_graphs``;
* :mod:`asr.train.padding`: few batch shapes for compiled code;
* :mod:`asr.train.resume` and :mod:`asr.train.checkpoint`: exact resume, checkpoint files and retention;
* :mod:`asr.train.evaluate`: dev loss and WER with the decoder transcription uses.

tests/test_train.py checks the contracts: exact resume (bit-identical on CPU), skipped non-finite
steps, DDP ranks ending with identical weights, clean stops that lose nothing.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import signal
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from asr.data.dataset import Batch
from asr.model import CTCModel
from asr.model_file import load_checkpoint, resolve_checkpoint
from asr.stop import StopSignals
from asr.train import build
from asr.train.build import TOKENIZER_FILE, lr_factor
from asr.train.checkpoint import CheckpointManager, capture_rng_state
from asr.train.compile import check_activation_checkpointing, check_cuda_graphs, check_fixed_shapes, compile_model
from asr.train.cuda_graphs import GraphedTrainForward, keep_grads_allocated
from asr.train.distributed import DistEnv, barrier, gather_objects, init_distributed
from asr.train.errors import TrainConfigError
from asr.train.evaluate import evaluate_model, validate
from asr.train.loop import TrainLoop
from asr.train.padding import check_per_octave, pad_frames, pad_rows, padded_size
from asr.train.resume import find_resume, restore_training_state, state_digest
from asr.train.step import EagerTrainStep, TrainStep

# The trainer's helpers that callers have imported from here; their homes are the modules above.
__all__ = ["Trainer", "TrainConfigError", "init_distributed", "compile_model", "evaluate_model", "lr_factor",
           "state_digest", "pad_frames", "pad_rows", "padded_size", "check_per_octave"]

log = logging.getLogger("asr.train")


class Trainer:
    """One training run. ``Trainer(cfg, out_dir).fit()``; see conf/ for every option."""

    def __init__(self, cfg: DictConfig, out_dir: str | os.PathLike) -> None:
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        tc = cfg.trainer
        self.env: DistEnv = init_distributed(str(tc.device))
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

    def log_metrics(self, record: dict) -> None:
        """Append ``record`` to metrics.jsonl and TensorBoard (rank 0 only)."""
        if not self.env.is_main:
            return
        with open(self.metrics_file, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.writer.add_scalar(k, v, record["step"])

    # ------------------------------------------------------------------ main entry
    def fit(self) -> dict:
        """Build, resume, train; returns the loop's summary (also in ``summary.json``)."""
        tc = self.cfg.trainer
        check_activation_checkpointing(tc)
        self._check_cuda_graphs()
        check_per_octave(int(tc.get("pad_per_octave", 0) or 0))
        check_fixed_shapes(tc, self.cfg.data)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._seed_everything(self.seed)

        train_entries, dev_entries = build.read_data(self.cfg.data)
        resume_path = find_resume(tc.get("resume", "auto"), self.ckpt_dir)
        ckpt = load_checkpoint(resume_path) if resume_path else None
        self._build_model(train_entries, ckpt)
        pin = self.use_cuda and self.graphed_forward is None  # see build.make_loader
        train_loader, self.train_sampler, self.spec_augment = build.build_train_data(
            train_entries, self.tokenizer, self.cfg.data, self.seed, self.env, pin)
        dev_loader = build.build_dev_loader(dev_entries, self.tokenizer, self.cfg.data, self.seed, self.env, pin)
        ddp_model = self._build_optimization(ckpt)
        manager = CheckpointManager(self.ckpt_dir, int(tc.keep_last), int(tc.keep_best)) if self.env.is_main else None
        barrier()  # rank 0 removed temporaries of an interrupted write before anyone reads the folder

        # Per-rank streams (dropout) differ; the model init above was identical on all ranks.
        self._seed_everything(self.seed + 1000003 * self.env.rank)
        if ckpt is not None:
            self._resume(ckpt, resume_path)
        self._open_logs()

        result = self._loop(ddp_model, train_loader, dev_loader, manager)
        if self.writer is not None:
            self.writer.close()
        return result

    def _build_model(self, train_entries: list[dict], ckpt: Optional[dict]) -> None:
        """Tokenizer and model: from the checkpoint resumed, else from ``trainer.init_from``, else
        new (a tokenizer trained or reused, CMVN computed); then device, compile, CUDA graphs."""
        from asr.tokenizer import Tokenizer

        tc = self.cfg.trainer
        init_ckpt = None
        if ckpt is None and tc.get("init_from"):
            init_ckpt = load_checkpoint(resolve_checkpoint(str(tc.init_from)))
        source = ckpt or init_ckpt
        if source is not None:
            self.tokenizer = Tokenizer.from_bytes(source["tokenizer"])
        else:
            self.tokenizer = build.prepare_tokenizer(self.cfg.tokenizer, train_entries, self.env)
        if self.env.is_main:
            self.tokenizer.save(self.out_dir / TOKENIZER_FILE)

        model = build.build_model(self.cfg.model, self.tokenizer.vocab_size, source["config"] if source else None,
                                  self.seed, warn=self.env.is_main)
        if source is not None:
            model.load_state_dict(source["model"])
            if ckpt is None:
                log.info("initialised weights, CMVN and tokenizer from %s", tc.init_from)
        else:
            build.compute_cmvn(model, train_entries, self.cfg.data, self.seed, self.env)
        model.to(self.device)
        model.activation_checkpointing = bool(tc.get("activation_checkpointing", False))
        if tc.get("compile", False):
            compile_model(model, tc.compile)
        self.model: CTCModel = model
        self.graphed_forward = (GraphedTrainForward(model, torch.bfloat16 if self.autocast_enabled else None)
                                if tc.get("cuda_graphs", False) else None)
        if self.env.is_main:
            log.info("model: %s, %.2fM parameters, vocabulary %d", model.config, model.num_parameters() / 1e6,
                     self.tokenizer.vocab_size)

    def _build_optimization(self, ckpt: Optional[dict]) -> torch.nn.Module:
        """max_steps, optimizer and lr schedule; returns the model to train through (DDP's wrapper
        with several ranks)."""
        tc = self.cfg.trainer
        # The lr schedule reads self.max_steps, so fitting it to a time budget (asr.train.loop's
        # ScheduleFitter) moves the end of the schedule too; a resumed run keeps the value its
        # checkpoint fitted.
        self.max_steps_fitted = bool(ckpt is not None and ckpt.get("max_steps_fitted", False))
        self.max_steps = int(ckpt["max_steps"]) if self.max_steps_fitted else int(tc.max_steps)
        self.optimizer = build.build_optimizer(self.model, self.cfg.optim)
        self.scheduler = build.build_scheduler(self.optimizer, self.cfg.optim, lambda: self.max_steps)
        if self.env.world_size == 1:
            return self.model
        return DDP(self.model, device_ids=[self.device.index] if self.use_cuda else None,
                   find_unused_parameters=bool(tc.get("find_unused_parameters", False)))

    def _resume(self, ckpt: dict, path: Optional[Path]) -> None:
        """Continue the run ``ckpt`` (loaded from ``path``) saved: step, counters, optimizer,
        schedule, sampler position and RNG streams."""
        restore_training_state(ckpt, self.optimizer, self.scheduler, self.train_sampler,
                               self.env.rank, self.env.world_size)
        self.step = int(ckpt["step"])
        self.best_wer = ckpt.get("best_wer")
        self.skipped_steps = int(ckpt.get("skipped_steps", 0))
        log.info("resumed from %s at step %d (epoch %d, batch %d)", path, self.step,
                 self.train_sampler.epoch, self.train_sampler.position)

    def _open_logs(self) -> None:
        """The resolved config and TensorBoard (rank 0)."""
        if not self.env.is_main:
            return
        OmegaConf.save(self.cfg, self.out_dir / "config_resolved.yaml", resolve=True)
        if self.cfg.trainer.get("tensorboard", True):
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=self.step or None)

    def _check_cuda_graphs(self) -> None:
        check_cuda_graphs(self.cfg.trainer, self.device, self.env.world_size)

    # ------------------------------------------------------------------ the loop
    def train_batches(self, loader: DataLoader) -> Iterator[Batch]:
        """The training batches, epoch after epoch (``trainer.max_epochs``: until that many), with
        the sampler's position advanced per batch (checkpoints resume from it)."""
        max_epochs = self.cfg.trainer.get("max_epochs")
        while True:
            if self.train_sampler.remaining() <= 0:
                self.train_sampler.set_epoch(self.train_sampler.epoch + 1)
            if max_epochs and self.train_sampler.epoch >= int(max_epochs):
                return
            for batch in loader:
                self.train_sampler.advance()
                yield batch

    def make_step(self, ddp_model: torch.nn.Module) -> TrainStep:
        """The micro-batch step the loop runs: :class:`EagerTrainStep` through ``ddp_model`` or the
        CUDA-graph replayer, with the ``trainer.pad_*`` shapes."""
        tc = self.cfg.trainer
        forward = ddp_model if self.graphed_forward is None else self.graphed_forward
        if self.graphed_forward is not None:
            keep_grads_allocated([p for p in self.model.parameters() if p.requires_grad])
        return EagerTrainStep(
            self.model, forward, self.device, self.autocast, self.spec_augment,
            pad_multiple=int(tc.get("pad_frames_multiple", 0) or 0),
            pad_batch=int(tc.get("pad_batch_multiple", 0) or 0), per_octave=int(tc.get("pad_per_octave", 0) or 0),
            cuda_graphs=tc.get("compile", False) in ("cudagraphs", "fixed") and self.device.type == "cuda")

    def _loop(self, ddp_model, train_loader, dev_loader, manager) -> dict:
        # Ctrl-C / SIGTERM: finish the step, save, stop; torchrun's forwarded copy of the terminal's
        # Ctrl-C (within the grace time) is not a second press.
        def announce(signum: int) -> None:
            log.warning("%s: finishing this step, saving a checkpoint, then stopping (send it again to abort)",
                        signal.Signals(signum).name)

        with StopSignals(grace_seconds=2.0, on_first=announce) as signals:
            step = self.make_step(ddp_model)
            loop = TrainLoop(self, self.train_batches(train_loader), step, ddp_model, dev_loader, manager, signals)
            return loop.run_loop()

    # ------------------------------------------------------------------ services the loop calls
    def checkpoint_state(self, wer: Optional[float]) -> dict:
        """Everything a resumed run needs (collective: every rank's RNG state is gathered)."""
        rng = gather_objects(capture_rng_state())
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

    def save(self, manager: Optional[CheckpointManager], wer: Optional[float]) -> None:
        """Save a checkpoint (rank 0 writes; collective)."""
        state = self.checkpoint_state(wer)
        if manager is not None:
            path = manager.save(state, self.step, wer)
            log.info("saved %s", path)
        barrier()

    def validate(self, dev_loader: DataLoader) -> dict:
        return validate(self.model, dev_loader, self.tokenizer, self.device, self.autocast,
                        compiled=bool(self.cfg.trainer.get("compile", False)))

    def save_before_failing(self, manager: Optional[CheckpointManager], what: str) -> None:
        """Save the weights trained so far before an error stops a single-process run (bad data, say),
        so fixing the cause and resuming loses nothing. Under DDP a save is collective and the other
        ranks may be elsewhere: the newest periodic checkpoint is what remains."""
        if manager is not None and self.env.world_size == 1 and self.step > 0:
            log.error("step %d: %s; saving a checkpoint before stopping", self.step, what)
            self.save(manager, None)

    def validate_and_log(self, dev_loader: DataLoader, manager: Optional[CheckpointManager] = None) -> float:
        """Validate, update the best WER, log; returns this validation's WER.

        If validation itself fails (an unreadable dev file, say), the weights are saved first
        (:meth:`save_before_failing`, with ``manager``)."""
        try:
            metrics = self.validate(dev_loader)
        except Exception:
            self.save_before_failing(manager, "validation failed")
            raise
        wer = metrics["dev/wer"]
        if self.best_wer is None or wer < self.best_wer:
            self.best_wer = wer
        self.log_metrics({"step": self.step, **metrics, "dev/best_wer": self.best_wer})
        if self.env.is_main:
            log.info("step %d dev loss %.4f WER %.2f%% CER %.2f%% (best WER %.2f%%)", self.step,
                     metrics["dev/loss"], 100 * wer, 100 * metrics["dev/cer"], 100 * self.best_wer)
        return wer

    def count_skipped(self, skipped_window: torch.Tensor) -> None:
        """Move the device-side count of skipped updates into ``skipped_steps`` (a host sync, so only
        at logging and saving time) and say so when there were any."""
        n = int(skipped_window.item())
        if n:
            self.skipped_steps += n
            log.warning("step %d: %d update(s) skipped since the last log for a non-finite loss or "
                        "gradient (%d in all)", self.step, n, self.skipped_steps)
            skipped_window.zero_()
