"""One benchmark per case of `gptoss-kernels bench all`: the ops (router, MoE decode and prefill,
attention decode and prefill, dense ops), then the model end to end (the decode step, the
prefill). Each kernel case is verified against the reference once, then timed on the device.
Options and usage: conftest.py beside this; timing: gptoss_kernels/bench/suite.py."""

from __future__ import annotations

import pytest

from gptoss_kernels.bench import suite

pytestmark = pytest.mark.benchmark(timer=suite.device_clock)


def test_kernel(benchmark, kernel_case, gk, request):
    case = request.config._gk_kernel_cases[kernel_case]
    reason = suite.kernel_skip_reason(case, gk)
    if reason:
        pytest.skip(reason)
    suite.bench_kernel(benchmark, case, gk)


def test_e2e(benchmark, e2e_row, gk, request):
    row = request.config._gk_e2e_rows[e2e_row]
    steps = gk.rounds + gk.warmup_rounds + 8
    reason = suite.e2e_skip_reason(row, gk, steps)
    if reason:
        pytest.skip(reason)
    suite.bench_e2e(benchmark, row, gk, request.getfixturevalue("gk_model"))
