"""Test configuration.

- ``@pytest.mark.gpu``: runs this package's kernels: on a CUDA GPU when one is usable, else on the
  host-simulation build (tests/kernel_device.py: the same kernel source on the CPU, every checker
  on; a checker report fails the test). ``@pytest.mark.cuda_only`` on top: needs the GPU itself
  (CUDA graphs, streams, timings, the device allocator); skipped on the host build with the reason.
- ``@pytest.mark.hopper``: asks for a Hopper-only path by name (thread-block clusters, PDL,
  wgmma); skipped when the run takes the sm_80..89 paths (an sm_80..89 card, or
  GPTOSS_ARCH_OVERRIDE=80: the pre-Hopper pass of scripts/test.sh and of the device check).
- The vocab file for harmony: if TIKTOKEN_ENCODINGS_BASE is unset and a folder
  ``../shared/vocab`` (relative to the repo) holds o200k_base.tiktoken, it is used.
"""

from __future__ import annotations

import os
import pathlib

import pytest
import torch

import gptoss_kernels
from gptoss_kernels import _lib

from . import kernel_device

REPO = pathlib.Path(__file__).resolve().parents[1]

_vocab = REPO.parent / "shared" / "vocab"
if "TIKTOKEN_ENCODINGS_BASE" not in os.environ and (_vocab / "o200k_base.tiktoken").exists():
    os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(_vocab)


def gpu_skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA GPU visible to torch (GPU tests run in the device check, bench/device/)"
    return gptoss_kernels.kernels_error()


def pytest_collection_modifyitems(config, items):
    if not kernel_device.HOPPER_PATHS:
        hopper = pytest.mark.skip(reason=f"asks for a Hopper-only path (clusters/PDL/wgmma); this run takes the "
                                         f"sm_{kernel_device.PATHS_CC} paths")
        for item in items:
            if "hopper" in item.keywords:
                item.add_marker(hopper)
    reason = gpu_skip_reason()
    if reason is None:
        return
    hostsim = kernel_device.ON_HOSTSIM
    skip = pytest.mark.skip(reason=reason if not hostsim else
                            f"needs the GPU itself (CUDA graphs/streams/timings/allocator); {reason}")
    for item in items:
        if "gpu" in item.keywords and (not hostsim or "cuda_only" in item.keywords):
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _kernel_backend(request):
    """GPU tests without a GPU: CPU tensors run the kernels' host build (and its checkers)."""
    if kernel_device.ON_HOSTSIM and request.node.get_closest_marker("gpu") is not None:
        # the emulator is one thread: torch's own threads (the references) only compete with it
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with _lib.use_backend("hostsim"):
                yield
        finally:
            torch.set_num_threads(threads)
    else:
        yield


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not kernel_device.ON_HOSTSIM:
        return
    st = _lib.kernels(torch.device("cpu"))._module.stats() if _lib.hostsim_built() else None
    if not st or not st["launches"]:
        return
    kernels = st["kernels"]
    # the checkers' own tests: planted bugs (probe_checker_kernel), wgmma on an emulated sm_86 (probe_wgmma_kernel)
    planted = {k: v for k, v in st["reports"].items() if "probe_checker_kernel" in k or "probe_wgmma_kernel" in k}
    real = {k: v for k, v in st["reports"].items() if k not in planted}
    def family(name: str) -> str:  # "void (anonymous namespace)::k<1, 8>(args)" -> "k"
        name = name.replace("(anonymous namespace)::", "").removeprefix("void ")
        return name.split("(")[0].split("<")[0].split("::")[-1]

    families = sorted({family(name) for name in kernels})
    terminalreporter.write_sep("-", "kernels run on the host build (gptoss_kernels._hostsim)")
    terminalreporter.write_line(
        f"{len(families)} kernels in {len(kernels)} variants (template instances), {st['launches']} launches, "
        f"{st['blocks']} blocks, {st['threads']} threads emulated")
    terminalreporter.write_line(
        "checkers: global bounds, shared races/uninit/bounds, barriers, warp collectives, cp.async/wgmma order, "
        f"PDL order; findings: {sum(real.values())} in the package's kernels"
        + (f" ({', '.join(f'{k}: {v}' for k, v in real.items())})" if real else "")
        + f", {sum(planted.values())} in the planted-bug probe kernels (expected); a finding fails its test")
    for name, n in sorted(kernels.items()):
        terminalreporter.write_line(f"  {n:6d}  {name}")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_report_header(config):
    info = gptoss_kernels.build_info()
    return [f"gptoss_kernels: kernels_built={info['kernels_built']} archs={info['cuda_archs']} "
            f"cuda_available={gptoss_kernels.cuda_available()} torch={torch.__version__} "
            f"paths=sm_{kernel_device.PATHS_CC}{' (GPTOSS_ARCH_OVERRIDE)' if info.get('arch_override') else ''}",
            f"GPU tests: {'run on the GPU' if gpu_skip_reason() is None else ('run on the host build of the kernels (hostsim)' if kernel_device.ON_HOSTSIM else 'skipped: ' + gpu_skip_reason())}"]
