"""Model export for other runtimes: ONNX graphs (:mod:`asr.export.onnx`) and their ONNX Runtime encoder (:mod:`asr.export.runtime`)."""
