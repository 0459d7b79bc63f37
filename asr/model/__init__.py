"""The acoustic model: causal subsampling, RWKV-7 blocks and a CTC head."""
from asr.model.ctc import ctc_loss
from asr.model.encoder import CTCModel, EncoderState, ModelConfig

__all__ = ["CTCModel", "EncoderState", "ModelConfig", "ctc_loss"]
