from __future__ import annotations

import warnings

import torch

from .. import _checks, _lib, reference

# Owners of the CUDA paths: decode regime (csrc/kernels/moe_decode.cu) and prefill
# regime (csrc/kernels/moe_prefill.cu). The op picks the path by routed rows T*k:
# T*k <= PREFILL_MIN_ROUTED_ROWS -> decode kernels (each selected expert's weights streamed once,
# tensor-core GEMVs); above it -> ops._moe_prefill.run (grouped GEMMs) when that module imports
# and is available(), else the decode kernels (which take any T, in chunks of
# MOE_DECODE_MAX_ROUTED_ROWS routed rows).
#
# The crossover is a guess (the decode kernels' chunk size): it must be measured by
# `gptoss-kernels bench moe` on the target GPU (decode vs prefill time at T*k around it).
PREFILL_MIN_ROUTED_ROWS = 256
# Name the benchmark (bench/ops.py: moe_family) reads: T*k up to this runs the decode regime.
MOE_DECODE_MAX_ROWS = PREFILL_MIN_ROUTED_ROWS

# Limits of the decode kernels (gptoss/moe.h) and of the prefill kernels (gptoss/moe_prefill.h).
MOE_DECODE_MAX_ROUTED_ROWS = 256   # routed rows per kernel chunk (the launcher loops over chunks)
MOE_DECODE_MAX_EXPERTS = 4096
MOE_MAX_K = 8
_PREFILL_MAX_EXPERTS = 256


