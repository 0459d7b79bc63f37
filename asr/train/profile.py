"""Profile a window of real training steps (``trainer.profile_steps=[start,stop]``).

Why: ``tools/profile_train_step.py`` profiles one step on random features in an otherwise idle
process; in real training (four runs per host with their DataLoader workers) the step
was ~3x slower than there, and only a profile of the trainer's own steps, with its data, its
loader and its neighbours, can say where the difference goes. The window's table (torch.profiler's
key averages, by self device time on CUDA, else self CPU time) and its wall time per step go to
``profile.txt`` in the run folder; the run itself continues unchanged.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch.profiler import ProfilerActivity, profile

log = logging.getLogger(__name__)

PROFILE_FILE = "profile.txt"


class StepProfiler:
    """Profiles optimizer steps ``[start, stop)`` of this process; call :meth:`at_step` at the top of
    every step with the number of steps done, and :meth:`close` when the loop ends."""

    def __init__(self, window: Optional[Sequence[int]], out_dir: Path, use_cuda: bool, rows: int = 40) -> None:
        self.start, self.stop = (int(window[0]), int(window[1])) if window else (-1, -1)
        if window and not 0 <= self.start < self.stop:
            raise ValueError(f"trainer.profile_steps must be [start, stop) with 0 <= start < stop, not {list(window)}")
        self.out_dir, self.use_cuda, self.rows = Path(out_dir), use_cuda, rows
        self._prof: Optional[profile] = None
        self._t0 = 0.0
        self._first = 0

    def at_step(self, step: int) -> None:
        if self._prof is None and self.start <= step < self.stop:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.use_cuda else [])
            self._prof = profile(activities=activities)
            self._prof.__enter__()
            self._t0, self._first = time.perf_counter(), step
        elif self._prof is not None and step >= self.stop:
            self._finish(step)

    def close(self, step: int) -> None:
        """End a window the loop left early (deadline, signal, end of data)."""
        if self._prof is not None:
            self._finish(step)

    def _finish(self, step: int) -> None:
        if self.use_cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - self._t0
        prof, self._prof = self._prof, None
        assert prof is not None
        prof.__exit__(None, None, None)
        steps = max(1, step - self._first)
        events = prof.key_averages()
        sort = "self_device_time_total" if self.use_cuda else "self_cpu_time_total"
        launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
        header = (f"steps {self._first}-{step - 1} ({steps}), wall {wall:.3f} s, {1000 * wall / steps:.1f} ms per step"
                  + (f", {launches / steps:.0f} kernel launches per step" if self.use_cuda else "")
                  + f" (the profiler adds overhead of its own)\nsorted by {sort}\n\n")
        path = self.out_dir / PROFILE_FILE
        path.write_text(header + events.table(sort_by=sort, row_limit=self.rows) + "\n")
        log.info("profiled steps %d-%d: %.1f ms per step; table in %s", self._first, step - 1, 1000 * wall / steps, path)
