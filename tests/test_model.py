"""GptOss against transformers' GptOssForCausalLM on tiny random checkpoints (CPU), generation
with the KV cache against full recomputation, from_config (the memory arithmetic:
tests/test_memory.py).

The tiny model: 2 layers (layer 0 sliding, layer 1 full), sliding_window 4, sequences of 13
tokens (> 3 windows), 4 heads / 2 KV heads of 16 dims, 4 experts (top 2), random nonzero sinks,
biases and norm gains, experts on the MXFP4 grid (tests/checkpoints.py).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from gptoss_kernels import GptOss, GptOssConfig, _lib, reference

from . import checkpoints as ck
from .kernel_device import DEV, ON_GPU, shrink

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf():
    return ck.make_hf_model(seed=0)


@pytest.fixture(scope="module")
def dirs(hf, tmp_path_factory):
    model, mx = hf
    root = tmp_path_factory.mktemp("ckpt")
    return {"hf-mxfp4": ck.save_hf_mxfp4(model, mx, root / "hf", shards=2),
            "original": ck.save_original(model, mx, root / "orig"),
            "hf-bf16": ck.save_hf_bf16(model, root / "bf16")}


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, ck.TINY["vocab_size"], (2, 13), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def hf_logits(hf, ids):
    with torch.no_grad():
        return hf[0](ids).logits.float()


@pytest.fixture(scope="module")
def models(dirs):
    return {(layout, dt): GptOss.from_pretrained(d, dtype=dt, progress=False)
            for layout, d in dirs.items() for dt in (torch.float32, torch.bfloat16)}


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_layout_and_config_detected(models):
    m = models[("hf-mxfp4", torch.bfloat16)]
    assert m.config.num_hidden_layers == 2 and m.config.sliding_window == 4
    assert [m.config.window(i) for i in range(2)] == [4, None]
    assert m.config.yarn == reference.YarnParams(head_dim=16)
    assert m.config == models[("original", torch.bfloat16)].config == models[("hf-bf16", torch.bfloat16)].config


def test_logits_match_transformers_fp32(models, ids, hf_logits):
    # fp32 on both sides from identical weights: only summation order differs (measured ~4e-7).
    out = models[("hf-mxfp4", torch.float32)](ids)
    assert out.dtype == torch.float32 and out.shape == (2, 13, ck.TINY["vocab_size"])
    assert torch.isfinite(out).all()
    assert _rel(out, hf_logits) < 1e-5


def test_logits_match_transformers_bf16(models, ids, hf_logits):
    # bf16 activations (the residual stream and every stored intermediate rounded to bf16, 2^-9
    # relative per element) against transformers in fp32, through 2 layers with deliberately
    # large random weights: measured ~1.5e-2 relative norm error; 4e-2 leaves margin while still
    # catching any wrong mask, RoPE or sink (those give O(1) errors).
    out = models[("hf-mxfp4", torch.bfloat16)](ids)
    assert torch.isfinite(out).all()
    err = _rel(out, hf_logits)
    print(f"bf16 vs transformers fp32: rel err {err:.3e}")
    assert err < 4e-2
    agree = (out.argmax(-1) == hf_logits.argmax(-1)).float().mean().item()
    assert agree >= 0.9


def test_sliding_window_matters(models, ids, hf_logits):
    # Positions past the window must differ from a model that attends to everything (guards
    # against a test that would pass with the window ignored).
    m = models[("hf-mxfp4", torch.float32)]
    saved = m.config.layer_types
    try:
        m.config.layer_types = ("full_attention", "full_attention")
        full = m(ids)
    finally:
        m.config.layer_types = saved
    assert torch.allclose(full[:, :4], hf_logits[:, :4], rtol=1e-4, atol=1e-4)
    assert _rel(full[:, 4:], hf_logits[:, 4:]) > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_layouts_identical(models, ids, dtype):
    ref = models[("hf-mxfp4", dtype)](ids)
    for layout in ("original", "hf-bf16"):
        assert torch.equal(models[(layout, dtype)](ids), ref), layout
    a, b = models[("hf-mxfp4", dtype)], models[("hf-bf16", dtype)]
    for i in range(2):  # quantizing the dequantized dense experts gives back the same values
        for w in ("w1", "w2"):
            assert torch.equal(reference.mxfp4_dequantize(a.layers[i][f"{w}_blocks"], a.layers[i][f"{w}_scales"]),
                               reference.mxfp4_dequantize(b.layers[i][f"{w}_blocks"], b.layers[i][f"{w}_scales"]))


def _greedy_full(m, prompt, n):
    ids, out = list(prompt), []
    for _ in range(n):
        nxt = int(m(torch.tensor([ids]))[0, -1].argmax())
        out.append(nxt)
        ids.append(nxt)
    return out


def test_generate_equals_full_recompute(models):
    # Prompt of 9 > window 4, prefilled in chunks of 3 (cache + ring wrap during prefill), then 8
    # decode steps (the ring wraps again). fp32 so that argmax ties cannot flip.
    m = models[("hf-mxfp4", torch.float32)]
    m.prefill_chunk = 3
    prompt = torch.randint(0, 128, (9,), generator=torch.Generator().manual_seed(2)).tolist()
    try:
        got = m.generate(prompt, 8)
    finally:
        m.prefill_chunk = GptOss.prefill_chunk
    assert got == _greedy_full(m, prompt, 8)
    assert m.generate(torch.tensor([prompt]), 8) == got          # LongTensor [1, T] input


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_generate_batch_of_prompts(models, dtype):
    # Prompts of different lengths, prefilled packed in chunks of 4 tokens in total (a chunk
    # spans sequences; rings wrap), then decoded together: equal to one-by-one generation.
    m = models[("hf-mxfp4", dtype)]
    g = torch.Generator().manual_seed(3)
    ps = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (7, 3, 10)]
    n = 5 if dtype == torch.float32 else 2   # bf16: packing may reorder sums; ties could flip later tokens
    alone = [m.generate(p, n) for p in ps]
    m.prefill_chunk = 4
    try:
        assert m.generate(ps, n) == alone
    finally:
        m.prefill_chunk = GptOss.prefill_chunk


def test_generate_stop_and_sampling(models):
    m = models[("hf-mxfp4", torch.float32)]
    prompt = [1, 2, 3, 4, 5, 6]
    greedy = m.generate(prompt, 4)
    cut = greedy.index(greedy[1]) + 1
    assert m.generate(prompt, 4, stop_token_ids=[greedy[1]]) == greedy[:cut]   # the stop token is included
    s1 = m.generate(prompt, 4, temperature=1.0, top_p=0.9, seed=5)
    assert s1 == m.generate(prompt, 4, temperature=1.0, top_p=0.9, seed=5)
    assert all(0 <= t < 128 for t in s1)
    # top_p tiny keeps only the most likely token: equal to greedy
    assert m.generate(prompt, 4, temperature=1.0, top_p=1e-6, seed=7) == greedy
    assert m.generate(prompt, 0) == []


def test_generate_bf16_first_token_is_forward_argmax(models):
    m = models[("hf-mxfp4", torch.bfloat16)]
    prompt = [5, 9, 17, 33, 65, 100, 3, 8]
    out = m.generate(prompt, 3)
    assert len(out) == 3 and out[0] == int(m(torch.tensor([prompt]))[0, -1].argmax())


def test_input_errors(models):
    m = models[("hf-mxfp4", torch.float32)]
    with pytest.raises(ValueError, match="input_ids"):
        m(torch.tensor([[0, 128]]))
    with pytest.raises(ValueError, match="empty"):
        m.generate([], 2)
    with pytest.raises(ValueError, match="outside"):
        m.generate([1, 500], 2)


def tiny_config(**kw) -> GptOssConfig:
    base = dict(num_hidden_layers=2, num_experts=4, experts_per_token=2, vocab_size=96, hidden_size=64,
                intermediate_size=32, head_dim=16, num_attention_heads=4, num_key_value_heads=2, sliding_window=4)
    base.update(kw)
    return GptOssConfig(**base)


def test_from_config_random_model():
    cfg = tiny_config()
    m = GptOss.from_config(cfg, seed=3)
    again = GptOss.from_config(cfg, seed=3)
    L = m.layers[0]
    assert L["w1_blocks"].shape == (4, 64, 2, 16) and L["w1_blocks"].dtype == torch.uint8
    assert L["w2_blocks"].shape == (4, 64, 1, 16)
    assert 118 <= int(L["w1_scales"].min()) and int(L["w1_scales"].max()) <= 122
    assert L["qkv_w"].dtype == torch.bfloat16 and L["qkv_w"].shape == (128, 64)
    assert torch.equal(L["w1_blocks"], again.layers[0]["w1_blocks"])
    assert m.weights_bytes() == GptOss.memory_plan(cfg)["weights_bytes"]
    logits = m(torch.tensor([[1, 2, 3, 4, 5, 6, 7]]))
    assert logits.shape == (1, 7, 96) and torch.isfinite(logits).all()
    assert len(m.generate([1, 2, 3], 4)) == 4


def test_config_presets_and_validation():
    c = GptOssConfig.gpt_oss_20b()
    assert c.num_hidden_layers == 24 and c.num_experts == 32 and c.layer_types[:2] == ("sliding_attention", "full_attention")
    assert GptOssConfig.from_original_dict(c.to_original_dict()) == c
    assert GptOssConfig.from_hf_dict(c.to_hf_dict()) == c
    with pytest.raises(ValueError, match="hidden_size"):
        GptOssConfig(hidden_size=100)
    bad = c.to_hf_dict()
    bad["rope_scaling"]["truncate"] = True
    with pytest.raises(ValueError, match="truncate"):
        GptOssConfig.from_hf_dict(bad)


def test_cache_reuse_between_calls(models):
    # generate keeps its cache between calls of the same (batch, rounded length); stale entries
    # of a previous, different prompt must never be read.
    m = models[("hf-mxfp4", torch.float32)]
    a, b = [7] * 12 + [1, 2, 3], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 11, 12]
    m.release_cache()
    fresh = m.generate(b, 4)
    m.generate(a, 4)
    assert m.engine.state is not None
    assert m.generate(b, 4) == fresh


# ----------------------------------------------------------------------------------------------
# GPU (marked gpu): the kernels on DEV, a CUDA GPU or else the host build of the kernels (hostsim,
# tests/kernel_device.py); the reference runs on CPU tensors under the "reference" backend
# ----------------------------------------------------------------------------------------------

def _near_argmax(chosen: list[int], ref_logits: torch.Tensor, slack: float) -> bool:
    """Each chosen token's reference logit is within `slack` of the reference maximum (a greedy
    token from bf16 kernels may differ from the fp32 reference's argmax only on near-ties)."""
    top = ref_logits.max(-1).values
    got = ref_logits[torch.arange(len(chosen)), torch.tensor(chosen)]
    return bool(((top - got) <= slack).all())


