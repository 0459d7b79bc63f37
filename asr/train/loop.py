"""The training loop, top to bottom: batches in, optimizer steps out, with logging, validation,
checkpoints, a wall-clock budget and clean stops.

:class:`TrainLoop` takes its training batches from any iterator of :class:`asr.data.dataset.Batch`
and runs each micro-batch through a :class:`asr.train.step.TrainStep` (forward + CTC loss +
backward); the run's parts and services (model, optimizer, scheduler, saving, validating, logging)
come from the :class:`asr.train.trainer.Trainer` it is given.

* **Non-finite steps are skipped, not fatal.** After backward, one all-reduced flag says whether the
  loss and the gradient norm are finite on every rank; if not, all ranks drop the update together
  (a rank-local decision would desynchronise DDP) and the step is counted in ``skipped_steps``.
  The flag stays on the device: fused AdamW reads it (``found_inf``, as under a GradScaler) and
  skips the update itself, so the host does not wait for the backward pass; the CPU queues the next
  batch's forward while the GPU finishes this step.
* **Stops are clean.** Ctrl-C / SIGTERM, the end of ``trainer.max_minutes`` or the end of the data
  finish the step, validate when due, save a checkpoint and write ``summary.json``. Every rank
  agrees on stopping, so none is left waiting in a collective.
"""
from __future__ import annotations

import contextlib
import json
import logging
import signal
import time
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist

from asr.data.dataset import Batch
from asr.stop import StopSignals
from asr.train.distributed import all_reduce, all_reduce_max, broadcast, gather_objects
from asr.train.profile import StepProfiler
from asr.train.resume import state_digest
from asr.train.step import TrainStep

log = logging.getLogger("asr.train")

FIT_AGAIN_EVERY = 500  # steps between fits of trainer.fit_max_steps after the first (at most)
FIT_UNTIL_SECONDS_LEFT = 30.0  # no more fits this close to the deadline: the schedule is nearly done


