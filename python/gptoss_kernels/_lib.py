"""Loading the compiled libraries and the facts of this build.

The package always imports: without the compiled module (a reference-only install, or a
library that fails to load) every op runs the PyTorch reference, and ``cuda_available()`` says
False. ``kernels_error()`` tells why kernels are not in use.

Two compiled modules may be present: ``_C`` (the CUDA kernels, for CUDA tensors) and
``_hostsim`` (a host-simulation build of the same kernels, run on the CPU over CPU tensors'
memory, with a global-memory bounds checker). CPU tensors run the PyTorch reference on the
"reference" backend (the default) and the host-simulated kernels on the "hostsim" backend
(``GPTOSS_BACKEND=hostsim``, ``set_backend("hostsim")`` or ``with use_backend("hostsim"):``).
Ops ask ``runs_kernels(dev)`` and call the kernels through ``kernels(dev)``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import warnings

try:
    from . import _build_info  # written by CMake at install time
except ImportError:  # running from a source tree that was never built
    _build_info = None

_C = None
_C_error: str | None = None
if _build_info is None:
    _C_error = "gptoss_kernels was not built (run `pip install .` with nvcc available)"
elif _build_info.REFERENCE_ONLY:
    _C_error = "this is a reference-only build (GPTOSS_REFERENCE_ONLY=1): no CUDA kernels were compiled"
else:
    try:
        from . import _C  # noqa: F811
    except ImportError as e:  # pragma: no cover - depends on the install
        _C_error = f"the compiled module failed to load: {e}"


def kernels_built() -> bool:
    """True when the CUDA kernels were compiled into this install and load."""
    return _C is not None


def kernels_error(dev=None) -> str | None:
    """Why kernels cannot be used (None when ``cuda_available()``). With a CPU device: why CPU
    tensors do not run the host-simulated kernels (None when ``runs_kernels(dev)``)."""
    if dev is not None and _device(dev).type == "cpu":
        if backend() != "hostsim":
            return "the reference backend is selected for CPU tensors (GPTOSS_BACKEND / set_backend)"
        return hostsim_error()
    if _C is None:
        return _C_error
    import torch

    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return f"the GPU has compute capability {major}.{minor}; the kernels need 8.0 or newer"
    try:
        info = _C.arch_info(torch.cuda.current_device())
    except (RuntimeError, ValueError) as e:  # no driver for the library's runtime, a bad override
        return str(e)
    return info["error"]  # None when some code of this build runs on the device


@functools.lru_cache(maxsize=None)
def cuda_available() -> bool:
    """True when ops on CUDA tensors run this package's kernels (else they run the reference)."""
    return kernels_error() is None


# ---- the host-simulation build (optional, loaded on first use) ----

_HS = None                      # the _hostsim module once loaded
_HS_error: str | None = None    # why it is not available
_HS_loaded = False


def _hostsim():
    """The _hostsim module, or None (imported on the first call)."""
    global _HS, _HS_error, _HS_loaded
    if not _HS_loaded:
        try:
            from . import _hostsim as mod
        except ImportError as e:
            _HS_error = f"the host-simulation module (gptoss_kernels._hostsim) is not built or failed to load: {e}"
        else:
            _HS = mod
        _HS_loaded = True
    return _HS


def hostsim_built() -> bool:
    """True when the host-simulation build of the kernels (gptoss_kernels._hostsim) loads."""
    return _hostsim() is not None


def hostsim_error() -> str | None:
    """Why the host-simulation module cannot be used (None when ``hostsim_built()``)."""
    return None if _hostsim() is not None else _HS_error


# ---- the backend for CPU tensors ----

BACKENDS = ("reference", "hostsim")
BACKEND_ENV = "GPTOSS_BACKEND"
_backend: str | None = None     # None: not read from the environment yet


