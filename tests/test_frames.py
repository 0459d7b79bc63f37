"""The frame contract (asr.frames) against the stages that must keep it: the feature extractor,
the model's subsampling, the streaming recognizer and the tokenizer's blank."""
import torch

from asr.features import StreamingFbank, compute_fbank
from asr.frames import (
    BLANK_ID,
    ENCODER_HOP,
    FRAME_SECONDS,
    SAMPLE_RATE,
    encoder_frames_for_features,
    encoder_frames_for_samples,
    feature_frames_for_samples,
)
from asr.model import CTCModel, ModelConfig
from asr.tokenizer import Tokenizer

LENGTHS = [0, 1, 399, 400, 401, 559, 560, 561, 639, 640, 1039, 1040, 1041, 4000, 16000, 16001]


def test_feature_frames_match_the_extractor():
    for n in LENGTHS:
        assert compute_fbank(torch.zeros(n)).shape[0] == feature_frames_for_samples(n), n


def test_encoder_frames_match_the_model_and_the_stream():
    torch.manual_seed(0)
    model = CTCModel(ModelConfig(vocab_size=8, d_model=32, n_layers=1, head_size=32, subsample_channels=8)).eval()
    for n in LENGTHS:
        feats = compute_fbank(torch.randn(n) * 0.1)
        expected = encoder_frames_for_samples(n)
        assert expected == encoder_frames_for_features(feats.shape[0])
        if feats.shape[0]:
            with torch.inference_mode():
                logits, lengths = model(feats[None], torch.tensor([feats.shape[0]]))
            assert int(lengths[0]) == logits.shape[1] == expected, n
        # streamed in 40 ms blocks, the frames come out as the audio arrives
        fbank, state, frames = StreamingFbank(), model.init_state(1), 0
        wave = torch.randn(n) * 0.1
        for pos in range(0, n, ENCODER_HOP):
            got = fbank.accept_waveform(wave[pos : pos + ENCODER_HOP])
            if got.shape[0]:
                with torch.inference_mode():
                    out, state = model.step(got[None], state)
                frames += out.shape[1]
            assert frames == encoder_frames_for_samples(min(n, pos + ENCODER_HOP)), (n, pos)


def test_frame_seconds_and_blank():
    assert FRAME_SECONDS * SAMPLE_RATE == ENCODER_HOP == 640
    tok = Tokenizer.train(["the cat sat on the mat"] * 50, model_prefix=None, vocab_size=32)
    assert tok.blank_id == BLANK_ID
    assert tok.decode([BLANK_ID]) == ""
    assert BLANK_ID not in tok.encode("the cat")
