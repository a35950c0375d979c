"""The kernels compiled for Ampere and Ada (sm_80, sm_89), checked in their SASS without a GPU.

The module builds the kernel library with GPTOSS_CUDA_ARCHS="80;89" (two architectures in one
build: every kernel file compiled for both, a few minutes of nvcc on 2 cores) and reads each
architecture's machine code with cuobjdump:
  - every kernel is there; none uses local memory (no spills, no stack arrays, no LDL/STL);
  - the mma.sync kernels issue bf16 tensor-core HMMA, as on sm_90a;
  - the Hopper-only kernels (wgmma GEMMs and attention, the router's cluster kernel) are stubs
    that trap, and no kernel holds a Hopper instruction (HGMMA, griddepcontrol, bulk prefetch);
    decode attention's in-cluster merge compiles to a trap there too.
GPTOSS_SASS_ARCHS_LIB=/path/to/libgptoss_kernels.so checks that library instead (e.g. a
GPTOSS_CUDA_ARCHS="80;89;90a" build: its sm_90a code gets the Hopper checks as well).
"""

from __future__ import annotations

import ctypes
import os
import pathlib
import shutil
import subprocess
import sys
import time

import pytest

from . import sass

REPO = pathlib.Path(__file__).resolve().parents[1]
LIB_ENV = "GPTOSS_SASS_ARCHS_LIB"
BUILD_ARCHS = "80;89"

# substrings of demangled kernel names
MMA_SYNC_KERNELS = ("moe_decode_gemv_kernel", "grouped_gemm_mma_kernel", "router_fused_kernel", "router_partial_kernel",
                    "attention_decode_mma_kernel", "attention_prefill_kernel<false>", "linear_gemv_kernel")
HOPPER_ONLY_KERNELS = ("grouped_gemm_wgmma_kernel", "attention_prefill_kernel<true>", "router_cluster_kernel")
# in-cluster merge branch (sm_90 only): a trap in sm_80..89 code
CLUSTER_BRANCH_KERNELS = ("attention_decode_kernel", "attention_decode_mma_kernel")
HOPPER_OPCODES = ("HGMMA", "WARPGROUP", "ACQBULK", "UBLKPF", "PREEXIT")


def _tool(name: str) -> str | None:
    return shutil.which(name, path=os.path.dirname(sys.executable)) or shutil.which(name)


