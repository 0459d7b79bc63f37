"""CTC loss with blank = 0, on the encoder's logits."""
from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor

from asr.frames import BLANK_ID


def ctc_loss(
    logits: Tensor, out_lengths: Tensor, targets: Tensor, target_lengths: Tensor, utterances: Optional[int] = None
) -> Tensor:
    """Mean over utterances of the per-utterance CTC loss (summed over its frames).

    logits [B, T, V] (any float dtype; the loss runs in float32), targets [B, S] padded or 1-D
    concatenated. ``zero_infinity`` turns impossible alignments (target longer than the output)
    into a zero loss instead of an inf that would poison the step. ``utterances``: how many rows
    are real (default all B); rows of output length 0 and target length 0 cost exactly 0 and count
    only when included here (the trainer's ``pad_batch_multiple`` rows).
    """
    log_probs = logits.float().log_softmax(dim=-1).transpose(0, 1)  # [T, B, V]
    loss = F.ctc_loss(
        log_probs,
        targets,
        out_lengths,
        target_lengths,
        blank=BLANK_ID,
        reduction="sum",
        zero_infinity=True,
    )
    return loss / (logits.shape[0] if utterances is None else utterances)
