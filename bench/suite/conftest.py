"""The pytest-benchmark suite of the kernels: options, the cases, the session, and what the saved
JSON records besides pytest-benchmark's own fields. Not part of the default test run
(``testpaths = ["tests"]``); run it by path:

    pytest bench/suite                                   # every case of `gptoss-kernels bench all`
    pytest bench/suite --gk-quick -k "moe_mxfp4"         # the --quick grid, one op
    pytest bench/suite --benchmark-json run.json         # keep the run (bench/device/run.sh does)
    pytest bench/suite --benchmark-compare bench/results/<last run on this card>.suite.json \\
        --benchmark-compare-fail median:10%              # fail on a regression against it

How the rounds are timed (device time, not the host clock): gptoss_kernels/bench/suite.py.
"""

from __future__ import annotations

import os
import time

import pytest

from gptoss_kernels.bench import suite

try:
    import pytest_benchmark  # noqa: F401
except ImportError:   # the suite then skips, saying so (its hooks below need the plugin)
    HAVE_PLUGIN = False
else:
    HAVE_PLUGIN = True


def pytest_addoption(parser):
    g = parser.getgroup("gptoss-kernels suite", "the kernel benchmarks (bench/suite/)")
    g.addoption("--gk-config", choices=("auto", "120b", "20b"), default="auto",
                help="model shapes (default auto: as `gptoss-kernels bench --config auto`, 120b on a card that "
                     "holds it, else 20b)")
    g.addoption("--gk-quick", action="store_true",
                help="the cases of `gptoss-kernels bench all --quick` (fewer shapes) and fewer rounds")
    g.addoption("--gk-rounds", type=int, default=None, metavar="N",
                help=f"timed rounds per case (default {suite.DEFAULT_ROUNDS}, {suite.QUICK_ROUNDS} with --gk-quick; "
                     f"e2e prefill rows 1/{suite.E2E_PREFILL_ROUND_DIVISOR} of it, at least 2)")
    g.addoption("--gk-warmup-rounds", type=int, default=suite.DEFAULT_WARMUP_ROUNDS, metavar="N",
                help=f"untimed rounds before them (default {suite.DEFAULT_WARMUP_ROUNDS})")
    g.addoption("--gk-max-seconds", type=float, default=None, metavar="S",
                help="cases that would start after S seconds skip (so a time-boxed run still writes its JSON)")


def pytest_configure(config):
    config._gk_t0 = time.monotonic()
    config._gk_session = None


def _grid(config) -> tuple[str, bool]:
    import torch

    from gptoss_kernels.bench.cli import resolve_config

    return resolve_config(config.getoption("--gk-config"), torch.cuda.is_available()), config.getoption("--gk-quick")


def pytest_generate_tests(metafunc):
    # parameters are the ids (strings): the saved JSON's "params" stay readable
    cfg, quick = _grid(metafunc.config)
    if "kernel_case" in metafunc.fixturenames:
        cases = {suite.case_id(c): c for c in suite.kernel_cases(cfg, quick)}
        metafunc.config._gk_kernel_cases = cases
        metafunc.parametrize("kernel_case", list(cases), ids=list(cases))
    if "e2e_row" in metafunc.fixturenames:
        rows = {suite.e2e_id(r): r for r in suite.e2e_rows(cfg, quick)}
        metafunc.config._gk_e2e_rows = rows
        metafunc.parametrize("e2e_row", list(rows), ids=list(rows))


def pytest_collection_modifyitems(config, items):
    reason = suite.no_gpu_reason()
    if reason is None and not HAVE_PLUGIN:
        reason = "pytest-benchmark is not installed (pip install pytest-benchmark; it is in the test extras)"
    if reason is None:
        return
    for item in items:
        item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def gk(request) -> suite.Session:
    """The card's limits measured once for the session, the timer, the card and the commit."""
    c = request.config
    mx = c.getoption("--gk-max-seconds")
    cfg, quick = _grid(c)
    s = suite.make_session(cfg, quick, rounds=c.getoption("--gk-rounds"),
                           warmup_rounds=c.getoption("--gk-warmup-rounds"),
                           deadline=None if mx is None else c._gk_t0 + mx)
    c._gk_session = s
    return s


@pytest.fixture(scope="session")
def gk_model(gk):
    """The model with random weights at the config's shapes, built once (the first e2e test)."""
    try:
        model = suite.build_model(gk)
    except ImportError as e:
        pytest.skip(f"model class not importable ({e})")
    yield model
    del model
    import torch

    torch.cuda.empty_cache()


if HAVE_PLUGIN:
    def pytest_benchmark_update_machine_info(config, machine_info):
        machine_info["gptoss"] = suite.machine_info(getattr(config, "_gk_session", None))

    def pytest_benchmark_update_commit_info(config, commit_info):
        # the device check copies the tree without .git: it passes the commit in the environment
        if os.environ.get("GPTOSS_GIT_COMMIT"):
            commit_info["id"] = os.environ["GPTOSS_GIT_COMMIT"]
            commit_info["dirty"] = os.environ.get("GPTOSS_GIT_DIRTY") in ("1", "true", "True")
            commit_info.pop("error", None)
        commit_info.setdefault("project", "gptoss-kernels")

    def pytest_benchmark_update_json(config, benchmarks, output_json):
        s = getattr(config, "_gk_session", None)
        cfg, quick = _grid(config)
        output_json["gptoss"] = {
            "schema": "gptoss-kernels-suite/1", "config": cfg, "quick": quick,
            "time_unit": "seconds of device time per call (CUDA events; see gptoss_kernels/bench/suite.py)",
            "notes": s.notes if s is not None else []}
