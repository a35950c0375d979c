"""gptoss-kernels: CUDA kernels and a thin model class for OpenAI's gpt-oss on one Hopper GPU.

Ops run this package's kernels on CUDA tensors when the build has them (``cuda_available()``),
and the PyTorch reference (``gptoss_kernels.reference``) otherwise.
"""

from ._lib import build_info, cuda_available, include_path, kernels_built, kernels_error, library_path
from .ops import *  # noqa: F401,F403
from .ops import __all__ as _ops_all

__version__ = "0.1.0"
__all__ = ["build_info", "cuda_available", "include_path", "kernels_built", "kernels_error",
           "library_path", "__version__", *_ops_all]
from .model import GptOss, GptOssConfig  # noqa: E402  (model class, issue 4)
__all__ += ["GptOss", "GptOssConfig"]
