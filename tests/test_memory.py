"""The memory plan (gptoss_kernels.memory): the 120b / 20b arithmetic on an 80 GB card, the
workspaces, a request's check (MemoryPlanError with the largest context that fits), the CLI's
one-line refusal; and the model's thin methods over it."""

from __future__ import annotations

import pytest
import torch

from gptoss_kernels import GptOss, GptOssConfig, memory
from gptoss_kernels.memory import MemoryPlanError


def tiny(**kw) -> GptOssConfig:
    base = dict(num_hidden_layers=2, num_experts=4, experts_per_token=2, vocab_size=96, hidden_size=64,
                intermediate_size=32, head_dim=16, num_attention_heads=4, num_key_value_heads=2, sliding_window=4)
    base.update(kw)
    return GptOssConfig(**base)


@pytest.fixture(scope="module")
def m32():
    return GptOss.from_config(tiny(), device="cpu", seed=1, dtype=torch.float32)


def test_the_model_keeps_the_plan():
    """GptOss.memory_plan & co. are the memory module's functions; MemoryPlanError is importable
    from the model as before."""
    from gptoss_kernels import model

    assert GptOss.memory_plan is memory.memory_plan and GptOss.format_memory_plan is memory.format_memory_plan
    assert GptOss.workspace_bytes is memory.workspace_bytes and GptOss.kv_cache_bytes is memory.kv_cache_bytes
    assert model.MemoryPlanError is MemoryPlanError and issubclass(MemoryPlanError, RuntimeError)
    assert GptOss.prefill_chunk == memory.PREFILL_CHUNK
    assert memory.workspace_bytes(GptOssConfig.gpt_oss_120b()) == memory.workspace_bytes(
        GptOssConfig.gpt_oss_120b(), prefill_chunk=memory.PREFILL_CHUNK)


