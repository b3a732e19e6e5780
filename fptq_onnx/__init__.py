"""fptq-onnx: Hugging Face causal LM -> calibrated W4A8 (FPTQ) ONNX."""

__version__ = "0.1.0"