def backend() -> str:
    """What CPU tensors run: "reference" (the PyTorch reference) or "hostsim" (the host-simulated
    kernels, when ``hostsim_built()``). Initially $GPTOSS_BACKEND (default "reference")."""
    global _backend
    if _backend is None:
        value = os.environ.get(BACKEND_ENV, "reference")
        if value not in BACKENDS:
            raise ValueError(f"{BACKEND_ENV} must be one of {', '.join(repr(b) for b in BACKENDS)}, got {value!r}")
        _backend = value
    return _backend


def set_backend(name: str) -> str:
    """Select the backend for CPU tensors ("reference" or "hostsim"); returns the previous one.
    ValueError for an unknown name, RuntimeError for "hostsim" when it is not built."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(repr(b) for b in BACKENDS)}, got {name!r}")
    if name == "hostsim" and not hostsim_built():
        raise RuntimeError(f"the hostsim backend is not available: {hostsim_error()}")
    previous = backend()
    _backend = name
    return previous


@contextlib.contextmanager
def use_backend(name: str):
    """``with use_backend("hostsim"): ...`` selects the backend for the block, then restores it."""
    global _backend
    previous = set_backend(name)
    try:
        yield
    finally:
        _backend = previous


def _device(dev):
    import torch

    return dev if isinstance(dev, torch.device) else torch.device(dev)


def runs_kernels(dev) -> bool:
    """True when ops on tensors of device `dev` run this package's kernels: CUDA tensors when
    ``cuda_available()``, CPU tensors on the hostsim backend when ``hostsim_built()``."""
    dev = _device(dev)
    if dev.type == "cuda":
        return cuda_available()
    if dev.type == "cpu":
        return backend() == "hostsim" and hostsim_built()
    return False


def expects_kernels(dev) -> bool:
    """True when tensors of device `dev` are meant to run kernels (CUDA tensors; CPU tensors on the
    hostsim backend), so that taking the reference instead deserves a warning."""
    dev = _device(dev)
    return dev.type == "cuda" or (dev.type == "cpu" and backend() == "hostsim")


class HostsimCheckError(RuntimeError):
    """The host-simulation bounds checker reported accesses outside a call's tensor arguments."""

    def __init__(self, function: str, reports: list[str]):
        self.function = function
        self.reports = list(reports)
        super().__init__(f"hostsim checker: {function}:" + "".join("\n" + str(r) for r in self.reports))


def tensor_extent(t) -> tuple[int, int]:
    """(address, nbytes) of the bytes tensor `t` may touch: (data_ptr, 0) when empty, else up to
    its last element (strides included)."""
    if t.numel() == 0:
        return (t.data_ptr(), 0)
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return (t.data_ptr(), (last + 1) * t.element_size())


_hostsim_lock = threading.Lock()   # begin_call .. end_call is one global session in the emulator


