"""Command-line entry points (asr-train, asr-eval, ...)."""
