"""Tiny random gpt-oss checkpoints for tests, built with transformers' GptOssForCausalLM.

The HF model's weights are made exactly representable in the checkpoint: float weights are rounded
to bf16, expert weights are quantized to MXFP4 (mxfp4_quantize on the [E, out, in] orientation)
and the dequantized values are written back into the HF model (whose dense experts are
[E, in, out]). So the in-memory fp32 HF model and every saved layout hold identical weights.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

from gptoss_kernels import reference

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=4)
ROPE = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
        "original_max_position_embeddings": 4096, "rope_theta": 150000.0}


def hf_config(**overrides):
    from transformers import GptOssConfig

    kw = dict(TINY, rope_parameters=dict(ROPE), attn_implementation="eager")
    kw.update(overrides)
    return GptOssConfig(**kw)


@torch.no_grad()
def make_hf_model(seed: int = 0, **overrides):
    """fp32 eager GptOssForCausalLM with random weights (nonzero sinks and biases), experts on the
    MXFP4 grid. Returns (model, {layer: (w1_blocks, w1_scales, w2_blocks, w2_scales)})."""
    from transformers import GptOssForCausalLM

    cfg = hf_config(**overrides)
    model = GptOssForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            v = 1.0 + 0.2 * torch.randn(p.shape, generator=g)
        elif name.endswith("sinks"):
            v = torch.randn(p.shape, generator=g)
        elif name.endswith("bias"):
            v = 0.2 * torch.randn(p.shape, generator=g)
        elif name.endswith("embed_tokens.weight"):
            v = torch.randn(p.shape, generator=g)
        elif p.dim() == 3:   # dense experts [E, in, out]
            v = torch.randn(p.shape, generator=g) * p.shape[1] ** -0.5
        else:                # [out, in] projections, router, lm_head
            v = torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5 * 2.0
        p.copy_(v.to(torch.bfloat16).float())
    mx = {}
    for i, layer in enumerate(model.model.layers):
        ex = layer.mlp.experts
        w1b, w1s = reference.mxfp4_quantize(ex.gate_up_proj.transpose(1, 2))   # [E, 2I, H]
        w2b, w2s = reference.mxfp4_quantize(ex.down_proj.transpose(1, 2))      # [E, H, I]
        ex.gate_up_proj.copy_(reference.mxfp4_dequantize(w1b, w1s, torch.float32).transpose(1, 2))
        ex.down_proj.copy_(reference.mxfp4_dequantize(w2b, w2s, torch.float32).transpose(1, 2))
        mx[i] = (w1b, w1s, w2b, w2s)
    return model, mx


def _bf16(t):
    return t.detach().to(torch.bfloat16).contiguous()


def _write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def save_hf_mxfp4(model, mx, folder, shards: int = 1) -> str:
    """HF MXFP4 layout (spec §2.2); with shards > 1, split over files with an index."""
    os.makedirs(folder, exist_ok=True)
    tensors = {}
    for name, p in model.state_dict().items():
        if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
            continue
        tensors[name] = _bf16(p)
    for i, (w1b, w1s, w2b, w2s) in mx.items():
        p = f"model.layers.{i}.mlp.experts."
        tensors[p + "gate_up_proj_blocks"], tensors[p + "gate_up_proj_scales"] = w1b, w1s
        tensors[p + "down_proj_blocks"], tensors[p + "down_proj_scales"] = w2b, w2s
    cfg = model.config.to_dict()
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    _write_json(os.path.join(folder, "config.json"), cfg)
    _save(tensors, folder, shards, "model")
    return folder


def save_hf_bf16(model, folder) -> str:
    """HF layout without quantization: dense experts [E, in, out] in bf16, as transformers keeps them."""
    os.makedirs(folder, exist_ok=True)
    _write_json(os.path.join(folder, "config.json"), model.config.to_dict())
    save_file({n: _bf16(p) for n, p in model.state_dict().items()}, os.path.join(folder, "model.safetensors"))
    return folder


def save_original(model, mx, folder) -> str:
    """Original layout (spec §2.1): block.N.*, fused qkv, original config keys."""
    from gptoss_kernels.config import GptOssConfig

    os.makedirs(folder, exist_ok=True)
    sd = model.state_dict()
    cfg = GptOssConfig.from_hf_dict(model.config.to_dict())
    _write_json(os.path.join(folder, "config.json"), cfg.to_original_dict())
    t = {"embedding.weight": _bf16(sd["model.embed_tokens.weight"]), "norm.scale": _bf16(sd["model.norm.weight"]),
         "unembedding.weight": _bf16(sd["lm_head.weight"])}
    for i in range(cfg.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"block.{i}."
        t[b + "attn.norm.scale"] = _bf16(sd[p + "input_layernorm.weight"])
        t[b + "attn.qkv.weight"] = _bf16(torch.cat([sd[p + f"self_attn.{x}_proj.weight"] for x in "qkv"]))
        t[b + "attn.qkv.bias"] = _bf16(torch.cat([sd[p + f"self_attn.{x}_proj.bias"] for x in "qkv"]))
        t[b + "attn.sinks"] = _bf16(sd[p + "self_attn.sinks"])
        t[b + "attn.out.weight"] = _bf16(sd[p + "self_attn.o_proj.weight"])
        t[b + "attn.out.bias"] = _bf16(sd[p + "self_attn.o_proj.bias"])
        t[b + "mlp.norm.scale"] = _bf16(sd[p + "post_attention_layernorm.weight"])
        t[b + "mlp.gate.weight"] = _bf16(sd[p + "mlp.router.weight"])
        t[b + "mlp.gate.bias"] = _bf16(sd[p + "mlp.router.bias"])
        w1b, w1s, w2b, w2s = mx[i]
        t[b + "mlp.mlp1_weight.blocks"], t[b + "mlp.mlp1_weight.scales"] = w1b, w1s
        t[b + "mlp.mlp1_bias"] = _bf16(sd[p + "mlp.experts.gate_up_proj_bias"])
        t[b + "mlp.mlp2_weight.blocks"], t[b + "mlp.mlp2_weight.scales"] = w2b, w2s
        t[b + "mlp.mlp2_bias"] = _bf16(sd[p + "mlp.experts.down_proj_bias"])
    save_file(t, os.path.join(folder, "model.safetensors"))
    return folder


def _save(tensors: dict, folder: str, shards: int, stem: str) -> None:
    if shards <= 1:
        save_file(tensors, os.path.join(folder, f"{stem}.safetensors"))
        return
    names = list(tensors)
    weight_map, total = {}, 0
    for s in range(shards):
        fn = f"{stem}-{s:05d}-of-{shards - 1:05d}.safetensors"   # zero-based, "of last index" (spec §2.4)
        part = {n: tensors[n] for n in names[s::shards]}
        save_file(part, os.path.join(folder, fn))
        weight_map.update({n: fn for n in part})
        total += sum(t.numel() * t.element_size() for t in part.values())
    _write_json(os.path.join(folder, f"{stem}.safetensors.index.json"),
                {"metadata": {"total_size": total}, "weight_map": weight_map})


# ----------------------------------------------------------------------------------------------
# writers from a GptOss object (no transformers needed): round trips and CLI checkpoints
# ----------------------------------------------------------------------------------------------

def model_original_tensors(model) -> dict:
    """GptOss weights under the original names (bf16 / uint8, CPU)."""
    from gptoss_kernels.loader import original_names

    out = {}
    for name, tgt in original_names(model.config).items():
        src = model.weights if tgt.layer is None else model.layers[tgt.layer]
        t = src[tgt.key].detach().cpu()
        out[name] = t.contiguous() if t.dtype == torch.uint8 else _bf16(t)
    return out


def save_model_original(model, folder) -> str:
    os.makedirs(folder, exist_ok=True)
    _write_json(os.path.join(folder, "config.json"), model.config.to_original_dict())
    save_file(model_original_tensors(model), os.path.join(folder, "model.safetensors"))
    return folder


def save_model_hf_mxfp4(model, folder, shards: int = 1) -> str:
    """GptOss weights in the HF MXFP4 layout (q/k/v split), config from GptOssConfig.to_hf_dict."""
    from gptoss_kernels.loader import hf_names

    os.makedirs(folder, exist_ok=True)
    c = model.config
    nq, nkv, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    spans = {"q": (0, nq * d), "k": (nq * d, (nq + nkv) * d), "v": ((nq + nkv) * d, (nq + 2 * nkv) * d)}
    tensors = {}
    for name, tgt in hf_names(c).items():
        src = model.weights if tgt.layer is None else model.layers[tgt.layer]
        t = src[tgt.key].detach().cpu()
        if tgt.part is not None:
            a, b = spans[tgt.part]
            t = t[a:b]
        tensors[name] = t.contiguous() if t.dtype == torch.uint8 else _bf16(t)
    _write_json(os.path.join(folder, "config.json"), c.to_hf_dict(mxfp4=True))
    _save(tensors, folder, shards, "model")
    return folder