class KernelModule:
    """A compiled module's functions with tensor arguments: ``kernels(dev).fn(*args)`` passes each
    torch.Tensor as its data_ptr() and each None as 0. For the hostsim module the call is bracketed
    by begin_call(extents of the tensor arguments) / end_call(), and checker reports raise
    HostsimCheckError. Attributes that are not callables pass through."""

    def __init__(self, module, hostsim: bool):
        import torch

        self._module = module
        self._hostsim = hostsim
        self._tensor = torch.Tensor

    @property
    def module(self):
        return self._module

    def __repr__(self) -> str:
        return f"<gptoss_kernels kernels over {getattr(self._module, '__name__', self._module)!r}>"

    def __getattr__(self, name: str):
        if name.startswith("__") or name in ("_module", "_hostsim", "_tensor"):
            raise AttributeError(name)
        attr = getattr(self._module, name)
        if not callable(attr):
            return attr
        if self._hostsim:
            if name in ("begin_call", "end_call"):
                return attr
            return functools.partial(self._call_hostsim, name, attr)
        return functools.partial(self._call, attr)

    def _convert(self, args, kwargs):
        T = self._tensor
        cargs = [a.data_ptr() if isinstance(a, T) else 0 if a is None else a for a in args]
        ckw = {k: (a.data_ptr() if isinstance(a, T) else 0 if a is None else a) for k, a in kwargs.items()}
        return cargs, ckw

    def _call(self, fn, *args, **kwargs):
        cargs, ckw = self._convert(args, kwargs)
        return fn(*cargs, **ckw)

    def _call_hostsim(self, name, fn, *args, **kwargs):
        T = self._tensor
        regions = [tensor_extent(a) for a in (*args, *kwargs.values()) if isinstance(a, T)]
        cargs, ckw = self._convert(args, kwargs)
        mod = self._module
        with _hostsim_lock:
            mod.begin_call(regions)
            try:
                result = fn(*cargs, **ckw)
            except BaseException as e:
                try:
                    reports = mod.end_call()
                except Exception:  # noqa: BLE001 - the kernel's own exception wins
                    reports = None
                if reports and hasattr(e, "add_note"):
                    e.add_note(f"hostsim checker: {name}:" + "".join("\n" + str(r) for r in reports))
                raise
            reports = mod.end_call()
        if reports:
            raise HostsimCheckError(name, reports)
        return result


_wrappers: dict[bool, KernelModule] = {}


def kernels(dev) -> KernelModule:
    """The kernels for tensors of device `dev` (``_C`` for CUDA, ``_hostsim`` for CPU), wrapped
    (see KernelModule). Call only when ``runs_kernels(dev)``."""
    dev = _device(dev)
    if dev.type == "cuda":
        mod, hs = _C, False
    elif dev.type == "cpu":
        mod, hs = _hostsim(), True
    else:
        raise ValueError(f"no kernels for {dev.type} tensors (CUDA, or CPU on the hostsim backend)")
    if mod is None:
        raise RuntimeError(f"no kernels for {dev.type} tensors: {_C_error if hs is False else hostsim_error()}")
    w = _wrappers.get(hs)
    if w is None or w.module is not mod:
        w = _wrappers[hs] = KernelModule(mod, hs)
    return w


def stream_handle(dev) -> int:
    """The stream handle the C ABI takes: torch's current CUDA stream on a CUDA device, 0 on CPU."""
    dev = _device(dev)
    if dev.type == "cpu":
        return 0
    import torch

    return torch.cuda.current_stream(dev).cuda_stream


def device_guard(dev):
    """``torch.cuda.device(dev)`` for a CUDA device, a no-op context for others."""
    dev = _device(dev)
    if dev.type == "cuda":
        import torch

        return torch.cuda.device(dev)
    return contextlib.nullcontext()


# kernel family -> the _C function its binding registers (a binding file may hold several
# families, e.g. bind_attention.cpp holds the decode attention and the RoPE/cache kernels).
KERNEL_ENTRY_POINTS = {
    "mxfp4": "mxfp4_dequantize_bf16",
    "moe_decode": "moe_mxfp4_decode",
    "moe_prefill": "moe_prefill_mxfp4",
    "router": "router_topk_bf16",
    "attention_decode": "attention_decode_bf16",
    "attention_prefill": "attention_prefill_bf16",
    "rope": "rope_qkv_bf16",
    "dense": "linear_bf16",
}


def family_built(family: str | None, dev=None) -> bool:
    """This build compiled the kernels of `family` (whether or not this machine can run them);
    for a CPU device: whether the host-simulation build has them."""
    mod = _hostsim() if dev is not None and _device(dev).type == "cpu" else _C
    if mod is None or family is None:
        return False
    return family in getattr(mod, "families", ()) or hasattr(mod, KERNEL_ENTRY_POINTS.get(family, "-"))


