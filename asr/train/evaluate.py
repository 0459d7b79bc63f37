"""Scoring a model on a loader of :class:`asr.data.dataset.Batch`: the dev WER of training and
``asr-eval``. Hypotheses come from the decoder transcription uses
(:func:`asr.decode.incremental.hypothesis_decoder`): greedy, CTC prefix beam search, or a lexicon
and language-model search, so a WER measured here is the WER ``asr-transcribe`` gets.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from asr.decode.incremental import hypothesis_decoder
from asr.model import CTCModel, ctc_loss
from asr.tokenizer import normalize_text
from asr.train.distributed import all_reduce
from asr.train.metrics import ErrorCounts, error_counts


@dataclass
class UtteranceResult:
    id: str
    ref: str
    hyp: str
    word_errors: int
    words: int


def decode_batch(logits: torch.Tensor, out_lens: torch.Tensor, tokenizer: Any, beam_size: int = 1,
                 lexicon: Any = None) -> list[str]:
    """Texts of a batch: ``logits`` [B, T, V] (float), ``out_lens`` [B] valid frames per row.

    Each row goes through its own :func:`hypothesis_decoder` (greedy for ``beam_size`` 1, prefix
    beam search above, the LM search with a ``lexicon``: :class:`asr.decode.lexicon.LexiconDecoder`);
    the log-softmax and, for greedy, the arg-max run batched on the model's device. Texts of the LM
    search are normalised (:func:`asr.tokenizer.normalize_text`) as the lexicon's words may not be."""
    best = logits.argmax(-1).cpu() if beam_size == 1 and lexicon is None else None
    log_probs, lengths = logits.log_softmax(-1).cpu(), out_lens.cpu().tolist()
    texts = []
    for b, n in enumerate(lengths):
        decoder = hypothesis_decoder(beam_size, tokenizer=tokenizer, lexicon=lexicon)
        decoder.accept(log_probs[b, :n], None if best is None else best[b, :n].tolist())
        text = tokenizer.decode(decoder.hypothesis()[0])
        texts.append(normalize_text(text) if lexicon is not None else text)
    return texts


@torch.no_grad()
def evaluate_model(
    model: CTCModel,
    loader: Any,
    tokenizer: Any,
    device: torch.device,
    autocast: Any = contextlib.nullcontext,
    beam_size: int = 1,
    keep_utterances: bool = False,
    lexicon: Any = None,
) -> tuple[float, int, ErrorCounts, list[UtteranceResult]]:
    """Decode a loader of :class:`Batch` and score it. Returns (summed CTC loss, utterances scored
    for loss, error counts, per-utterance results if ``keep_utterances``).

    ``beam_size`` 1 is greedy decoding (what validation uses); larger uses CTC prefix beam search;
    a ``lexicon`` (:class:`asr.decode.lexicon.LexiconDecoder`) runs its lexicon and LM search.
    """
    was_training = getattr(model, "training", False)  # an asr.infer.InferenceEncoder has no training mode
    if was_training:
        model.eval()
    loss_sum, n_loss = 0.0, 0
    counts = ErrorCounts()
    results: list[UtteranceResult] = []
    try:
        for batch in loader:
            batch = batch.to(device)
            with autocast():
                logits, out_lens = model(batch.features, batch.feature_lengths)
            logits = logits.float()
            if batch.targets is not None:
                loss_sum += float(ctc_loss(logits, out_lens, batch.targets, batch.target_lengths) * len(batch))
                n_loss += len(batch)
            hyps = decode_batch(logits, out_lens, tokenizer, beam_size, lexicon)
            refs = [normalize_text(t) for t in batch.texts]
            counts += error_counts(refs, hyps)
            if keep_utterances:
                for uid, r, h in zip(batch.ids, refs, hyps):
                    c = error_counts([r], [h])
                    results.append(UtteranceResult(uid, r, h, c.word_errors, c.words))
    finally:
        if was_training:
            model.train()
    return loss_sum, n_loss, counts, results


def validate(model: CTCModel, dev_loader: Any, tokenizer: Any, device: torch.device, autocast: Any,
             compiled: bool) -> dict:
    """Dev loss, WER and CER over every rank's share of ``dev_loader`` (all-reduced), greedy.

    ``compiled``: the model's blocks are compiled (``trainer.compile``); they would recompile for
    eval mode and no_grad, so validation, which is short, runs them eagerly."""
    eager = torch.compiler.set_stance("force_eager") if compiled else contextlib.nullcontext()
    with eager:
        loss_sum, n, counts, _ = evaluate_model(model, dev_loader, tokenizer, device, autocast)
    t = torch.tensor([loss_sum, n] + counts.as_list(), dtype=torch.float64, device=device)
    all_reduce(t)
    counts = ErrorCounts.from_list(t[2:].tolist())
    return {"dev/loss": float(t[0] / max(1.0, float(t[1]))), "dev/wer": counts.wer, "dev/cer": counts.cer,
            "dev/utterances": counts.utterances}
