from __future__ import annotations

import functools

import torch

from .. import _checks, _lib, reference

# Owner of the CUDA paths: decode + RoPE/cache append (csrc/kernels/attention_decode.cu,
# csrc/kernels/rope.cu). Prefill lives in ops/attention_prefill.py.
#
# KV-cache layout (one pair of tensors per layer): k_cache, v_cache bf16 [B, S, nkv, d];
# position p of sequence b lives in slot p % S (reference.cache_slots). Full layers use
# S >= the longest sequence (identity), sliding layers S = window = 128 (a ring buffer).
# cache_seqlens int32 [B]: for decode, positions written including the new token.
#
# CUDA paths (gptoss/attention.h, gptoss/rope.h):
# - attention_decode: split-KV kernel + combine; its workspace (size from the C ABI, a pure
#   function of B, S, heads, window) is allocated here with torch, so the op is CUDA-graph safe
#   (no host sync: the device-side cache_seqlens are never read on the host). Shapes the kernel
#   does not cover (head_dim != 64, q heads != 8 x KV heads) run the reference.
# - RoPE: the kernels compute cos/sin from the d/2 inverse frequencies passed by value; this module
#   passes reference.yarn_inv_freq's fp32 table, so the kernel's fp32 angle t * inv_freq_j is
#   bit-identical to the reference's, and only the cos/sin evaluation differs (< 1e-6 abs).


@functools.lru_cache(maxsize=None)
def _rope_table(rope: reference.YarnParams) -> tuple[list[float], float]:
    """(inv_freq as a list of head_dim/2 floats, concentration) for the RoPE kernels."""
    return reference.yarn_inv_freq(rope).tolist(), float(rope.concentration)


#: attention_decode kernel choice passed to the C ABI: 0 = the library default, 1 = fp32 SIMT,
#: 2 = tensor cores (P rounded to bf16); | DECODE_NO_CLUSTER merges 2..8 splits with the second
#: kernel instead of inside a thread-block cluster (same bits). For tests and benchmarks.
DECODE_VARIANT = 0
DECODE_NO_CLUSTER = 16    # GPTOSS_ATTENTION_DECODE_NO_CLUSTER
MAX_CLUSTER_SPLITS = 8    # splits merged inside a thread-block cluster (2..8)


def _int32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.int32 else t.to(torch.int32)


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
    _checks.kv_cache("k_cache", k_cache, (B, None, None, d))
    S, nkv = k_cache.shape[1], k_cache.shape[2]
    if nkv == 0 or nq % nkv:
        hint = (_checks.transposed_cache_hint("k_cache", k_cache) if S and nq % S == 0 else
                f"k_cache is {_checks.KV_CACHE_LAYOUT} = {tuple(k_cache.shape)}")
        raise ValueError(f"q has {nq} heads, not a multiple of the cache's {nkv} KV heads; {hint}")
    _checks.kv_cache("v_cache", v_cache, (B, S, nkv, d))
    _checks.tensor("cache_seqlens", cache_seqlens, dtype=torch.int32, shape=(B,))
    _checks.tensor("sinks", sinks, dtype=torch.bfloat16, shape=(nq,))
    if sliding_window is not None:
        _checks.positive_int("sliding_window", sliding_window)
    dev = _checks.same_device(q=q, k_cache=k_cache, v_cache=v_cache, cache_seqlens=cache_seqlens, sinks=sinks, out=out)
    out = _checks.out_tensor("out", out, shape=(B, nq, d), dtype=torch.bfloat16, device=dev)
    if _lib.runs_kernels(dev) and d == 64 and nq == 8 * nkv and 0 < S < 2 ** 31 and B <= 65535:
        # clamp like attention_prefill: the C ABI takes an int32 window (a window >= S is the same
        # as 2^30 for any cache that fits in memory); larger Python ints would raise TypeError here
        window = 0 if sliding_window is None else min(int(sliding_window), 1 << 30)
        K = _lib.kernels(dev)
        ws_bytes = K.attention_decode_workspace_size(B, S, nq, nkv, d, window)
        ws = torch.empty(ws_bytes, dtype=torch.uint8, device=dev) if ws_bytes else None
        with _lib.device_guard(dev):
            K.attention_decode_bf16(q, k_cache, v_cache, cache_seqlens, sinks, out, ws, ws_bytes, B, S, nq, nkv, d,
                                    window, float(sm_scale), _checks.stream_of(dev), DECODE_VARIANT)
        return out
    _lib.warn_reference_fallback("attention_decode", dev=dev)
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
    if _lib.runs_kernels(dev) and head_dim == 64 and rope.head_dim == head_dim:
        q = torch.empty(T, num_q_heads, head_dim, dtype=torch.bfloat16, device=dev)
        k = torch.empty(T, num_kv_heads, head_dim, dtype=torch.bfloat16, device=dev)
        v = torch.empty(T, num_kv_heads, head_dim, dtype=torch.bfloat16, device=dev)
        inv, conc = _rope_table(rope)
        pos = _int32(positions)
        with _lib.device_guard(dev):
            _lib.kernels(dev).rope_qkv_bf16(qkv, pos, q, k, v, T, num_q_heads, num_kv_heads, head_dim, inv, conc,
                                            _checks.stream_of(dev))
        return q, k, v
    _lib.warn_reference_fallback("rope_qkv", dev=dev)
    q = qkv[:, : num_q_heads * head_dim].view(T, num_q_heads, head_dim)
    k = qkv[:, num_q_heads * head_dim: (num_q_heads + num_kv_heads) * head_dim].view(T, num_kv_heads, head_dim)
    v = qkv[:, (num_q_heads + num_kv_heads) * head_dim:].reshape(T, num_kv_heads, head_dim)
    cos, sin = reference.rope_cos_sin(positions, rope)
    return reference.apply_rope(q, cos, sin), reference.apply_rope(k, cos, sin), v.contiguous()


