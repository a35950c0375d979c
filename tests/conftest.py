"""Test configuration.

- ``@pytest.mark.gpu``: needs a CUDA GPU and this build's kernels; skipped otherwise with the
  reason shown in the summary (run `pytest -rs`).
- The vocab file for harmony: if TIKTOKEN_ENCODINGS_BASE is unset and a folder
  ``../shared/vocab`` (relative to the repo) holds o200k_base.tiktoken, it is used.
"""

from __future__ import annotations

import os
import pathlib

import pytest
import torch

import gptoss_kernels

REPO = pathlib.Path(__file__).resolve().parents[1]

_vocab = REPO.parent / "shared" / "vocab"
if "TIKTOKEN_ENCODINGS_BASE" not in os.environ and (_vocab / "o200k_base.tiktoken").exists():
    os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(_vocab)


def gpu_skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA GPU visible to torch (GPU tests run in the device check, bench/device/)"
    return gptoss_kernels.kernels_error()


def pytest_collection_modifyitems(config, items):
    reason = gpu_skip_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_report_header(config):
    info = gptoss_kernels.build_info()
    return [f"gptoss_kernels: kernels_built={info['kernels_built']} archs={info['cuda_archs']} "
            f"cuda_available={gptoss_kernels.cuda_available()} torch={torch.__version__}",
            f"GPU tests: {'run' if gpu_skip_reason() is None else 'skipped: ' + gpu_skip_reason()}"]