def arch_info(dev=None) -> dict | None:
    """The paths the kernels take for tensors of device `dev` (gptoss/arch.h): ``device_cc``,
    ``code_cc`` (the architecture of this build's code there), ``forced_cc`` (the override),
    ``cc`` (what the paths are chosen for: the lowest of the three), the features they use
    (``clusters``, ``pdl``, ``wgmma``), ``max_smem_per_block``, ``error`` (why no code of this
    build runs there, else None) and ``where`` ("cuda:N" or "host build"). `dev` None: the current
    CUDA device when torch sees one and the kernels are built, else the host build. None when
    neither has kernels."""
    import torch

    if dev is None:
        dev = torch.device("cuda", torch.cuda.current_device()) if (_C is not None and torch.cuda.is_available()) \
            else torch.device("cpu")
    dev = _device(dev)
    if dev.type == "cuda":
        if _C is None:
            return None
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        info = dict(_C.arch_info(index))
        info["where"] = f"cuda:{index}"
        return info
    mod = _hostsim()
    if mod is None:
        return None
    info = dict(mod.arch_info(0))
    info["where"] = "host build"
    return info


_clusters_cache: dict = {}


def clusters_available(dev) -> bool:
    """Whether the kernels for tensors of device `dev` take the thread-block-cluster paths (sm_90;
    cached per device until ``set_arch_override`` or ``forget_arch_info``)."""
    dev = _device(dev)
    key = (dev.type, dev.index)
    v = _clusters_cache.get(key)
    if v is None:
        info = arch_info(dev)
        v = _clusters_cache[key] = bool(info and info["clusters"])
    return v


def forget_arch_info() -> None:
    """Drop cached architecture facts (after the host build's emulated device changed)."""
    _clusters_cache.clear()


def arch_override() -> int:
    """The compute capability the paths are forced to (0: none), in the CUDA library (else the host build)."""
    for mod in (_C, _hostsim()):
        if mod is not None and hasattr(mod, "arch_override"):
            return int(mod.arch_override())
    return 0


def set_arch_override(cc: int) -> int:
    """Choose every op's path as if the device had compute capability `cc` (80, 86, 87, 89 or 90;
    0: the device's own), in the CUDA library and in the host build; returns the previous value.
    It only lowers the choice (an H100 forced to 80 runs the sm_80 paths; an L4 forced to 90 stays
    on its own). For tests and for comparing paths on one card; GPTOSS_ARCH_OVERRIDE=80 in the
    environment does the same at load."""
    before = arch_override()
    for mod in (_C, _hostsim()):
        if mod is not None and hasattr(mod, "set_arch_override"):
            mod.set_arch_override(int(cc))
    forget_arch_info()
    return before


@contextlib.contextmanager
def arch_override_as(cc: int):
    """``with arch_override_as(80): ...`` forces the sm_80 paths for the block, then restores."""
    before = set_arch_override(cc)
    try:
        yield
    finally:
        set_arch_override(before)


