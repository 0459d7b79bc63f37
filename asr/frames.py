"""The audio and frame contract every stage shares, and the CTC blank id.

    16 kHz samples --(400-sample window, hop 160)--> 10 ms feature frames
                   --(causal x4 subsampling)------> 40 ms encoder frames --> CTC logits (blank = id 0)

Feature frames follow Kaldi's ``snip_edges``: only whole 400-sample windows, so ``N`` samples give
``0`` frames if ``N < 400`` else ``1 + (N - 400) // 160``. The subsampling (two stride-2
convolutions, each rounding up) turns ``F`` feature frames into ``ceil(F / 4)`` encoder frames;
encoder frame ``j`` covers the audio ``[0.04 j, 0.04 (j + 1))`` s and has seen feature frames up to
``4 j``. Times in seconds are encoder-frame indices times :data:`FRAME_SECONDS`.

Every module takes these numbers from here; none restates them.
"""
from __future__ import annotations

__all__ = [
    "BLANK_ID",
    "ENCODER_HOP",
    "FEATURES_PER_FRAME",
    "FEATURE_HOP",
    "FEATURE_WINDOW",
    "FRAME_SECONDS",
    "SAMPLE_RATE",
    "encoder_frames_for_features",
    "encoder_frames_for_samples",
    "feature_frames_for_samples",
]

#: Samples per second of every waveform past the resampler.
SAMPLE_RATE = 16000
#: Samples one feature frame reads (25 ms).
FEATURE_WINDOW = 400
#: Samples between the starts of two feature frames (10 ms).
FEATURE_HOP = 160
#: Feature frames per encoder frame: the subsampling factor.
FEATURES_PER_FRAME = 4
#: Samples per encoder frame (40 ms): the block size of frame-by-frame streaming.
ENCODER_HOP = FEATURE_HOP * FEATURES_PER_FRAME
#: Seconds per encoder frame (the model's output frame rate).
FRAME_SECONDS = ENCODER_HOP / SAMPLE_RATE
#: The CTC blank: id 0 of the model's output and of the tokenizer's vocabulary.
BLANK_ID = 0


def feature_frames_for_samples(num_samples: int) -> int:
    """Feature frames of ``num_samples`` samples (whole 400-sample windows only)."""
    if num_samples < FEATURE_WINDOW:
        return 0
    return 1 + (num_samples - FEATURE_WINDOW) // FEATURE_HOP


def encoder_frames_for_features(num_features: int) -> int:
    """Encoder frames the causal x4 subsampling makes of ``num_features`` feature frames."""
    return -(-max(0, num_features) // FEATURES_PER_FRAME)


def encoder_frames_for_samples(num_samples: int) -> int:
    """Encoder frames (40 ms) of ``num_samples`` 16 kHz samples, fed at once or in any blocks."""
    return encoder_frames_for_features(feature_frames_for_samples(num_samples))