def _kernel_shape_config() -> GptOssConfig:
    # Attention shapes the kernels cover (head_dim 64, 8 q heads per KV head), the real H and I,
    # few experts and a small vocabulary so that the CPU reference stays quick.
    if ON_GPU:
        return GptOssConfig(num_hidden_layers=2, num_experts=8, experts_per_token=4, vocab_size=1024,
                            num_attention_heads=64, num_key_value_heads=8, head_dim=64, sliding_window=128)
    # host build (every thread emulated; H = I = 2880 with 64 heads costs minutes per step): the same
    # kernel-covered attention shape (head_dim 64, 8 q heads per KV head) with one KV head, H = I = 128,
    # vocabulary 128 and window 16, so that the prompt (_PROMPT) still exceeds the window
    return GptOssConfig(num_hidden_layers=2, num_experts=8, experts_per_token=4, vocab_size=128, hidden_size=128,
                        intermediate_size=128, num_attention_heads=8, num_key_value_heads=1, head_dim=64,
                        sliding_window=16)


# prompt length (> the window: the sliding layer's ring wraps in prefill and in decode), tokens
# generated alone and in the batch of two prompts, the batch's second prompt length; host build:
# 20 > 16, 3 and 2 tokens (each emulated decode step runs the persistent MoE/GEMV grids, ~0.5-1 s)
_PROMPT, _NEW, _BATCH_NEW, _SHORT = shrink(200, 20), shrink(16, 3), shrink(8, 2), shrink(150, 13)


