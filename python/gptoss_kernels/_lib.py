"""Loading the compiled library and the facts of this build.

The package always imports: without the compiled module (a reference-only install, or a
library that fails to load) every op runs the PyTorch reference, and ``cuda_available()`` says
False. ``kernels_error()`` tells why kernels are not in use.
"""

from __future__ import annotations

import functools
import os
import warnings

try:
    from . import _build_info  # written by CMake at install time
except ImportError:  # running from a source tree that was never built
    _build_info = None

_C = None
_C_error: str | None = None
if _build_info is None:
    _C_error = "gptoss_kernels was not built (run `pip install .` with nvcc available)"
elif _build_info.REFERENCE_ONLY:
    _C_error = "this is a reference-only build (GPTOSS_REFERENCE_ONLY=1): no CUDA kernels were compiled"
else:
    try:
        from . import _C  # noqa: F811
    except ImportError as e:  # pragma: no cover - depends on the install
        _C_error = f"the compiled module failed to load: {e}"


def kernels_built() -> bool:
    """True when the CUDA kernels were compiled into this install and load."""
    return _C is not None


def kernels_error() -> str | None:
    """Why kernels cannot be used (None when ``cuda_available()``)."""
    if _C is None:
        return _C_error
    import torch

    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    major, minor = torch.cuda.get_device_capability()
    archs = build_archs()
    if not any(a.startswith(f"{major}{minor}") for a in archs):
        return (f"the kernels were built for {archs} but the GPU has compute capability {major}.{minor} "
                f"(rebuild with GPTOSS_CUDA_ARCHS={major}{minor}{'a' if major == 9 else ''})")
    return None


@functools.lru_cache(maxsize=None)
def cuda_available() -> bool:
    """True when ops on CUDA tensors run this package's kernels (else they run the reference)."""
    return kernels_error() is None


# kernel family -> the _C function its binding registers (a binding file may hold several
# families, e.g. bind_attention.cpp holds the decode attention and the RoPE/cache kernels).
KERNEL_ENTRY_POINTS = {
    "mxfp4": "mxfp4_dequantize_bf16",
    "moe_decode": "moe_mxfp4_decode",
    "moe_prefill": "moe_prefill_mxfp4",
    "router": "router_topk_bf16",
    "attention_decode": "attention_decode_bf16",
    "attention_prefill": "attention_prefill_bf16",
    "rope": "rope_qkv_bf16",
    "dense": "linear_bf16",
}


def family_built(family: str | None) -> bool:
    """This build compiled the kernels of `family` (whether or not this machine can run them)."""
    if _C is None or family is None:
        return False
    return family in _C.families or hasattr(_C, KERNEL_ENTRY_POINTS.get(family, "-"))


def build_archs() -> list[str]:
    return list(_build_info.CUDA_ARCHS) if _build_info is not None and not _build_info.REFERENCE_ONLY else []


def library_path() -> str:
    """Absolute path of libgptoss_kernels.so (the C ABI; headers under ``include_path()``)."""
    # next to _C (an editable install keeps compiled files apart from the Python sources)
    base = os.path.dirname(_C.__file__) if _C is not None else os.path.dirname(__file__)
    path = os.path.join(base, "libgptoss_kernels.so")
    if not os.path.exists(path):
        raise FileNotFoundError(f"libgptoss_kernels.so is not installed: {_C_error or 'unknown reason'}")
    return path


def include_path() -> str:
    """Folder holding gptoss/gptoss.h, for -I."""
    return os.path.join(os.path.dirname(library_path()), "include")


def build_info() -> dict:
    """Facts of this build (for `gptoss-kernels info` and benchmark JSON)."""
    info = {
        "reference_only": bool(_build_info is None or _build_info.REFERENCE_ONLY),
        "cuda_build_version": getattr(_build_info, "CUDA_VERSION", None),
        "cuda_archs": build_archs(),
        "kernels_built": kernels_built(),
        "kernel_families": sorted(f for f in KERNEL_ENTRY_POINTS if family_built(f)),
        "abi_version": _C.abi_version if _C is not None else None,
        "pdl": pdl_enabled(),
    }
    return info


def pdl_enabled() -> bool | None:
    """Whether the decode-path kernels launch with programmatic dependent launch (None: no kernels)."""
    return bool(_C.pdl_enabled()) if _C is not None and hasattr(_C, "pdl_enabled") else None


def set_pdl(enabled: bool) -> bool | None:
    """Programmatic dependent launch on/off for later kernel launches (CUDA graphs keep what they
    captured); returns the previous setting. Results are identical either way: for measuring."""
    before = pdl_enabled()
    if before is not None:
        _C.set_pdl(bool(enabled))
    return before


_warned: set[tuple[str, str]] = set()


def warn_reference_fallback(op: str, reason: str | None = None) -> None:
    """Say once per op (and reason) that CUDA tensors are going through the reference path."""
    reason = reason or kernels_error() or "the kernels do not support these shapes or arguments"
    if (op, reason) not in _warned:
        _warned.add((op, reason))
        warnings.warn(f"gptoss_kernels.{op}: running the PyTorch reference on CUDA tensors because "
                      f"{reason}", RuntimeWarning, stacklevel=3)


def C():
    """The compiled module (only call when cuda_available())."""
    return _C
