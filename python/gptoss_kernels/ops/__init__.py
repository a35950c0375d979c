"""Public ops. Each takes torch tensors, checks its arguments (gptoss_kernels._checks), then runs
the CUDA kernel for CUDA tensors when this build has kernels, or the PyTorch reference
(gptoss_kernels.reference) for CPU tensors and reference-only builds. CPU tensors run the same
kernels under the hostsim backend (host-simulation build; _lib.set_backend / GPTOSS_BACKEND)."""

from .attention import attention_decode, cache_append, rope_and_cache_append, rope_qkv
from .attention_prefill import attention_prefill
from .dense import greedy_argmax, linear, qkv_rope_append, rms_norm
from .moe import moe_bytes_read, moe_mxfp4, moe_mxfp4_add_rms_norm
from .mxfp4 import mxfp4_dequantize, mxfp4_quantize
from .router import RouteMetadata, add_rms_norm_router_topk, route, router_topk

__all__ = ["attention_decode", "attention_prefill", "cache_append", "rope_and_cache_append", "rope_qkv",
           "greedy_argmax", "linear", "qkv_rope_append", "rms_norm", "moe_bytes_read", "moe_mxfp4", "moe_mxfp4_add_rms_norm", "mxfp4_dequantize", "mxfp4_quantize",
           "RouteMetadata", "add_rms_norm_router_topk", "route", "router_topk"]
