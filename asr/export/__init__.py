"""Model export for other runtimes: ONNX graphs (:mod:`asr.export.onnx`) and the ONNX Runtime
encoder that runs them (:mod:`asr.export.runtime`)."""
