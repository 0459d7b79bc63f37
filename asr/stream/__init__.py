"""Streaming recognition: a recognizer per audio stream, endpointing, microphone input.

    from asr.stream import Recognizer
    stream = Recognizer(model, tokenizer)          # or asr.load_model(...).stream()
    partial = stream.accept_waveform(samples, sample_rate)
    print(partial.text, [s.text for s in partial.segments])
    transcript = stream.finalize()

``asr.stream.microphone`` (sounddevice/PortAudio) is not imported here, so streaming works on
machines without audio hardware or PortAudio.
"""
from asr.stream.endpoint import EndpointConfig, Endpointer, EndpointRule
from asr.stream.process import tune_for_streaming
from asr.stream.recognizer import Partial, Recognizer, step_batch
from asr.stream.state import split_state, stack_states

__all__ = [
    "EndpointConfig",
    "EndpointRule",
    "Endpointer",
    "Partial",
    "Recognizer",
    "split_state",
    "stack_states",
    "step_batch",
    "tune_for_streaming",
]
