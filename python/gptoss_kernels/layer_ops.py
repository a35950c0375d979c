"""Each op of a gpt-oss layer in the model's dtype, for ``GptOss`` (which inherits them): bf16 ->
the package's public ops (the kernels on CUDA, the reference on the CPU); float32 (CPU tests, for
tight comparisons) -> the same reference math the ops call on the CPU, without the bf16 argument
checks. Every helper takes optional out= buffers: the decode step passes static ones (CUDA graph).

They read ``self.config``, ``self.layers`` (a layer's sinks) and ``self.dtype``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import ops, reference

__all__ = ["LayerOps"]


class LayerOps:
    """One op per method, dispatched on the model's dtype (see the module docstring)."""

    @property
    def _bf16(self) -> bool:
        return self.dtype == torch.bfloat16

    def _norm(self, x, weight, residual=None, out=None, residual_out=None):
        """RMSNorm(x) or, with residual, (RMSNorm(x + residual), x + residual) (the residual add
        fused; residual_out may alias residual: the stream updated in place)."""
        eps = self.config.rms_norm_eps
        if self._bf16:
            return ops.rms_norm(x, weight, eps=eps, residual=residual, out=out, residual_out=residual_out)
        if residual is not None:
            h = x + residual
            if residual_out is not None:
                residual_out.copy_(h)
                h = residual_out
        else:
            h = x
        y = reference.rms_norm(h, weight, eps)
        if out is not None:
            y = out.copy_(y)
        return y if residual is None else (y, h)

    def _linear(self, x, weight, bias=None, out=None, out_dtype=None):
        if self._bf16:
            return ops.linear(x, weight, bias, out=out, out_dtype=out_dtype or torch.bfloat16)
        y = F.linear(x, weight, bias)
        return y if out is None else out.copy_(y)

    def _split_qkv(self, qkv):
        c = self.config
        T, nq, nkv, d = qkv.shape[0], c.num_attention_heads, c.num_key_value_heads, c.head_dim
        return (qkv[:, : nq * d].reshape(T, nq, d), qkv[:, nq * d: (nq + nkv) * d].reshape(T, nkv, d),
                qkv[:, (nq + nkv) * d:].reshape(T, nkv, d))

    def _rope(self, qkv, positions):
        c = self.config
        if self._bf16:
            return ops.rope_qkv(qkv, positions, num_q_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads,
                                head_dim=c.head_dim, rope=c.yarn)
        q, k, v = self._split_qkv(qkv)
        cos, sin = reference.rope_cos_sin(positions, c.yarn)
        return reference.apply_rope(q, cos, sin), reference.apply_rope(k, cos, sin), v.contiguous()

    def _attend_packed(self, i, q, k, v, cu_seqlens):
        """Causal attention over whole sequences packed by cu_seqlens (no cache)."""
        W, sinks = self.config.window(i), self.layers[i]["sinks"]
        if self._bf16:
            return ops.attention_prefill(q, k, v, sinks, cu_seqlens_q=cu_seqlens, sliding_window=W,
                                         sm_scale=self.config.sm_scale)
        return reference.attention_varlen(q, k, v, sinks, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens,
                                          sm_scale=self.config.sm_scale, sliding_window=W)

    def _attend_chunk(self, i, q, k, v, kc, vc, cu: list[int], p0: list[int], cu_t, p0_t):
        """Chunks of B sequences packed by cu (host list; cu_t the int32 device copy), sequence b's
        chunk at positions p0[b].. (p0_t on the device) against the cache kc/vc [B, S, nkv, d]."""
        W, sinks = self.config.window(i), self.layers[i]["sinks"]
        if self._bf16:
            return ops.attention_prefill(q, k, v, sinks, cu_seqlens_q=cu_t, k_cache=kc, v_cache=vc, cache_seqlens=p0_t,
                                         sliding_window=W, sm_scale=self.config.sm_scale)
        out = torch.empty_like(q)
        for b in range(len(p0)):
            s, e = cu[b], cu[b + 1]
            if e == s:
                continue
            kk, vv = k[s:e], v[s:e]
            first = 0 if W is None else max(0, p0[b] - (W - 1))
            if p0[b] > first:
                slots = reference.cache_slots(torch.arange(first, p0[b], device=q.device), kc.shape[1])
                kk, vv = torch.cat((kc[b, slots], kk)), torch.cat((vc[b, slots], vv))
            out[s:e] = reference.attention(q[s:e], kk, vv, sinks, sm_scale=self.config.sm_scale, sliding_window=W,
                                           q_offset=p0[b] - first)
        return out

    def _cache_append(self, k, v, kc, vc, seq_ids, positions):
        if self._bf16:
            ops.cache_append(k, v, kc, vc, seq_ids, positions)
        else:
            slots = reference.cache_slots(positions.long(), kc.shape[1])
            kc[seq_ids.long(), slots] = k
            vc[seq_ids.long(), slots] = v

    def _attend_decode(self, i, q, kc, vc, seqlens, out=None):
        W, sinks = self.config.window(i), self.layers[i]["sinks"]
        if self._bf16:
            return ops.attention_decode(q, kc, vc, seqlens, sinks, sliding_window=W, sm_scale=self.config.sm_scale,
                                        out=out)
        o = reference.attention_decode(q, kc, vc, seqlens, sinks, sliding_window=W, sm_scale=self.config.sm_scale)
        return o if out is None else out.copy_(o)

    def _moe(self, L, u, ids_out=None, w_out=None, out=None):
        c = self.config
        if self._bf16:
            ids, w = ops.router_topk(u, L["gate_w"], L["gate_b"], c.experts_per_token,
                                     out=None if ids_out is None else (ids_out, w_out))
            # the router's ids are always in [0, E): no validation (it would sync with the host per layer)
            return ops.moe_mxfp4(u, ids, w, L["w1_blocks"], L["w1_scales"], L["w1_bias"], L["w2_blocks"],
                                 L["w2_scales"], L["w2_bias"], swiglu_alpha=c.swiglu_alpha,
                                 swiglu_limit=c.swiglu_limit, out=out, validate_ids=False)
        ids, w = reference.router_topk(u, L["gate_w"], L["gate_b"], c.experts_per_token)
        y = reference.moe(u, ids, w, L["w1_blocks"], L["w1_scales"], L["w1_bias"], L["w2_blocks"],
                          L["w2_scales"], L["w2_bias"], swiglu_alpha=c.swiglu_alpha, swiglu_limit=c.swiglu_limit)
        return y if out is None else out.copy_(y)

