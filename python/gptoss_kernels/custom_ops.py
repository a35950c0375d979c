"""torch custom ops (namespace ``gptoss``) for engines that trace or compile.

Each op calls the plain Python op (``gptoss_kernels.ops``), so both share one argument-checking
layer and one dispatch (kernel on CUDA, reference on CPU). Fake (meta) implementations give
output shapes without running anything, so ``torch.compile(fullgraph=True)`` traces through
them. ``*_out`` variants write into caller-provided tensors and allocate nothing (safe inside
CUDA-graph capture when the kernels are used; the reference path is not capture-safe).

    import gptoss_kernels.custom_ops  # registers torch.ops.gptoss.*
    y = torch.ops.gptoss.moe_mxfp4(x, ids, w, w1b, w1s, w1bias, w2b, w2s, w2bias, 1.702, 7.0)
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import ops

_lib = "gptoss"


def _op(name: str, mutates_args=()):
    return torch.library.custom_op(f"{_lib}::{name}", mutates_args=mutates_args)


# ---- MXFP4 dequantize ----

@_op("mxfp4_dequantize")
def mxfp4_dequantize(blocks: Tensor, scales: Tensor) -> Tensor:
    return ops.mxfp4_dequantize(blocks, scales)


@mxfp4_dequantize.register_fake
def _(blocks, scales):
    return blocks.new_empty((*blocks.shape[:-2], blocks.shape[-2] * 32), dtype=torch.bfloat16)


# ---- router ----

@_op("router_topk")
def router_topk(x: Tensor, weight: Tensor, bias: Tensor, k: int) -> tuple[Tensor, Tensor]:
    ids, w = ops.router_topk(x, weight, bias, k)
    return ids, w


@router_topk.register_fake
def _(x, weight, bias, k):
    return (x.new_empty((x.shape[0], k), dtype=torch.int32), x.new_empty((x.shape[0], k), dtype=torch.float32))


@_op("route")
def route(topk_ids: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    m = ops.route(topk_ids, num_experts)
    return m.counts, m.offsets, m.permutation


@route.register_fake
def _(topk_ids, num_experts):
    i32 = torch.int32
    return (topk_ids.new_empty((num_experts,), dtype=i32), topk_ids.new_empty((num_experts + 1,), dtype=i32),
            topk_ids.new_empty((topk_ids.numel(),), dtype=i32))


# ---- MoE ----

@_op("moe_mxfp4")
def moe_mxfp4(x: Tensor, topk_ids: Tensor, topk_weights: Tensor, w1_blocks: Tensor, w1_scales: Tensor,
              w1_bias: Tensor, w2_blocks: Tensor, w2_scales: Tensor, w2_bias: Tensor, swiglu_alpha: float = 1.702,
              swiglu_limit: float = 7.0) -> Tensor:
    return ops.moe_mxfp4(x, topk_ids, topk_weights, w1_blocks, w1_scales, w1_bias, w2_blocks, w2_scales, w2_bias,
                         swiglu_alpha=swiglu_alpha, swiglu_limit=swiglu_limit)


@moe_mxfp4.register_fake
def _(x, *args, **kwargs):
    return torch.empty_like(x)


@_op("moe_mxfp4_out", mutates_args=("out",))
def moe_mxfp4_out(x: Tensor, topk_ids: Tensor, topk_weights: Tensor, w1_blocks: Tensor, w1_scales: Tensor,
                  w1_bias: Tensor, w2_blocks: Tensor, w2_scales: Tensor, w2_bias: Tensor, out: Tensor,
                  swiglu_alpha: float = 1.702, swiglu_limit: float = 7.0) -> None:
    ops.moe_mxfp4(x, topk_ids, topk_weights, w1_blocks, w1_scales, w1_bias, w2_blocks, w2_scales, w2_bias,
                  swiglu_alpha=swiglu_alpha, swiglu_limit=swiglu_limit, out=out)


@moe_mxfp4_out.register_fake
def _(*args, **kwargs):
    return None


@_op("moe_mxfp4_add_rms_norm_out", mutates_args=("norm_out", "residual_out"))
def moe_mxfp4_add_rms_norm_out(x: Tensor, topk_ids: Tensor, topk_weights: Tensor, w1_blocks: Tensor,
                               w1_scales: Tensor, w1_bias: Tensor, w2_blocks: Tensor, w2_scales: Tensor,
                               w2_bias: Tensor, residual: Tensor, norm_weight: Tensor, norm_out: Tensor,
                               residual_out: Tensor, eps: float = 1e-5, swiglu_alpha: float = 1.702,
                               swiglu_limit: float = 7.0) -> None:
    """residual_out = residual + MoE(x), norm_out = RMSNorm(residual_out) * norm_weight (a decode
    layer's end; residual_out must not alias residual here: custom ops take no aliased inputs)."""
    ops.moe_mxfp4_add_rms_norm(x, topk_ids, topk_weights, w1_blocks, w1_scales, w1_bias, w2_blocks, w2_scales,
                               w2_bias, residual, norm_weight, eps=eps, swiglu_alpha=swiglu_alpha,
                               swiglu_limit=swiglu_limit, norm_out=norm_out, residual_out=residual_out)


@moe_mxfp4_add_rms_norm_out.register_fake
def _(*args, **kwargs):
    return None


# ---- attention ----

@_op("attention_decode")
def attention_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, sinks: Tensor,
                     sliding_window: int | None = None, sm_scale: float = 0.125) -> Tensor:
    return ops.attention_decode(q, k_cache, v_cache, cache_seqlens, sinks, sliding_window=sliding_window,
                                sm_scale=sm_scale)


