"""Checks shared by the commands' arguments.

Numbers: argparse ``type=`` functions, so that an out-of-range value is argparse's usage error
naming the flag (exit status 2), e.g. ``argument --max-new-tokens: must be a positive integer,
got '-5'``.

Devices: ``check_device`` refuses a ``--device`` that is not a device name, that this machine
does not have, or (for the commands that run the model) a CUDA device that this package's
kernels do not run on, with one line that names the flag and lists what this machine offers.
The commands print it as ``gptoss-kernels COMMAND: ...`` and exit with status 2.
"""

from __future__ import annotations

import argparse
import math

__all__ = ["positive_int", "non_negative_float", "probability", "DeviceError", "check_device",
           "available_devices"]


def positive_int(text: str) -> int:
    """An integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _finite_float(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """A finite number >= 0."""
    value = _finite_float(text, "a number >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}")
    return value


def probability(text: str) -> float:
    """A number in (0, 1] (a nucleus-sampling threshold)."""
    what = "a number in (0, 1]"
    value = _finite_float(text, what)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


# ---- --device ----


class DeviceError(ValueError):
    """A --device this machine cannot run (the message is one line naming the flag)."""


def _no_kernels_reason(index: int) -> str | None:
    """Why this package's kernels do not run on CUDA device `index` (None when they do)."""
    import torch

    from . import _lib

    if not _lib.kernels_built():
        return _lib.kernels_error() or "this install has no CUDA kernels"
    major, minor = torch.cuda.get_device_capability(index)
    archs = _lib.build_archs()
    if major < 8 or not _lib.code_for(10 * major + minor, archs):
        return (f"compute capability {major}.{minor}, and the kernels were built for "
                f"{', '.join(archs) or 'no architecture'}")
    return None


def available_devices(need_kernels: bool = True) -> tuple[list[str], list[str]]:
    """(the devices a --device may name on this machine, the CUDA devices torch sees that are
    left out because this package's kernels do not run on them). With need_kernels=False every
    CUDA device torch sees is available."""
    import torch

    usable, without = ["cpu"], []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            (without if need_kernels and _no_kernels_reason(i) else usable).append(f"cuda:{i}")
    return usable, without


def _available_phrase(need_kernels: bool) -> str:
    usable, without = available_devices(need_kernels)
    text = f"available on this machine: {', '.join(usable)}"
    if without:
        verb = "is" if len(without) == 1 else "are"
        text += f" ({', '.join(without)} {verb} there, but without this package's kernels)"
    return text


def _torch_has_no_cuda() -> str:
    import torch

    if torch.version.cuda is None and torch.version.hip is None:
        return f"this torch build ({torch.__version__}) has no CUDA support"
    return "torch sees no CUDA device"


def check_device(text: str, *, flag: str = "--device", need_kernels: bool = True) -> None:
    """Raise DeviceError unless `text` names a device this machine can run: ``cpu``, or ``cuda``
    / ``cuda:N`` for a CUDA device torch sees (``cuda``: the current one) that, with
    need_kernels, this package's kernels run on."""
    import torch

    def refuse(reason: str):
        raise DeviceError(f"{flag} {text!r}: {reason}; {_available_phrase(need_kernels)}")

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        refuse("not a device name (use cpu, cuda or cuda:N)")
    if dev.type == "cpu":
        if dev.index not in (None, 0):
            refuse("there is one CPU device (use cpu)")
        return
    if dev.type != "cuda":
        refuse(f"{dev.type} devices are not supported (use cpu, cuda or cuda:N)")
    if not torch.cuda.is_available():
        refuse(_torch_has_no_cuda())
    count = torch.cuda.device_count()
    index = torch.cuda.current_device() if dev.index is None else dev.index
    if index >= count:
        refuse(f"no such device (torch sees {count} CUDA device{'' if count == 1 else 's'}: "
               f"{', '.join(f'cuda:{i}' for i in range(count))})")
    if need_kernels:
        why = _no_kernels_reason(index)
        if why:
            refuse(f"this package's kernels do not run on cuda:{index} ({torch.cuda.get_device_name(index)}): {why}")
