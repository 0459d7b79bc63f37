"""A tiny model learns a few real utterances under CTC until greedy decoding returns their text:
the end-to-end check that features, model, loss, tokenizer, decoder and checkpoint loading fit."""
import torch
from conftest import read_test_manifest

from asr.audio import load_audio
from asr.decode.greedy import ctc_greedy
from asr.features import compute_fbank
from asr.model_file import load_for_inference


def test_tiny_model_overfits_real_utterances(overfit_checkpoint):
    # The fixture trains until greedy decoding of the padded batch returns every text; here the
    # saved checkpoint is reloaded and each file decoded on its own, as a user would.
    model, tokenizer = load_for_inference(overfit_checkpoint)
    for entry in read_test_manifest():
        feats = compute_fbank(load_audio(entry["audio"]))[None]
        with torch.no_grad():
            logits, lengths = model(feats, torch.tensor([feats.shape[1]]))
        tokens, _ = ctc_greedy(logits[0, : int(lengths[0])])
        assert tokenizer.decode(tokens) == entry["text"]
