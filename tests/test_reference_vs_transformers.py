"""The reference ops against Hugging Face transformers' GptOss (the independent oracle).

A tiny float32 GptOssForCausalLM (eager attention, 2 layers: sliding then full, window 4, nonzero
biases and sinks, experts on the MXFP4 grid) runs on a sequence longer than the window; hooks
capture each module's input and output, and each reference op must reproduce them.
Tolerance: both sides compute in float32 from identical weights; they differ only in operation
order (e.g. the sink folded into the max vs concatenated), so relative errors are ~1e-7..1e-6;
we allow 2e-5 (relative Frobenius norm), far below any semantic error (a wrong mask, window
off-by-one, missing +1, unrounded vs rounded YaRN bounds all give > 1e-2).
"""

from __future__ import annotations

import pytest
import torch

from gptoss_kernels import reference as R

transformers = pytest.importorskip("transformers")
from transformers import GptOssConfig, GptOssForCausalLM  # noqa: E402
from transformers.models.gpt_oss import modeling_gpt_oss as hf  # noqa: E402

TOL = 2e-5


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def tiny_config(**kw) -> GptOssConfig:
    args = dict(num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=4, vocab_size=97, hidden_size=64,
                intermediate_size=64, head_dim=16, num_attention_heads=8, num_key_value_heads=2, sliding_window=4,
                rope_theta=150000.0, max_position_embeddings=131072,
                rope_scaling={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                              "original_max_position_embeddings": 4096, "truncate": False},
                attn_implementation="eager")
    args.update(kw)
    return GptOssConfig(**args)


def yarn_of(cfg: GptOssConfig) -> R.YarnParams:
    rp = cfg.rope_parameters
    return R.YarnParams(head_dim=cfg.head_dim, theta=rp["rope_theta"], factor=rp["factor"], beta_fast=rp["beta_fast"],
                        beta_slow=rp["beta_slow"], original_context=rp["original_max_position_embeddings"])


def mxfp4_experts(model: GptOssForCausalLM) -> list[dict]:
    """Quantize every layer's experts to MXFP4, write the exact dequantized values back into the HF
    model (so both sides use identical weights), and return the MXFP4 tensors (checkpoint layout)."""
    out = []
    with torch.no_grad():
        for layer in model.model.layers:
            ex = layer.mlp.experts
            w1 = ex.gate_up_proj.transpose(1, 2)   # HF [E, H, 2I] -> checkpoint [E, 2I, H]
            w2 = ex.down_proj.transpose(1, 2)      # HF [E, I, H]  -> checkpoint [E, H, I]
            b1, s1 = R.mxfp4_quantize(w1)
            b2, s2 = R.mxfp4_quantize(w2)
            ex.gate_up_proj.copy_(R.mxfp4_dequantize(b1, s1, torch.float32).transpose(1, 2))
            ex.down_proj.copy_(R.mxfp4_dequantize(b2, s2, torch.float32).transpose(1, 2))
            out.append(dict(w1_blocks=b1, w1_scales=s1, w1_bias=ex.gate_up_proj_bias.detach().clone(),
                            w2_blocks=b2, w2_scales=s2, w2_bias=ex.down_proj_bias.detach().clone()))
    return out


