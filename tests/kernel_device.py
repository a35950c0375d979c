"""Where the GPU tests run: a CUDA GPU when one is usable, else the host-simulation build of the
same kernels (gptoss_kernels._hostsim: the kernels' source compiled for the CPU, with checkers).

A test marked ``@pytest.mark.gpu`` uses ``DEV`` for its tensors and ``sync()`` where it waited
for the GPU; conftest.py switches the ops to the hostsim backend around it when DEV is "cpu".
Tests that need the GPU itself (CUDA graphs, streams, events, timings, the device allocator) are
also marked ``@pytest.mark.cuda_only`` and are skipped on the host build with that reason.
"""

from __future__ import annotations

import torch

import gptoss_kernels
from gptoss_kernels import _lib


def gpu_usable() -> bool:
    return torch.cuda.is_available() and gptoss_kernels.kernels_error() is None


def hostsim_usable() -> bool:
    return _lib.hostsim_built()


ON_GPU = gpu_usable()
ON_HOSTSIM = not ON_GPU and hostsim_usable()
DEV = "cuda" if ON_GPU else "cpu"


def _paths_cc() -> int:
    """The compute capability the kernels' paths are chosen for on DEV (gptoss/arch.h): the card's,
    the code's or GPTOSS_ARCH_OVERRIDE's, the lowest; 90 when no kernels run."""
    info = _lib.arch_info(torch.device(DEV)) if (ON_GPU or ON_HOSTSIM) else None
    return info["cc"] if info and not info.get("error") else 90


#: The run takes the sm_90 paths (thread-block clusters, PDL, wgmma on request). False on an
#: sm_80..89 card and with GPTOSS_ARCH_OVERRIDE=80: tests marked ``hopper`` (they ask for a
#: Hopper-only path by name) are skipped then.
PATHS_CC = _paths_cc()
HOPPER_PATHS = PATHS_CC >= 90


def sync() -> None:
    """Wait for the kernels (the host build runs them to completion in the call)."""
    if ON_GPU:
        torch.cuda.synchronize()


def shrink(real: int, small: int) -> int:
    """A size: `real` on the GPU, `small` on the host build (where every thread is emulated)."""
    return real if ON_GPU else small
