"""`gptoss-kernels info` (and the command's wiring)."""

from __future__ import annotations

import json
import subprocess
import sys

import gptoss_kernels
from gptoss_kernels import cli


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gptoss_kernels.cli", *args], capture_output=True, text=True, timeout=120)


def test_info_text():
    r = run_cli("info")
    assert r.returncode == 0, r.stderr
    assert "build:" in r.stdout and "ops:" in r.stdout and "mxfp4_dequantize" in r.stdout
    if not gptoss_kernels.cuda_available():
        assert "CUDA kernels in use: no:" in r.stdout


def test_info_json():
    r = run_cli("info", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert set(info) >= {"torch", "build", "cuda_available", "devices", "ops"}
    assert info["build"]["kernels_built"] == gptoss_kernels.kernels_built()
    if gptoss_kernels.kernels_built():
        assert "90a" in info["build"]["cuda_archs"] and "mxfp4" in info["build"]["kernel_families"]


def test_no_command_is_an_error():
    r = run_cli()
    assert r.returncode != 0 and "COMMAND" in r.stderr


def test_parser_lists_info():
    assert "info" in cli.build_parser().format_help()