def check_moe_args(x, topk_ids, topk_weights, w1_blocks, w1_scales, w1_bias, w2_blocks, w2_scales, w2_bias, out):
    """Shared by the Python op and the torch custom op. Returns (device, T, H, I, E, k)."""
    _checks.tensor("x", x, dtype=torch.bfloat16, ndim=2)
    T, H = x.shape
    if H % 32:
        raise ValueError(f"x's hidden size {H} must be a multiple of 32 (MXFP4 block)")
    _checks.tensor("topk_ids", topk_ids, dtype=torch.int32, shape=(T, None))
    k = topk_ids.shape[1]
    if not 1 <= k <= MOE_MAX_K:
        raise ValueError(f"topk_ids must have 1 to {MOE_MAX_K} experts per token (k), got shape {tuple(topk_ids.shape)}")
    _checks.tensor("topk_weights", topk_weights, dtype=torch.float32, shape=(T, k))
    _checks.tensor("w1_blocks", w1_blocks, dtype=torch.uint8, shape=(None, None, H // 32, 16))
    E, two_i = w1_blocks.shape[0], w1_blocks.shape[1]
    if two_i % 2 or (two_i // 2) % 32:
        raise ValueError(f"w1_blocks rows (2I = {two_i}) must be even with I a multiple of 32")
    I = two_i // 2
    if E < 1:
        raise ValueError(f"w1_blocks must hold at least one expert, got shape {tuple(w1_blocks.shape)}")
    _checks.tensor("w1_scales", w1_scales, dtype=torch.uint8, shape=(E, two_i, H // 32))
    _checks.tensor("w1_bias", w1_bias, dtype=torch.bfloat16, shape=(E, two_i))
    _checks.tensor("w2_blocks", w2_blocks, dtype=torch.uint8, shape=(E, H, I // 32, 16))
    _checks.tensor("w2_scales", w2_scales, dtype=torch.uint8, shape=(E, H, I // 32))
    _checks.tensor("w2_bias", w2_bias, dtype=torch.bfloat16, shape=(E, H))
    dev = _checks.same_device(x=x, topk_ids=topk_ids, topk_weights=topk_weights, w1_blocks=w1_blocks,
                              w1_scales=w1_scales, w1_bias=w1_bias, w2_blocks=w2_blocks, w2_scales=w2_scales,
                              w2_bias=w2_bias, out=out)
    if out is not None:
        _checks.out_tensor("out", out, shape=(T, H), dtype=torch.bfloat16, device=dev)
    return dev, T, H, I, E, k


def check_expert_ids(topk_ids: torch.Tensor, num_experts: int) -> None:
    """Raise if an id is out of [0, E). Costs a device sync on CUDA: skip it inside graphs."""
    if topk_ids.numel() and (int(topk_ids.min()) < 0 or int(topk_ids.max()) >= num_experts):
        raise ValueError(f"topk_ids must be in [0, {num_experts}), got values in "
                         f"[{int(topk_ids.min())}, {int(topk_ids.max())}]")


def _prefill_module(dev: torch.device | None = None):
    """ops._moe_prefill if it imports and its kernels can run on `dev` (default: CUDA), else None
    (imported lazily: the prefill regime is built separately and may be absent)."""
    try:
        from . import _moe_prefill
    except Exception:  # noqa: BLE001 - absent or broken module: the decode kernels take any T
        return None
    try:
        return _moe_prefill if _moe_prefill.available(dev) else None
    except Exception:  # noqa: BLE001
        return None


def wants_prefill(T: int, k: int, E: int) -> bool:
    """The regime choice on the kernels (CUDA, or CPU under the hostsim backend): the prefill
    kernels (when present) above PREFILL_MIN_ROUTED_ROWS routed rows and within their expert
    limit, the decode kernels otherwise."""
    return T * k > PREFILL_MIN_ROUTED_ROWS and E <= _PREFILL_MAX_EXPERTS


def _decode_available(dev: torch.device | None = None) -> bool:
    """The decode kernels are in the module that runs `dev`'s tensors (default: CUDA)."""
    dev = torch.device("cuda") if dev is None else dev
    if dev.type == "cuda":
        C = _lib.C()
        return C is not None and hasattr(C, "moe_mxfp4_decode")
    return _lib.runs_kernels(dev) and hasattr(_lib.kernels(dev), "moe_mxfp4_decode")


def _kernels_unsupported(x, w1_blocks, w2_blocks, out, E, dev: torch.device) -> str | None:
    """Why tensors of `dev` cannot take the kernels (then the reference runs, with a warning when
    they were meant to: CUDA, or CPU under the hostsim backend), or None."""
    if not _lib.runs_kernels(dev):
        return _lib.kernels_error(dev) or "kernels unavailable"
    if not _decode_available(dev):
        return "this build has no moe_decode kernels"
    if E > MOE_DECODE_MAX_EXPERTS:
        return f"E={E} > {MOE_DECODE_MAX_EXPERTS} experts is not supported by the kernels"
    for name, t, a in (("x", x, 16), ("w1_blocks", w1_blocks, 16), ("w2_blocks", w2_blocks, 16), ("out", out, 8)):
        if t is not None and t.numel() and t.data_ptr() % a:
            return f"{name} is not {a}-byte aligned"
    return None


_warned: set[str] = set()


def _warn_unsupported(why: str, dev: torch.device | None = None) -> None:
    where = _lib._tensors_phrase(dev)
    if (why, where) not in _warned:
        _warned.add((why, where))
        warnings.warn(f"gptoss_kernels.moe_mxfp4: running the PyTorch reference on {where} because {why}",
                      RuntimeWarning, stacklevel=3)


def decode_workspace_bytes(T: int, k: int, H: int, I: int, dev: torch.device | None = None) -> int:  # noqa: E741
    """Bytes of device workspace the decode kernels need (act bf16 + y fp32 for one token chunk);
    asked of the module that runs `dev`'s tensors (default: the CUDA one)."""
    K = _lib.C() if dev is None else _lib.kernels(dev)
    return int(K.moe_mxfp4_decode_workspace_size(T, k, H, I))


def run_decode(x, topk_ids, topk_weights, w1_blocks, w1_scales, w1_bias, w2_blocks, w2_scales, w2_bias,
               swiglu_alpha, swiglu_limit, out, *, workspace: torch.Tensor | None = None) -> torch.Tensor:
    """The decode-regime kernels (csrc/kernels/moe_decode.cu) on checked CUDA tensors (or CPU
    tensors under the hostsim backend); `workspace` (uint8, >= decode_workspace_bytes) comes from
    torch's caching allocator when not given.
    Ids outside [0, E) are never read through: those tokens' rows come out NaN (no host sync)."""
    T, H = x.shape
    k = topk_ids.shape[1]
    E, two_i = w1_blocks.shape[0], w1_blocks.shape[1]
    I = two_i // 2  # noqa: E741
    if T == 0:
        return out
    for name, t in (("x", x), ("w1_blocks", w1_blocks), ("w2_blocks", w2_blocks)):
        if t.data_ptr() % 16:
            raise ValueError(f"{name} must be 16-byte aligned for the CUDA kernels (data_ptr % 16 = {t.data_ptr() % 16})")
    if out.data_ptr() % 8:
        raise ValueError("out must be 8-byte aligned for the CUDA kernels")
    dev = x.device
    need = decode_workspace_bytes(T, k, H, I, dev)
    if workspace is None:
        workspace = torch.empty(max(need, 1), dtype=torch.uint8, device=x.device)
    elif workspace.dtype != torch.uint8 or workspace.device != x.device or workspace.numel() < need:
        raise ValueError(f"workspace must be uint8 on {x.device} with >= {need} bytes")
    with _lib.device_guard(dev):
        _lib.kernels(dev).moe_mxfp4_decode(x, topk_ids, topk_weights, w1_blocks, w1_scales, w1_bias, w2_blocks,
                                           w2_scales, w2_bias, float(swiglu_alpha), float(swiglu_limit), out, T, H, I,
                                           E, k, workspace, workspace.numel(), _checks.stream_of(dev))
    return out


def moe_bytes_read(T: int, k: int, E: int, H: int, I: int, topk_ids: torch.Tensor | None = None) -> int:  # noqa: E741
    """Bytes one call must move at the least, for bandwidth figures: every selected expert's MXFP4
    blocks + scales + bf16 biases of both matrices once, plus x read, out written and the routing
    (ids int32 + weights f32). The experts counted are the distinct ids of `topk_ids` when given,
    else the expected number of distinct experts under uniform routing of k distinct experts per
    token, E (1 - (1 - k/E)^T), rounded (the benchmark's count)."""
    if topk_ids is not None:
        distinct = int(torch.unique(topk_ids.reshape(-1)).numel()) if topk_ids.numel() else 0
    else:
        distinct = min(E, round(E * (1 - (1 - k / E) ** T))) if T > 0 else 0
    w1 = 2 * I * (H // 32) * 17 + 2 * I * 2      # blocks (16 B) + scale (1 B) per 32 elements, bias
    w2 = H * (I // 32) * 17 + H * 2
    return int(distinct * (w1 + w2) + 2 * T * H * 2 + T * k * 8)


def moe_mxfp4(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
              w1_blocks: torch.Tensor, w1_scales: torch.Tensor, w1_bias: torch.Tensor,
              w2_blocks: torch.Tensor, w2_scales: torch.Tensor, w2_bias: torch.Tensor, *,
              swiglu_alpha: float = 1.702, swiglu_limit: float = 7.0, out: torch.Tensor | None = None,
              validate_ids: bool | None = None) -> torch.Tensor:
    """MXFP4 mixture of experts with fused bias, clamped SwiGLU and weighted combine (spec §4.3 step 5-6).

    x bf16 [T, H]; topk_ids int32 [T, k]; topk_weights float32 [T, k];
    w1_blocks uint8 [E, 2I, H/32, 16], w1_scales uint8 [E, 2I, H/32], w1_bias bf16 [E, 2I]
    (gate/linear interleaved rows, checkpoint layout); w2_blocks uint8 [E, H, I/32, 16],
    w2_scales uint8 [E, H, I/32], w2_bias bf16 [E, H]; out: optional bf16 [T, H].
    returns bf16 [T, H] = sum_j topk_weights[t, j] * expert(topk_ids[t, j], x[t]).
    1 <= k <= 8. Deterministic: the same inputs give the same bits (no float atomics).
    MXFP4 scales are applied exactly (ldexp); exception: scale byte 255 (2^128, absent from real
    checkpoints) on the prefill kernels (T*k > PREFILL_MIN_ROUTED_ROWS) gives NaN for its zero codes
    and inf for its 0.5 codes (the reference: 0 and 2^127).

    validate_ids: ids outside [0, E) raise ValueError when checked. None (default): checked on
    the reference path and before the prefill kernels (not while capturing a CUDA graph); not
    checked before the decode kernels, which never read through a bad id and write NaN rows for
    the tokens holding one (checking costs a host sync). True: always checked (a sync on CUDA;
    skipped while capturing). False: never checked (the reference path then raises IndexError).
    """
    dev, T, H, I, E, k = check_moe_args(x, topk_ids, topk_weights, w1_blocks, w1_scales, w1_bias,
                                        w2_blocks, w2_scales, w2_bias, out)
    expects = _lib.expects_kernels(dev)
    why = _kernels_unsupported(x, w1_blocks, w2_blocks, out, E, dev) if expects else None
    if expects and why is None:
        capturing = dev.type == "cuda" and torch.cuda.is_current_stream_capturing()
        if validate_ids and not capturing:
            check_expert_ids(topk_ids, E)
        out = _checks.out_tensor("out", out, shape=(T, H), dtype=torch.bfloat16, device=dev)
        if wants_prefill(T, k, E):
            pre = _prefill_module(dev)
            if pre is not None:
                # the prefill kernels require ids in [0, E): check them unless inside a graph capture
                if validate_ids is None and not capturing:
                    check_expert_ids(topk_ids, E)
                return pre.run(x, topk_ids, topk_weights, w1_blocks, w1_scales, w1_bias, w2_blocks, w2_scales,
                               w2_bias, swiglu_alpha, swiglu_limit, out)
        return run_decode(x, topk_ids, topk_weights, w1_blocks, w1_scales, w1_bias, w2_blocks, w2_scales, w2_bias,
                          swiglu_alpha, swiglu_limit, out)
    if expects:
        if why is not None and _lib.runs_kernels(dev):
            _warn_unsupported(why, dev)
        else:
            _lib.warn_reference_fallback("moe_mxfp4", dev=dev)
    if validate_ids is not False:
        check_expert_ids(topk_ids, E)
    res = reference.moe(x, topk_ids, topk_weights, w1_blocks, w1_scales, w1_bias, w2_blocks, w2_scales, w2_bias,
                        swiglu_alpha=swiglu_alpha, swiglu_limit=swiglu_limit)
    if out is None:
        return res
    out.copy_(res)
    return out


def moe_mxfp4_add_rms_norm(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                           w1_blocks: torch.Tensor, w1_scales: torch.Tensor, w1_bias: torch.Tensor,
                           w2_blocks: torch.Tensor, w2_scales: torch.Tensor, w2_bias: torch.Tensor,
                           residual: torch.Tensor, norm_weight: torch.Tensor, *, eps: float = 1e-5,
                           swiglu_alpha: float = 1.702, swiglu_limit: float = 7.0,
                           norm_out: torch.Tensor | None = None, residual_out: torch.Tensor | None = None,
                           validate_ids: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The MoE and the residual add + RMSNorm after it (a decode step's layer end):
    rms_norm(moe_mxfp4(x, ...), norm_weight, residual=residual) -> (norm_out, residual_out).

    Shapes as moe_mxfp4; residual bf16 [T, H]; norm_weight bf16 or float32 [H]; norm_out,
    residual_out optional bf16 [T, H] (residual_out may alias residual). On CUDA in the decode
    regime the norm runs inside the MoE's combine kernel (one launch fewer, the same bits as the two
    ops); otherwise the two ops run one after the other."""
    from .dense import rms_norm

    dev, T, H, I, E, k = check_moe_args(x, topk_ids, topk_weights, w1_blocks, w1_scales, w1_bias,
                                        w2_blocks, w2_scales, w2_bias, None)
    _checks.tensor("residual", residual, dtype=torch.bfloat16, shape=(T, H))
    _checks.tensor("norm_weight", norm_weight, dtype=(torch.bfloat16, torch.float32), shape=(H,))
    _checks.same_device(x=x, residual=residual, norm_weight=norm_weight, norm_out=norm_out, residual_out=residual_out)
    norm_out = _checks.out_tensor("norm_out", norm_out, shape=(T, H), dtype=torch.bfloat16, device=dev)
    residual_out = _checks.out_tensor("residual_out", residual_out, shape=(T, H), dtype=torch.bfloat16, device=dev)
    fused = (_lib.expects_kernels(dev) and _kernels_unsupported(x, w1_blocks, w2_blocks, None, E, dev) is None
             and hasattr(_lib.kernels(dev), "moe_mxfp4_decode_add_rms_norm") and H // 8 <= 1024
             and not (wants_prefill(T, k, E) and _prefill_module(dev) is not None)
             and all(t.data_ptr() % 16 == 0 for t in (residual, residual_out, norm_weight, norm_out)))
    if not fused:
        m = moe_mxfp4(x, topk_ids, topk_weights, w1_blocks, w1_scales, w1_bias, w2_blocks, w2_scales, w2_bias,
                      swiglu_alpha=swiglu_alpha, swiglu_limit=swiglu_limit, validate_ids=validate_ids)
        return rms_norm(m, norm_weight, eps=eps, residual=residual, out=norm_out, residual_out=residual_out)
    if T == 0:
        return norm_out, residual_out
    if validate_ids and not (dev.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        check_expert_ids(topk_ids, E)
    need = decode_workspace_bytes(T, k, H, I, dev)
    workspace = torch.empty(max(need, 1), dtype=torch.uint8, device=dev)
    with _lib.device_guard(dev):
        _lib.kernels(dev).moe_mxfp4_decode_add_rms_norm(
            x, topk_ids, topk_weights, w1_blocks, w1_scales, w1_bias, w2_blocks, w2_scales, w2_bias,
            float(swiglu_alpha), float(swiglu_limit), residual, residual_out, norm_weight,
            norm_weight.dtype == torch.float32, float(eps), norm_out, T, H, I, E, k, workspace, workspace.numel(),
            _checks.stream_of(dev))
    return norm_out, residual_out