def _kernel_model_and_reference():
    cfg = _kernel_shape_config()
    dev_model = GptOss.from_config(cfg, device=DEV, seed=0)
    return cfg, dev_model, dev_model.to("cpu")


@pytest.mark.gpu
def test_kernels_forward_and_generate_match_reference():
    """The kernels (CUDA, or the host build) against the CPU reference on the same random weights.
    Prompt longer than the window (the sliding layer wraps its ring during decode too).
    Tolerances: bf16 kernels vs the fp32-math reference on bf16 activations: 2e-2 relative norm
    on the logits (DEVELOPERS.md: 1e-2 per op, two layers compound); generated tokens must be
    near-argmax of the reference logits (slack 5% of the logit std)."""
    cfg, gpu, cpu = _kernel_model_and_reference()
    prompt = torch.randint(0, cfg.vocab_size, (_PROMPT,), generator=torch.Generator().manual_seed(0)).tolist()
    lg = gpu(torch.tensor([prompt], device=DEV))[0].cpu()
    with _lib.use_backend("reference"):
        lc = cpu(torch.tensor([prompt]))[0]
    assert torch.isfinite(lg).all()
    err = _rel(lg, lc)
    print(f"kernels vs reference logits: rel err {err:.3e}")
    assert err < 2e-2
    out = gpu.generate(prompt, _NEW)
    with _lib.use_backend("reference"):
        ref = cpu(torch.tensor([prompt + out[:-1]]))[0, len(prompt) - 1:]
    assert _near_argmax(out, ref, 0.05 * float(lc.std()))
    assert gpu.generate(prompt, _NEW) == out                    # the reused decode state is deterministic
    n = _BATCH_NEW
    batch = gpu.generate([prompt, prompt[:_SHORT]], n)
    assert batch[0] == out[:n] or _near_argmax(batch[0], ref[:n], 0.05 * float(lc.std()))


