"""``asr-train``: the Hydra entry point for training (also ``python -m asr.cli.train``).

    asr-train recipe=real model=tiny trainer.max_steps=2000
    asr-train data.train_manifests=[a.jsonl] data.dev_manifests=[b.jsonl] optim.lr=2e-3
    asr-train -m recipe=real optim.lr=1e-3,2e-3          # a sweep, one sub-folder per job
    torchrun --nproc_per_node 8 -m asr.cli.train recipe=librispeech model=default

Configs come from ``conf/`` at the repository root (found from this file, so an editable install
works from any folder), else ``conf/`` in the current folder; ``--config-dir`` adds another.
Hydra's output folder receives the resolved config, the logs (one file per rank), checkpoints,
TensorBoard events and ``metrics.jsonl``.

Under torchrun every rank runs Hydra; they must agree on the output folder, whose default name
contains a time stamp. So the process group is joined *before* Hydra starts and rank 0's time
stamp is broadcast (the ``asr_stamp`` resolver); only rank 0 writes Hydra's ``.hydra/`` files.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf

_STAMP: Optional[str] = None


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _stamp() -> str:
    """The run's time stamp, identical on all ranks (see module docstring)."""
    global _STAMP
    if _STAMP is None:
        _STAMP = time.strftime("%Y-%m-%d_%H-%M-%S")
    return _STAMP


def register_resolvers() -> None:
    """``${asr_stamp:}`` (run time stamp shared by ranks) and ``${asr_rank_suffix:}`` ("" on rank 0,
    "_rank<N>" elsewhere, for per-rank log files)."""
    OmegaConf.register_new_resolver("asr_stamp", _stamp, replace=True)
    OmegaConf.register_new_resolver(
        "asr_rank_suffix", lambda: "" if _rank() == 0 else f"_rank{_rank()}", replace=True
    )


register_resolvers()


def config_dir() -> Optional[str]:
    """``<repo>/conf`` next to the installed package, else ``./conf``; None lets ``--config-dir`` decide."""
    candidates = [Path(__file__).resolve().parents[2] / "conf", Path.cwd() / "conf"]
    for c in candidates:
        if (c / "config.yaml").is_file():
            return str(c)
    return None


def _share_stamp_across_ranks() -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    import torch.distributed as dist

    from asr.train.distributed import init_distributed

    init_distributed("auto")
    holder = [_stamp()]
    dist.broadcast_object_list(holder, src=0)
    global _STAMP
    _STAMP = holder[0]


_INTERRUPTED: list[str] = []  # signal names of runs stopped by Ctrl-C / SIGTERM (exit code 128 + n)


def _task(cfg: DictConfig) -> Optional[float]:
    from hydra.core.hydra_config import HydraConfig

    from asr.train.errors import TrainConfigError
    from asr.train.trainer import Trainer

    if _rank() != 0:  # one console is enough; every rank still writes its own log file
        for h in logging.getLogger().handlers:
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                h.setLevel(logging.WARNING)
    from asr.audio import AudioError
    from asr.data.manifest import ManifestError
    from asr.model_file import CheckpointError

    out_dir = HydraConfig.get().runtime.output_dir
    try:
        summary = Trainer(cfg, out_dir).fit()
    except (AudioError, ManifestError, CheckpointError, TrainConfigError) as err:
        # Bad data, a bad checkpoint or settings that cannot work together: one line, not a
        # traceback. An error raised in a DataLoader worker arrives with the worker's traceback in
        # its message; its last line is the error.
        lines = [line for line in str(err).splitlines() if line.strip()]
        sys.exit(f"asr-train: error: {lines[-1].strip() if lines else type(err).__name__}")
    if summary.get("interrupted_by"):
        _INTERRUPTED.append(summary["interrupted_by"])
    # Sweepers (e.g. Optuna) minimise the return value: the best dev WER.
    return summary.get("best_wer")


def main() -> None:
    """Console-script entry point."""
    import hydra

    _share_stamp_across_ranks()
    if _rank() != 0 and not any(a.startswith("hydra.output_subdir") for a in sys.argv[1:]):
        sys.argv.append("hydra.output_subdir=null")
    cdir = config_dir()
    if cdir is None and not any(a.startswith(("--config-dir", "-cd")) for a in sys.argv[1:]):
        sys.exit("asr-train: no conf/config.yaml found next to the package or in the current folder; "
                 "pass --config-dir DIR")
    try:
        hydra.main(config_path=cdir, config_name="config", version_base="1.3")(_task)()
        _wait_for_every_rank()
        if _INTERRUPTED:  # the checkpoint is saved; say so in the exit code, as an interrupted program does
            sys.exit(128 + int(getattr(signal, _INTERRUPTED[-1])))
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _wait_for_every_rank() -> None:
    """After a run that ended normally, wait until every rank has too, so that no rank tears the
    process group down while another still talks to it (torchrun then saw rank 0 abort at exit)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


if __name__ == "__main__":
    main()
