from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _checks, _lib, reference

# CUDA paths: csrc/kernels/dense.cu: fused residual add + RMSNorm, and a bf16 GEMV/skinny
# GEMM for small-batch projections and the unembedding (T <= LINEAR_MAX_TOKENS; cuBLAS above).

#: Largest token count the GEMV kernel takes; above it linear() uses torch (cuBLAS).
LINEAR_MAX_TOKENS = 64


def _aligned(*tensors: torch.Tensor | None) -> bool:
    return all(t is None or t.data_ptr() % 16 == 0 for t in tensors)


def _kernel(dev: torch.device) -> bool:
    return _lib.runs_kernels(dev) and _lib.family_built("dense", dev)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, *, eps: float = 1e-5, residual: torch.Tensor | None = None,
             out: torch.Tensor | None = None, residual_out: torch.Tensor | None = None):
    """RMSNorm (spec §4.2 step 1), optionally fused with the residual add.

    x bf16 [T, H]; weight bf16 or float32 [H]; residual: optional bf16 [T, H].
    Without residual: returns y = RMSNorm(x) * weight, bf16 [T, H].
    With residual: h = x + residual (rounded to bf16, the residual stream's dtype), returns
    (y = RMSNorm(h) * weight, h); h is written to residual_out if given (may alias residual).
    """
    _checks.tensor("x", x, dtype=torch.bfloat16, ndim=2)
    T, H = x.shape
    _checks.tensor("weight", weight, dtype=(torch.bfloat16, torch.float32), shape=(H,))
    if residual is not None:
        _checks.tensor("residual", residual, dtype=torch.bfloat16, shape=(T, H))
    dev = _checks.same_device(x=x, weight=weight, residual=residual, out=out, residual_out=residual_out)
    out = _checks.out_tensor("out", out, shape=(T, H), dtype=torch.bfloat16, device=dev)
    if residual is not None:
        residual_out = _checks.out_tensor("residual_out", residual_out, shape=(T, H), dtype=torch.bfloat16,
                                          device=dev)
    if _kernel(dev) and H > 0 and H % 8 == 0 and _aligned(x, weight, residual, out,
                                                           residual_out if residual is not None else None):
        with _lib.device_guard(dev):
            _lib.kernels(dev).rms_norm_bf16(x, residual, weight, weight.dtype == torch.float32, out,
                                            None if residual is None else residual_out, T, H, float(eps),
                                            _checks.stream_of(dev))
        return out if residual is None else (out, residual_out)
    if _lib.expects_kernels(dev):
        if _kernel(dev):
            reason = "H is not a positive multiple of 8 or a tensor is not 16-byte aligned"
        elif _lib.runs_kernels(dev):
            reason = "this build has no 'dense' kernels (rebuild)"
        else:
            reason = None
        _lib.warn_reference_fallback("rms_norm", reason, dev)
    if residual is None:
        out.copy_(reference.rms_norm(x, weight, eps))
        return out
    h = (x.float() + residual.float()).to(torch.bfloat16)
    residual_out.copy_(h)
    out.copy_(reference.rms_norm(h, weight, eps))
    return out, residual_out


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           out: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """y = x W^T + b with fp32 accumulation. x bf16 [T, K]; weight bf16 [N, K]; bias bf16 [N] or None.

    out_dtype bf16 or float32 (the unembedding's logits). For small T (decode) the CUDA path is a
    bandwidth-bound GEMV reading W once; for large T it defers to torch (cuBLAS)."""
    _checks.tensor("x", x, dtype=torch.bfloat16, ndim=2)
    T, K = x.shape
    _checks.tensor("weight", weight, dtype=torch.bfloat16, shape=(None, K))
    N = weight.shape[0]
    if bias is not None:
        _checks.tensor("bias", bias, dtype=torch.bfloat16, shape=(N,))
    if out_dtype not in (torch.bfloat16, torch.float32):
        raise TypeError(f"out_dtype must be bfloat16 or float32, got {out_dtype}")
    dev = _checks.same_device(x=x, weight=weight, bias=bias, out=out)
    out = _checks.out_tensor("out", out, shape=(T, N), dtype=out_dtype, device=dev)
    if T == 0:
        return out
    if _kernel(dev) and T <= LINEAR_MAX_TOKENS and N > 0 and K > 0 and K % 8 == 0 and _aligned(x, weight):
        with _lib.device_guard(dev):
            _lib.kernels(dev).linear_bf16(x, weight, bias, out, out_dtype == torch.float32, T, N, K,
                                          _checks.stream_of(dev))
        return out
    if dev.type == "cuda":
        # cuBLAS (bf16 result, then converted: for float32 out this is one extra bf16 rounding)
        out.copy_(F.linear(x, weight, bias))
        return out
    y = x.float() @ weight.float().t()
    if bias is not None:
        y = y + bias.float()
    out.copy_(y)
    return out


