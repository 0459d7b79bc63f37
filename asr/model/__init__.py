"""The acoustic model: causal subsampling, RWKV-7 blocks and a CTC head."""
from asr.model.ctc import BLANK, ctc_loss
from asr.model.encoder import FRAME_SHIFT_SECONDS, CTCModel, EncoderState, ModelConfig

__all__ = ["BLANK", "CTCModel", "EncoderState", "FRAME_SHIFT_SECONDS", "ModelConfig", "ctc_loss"]
