"""Argument checks shared by the Python ops and the torch custom ops.

Every failure names the argument and says what was expected and what was given:
TypeError for a wrong dtype or a non-tensor, ValueError for shapes, devices, strides, values.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _lib


def tensor(name: str, t, *, dtype: torch.dtype | Sequence[torch.dtype] | None = None,
           ndim: int | None = None, shape: Sequence[int | None] | None = None,
           contiguous: bool = True) -> torch.Tensor:
    """Check one tensor argument; `shape` entries of None match any size."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtype is not None:
        allowed = (dtype,) if isinstance(dtype, torch.dtype) else tuple(dtype)
        if t.dtype not in allowed:
            want = " or ".join(str(d).replace("torch.", "") for d in allowed)
            raise TypeError(f"{name} must have dtype {want}, got {str(t.dtype).replace('torch.', '')}")
    if shape is not None:
        ndim = len(shape)
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if shape is not None:
        for i, (got, want) in enumerate(zip(t.shape, shape)):
            if want is not None and got != want:
                expect = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
                raise ValueError(f"{name} must have shape {expect}, got {tuple(t.shape)} (dim {i})")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (got strides {t.stride()}); call .contiguous()")
    return t


def same_device(**tensors: torch.Tensor | None) -> torch.device:
    """All given tensors on one device, and a CUDA device only where torch can run CUDA (a CUDA
    tensor on a torch without CUDA gets this line, not an error from inside torch); returns it."""
    items = [(n, t) for n, t in tensors.items() if t is not None]
    dev = items[0][1].device
    for n, t in items[1:]:
        if t.device != dev:
            raise ValueError(f"{n} is on {t.device} but {items[0][0]} is on {dev}; all tensors must be on one device")
    if dev.type == "cuda" and not _lib.cuda_available() and not torch.cuda.is_available():
        why = (f"this torch build ({torch.__version__}) has no CUDA support"
               if torch.version.cuda is None and torch.version.hip is None else "torch sees no CUDA device")
        raise ValueError(f"{items[0][0]} is on {dev}, but {why}: pass CPU tensors (the ops run the "
                         f"PyTorch reference on the CPU)")
    return dev


#: The KV-cache layout every op takes (DEVELOPERS.md): position p of sequence b in slot p % S.
KV_CACHE_LAYOUT = "[B, S, nkv, d]"


def transposed_cache_hint(name: str, t: torch.Tensor) -> str:
    """The phrase that names the expected layout of a cache that looks allocated as [B, nkv, S, d]."""
    return (f"{name} {tuple(t.shape)} looks like [B, nkv, S, d] (dims 1 and 2 swapped): the KV cache is "
            f"{KV_CACHE_LAYOUT}, position p of sequence b in slot p % S")


def kv_cache(name: str, t, shape: Sequence[int | None]) -> torch.Tensor:
    """Check a KV-cache argument: bf16 `shape` = (B, S, nkv, d) (None: any). A shape error names
    the layout, and says so when the cache looks transposed to [B, nkv, S, d]."""
    try:
        return tensor(name, t, dtype=torch.bfloat16, shape=shape)
    except ValueError as e:
        msg = str(e)
        if "must be contiguous" in msg:
            raise
        nkv = shape[2]
        if t.dim() == 4 and nkv is not None and t.shape[1] == nkv and t.shape[2] != nkv:
            raise ValueError(f"{msg}; {transposed_cache_hint(name, t)}") from None
        raise ValueError(f"{msg}; the KV cache is {KV_CACHE_LAYOUT}") from None


def out_tensor(name: str, out: torch.Tensor | None, *, shape: Sequence[int], dtype: torch.dtype,
               device: torch.device) -> torch.Tensor:
    """Validate a caller-provided output (or allocate one)."""
    if out is None:
        return torch.empty(tuple(shape), dtype=dtype, device=device)
    tensor(name, out, dtype=dtype, shape=shape)
    if out.device != device:
        raise ValueError(f"{name} is on {out.device}, inputs are on {device}")
    return out


def positive_int(name: str, v, *, multiple_of: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v % multiple_of:
        req = f"a positive int" + (f" multiple of {multiple_of}" if multiple_of > 1 else "")
        raise ValueError(f"{name} must be {req}, got {v!r}")
    return v


def stream_of(device: torch.device) -> int:
    """Raw handle of torch's current CUDA stream on `device` (what the C ABI takes); 0 for a CPU
    device (the host-simulated kernels take no stream)."""
    if device.type == "cpu":
        return 0
    return torch.cuda.current_stream(device).cuda_stream