def randomize(model: GptOssForCausalLM, scale: float = 0.05) -> None:
    """transformers initialises biases to zero and sinks arbitrarily: make every one nonzero."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or name.endswith("sinks"):
                p.normal_(0, 1.0 if name.endswith("sinks") else scale)
            elif "norm" in name or "layernorm" in name:
                p.uniform_(0.5, 1.5)
            elif "experts" in name:
                p.normal_(0, 0.3)


@pytest.fixture(scope="module")
def captured():
    torch.manual_seed(1234)
    cfg = tiny_config()
    model = GptOssForCausalLM(cfg).float().eval()
    randomize(model)
    experts = mxfp4_experts(model)
    records: dict[str, tuple] = {}

    def hook(name):
        def fn(mod, args, kwargs, out):
            inp = args[0] if args else kwargs["hidden_states"]
            records[name] = (inp.detach().clone(), out[0].detach().clone() if isinstance(out, tuple) else out.detach().clone(),
                             out)
        return fn

    for i, layer in enumerate(model.model.layers):
        layer.self_attn.register_forward_hook(hook(f"attn{i}"), with_kwargs=True)
        layer.input_layernorm.register_forward_hook(hook(f"norm{i}"), with_kwargs=True)
        layer.mlp.router.register_forward_hook(hook(f"router{i}"), with_kwargs=True)
        layer.mlp.register_forward_hook(hook(f"mlp{i}"), with_kwargs=True)
    T = 13  # > window (4) so the sliding layer truly slides
    ids = torch.randint(0, cfg.vocab_size, (1, T))
    with torch.no_grad():
        logits = model(ids).logits
    return cfg, model, experts, records, ids, logits


def test_layer_types_follow_spec(captured):
    cfg = captured[0]
    # spec §1.1: sliding on even layer indices
    assert [t == "sliding_attention" for t in cfg.layer_types] == [i % 2 == 0 for i in range(cfg.num_hidden_layers)]


def test_rms_norm(captured):
    cfg, model, _, rec, _, _ = captured
    for i, layer in enumerate(model.model.layers):
        x, y, _ = rec[f"norm{i}"]
        assert rel_err(R.rms_norm(x, layer.input_layernorm.weight, cfg.rms_norm_eps), y) < TOL


def test_rms_norm_bf16_matches_hf():
    norm = hf.GptOssRMSNorm(64, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = (torch.randn(5, 64) * 3).bfloat16()
    got, want = R.rms_norm(x, norm.weight), norm(x)
    assert got.dtype == want.dtype == torch.bfloat16
    # same fp32 math then one bf16 rounding: at most 1 ulp apart (identical in practice)
    assert rel_err(got.float(), want.float()) < 4e-3


@pytest.mark.parametrize("head_dim", [16, 64])
def test_rotary_tables(head_dim):
    cfg = tiny_config(head_dim=head_dim)
    rot = hf.GptOssRotaryEmbedding(cfg)
    pos = torch.tensor([[0, 1, 2, 5, 127, 128, 4095, 4096, 65535, 131071]])
    cos_hf, sin_hf = rot(torch.zeros(1, dtype=torch.float32), pos)
    cos, sin = R.rope_cos_sin(pos[0], yarn_of(cfg))
    assert torch.equal(R.yarn_inv_freq(yarn_of(cfg)), rot.inv_freq)
    assert abs(yarn_of(cfg).concentration - rot.attention_scaling) < 1e-12
    assert rel_err(cos, cos_hf[0]) < TOL and rel_err(sin, sin_hf[0]) < TOL


def test_yarn_constants_from_spec():
    p = R.YarnParams()
    inv = R.yarn_inv_freq(p)
    base = 1.0 / (150000.0 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64))
    ratio = (inv.double() / base)
    # spec §1.3: pairs 0-8 keep the original frequency, 18-31 are divided by 32, 9-17 blended
    assert torch.allclose(ratio[:9], torch.ones(9, dtype=torch.float64), rtol=1e-6)
    assert torch.allclose(ratio[18:], torch.full((14,), 1 / 32, dtype=torch.float64), rtol=1e-6)
    m = (ratio[9:18] - 1 / 32) / (1 - 1 / 32)
    spec_m = torch.tensor([0.9025, 0.7950, 0.6876, 0.5801, 0.4726, 0.3652, 0.2577, 0.1502, 0.0428], dtype=torch.float64)
    assert torch.allclose(m, spec_m, atol=6e-5)
    assert abs(p.concentration - 1.3465736) < 1e-7


def _attention_sublayer(cfg, attn_mod, x, layer_idx):
    T = x.shape[1]
    nq, nkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q = attn_mod.q_proj(x[0]).view(T, nq, d)
    k = attn_mod.k_proj(x[0]).view(T, nkv, d)
    v = attn_mod.v_proj(x[0]).view(T, nkv, d)
    cos, sin = R.rope_cos_sin(torch.arange(T), yarn_of(cfg))
    q, k = R.apply_rope(q, cos, sin), R.apply_rope(k, cos, sin)
    window = cfg.sliding_window if cfg.layer_types[layer_idx] == "sliding_attention" else None
    o = R.attention(q, k, v, attn_mod.sinks, sm_scale=d ** -0.5, sliding_window=window)
    return attn_mod.o_proj(o.reshape(T, nq * d)), (q, k, v, window)


@pytest.mark.parametrize("layer_idx", [0, 1], ids=["sliding", "full"])
def test_attention_prefill_matches_hf(captured, layer_idx):
    cfg, model, _, rec, _, _ = captured
    x, y, _ = rec[f"attn{layer_idx}"]
    with torch.no_grad():
        got, _ = _attention_sublayer(cfg, model.model.layers[layer_idx].self_attn, x, layer_idx)
    assert rel_err(got, y[0]) < TOL


@pytest.mark.parametrize("layer_idx", [0, 1], ids=["sliding", "full"])
def test_attention_chunked_and_decode_equal_full(captured, layer_idx):
    """A prefill starting at a cache offset and single-token decode over a cache (ring buffer of
    `window` slots on the sliding layer) give the rows of the full-sequence attention."""
    cfg, model, _, rec, _, _ = captured
    x, y, _ = rec[f"attn{layer_idx}"]
    with torch.no_grad():
        _, (q, k, v, window) = _attention_sublayer(cfg, model.model.layers[layer_idx].self_attn, x, layer_idx)
        sinks = model.model.layers[layer_idx].self_attn.sinks
        full = R.attention(q, k, v, sinks, sm_scale=cfg.head_dim ** -0.5, sliding_window=window)
        T = q.shape[0]
        for p0 in (1, 5, T - 1):
            part = R.attention(q[p0:], k, v, sinks, sm_scale=cfg.head_dim ** -0.5, sliding_window=window)
            assert rel_err(part, full[p0:]) < TOL
        S = window if window is not None else T
        kc = torch.zeros(1, S, k.shape[1], k.shape[2])
        vc = torch.zeros_like(kc)
        for t in range(T):
            slot = R.cache_slots(torch.tensor(t), S)
            kc[0, slot], vc[0, slot] = k[t], v[t]
            o = R.attention_decode(q[t:t + 1], kc, vc, torch.tensor([t + 1]), sinks, sliding_window=window,
                                   sm_scale=cfg.head_dim ** -0.5)
            assert rel_err(o[0], full[t]) < TOL


def test_sink_only_joins_denominator():
    # With one visible key, output = v * e^s / (e^s + e^sink): weights sum to < 1, no sink value.
    q = torch.randn(1, 2, 8)
    k = torch.randn(1, 1, 8)
    v = torch.randn(1, 1, 8)
    sinks = torch.tensor([0.0, 3.0])
    out = R.attention(q, k, v, sinks, sm_scale=0.5)
    s = (q[0] @ k[0, 0]) * 0.5
    w = torch.exp(s) / (torch.exp(s) + torch.exp(sinks))
    assert torch.allclose(out[0], w[:, None] * v[0, 0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layer_idx", [0, 1])
def test_router_matches_hf(captured, layer_idx):
    cfg, model, _, rec, _, _ = captured
    x, _, out = rec[f"router{layer_idx}"]
    _, hf_scores, hf_idx = out
    router = model.model.layers[layer_idx].mlp.router
    ids, w = R.router_topk(x.reshape(-1, x.shape[-1]), router.weight, router.bias, cfg.num_experts_per_tok)
    assert torch.equal(ids.long(), hf_idx)
    assert rel_err(w, hf_scores) < TOL


def test_router_tie_break_and_nan():
    x = torch.ones(1, 4)
    w = torch.tensor([[1.0] * 4, [2.0] * 4, [2.0] * 4, [0.0] * 4, [2.0] * 4])
    b = torch.zeros(5)
    ids, wt = R.router_topk(x, w, b, k=3)
    assert ids.tolist() == [[1, 2, 4]]  # equal logits: lower expert index first
    assert torch.allclose(wt, torch.full((1, 3), 1 / 3))
    w2 = w.clone()
    w2[1, 0] = float("nan")
    ids, wt = R.router_topk(x, w2, b, k=2)
    assert ids.tolist() == [[2, 4]] and torch.isfinite(wt).all()  # NaN ranks last


def test_route_metadata_is_stable_grouping():
    ids = torch.randint(0, 6, (50, 4), dtype=torch.int32)
    counts, offsets, perm = R.route_metadata(ids, 8)
    flat = ids.reshape(-1)
    assert counts.tolist() == [int((flat == e).sum()) for e in range(8)]
    assert offsets[0] == 0 and offsets[-1] == flat.numel() and torch.equal(offsets[1:] - offsets[:-1], counts)
    assert sorted(perm.tolist()) == list(range(flat.numel()))
    for e in range(8):
        rows = perm[offsets[e]:offsets[e + 1]].tolist()
        assert rows == sorted(rows) and all(flat[r] == e for r in rows)


@pytest.mark.parametrize("layer_idx", [0, 1])
def test_experts_match_hf(captured, layer_idx):
    cfg, model, experts, rec, _, _ = captured
    x, y, out = rec[f"mlp{layer_idx}"]
    xf = x.reshape(-1, x.shape[-1])
    router = model.model.layers[layer_idx].mlp.router
    ids, w = R.router_topk(xf, router.weight, router.bias, cfg.num_experts_per_tok)
    got = R.moe(xf, ids, w, **experts[layer_idx], swiglu_alpha=cfg.swiglu_alpha, swiglu_limit=cfg.swiglu_limit)
    assert rel_err(got, y.reshape(-1, y.shape[-1])) < TOL


def test_swiglu_matches_hf_gate():
    cfg = tiny_config()
    ex = hf.GptOssExperts(cfg)
    z = torch.randn(7, 2 * cfg.intermediate_size) * 6  # exercises both clamps
    assert rel_err(R.swiglu(z, cfg.swiglu_alpha, cfg.swiglu_limit), ex._apply_gate(z)) < 1e-6


def test_moe_block_and_whole_model_logits(captured):
    """Stack the reference ops into the full forward and compare the logits."""
    cfg, model, experts, _, ids, logits = captured
    m = model.model
    with torch.no_grad():
        h = m.embed_tokens(ids)[0]
        for i, layer in enumerate(m.layers):
            a = R.rms_norm(h, layer.input_layernorm.weight, cfg.rms_norm_eps)
            h = h + _attention_sublayer(cfg, layer.self_attn, a[None], i)[0]
            r = layer.mlp.router
            h = h + R.moe_block(h, layer.post_attention_layernorm.weight, r.weight, r.bias, **experts[i],
                                k=cfg.num_experts_per_tok, eps=cfg.rms_norm_eps)
        out = model.lm_head(R.rms_norm(h, m.norm.weight, cfg.rms_norm_eps))
    assert rel_err(out, logits[0]) < 1e-4
