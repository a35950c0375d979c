"""The pytest-benchmark suite (bench/suite/), on the CPU: its cases are the CLI's, it skips here
with the reason, a device timer's results land in extra_info and the saved JSON as specified,
and --benchmark-compare-fail flags a regression against a saved run. The suite itself times
only on a GPU (the device check runs it)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch

pytest_plugins = ["pytester"]
pytest.importorskip("pytest_benchmark")

from gptoss_kernels.bench import cli as bench_cli  # noqa: E402
from gptoss_kernels.bench import ops as O  # noqa: E402
from gptoss_kernels.bench import report  # noqa: E402
from gptoss_kernels.bench.timing import Limits  # noqa: E402
from gptoss_kernels.cli import main  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SUITE = REPO / "bench" / "suite"


def _cli_cases_on_a_gpu(monkeypatch, tmp_path, quick: bool) -> list[str]:
    """The rows `gptoss-kernels bench all` runs on a GPU, from its JSON: the command runs for
    real, made to see a GPU, with every case past its time budget (so nothing is built)."""
    env = report.environment(torch.device("cpu"))   # before torch is made to see a GPU
    monkeypatch.setattr(report, "environment", lambda device: dict(env))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(bench_cli, "measure_limits", lambda device, quick=False:
                        Limits(3000.0, 1, 700.0, (1, 1, 1), "bfloat16", str(device)))
    monkeypatch.setattr(O.Context, "out_of_time", lambda self: True)
    path = tmp_path / f"cli{int(quick)}.json"
    # --config 120b: what the suite's --gk-config auto resolves to without a GPU (as the CLI's auto)
    rc = main(["bench", "all", "--config", "120b", "--json", str(path)] + (["--quick"] if quick else []))
    monkeypatch.undo()
    doc = json.loads(path.read_text())
    assert rc == 0 and doc["mode"] == "gpu" and doc["complete"]
    assert all(r["status"] == "skipped" for r in doc["results"] + doc["e2e"])
    return [f"{r['op']} {r['case']}" for r in doc["results"] + doc["e2e"]]


def _suite_ids(pytester, *args) -> tuple[list[str], list]:
    rec = pytester.inline_run(str(SUITE), "-p", "no:cacheprovider", *args)
    reports = [r for r in rec.getreports("pytest_runtest_logreport") if r.when == "setup"]
    ids = [r.nodeid.split("[", 1)[1][:-1] for r in reports]
    return ids, reports


@pytest.mark.parametrize("quick", [False, True], ids=["grid", "quick-grid"])
def test_suite_cases_are_the_cli_cases_and_skip_without_a_gpu(pytester, monkeypatch, tmp_path, quick):
    cli_rows = _cli_cases_on_a_gpu(monkeypatch, tmp_path, quick)
    assert len(cli_rows) == len(set(cli_rows)) and len(cli_rows) > (20 if not quick else 10)
    ops = {r.split(" ", 1)[0] for r in cli_rows}
    assert ops == {"router_topk", "moe_mxfp4", "attention_decode", "attention_prefill", "rms_norm", "linear", "e2e"}
    ids, reports = _suite_ids(pytester, *(["--gk-quick"] if quick else []))
    assert len(ids) == len(cli_rows)
    assert ids == cli_rows   # same names, same order
    assert any("(prefill kernels)" in i for i in ids) == any("(prefill kernels)" in r for r in cli_rows)
    if not torch.cuda.is_available():
        assert all(r.skipped for r in reports)
        reasons = {r.longrepr[2] for r in reports}
        assert len(reasons) == 1
        (reason,) = reasons
        assert "no CUDA GPU" in reason and "host build of the kernels" in reason and "never timed" in reason


# ---------------------------------------------------------------------------------------------
# A fake device timer through the real fixture and the saved JSON
# ---------------------------------------------------------------------------------------------

FAKE_SUITE = '''
    import os

    import pytest
    import torch

    from gptoss_kernels.bench import ops as O
    from gptoss_kernels.bench import suite
    from gptoss_kernels.bench.shapes import ModelShape
    from gptoss_kernels.bench.timing import Limits

    pytestmark = pytest.mark.benchmark(timer=suite.device_clock)


    class FakeTimer:
        """Device seconds per round from a list (the warm-up rounds first); runs the pass."""
        name = "fake-device-timer"

        def __init__(self, durations):
            self.durations = list(durations)
            self.calls = 0

        def __call__(self, one_pass):
            one_pass()
            self.calls += 1
            return self.durations.pop(0) * float(os.environ.get("FAKE_SLOWDOWN", "1"))


    def session(timer, rounds, warmup):
        limits = Limits(copy_gbps=4000.0, copy_bytes=1, matmul_tflops=1000.0, matmul_shape=(1, 1, 1),
                        matmul_dtype="bfloat16", device="fake")
        ctx = O.Context(device=torch.device("cpu"), shape=ModelShape.gpt_oss_120b(), limits=limits)
        return suite.Session(device=torch.device("cpu"), config="120b", quick=False, limits=limits, ctx=ctx,
                             timer=timer, env={"card": "Fake GPU 80GB", "git_commit": "0123abcd", "git_dirty": False},
                             rounds=rounds, warmup_rounds=warmup)


    def test_case(benchmark):
        ran = []
        case = O.Case(op="fake_op", name="T=7", shape={"T": 7}, family="moe_decode", bytes=8_000_000,
                      flops=2_000_000_000, alloc_bytes=1, make=lambda seed: {"seed": seed},
                      run=lambda a: (lambda: ran.append(a["seed"])),
                      verify=lambda a: {"rel_err": 1.5e-3, "tol": 1e-2, "passed": True})
        timer = FakeTimer([1.0, 1.0] + [4e-6, 2e-6, 6e-6, 5e-6, 3e-6])
        suite.bench_kernel(benchmark, case, session(timer, rounds=5, warmup=2))
        assert timer.calls == 7 and not timer.durations
        assert len(ran) >= 7   # the timed rounds ran the op (plus prepare_pass's warm-up, the enqueue probe)


    def test_per_call(benchmark):
        timer = FakeTimer([1.0, 8e-6, 4e-6, 12e-6])
        benchmark.extra_info["measured"] = suite.measure(benchmark, lambda: None, 4, timer=timer, rounds=3,
                                                         warmup_rounds=1)


    @pytest.mark.parametrize("which", ["decode B=2 ctx=12", "prefill T=8"])
    def test_e2e_row(benchmark, which):
        """The model rows through the real model class (tiny, on the CPU's reference path)."""
        from gptoss_kernels.bench import e2e
        from gptoss_kernels.config import GptOssConfig
        from gptoss_kernels.model import GptOss

        cfg = GptOssConfig(num_hidden_layers=2, num_experts=4, experts_per_token=2, vocab_size=96, hidden_size=64,
                           intermediate_size=32, head_dim=16, num_attention_heads=4, num_key_value_heads=2,
                           sliding_window=4)
        model = GptOss.from_config(cfg, device="cpu", seed=0)
        # decode: the session's rounds; prefill: a tenth of them (at least 2) after 1 warm-up round
        timer = FakeTimer([1.0] * 3 + [2e-3, 1e-3, 3e-3] if which.startswith("decode") else [1.0, 2e-3, 4e-3])
        s = session(timer, rounds=3, warmup=3)
        s.ctx.shape = ModelShape.of(cfg)
        rows = {r["case"]: r for r in e2e.plan(s.ctx.shape, None, (2,), (12,), (8,))}
        suite.bench_e2e(benchmark, rows[which], s, model)
        assert not timer.durations


    def test_failing_verification_is_not_timed(benchmark):
        case = O.Case(op="fake_op", name="bad", shape={}, family="moe_decode", bytes=1, flops=1, alloc_bytes=1,
                      make=lambda seed: {}, run=lambda a: (lambda: None),
                      verify=lambda a: {"rel_err": 0.5, "tol": 1e-2, "passed": False})
        timer = FakeTimer([])
        suite.bench_kernel(benchmark, case, session(timer, rounds=5, warmup=2))
'''


def _run_fake(pytester, monkeypatch, tmp_path, name, *args, slowdown=1.0):
    pytester.makepyfile(test_fake_suite=textwrap.dedent(FAKE_SUITE))
    # hermetic and quick: no CPU probe (py-cpuinfo takes seconds), no git
    pytester.makeconftest("""
        def pytest_benchmark_generate_machine_info(config):
            return {"node": "fake"}

        def pytest_benchmark_generate_commit_info(config):
            return {"id": "fake", "dirty": False}
    """)
    out = tmp_path / name
    monkeypatch.setenv("FAKE_SLOWDOWN", str(slowdown))
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-rf", f"--benchmark-json={out}", *args)
    return result, json.loads(out.read_text()) if out.exists() else None


def test_fake_device_timer_lands_in_extra_info(pytester, monkeypatch, tmp_path):
    result, doc = _run_fake(pytester, monkeypatch, tmp_path, "run.json")
    result.assert_outcomes(passed=4, failed=1)
    # a failed verification fails the test, says why, and times nothing
    result.stdout.fnmatch_lines(["*fake_op bad: the verification against the reference failed "
                                 "(rel err 5.00e-01 > tol 0.01): not timed*"])
    benches = {b["name"]: b for b in doc["benchmarks"]}
    assert set(benches) == {"test_case", "test_per_call", "test_e2e_row[decode B=2 ctx=12]", "test_e2e_row[prefill T=8]"}

    b = benches["test_case"]
    st = b["stats"]
    # the rounds' durations are the device times, exactly; the warm-up rounds (1 s) are not among them
    assert st["data"] == [4e-6, 2e-6, 6e-6, 5e-6, 3e-6]
    assert st["rounds"] == 5 and st["iterations"] == 1
    assert st["median"] == 4e-6 and st["min"] == 2e-6 and st["max"] == 6e-6
    assert b["options"]["timer"] == "device_clock" and b["group"] == "fake_op"
    x = b["extra_info"]
    assert x["op"] == "fake_op" and x["case"] == "T=7" and x["shape"] == {"T": 7}
    assert x["bytes"] == 8_000_000 and x["flops"] == 2_000_000_000
    assert x["statistic"] == "median"
    assert x["time_us"] == pytest.approx(4.0, rel=1e-12)
    assert x["gbps"] == pytest.approx(2000.0, rel=1e-12)       # 8 MB / 4 µs
    assert x["pct_bw"] == pytest.approx(50.0, rel=1e-12)       # of the 4000 GB/s copy measured in the session
    assert x["tflops"] == pytest.approx(500.0, rel=1e-12)      # 2 GFLOP / 4 µs
    assert x["pct_flops"] == pytest.approx(50.0, rel=1e-12)    # of the 1000 TFLOP/s matmul
    assert x["copy_gbps"] == 4000.0 and x["matmul_tflops"] == 1000.0 and x["matmul_dtype"] == "bfloat16"
    assert x["rel_err"] == 1.5e-3 and x["tol"] == 1e-2 and x["verify"]["passed"] is True
    assert x["card"] == "Fake GPU 80GB" and x["commit"] == "0123abcd" and x["dirty"] is False
    assert x["config"] == "120b"
    from gptoss_kernels import _lib

    assert x["variant"] == {"family": "moe_decode", "pdl": _lib.pdl_enabled()}
    t = x["timing"]
    assert t["timer"] == "fake-device-timer" and t["method"] == "host-clock"
    assert t["calls_per_round"] == 1 and t["input_sets"] == 1 and t["rounds"] == 5 and t["warmup_rounds"] == 2
    assert t["host_enqueue_us"] >= 0 and t["lead_us"] is None

    # a round of 4 calls: each round's duration is the device time / 4
    b = benches["test_per_call"]
    assert b["stats"]["data"] == [2e-6, 1e-6, 3e-6] and b["stats"]["median"] == 2e-6
    measured = b["extra_info"]["measured"]     # what measure() returns: pytest-benchmark's own statistics
    assert measured == {k: b["stats"][k] for k in ("median", "min", "max", "mean", "stddev", "iqr", "rounds")}

    # the model rows: one decode step / one prefill + first token a round, through the model's API
    b = benches["test_e2e_row[decode B=2 ctx=12]"]
    assert b["stats"]["data"] == [2e-3, 1e-3, 3e-3] and b["group"] == "e2e"
    x = b["extra_info"]
    assert x["case"] == "decode B=2 ctx=12" and x["batch"] == 2 and x["context"] == 12
    assert x["ms_per_step"] == pytest.approx(2.0, rel=1e-12) and x["tok_s"] == pytest.approx(1000.0, rel=1e-12)
    assert x["verify"]["passed"] is True and x["timing"]["rounds"] == 3 and x["timing"]["calls_per_round"] == 1
    assert x["pct_of_bound"] == pytest.approx(100 * 1000.0 / x["bound_tok_s"], rel=1e-12)
    b = benches["test_e2e_row[prefill T=8]"]
    assert b["stats"]["data"] == [2e-3, 4e-3]
    x = b["extra_info"]
    assert x["ttft_ms"] == pytest.approx(3.0, rel=1e-12) and x["tok_s"] == pytest.approx(8 / 3e-3, rel=1e-12)
    assert x["timing"]["rounds"] == 2 and x["timing"]["warmup_rounds"] == 1 and x["verify"]["passed"] is True
    assert x["bytes"] is None and x["gbps"] is None


def test_compare_fail_flags_a_regression_against_a_saved_run(pytester, monkeypatch, tmp_path):
    """The documented threshold (bench/device/run.sh, README): median 10% slower than the saved run fails."""
    result, first = _run_fake(pytester, monkeypatch, tmp_path, "first.json", "-k", "not e2e")
    assert first is not None
    saved = tmp_path / "first.json"
    args = (f"--benchmark-compare={saved}", "--benchmark-compare-fail=median:10%", "-k", "not failing and not e2e")
    result, _ = _run_fake(pytester, monkeypatch, tmp_path, "slower.json", *args, slowdown=1.25)
    assert result.ret != 0
    result.stderr.fnmatch_lines(["*Performance has regressed*",
                                 "*test_case*Field 'median' has failed PercentageRegressionCheck: 25.0*> 10.0*"])
    result, _ = _run_fake(pytester, monkeypatch, tmp_path, "same.json", *args, slowdown=1.05)
    assert result.ret == 0, result.stdout.str()[-2000:]


# ---------------------------------------------------------------------------------------------
# extra_info of the model rows; the device check's helpers
# ---------------------------------------------------------------------------------------------


def test_e2e_extra_info_numbers():
    from gptoss_kernels.bench import e2e, suite
    from gptoss_kernels.bench.shapes import ModelShape, decode_bytes_per_step

    shape = ModelShape.gpt_oss_120b()
    limits = Limits(4000.0, 1, 1000.0, (1, 1, 1), "bfloat16", "fake")
    s = suite.Session(device=torch.device("cpu"), config="120b", quick=False, limits=limits,
                      ctx=O.Context(device=torch.device("cpu"), shape=shape, limits=limits), timer=None,
                      env={"card": "Fake GPU", "git_commit": "abc", "git_dirty": True})
    rows = {r["case"]: r for r in e2e.plan(shape, None, (4,), (1024,), (2048,))}
    stats = {"median": 2e-3}
    x = suite.e2e_extra_info(rows["decode B=4 ctx=1024"], stats, s, {"cuda_graph": True}, {"passed": True}, {})
    step = decode_bytes_per_step(shape, 4, 1024)["total"]
    assert x["bytes"] == int(step) and x["ms_per_step"] == pytest.approx(2.0, rel=1e-12)
    assert x["tok_s"] == pytest.approx(2000.0, rel=1e-12)                  # 4 sequences / 2 ms
    assert x["gbps"] == pytest.approx(int(step) / 2e-3 / 1e9, rel=1e-12)
    assert x["pct_bw"] == pytest.approx(100 * int(step) / 2e-3 / 1e9 / 4000.0, rel=1e-12)
    assert x["bound_tok_s"] == pytest.approx(4 / (step / 4000e9), rel=1e-12)
    assert x["pct_of_bound"] == pytest.approx(100 * 2000.0 / x["bound_tok_s"], rel=1e-12)
    assert x["card"] == "Fake GPU" and x["commit"] == "abc" and x["dirty"] is True
    x = suite.e2e_extra_info(rows["prefill T=2048"], stats, s, {}, {"passed": True}, {})
    assert x["ttft_ms"] == pytest.approx(2.0, rel=1e-12) and x["tok_s"] == pytest.approx(2048 / 2e-3, rel=1e-12)
    assert x["bytes"] is None and x["gbps"] is None and x["ms_per_step"] is None


def test_device_check_keeps_and_finds_suite_runs(tmp_path):
    from .test_bench import _helpers

    h = _helpers()

    def suite_json(date, card, commit, median):
        return {"datetime": f"{date}T10:00:00+00:00", "commit_info": {"id": commit},
                "machine_info": {"gptoss": {"gpu": {"card": card}}},
                "benchmarks": [{"name": "test_kernel[router_topk T=1]", "stats": {"median": median}}]}

    out = tmp_path / "out"
    out.mkdir()
    (out / "bench.json").write_text(json.dumps({"env": {"date": "2026-12-05T10:00:00Z", "card": "NVIDIA H200",
                                                        "git_commit": "1234567890abcdef"}}))
    (out / "suite.json").write_text(json.dumps(suite_json("2026-12-05", "NVIDIA H200", "1234567890abcdef", 3e-6)))
    saved = h.save(out, tmp_path)
    names = sorted(p.name for p in saved)
    assert names == ["2026-12-05_H200_1234567890.json", "2026-12-05_H200_1234567890.suite.json"]
    results = tmp_path / "bench" / "results"
    (results / "2026-12-01_H200_aaaaaaaaaa.suite.json").write_text(json.dumps(
        suite_json("2026-12-01", "NVIDIA H200", "aaaaaaaaaa", 2e-6)))
    (results / "2026-12-07_H100-80GB-HBM3_bbbbbbbbbb.suite.json").write_text(json.dumps(
        suite_json("2026-12-07", "NVIDIA H100 80GB HBM3", "bbbbbbbbbb", 2e-6)))
    # the last run on the same card, not the newest on another card
    assert h.last_suite_run(tmp_path, "NVIDIA H200") == results / "2026-12-05_H200_1234567890.suite.json"
    assert h.last_suite_run(tmp_path, "NVIDIA H100 80GB HBM3").name.startswith("2026-12-07_H100")
    assert h.last_suite_run(tmp_path, "NVIDIA B200") is None
    # without a bench.json (its step cut short) the suite's run is kept under its own name
    (out / "bench.json").unlink()
    saved = h.save(out, tmp_path)
    assert [p.name for p in saved] == ["2026-12-05_H200_1234567890.suite.json"]
    text = h.suite_summary(json.loads((out / "suite.json").read_text()))
    assert "router_topk T=1" in text and "3.00" in text



@pytest.mark.slow
def test_device_check_runs_the_suite_step(tmp_path):
    """run.sh's suite step, alone, as a dry run here (no wheel, no GPU): it runs, the suite skips
    with the reason, nothing is timed, the summary has the step."""
    if torch.cuda.is_available():
        pytest.skip("a dry run for a machine without a GPU")
    import gptoss_kernels

    env = dict(os.environ, GPTOSS_CHECK_STEPS="suite", GPTOSS_CHECK_NO_BUILD="1", PYTHON=sys.executable,
               GPTOSS_CHECK_WORK=str(tmp_path / "work"),
               PYTHONPATH=str(pathlib.Path(gptoss_kernels.__file__).resolve().parents[1]))
    out = tmp_path / "out"
    r = subprocess.run(["bash", str(REPO / "bench" / "device" / "run.sh"), str(out)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    log = (out / "bench.log").read_text()
    assert "===== pytest-benchmark suite: bench/suite --gk-quick" in log
    assert "no CUDA GPU visible to torch" in log and "never timed" in log
    assert not (out / "suite.json").exists()
    summary = (out / "summary.md").read_text()
    assert "| suite | pass, nothing timed (every case skipped: bench.log) |" in summary
    assert "| bench all | not asked for (GPTOSS_CHECK_STEPS) |" in summary
