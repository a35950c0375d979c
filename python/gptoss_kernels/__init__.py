"""gptoss-kernels: CUDA kernels and a thin model class for OpenAI's gpt-oss on one GPU (Hopper,
Ada or Ampere: sm_90a, sm_80..89; gptoss/arch.h).

Ops run this package's kernels on CUDA tensors when the build has them (``cuda_available()``),
and the PyTorch reference (``gptoss_kernels.reference``) otherwise. CPU tensors run the reference,
or, under ``use_backend("hostsim")`` / ``GPTOSS_BACKEND=hostsim``, the kernels' own source built for
the CPU with checkers (``gptoss_kernels._hostsim``: for testing, not speed).
"""

from ._lib import (backend, build_info, cuda_available, hostsim_built, include_path, kernels_built, kernels_error,
                   library_path, set_backend, use_backend)
from .ops import *  # noqa: F401,F403
from .ops import __all__ as _ops_all

__version__ = "0.1.0"
__all__ = ["backend", "build_info", "cuda_available", "hostsim_built", "include_path", "kernels_built",
           "kernels_error", "library_path", "set_backend", "use_backend", "__version__", *_ops_all]
from .model import GptOss, GptOssConfig  # noqa: E402
__all__ += ["GptOss", "GptOssConfig"]
