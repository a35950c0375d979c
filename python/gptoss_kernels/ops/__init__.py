"""Public ops. Each takes torch tensors, checks its arguments (gptoss_kernels._checks), then runs
the CUDA kernel for CUDA tensors when this build has kernels, or the PyTorch reference
(gptoss_kernels.reference) for CPU tensors and reference-only builds."""

from .mxfp4 import mxfp4_dequantize, mxfp4_quantize

__all__ = ["mxfp4_dequantize", "mxfp4_quantize"]
