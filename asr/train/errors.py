"""Errors of the training stack that ``asr-train`` reports in one line (see :mod:`asr.cli.train`)."""
from __future__ import annotations


class TrainConfigError(ValueError):
    """Settings that cannot work together; asr-train reports it in one line."""
