from __future__ import annotations

import warnings
from typing import NamedTuple

import torch

from .. import _checks, _lib, reference

# CUDA path: csrc/kernels/router.cu (C ABI in csrc/include/gptoss/router.h, selection math in
# csrc/topk.cuh). Limits of the CUDA path: E <= 256, k <= 8, H % 8 == 0, x and weight 16-byte
# aligned; other shapes run the reference on CUDA tensors too (with a one-time warning).

_PATHS = {"auto": 0, "fused": 1, "split": 2, "cluster": 3}
_MAX_E = 256
_MAX_K = 8


class RouteMetadata(NamedTuple):
    """Grouping of routed rows by expert (layout of reference.route_metadata).

    counts int32 [E]; offsets int32 [E+1] (exclusive prefix sum); permutation int32 [T*k]:
    flat row ids r = t*k + j sorted by expert, stable (token order within an expert)."""

    counts: torch.Tensor
    offsets: torch.Tensor
    permutation: torch.Tensor


def _check_router_args(x, weight, bias, k):
    _checks.tensor("x", x, dtype=torch.bfloat16, ndim=2)
    T, H = x.shape
    _checks.tensor("weight", weight, dtype=torch.bfloat16, shape=(None, H))
    E = weight.shape[0]
    _checks.tensor("bias", bias, dtype=torch.bfloat16, shape=(E,))
    _checks.positive_int("k", k)
    if k > E:
        raise ValueError(f"k={k} is larger than the number of experts E={E}")
    return _checks.same_device(x=x, weight=weight, bias=bias)


_warned_shapes: set[str] = set()


def _warn_unsupported(op: str, why: str, dev: torch.device | None = None) -> None:
    key = op if dev is None or dev.type == "cuda" else f"{op}@{dev.type}"
    if key not in _warned_shapes:
        _warned_shapes.add(key)
        warnings.warn(f"gptoss_kernels.{op}: running the PyTorch reference on {_lib._tensors_phrase(dev)} because "
                      f"{why}", RuntimeWarning, stacklevel=3)


def _router_cuda_unsupported(x, weight, k) -> str | None:
    E, H = weight.shape
    if E > _MAX_E:
        return f"E={E} > {_MAX_E} is not supported by the kernel"
    if k > _MAX_K:
        return f"k={k} > {_MAX_K} is not supported by the kernel"
    if H % 8:
        return f"H={H} is not a multiple of 8"
    if x.data_ptr() % 16 or weight.data_ptr() % 16:
        return "x or weight is not 16-byte aligned"
    return None


def _out_pair(out, T, k, device):
    if out is None:
        return None, None
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise TypeError("out must be a tuple (topk_ids, topk_weights)")
    ids = _checks.out_tensor("out[0] (topk_ids)", out[0], shape=(T, k), dtype=torch.int32, device=device)
    w = _checks.out_tensor("out[1] (topk_weights)", out[1], shape=(T, k), dtype=torch.float32, device=device)
    return ids, w


