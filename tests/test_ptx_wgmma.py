"""PTX-level check of the wgmma kernels (no GPU): the PTX ISA requires wgmma.fence between ordinary
register writes and the wgmma.mma_async that reads those registers as accumulators. Zeroing an
accumulator in C++ right before the fence does not give that order: the zeroing moves carry no
operand of the fence's asm and land after it in the PTX (ptxas happened to fold them). The kernels
start a product with scale-d = 0 instead; this test compiles them to PTX and checks that no
register an mma_async accumulates into is written between the last fence and the instruction."""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
WGMMA_FILES = ["attention_prefill", "moe_prefill"]


def _nvcc() -> str | None:
    for cand in (os.environ.get("CUDACXX"), shutil.which("nvcc"),
                 os.path.join(os.environ.get("CUDA_HOME", "/nonexistent"), "bin", "nvcc"), "/usr/local/cuda/bin/nvcc"):
        if cand and os.path.exists(cand):
            return cand
    return None


def writes_between_fence_and_mma(ptx: str) -> list[tuple[int, str]]:
    """(line, register) for each accumulator register of a wgmma.mma_async that an ordinary
    instruction writes after the last wgmma.fence before it (mma_asyncs may chain on the same
    registers; only other writers count)."""
    bad, written = [], set()
    for i, line in enumerate(ptx.splitlines(), 1):
        t = line.strip()
        if not t or t.startswith(("//", ".")) or t.endswith(":") or t in ("{", "}"):
            continue
        if t.startswith("wgmma.fence"):
            written = set()
        elif t.startswith("wgmma.mma_async"):
            bad += [(i, r) for r in re.findall(r"%f\d+", t[t.index("{"):t.index("}")]) if r in written]
        elif not t.startswith(("st.", "wgmma", "bar.", "ret", "bra", "@")) or re.match(r"@!?%p\d+\s+(?!st\.|bra)", t):
            m = re.match(r"(?:@!?%p\d+\s+)?[a-z][\w.:]*\s+(\{[^}]*\}|%\w+)", t)
            if m:
                written.update(re.findall(r"%\w+", m.group(1)))
    return bad


def test_the_checker_sees_a_zeroing_move_after_the_fence():
    ptx = ("wgmma.fence.sync.aligned;\nmov.f32 %f7, 0f00000000;\n"
           "wgmma.mma_async.sync.aligned.m64n8k16.f32.bf16.bf16 {%f7, %f8, %f9, %f10}, %rd1, %rd2, p, 1, 1, 0, 0;\n"
           "wgmma.mma_async.sync.aligned.m64n8k16.f32.bf16.bf16 {%f7, %f8, %f9, %f10}, %rd3, %rd4, p, 1, 1, 0, 0;\n")
    assert writes_between_fence_and_mma(ptx) == [(3, "%f7"), (4, "%f7")]
    assert writes_between_fence_and_mma(ptx.replace("mov.f32 %f7", "mov.f32 %f1")) == []


@pytest.mark.parametrize("name", WGMMA_FILES)
def test_no_accumulator_write_between_fence_and_mma(name, tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    out = tmp_path / f"{name}.ptx"
    r = subprocess.run([nvcc, "-std=c++17", "-arch=sm_90a", f"-I{REPO / 'csrc'}", f"-I{REPO / 'csrc' / 'include'}",
                        "--expt-relaxed-constexpr", '-DGPTOSS_CUDA_ARCHS_STR="90a"', "-ptx",
                        str(REPO / "csrc" / "kernels" / f"{name}.cu"), "-o", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    ptx = out.read_text()
    assert "wgmma.mma_async" in ptx and "wgmma.fence" in ptx
    assert writes_between_fence_and_mma(ptx) == []
