"""Training: the Hydra-driven trainer, checkpoints (atomic, resumable) and error-rate metrics.

Import submodules directly (``asr.train.checkpoint``, ``asr.train.trainer``; the trainer's
docstring lists the module of each job); this package initialiser stays empty so
``load_for_inference`` does not pull in the trainer's dependencies.
"""