def router_topk(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, k: int = 4, *,
                out: tuple[torch.Tensor, torch.Tensor] | None = None, return_metadata: bool = False,
                metadata_out: RouteMetadata | None = None, path: str = "auto"):
    """Router logits, top-k, softmax over the selected (spec §4.3 steps 2-4).

    x bf16 [T, H]; weight bf16 [E, H]; bias bf16 [E]
    -> topk_ids int32 [T, k] (descending logit; ties to the lower expert index; NaN logits rank
       last, tied with -inf, so ids are always in [0, E)), topk_weights float32 [T, k] (softmax of
       the k selected fp32 logits, torch.softmax's rules for non-finite values: all k weights are
       NaN when a selected logit is NaN or +inf, or when all k are -inf).

    out: optional (topk_ids, topk_weights) to write into (graph-safe use: with out= and
         metadata_out= the call allocates only its scratch workspace, through torch's allocator).
    return_metadata: also group the routed rows by expert and return
         (topk_ids, topk_weights, RouteMetadata) — the same as calling route(topk_ids, E) after,
         in one call (on CUDA: the router kernel(s) then route's three small kernels, no host sync).
    metadata_out: optional RouteMetadata of output tensors for return_metadata.
    path: "auto" | "fused" | "split" | "cluster" — which CUDA kernel path (see gptoss/router.h;
         "cluster" takes E <= 128 and sm_90: a ValueError below); results agree up to accumulation
         order; for tests and benchmarks.
    """
    dev = _check_router_args(x, weight, bias, k)
    if path not in _PATHS:
        raise ValueError(f"path must be one of {sorted(_PATHS)}, got {path!r}")
    T, H = x.shape
    E = weight.shape[0]
    if path == "cluster" and E > 128:
        raise ValueError(f"path='cluster' takes at most 128 experts, got weight with E={E}")
    ids, wts = _out_pair(out, T, k, dev)
    if metadata_out is not None and not return_metadata:
        raise ValueError("metadata_out is given but return_metadata is False")

    kernel = _lib.runs_kernels(dev)
    why = _router_cuda_unsupported(x, weight, k) if kernel else None
    if kernel and why is None:
        if ids is None:
            ids = torch.empty((T, k), dtype=torch.int32, device=dev)
            wts = torch.empty((T, k), dtype=torch.float32, device=dev)
        K = _lib.kernels(dev)
        mode = _PATHS[path]
        nbytes = K.router_topk_workspace_size(T, H, E, k, mode)
        ws = torch.empty(nbytes, dtype=torch.uint8, device=dev) if nbytes else None
        with _lib.device_guard(dev):
            K.router_topk_bf16(x, weight, bias, ids, wts, T, H, E, k, mode, ws, nbytes, _checks.stream_of(dev))
    else:
        if kernel:
            _warn_unsupported("router_topk", why, dev)
        else:
            _lib.warn_reference_fallback("router_topk", dev=dev)
        rid, rw = reference.router_topk(x, weight, bias, k)
        if ids is None:
            ids, wts = rid, rw
        else:
            ids.copy_(rid)
            wts.copy_(rw)
    if return_metadata:
        return ids, wts, route(ids, E, out=metadata_out)
    return ids, wts


def add_rms_norm_router_topk(delta: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor,
                             weight: torch.Tensor, bias: torch.Tensor, k: int = 4, *, eps: float = 1e-5,
                             norm_out: torch.Tensor | None = None, residual_out: torch.Tensor | None = None,
                             out=None):
    """The decode step's residual add + RMSNorm before the MoE, with the router on its result:
    h = delta + residual (bf16), a = RMSNorm(h) * norm_weight, (ids, w) = router_topk(a, weight,
    bias, k). Returns (a, h, ids, w): the values of rms_norm(delta, norm_weight, residual=residual)
    then router_topk. On CUDA for T <= 16 and E <= 128 on sm_90 one kernel (the router's cluster
    kernel computes the norm first); otherwise (and below sm_90, which has no thread-block
    clusters) the two ops.

    delta, residual bf16 [T, H]; norm_weight bf16 or float32 [H]; weight bf16 [E, H]; bias bf16 [E];
    norm_out, residual_out optional bf16 [T, H] (residual_out may alias residual); out optional
    (topk_ids int32 [T, k], topk_weights float32 [T, k])."""
    from .dense import rms_norm

    dev = _check_router_args(delta, weight, bias, k)
    T, H = delta.shape
    E = weight.shape[0]
    _checks.tensor("residual", residual, dtype=torch.bfloat16, shape=(T, H))
    _checks.tensor("norm_weight", norm_weight, dtype=(torch.bfloat16, torch.float32), shape=(H,))
    _checks.same_device(delta=delta, residual=residual, norm_weight=norm_weight, norm_out=norm_out,
                        residual_out=residual_out)
    norm_out = _checks.out_tensor("norm_out", norm_out, shape=(T, H), dtype=torch.bfloat16, device=dev)
    residual_out = _checks.out_tensor("residual_out", residual_out, shape=(T, H), dtype=torch.bfloat16, device=dev)
    ids, wts = _out_pair(out, T, k, dev)
    C = _lib.kernels(dev) if _lib.runs_kernels(dev) else None
    fused = (C is not None and hasattr(C, "add_rms_norm_router_topk_bf16") and (dev.type, dev.index) not in _CLUSTER_REFUSED
             and _lib.clusters_available(dev)
             and T <= C.add_rms_norm_router_topk_max_tokens and E <= 128 and k <= _MAX_K and H % 8 == 0
             and H // 8 <= 1024
             and all(t.data_ptr() % 16 == 0 for t in (delta, residual, residual_out, norm_weight, norm_out, weight)))
    if not fused:
        rms_norm(delta, norm_weight, eps=eps, residual=residual, out=norm_out, residual_out=residual_out)
        ids, wts = router_topk(norm_out, weight, bias, k, out=None if ids is None else (ids, wts))
        return norm_out, residual_out, ids, wts
    if ids is None:
        ids = torch.empty((T, k), dtype=torch.int32, device=dev)
        wts = torch.empty((T, k), dtype=torch.float32, device=dev)
    if T:
        try:
            with _lib.device_guard(dev):
                C.add_rms_norm_router_topk_bf16(delta, residual, residual_out, norm_weight,
                                                norm_weight.dtype == torch.float32, float(eps), norm_out, weight, bias,
                                                ids, wts, T, H, E, k, _checks.stream_of(dev))
        except ValueError as e:
            if "cluster launch was refused" not in str(e):
                raise
            # a partitioned GPU (MIG, MPS SM limits, green contexts) refuses the 8-block cluster:
            # the two ops compute the same values; remembered for the device (the next call, maybe
            # inside a graph capture, does not try again)
            _CLUSTER_REFUSED.add((dev.type, dev.index))
            rms_norm(delta, norm_weight, eps=eps, residual=residual, out=norm_out, residual_out=residual_out)
            router_topk(norm_out, weight, bias, k, out=(ids, wts))
    return norm_out, residual_out, ids, wts