@attention_decode.register_fake
def _(q, *args, **kwargs):
    return torch.empty_like(q)


@_op("attention_decode_out", mutates_args=("out",))
def attention_decode_out(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, sinks: Tensor,
                         out: Tensor, sliding_window: int | None = None, sm_scale: float = 0.125) -> None:
    ops.attention_decode(q, k_cache, v_cache, cache_seqlens, sinks, sliding_window=sliding_window,
                         sm_scale=sm_scale, out=out)


@attention_decode_out.register_fake
def _(*args, **kwargs):
    return None


@_op("attention_prefill")
def attention_prefill(q: Tensor, k: Tensor, v: Tensor, sinks: Tensor, cu_seqlens_q: Tensor | None = None,
                      k_cache: Tensor | None = None, v_cache: Tensor | None = None,
                      cache_seqlens: Tensor | None = None, sliding_window: int | None = None,
                      sm_scale: float = 0.125) -> Tensor:
    return ops.attention_prefill(q, k, v, sinks, cu_seqlens_q=cu_seqlens_q, k_cache=k_cache, v_cache=v_cache,
                                 cache_seqlens=cache_seqlens, sliding_window=sliding_window, sm_scale=sm_scale)


@attention_prefill.register_fake
def _(q, *args, **kwargs):
    return torch.empty_like(q)


@_op("attention_prefill_out", mutates_args=("out",))
def attention_prefill_out(q: Tensor, k: Tensor, v: Tensor, sinks: Tensor, out: Tensor,
                          cu_seqlens_q: Tensor | None = None, k_cache: Tensor | None = None,
                          v_cache: Tensor | None = None, cache_seqlens: Tensor | None = None,
                          sliding_window: int | None = None, sm_scale: float = 0.125) -> None:
    ops.attention_prefill(q, k, v, sinks, cu_seqlens_q=cu_seqlens_q, k_cache=k_cache, v_cache=v_cache,
                          cache_seqlens=cache_seqlens, sliding_window=sliding_window, sm_scale=sm_scale, out=out)


@attention_prefill_out.register_fake
def _(*args, **kwargs):
    return None


# ---- RoPE and the KV cache ----

@_op("rope_qkv")
def rope_qkv(qkv: Tensor, positions: Tensor, num_q_heads: int = 64, num_kv_heads: int = 8,
             head_dim: int = 64) -> tuple[Tensor, Tensor, Tensor]:
    q, k, v = ops.rope_qkv(qkv, positions, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=head_dim)
    return q.contiguous(), k.contiguous(), v.contiguous()


@rope_qkv.register_fake
def _(qkv, positions, num_q_heads=64, num_kv_heads=8, head_dim=64):
    T = qkv.shape[0]
    return (qkv.new_empty((T, num_q_heads, head_dim)), qkv.new_empty((T, num_kv_heads, head_dim)),
            qkv.new_empty((T, num_kv_heads, head_dim)))


@_op("cache_append", mutates_args=("k_cache", "v_cache"))
def cache_append(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, seq_ids: Tensor, positions: Tensor) -> None:
    ops.cache_append(k, v, k_cache, v_cache, seq_ids, positions)


@cache_append.register_fake
def _(*args, **kwargs):
    return None


@_op("qkv_rope_append", mutates_args=("k_cache", "v_cache"))
def qkv_rope_append(x: Tensor, weight: Tensor, bias: Tensor | None, seq_ids: Tensor, positions: Tensor,
                    k_cache: Tensor, v_cache: Tensor, num_q_heads: int = 64, num_kv_heads: int = 8,
                    head_dim: int = 64) -> Tensor:
    """The decode step's fused QKV projection + RoPE + cache append; returns q [T, nq, d]."""
    return ops.qkv_rope_append(x, weight, bias, seq_ids, positions, k_cache, v_cache, num_q_heads=num_q_heads,
                               num_kv_heads=num_kv_heads, head_dim=head_dim)


@qkv_rope_append.register_fake
def _(x, weight, bias, seq_ids, positions, k_cache, v_cache, num_q_heads=64, num_kv_heads=8, head_dim=64):
    return x.new_empty((x.shape[0], num_q_heads, head_dim))


#: every registered op, for tests and docs
ALL_OPS = (mxfp4_dequantize, router_topk, route, moe_mxfp4, moe_mxfp4_out, moe_mxfp4_add_rms_norm_out,
           attention_decode, attention_decode_out, attention_prefill, attention_prefill_out, rope_qkv, cache_append,
           qkv_rope_append)
