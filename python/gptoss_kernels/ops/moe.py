from __future__ import annotations

import torch

from .. import _checks, _lib, reference

# Owners of the CUDA paths: decode regime (csrc/kernels/moe_decode.cu, issue 5) and prefill
# regime (csrc/kernels/moe_prefill.cu, issue 6). The op picks the path by routed rows T*k.


def check_moe_args(x, topk_ids, topk_weights, w1_blocks, w1_scales, w1_bias, w2_blocks, w2_scales, w2_bias, out):
    """Shared by the Python op and the torch custom op. Returns (device, T, H, I, E, k)."""
    _checks.tensor("x", x, dtype=torch.bfloat16, ndim=2)
    T, H = x.shape
    if H % 32:
        raise ValueError(f"x's hidden size {H} must be a multiple of 32 (MXFP4 block)")
    _checks.tensor("topk_ids", topk_ids, dtype=torch.int32, shape=(T, None))
    k = topk_ids.shape[1]
    _checks.tensor("topk_weights", topk_weights, dtype=torch.float32, shape=(T, k))
    _checks.tensor("w1_blocks", w1_blocks, dtype=torch.uint8, shape=(None, None, H // 32, 16))
    E, two_i = w1_blocks.shape[0], w1_blocks.shape[1]
    if two_i % 2 or (two_i // 2) % 32:
        raise ValueError(f"w1_blocks rows (2I = {two_i}) must be even with I a multiple of 32")
    I = two_i // 2
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


def moe_mxfp4(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
              w1_blocks: torch.Tensor, w1_scales: torch.Tensor, w1_bias: torch.Tensor,
              w2_blocks: torch.Tensor, w2_scales: torch.Tensor, w2_bias: torch.Tensor, *,
              swiglu_alpha: float = 1.702, swiglu_limit: float = 7.0, out: torch.Tensor | None = None) -> torch.Tensor:
    """MXFP4 mixture of experts with fused bias, clamped SwiGLU and weighted combine (spec §4.3 step 5-6).

    x bf16 [T, H]; topk_ids int32 [T, k]; topk_weights float32 [T, k];
    w1_blocks uint8 [E, 2I, H/32, 16], w1_scales uint8 [E, 2I, H/32], w1_bias bf16 [E, 2I]
    (gate/linear interleaved rows, checkpoint layout); w2_blocks uint8 [E, H, I/32, 16],
    w2_scales uint8 [E, H, I/32], w2_bias bf16 [E, H]; out: optional bf16 [T, H].
    returns bf16 [T, H] = sum_j topk_weights[t, j] * expert(topk_ids[t, j], x[t]).
    """
    dev, T, H, I, E, k = check_moe_args(x, topk_ids, topk_weights, w1_blocks, w1_scales, w1_bias,
                                        w2_blocks, w2_scales, w2_bias, out)
    if dev.type == "cuda":
        _lib.warn_reference_fallback("moe_mxfp4")
    check_expert_ids(topk_ids, E)
    res = reference.moe(x, topk_ids, topk_weights, w1_blocks, w1_scales, w1_bias, w2_blocks, w2_scales, w2_bias,
                        swiglu_alpha=swiglu_alpha, swiglu_limit=swiglu_limit)
    if out is None:
        return res
    out.copy_(res)
    return out
