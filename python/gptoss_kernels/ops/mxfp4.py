from __future__ import annotations

import torch

from .. import _checks, _lib, reference


def mxfp4_dequantize(blocks: torch.Tensor, scales: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """MXFP4 -> bf16, exact (spec §3.4).

    blocks: uint8 [..., G, 16] (checkpoint layout: low nibble = even element)
    scales: uint8 [..., G] (E8M0)
    out:    optional bf16 [..., 32*G] to write into
    returns bf16 [..., 32*G]
    """
    _checks.tensor("blocks", blocks, dtype=torch.uint8)
    if blocks.dim() < 2 or blocks.shape[-1] != 16:
        raise ValueError(f"blocks must have shape [..., G, 16], got {tuple(blocks.shape)}")
    _checks.tensor("scales", scales, dtype=torch.uint8, shape=blocks.shape[:-1])
    dev = _checks.same_device(blocks=blocks, scales=scales, out=out)
    out_shape = (*blocks.shape[:-2], blocks.shape[-2] * 32)
    out = _checks.out_tensor("out", out, shape=out_shape, dtype=torch.bfloat16, device=dev)
    if _lib.runs_kernels(dev):
        rows = scales.numel() // scales.shape[-1] if scales.numel() else 0
        with _lib.device_guard(dev):
            _lib.kernels(dev).mxfp4_dequantize_bf16(blocks, scales, out, rows, blocks.shape[-2] * 32,
                                                    _checks.stream_of(dev))
        return out
    _lib.warn_reference_fallback("mxfp4_dequantize", dev=dev)
    out.copy_(reference.mxfp4_dequantize(blocks, scales, torch.bfloat16))
    return out


def mxfp4_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., K] float -> (blocks uint8 [..., K/32, 16], scales uint8 [..., K/32]); OCP MX rule.
    Runs the reference on any device (a load-time tool, not a hot path)."""
    _checks.tensor("w", w, dtype=(torch.bfloat16, torch.float16, torch.float32), contiguous=False)
    if w.dim() < 1 or w.shape[-1] % 32:
        raise ValueError(f"w's last dimension must be a multiple of 32, got shape {tuple(w.shape)}")
    return reference.mxfp4_quantize(w)
