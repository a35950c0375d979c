"""The hostsim backend as users reach it: the switch, what `info` says, and that the benchmarks
never time it."""

from __future__ import annotations

import pytest
import torch

import gptoss_kernels as gk
from gptoss_kernels import _lib

needs_hostsim = pytest.mark.skipif(not _lib.hostsim_built(), reason=f"no host build: {_lib.hostsim_error()}")


@needs_hostsim
def test_bench_never_times_the_host_build(capsys):
    from gptoss_kernels.bench.timing import refuse_hostsim_timing

    with _lib.use_backend("hostsim"):
        refuse_hostsim_timing()
        assert _lib.backend() == "reference"
    assert "not timing" in capsys.readouterr().err


@needs_hostsim
def test_backend_switch_routes_cpu_tensors_through_the_kernels():
    from gptoss_kernels import _hostsim

    blocks = torch.randint(0, 256, (3, 4, 16), dtype=torch.uint8)
    scales = torch.randint(100, 140, (3, 4), dtype=torch.uint8)
    before = _hostsim.stats()["launches"]
    ref = gk.mxfp4_dequantize(blocks, scales)  # reference backend: no kernel
    assert _hostsim.stats()["launches"] == before
    with _lib.use_backend("hostsim"):
        out = gk.mxfp4_dequantize(blocks, scales)
    assert _hostsim.stats()["launches"] == before + 1
    assert torch.equal(out.view(torch.int16), ref.view(torch.int16))


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="hostsim"):
        _lib.set_backend("gpu-please")


@needs_hostsim
def test_build_info_names_the_host_build():
    info = _lib.build_info()
    assert info["hostsim_built"] is True and info["backend"] in ("reference", "hostsim")


def _rms_case():
    g = torch.Generator().manual_seed(3)
    return torch.randn(3, 64, generator=g).bfloat16(), torch.randn(64, generator=g).bfloat16()


@needs_hostsim
def test_pdl_stays_on_when_a_launch_fails_for_another_reason():
    """Only the runtime refusing the PDL attribute itself turns PDL off; any other launch error is
    returned as it is (here cudaErrorLaunchOutOfResources = 701) and changes nothing."""
    from gptoss_kernels import _hostsim as hs

    x, w = _rms_case()
    hs.set_refuse_pdl(701)
    try:
        with _lib.use_backend("hostsim"), pytest.raises(RuntimeError, match="LaunchOutOfResources"):
            gk.rms_norm(x, w)
    finally:
        hs.set_refuse_pdl(0)
    assert hs.pdl_enabled() and hs.pdl_off_reason() == ""


@needs_hostsim
def test_a_refused_pdl_attribute_turns_pdl_off_and_says_why():
    """cudaErrorNotSupported (801) for the attribute, and the plain launch works: the op succeeds,
    PDL stays off for the process, and the reason is reported (info, bench JSON)."""
    from gptoss_kernels import _hostsim as hs
    from gptoss_kernels import reference

    x, w = _rms_case()
    hs.set_refuse_pdl(801)
    try:
        with _lib.use_backend("hostsim"):
            y = gk.rms_norm(x, w)
        assert not hs.pdl_enabled()
        assert "refused" in hs.pdl_off_reason() and "NotSupported" in hs.pdl_off_reason()
        torch.testing.assert_close(y.float(), reference.rms_norm(x, w, 1e-5).float(), rtol=1e-2, atol=1e-2)
    finally:
        hs.set_refuse_pdl(0)
        hs.set_pdl(True)
    assert hs.pdl_enabled() and hs.pdl_off_reason() == ""
    hs.set_pdl(False)
    assert "switched off" in hs.pdl_off_reason()
    hs.set_pdl(True)
