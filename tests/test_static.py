"""Static checks of the compiled kernels (no GPU): every kernel is there, uses no local memory
(no spills, no stack arrays), and matrix kernels use the tensor-core instructions they intend.

Resource usage of every kernel is printed (run with -s) so the build log carries it."""

from __future__ import annotations

import pytest

import gptoss_kernels

from . import sass

pytestmark = pytest.mark.skipif(not gptoss_kernels.kernels_built(),
                                reason=f"kernels not built: {gptoss_kernels.kernels_error()}")

# substring of a demangled kernel name -> SASS opcode that must appear in it. Kernel families
# with more specific expectations (HGMMA in a GEMM main loop) check them in their own test file
# with tests/sass.py.
EXPECTED_INSTRUCTIONS = {
    "mxfp4_dequantize_bf16_kernel": "STG.E.128",   # 16-byte stores
}


@pytest.fixture(scope="module")
def kernels():
    if sass.cuobjdump() is None:
        pytest.skip("cuobjdump not found (pip install triton)")
    return sass.kernels(gptoss_kernels.library_path())


def test_report_resource_usage(kernels):
    assert kernels, "no sm_90a kernels found in libgptoss_kernels.so"
    for k in sorted(kernels.values(), key=lambda k: k.name):
        print(f"{k.name[:110]:110s} REG={k.reg:3d} STACK={k.stack} SHARED={k.shared} LOCAL={k.local}")


def test_no_local_memory(kernels):
    bad = [f"{k.name}: STACK={k.stack} LOCAL={k.local}" for k in kernels.values() if k.local or k.stack]
    assert not bad, "kernels using local memory (spills or stack arrays):\n" + "\n".join(bad)


def test_no_local_loads_in_sass(kernels):
    bad = [k.name for k in kernels.values() if "LDL" in k.sass or "STL" in k.sass]
    assert not bad, f"LDL/STL in SASS of: {bad}"


@pytest.mark.parametrize("kernel,opcode", sorted(EXPECTED_INSTRUCTIONS.items()))
def test_expected_instructions(kernels, kernel, opcode):
    matches = [k for k in kernels.values() if kernel in k.name]
    assert matches, f"kernel {kernel!r} not found; have {[k.name for k in kernels.values()]}"
    for k in matches:
        assert opcode in k.sass, f"{k.name} has no {opcode} in its sm_90a SASS"
