"""The command line as a new user tries it: out-of-range numbers are argparse's usage error naming
the flag, and a --device this machine cannot run is one line naming the flag and what is
available (exit status 2, no traceback), for generate, chat and bench. In-process (cli.main);
CUDA machines are simulated by patching torch.cuda and the build facts, so these run anywhere."""

from __future__ import annotations

import pytest
import torch

from gptoss_kernels import _lib, cli_args
from gptoss_kernels.cli import build_parser, main


def run_main(argv, capsys):
    """(exit status, stdout, stderr) of `gptoss-kernels argv`, run in-process."""
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def assert_one_line(err: str, *needles: str) -> None:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]


# ---------------------------------------------------------------------------------------------
# numbers: argparse's usage error (exit 2) naming the flag
# ---------------------------------------------------------------------------------------------

GEN = ["generate", "--checkpoint", "ckpt", "--prompt", "hi"]
CHAT = ["chat", "--checkpoint", "ckpt"]
BENCH = ["bench", "moe"]

_BAD_NUMBERS = [
    ("--max-new-tokens", "-5", "must be a positive integer"),
    ("--max-new-tokens", "0", "must be a positive integer"),
    ("--max-new-tokens", "2.5", "must be a positive integer"),
    ("--max-new-tokens", "many", "must be a positive integer"),
    ("--temperature", "-0.1", "must be a number >= 0"),
    ("--temperature", "nan", "must be a number >= 0"),
    ("--temperature", "inf", "must be a number >= 0"),
    ("--temperature", "hot", "must be a number >= 0"),
    ("--top-p", "0", "must be a number in (0, 1]"),
    ("--top-p", "-0.5", "must be a number in (0, 1]"),
    ("--top-p", "1.01", "must be a number in (0, 1]"),
    ("--top-p", "nan", "must be a number in (0, 1]"),
]


@pytest.mark.parametrize("base", [GEN, CHAT], ids=["generate", "chat"])
@pytest.mark.parametrize("flag,value,msg", _BAD_NUMBERS)
def test_generate_and_chat_reject_out_of_range_numbers(base, flag, value, msg, capsys):
    rc, out, err = run_main(base + [flag, value], capsys)
    assert rc == 2 and out == ""
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (f"gptoss-kernels {base[0]}: error: argument {flag}: "
                                            f"{msg}, got {value!r}")


@pytest.mark.parametrize("flag,value,msg", [
    ("--max-seconds", "-1", "must be a number >= 0"),
    ("--max-seconds", "nan", "must be a number >= 0"),
    ("--max-seconds", "soon", "must be a number >= 0"),
    ("--batch", "0", "expected positive integers"),
    ("--context", "-64", "expected positive integers"),
    ("--tokens", "1,-4", "expected positive integers"),
])
def test_bench_rejects_out_of_range_numbers(flag, value, msg, capsys):
    rc, out, err = run_main(BENCH + [flag, value], capsys)
    assert rc == 2 and out == ""
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"gptoss-kernels bench: error: argument {flag}: {msg}"), last


def test_valid_numbers_and_defaults_unchanged():
    p = build_parser()
    a = p.parse_args(GEN)
    assert (a.max_new_tokens, a.temperature, a.top_p, a.seed, a.device) == (256, 1.0, 1.0, None, None)
    a = p.parse_args(CHAT)
    assert (a.max_new_tokens, a.temperature, a.top_p) == (4096, 1.0, 1.0)
    a = p.parse_args(GEN + ["--max-new-tokens", "1", "--temperature", "0", "--top-p", "1", "--seed", "-3"])
    assert (a.max_new_tokens, a.temperature, a.top_p, a.seed) == (1, 0.0, 1.0, -3)
    a = p.parse_args(CHAT + ["--temperature", "0.7", "--top-p", "0.01"])
    assert (a.temperature, a.top_p) == (0.7, 0.01)
    assert p.parse_args(BENCH).max_seconds is None
    assert p.parse_args(BENCH + ["--max-seconds", "0"]).max_seconds == 0.0   # bench/device/run.sh's floor
    assert p.parse_args(BENCH + ["--max-seconds", "2.5"]).max_seconds == 2.5


