"""rwkv-asr: streaming speech recognition with an RWKV-7 encoder and a CTC head.

    import asr
    model = asr.load_model()            # bundled model; or asr.load_model("ckpt.pt")
    print(model.transcribe("speech.flac").text)

``load_model``, ``ASRModel`` and ``TranscribeOptions`` are imported lazily (PEP 562), so ``import asr`` and
``asr --version`` stay fast and do not load torch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from asr.version import __version__

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names resolve in __getattr__
    from asr.api import ASRModel, TranscribeOptions, load_model
    from asr.transcript import Segment, Transcript, Word

__all__ = ["ASRModel", "Segment", "Transcript", "TranscribeOptions", "Word", "__version__", "load_model"]

_LAZY = {
    "load_model": "asr.api",
    "ASRModel": "asr.api",
    "TranscribeOptions": "asr.api",
    "Transcript": "asr.transcript",
    "Segment": "asr.transcript",
    "Word": "asr.transcript",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'asr' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
