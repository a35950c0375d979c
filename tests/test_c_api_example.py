"""The C-ABI example (examples/c_api): it compiles and links against the installed library, and
its own CPU expectations agree with gptoss_kernels.reference (so a failure on a GPU points at the
kernels, not at the example). On a GPU it runs and must print OK."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import gptoss_kernels as gk
from gptoss_kernels import reference as R

REPO = pathlib.Path(__file__).resolve().parents[1]
CUDA_HOME = os.environ.get("CUDA_HOME", "/usr/local/cuda")

pytestmark = [
    pytest.mark.skipif(not gk.kernels_built(), reason=f"kernels not built: {gk.kernels_error()}"),
    pytest.mark.skipif(shutil.which("c++") is None or not os.path.exists(f"{CUDA_HOME}/include/cuda_runtime.h"),
                       reason="needs a C++ compiler and the CUDA toolkit headers"),
]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("c_api") / "demo"
    r = subprocess.run(["bash", str(REPO / "examples/c_api/build.sh"), str(out)], capture_output=True, text=True,
                       env={**os.environ, "PYTHON": sys.executable}, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "warning" not in r.stderr.lower(), r.stderr
    return out


def _load(d, name, dtype, shape):
    return torch.from_numpy(np.fromfile(d / f"{name}.bin", dtype=dtype).reshape(shape).copy())


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_demo_builds_and_its_cpu_math_matches_the_reference(demo, tmp_path):
    r = subprocess.run([str(demo)], env={**os.environ, "GPTOSS_DEMO_DUMP": str(tmp_path), "GPTOSS_DEMO_DUMP_ONLY": "1"},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    T, H, I, E, k = 3, 256, 128, 8, 4
    x = _load(tmp_path, "moe_x", np.float32, (T, H))
    ids = _load(tmp_path, "moe_ids", np.int32, (T, k))
    w = _load(tmp_path, "moe_w", np.float32, (T, k))
    w1b = _load(tmp_path, "moe_w1b", np.uint8, (E, 2 * I, H // 32, 16))
    w1s = _load(tmp_path, "moe_w1s", np.uint8, (E, 2 * I, H // 32))
    b1 = _load(tmp_path, "moe_b1", np.float32, (E, 2 * I))
    w2b = _load(tmp_path, "moe_w2b", np.uint8, (E, H, I // 32, 16))
    w2s = _load(tmp_path, "moe_w2s", np.uint8, (E, H, I // 32))
    b2 = _load(tmp_path, "moe_b2", np.float32, (E, H))
    want = _load(tmp_path, "moe_want", np.float32, (T, H))
    ref = R.moe(x, ids, w, w1b, w1s, b1, w2b, w2s, b2)  # float32 in, float32 out
    assert rel(want, ref) < 1e-5
    B, S, nq, nkv, d = 2, 300, 64, 8, 64
    for window in (0, 128):
        t = f"attn_w{window}_"
        q = _load(tmp_path, t + "q", np.float32, (B, nq, d))
        kc = _load(tmp_path, t + "k", np.float32, (B, S, nkv, d))
        vc = _load(tmp_path, t + "v", np.float32, (B, S, nkv, d))
        sinks = _load(tmp_path, t + "sinks", np.float32, (nq,))
        lens = _load(tmp_path, t + "lens", np.int32, (B,))
        want = _load(tmp_path, t + "want", np.float32, (B, nq, d))
        ref = R.attention_decode(q, kc, vc, lens, sinks, sliding_window=window or None, sm_scale=0.125)
        assert rel(want, ref) < 1e-5


def test_demo_without_gpu_says_why(demo):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    r = subprocess.run([str(demo)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "no usable GPU" in r.stderr


@pytest.mark.gpu
@pytest.mark.cuda_only  # the C program links the CUDA build of the library and runs on the GPU
def test_demo_runs_on_gpu(demo):
    r = subprocess.run([str(demo)], capture_output=True, text=True, timeout=300)
    print(r.stdout, r.stderr)
    assert r.returncode == 0 and "OK" in r.stdout
