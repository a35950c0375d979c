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
