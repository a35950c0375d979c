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


def test_static_shared_memory_within_48kb(kernels):
    """Above 48 KB a block needs dynamic shared memory and a cudaFuncSetAttribute opt-in: no
    kernel may declare more static shared memory than that."""
    # cuobjdump's SHARED includes the 1 KB that sm_90 reserves per block for kernels that use
    # griddepcontrol or clusters (router_select_kernel, with no __shared__, shows 1024): that
    # reserve is not part of the 48 KB static allowance
    reserved = 1024
    assert any(k.shared == reserved for k in kernels.values())
    bad = [f"{k.name}: {k.shared} B" for k in kernels.values() if k.shared > 48 * 1024 + reserved]
    assert not bad, "static shared memory above 48 KB:\n" + "\n".join(bad)


def test_no_local_loads_in_sass(kernels):
    bad = [k.name for k in kernels.values() if "LDL" in k.sass or "STL" in k.sass]
    assert not bad, f"LDL/STL in SASS of: {bad}"


@pytest.mark.parametrize("kernel,opcode", sorted(EXPECTED_INSTRUCTIONS.items()))
def test_expected_instructions(kernels, kernel, opcode):
    matches = [k for k in kernels.values() if kernel in k.name]
    assert matches, f"kernel {kernel!r} not found; have {[k.name for k in kernels.values()]}"
    for k in matches:
        assert opcode in k.sass, f"{k.name} has no {opcode} in its sm_90a SASS"


# Kernels launched with programmatic dependent launch (csrc/pdl.cuh, DEVELOPERS.md "PDL"): the
# decode path. In SASS griddepcontrol.wait is ACQBULK and launch_dependents is PREEXIT.
PDL_KERNELS = ("rms_norm_kernel", "linear_gemv_kernel", "argmax_slices_kernel", "argmax_rows_kernel",
               "rope_kernel", "attention_decode_kernel", "attention_decode_mma_kernel",
               "attention_decode_combine_kernel", "router_partial_kernel", "router_select_kernel",
               "router_fused_kernel", "router_cluster_kernel", "moe_decode_gemv_kernel", "moe_decode_combine_kernel",
               "moe_decode_combine_norm_kernel")


def _pdl_kernels(kernels):
    return [k for k in kernels.values() if any(f"::{n}(" in k.name or f"::{n}<" in k.name for n in PDL_KERNELS)]


def test_pdl_kernels_wait_before_they_write(kernels):
    """Every PDL-launched kernel waits for its predecessor (ACQBULK) before any global store or
    load (its predecessor may still be writing what it would read or reading what it would
    overwrite); before the wait only L2 prefetches of weights (UBLKPF). One documented exception:
    the MoE mlp2 GEMV scans the routing ids (L2-coherent loads) to aim its prefetch; it scans them
    again after the wait."""
    ks = _pdl_kernels(kernels)
    found = {n for n in PDL_KERNELS for k in ks if f"::{n}(" in k.name or f"::{n}<" in k.name}
    assert found == set(PDL_KERNELS), f"PDL kernels missing from the library: {set(PDL_KERNELS) - found}"
    for k in ks:
        lines = k.sass.splitlines()
        first = next((i for i, line in enumerate(lines) if "ACQBULK" in line), None)
        assert first is not None, f"{k.name}: no griddepcontrol.wait (ACQBULK)"
        before = lines[:first]
        for op in ("STG", "ATOMG", "RED.", "LDGSTS"):     # shared-memory stores are the kernel's own
            assert not any(op in line for line in before), f"{k.name}: {op} before the PDL wait"
        loads = [line.split(";")[0].strip() for line in before if "LDG" in line]
        if "moe_decode_gemv_kernel<false>" in k.name:
            assert loads and all("STRONG.GPU" in line for line in loads), f"{k.name}: {loads}"
        else:
            assert not loads, f"{k.name}: global loads before the PDL wait: {loads}"


def test_pdl_kernels_let_dependents_launch(kernels):
    """Every PDL kernel triggers its dependents (PREEXIT) after its wait, so at most one kernel
    runs ahead of the one doing the work."""
    for k in _pdl_kernels(kernels):
        lines = k.sass.splitlines()
        wait = next(i for i, line in enumerate(lines) if "ACQBULK" in line)
        trig = next((i for i, line in enumerate(lines) if "PREEXIT" in line), None)
        assert trig is not None and trig > wait, f"{k.name}: no PREEXIT after the wait"
