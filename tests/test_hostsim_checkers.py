"""The host build's checkers, each shown to fire on a kernel with a known bug (and not on a clean
one): csrc/hostsim/probes.cpp's probe_checker_kernel, case by case."""

from __future__ import annotations

import pytest
import torch

from gptoss_kernels import _lib

pytestmark = pytest.mark.skipif(not _lib.hostsim_built(), reason=f"no host build: {_lib.hostsim_error()}")

CASES = {
    1: "shared-race",      # write then another warp's read, no barrier
    2: "shared-uninit",    # read of never-written shared memory
    3: "global-oob",       # one element past the tensor
    4: "barrier",          # __syncthreads after some threads returned
    5: "collective",       # shuffle mask names exited lanes
    6: "shared-async",     # cp.async destination read before wait_group
    7: "shared-oob",       # dynamic shared memory past the launch's bytes
    8: "pdl",              # PDL launch reads the previous kernel's output before griddepcontrol.wait
}


def _probe(which: int) -> list[str]:
    from gptoss_kernels import _hostsim as hs
    buf = torch.zeros(64)
    hs.forget_previous_kernel()
    hs.begin_call([_lib.tensor_extent(buf)])
    try:
        rc = hs.probe.checker(which, buf.data_ptr(), buf.numel())
    finally:
        reports = hs.end_call()
    assert rc == 0
    return reports


@pytest.mark.parametrize("which", [0, 9])
def test_clean_kernels_report_nothing(which):
    assert _probe(which) == []


@pytest.mark.parametrize("which,kind", sorted(CASES.items()))
def test_each_checker_reports_its_bug(which, kind):
    # in forward thread order: the runner rotates the order between launches, so without this the
    # order a probe gets depends on how many launches the tests before it made, and the barrier
    # checker sees bug 4 (threads exit, the others then wait) only when a waiter is there first
    from gptoss_kernels import _hostsim as hs
    hs.set_order(0, 0x9E3779B97F4A7C15)
    try:
        reports = _probe(which)
    finally:
        hs.set_order(-1, 0x9E3779B97F4A7C15)
    assert any(r.startswith(kind + ":") for r in reports), reports
    assert "probe_checker_kernel" in reports[0]  # names the kernel


def test_every_thread_order_is_used():
    """forward, reverse and random orders rotate between launches; each can be fixed."""
    from gptoss_kernels import _hostsim as hs
    for mode in (0, 1, 2, -1):
        hs.set_order(mode, 1234)
        assert _probe(0) == []
    hs.set_order(-1, 0x9E3779B97F4A7C15)


def test_dynamic_shared_memory_limits_as_on_an_h100():
    """> 48 KB of dynamic shared memory fails the launch without the opt-in attribute; with it up
    to 227 KB runs; more fails (cudaErrorInvalidValue = 1)."""
    from gptoss_kernels import _hostsim as hs

    def ldmatrix(nbytes):  # the probe sets no attribute
        image = torch.zeros(nbytes // 2, dtype=torch.int16)
        addr, out = torch.zeros(32, dtype=torch.int32), torch.zeros(32, 4, dtype=torch.int32)
        hs.begin_call([_lib.tensor_extent(t) for t in (image, addr, out)])
        try:
            return hs.probe.ldmatrix(image.data_ptr(), nbytes, addr.data_ptr(), 0, out.data_ptr())
        finally:
            assert hs.end_call() == []

    def wgmma(nbytes):  # the probe opts in to nbytes first
        image, d = torch.zeros(nbytes // 2, dtype=torch.int16), torch.zeros(128, 32)
        hs.begin_call([_lib.tensor_extent(t) for t in (image, d)])
        try:
            return hs.probe.wgmma(image.data_ptr(), nbytes, 1 << 62, 1 << 62, 64, 0, 0, d.data_ptr())
        finally:
            assert hs.end_call() == []

    assert ldmatrix(48 * 1024) == 0
    assert ldmatrix(48 * 1024 + 16) == 1
    assert wgmma(100 * 1024) == 0
    assert wgmma(227 * 1024) == 0
    assert wgmma(227 * 1024 + 16) == 1