def code_for(cc: int, archs: list[str] | None = None) -> int:
    """The architecture of this build's code that a device of compute capability `cc` (10 * major
    + minor) runs, by the driver's rule, from the build's GPTOSS_CUDA_ARCHS (default: this build's):
    machine code sm_XY runs on X.Y..X.9 (sm_90a on 9.0 only) and is preferred; else the newest
    PTX compute_XY <= cc, which the driver compiles (compute_90a: 9.0 only). 0: none. (The library
    itself asks the driver: ``arch_info``; this is for messages without a device.)"""
    import re

    sass = ptx = 0
    for a in build_archs() if archs is None else archs:
        m = re.fullmatch(r"(\d+)(a?)(-real|-virtual)?", a.strip())
        if not m:
            continue
        num, specific, kind = int(m.group(1)), m.group(2) == "a", m.group(3)
        fits = cc == num if specific else None
        if kind != "-virtual" and (fits if specific else (cc // 10 == num // 10 and cc >= num)):
            sass = max(sass, num)
        if kind != "-real" and (fits if specific else cc >= num):
            ptx = max(ptx, num)
    return sass or ptx


def build_archs() -> list[str]:
    return list(_build_info.CUDA_ARCHS) if _build_info is not None and not _build_info.REFERENCE_ONLY else []


def library_path() -> str:
    """Absolute path of libgptoss_kernels.so (the C ABI; headers under ``include_path()``)."""
    # next to _C (an editable install keeps compiled files apart from the Python sources)
    base = os.path.dirname(_C.__file__) if _C is not None else os.path.dirname(__file__)
    path = os.path.join(base, "libgptoss_kernels.so")
    if not os.path.exists(path):
        raise FileNotFoundError(f"libgptoss_kernels.so is not installed: {_C_error or 'unknown reason'}")
    return path


def include_path() -> str:
    """Folder holding gptoss/gptoss.h, for -I."""
    return os.path.join(os.path.dirname(library_path()), "include")


def build_info() -> dict:
    """Facts of this build (for `gptoss-kernels info` and benchmark JSON)."""
    info = {
        "reference_only": bool(_build_info is None or _build_info.REFERENCE_ONLY),
        "cuda_build_version": getattr(_build_info, "CUDA_VERSION", None),
        "cuda_archs": build_archs(),
        "kernels_built": kernels_built(),
        "kernel_families": sorted(f for f in KERNEL_ENTRY_POINTS if family_built(f)),
        "abi_version": _C.abi_version if _C is not None else None,
        "pdl": pdl_enabled(),
        "pdl_off_reason": pdl_off_reason(),
        "arch_override": arch_override(),
        "hostsim_built": hostsim_built(),
        "backend": backend(),
    }
    return info


def pdl_enabled() -> bool | None:
    """Whether the decode-path kernels launch with programmatic dependent launch (None: no kernels).
    The CUDA library's setting; the host build's when only it is built (set_pdl keeps them equal)."""
    for mod in (_C, _hostsim() if _C is None else None):
        if mod is not None and hasattr(mod, "pdl_enabled"):
            return bool(mod.pdl_enabled())
    return None


def pdl_off_reason() -> str | None:
    """Why programmatic dependent launch is off ("" while on; None: no kernels)."""
    for mod in (_C, _hostsim() if _C is None else None):
        if mod is not None and hasattr(mod, "pdl_off_reason"):
            return str(mod.pdl_off_reason())
    return None


def set_pdl(enabled: bool) -> bool | None:
    """Programmatic dependent launch on/off for later kernel launches (CUDA graphs keep what they
    captured), in the CUDA library and in the host build (where a PDL launch is checked for
    accesses before its wait); returns the previous setting. Results are identical either way."""
    before = pdl_enabled()
    for mod in (_C, _hostsim()):
        if mod is not None and hasattr(mod, "set_pdl"):
            mod.set_pdl(bool(enabled))
    return before


_warned: set[tuple] = set()


def _tensors_phrase(dev) -> str:
    return "hostsim (CPU) tensors" if dev is not None and _device(dev).type == "cpu" else "CUDA tensors"


def warn_reference_fallback(op: str, reason: str | None = None, dev=None) -> None:
    """Say once per op (and reason) that tensors meant for the kernels are going through the
    reference path: CUDA tensors (dev None or CUDA), or CPU tensors on the hostsim backend. Nothing
    is said for a device that does not expect kernels (CPU tensors on the reference backend)."""
    if dev is not None and not expects_kernels(dev):
        return
    reason = reason or kernels_error(dev) or "the kernels do not support these shapes or arguments"
    where = _tensors_phrase(dev)
    if (op, reason, where) not in _warned:
        _warned.add((op, reason, where))
        warnings.warn(f"gptoss_kernels.{op}: running the PyTorch reference on {where} because "
                      f"{reason}", RuntimeWarning, stacklevel=3)


def C():
    """The compiled CUDA module (only call when cuda_available())."""
    return _C
