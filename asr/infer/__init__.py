"""The inference engine: a trained model run by a backend chosen once (:mod:`asr.infer.engine`)."""
from asr.infer.engine import BACKENDS, InferenceEncoder, backend_for, default_backend

__all__ = ["BACKENDS", "InferenceEncoder", "backend_for", "default_backend"]