# devices whose runtime refused the router's thread-block cluster (add_rms_norm_router_topk)
_CLUSTER_REFUSED: set = set()


def route(topk_ids: torch.Tensor, num_experts: int, *, out: RouteMetadata | None = None) -> RouteMetadata:
    """Group routed rows by expert: topk_ids int32 [T, k] -> RouteMetadata (see its doc).

    Ids must be in [0, num_experts): on CPU tensors a ValueError says otherwise; on CUDA (no host
    sync) rows with such ids are left out of counts and the tail permutation[offsets[E]:] is -1
    (so too on CPU tensors under the hostsim backend, which runs the same kernels).
    out: optional RouteMetadata of int32 tensors [E], [E+1], [T*k] to write into.
    """
    _checks.tensor("topk_ids", topk_ids, dtype=torch.int32, ndim=2)
    _checks.positive_int("num_experts", num_experts)
    dev = topk_ids.device
    E, n = num_experts, topk_ids.numel()
    if out is not None:
        if not isinstance(out, (tuple, list)) or len(out) != 3:
            raise TypeError("out must be a RouteMetadata (counts, offsets, permutation)")
        out = RouteMetadata(
            _checks.out_tensor("out.counts", out[0], shape=(E,), dtype=torch.int32, device=dev),
            _checks.out_tensor("out.offsets", out[1], shape=(E + 1,), dtype=torch.int32, device=dev),
            _checks.out_tensor("out.permutation", out[2], shape=(n,), dtype=torch.int32, device=dev))
    kernel = _lib.runs_kernels(dev)
    if kernel and E <= _MAX_E:
        if out is None:
            out = RouteMetadata(torch.empty(E, dtype=torch.int32, device=dev),
                                torch.empty(E + 1, dtype=torch.int32, device=dev),
                                torch.empty(n, dtype=torch.int32, device=dev))
        K = _lib.kernels(dev)
        nbytes = K.route_workspace_size(n, E)
        ws = torch.empty(nbytes, dtype=torch.uint8, device=dev) if nbytes else None
        with _lib.device_guard(dev):
            K.route(topk_ids, n, E, out.counts, out.offsets, out.permutation, ws, nbytes, _checks.stream_of(dev))
        return out
    if kernel:
        _warn_unsupported("route", f"num_experts={E} > {_MAX_E} is not supported by the kernel", dev)
    elif _lib.expects_kernels(dev):
        _lib.warn_reference_fallback("route", dev=dev)
    if dev.type != "cuda" and n and (int(topk_ids.min()) < 0 or int(topk_ids.max()) >= E):
        raise ValueError(f"topk_ids must be in [0, num_experts={E}), got values in "
                         f"[{int(topk_ids.min())}, {int(topk_ids.max())}]")
    res = RouteMetadata(*reference.route_metadata(topk_ids, E))
    if out is None:
        return res
    for o, r in zip(out, res):
        o.copy_(r)
    return out
