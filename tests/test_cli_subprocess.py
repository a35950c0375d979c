"""The generate and chat commands as a new user runs them: `python -m gptoss_kernels.cli` in a
subprocess on a tiny checkpoint (CPU), checking the exit status, that a mistake is one line on
stderr and that no traceback appears. The mistakes run as one batch (tests/cli_batch.py: one
process per case, forked after a single start-up); Ctrl-C in chat is a real SIGINT to a real
`python -m gptoss_kernels.cli chat`.

The tiny model always emits <|message|> (id 200008): its final norm keeps one residual dimension
that no layer writes, and only that token's unembedding row reads it. So a reply streams visibly
and never stops, whatever the sampling."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from gptoss_kernels import GptOss, GptOssConfig, tokenizer

from . import checkpoints as ck

MESSAGE = 200008   # <|message|>


def _vocab_available() -> bool:
    return tokenizer.vocab_source() is not None and os.path.exists(tokenizer.vocab_source())


pytestmark = pytest.mark.skipif(not _vocab_available(),
                                reason="o200k_base.tiktoken not available (set TIKTOKEN_ENCODINGS_BASE)")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """(the tiny checkpoint, the same weights with a context of 2^45 positions)."""
    cfg = GptOssConfig(num_hidden_layers=2, num_experts=4, experts_per_token=2, vocab_size=201088, hidden_size=32,
                       intermediate_size=32, head_dim=16, num_attention_heads=2, num_key_value_heads=1,
                       sliding_window=4)
    m = GptOss.from_config(cfg, seed=0)
    w = m.weights
    with torch.no_grad():
        w["embedding"][:, 0] = 10.0            # residual dim 0: 10 for every token ...
        for L in m.layers:                      # ... and no layer writes it
            L["out_w"][0].zero_()
            L["out_b"][0] = 0
            L["w2_blocks"][:, 0].zero_()
            L["w2_bias"][:, 0] = 0
        w["norm"].zero_()
        w["norm"][0] = 1.0
        w["unembedding"].zero_()
        w["unembedding"][MESSAGE, 0] = 1000.0   # logit ~ 5000 for <|message|>, 0 for every other token
    root = tmp_path_factory.mktemp("cli_sub")
    small = ck.save_model_original(m, root / "ckpt")
    big = root / "ckpt_long_context"
    big.mkdir()
    os.symlink(os.path.join(small, "model.safetensors"), big / "model.safetensors")
    d = m.config.to_original_dict()
    d["initial_context_length"] = 2 ** 40      # max positions = 2^40 * rope_scaling_factor 32
    (big / "config.json").write_text(json.dumps(d))
    return str(small), str(big)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "gptoss_kernels.cli", *args]


def _one_line(err: str) -> str:
    assert "Traceback" not in err and "Warning" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_mistakes_are_one_line(ckpts, tmp_path):
    """Each case is its own process (tests/cli_batch.py forks one per case after a single start-up)."""
    small, big = ckpts
    no_vocab = {"TIKTOKEN_ENCODINGS_BASE": None, "GPTOSS_ALLOW_DOWNLOAD": None,
                "TIKTOKEN_RS_CACHE_DIR": str(tmp_path)}      # an empty cache: nothing downloaded before
    gen = ["generate", "--no-progress", "--device", "cpu"]
    cases = {  # name -> (argv, env, expected exit status, pattern of the one stderr line)
        "empty prompt": (gen + ["--checkpoint", small, "--prompt", ""], None, 2,
                         r"^gptoss-kernels generate: --prompt is empty"),
        "file as checkpoint": (gen + ["--checkpoint", os.path.join(small, "config.json"), "--prompt", "hi"], None, 2,
                               r"^gptoss-kernels generate: --checkpoint '.*config\.json' is a file, not a folder: "
                               r"give the checkpoint folder.*" + re.escape(repr(small))),
        "missing checkpoint": (gen + ["--checkpoint", os.path.join(small, "nope"), "--prompt", "hi"], None, 2,
                               r"--checkpoint '.*nope': no such folder$"),
        "device name": (["generate", "--checkpoint", small, "--prompt", "hi", "--device", "gpu"], None, 2,
                        r"^gptoss-kernels generate: --device 'gpu': not a device name .*available on this machine: cpu"),
        "device absent": (["chat", "--checkpoint", small, "--device", "cuda:99"], None, 2,
                          r"^gptoss-kernels chat: --device 'cuda:99': .*available on this machine: cpu"),
        "past the context": (gen + ["--checkpoint", small, "--prompt", "hi", "--max-new-tokens", "10000000"], None, 2,
                             r"^gptoss-kernels generate: --max-new-tokens 10000000: the prompt \(1 token\) plus "
                             r"10000000 new tokens exceed the model's context of 131072 positions; "
                             r"at most 131071 new tokens fit$"),
        "chat past the context": (["chat", "--checkpoint", small, "--max-new-tokens", "200000"], None, 2,
                                  r"^gptoss-kernels chat: --max-new-tokens 200000: the system prompt \(\d+ tokens\) "
                                  r"plus 200000 new tokens exceed the model's context of 131072 positions; "
                                  r"at most \d+ new tokens fit$"),
        "beyond memory": (gen + ["--checkpoint", big, "--prompt", "hi", "--max-new-tokens", str(10 ** 12)], None, 2,
                          r"^gptoss-kernels generate: --max-new-tokens 1000000000000: the KV cache of 1000000000001 "
                          r"positions \([\d.]+ GiB\) does not fit in the [\d.]+ GiB of memory available on cpu "
                          r"\(the weights take [\d.]+ GiB of it\); at most (\d+) new tokens fit$"),
        "no vocabulary": (gen + ["--checkpoint", small, "--prompt", "hi"], no_vocab, 2,
                          r"^gptoss-kernels generate: the gpt-oss vocabulary \(o200k_base\.tiktoken\) is not available "
                          r"offline: set TIKTOKEN_ENCODINGS_BASE .* or set GPTOSS_ALLOW_DOWNLOAD=1"),
        "figures": (gen + ["--checkpoint", small, "--prompt", "hi", "--max-new-tokens", "3", "--temperature", "0"],
                    None, 0, r"^gptoss-kernels generate: 1 prompt token, 3 new tokens, time to first token [\d.]+ s, "
                             r"decode [\d.]+ tok/s$"),
    }
    names = list(cases)
    spec = tmp_path / "cases.json"
    spec.write_text(json.dumps([{"argv": cases[n][0], "env": cases[n][1]} for n in names]))
    r = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "cli_batch.py"), str(spec),
                        str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    statuses = json.loads(r.stdout.strip().splitlines()[-1])
    for i, name in enumerate(names):
        rc, out, err = statuses[i], (tmp_path / f"{i}.out").read_text(), (tmp_path / f"{i}.err").read_text()
        _, _, want_rc, pattern = cases[name]
        assert rc == want_rc, (name, rc, err)
        line = _one_line(err)
        assert re.search(pattern, line), (name, line)
        if name == "figures":
            assert out == "<|message|>" * 3 + "\n"
        else:
            assert out == "", (name, out)
        if name == "beyond memory":   # the largest value that fits; the refused request allocated nothing
            assert 1 <= int(re.search(pattern, line).group(1)) < 10 ** 12


def test_chat_ctrl_c_stops_the_reply_not_the_chat(ckpts):
    small, _ = ckpts
    p = subprocess.Popen(_cli("chat", "--checkpoint", small, "--max-new-tokens", "100000", "--device", "cpu",
                              "--no-progress"),
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
                         # a test run started in the background (`cmd &`) ignores SIGINT, and a child keeps an
                         # ignored SIGINT (Python then installs no KeyboardInterrupt): give it the default back,
                         # as a terminal's foreground process has
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen: list[str] = []
    threading.Thread(target=lambda: seen.extend(iter(lambda: p.stdout.read(1), "")), daemon=True).start()

    def wait_for(text: str, start: int) -> int:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            i = "".join(seen).find(text, start)
            if i >= 0:
                return i + len(text)
            if p.poll() is not None:
                break
            time.sleep(0.05)
        p.kill()
        raise AssertionError(f"{text!r} not seen; stdout ends {''.join(seen)[-300:]!r}; stderr {p.stderr.read()!r}")

    try:
        pos = 0
        for message in ("Hello", "Again"):
            p.stdin.write(message + "\n")
            p.stdin.flush()
            pos = wait_for("<|message|>" * 3, pos)         # the reply streams (and would for 100000 tokens)
            p.send_signal(signal.SIGINT)
            pos = wait_for("[interrupted; your message is withdrawn]\n", pos)
        time.sleep(0.5)
        p.send_signal(signal.SIGINT)                       # Ctrl-C at the prompt quits
        rc = p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    err = p.stderr.read()
    assert rc == 0, err
    assert "Traceback" not in err and err.strip() == "", err
