"""The build system without a GPU: nvcc discovery and its error message, the reference-only
build (which still has the host build of the kernels), the C header compiling as C and C++."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
CMAKE = shutil.which("cmake", path=os.path.dirname(sys.executable)) or shutil.which("cmake")


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("CUDACXX", "CUDA_HOME", "CUDA_PATH")}
    env.update(extra)
    return env


@pytest.mark.skipif(CMAKE is None, reason="cmake not installed")
def test_missing_nvcc_names_the_fix(tmp_path):
    env = _clean_env(PATH="/usr/bin:/bin")
    r = subprocess.run([CMAKE, "-S", str(REPO), "-B", str(tmp_path / "b"), "-DGPTOSS_NVCC_HINTS=/nonexistent"],
                       env=env, capture_output=True, text=True)
    assert r.returncode != 0
    msg = r.stdout + r.stderr
    assert "nvcc" in msg and "CUDA_HOME" in msg and "GPTOSS_REFERENCE_ONLY=1 pip install" in msg


@pytest.mark.slow
def test_reference_only_wheel(tmp_path):
    env = _clean_env(GPTOSS_REFERENCE_ONLY="1", PATH="/usr/bin:/bin:" + os.path.dirname(sys.executable))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q",
                        "-w", str(tmp_path), str(REPO)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = tmp_path.glob("gptoss_kernels-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "gptoss_kernels/reference.py" in names
    sos = sorted(os.path.basename(n) for n in names if n.endswith(".so"))
    # no CUDA library; the host build of the kernels (g++ only, for testing) is there
    assert not [n for n in sos if n.startswith("_C.") or n == "libgptoss_kernels.so"], sos
    assert "libgptoss_kernels_hostsim.so" in sos and any(n.startswith("_hostsim.") for n in sos), sos
    info = zipfile.ZipFile(wheel).read("gptoss_kernels/_build_info.py").decode()
    assert "REFERENCE_ONLY = True" in info and "HOSTSIM = True" in info


def test_reference_only_package_says_so(tmp_path):
    """With _build_info saying reference-only, the package imports, reports no kernels and runs ops."""
    code = (
        "import sys, types\n"
        "fake = types.ModuleType('gptoss_kernels._build_info')\n"
        "fake.REFERENCE_ONLY = True; fake.CUDA_VERSION = None; fake.CUDA_ARCHS = []\n"
        "sys.modules['gptoss_kernels._build_info'] = fake\n"
        "import torch, gptoss_kernels as g\n"
        "assert not g.kernels_built() and not g.cuda_available()\n"
        "assert 'reference-only' in g.kernels_error(), g.kernels_error()\n"
        "b = torch.randint(0, 255, (2, 1, 16), dtype=torch.uint8); s = torch.full((2, 1), 127, dtype=torch.uint8)\n"
        "print(g.mxfp4_dequantize(b, s).shape)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "torch.Size([2, 32])" in r.stdout


@pytest.mark.parametrize("lang,compiler", [("c", "cc"), ("c++", "c++")])
def test_public_header_compiles(lang, compiler, tmp_path):
    if shutil.which(compiler) is None:
        pytest.skip(f"{compiler} not found")
    cuda_inc = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "include")
    if not os.path.exists(os.path.join(cuda_inc, "cuda_runtime_api.h")):
        pytest.skip("CUDA headers not found")
    src = tmp_path / ("t.c" if lang == "c" else "t.cpp")
    src.write_text('#include "gptoss/gptoss.h"\nint main(void) { return GPTOSS_ABI_VERSION == 0; }\n')
    std = "-std=c99" if lang == "c" else "-std=c++17"
    r = subprocess.run([compiler, std, "-Wall", "-Werror", "-fsyntax-only", f"-I{REPO}/csrc/include",
                        f"-I{cuda_inc}", str(src)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def _resolve_archs(tmp_path, archs: str, smi_output: str | None, smi_rc: int = 0):
    """cmake/cuda_archs.cmake in script mode, with a stand-in nvidia-smi printing `smi_output`."""
    smi = tmp_path / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\nprintf '{smi_output or ''}'\nexit {smi_rc}\n")
    smi.chmod(0o755)
    return subprocess.run([CMAKE, f"-DARCHS={archs}", f"-DNVIDIA_SMI={smi}", "-P", str(REPO / "cmake" / "cuda_archs.cmake")],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(CMAKE is None, reason="cmake not installed")
@pytest.mark.parametrize("archs,smi,rc,want", [
    ("auto", "8.6\\n8.9\\n", 0, "86;89;90a"),        # an RTX 3090 and an L4: their archs, plus Hopper's
    ("auto", "9.0\\n9.0\\n", 0, "90a"),
    ("auto", "", 9, "90a"),                         # no GPU (nvidia-smi fails): 90a as before
    ("auto", "12.0\\n", 0, "89;90a"),               # newer than 9.0: sm_89 code whose PTX the driver compiles
    ("auto", "7.5\\n8.0\\n", 0, "80;90a"),          # below 8.0: warned about, left out
    ("", "8.6\\n", 0, "86;90a"),
    ("80;89;90a", "8.6\\n", 0, "80;89;90a"),        # an explicit list is taken as it is
    ("80-real;90a", None, 0, "80-real;90a"),
])
def test_cuda_archs_auto_and_lists(tmp_path, archs, smi, rc, want):
    r = _resolve_archs(tmp_path, archs, smi, rc)
    assert r.returncode == 0, r.stderr
    assert f"GPTOSS_CUDA_ARCHS={want}\n" in r.stderr, r.stderr
    if smi and "7.5" in smi:
        assert "below the kernels' minimum" in " ".join(r.stderr.split())  # (CMake wraps its messages)


@pytest.mark.skipif(CMAKE is None, reason="cmake not installed")
@pytest.mark.parametrize("archs,why", [("90", "arch-specific target 90a"), ("80;90", "arch-specific target 90a"),
                                       ("75;90a", "sm_80 or newer"), ("sm_89", "not an architecture like")])
def test_cuda_archs_refused_with_the_reason(tmp_path, archs, why):
    r = _resolve_archs(tmp_path, archs, None)
    assert r.returncode != 0 and why in " ".join(r.stderr.split()), r.stderr
