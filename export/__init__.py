"""apl_export: ONNX / TensorRT export of APL pipelines."""