class TrainLoop:
    """Train ``run`` (a :class:`asr.train.trainer.Trainer` with its parts built) from ``run.step`` to
    ``run.max_steps``; :meth:`run_loop` returns the summary (also written to ``summary.json``).

    ``batches``: the training batches (any iterator of :class:`Batch`; the trainer's walks the
    DataLoader epoch after epoch); ``step``: runs one micro-batch (forward, loss, backward)."""

    def __init__(self, run: Any, batches: Iterator[Batch], step: TrainStep, ddp_model: torch.nn.Module,
                 dev_loader: Any, manager: Any, signals: StopSignals):
        tc = run.cfg.trainer
        self.run, self.batches, self.train_step, self.ddp_model = run, batches, step, ddp_model
        self.dev_loader, self.manager, self.signals = dev_loader, manager, signals
        self.accum = max(1, int(tc.accumulate_grad_batches))  # micro-batches per optimizer step
        self.clip = float(tc.grad_clip) if tc.grad_clip else 0.0
        self.log_every, self.val_every, self.save_every = int(tc.log_every), int(tc.val_every), int(tc.save_every)
        self.params = [p for p in run.model.parameters() if p.requires_grad]
        # A wall-clock budget (e.g. a rented GPU for N minutes): stop cleanly, validate and save.
        self.max_minutes = float(tc.get("max_minutes") or 0)
        self.deadline = time.monotonic() + 60 * self.max_minutes if self.max_minutes > 0 else float("inf")
        fit = bool(tc.get("fit_max_steps", False)) and self.deadline != float("inf") and not run.max_steps_fitted
        self.fitter = ScheduleFitter(run, self.deadline) if fit else None
        # trainer.profile_steps: torch.profiler over a window of these very steps (asr.train.profile)
        self.profiler = StepProfiler(tc.get("profile_steps"), run.out_dir, run.use_cuda) if run.env.is_main else None
        self.bar = None
        if run.env.is_main and tc.get("progress_bar", True):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=run.max_steps, initial=run.step, desc="train", unit="step", dynamic_ncols=True)
        # Window sums for logging: loss * utterances, utterances, audio seconds (all-reduced at log time).
        self.window = torch.zeros(3, dtype=torch.float64, device=run.device)
        self.window_start, self.window_steps = time.perf_counter(), 0
        self.data_wait = 0.0  # seconds this window spent waiting for batches (input-bound if large)
        self.skipped_window = torch.zeros((), device=run.device)  # skipped updates not yet counted on the host
        self.last_saved = self.last_validated = -1
        self.last_wer: Optional[float] = None
        self.exhausted = self.interrupted = False

    def run_loop(self) -> dict:
        """Step until max_steps, the end of the data, the deadline or a stop signal; then
        :meth:`_finish`. Each step: micro-batches in, one optimizer update, then log, validate and
        save when due."""
        run = self.run
        if run.use_cuda:
            torch.cuda.reset_peak_memory_stats(run.device)
        while run.step < run.max_steps and not self.exhausted:
            if self.profiler is not None:
                self.profiler.at_step(run.step)
            if self.fitter is not None and self.fitter.at_step(self.bar):
                break  # the fitted schedule ends here
            reason = self._stop_reason()
            if reason == "deadline":
                log.info("step %d: trainer.max_minutes=%g reached, stopping", run.step, self.max_minutes)
                break
            if reason == "signal":
                self.interrupted = True
                break
            micro = self._next_micro_batches()
            if self.interrupted or not micro:
                break
            grad_norm = self._optimizer_step(micro)
            self._count_step()
            if run.step % self.log_every == 0 or run.step == run.max_steps:
                self._log_window(grad_norm)
            wer = None
            if self.dev_loader is not None and (run.step % self.val_every == 0 or run.step == run.max_steps):
                wer = self.last_wer = run.validate_and_log(self.dev_loader, self.manager)
                self.last_validated = run.step
            if run.step % self.save_every == 0:
                run.count_skipped(self.skipped_window)
                run.save(self.manager, wer)
                self.last_saved = run.step
        return self._finish()

    def _count_step(self) -> None:
        """Count the optimizer step just taken."""
        self.run.step += 1
        self.window_steps += 1
        if self.bar is not None:
            self.bar.update(1)

    def _next_micro_batches(self) -> list[Batch]:
        """Up to ``accum`` batches (fewer at the end of the data: ``exhausted``). A failing read
        saves the steps trained so far and raises, unless a stop signal caused it (Ctrl-C in a
        terminal also reaches the DataLoader workers, which then exit): then ``interrupted``."""
        micro: list[Batch] = []
        for _ in range(self.accum):
            try:
                wait_start = time.perf_counter()
                micro.append(next(self.batches))
                self.data_wait += time.perf_counter() - wait_start
            except StopIteration:
                self.exhausted = True
                break
            except Exception:
                if self.signals.received is None:
                    if self.last_saved != self.run.step:
                        self.run.save_before_failing(self.manager, "reading the next training batch failed")
                    raise
                self.interrupted = True
                break
        return micro

    def _optimizer_step(self, micro: list[Batch]) -> torch.Tensor:
        """Forward + backward of every micro-batch (DDP syncs gradients on the last), then clip and
        update unless any rank saw a non-finite loss or gradient; returns the gradient norm."""
        run, window = self.run, self.window
        loss_total = torch.zeros((), device=run.device)
        for i, batch in enumerate(micro):
            last = i == len(micro) - 1
            sync = contextlib.nullcontext() if (last or run.env.world_size == 1) else self.ddp_model.no_sync()
            with sync:
                loss = self.train_step(batch, len(micro))  # scalar, mean per utterance
            loss_total = loss_total + loss.float() / len(micro)
            window[0] += loss.double() * len(batch)
            window[1] += len(batch)
            window[2] += sum(batch.durations)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip if self.clip > 0 else float("inf"))
        found_inf = (~torch.isfinite(torch.stack([loss_total, grad_norm.float()])).all()).float()
        all_reduce(found_inf, dist.ReduceOp.MAX if dist.is_initialized() else None)
        run.optimizer.found_inf = found_inf  # fused AdamW leaves weights and moments alone when 1
        run.optimizer.step()
        self.skipped_window += found_inf
        window.copy_(torch.where(found_inf > 0, torch.zeros_like(window), window))  # no NaN in the log
        # Graphed backwards add into .grad and must keep its buffers (asr.train.cuda_graphs).
        run.optimizer.zero_grad(set_to_none=run.graphed_forward is None)
        run.scheduler.step()
        return grad_norm

    def _log_window(self, grad_norm: torch.Tensor) -> None:
        """Log the window since the last log (all ranks' sums) and start a new one."""
        run = self.run
        run.count_skipped(self.skipped_window)
        w = all_reduce(self.window.clone())
        elapsed = max(time.perf_counter() - self.window_start, 1e-9)
        record = {
            "step": run.step,
            "train/loss": float(w[0] / w[1]) if w[1] > 0 else float("nan"),
            "train/lr": run.scheduler.get_last_lr()[0],
            "train/grad_norm": float(grad_norm),
            "train/skipped_steps": run.skipped_steps,
            "train/audio_sec_per_sec": float(w[2]) / elapsed,
            "train/steps_per_sec": self.window_steps / elapsed,
            "train/data_wait_frac": self.data_wait / elapsed,
            "train/epoch": run.train_sampler.epoch,
        }
        if run.use_cuda:
            record["train/peak_mem_gib"] = torch.cuda.max_memory_allocated(run.device) / 2**30
        run.log_metrics(record)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['train/loss']:.3f}", lr=f"{record['train/lr']:.2e}")
        if run.env.is_main:
            log.info("step %d loss %.4f lr %.3e grad_norm %.3f %.1f audio-s/s (%.0f%% waiting for data)",
                     run.step, record["train/loss"], record["train/lr"], record["train/grad_norm"],
                     record["train/audio_sec_per_sec"], 100 * record["train/data_wait_frac"])
        self.window.zero_()
        self.window_steps, self.data_wait, self.window_start = 0, 0.0, time.perf_counter()

    def _stop_reason(self) -> Optional[str]:
        """"deadline", "signal" or None. All ranks agree (a flag on any rank stops every rank), so
        none is left waiting in a collective."""
        flags = [float(time.monotonic() > self.deadline), float(self.signals.received is not None)]
        if dist.is_initialized():  # a CPU tensor (gloo): agreeing on it never waits for the GPU
            flags = all_reduce_max(torch.tensor(flags)).tolist()
        return "signal" if flags[1] else "deadline" if flags[0] else None

    def _finish(self) -> dict:
        """After the last step: validate and save unless just done, check the ranks agree on the
        weights, write ``summary.json``."""
        run = self.run
        if self.bar is not None:
            self.bar.close()
        if self.profiler is not None:
            self.profiler.close(run.step)
        run.count_skipped(self.skipped_window)
        if self.interrupted:
            log.warning("step %d: interrupted; saving a checkpoint (resume=auto continues from it)", run.step)
        elif self.dev_loader is not None and self.last_validated != run.step and run.step > 0:
            self.last_wer = run.validate_and_log(self.dev_loader, self.manager)
        if self.last_saved != run.step and run.step > 0:
            run.save(self.manager, self.last_wer if self.dev_loader is not None else None)
        digest = state_digest(run.model)
        log.info("rank %d final weights sha256 %s", run.env.rank, digest)
        digests = gather_objects(digest)
        if len(set(digests)) > 1:
            log.error("ranks hold different weights: %s", digests)
        summary = {"step": run.step, "best_wer": run.best_wer, "last_wer": self.last_wer,
                   "skipped_steps": run.skipped_steps, "weights_sha256": digest,
                   "interrupted_by": signal.Signals(self.signals.received).name if self.interrupted else None}
        if run.use_cuda:
            summary["peak_mem_gib"] = torch.cuda.max_memory_allocated(run.device) / 2**30
        if run.env.is_main:
            (run.out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary


class ScheduleFitter:
    """``trainer.fit_max_steps``: set ``run.max_steps`` so the lr schedule ends at the wall-clock
    ``deadline``. Steps [start+10, start+110) of this run are timed (after the first compilation
    and warm-up) and max_steps fitted to them; then it is fitted again every ``FIT_AGAIN_EVERY``
    steps from the pace since the last fit, as compiled code keeps compiling (CUDA graphs record)
    for each new batch shape long after the first steps."""

    def __init__(self, run: Any, deadline: float):
        self.run, self.deadline = run, deadline
        self.fit_from, self.fit_to, self.t0 = run.step + 10, run.step + 110, 0.0
        self.active = True

    def at_step(self, bar: Any) -> bool:
        """Call at the top of every step; returns True when a fit ends the schedule here."""
        run = self.run
        if not self.active:
            return False
        if run.step == self.fit_from:
            self.t0 = time.monotonic()
        elif run.step == self.fit_to:
            now = time.monotonic()
            self.active = self._fit(self.fit_to - self.fit_from, now - self.t0)
            # The next fit comes before the schedule can end: within half the steps it has left.
            self.fit_from, self.t0 = run.step, now
            self.fit_to = run.step + min(FIT_AGAIN_EVERY, max(10, (run.max_steps - run.step) // 2))
            if bar is not None:
                bar.total = run.max_steps
            return run.step >= run.max_steps
        return False

    def _fit(self, steps_done: int, seconds: float) -> bool:
        """Fit max_steps to ``steps_done`` steps in ``seconds``; returns whether to fit again later
        (more than FIT_UNTIL_SECONDS_LEFT left). A tenth of the time left is kept back for
        validation, checkpoints and the final save. Rank 0 decides both and broadcasts, so every
        rank runs the same number of steps and fits at the same steps."""
        run = self.run
        left = max(0.0, self.deadline - time.monotonic())
        fitted = run.step + int(steps_done / max(seconds, 1e-9) * left * 0.9)
        value = torch.tensor([float(max(fitted, run.step + 1)), float(left > FIT_UNTIL_SECONDS_LEFT)],
                             device=run.device)
        broadcast(value, src=0)
        old, run.max_steps, run.max_steps_fitted = run.max_steps, int(value[0].item()), True
        log.info("step %d: %.2f steps/s, %.0f s left: max_steps %d -> %d (lr schedule ends at the deadline)",
                 run.step, steps_done / max(seconds, 1e-9), left, old, run.max_steps)
        return bool(value[1].item())
