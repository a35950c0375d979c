"""Read the compiled kernels' SASS and resource usage with cuobjdump (shipped in the triton wheel,
or from the CUDA toolkit). Used by tests/test_static.py; no GPU needed."""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from dataclasses import dataclass


def cuobjdump() -> str | None:
    try:
        import triton  # noqa: F401

        p = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        if os.path.exists(p):
            return p
    except ImportError:
        pass
    for cand in (shutil.which("cuobjdump"), "/usr/local/cuda/bin/cuobjdump"):
        if cand and os.path.exists(cand):
            return cand
    return None


@dataclass
class KernelInfo:
    mangled: str
    name: str          # demangled
    reg: int
    stack: int
    shared: int
    local: int
    sass: str = ""


def _demangle(names: list[str]) -> list[str]:
    if not names or not shutil.which("c++filt"):
        return names
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout
    return out.splitlines()


def archs(library: str) -> list[str]:
    """The machine-code architectures in `library` ("sm_80", "sm_90a", ...), in order."""
    tool = cuobjdump()
    if tool is None:
        raise RuntimeError("cuobjdump not found (pip install triton, or put the CUDA toolkit's bin on PATH)")
    out = subprocess.run([tool, "-lelf", library], capture_output=True, text=True, check=True).stdout
    found = re.findall(r"\.(sm_\d+a?)\.cubin", out)
    return sorted(set(found), key=lambda a: (int(re.sub(r"\D", "", a)), a))


@functools.lru_cache(maxsize=None)
def kernels(library: str, arch: str | None = None) -> dict[str, KernelInfo]:
    """mangled name -> KernelInfo for every kernel in `library` (the package's build: sm_90a), or
    for its `arch` machine code ("sm_89") in a library built for several."""
    tool = cuobjdump()
    if tool is None:
        raise RuntimeError("cuobjdump not found (pip install triton, or put the CUDA toolkit's bin on PATH)")
    sel = ["-arch", arch] if arch else []
    res = subprocess.run([tool, *sel, "-res-usage", library], capture_output=True, text=True, check=True).stdout
    infos: dict[str, KernelInfo] = {}
    for m in re.finditer(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res):
        infos[m.group(1)] = KernelInfo(m.group(1), m.group(1), int(m.group(2)), int(m.group(3)),
                                       int(m.group(4)), int(m.group(5)))
    for k, dm in zip(list(infos), _demangle(list(infos))):
        infos[k].name = dm
    sass = subprocess.run([tool, *sel, "-sass", library], capture_output=True, text=True, check=True).stdout
    for chunk in re.split(r"\n\s*Function : ", sass)[1:]:
        name = chunk.split("\n", 1)[0].strip()
        if name in infos:
            infos[name].sass += chunk
    return infos
