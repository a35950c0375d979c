from __future__ import annotations

from typing import NamedTuple

import torch

from .. import _checks, _lib, reference

# Owner of the CUDA path: the router kernel (csrc/kernels/router.cu, issue 7).


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


def router_topk(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, k: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits, top-k, softmax over the selected (spec §4.3 steps 2-4).

    x bf16 [T, H]; weight bf16 [E, H]; bias bf16 [E]
    -> topk_ids int32 [T, k] (descending logit; ties to the lower expert index; NaN logits rank
       last so ids are always in [0, E)), topk_weights float32 [T, k] (softmax of the k logits).
    """
    dev = _check_router_args(x, weight, bias, k)
    if dev.type == "cuda":
        _lib.warn_reference_fallback("router_topk")
    return reference.router_topk(x, weight, bias, k)


def route(topk_ids: torch.Tensor, num_experts: int) -> RouteMetadata:
    """Group routed rows by expert: topk_ids int32 [T, k] -> RouteMetadata (see its doc)."""
    _checks.tensor("topk_ids", topk_ids, dtype=torch.int32, ndim=2)
    _checks.positive_int("num_experts", num_experts)
    return RouteMetadata(*reference.route_metadata(topk_ids, num_experts))