@pytest.mark.gpu
@pytest.mark.cuda_only  # the decode step captured as a CUDA graph and replayed
def test_cuda_decode_step_is_a_replayed_graph():
    cfg, gpu, _ = _kernel_model_and_reference()
    prompt = torch.randint(0, cfg.vocab_size, (_PROMPT,), generator=torch.Generator().manual_seed(0)).tolist()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = gpu.generate(prompt, _NEW)
    assert gpu.engine.graph is not None, f"decode step was not captured: {[str(x.message) for x in w]}"
    assert gpu.generate(prompt, _NEW) == out                    # replaying the reused graph is deterministic


@pytest.mark.gpu
def test_kernels_tiny_checkpoint_matches_reference(dirs):
    """The tiny HF checkpoint on DEV (shapes the kernels do not cover run the reference on the
    kernels' device: checks the loader and the glue, eager decode allowed)."""
    cpu = GptOss.from_pretrained(dirs["hf-mxfp4"], device="cpu", dtype=torch.bfloat16, progress=False)
    gpu = GptOss.from_pretrained(dirs["hf-mxfp4"], device=DEV, dtype=torch.bfloat16, progress=False)
    prompt = list(range(3, 12))
    lg = gpu(torch.tensor([prompt], device=DEV))
    with _lib.use_backend("reference"):
        lc = cpu(torch.tensor([prompt]))
    assert torch.isfinite(lg).all() and _rel(lg.cpu(), lc) < 2e-2
    out = gpu.generate(prompt, 4)
    with _lib.use_backend("reference"):
        ref = cpu(torch.tensor([prompt + out[:-1]]))[0, len(prompt) - 1:]
    assert _near_argmax(out, ref, 0.05 * float(lc.std()))


@pytest.mark.gpu
@pytest.mark.cuda_only  # the real 120b on the card: torch.cuda memory accounting, graph capture, tok/s timing
def test_cuda_120b_random_decode(capsys):
    """The real 120b shapes with random weights fit the card (memory_plan agrees with what is
    allocated) and decode with a captured graph; prints tok/s (greedy, batch 1)."""
    import time

    cfg = GptOssConfig.gpt_oss_120b()
    plan = GptOss.memory_plan(cfg, gpu_bytes=torch.cuda.get_device_properties(0).total_memory)
    assert plan["fits"]
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    m = GptOss.from_config(cfg, device="cuda", seed=0)
    assert abs(torch.cuda.memory_allocated() - base - plan["weights_bytes"]) < 0.01 * plan["weights_bytes"]
    prompt = list(range(1000, 1064))
    m.generate(prompt, 4)                                     # prefill, graph capture
    assert m.engine.graph is not None
    torch.cuda.synchronize()
    stamps = [time.perf_counter() for _ in m.stream(prompt, 65, stop_token_ids=[])]
    steps = len(stamps) - 1
    tok_s = steps / (stamps[-1] - stamps[0])
    from gptoss_kernels.bench.e2e import decode_step_bytes
    from gptoss_kernels.bench.shapes import ModelShape
    from gptoss_kernels.bench.timing import measure_limits

    m.release_cache()
    copy = measure_limits(torch.device("cuda"), quick=True).copy_gbps
    step_bytes = decode_step_bytes(ModelShape.preset("120b"), 1, len(prompt) + 65)["total"]
    bound = copy * 1e9 / step_bytes
    with capsys.disabled():
        print(f"\n120b random weights, batch 1, decode: {tok_s:.1f} tok/s ({steps} steps) vs the bound "
              f"{bound:.0f} tok/s ({step_bytes / 1e9:.3f} GB/step at the measured copy {copy:.0f} GB/s): "
              f"{100 * tok_s / bound:.0f}%; plan: {GptOss.format_memory_plan(plan)}")
    assert steps == 64 and tok_s > 1.0