def cache_append(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 seq_ids: torch.Tensor, positions: torch.Tensor) -> None:
    """Write rows into the KV cache: k_cache[seq_ids[t], positions[t] % S] = k[t] (same for v).
    A row whose seq_id is outside [0, B) is skipped (as in the kernels: padding rows).

    k, v bf16 [T, nkv, d]; k_cache, v_cache bf16 [B, S, nkv, d]; seq_ids, positions int32 [T].
    """
    _checks.tensor("k", k, dtype=torch.bfloat16, ndim=3)
    T, nkv, d = k.shape
    _checks.tensor("v", v, dtype=torch.bfloat16, shape=(T, nkv, d))
    _checks.kv_cache("k_cache", k_cache, (None, None, nkv, d))
    _checks.kv_cache("v_cache", v_cache, tuple(k_cache.shape))
    _checks.tensor("seq_ids", seq_ids, dtype=(torch.int32, torch.int64), shape=(T,))
    _checks.tensor("positions", positions, dtype=(torch.int32, torch.int64), shape=(T,))
    dev = _checks.same_device(k=k, v=v, k_cache=k_cache, v_cache=v_cache, seq_ids=seq_ids, positions=positions)
    if k_cache.shape[1] < 1:
        raise ValueError(f"k_cache must have at least one slot, got shape {tuple(k_cache.shape)}")
    if _lib.runs_kernels(dev) and d % 8 == 0:
        sid, pos = _int32(seq_ids), _int32(positions)
        with _lib.device_guard(dev):
            _lib.kernels(dev).cache_append_bf16(k, v, sid, pos, k_cache, v_cache, T, nkv, d, k_cache.shape[0],
                                                k_cache.shape[1], _checks.stream_of(dev))
        return
    _lib.warn_reference_fallback("cache_append", dev=dev)
    slots = reference.cache_slots(positions.long(), k_cache.shape[1])
    sid = seq_ids.long()
    ok = (sid >= 0) & (sid < k_cache.shape[0])
    k_cache[sid[ok], slots[ok]] = k[ok]
    v_cache[sid[ok], slots[ok]] = v[ok]


def rope_and_cache_append(qkv: torch.Tensor, seq_ids: torch.Tensor, positions: torch.Tensor, k_cache: torch.Tensor,
                          v_cache: torch.Tensor, *, q_out: torch.Tensor | None = None, num_q_heads: int = 64,
                          num_kv_heads: int = 8, head_dim: int = 64,
                          rope: reference.YarnParams = reference.YarnParams()) -> torch.Tensor:
    """rope_qkv + cache_append in one kernel: rotate q (returned, or written into q_out) and write
    the rotated k and the v of token t into k_cache/v_cache[seq_ids[t], positions[t] % S].

    qkv bf16 [T, (nq + 2 nkv) d] (bias added); seq_ids, positions int32 [T]; k_cache, v_cache
    bf16 [B, S, nkv, d]; q_out bf16 [T, nq, d] -> q bf16 [T, nq, d].
    """
    _checks.tensor("qkv", qkv, dtype=torch.bfloat16, shape=(None, (num_q_heads + 2 * num_kv_heads) * head_dim))
    T = qkv.shape[0]
    _checks.tensor("seq_ids", seq_ids, dtype=(torch.int32, torch.int64), shape=(T,))
    _checks.tensor("positions", positions, dtype=(torch.int32, torch.int64), shape=(T,))
    _checks.kv_cache("k_cache", k_cache, (None, None, num_kv_heads, head_dim))
    _checks.kv_cache("v_cache", v_cache, tuple(k_cache.shape))
    if k_cache.shape[1] < 1:
        raise ValueError(f"k_cache must have at least one slot, got shape {tuple(k_cache.shape)}")
    dev = _checks.same_device(qkv=qkv, seq_ids=seq_ids, positions=positions, k_cache=k_cache, v_cache=v_cache,
                              q_out=q_out)
    q_out = _checks.out_tensor("q_out", q_out, shape=(T, num_q_heads, head_dim), dtype=torch.bfloat16, device=dev)
    if _lib.runs_kernels(dev) and head_dim == 64 and rope.head_dim == head_dim:
        inv, conc = _rope_table(rope)
        sid, pos = _int32(seq_ids), _int32(positions)
        with _lib.device_guard(dev):
            _lib.kernels(dev).rope_cache_append_bf16(qkv, sid, pos, q_out, k_cache, v_cache, T, num_q_heads,
                                                     num_kv_heads, head_dim, k_cache.shape[0], k_cache.shape[1], inv,
                                                     conc, _checks.stream_of(dev))
        return q_out
    _lib.warn_reference_fallback("rope_and_cache_append", dev=dev)
    q, k, v = rope_qkv(qkv, positions, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                       rope=rope)
    cache_append(k, v, k_cache, v_cache, seq_ids, positions)
    q_out.copy_(q)
    return q_out
