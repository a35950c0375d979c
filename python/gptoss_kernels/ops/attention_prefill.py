from __future__ import annotations

import os

import torch

from .. import _checks, _lib, reference

# Owner of the CUDA path: csrc/kernels/attention_prefill.cu. KV-cache layout: see
# ops/attention.py. The kernel (flash attention, packed GQA: one block per 16 positions x 8 query
# heads of one KV head) takes head_dim 64 with 8 query heads per KV head (gpt-oss); other shapes
# on CUDA run the reference with a warning.


def attention_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor, *,
                      cu_seqlens_q: torch.Tensor | None = None, k_cache: torch.Tensor | None = None,
                      v_cache: torch.Tensor | None = None, cache_seqlens: torch.Tensor | None = None,
                      sliding_window: int | None, sm_scale: float = 0.125,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of a chunk of new tokens per sequence (spec §4.2 steps 4-7).

    q bf16 [Tq, nq, d]; k, v bf16 [Tq, nkv, d]: the chunk's own (rotated) keys/values, packed
    over sequences by cu_seqlens_q int32 [B+1] (default: one sequence). Sequence b's chunk starts
    at position p0_b = cache_seqlens[b] (default 0); keys at positions < p0_b are read from
    k_cache/v_cache [B, S, nkv, d] (slot p % S), keys >= p0_b from k/v. The chunk is appended to
    the cache by the caller *after* this call (a ring buffer may not hold the whole chunk).
    returns bf16 [Tq, nq, d].

    CUDA kernel (nq == 8 nkv, d == 64): reads cu_seqlens_q / cache_seqlens on the device only (no
    host sync; capturable in a CUDA graph), so it trusts them: cu_seqlens_q non-decreasing with
    cu[-1] <= Tq (rows past cu[-1] are left unwritten) and a cache that holds every needed prefix
    position (the reference path raises ValueError when it does not).
    """
    _checks.tensor("q", q, dtype=torch.bfloat16, ndim=3)
    Tq, nq, d = q.shape
    _checks.tensor("k", k, dtype=torch.bfloat16, shape=(Tq, None, d))
    nkv = k.shape[1]
    _checks.tensor("v", v, dtype=torch.bfloat16, shape=(Tq, nkv, d))
    _checks.tensor("sinks", sinks, dtype=torch.bfloat16, shape=(nq,))
    if nq % nkv:
        raise ValueError(f"q has {nq} heads, not a multiple of k's {nkv} KV heads")
    if cu_seqlens_q is None:
        cu_seqlens_q = torch.tensor([0, Tq], dtype=torch.int32, device=q.device)
    _checks.tensor("cu_seqlens_q", cu_seqlens_q, dtype=torch.int32, ndim=1)
    B = cu_seqlens_q.shape[0] - 1
    if (k_cache is None) != (v_cache is None) or (k_cache is None) != (cache_seqlens is None):
        raise ValueError("k_cache, v_cache and cache_seqlens go together: give all three or none")
    if k_cache is not None:
        _checks.kv_cache("k_cache", k_cache, (B, None, nkv, d))
        _checks.kv_cache("v_cache", v_cache, tuple(k_cache.shape))
        _checks.tensor("cache_seqlens", cache_seqlens, dtype=torch.int32, shape=(B,))
    if sliding_window is not None:
        _checks.positive_int("sliding_window", sliding_window)
    dev = _checks.same_device(q=q, k=k, v=v, sinks=sinks, cu_seqlens_q=cu_seqlens_q, k_cache=k_cache,
                              v_cache=v_cache, cache_seqlens=cache_seqlens, out=out)
    out = _checks.out_tensor("out", out, shape=(Tq, nq, d), dtype=torch.bfloat16, device=dev)
    if _lib.runs_kernels(dev) and _kernel_supports(nq, nkv, d):
        # The kernel reads cache_seqlens on the device (no host sync, CUDA-graph capturable), so
        # the reference path's "cache too small" check is not repeated here: the caller must give
        # a cache holding every needed position (full layers: S >= longest sequence; sliding
        # layers: S >= window - 1).
        _attention_prefill_cuda(q, k, v, sinks, cu_seqlens_q, k_cache, v_cache, cache_seqlens,
                                sliding_window, sm_scale, out, dev, _impl_override())
        return out
    _lib.warn_reference_fallback("attention_prefill", dev=dev)
    out.copy_(_prefill_reference(q, k, v, sinks, cu_seqlens_q, k_cache, v_cache, cache_seqlens,
                                 sliding_window, sm_scale))
    return out


def _impl_override() -> int:
    """GPTOSS_ATTENTION_PREFILL_IMPL=0 (default: the build's choice), 1 (mma.sync kernel) or 2 (wgmma
    kernel): lets a benchmark compare the two kernels through the public op."""
    v = os.environ.get("GPTOSS_ATTENTION_PREFILL_IMPL", "0")
    if v not in ("0", "1", "2"):
        raise ValueError(f"GPTOSS_ATTENTION_PREFILL_IMPL must be 0, 1 or 2, got {v!r}")
    return int(v)


def _kernel_supports(nq: int, nkv: int, d: int) -> bool:
    """Shapes the CUDA kernel takes (gpt-oss: 64 query heads, 8 KV heads, head_dim 64)."""
    return d == 64 and nq == 8 * nkv


def _attention_prefill_cuda(q, k, v, sinks, cu_seqlens_q, k_cache, v_cache, cache_seqlens, sliding_window,
                            sm_scale, out, dev, impl: int = 0):
    """The kernel on CUDA tensors (or CPU tensors on the hostsim backend): impl 0 the build's
    choice, 1 the mma.sync kernel, 2 the wgmma kernel (tests run both)."""
    Tq, nq, d = q.shape
    nkv = k.shape[1]
    B = cu_seqlens_q.shape[0] - 1
    window = 0 if sliding_window is None else min(int(sliding_window), 1 << 30)
    has_cache = k_cache is not None
    with _lib.device_guard(dev):
        _lib.kernels(dev).attention_prefill_bf16(
            q, k, v, sinks, cu_seqlens_q, B, Tq, nq, nkv, d, k_cache if has_cache else None,
            v_cache if has_cache else None, cache_seqlens if has_cache else None,
            k_cache.shape[1] if has_cache else 0, window, float(sm_scale), out, _checks.stream_of(dev), impl)


def _prefill_reference(q, k, v, sinks, cu_seqlens_q, k_cache, v_cache, cache_seqlens, sliding_window, sm_scale):
    out = torch.empty_like(q)
    cu = cu_seqlens_q.tolist()
    p0s = cache_seqlens.tolist() if cache_seqlens is not None else [0] * (len(cu) - 1)
    for b in range(len(cu) - 1):
        s, e, p0 = cu[b], cu[b + 1], p0s[b]
        if e == s:
            continue
        first = 0 if sliding_window is None else max(0, p0 - (sliding_window - 1))
        if p0 > first:
            S = k_cache.shape[1]
            if p0 - first > S:
                raise ValueError(f"sequence {b}: {p0 - first} cached positions are needed but the cache has {S} slots")
            slots = reference.cache_slots(torch.arange(first, p0, device=q.device), S)
            kk = torch.cat((k_cache[b, slots], k[s:e]))
            vv = torch.cat((v_cache[b, slots], v[s:e]))
        else:
            kk, vv = k[s:e], v[s:e]
        out[s:e] = reference.attention(q[s:e], kk, vv, sinks, sm_scale=sm_scale, sliding_window=sliding_window,
                                       q_offset=p0 - first)
    return out
