"""ONNX export and TensorRT engine building (installed as ``sdfast.export``)."""
