"""Run Hugging Face transformers' GptOss with gptoss-kernels' attention and MoE.

    from transformers import GptOssForCausalLM
    from gptoss_kernels.integrations.transformers import patch_gpt_oss
    model = GptOssForCausalLM.from_pretrained(path, torch_dtype=torch.bfloat16, device_map="cuda")
    patch_gpt_oss(model)           # attention -> attention_prefill, router + experts -> router_topk + moe_mxfp4
    model.generate(...)            # unchanged API

How it hooks in (no transformers source is modified):
- attention: `transformers.AttentionInterface.register("gptoss_kernels", fn)` and the model's
  `config._attn_implementation = "gptoss_kernels"`. transformers applies RoPE and its KV cache,
  then calls `fn` with rotated q [B, nq, Tq, d] and k/v [B, nkv, Tk, d] (Tk >= Tq: the cached keys
  first). `fn` maps that onto `attention_prefill`: the first Tk - Tq keys become the "cache prefix",
  the last Tq the chunk's own keys; positions are relative (RoPE is already applied), which is
  exact as long as the cache holds the window's previous keys (transformers' caches do).
  Not supported: padded batches (an attention mask with padding); use one sequence or equal lengths.
- MoE: each layer's `mlp` is replaced by `KernelMoE`, holding the router and the experts in MXFP4
  (the checkpoint layout). Dense experts are quantized with `mxfp4_quantize` when patching: exact
  for a model loaded from the MXFP4 checkpoint (its bf16 experts are on the MXFP4 grid), a
  quantization otherwise.
- Inputs are cast to bf16 for the kernels and outputs back to the model's dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import ops

ATTENTION_NAME = "gptoss_kernels"


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
               s_aux=None, **kwargs):
    B, nq, Tq, d = query.shape
    Tk = key.shape[2]
    if s_aux is None:
        raise ValueError("gptoss_kernels attention expects the GptOss sinks (s_aux)")
    dtype = query.dtype
    q = query.transpose(1, 2).to(torch.bfloat16).reshape(B * Tq, nq, d).contiguous()
    k_all = key.transpose(1, 2).to(torch.bfloat16)           # [B, Tk, nkv, d]
    v_all = value.transpose(1, 2).to(torch.bfloat16)
    nkv = k_all.shape[2]
    m = Tk - Tq
    k_new = k_all[:, m:].reshape(B * Tq, nkv, d).contiguous()
    v_new = v_all[:, m:].reshape(B * Tq, nkv, d).contiguous()
    cu = torch.arange(0, (B + 1) * Tq, Tq, dtype=torch.int32, device=query.device)
    cache = {}
    if m > 0:
        cache = dict(k_cache=k_all[:, :m].contiguous(), v_cache=v_all[:, :m].contiguous(),
                     cache_seqlens=torch.full((B,), m, dtype=torch.int32, device=query.device))
    out = ops.attention_prefill(q, k_new, v_new, s_aux.to(torch.bfloat16), cu_seqlens_q=cu,
                                sliding_window=sliding_window,
                                sm_scale=float(scaling if scaling is not None else d ** -0.5), **cache)
    return out.view(B, Tq, nq, d).to(dtype), None


class KernelMoE(nn.Module):
    """Router top-k + MXFP4 experts through gptoss-kernels; same interface as GptOssMLP."""

    def __init__(self, mlp: nn.Module, swiglu_alpha: float, swiglu_limit: float):
        super().__init__()
        ex, r = mlp.experts, mlp.router
        self.top_k = r.top_k
        self.swiglu_alpha, self.swiglu_limit = swiglu_alpha, swiglu_limit
        bf = torch.bfloat16
        self.router_weight = nn.Parameter(r.weight.detach().to(bf), requires_grad=False)
        self.router_bias = nn.Parameter(r.bias.detach().to(bf), requires_grad=False)
        w1b, w1s = ops.mxfp4_quantize(ex.gate_up_proj.detach().transpose(1, 2).contiguous())  # [E, 2I, H]
        w2b, w2s = ops.mxfp4_quantize(ex.down_proj.detach().transpose(1, 2).contiguous())     # [E, H, I]
        for name, t in dict(w1_blocks=w1b, w1_scales=w1s, w2_blocks=w2b, w2_scales=w2s,
                            w1_bias=ex.gate_up_proj_bias.detach().to(bf), w2_bias=ex.down_proj_bias.detach().to(bf)).items():
            self.register_buffer(name, t.contiguous())

    def forward(self, hidden_states):
        B, T, H = hidden_states.shape
        x = hidden_states.reshape(-1, H).to(torch.bfloat16).contiguous()
        ids, w = ops.router_topk(x, self.router_weight, self.router_bias, self.top_k)
        y = ops.moe_mxfp4(x, ids, w, self.w1_blocks, self.w1_scales, self.w1_bias, self.w2_blocks, self.w2_scales,
                          self.w2_bias, swiglu_alpha=self.swiglu_alpha, swiglu_limit=self.swiglu_limit)
        return y.view(B, T, H).to(hidden_states.dtype), w


def patch_gpt_oss(model: nn.Module) -> nn.Module:
    """Route a transformers GptOssForCausalLM (or GptOssModel) through gptoss-kernels, in place."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, _attention)
    cfg = model.config
    cfg._attn_implementation = ATTENTION_NAME
    base = getattr(model, "model", model)
    alpha = getattr(cfg, "swiglu_alpha", 1.702)
    for layer in base.layers:
        if not isinstance(layer.mlp, KernelMoE):
            layer.mlp = KernelMoE(layer.mlp, alpha, cfg.swiglu_limit)
        layer.self_attn.config._attn_implementation = ATTENTION_NAME
    return model
