"""The benchmark CLI and the device check, on the CPU (reference mode), plus one GPU smoke test.

What runs here: argument handling, the JSON schema, reference mode end to end at tiny shapes,
the bytes-per-token arithmetic against the real configs, the tables, the device check's helper
functions and `prepare.sh --check` (validates tools and inputs, builds nothing; a full wheel
build takes minutes of nvcc and is left to the developer who prepares a device run)."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import shutil
import subprocess

import pytest
import torch

from gptoss_kernels.bench import cli as bench_cli
from gptoss_kernels.bench.e2e import bound_tok_s, decode_bytes_per_token
from gptoss_kernels.bench.report import SCHEMA, format_document
from gptoss_kernels.bench.shapes import ModelShape, decode_bytes_per_step, expected_distinct_experts
from gptoss_kernels.cli import build_parser, main

REPO = pathlib.Path(__file__).resolve().parents[1]
DEVICE_DIR = REPO / "bench" / "device"


def _helpers():
    spec = importlib.util.spec_from_file_location("device_helpers", DEVICE_DIR / "helpers.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------------------------------------
# arguments
# ---------------------------------------------------------------------------------------------


def test_cli_arguments():
    p = build_parser()
    a = p.parse_args(["bench", "moe", "--config", "20b", "--tokens", "1,4", "--tokens", "16", "--json", "x.json"])
    assert a.op == "moe" and a.config == "20b" and a.json == "x.json"
    assert bench_cli._flatten(a.tokens) == [1, 4, 16]
    a = p.parse_args(["bench", "attention", "--mode", "decode", "--context", "8192", "--batch", "1 4", "--quick"])
    assert a.mode == "decode" and a.quick and bench_cli._flatten(a.batch) == [1, 4]
    a = p.parse_args(["bench", "all"])
    assert a.config == "auto" and a.tokens is None and a.mode == "both" and a.max_seconds is None
    # defaults are the real model shapes on a GPU, reduced shapes in reference mode
    assert bench_cli.grid("moe", True, False) == (1, 4, 16, 64, 1024, 4096, 8192)
    assert bench_cli.grid("router", True, False) == (1, 64, 8192)
    assert bench_cli.grid("decode_batch", True, False) == (1, 4, 16, 64)
    assert bench_cli.grid("decode_context", True, False) == (8192, 32768, 131072)
    assert max(bench_cli.grid("moe", False, False)) < 1024
    assert bench_cli.grid("moe", False, True, [7]) == (7,)


@pytest.mark.parametrize("argv", [
    ["bench"], ["bench", "gemm"], ["bench", "moe", "--tokens", "0"], ["bench", "moe", "--tokens", "a,b"],
    ["bench", "moe", "--config", "7b"], ["bench", "attention", "--mode", "train"],
])
def test_cli_rejects_bad_arguments(argv, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 2


# ---------------------------------------------------------------------------------------------
# reference mode end to end, and the JSON schema
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core runner: one thread avoids oversubscription stalls
    try:
        rc = main(["bench", "all", "--device", "cpu", "--quick", "--tokens", "1", "--context", "64",
                   "--batch", "1", "--json", str(path)])
    finally:
        torch.set_num_threads(threads)
    return rc, json.loads(path.read_text())


def test_reference_mode_runs_end_to_end(reference_run, capsys):
    rc, doc = reference_run
    assert rc == 0
    assert doc["mode"] == "reference" and "reference mode (no GPU)" in doc["label"]
    ops = {r["op"] for r in doc["results"]}
    assert ops == {"router_topk", "moe_mxfp4", "attention_decode", "attention_prefill", "rms_norm", "linear"}
    for r in doc["results"]:
        assert r["status"] == "reference", r
        assert "not a kernel measurement" in r["reason"]
        assert r["time_us"] > 0 and r["verify"]["passed"], r
    assert doc["e2e"] and all(r["status"] == "skipped" for r in doc["e2e"])
    text = format_document(doc)
    assert "reference mode (no GPU): not a kernel measurement" in text.splitlines()[0]


def test_reference_mode_table_says_what_it_measured(reference_run):
    """Reference mode: which rows run reduced model dims (and why), no percentage of the CPU's
    measured rates (they are no ceilings: a row could read over 100 %), no rel err of the reference
    against itself; the JSON keeps every figure."""
    import copy

    from gptoss_kernels.bench.report import NOT_APPLICABLE

    _, doc = reference_run
    text = format_document(doc, markdown=True)
    assert "config 120b (reference mode: the 'model dims' column says which rows run reduced shapes)" in text
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| op |"))
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        if "---" not in line:
            table.append([c.strip() for c in line.strip("|").split("|")])
    head, body = table[0], table[1:]
    col = {h: i for i, h in enumerate(head)}
    assert body and {"model dims", "%BW", "%FLOP", "rel err"} <= set(col)
    dims = {r[col["op"]]: r[col["model dims"]] for r in body}
    assert dims["moe_mxfp4"] == "reduced for the CPU: E 8 of 128, H 128 of 2880, I 128 of 2880"
    assert dims["router_topk"] == dims["attention_decode"] == "as 120b"
    assert dims["linear"].startswith("reduced for the CPU: N ")
    for r in body:
        assert r[col["%BW"]] == r[col["%FLOP"]] == r[col["rel err"]] == NOT_APPLICABLE, r
    assert any(f"{NOT_APPLICABLE} in %BW and %FLOP" in line for line in text.splitlines() if line.startswith("note:"))
    assert all(isinstance(r["pct_flops"], float) for r in doc["results"])
    # a failed verification stays visible; a GPU document shows the figures and no model-dims column
    bad = copy.deepcopy(doc)
    bad["results"][0]["verify"]["passed"] = False
    assert " FAIL " in format_document(bad, markdown=True)
    gpu = copy.deepcopy(doc)
    gpu["mode"] = "gpu"
    for r in gpu["results"]:
        r["status"] = "ok"
    text = format_document(gpu, markdown=True)
    assert "model dims" not in text and NOT_APPLICABLE not in text
    assert "(reference mode:" not in text and "note: reference mode:" not in text


def test_config_auto_by_the_card_memory(monkeypatch):
    """--config auto: 120b where its 61 GiB of weights fit with room (and without a GPU), else 20b."""
    assert bench_cli.resolve_config("20b", True) == "20b" and bench_cli.resolve_config("120b", False) == "120b"
    assert bench_cli.resolve_config("auto", False) == "120b"

    class Props:
        total_memory = 24 * 2**30   # an RTX 4090 / L4

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: Props)
    assert bench_cli.resolve_config("auto", True) == "20b"
    Props.total_memory = 80 * 2**30  # an A100 80GB / H100
    assert bench_cli.resolve_config("auto", True) == "120b"


def test_the_header_names_the_paths():
    doc = {"mode": "gpu", "config": "20b", "results": [], "e2e": [], "notes": [],
           "env": {"card": "NVIDIA L4", "paths": {"label": "sm_89 paths (compute capability 8.9; this build's code "
                                                           "for it: sm_89)"}}}
    lines = format_document(doc).splitlines()
    assert lines[0].startswith("card: NVIDIA L4") and lines[1] == "kernels: sm_89 paths (compute capability 8.9; " \
        "this build's code for it: sm_89)"


def test_json_schema(reference_run):
    _, doc = reference_run
    assert doc["schema"] == SCHEMA and doc["complete"] is True
    for key, typ in {"mode": str, "label": str, "config": str, "args": dict, "env": dict, "limits": dict,
                     "results": list, "e2e": list, "notes": list, "elapsed_s": float}.items():
        assert isinstance(doc[key], typ), key
    env = doc["env"]
    for key in ("date", "git_commit", "git_dirty", "python", "torch", "torch_cuda", "card", "driver", "build",
                "kernels_in_use", "kernels_error", "paths"):
        assert key in env, key
    assert isinstance(env["torch"], str) and isinstance(env["card"], str) and isinstance(env["build"], dict)
    lim = doc["limits"]
    assert lim["copy_gbps"] > 0 and lim["matmul_tflops"] > 0 and len(lim["matmul_shape"]) == 3
    for r in doc["results"]:
        for key, typ in {"op": str, "case": str, "shape": dict, "bytes": int, "flops": int, "status": str,
                         "time_us": float, "gbps": float, "tflops": float, "pct_bw": float, "pct_flops": float,
                         "timing": dict, "verify": dict, "baselines": list}.items():
            assert isinstance(r[key], typ), (key, r)
        assert {"median_us", "min_us", "max_us", "runs", "calls_per_run", "method"} <= set(r["timing"])
        assert r["timing"]["method"] == "host-clock"
        assert {"rel_err", "tol", "passed"} <= set(r["verify"])
        assert r["gbps"] == pytest.approx(r["bytes"] / r["time_us"] / 1e3)
    for r in doc["e2e"]:
        for key in ("case", "batch", "context", "status", "reason", "tok_s", "ttft_ms", "peak_gib",
                    "bytes_per_token", "bound_tok_s", "pct_of_bound"):
            assert key in r, key


def test_ops_without_kernels_are_not_timed_as_kernels(monkeypatch):
    """On a GPU build that lacks a family, the row says so (logic checked without a GPU)."""
    from gptoss_kernels.bench import ops as O

    ctx = O.Context(device=torch.device("cpu"), shape=ModelShape.gpt_oss_20b(), limits=None)
    monkeypatch.setattr(O.Context, "gpu", property(lambda self: True))
    monkeypatch.setattr(O, "family_built", lambda family: family == "mxfp4")
    case = O.router_cases(ctx, [1])[0]
    row = O.run_case(case, ctx)
    assert row["status"] == "no-kernel" and "router" in row["reason"]
    assert row["time_us"] is None and row["verify"] is None and row["baselines"] == []


def test_moe_regime_families(monkeypatch):
    from gptoss_kernels.bench import ops as O

    monkeypatch.setattr(O, "family_built", lambda family: True)
    assert O.moe_family(1, 4) == O.moe_family(64, 4) == "moe_decode"
    assert O.moe_family(1024, 4) == O.moe_family(8192, 4) == "moe_prefill"
    # without prefill kernels the op runs the decode kernels at any T
    monkeypatch.setattr(O, "family_built", lambda family: family == "moe_decode")
    assert O.moe_family(8192, 4) == "moe_decode"


# ---------------------------------------------------------------------------------------------
# bytes per token
# ---------------------------------------------------------------------------------------------


def test_bytes_per_token_120b():
    s = ModelShape.gpt_oss_120b()
    step = decode_bytes_per_step(s, 1, 1024)
    assert step["experts"] == pytest.approx(1.906e9, rel=2e-3)             # 36 layers x 4 experts
    assert step["attention_projections"] == pytest.approx(1.912e9, rel=2e-3)
    assert step["unembedding"] == 201088 * 2880 * 2
    assert step["kv_cache"] == (18 * 1024 + 18 * 128) * 2 * 8 * 64 * 2
    total = decode_bytes_per_token(s, 1, 1024)
    assert 4.95e9 < total < 5.15e9                                           # ≈ 5.0 GB
    # bound on a 3.0 TB/s card: ≈ 600 tok/s
    assert 560 < bound_tok_s(s, 1, 1024, 3000.0) < 640
    # per token falls with batch (weights shared), the KV cache grows with context
    assert decode_bytes_per_token(s, 64, 1024) < decode_bytes_per_token(s, 4, 1024) < total
    assert decode_bytes_per_token(s, 1, 32768) > total
    assert expected_distinct_experts(128, 4, 1) == pytest.approx(4)
    assert expected_distinct_experts(128, 4, 10**6) == pytest.approx(128)


def test_model_bytes_match_the_checkpoints():
    # the HF index total_size of both checkpoints (spec §1.1)
    assert ModelShape.gpt_oss_120b().weight_bytes() == 65_248_815_744
    assert ModelShape.gpt_oss_20b().weight_bytes() == 13_761_264_768


def test_bytes_per_token_from_the_real_config():
    from gptoss_kernels import config

    cfg = config.GptOssConfig.gpt_oss_120b()
    assert ModelShape.of(cfg).num_experts == 128 and ModelShape.of(cfg).num_layers == 36
    assert 4.95e9 < decode_bytes_per_token(cfg, 1, 1024) < 5.15e9


def test_model_shape_from_config_objects():
    hf = {"num_hidden_layers": 24, "num_local_experts": 32, "num_experts_per_tok": 4, "hidden_size": 2880}
    assert ModelShape.of(hf) == ModelShape("gpt-oss (24 layers, 32 experts)", num_layers=24, num_experts=32)
    orig = type("C", (), {"num_hidden_layers": 36, "num_experts": 128, "experts_per_token": 4})()
    assert ModelShape.of(orig, "x").num_experts == 128
    with pytest.raises(ValueError, match="num_experts"):
        ModelShape.of({"num_hidden_layers": 2})


# ---------------------------------------------------------------------------------------------
# the device check
# ---------------------------------------------------------------------------------------------


def test_device_scripts_parse():
    for f in ("prepare.sh", "run.sh"):
        r = subprocess.run(["bash", "-n", str(DEVICE_DIR / f)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr


def test_prepare_check_mode():
    """`prepare.sh --check` validates tools and inputs and prints the plan; it must not rot."""
    r = subprocess.run(["bash", str(DEVICE_DIR / "prepare.sh"), "--check"], capture_output=True, text=True,
                       timeout=120, cwd=REPO)
    out = r.stdout + r.stderr
    assert r.returncode in (0, 2), out
    assert "plan: wheel" in out and "bash bench/device/run.sh $OUT" in out and ".device" in out
    assert "wheels80" in out and "GPTOSS_CUDA_ARCHS=80" in out  # the sm_80-only wheel of the sm80 step
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith(("ok:", "missing:"))]
    assert len(lines) >= 8, out
    if r.returncode == 2:
        assert any(ln.startswith("missing:") for ln in lines), out
    else:
        assert "check passed" in out
    assert not (REPO / ".device" / "manifest.json").exists() or True  # --check writes nothing
    r = subprocess.run(["bash", str(DEVICE_DIR / "prepare.sh"), "--bogus"], capture_output=True, text=True)
    assert r.returncode == 64


def test_device_dir_is_ignored():
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    r = subprocess.run(["git", "check-ignore", "-q", ".device/manifest.json"], cwd=REPO)
    assert r.returncode == 0, "add /.device/ to .gitignore"


def test_helpers_source_hash_and_manifest(tmp_path):
    h = _helpers()
    (tmp_path / "csrc").mkdir()
    (tmp_path / "csrc" / "a.cu").write_text("x")
    (tmp_path / "CMakeLists.txt").write_text("y")
    a = h.source_hash(tmp_path)
    assert a == h.source_hash(tmp_path)
    (tmp_path / "csrc" / "a.cu").write_text("z")
    assert h.source_hash(tmp_path) != a
    (tmp_path / "wheels").mkdir()
    (tmp_path / "wheels" / "gptoss_kernels-0.1.0-cp312-cp312-linux_x86_64.whl").write_bytes(b"")
    m = h.write_manifest(tmp_path, tmp_path)
    assert m["package_wheel"].startswith("gptoss_kernels-") and m["source_hash"] == h.source_hash(tmp_path)
    assert json.loads((tmp_path / "manifest.json").read_text())["source_hash"] == m["source_hash"]


def test_helpers_summary_and_save(tmp_path, reference_run):
    h = _helpers()
    _, doc = reference_run
    out = tmp_path / "out"
    out.mkdir()
    (out / "bench.json").write_text(json.dumps(doc))
    (out / "info.json").write_text(json.dumps({"torch": "2.11", "python": "3.12.3", "build": {"kernel_families": ["mxfp4"]},
                                               "cuda_available": True, "devices": [{"name": "NVIDIA H100 80GB HBM3"}]}))
    (out / "pytest.log").write_text("FAILED tests/test_x.py::test_y - AssertionError\n"
                                    "SKIPPED [1] tests/test_z.py:3: no kernel\n"
                                    "1 failed, 12 passed, 3 skipped in 41.20s\n")
    (out / "sanitizer.log").write_text("===== memcheck step: start\n========= ERROR SUMMARY: 0 errors\n"
                                       "===== racecheck step: start\n========= RACECHECK SUMMARY: 0 hazards displayed\n")
    (out / "pytest_sm80.log").write_text(
        "  paths on device cuda:0: sm_80 paths (compute capability 9.0; this build's code for it: sm_80)\n"
        "FAILED tests/test_router.py::test_a - AssertionError\n1 failed, 30 passed, 4 skipped in 90.00s\n")
    steps = tmp_path / "steps.tsv"
    steps.write_text("install\tkernels load\t12\twheel\npytest -m gpu\tfailures (rc 1)\t60\t\n")
    text = h.summary(out, steps)
    assert "## The sm_80 build on this card" in text and "30 passed" in text
    assert "this build's code for it: sm_80" in text and "FAILED tests/test_router.py::test_a" in text
    assert "12 passed" in text and "1 failed" in text and "FAILED tests/test_x.py::test_y" in text
    assert "memcheck: ERROR SUMMARY: 0 errors" in text and "racecheck: RACECHECK SUMMARY" in text
    assert "| install | kernels load | 12 | wheel |" in text
    assert "| op | case |" in text  # the benchmark table, as markdown
    assert h.pytest_counts("3 passed, 1 error in 2.0s") == {"passed": 3, "errors": 1}
    saved = h.save(out, tmp_path)
    assert [p.suffix for p in saved] == [".json"] and saved[0].parent == tmp_path / "bench" / "results"
    assert h.result_name({"env": {"date": "2026-11-27T10:00:00Z", "card": "NVIDIA H100 80GB HBM3",
                                  "git_commit": "abcdef0123456789"}}) == "2026-11-27_H100-80GB-HBM3_abcdef0123"


# ---------------------------------------------------------------------------------------------
# on a GPU
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.cuda_only  # the bench's GPU timing (CUDA graphs / events) and its copy and matmul limits
def test_bench_on_gpu_quick(tmp_path):
    """A short real run: limits measured, rows verified or reported as having no kernel."""
    path = tmp_path / "bench.json"
    rc = main(["bench", "router", "--quick", "--tokens", "64", "--json", str(path)])
    doc = json.loads(path.read_text())
    assert doc["mode"] == "gpu" and doc["env"]["card"] and doc["env"]["driver"]
    assert doc["limits"]["copy_gbps"] > 500 and doc["limits"]["matmul_tflops"] > 50
    (row,) = doc["results"]
    if row["status"] == "ok":
        assert rc == 0 and row["verify"]["passed"] and row["time_us"] > 0
        assert row["timing"]["method"] in ("cuda-graph", "cuda-events")
    else:
        assert row["status"] == "no-kernel"


def test_e2e_measurement_code_with_a_tiny_model_on_cpu():
    """The e2e loop (prompts, stream timing, rows, bounds) against the real model class, tiny."""
    from gptoss_kernels import config
    from gptoss_kernels.bench import e2e, ops as O
    from gptoss_kernels.bench.timing import Limits

    cfg = config.GptOssConfig(num_hidden_layers=2, num_experts=4, experts_per_token=2, vocab_size=96, hidden_size=64,
                              intermediate_size=32, head_dim=16, num_attention_heads=4, num_key_value_heads=2,
                              sliding_window=4)
    limits = Limits(10.0, 1, 0.1, (1, 1, 1), "float32", "cpu")
    ctx = O.Context(device=torch.device("cpu"), shape=ModelShape.of(cfg), limits=limits)
    rows, notes = e2e.run_e2e(ctx, "120b", [1, 2], [12], [8], new_tokens=3, config=cfg)
    assert [r["case"] for r in rows] == ["decode B=1 ctx=12", "prefill T=8", "decode B=2 ctx=12"]
    for r in rows:
        assert r["status"] == "reference", r
        assert r["tok_s"] > 0 and r["ttft_ms"] > 0
    assert rows[0]["ms_per_step"] > 0 and rows[0]["bound_tok_s"] > 0 and rows[0]["pct_of_bound"] > 0
    assert rows[1]["bound_tok_s"] is None
    assert any("bytes per token" in n for n in notes)


def test_cli_profile_flag_prints_the_byte_table():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "gptoss_kernels.cli", "bench", "e2e", "--profile", "--device", "cpu"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "moe_mxfp4" in r.stdout and "bytes per step 5.05" in r.stdout
    r = subprocess.run([sys.executable, "-m", "gptoss_kernels.cli", "bench", "moe", "--profile"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--profile goes with 'e2e'" in r.stderr


def test_run_sh_has_the_time_boxed_sm80_step():
    """The device check's sm80 step: the sm_80-only wheel, GPTOSS_ARCH_OVERRIDE=80, capped so that
    the benchmarks after it keep their share (cap WANTED RESERVE), in the default steps."""
    text = (DEVICE_DIR / "run.sh").read_text()
    assert "pytest,memcheck,racecheck,sm80,bench" in text
    step = text[text.index("# ---- 5. the sm_80 build"):text.index("# ---- 6. benchmarks")]
    assert "c=$(cap 110 120)" in step and "c=$(cap 400 20)" in step and 'timeout "$c"' in step
    assert "GPTOSS_ARCH_OVERRIDE=80" in step and "wheels80" in step and "pytest_sm80.log" in step
