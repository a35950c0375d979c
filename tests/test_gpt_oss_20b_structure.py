"""gpt-oss-20b's structure on a tiny model: 24 layers alternating sliding / full attention, 32
experts with top-4 routing (120b: 36 layers, 128 experts). Made with transformers'
GptOssForCausalLM (tests/checkpoints.py), saved in both checkpoint layouts, loaded by
GptOss.from_pretrained, compared with transformers, generated from, and run through the CLI.

Tiny widths (hidden 64, 4 heads / 2 KV heads of 16 dims, window 4) keep it fast on the CPU; what
is 20b's here is everything the loader and the layer loop depend on: the layer count and its
sliding/full alternation, the expert count and k.
"""

from __future__ import annotations

import io

import pytest
import torch

from gptoss_kernels import GptOss, GptOssConfig

from . import checkpoints as ck

transformers = pytest.importorskip("transformers")

REAL_20B = GptOssConfig.gpt_oss_20b()
STRUCTURE_20B = dict(num_hidden_layers=REAL_20B.num_hidden_layers, num_local_experts=REAL_20B.num_experts,
                     num_experts_per_tok=REAL_20B.experts_per_token,
                     layer_types=list(REAL_20B.layer_types))


@pytest.fixture(scope="module")
def hf20():
    return ck.make_hf_model(seed=20, **STRUCTURE_20B)


@pytest.fixture(scope="module")
def dirs20(hf20, tmp_path_factory):
    model, mx = hf20
    root = tmp_path_factory.mktemp("ckpt20b")
    return {"hf-mxfp4": ck.save_hf_mxfp4(model, mx, root / "hf", shards=3),
            "original": ck.save_original(model, mx, root / "original")}


@pytest.fixture(scope="module")
def ids20():
    return torch.randint(0, ck.TINY["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(20))


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("layout", ["hf-mxfp4", "original"])
def test_20b_structure_loads_and_matches_transformers(dirs20, hf20, ids20, layout):
    m = GptOss.from_pretrained(dirs20[layout], dtype=torch.float32, progress=False)
    c = m.config
    assert (c.num_hidden_layers, c.num_experts, c.experts_per_token) == (24, 32, 4)
    assert c.layer_types == REAL_20B.layer_types          # sliding on even layers, as in 20b
    assert [c.window(i) for i in range(4)] == [4, None, 4, None]
    assert m.layers[23]["w1_blocks"].shape[0] == 32
    with torch.no_grad():
        want = hf20[0](ids20).logits.float()
    got = m(ids20)
    # fp32 on both sides from identical weights, 24 layers deep: summation order only
    err = _rel(got, want)
    print(f"20b structure ({layout}) vs transformers fp32: rel err {err:.2e}")
    assert err < 1e-4


def test_20b_structure_layouts_identical_and_generate(dirs20):
    a = GptOss.from_pretrained(dirs20["hf-mxfp4"], dtype=torch.bfloat16, progress=False)
    b = GptOss.from_pretrained(dirs20["original"], dtype=torch.bfloat16, progress=False)
    ids = torch.randint(0, ck.TINY["vocab_size"], (1, 9), generator=torch.Generator().manual_seed(21))
    assert torch.equal(a(ids), b(ids))
    # generation with the cache (chunked prefill, rings wrapping in 12 sliding layers) equals
    # recomputing the whole sequence each step (fp32: argmax ties cannot flip)
    m = GptOss.from_pretrained(dirs20["original"], dtype=torch.float32, progress=False)
    prompt = ids[0].tolist()
    m.prefill_chunk = 4
    got = m.generate(prompt, 6)
    seq, want = list(prompt), []
    for _ in range(6):
        nxt = int(m(torch.tensor([seq]))[0, -1].argmax())
        want.append(nxt)
        seq.append(nxt)
    assert got == want


@pytest.fixture(scope="module")
def cli_ckpt20(tmp_path_factory):
    """20b's structure with the real vocabulary size (so any token id the tokenizer makes is valid)."""
    cfg = GptOssConfig(num_hidden_layers=24, num_experts=32, experts_per_token=4, vocab_size=REAL_20B.vocab_size,
                       hidden_size=32, intermediate_size=32, head_dim=16, num_attention_heads=2,
                       num_key_value_heads=1, sliding_window=4)
    m = GptOss.from_config(cfg, seed=2)
    return ck.save_model_hf_mxfp4(m, tmp_path_factory.mktemp("cli20") / "ckpt"), m


def _vocab_available() -> bool:
    from .test_chat import _vocab_available as available

    return available()


def test_cli_generate_and_chat_run_20b_structure(cli_ckpt20, capsys, monkeypatch):
    if not _vocab_available():
        pytest.skip("the tokenizer's vocabulary file is not available here")
    from gptoss_kernels import tokenizer
    from gptoss_kernels.cli import main

    d, m = cli_ckpt20
    rc = main(["generate", "--checkpoint", str(d), "--prompt", "The capital of France is", "--max-new-tokens", "4",
               "--temperature", "0", "--device", "cpu", "--no-progress"])
    assert rc == 0
    want = m.generate(tokenizer.encode("The capital of France is"), 4, stop_token_ids=[tokenizer.ENDOFTEXT])
    if want and want[-1] == tokenizer.ENDOFTEXT:
        want = want[:-1]
    assert capsys.readouterr().out == tokenizer.decode(want) + "\n"
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n/exit\n"))
    rc = main(["chat", "--checkpoint", str(d), "--max-new-tokens", "3", "--temperature", "0", "--device", "cpu",
               "--no-progress"])
    assert rc == 0   # a random model's reply is not valid harmony: reported, not a crash
