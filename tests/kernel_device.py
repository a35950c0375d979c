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


def sync() -> None:
    """Wait for the kernels (the host build runs them to completion in the call)."""
    if ON_GPU:
        torch.cuda.synchronize()


def shrink(real: int, small: int) -> int:
    """A size: `real` on the GPU, `small` on the host build (where every thread is emulated)."""
    return real if ON_GPU else small