def test_memory_plan_120b_on_80gb():
    cfg = GptOssConfig.gpt_oss_120b()
    plan = memory.memory_plan(cfg, gpu_bytes=80e9, batch=1)
    assert plan["weights_bytes"] == 65_248_815_744          # = the HF index total_size (spec §1.1)
    assert plan["kv_bytes_per_token"] == 18 * 2 * 8 * 64 * 2  # 18 full layers, K+V, 8 heads x 64, bf16
    assert plan["sliding_kv_bytes"] == 18 * 128 * 2 * 8 * 64 * 2
    free = 80e9 - 65_248_815_744 - plan["workspace_bytes"] - plan["reserve_bytes"] - plan["sliding_kv_bytes"]
    assert plan["tokens_fit"] == int(free // plan["kv_bytes_per_token"])
    assert 300_000 < plan["tokens_fit"] < 350_000            # ~342k positions: a full 131072 context fits
    assert plan["context_per_sequence"] == 131072 and plan["fits"]
    four = memory.memory_plan(cfg, gpu_bytes=80e9, batch=4)
    assert four["tokens_per_sequence"] == four["tokens_fit"] // 4
    assert memory.memory_plan(GptOssConfig.gpt_oss_20b())["weights_bytes"] == 13_761_264_768
    assert not memory.memory_plan(cfg, gpu_bytes=40e9)["fits"]
    assert memory.memory_plan(cfg, gpu_bytes=40e9)["tokens_fit"] == 0


def test_memory_plan_requests_120b_on_80gb():
    cfg = GptOssConfig.gpt_oss_120b()
    G = 80e9
    one = memory.memory_plan(cfg, G, batch=1, context=131072)
    kv = (18 * 131072 + 18 * 128) * 2 * 8 * 64 * 2        # full layers the context, sliding the ring
    assert one["kv_cache_bytes"] == kv == memory.kv_cache_bytes(cfg, 1, 131072)
    assert one["need_bytes"] == 65_248_815_744 + one["workspace_bytes"] + one["reserve_bytes"] + kv
    assert one["fits"]                                      # ≈ 72 GB: the longest context fits at batch 1
    assert not memory.memory_plan(cfg, G, batch=4, context=131072)["fits"]    # 4 x 4.8 GB of KV: no
    assert memory.memory_plan(cfg, G, batch=4, context=32768)["fits"]
    assert memory.memory_plan(cfg, G, batch=64, context=4096)["fits"]         # ≈ 10 GB of KV
    assert not memory.memory_plan(cfg, G, batch=64, context=8192)["fits"]     # ≈ 19.6 GB of KV
    assert not memory.memory_plan(cfg, G, batch=1, context=131073)["fits"]    # past max_position_embeddings
    # the workspaces: one 2048-token prefill chunk dominates (~0.63 GB); the decode step ~18 MB at batch 1
    ws = memory.workspace_bytes(cfg, 1)
    assert 0.5e9 < ws["prefill"] < 0.8e9 and ws["decode"] < 20e6
    assert memory.workspace_bytes(cfg, 64)["decode"] < 1.2e9
    # a plan's tokens_fit agrees with the request check at the boundary
    p = memory.memory_plan(cfg, G, batch=2)
    ctx = p["tokens_per_sequence"]
    assert memory.memory_plan(cfg, G, batch=2, context=min(ctx, 131072))["fits"]
    assert not memory.memory_plan(cfg, G, batch=2, context=ctx + 16)["fits"]
    assert "positions per sequence" in memory.format_memory_plan(one)
    # 20b: 12 full layers, 24 KiB of KV per position: 16 x 131072 positions (51.5 GB) fit, 32 do not
    twenty = memory.memory_plan(GptOssConfig.gpt_oss_20b(), G, batch=32, context=131072)
    assert twenty["weights_bytes"] == 13_761_264_768 and twenty["fits"] is False
    assert memory.memory_plan(GptOssConfig.gpt_oss_20b(), G, batch=16, context=131072)["fits"]


def test_kv_cache_bytes_is_what_new_cache_allocates(m32):
    for batch, S in ((1, 16), (3, 40)):
        caches = m32.new_cache(batch, S)
        got = sum(t.numel() * t.element_size() for kv in caches for t in kv)
        assert got == memory.kv_cache_bytes(m32.config, batch, S, kv_dtype_bytes=4)


def test_plan_request_and_check_request():
    cfg = tiny()
    plan = memory.plan_request(cfg, 2, 512, 1e6, weights_bytes=1000, weight_dtype_bytes=4)
    assert plan["gpu_bytes"] == 1e6 + 1000 and plan["context"] == 512 and plan["batch"] == 2
    assert plan["reserve_bytes"] == int(0.5e9) and not plan["fits"]   # the reserve alone exceeds 1 MB
    with pytest.raises(MemoryPlanError, match="do not fit on cpu.*at most 0 positions"):
        memory.check_request(plan, 2, 500, torch.device("cpu"))
    big = memory.plan_request(cfg, 2, 512, 1e10, weights_bytes=1000)
    assert big["fits"] and memory.check_request(big, 2, 500, "cpu") is big
    assert memory.free_bytes(torch.device("cpu")) >= 1 << 62


def test_check_memory_refuses_cleanly(m32):
    # the tiny fp32 model: KV per position 1 full layer x 2 x 2 x 16 x 4 B = 256 B
    plan = m32.plan_request(1, 300)
    assert plan["fits"] and plan["context"] == 512          # the cache is rounded to 256 positions
    need_beside_weights = plan["need_bytes"] - plan["weights_bytes"]
    m32.check_memory(1, 300, available_bytes=need_beside_weights)
    with pytest.raises(MemoryPlanError, match="do not fit"):
        m32.check_memory(1, 300, available_bytes=need_beside_weights - 1)
    with pytest.raises(MemoryPlanError, match="at most"):
        m32.check_memory(8, 100_000, available_bytes=need_beside_weights)


def test_cli_refuses_a_request_that_does_not_fit(capsys):
    import argparse

    from gptoss_kernels.cli_generate import _friendly

    def cmd(args):
        raise MemoryPlanError("1 sequence(s) x 999999 positions do not fit")

    assert _friendly(cmd)(argparse.Namespace(command="generate")) == 2
    assert "do not fit" in capsys.readouterr().err


# ---- which card: the plan table, the README's copy of it, the refusal before loading ----

def test_plan_table_20b_on_16_and_24_gb():
    rows = {(p["gpu_bytes"] // 2**30, p["batch"]): p for p in memory.plan_table(GptOssConfig.gpt_oss_20b(),
                                                                                  (16, 24), (1, 4))}
    assert all(p["weights_bytes"] == 13_761_264_768 and p["kv_bytes_per_token"] == 12 * 2 * 8 * 64 * 2
               for p in rows.values())
    # 16 GiB: ~50k positions for one sequence, ~12k each for four; 24 GiB: the whole context for one
    assert 40_000 < rows[16, 1]["context_per_sequence"] < 60_000
    assert 10_000 < rows[16, 4]["context_per_sequence"] < 15_000
    assert rows[24, 1]["context_per_sequence"] == 131072
    p = rows[16, 1]
    assert memory.memory_plan(GptOssConfig.gpt_oss_20b(), 16 * 2**30, 1, context=p["tokens_per_sequence"])["fits"]
    assert not memory.memory_plan(GptOssConfig.gpt_oss_20b(), 16 * 2**30, 1,
                                  context=p["tokens_per_sequence"] + 256)["fits"]
    # 120b does not fit these cards at all
    assert not any(p["fits"] for p in memory.plan_table(GptOssConfig.gpt_oss_120b(), (16, 24, 48), (1,)))
    assert "does not fit" in memory.format_plan_table("120b", memory.plan_table(GptOssConfig.gpt_oss_120b(), (24,)))


def test_readme_tables_are_the_plan():
    """The README's memory tables are what the plan computes today (regenerate them with
    `gptoss-kernels plan` when the plan changes)."""
    import pathlib

    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    for name, cfg, cards in (("gpt-oss-20b", GptOssConfig.gpt_oss_20b(), (16, 24)),
                             ("gpt-oss-120b", GptOssConfig.gpt_oss_120b(), (80,))):
        table = memory.format_plan_table(name, memory.plan_table(cfg, cards, (1, 4)))
        assert table in readme, f"README's {name} table differs from the plan:\n{table}"


def test_cli_plan(capsys):
    from gptoss_kernels.cli import main

    assert main(["plan", "--config", "20b", "--gpu-gib", "16", "--batch", "1"]) == 0
    out = capsys.readouterr().out
    assert memory.format_plan_table("gpt-oss-20b", memory.plan_table(GptOssConfig.gpt_oss_20b(), (16,), (1,))) in out
    with pytest.raises(SystemExit) as e:
        main(["plan", "--gpu-gib", "0"])
    assert e.value.code == 2 and "positive" in capsys.readouterr().err


def test_loader_refuses_weights_that_do_not_fit_before_loading(m32, tmp_path, monkeypatch):
    """On a CUDA device with too little free memory the loader raises MemoryPlanError after
    reading the headers and before moving any tensor (here torch may have no CUDA at all: any
    attempt to allocate on it would raise something else)."""
    from . import checkpoints as ck

    d = ck.save_model_original(m32, tmp_path / "ckpt")
    need = memory.weights_bytes(m32.config, 2)
    free = {"bytes": need}   # the weights alone, without the headroom to run: refused
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], 16 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    moved = []
    real_to = torch.Tensor.to

    def spy_to(self, *a, **kw):
        moved.append((a, kw))
        return real_to(self, *a, **kw)

    monkeypatch.setattr(torch.Tensor, "to", spy_to)
    with pytest.raises(MemoryPlanError, match=r"weights need .* GiB .* free of 16.0 GiB: nothing was loaded"):
        GptOss.from_pretrained(d, device="cuda:0", progress=False)
    assert moved == []
    # with the headroom free, the check passes (and returns the weights' bytes)
    free["bytes"] = need + memory.LOAD_HEADROOM_BYTES
    assert memory.check_weights_fit(m32.config, torch.device("cuda:0"), 2) == need


@pytest.mark.gpu
@pytest.mark.cuda_only  # the CUDA allocator's peak
def test_peak_memory_is_the_plan():
    """gpt-oss-20b's real shapes (random weights) generating at batch 1: the peak memory the
    allocator saw is the plan's weights + KV cache + workspaces within 5%."""
    dev = torch.device("cuda")
    free, total = torch.cuda.mem_get_info(dev)
    cfg = GptOssConfig.gpt_oss_20b()
    if free < 20 * 2**30:
        pytest.skip(f"needs ~20 GiB free, {free / 2**30:.1f} GiB here")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev)
    m = GptOss.from_config(cfg, device=dev, seed=0)
    prompt = torch.randint(0, 199998, (3000,), generator=torch.Generator().manual_seed(0)).tolist()
    m.generate(prompt, 16)
    peak = torch.cuda.max_memory_allocated(dev) - base
    plan = m.plan_request(1, len(prompt) + 16)
    want = plan["weights_bytes"] + plan["kv_cache_bytes"] + plan["workspace_bytes"]
    print(f"20b peak {peak / 2**30:.2f} GiB, plan {want / 2**30:.2f} GiB")
    assert abs(peak - want) <= 0.05 * want
    m.release_cache()
