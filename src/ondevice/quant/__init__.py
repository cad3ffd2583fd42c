"""Make model variants: quantization via llama.cpp's ``llama_model_quantize``."""

from .api import quantize
from .quantize import ftypes, ggml_types, weight_types

__all__ = ["ftypes", "ggml_types", "quantize", "weight_types"]