def qkv_rope_append(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, seq_ids: torch.Tensor,
                    positions: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *,
                    q_out: torch.Tensor | None = None, num_q_heads: int = 64, num_kv_heads: int = 8,
                    head_dim: int = 64, rope: reference.YarnParams = reference.YarnParams()) -> torch.Tensor:
    """The decode step's attention input in one kernel: qkv = x W^T + b (rounded to bf16), q
    rotated (returned, or written into q_out), the rotated k and the v of token t written into
    k_cache/v_cache[seq_ids[t], positions[t] % S]. Same bits as linear() then
    rope_and_cache_append(), which is also the path for T > LINEAR_MAX_TOKENS and for CPU tensors on
    the reference backend.

    x bf16 [T, K]; weight bf16 [(nq + 2 nkv) d, K]; bias bf16 [(nq + 2 nkv) d] or None;
    seq_ids, positions int32 [T]; k_cache, v_cache bf16 [B, S, nkv, d] -> q bf16 [T, nq, d].
    """
    from .attention import _int32, _rope_table, rope_and_cache_append

    _checks.tensor("x", x, dtype=torch.bfloat16, ndim=2)
    T, K = x.shape
    N = (num_q_heads + 2 * num_kv_heads) * head_dim
    _checks.tensor("weight", weight, dtype=torch.bfloat16, shape=(N, K))
    if bias is not None:
        _checks.tensor("bias", bias, dtype=torch.bfloat16, shape=(N,))
    _checks.tensor("seq_ids", seq_ids, dtype=(torch.int32, torch.int64), shape=(T,))
    _checks.tensor("positions", positions, dtype=(torch.int32, torch.int64), shape=(T,))
    _checks.kv_cache("k_cache", k_cache, (None, None, num_kv_heads, head_dim))
    _checks.kv_cache("v_cache", v_cache, tuple(k_cache.shape))
    if k_cache.shape[1] < 1:
        raise ValueError(f"k_cache must have at least one slot, got shape {tuple(k_cache.shape)}")
    dev = _checks.same_device(x=x, weight=weight, bias=bias, seq_ids=seq_ids, positions=positions, k_cache=k_cache,
                              v_cache=v_cache, q_out=q_out)
    q_out = _checks.out_tensor("q_out", q_out, shape=(T, num_q_heads, head_dim), dtype=torch.bfloat16, device=dev)
    if T == 0:
        return q_out
    if (_kernel(dev) and T <= LINEAR_MAX_TOKENS and head_dim == 64 and rope.head_dim == head_dim and K % 8 == 0
            and K <= 2**24 and num_q_heads <= 4096 and num_kv_heads <= 4096
            and _aligned(x, weight, q_out, k_cache, v_cache)):
        inv, conc = _rope_table(rope)
        sid, pos = _int32(seq_ids), _int32(positions)
        with _lib.device_guard(dev):
            _lib.kernels(dev).linear_qkv_rope_append_bf16(
                x, weight, bias, sid, pos, q_out, k_cache, v_cache, T, K, num_q_heads, num_kv_heads, head_dim,
                k_cache.shape[0], k_cache.shape[1], inv, conc, _checks.stream_of(dev))
        return q_out
    qkv = linear(x, weight, bias)
    return rope_and_cache_append(qkv, seq_ids, positions, k_cache, v_cache, q_out=q_out, num_q_heads=num_q_heads,
                                 num_kv_heads=num_kv_heads, head_dim=head_dim, rope=rope)


def greedy_argmax(logits: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy token ids: int64 [B] = argmax over float32 logits [B, V], torch.argmax's order (NaN
    ranks highest, ties go to the lower index). On CUDA a two-pass device reduction (no host sync;
    its small workspace comes from torch's allocator, so it can be captured in a CUDA graph)."""
    _checks.tensor("logits", logits, dtype=torch.float32, ndim=2)
    B, V = logits.shape
    if V < 1:
        raise ValueError(f"logits must have at least one column, got shape {tuple(logits.shape)}")
    dev = _checks.same_device(logits=logits, out=out)
    out = _checks.out_tensor("out", out, shape=(B,), dtype=torch.int64, device=dev)
    if B == 0:
        return out
    if _kernel(dev) and B <= 65535 and V < 2**31 - 8192:
        K = _lib.kernels(dev)
        ws = torch.empty(max(8, K.argmax_f32_workspace_size(B, V)), dtype=torch.uint8, device=dev)
        with _lib.device_guard(dev):
            K.argmax_f32(logits, B, V, out, ws, ws.numel(), _checks.stream_of(dev))
        return out
    torch.argmax(logits, dim=1, out=out)
    return out