def test_empty_prompt_is_one_line(capsys):
    rc, out, err = run_main(["generate", "--checkpoint", "ckpt", "--prompt", "", "--device", "cpu"], capsys)
    assert rc == 2
    assert_one_line(err, "gptoss-kernels generate:", "--prompt is empty")


# ---------------------------------------------------------------------------------------------
# --device: one line naming the flag and what this machine has (exit 2)
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def no_cuda_torch(monkeypatch):
    """A torch built without CUDA (as on this CPU runner)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None)


@pytest.fixture
def fake_gpus(monkeypatch):
    """fake_gpus(capabilities, built=True, archs=("90a",)): torch sees these CUDA devices and
    the build has (or has not) kernels for `archs`."""
    def install(capabilities, built=True, archs=("90a",)):
        monkeypatch.setattr(torch.version, "cuda", "12.8")
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: len(capabilities))
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: capabilities[i or 0])
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: f"Fake GPU {i or 0}")
        monkeypatch.setattr(_lib, "kernels_built", lambda: built)
        monkeypatch.setattr(_lib, "build_archs", lambda: list(archs) if built else [])
        monkeypatch.setattr(_lib, "kernels_error", lambda dev=None: None if built else
                            "this is a reference-only build (GPTOSS_REFERENCE_ONLY=1): no CUDA kernels were compiled")
    return install


@pytest.mark.parametrize("base", [GEN, CHAT], ids=["generate", "chat"])
@pytest.mark.parametrize("device", ["cuda", "cuda:3"])
def test_cuda_device_without_cuda_torch(base, device, no_cuda_torch, capsys):
    rc, out, err = run_main(base + ["--device", device], capsys)
    assert rc == 2 and out == ""
    assert_one_line(err, f"gptoss-kernels {base[0]}: --device '{device}':", "has no CUDA support",
                    "available on this machine: cpu")


@pytest.mark.parametrize("base", [GEN, CHAT], ids=["generate", "chat"])
@pytest.mark.parametrize("device", ["gpu", "tpu", "cuda:x", "cuda:-1", "CUDA", "", "cuda:0:1"])
def test_malformed_device(base, device, no_cuda_torch, capsys):
    rc, out, err = run_main(base + ["--device", device], capsys)
    assert rc == 2 and out == ""
    assert_one_line(err, f"--device {device!r}: not a device name (use cpu, cuda or cuda:N)",
                    "available on this machine: cpu")


@pytest.mark.parametrize("device,reason", [("mps", "mps devices are not supported"),
                                           ("meta", "meta devices are not supported"),
                                           ("cpu:1", "there is one CPU device")])
def test_devices_this_package_does_not_run(device, reason, no_cuda_torch, capsys):
    rc, out, err = run_main(GEN + ["--device", device], capsys)
    assert rc == 2
    assert_one_line(err, f"--device {device!r}: {reason}", "available on this machine: cpu")


def test_cuda_device_that_does_not_exist(fake_gpus, capsys):
    fake_gpus([(9, 0), (9, 0)])
    rc, out, err = run_main(GEN + ["--device", "cuda:3"], capsys)
    assert rc == 2
    assert_one_line(err, "--device 'cuda:3': no such device (torch sees 2 CUDA devices: cuda:0, cuda:1)",
                    "available on this machine: cpu, cuda:0, cuda:1")


def test_torch_with_cuda_but_no_gpu(monkeypatch, capsys):
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc, out, err = run_main(CHAT + ["--device", "cuda:0"], capsys)
    assert rc == 2
    assert_one_line(err, "--device 'cuda:0': torch sees no CUDA device", "available on this machine: cpu")


def test_cuda_device_of_an_architecture_the_kernels_were_not_built_for(fake_gpus, capsys):
    fake_gpus([(9, 0), (8, 0)])
    rc, out, err = run_main(GEN + ["--device", "cuda:1"], capsys)
    assert rc == 2
    assert_one_line(err, "--device 'cuda:1': this package's kernels do not run on cuda:1 (Fake GPU 1): "
                         "compute capability 8.0, and the kernels were built for 90a",
                    "available on this machine: cpu, cuda:0 (cuda:1 is there, but without this package's kernels)")


@pytest.mark.parametrize("base", [GEN, CHAT], ids=["generate", "chat"])
def test_cuda_device_of_a_reference_only_build(base, fake_gpus, capsys):
    fake_gpus([(9, 0)], built=False)
    rc, out, err = run_main(base + ["--device", "cuda"], capsys)
    assert rc == 2
    assert_one_line(err, "--device 'cuda': this package's kernels do not run on cuda:0 (Fake GPU 0): "
                         "this is a reference-only build",
                    "available on this machine: cpu (cuda:0 is there, but without this package's kernels)")


def test_an_sm80_build_runs_on_every_8x_card_and_on_hopper_through_ptx(fake_gpus, capsys):
    fake_gpus([(8, 6), (8, 9), (9, 0), (7, 5)], archs=("80",))
    for dev in ("cuda:0", "cuda:1", "cuda:2"):
        cli_args.check_device(dev)
    with pytest.raises(cli_args.DeviceError, match="compute capability 7.5"):
        cli_args.check_device("cuda:3")


def test_code_for_follows_the_drivers_rule():
    from gptoss_kernels._lib import code_for
    assert code_for(86, ["80", "90a"]) == 80 and code_for(89, ["80", "89", "90a"]) == 89
    assert code_for(86, ["89", "90a"]) == 0            # sm_89 code does not run on 8.6, nor compute_89 PTX
    assert code_for(90, ["80", "90a"]) == 90 and code_for(90, ["80"]) == 80  # PTX compiled by the driver
    assert code_for(90, ["80-real"]) == 0 and code_for(90, ["80-virtual"]) == 80
    assert code_for(100, ["90a"]) == 0 and code_for(100, ["89", "90a"]) == 89
    assert code_for(87, ["86-real"]) == 86


def test_usable_devices_are_accepted(fake_gpus, capsys):
    fake_gpus([(9, 0), (8, 0)])
    for dev in ("cpu", "cpu:0", "cuda", "cuda:0"):
        cli_args.check_device(dev)
    with pytest.raises(cli_args.DeviceError):
        cli_args.check_device("cuda:1")
    cli_args.check_device("cuda:1", need_kernels=False)   # bench: a GPU without kernels still times baselines
    assert cli_args.available_devices() == (["cpu", "cuda:0"], ["cuda:1"])
    assert cli_args.available_devices(need_kernels=False) == (["cpu", "cuda:0", "cuda:1"], [])
    # an accepted --device reaches the command (here: its empty-prompt check)
    rc, out, err = run_main(["generate", "--checkpoint", "ckpt", "--prompt", "", "--device", "cuda:0"], capsys)
    assert rc == 2
    assert_one_line(err, "--prompt is empty")


@pytest.mark.parametrize("extra", [[], ["--profile"]], ids=["run", "profile"])
def test_bench_cuda_without_cuda_torch(extra, no_cuda_torch, capsys):
    op = "e2e" if extra else "moe"
    rc, out, err = run_main(["bench", op, "--device", "cuda"] + extra, capsys)
    assert rc == 2 and out == ""
    assert_one_line(err, "gptoss-kernels bench: --device 'cuda': this torch build", "has no CUDA support",
                    "available on this machine: cpu")


@pytest.mark.parametrize("device", ["gpu", "cuda:0"])
def test_bench_device_outside_its_choices(device, capsys):
    rc, out, err = run_main(["bench", "moe", "--device", device], capsys)
    assert rc == 2
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"gptoss-kernels bench: error: argument --device: "
                                                   f"invalid choice: '{device}'")