def _nvcc() -> str | None:
    for cand in (os.environ.get("CUDACXX"), shutil.which("nvcc"),
                 os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"), "/usr/local/cuda/bin/nvcc"):
        if cand and os.path.exists(cand):
            return cand
    return None


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> str:
    if sass.cuobjdump() is None:
        pytest.skip("cuobjdump not found (pip install triton)")
    pre = os.environ.get(LIB_ENV)
    if pre:
        return pre
    cmake, ninja, nvcc = _tool("cmake"), _tool("ninja"), _nvcc()
    if not (cmake and ninja and nvcc):
        pytest.skip(f"needs cmake, ninja and nvcc (found {cmake}, {ninja}, {nvcc})")
    try:
        import pybind11
    except ImportError:
        pytest.skip("needs pybind11 (the build's configure step finds it)")
    build = tmp_path_factory.mktemp("sass_archs")
    env = {**os.environ, "CUDACXX": nvcc}
    t0 = time.monotonic()
    r = subprocess.run([cmake, "-S", str(REPO), "-B", str(build), "-G", "Ninja", f"-DGPTOSS_CUDA_ARCHS={BUILD_ARCHS}",
                        "-DGPTOSS_HOSTSIM=OFF", f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
                        f"-DPython_EXECUTABLE={sys.executable}", f"-DCMAKE_MAKE_PROGRAM={ninja}"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or str(os.cpu_count() or 1)
    r = subprocess.run([ninja, "-C", str(build), "-j", jobs, "gptoss_kernels"], env=env, capture_output=True,
                       text=True, timeout=3000)
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    print(f"\nbuilt libgptoss_kernels.so for GPTOSS_CUDA_ARCHS={BUILD_ARCHS} in {time.monotonic() - t0:.0f} s "
          f"({jobs} jobs)")
    return str(build / "libgptoss_kernels.so")


def _short(name: str) -> str:
    return name.replace("(anonymous namespace)::", "").removeprefix("void ")


def test_two_architectures_in_one_build(library):
    archs = sass.archs(library)
    assert {"sm_80", "sm_89"} <= set(archs), archs
    lib = ctypes.CDLL(library)
    lib.gptoss_cuda_archs.restype = ctypes.c_char_p
    listed = lib.gptoss_cuda_archs().decode()
    assert listed.count(";") >= 1 and all(a.removeprefix("sm_").removesuffix("a") in listed for a in archs), listed
    if not os.environ.get(LIB_ENV):
        assert listed == BUILD_ARCHS
    # PTX rides along (the driver compiles it for newer devices: an 80 build runs on an H100)
    ptx = subprocess.run([sass.cuobjdump(), "-lptx", library], capture_output=True, text=True, check=True).stdout
    assert "sm_80.ptx" in ptx and "sm_89.ptx" in ptx


@pytest.fixture(scope="module", params=["sm_80", "sm_89"])
def pre_hopper(request, library):
    arch = request.param
    if arch not in sass.archs(library):
        pytest.skip(f"{library} holds no {arch} code")
    ks = sass.kernels(library, arch)
    assert ks, f"no {arch} kernels in {library}"
    for k in sorted(ks.values(), key=lambda k: k.name):
        print(f"{arch} {_short(k.name)[:100]:100s} REG={k.reg:3d} STACK={k.stack} SHARED={k.shared} LOCAL={k.local}")
    return arch, ks


def _matching(ks, sub: str):
    found = [k for k in ks.values() if sub in k.name]
    assert found, f"no kernel named like {sub!r}"
    return found


def test_every_kernel_is_there(pre_hopper, library):
    arch, ks = pre_hopper
    for sub in MMA_SYNC_KERNELS + HOPPER_ONLY_KERNELS + ("rms_norm_kernel", "rope_kernel", "argmax_rows_kernel",
                                                          "attention_decode_combine_kernel", "router_select_kernel",
                                                          "mxfp4_dequantize_bf16_kernel", "moe_decode_combine_kernel",
                                                          "route_scatter_kernel", "combine_kernel"):
        _matching(ks, sub)
    if "sm_90a" in sass.archs(library):
        assert set(ks) == set(sass.kernels(library, "sm_90a")), "the architectures hold different kernels"


def test_no_local_memory(pre_hopper):
    arch, ks = pre_hopper
    bad = [f"{_short(k.name)}: STACK={k.stack} LOCAL={k.local}" for k in ks.values() if k.local or k.stack]
    bad += [f"{_short(k.name)}: LDL/STL" for k in ks.values() if "LDL" in k.sass or "STL" in k.sass]
    assert not bad, f"{arch} kernels using local memory:\n" + "\n".join(bad)


@pytest.mark.parametrize("kernel", MMA_SYNC_KERNELS)
def test_tensor_cores_where_intended(pre_hopper, kernel):
    arch, ks = pre_hopper
    for k in _matching(ks, kernel):
        assert "HMMA.16816.F32.BF16" in k.sass, f"{arch} {_short(k.name)}: no bf16 HMMA"


@pytest.mark.parametrize("kernel", HOPPER_ONLY_KERNELS)
def test_hopper_only_kernels_are_trapping_stubs(pre_hopper, kernel):
    arch, ks = pre_hopper
    for k in _matching(ks, kernel):
        assert "BPT.TRAP" in k.sass and "HMMA" not in k.sass and k.reg <= 16, \
            f"{arch} {_short(k.name)}: not a stub (REG={k.reg})"


def test_no_hopper_instructions(pre_hopper):
    arch, ks = pre_hopper
    bad = [f"{_short(k.name)}: {op}" for k in ks.values() for op in HOPPER_OPCODES if op in k.sass]
    assert not bad, f"{arch} code holds Hopper instructions:\n" + "\n".join(bad)


@pytest.mark.parametrize("kernel", CLUSTER_BRANCH_KERNELS)
def test_decode_attention_cluster_merge_traps(pre_hopper, kernel):
    arch, ks = pre_hopper
    for k in _matching(ks, kernel):
        if f"{kernel}(" in k.name:
            assert "BPT.TRAP" in k.sass, f"{arch} {_short(k.name)}: the in-cluster merge is not a trap"


def test_sm90a_code_of_a_several_architecture_build(library):
    """With a build that holds sm_90a code too (GPTOSS_SASS_ARCHS_LIB): HGMMA in the wgmma kernels,
    HMMA in the mma.sync ones, no local memory (tests/test_static.py checks the package's own)."""
    if "sm_90a" not in sass.archs(library):
        pytest.skip("no sm_90a code in this library (the package's is checked by tests/test_static.py)")
    ks = sass.kernels(library, "sm_90a")
    for sub in ("grouped_gemm_wgmma_kernel", "attention_prefill_kernel<true>"):
        assert all("HGMMA" in k.sass for k in _matching(ks, sub)), sub
    for sub in MMA_SYNC_KERNELS + ("router_cluster_kernel",):
        assert all("HMMA.16816.F32.BF16" in k.sass for k in _matching(ks, sub)), sub
    assert not [k.name for k in ks.values() if k.local or k.stack or "LDL" in k.sass or "STL" in k.sass]
