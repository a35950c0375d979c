from __future__ import annotations

import torch

from .. import _checks, _lib, reference

# Owner of the CUDA paths: decode + RoPE/cache append (csrc/kernels/attention_decode.cu,
# csrc/kernels/rope.cu, issue 8). Prefill lives in ops/attention_prefill.py (issue 9).
#
# KV-cache layout (one pair of tensors per layer): k_cache, v_cache bf16 [B, S, nkv, d];
# position p of sequence b lives in slot p % S (reference.cache_slots). Full layers use
# S >= the longest sequence (identity), sliding layers S = window = 128 (a ring buffer).
# cache_seqlens int32 [B]: for decode, positions written including the new token.


def attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
                     sinks: torch.Tensor, *, sliding_window: int | None, sm_scale: float = 0.125,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """One new token per sequence against the KV cache (spec §4.2 steps 4-7).

    q bf16 [B, nq, d] (rotated, position L_b - 1); k_cache/v_cache bf16 [B, S, nkv, d];
    cache_seqlens int32 [B] = L_b (>= 1, includes the new token, already appended);
    sinks bf16 [nq]; sliding_window: None (full) or W (the last W positions incl. the new one).
    returns bf16 [B, nq, d].
    """
    _checks.tensor("q", q, dtype=torch.bfloat16, ndim=3)
    B, nq, d = q.shape
    _checks.tensor("k_cache", k_cache, dtype=torch.bfloat16, shape=(B, None, None, d))
    S, nkv = k_cache.shape[1], k_cache.shape[2]
    _checks.tensor("v_cache", v_cache, dtype=torch.bfloat16, shape=(B, S, nkv, d))
    _checks.tensor("cache_seqlens", cache_seqlens, dtype=torch.int32, shape=(B,))
    _checks.tensor("sinks", sinks, dtype=torch.bfloat16, shape=(nq,))
    if nq % nkv:
        raise ValueError(f"q has {nq} heads, not a multiple of the cache's {nkv} KV heads")
    if sliding_window is not None:
        _checks.positive_int("sliding_window", sliding_window)
    dev = _checks.same_device(q=q, k_cache=k_cache, v_cache=v_cache, cache_seqlens=cache_seqlens, sinks=sinks, out=out)
    out = _checks.out_tensor("out", out, shape=(B, nq, d), dtype=torch.bfloat16, device=dev)
    if dev.type == "cuda":
        _lib.warn_reference_fallback("attention_decode")
    out.copy_(reference.attention_decode(q, k_cache, v_cache, cache_seqlens, sinks,
                                         sliding_window=sliding_window, sm_scale=sm_scale))
    return out


def rope_qkv(qkv: torch.Tensor, positions: torch.Tensor, *, num_q_heads: int = 64, num_kv_heads: int = 8,
             head_dim: int = 64, rope: reference.YarnParams = reference.YarnParams()) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split the fused QKV projection and rotate q and k (half-split RoPE with YaRN, spec §1.3).

    qkv bf16 [T, (nq + 2 nkv) d] (bias already added); positions int32 [T] (absolute)
    -> q bf16 [T, nq, d], k bf16 [T, nkv, d], v bf16 [T, nkv, d].
    """
    _checks.tensor("qkv", qkv, dtype=torch.bfloat16, shape=(None, (num_q_heads + 2 * num_kv_heads) * head_dim))
    T = qkv.shape[0]
    _checks.tensor("positions", positions, dtype=(torch.int32, torch.int64), shape=(T,))
    dev = _checks.same_device(qkv=qkv, positions=positions)
    if dev.type == "cuda":
        _lib.warn_reference_fallback("rope_qkv")
    q = qkv[:, : num_q_heads * head_dim].view(T, num_q_heads, head_dim)
    k = qkv[:, num_q_heads * head_dim: (num_q_heads + num_kv_heads) * head_dim].view(T, num_kv_heads, head_dim)
    v = qkv[:, (num_q_heads + num_kv_heads) * head_dim:].reshape(T, num_kv_heads, head_dim)
    cos, sin = reference.rope_cos_sin(positions, rope)
    return reference.apply_rope(q, cos, sin), reference.apply_rope(k, cos, sin), v.contiguous()


def cache_append(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 seq_ids: torch.Tensor, positions: torch.Tensor) -> None:
    """Write rows into the KV cache: k_cache[seq_ids[t], positions[t] % S] = k[t] (same for v).

    k, v bf16 [T, nkv, d]; k_cache, v_cache bf16 [B, S, nkv, d]; seq_ids, positions int32 [T].
    """
    _checks.tensor("k", k, dtype=torch.bfloat16, ndim=3)
    T, nkv, d = k.shape
    _checks.tensor("v", v, dtype=torch.bfloat16, shape=(T, nkv, d))
    _checks.tensor("k_cache", k_cache, dtype=torch.bfloat16, shape=(None, None, nkv, d))
    _checks.tensor("v_cache", v_cache, dtype=torch.bfloat16, shape=tuple(k_cache.shape))
    _checks.tensor("seq_ids", seq_ids, dtype=(torch.int32, torch.int64), shape=(T,))
    _checks.tensor("positions", positions, dtype=(torch.int32, torch.int64), shape=(T,))
    _checks.same_device(k=k, v=v, k_cache=k_cache, v_cache=v_cache, seq_ids=seq_ids, positions=positions)
    slots = reference.cache_slots(positions.long(), k_cache.shape[1])
    k_cache[seq_ids.long(), slots] = k
    v_cache[seq_ids.long(), slots] = v
