"""The thin gpt-oss model: weights in the checkpoint layout, a forward pass and generation built
from this package's public ops (``gptoss_kernels.ops``: rms_norm fused with the residual add,
linear, rope_qkv / rope_and_cache_append, attention_prefill / attention_decode, cache_append,
router_topk, moe_mxfp4) plus ``F.embedding`` / ``index_select``; sampling.py samples the tokens.

On CUDA the ops run the kernels; on CPU they run the reference. The ops take bf16 activations;
a model loaded with ``dtype=torch.float32`` (CPU, for tight comparisons in tests) calls the same
reference functions the ops call on the CPU, without the bf16 argument checks.

Decode: one token per sequence per step, every op writing into static buffers
(``_decode_buffers``: the bf16 residual stream updated in place, fp32 logits, the sampled ids),
the position / length / draw counter advanced on the device, so that the whole step (layers,
unembedding, greedy or seeded top-p sampling: sampling.py) is one CUDA graph replayed per token
with no host synchronisation; the host reads the sampled ids through a pinned ring
``decode_lookahead`` steps behind the device (stop checks). ``memory_plan`` / ``check_memory``
(memory.py): what fits one card; a request that does not raises MemoryPlanError before allocating.

Weights (``GptOss.layers[i]`` dicts and ``GptOss.weights``): names, shapes and kinds in weights.py.

KV cache (DEVELOPERS.md): per layer bf16 [B, S, nkv, d], position p in slot p % S; sliding layers
S = sliding_window (a ring), full layers S = longest prompt + max_new_tokens.

Batches in ``generate``: ``prompt_ids`` may be a list of ints / LongTensor [1, T] (returns a list of
new ids) or a list of lists / LongTensor [B, T] (returns one list per prompt). Prompts may differ
in length: they are prefilled together (chunks of at most ``prefill_chunk`` tokens packed over
sequences with cu_seqlens, each into its row of the batch cache), then all B
sequences decode together, one token each per step, each at its own position (``cache_seqlens``
per sequence). A sequence that hit a stop token stops collecting tokens; decoding ends when all
have stopped or after ``max_new_tokens``.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from . import _lib, memory, ops, reference, sampling
from .config import GptOssConfig
from .memory import MemoryPlanError
from .weights import check_weights, random_weights, weight_shapes

__all__ = ["GptOss", "GptOssConfig", "MemoryPlanError", "weight_shapes"]


def _default_device(device) -> torch.device:
    """None -> the current CUDA device when torch sees one, else the CPU."""
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


class GptOss:
    """gpt-oss for inference. Build with ``from_pretrained`` or ``from_config``."""

    #: tokens per prefill chunk (per sequence)
    prefill_chunk: int = memory.PREFILL_CHUNK

    def __init__(self, config: GptOssConfig, weights: dict, layers: list[dict], *, device=None,
                 dtype: torch.dtype = torch.bfloat16):
        self.config = config
        self.weights = weights
        self.layers = layers
        self.dtype = dtype
        self.device = weights["embedding"].device   # where the weights actually are
        self.use_cuda_graph = True
        self._fused_decode = True
        self._graph = None
        self._state = None   # the KV cache and captured decode step, reused by generate calls of the same shape
        check_weights(config, weights, layers, dtype)

    @property
    def fused_decode(self) -> bool:
        """The step's fused ops (QKV + RoPE + cache append; residual add + RMSNorm + router; MoE +
        residual add + RMSNorm). False runs the separate ops, with the same results: for measuring
        what the fusions buy. Changing it drops the captured decode step (captured anew)."""
        return self._fused_decode

    @fused_decode.setter
    def fused_decode(self, value: bool) -> None:
        if bool(value) != self._fused_decode:
            self._fused_decode = bool(value)
            if self._state is not None:
                self._state["steps"].clear()
            self._graph = None

    # ------------------------------------------------------------------------------------------
    # construction
    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path, device=None, dtype: torch.dtype = torch.bfloat16, *, progress: bool = True) -> "GptOss":
        """Load a checkpoint folder (HF MXFP4, HF bf16, or original layout; see loader.py).
        device None: CUDA when available, else CPU. dtype: bfloat16 (float32 for CPU checks)."""
        from .loader import load_checkpoint

        device = _default_device(device)
        config, weights, layers = load_checkpoint(path, device=device, dtype=dtype, progress=progress)
        return cls(config, weights, layers, device=device, dtype=dtype)

    @classmethod
    def from_config(cls, config: GptOssConfig, device=None, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> "GptOss":
        """Random weights generated on ``device`` (for benchmarks and tests; ``weights.random_weights``:
        MXFP4 bytes drawn directly, no bf16 copy of the experts ever exists)."""
        device = _default_device(device)
        weights, layers = random_weights(config, device, seed, dtype)
        return cls(config, weights, layers, device=device, dtype=dtype)

    def to(self, device) -> "GptOss":
        """A copy of this model on another device (same dtype); the original is untouched."""
        mv = lambda t: t.to(device)  # noqa: E731
        return GptOss(self.config, {n: mv(t) for n, t in self.weights.items()},
                      [{n: mv(t) for n, t in L.items()} for L in self.layers], device=device, dtype=self.dtype)

    # ------------------------------------------------------------------------------------------
    # memory: the plan (memory.py) on the model, and the check of a request on its device
    # ------------------------------------------------------------------------------------------
    workspace_bytes = staticmethod(memory.workspace_bytes)
    kv_cache_bytes = staticmethod(memory.kv_cache_bytes)
    memory_plan = staticmethod(memory.memory_plan)
    format_memory_plan = staticmethod(memory.format_memory_plan)

    def plan_request(self, batch: int, max_len: int, available_bytes: float | None = None) -> dict:
        """The memory plan of a generate call (batch sequences of up to max_len positions, the
        full-layer cache rounded up to cache_granularity) on this model's device.
        available_bytes: memory beside the loaded weights; None: on CUDA what is still free
        (driver-free + torch-cached + this model's current cache), on the CPU unlimited."""
        if available_bytes is None:
            held = 0
            if self._state is not None:
                held = sum(t.numel() * t.element_size() for kv in self._state["caches"] for t in kv)
            available_bytes = memory.free_bytes(self.device, held)
        return memory.plan_request(self.config, batch, self._cache_len(max_len), available_bytes,
                                   weights_bytes=self.weights_bytes(), prefill_chunk=self.prefill_chunk,
                                   weight_dtype_bytes=torch.empty((), dtype=self.dtype).element_size())

    def check_memory(self, batch: int, max_len: int, available_bytes: float | None = None) -> dict:
        """plan_request, raising MemoryPlanError (with the largest context that would fit) when
        the request does not fit."""
        plan = self.plan_request(batch, max_len, available_bytes)
        return memory.check_request(plan, batch, max_len, self.device)

    def weights_bytes(self) -> int:
        ts = list(self.weights.values()) + [t for L in self.layers for t in L.values()]
        return sum(t.numel() * t.element_size() for t in ts)

    # ------------------------------------------------------------------------------------------
    # op dispatch: bf16 -> public ops; float32 (CPU tests) -> the same reference math
    # Every helper takes optional out= buffers: the decode step passes static ones (CUDA graph).
    # ------------------------------------------------------------------------------------------
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

    def _qkv(self, i, a):
        L = self.layers[i]
        return self._linear(a, L["qkv_w"], L["qkv_b"])

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

    def _qkv_rope_append(self, i, a, seq_ids, positions, kc, vc, q_out=None, qkv_out=None):
        """Decode: the QKV projection, q rotated (returned), the rotated k and the v written into the
        cache. bf16: one fused kernel for T <= 64 (ops.qkv_rope_append); otherwise the projection
        (into qkv_out) and the fused RoPE + append."""
        c, L = self.config, self.layers[i]
        heads = dict(num_q_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads, head_dim=c.head_dim,
                     rope=c.yarn)
        if self._bf16:
            if self.fused_decode and a.shape[0] <= ops.dense.LINEAR_MAX_TOKENS:
                return ops.qkv_rope_append(a, L["qkv_w"], L["qkv_b"], seq_ids, positions, kc, vc, q_out=q_out, **heads)
            qkv = self._linear(a, L["qkv_w"], L["qkv_b"], out=qkv_out)
            return ops.rope_and_cache_append(qkv, seq_ids, positions, kc, vc, q_out=q_out, **heads)
        q, k, v = self._rope(self._linear(a, L["qkv_w"], L["qkv_b"], out=qkv_out), positions)
        self._cache_append(k, v, kc, vc, seq_ids, positions)
        return q if q_out is None else q_out.copy_(q)

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

    def _mlp(self, L, p, x, norm_w, ids_out=None, w_out=None, out=None, residual_out=None, moe_out=None):
        """The MLP half of a block and the next norm, from the attention output p and the residual
        stream x: h = x + p, u = RMSNorm(h), h2 = h + MoE(u); returns (RMSNorm(h2) * norm_w, h2).
        bf16 with fused_decode: two ops (the add + norm inside the router's kernel, the next add +
        norm inside the MoE's combine kernel, where the shapes allow; the same results).
        out: the normed activations' buffer (also u's); residual_out: the residual stream's (may be
        x); moe_out: the MoE output's buffer when the ops run separately."""
        c = self.config
        if self._bf16 and self.fused_decode:
            u, h, ids, w = ops.add_rms_norm_router_topk(p, x, L["mlp_norm"], L["gate_w"], L["gate_b"],
                                                        c.experts_per_token, eps=c.rms_norm_eps, norm_out=out,
                                                        residual_out=residual_out,
                                                        out=None if ids_out is None else (ids_out, w_out))
            # the router's ids are always in [0, E): no validation (it would sync with the host per layer)
            return ops.moe_mxfp4_add_rms_norm(u, ids, w, L["w1_blocks"], L["w1_scales"], L["w1_bias"], L["w2_blocks"],
                                              L["w2_scales"], L["w2_bias"], h, norm_w, eps=c.rms_norm_eps,
                                              swiglu_alpha=c.swiglu_alpha, swiglu_limit=c.swiglu_limit,
                                              norm_out=out, residual_out=residual_out, validate_ids=False)
        u, h = self._norm(p, L["mlp_norm"], residual=x, out=out, residual_out=residual_out)
        m = self._moe(L, u, ids_out, w_out, out=moe_out)
        return self._norm(m, norm_w, residual=h, out=out, residual_out=residual_out)

    # ------------------------------------------------------------------------------------------
    # forward
    # ------------------------------------------------------------------------------------------
    def _layers(self, x, attend, buf: dict | None = None):
        """All blocks (spec §4.2-4.3) on the residual stream x [T, H]; attend(i, a) -> [T, nq, d]
        from the attention-normed hidden states a [T, H] (the QKV projection is attend's: the
        decode step fuses it with RoPE and the cache append).
        Every residual add is fused with the norm that follows it (attention-in of the next layer,
        MoE-in, the final norm). Returns the final-normed hidden states [T, H].

        buf: static buffers (the decode step): x is then updated in place and every op writes into
        its buffer (a, qkv, proj, ids, wts, moe), so the step allocates nothing of its own."""
        g = (lambda name: None) if buf is None else buf.get
        inplace = buf is not None
        T, n = x.shape[0], self.config.num_hidden_layers
        a = self._norm(x, self.layers[0]["attn_norm"], out=g("a"))
        for i in range(n):
            L = self.layers[i]
            o = attend(i, a)
            p = self._linear(o.reshape(T, -1), L["out_w"], L["out_b"], out=g("proj"))
            w_next = self.layers[i + 1]["attn_norm"] if i + 1 < n else self.weights["norm"]
            a, x = self._mlp(L, p, x, w_next, g("ids"), g("wts"), out=g("a"), residual_out=x if inplace else None,
                             moe_out=g("moe"))
        return a

    def _unembed(self, h, out=None):
        """Final-normed hidden states -> float32 logits."""
        return self._linear(h, self.weights["unembedding"], out=out, out_dtype=torch.float32).float()

    def _ids_tensor(self, input_ids) -> torch.Tensor:
        ids = torch.as_tensor(input_ids, device=self.device)
        if ids.dtype not in (torch.int64, torch.int32) or ids.dim() != 2:
            raise ValueError(f"input_ids must be an integer tensor [B, T], got {ids.dtype} {tuple(ids.shape)}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size):
            raise ValueError(f"input_ids must be in [0, {self.config.vocab_size}), got values in "
                             f"[{int(ids.min())}, {int(ids.max())}]")
        return ids.long()

    @torch.inference_mode()
    def forward(self, input_ids) -> torch.Tensor:
        """input_ids int [B, T] -> float32 logits [B, T, V] for every position (no cache)."""
        ids = self._ids_tensor(input_ids)
        B, T = ids.shape
        x = F.embedding(ids.reshape(-1), self.weights["embedding"])
        positions = torch.arange(T, dtype=torch.int32, device=self.device).repeat(B)
        cu = torch.arange(0, (B + 1) * T, T, dtype=torch.int32, device=self.device)

        def attend(i, a):
            q, k, v = self._rope(self._qkv(i, a), positions)
            return self._attend_packed(i, q, k, v, cu)

        return self._unembed(self._layers(x, attend)).reshape(B, T, -1)

    __call__ = forward

    # ------------------------------------------------------------------------------------------
    # generation
    # ------------------------------------------------------------------------------------------
    def new_cache(self, batch: int, max_len: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Zeroed KV cache: per layer (k, v) [batch, S, nkv, d]; S = window (ring) or max_len."""
        c = self.config
        caches = []
        for i in range(c.num_hidden_layers):
            S = c.sliding_window if c.is_sliding(i) else max_len
            shape = (batch, S, c.num_key_value_heads, c.head_dim)
            caches.append((torch.zeros(shape, dtype=self.dtype, device=self.device),
                           torch.zeros(shape, dtype=self.dtype, device=self.device)))
        return caches

    def _prefill(self, prompts: list[list[int]], caches) -> torch.Tensor:
        """Prefill every prompt into its row of the cache -> float32 logits [B, V] of each last token.

        Chunks of at most ``prefill_chunk`` tokens in total, packed over sequences (cu_seqlens):
        each sequence continues from where its previous chunk stopped (cache_seqlens). Per chunk
        the host builds the chunk's index tensors once (one upload each); the layers then run
        device work only (no host sync per layer on CUDA: attention_prefill reads the chunk's
        offsets on the device, the MoE skips its id validation)."""
        B, lens = len(prompts), [len(p) for p in prompts]
        chunk = max(1, int(self.prefill_chunk))
        dev = self.device
        done = [0] * B
        rows: list[torch.Tensor | None] = [None] * B
        while any(done[b] < lens[b] for b in range(B)):
            take, budget = [0] * B, chunk
            for b in range(B):
                take[b] = min(lens[b] - done[b], budget)
                budget -= take[b]
            cu = [0]
            for b in range(B):
                cu.append(cu[-1] + take[b])
            p0 = list(done)
            ids = torch.tensor([t for b in range(B) for t in prompts[b][p0[b]:p0[b] + take[b]]], device=dev)
            pos_l = [p for b in range(B) for p in range(p0[b], p0[b] + take[b])]
            positions = torch.tensor(pos_l, dtype=torch.int32, device=dev)
            seq_ids = torch.tensor([b for b in range(B) for _ in range(take[b])], dtype=torch.int32, device=dev)
            cu_t = torch.tensor(cu, dtype=torch.int32, device=dev)
            p0_t = torch.tensor(p0, dtype=torch.int32, device=dev)
            keep: dict[int, torch.Tensor | None] = {}   # cache length S -> rows a ring of S keeps (once per chunk)

            def kept(S: int):
                if S not in keep:
                    idx = [cu[b] + j for b in range(B) for j in range(take[b]) if p0[b] + j >= p0[b] + take[b] - S]
                    keep[S] = None if len(idx) == cu[-1] else torch.tensor(idx, dtype=torch.long, device=dev)
                return keep[S]

            def attend(i, a):
                q, k, v = self._rope(self._qkv(i, a), positions)
                kc, vc = caches[i]
                o = self._attend_chunk(i, q, k, v, kc, vc, cu, p0, cu_t, p0_t)
                sel = kept(kc.shape[1])
                if sel is None:
                    self._cache_append(k, v, kc, vc, seq_ids, positions)
                else:   # a ring keeps only the last S positions of each chunk
                    self._cache_append(k[sel].contiguous(), v[sel].contiguous(), kc, vc, seq_ids[sel], positions[sel])
                return o

            x = F.embedding(ids, self.weights["embedding"])
            h = self._layers(x, attend)
            last = [b for b in range(B) if take[b] and p0[b] + take[b] == lens[b]]
            if last:
                lg = self._unembed(h[torch.tensor([cu[b + 1] - 1 for b in last], device=dev)])
                for j, b in enumerate(last):
                    rows[b] = lg[j]
            for b in range(B):
                done[b] += take[b]
        return torch.stack(rows)

    # ---- the decode step: static buffers, every op writes in place, one CUDA graph ------------
    def _decode_buffers(self, batch: int) -> dict:
        """Static tensors of the decode step for `batch` sequences (see _decode_step)."""
        c, dev, dt = self.config, self.device, self.dtype
        B, H, V, k = batch, c.hidden_size, c.vocab_size, c.experts_per_token
        z = lambda *shape, dtype=dt: torch.zeros(shape, dtype=dtype, device=dev)  # noqa: E731
        return {
            "tok": z(B, dtype=torch.int64),          # in: token fed at `pos`; out: the sampled next token
            "pos": z(B, dtype=torch.int32),          # position of `tok` (advanced by the step)
            "seqlens": z(B, dtype=torch.int32),      # pos + 1 (cache length incl. the new token)
            "seq_ids": torch.arange(B, dtype=torch.int32, device=dev),
            "x": z(B, H), "a": z(B, H), "qkv": z(B, c.qkv_dim), "q": z(B, c.num_attention_heads, c.head_dim),
            "o": z(B, c.num_attention_heads, c.head_dim), "proj": z(B, H), "moe": z(B, H),
            "ids": z(B, k, dtype=torch.int32), "wts": z(B, k, dtype=torch.float32),
            "logits": z(B, V, dtype=torch.float32),
            **sampling.sampling_buffers(B, V, dev),     # the sampler's state (sampling.py)
        }

    def _decode_step(self, st: dict, mode: str) -> None:
        """One token per sequence, all in place on st's buffers (device work only: capturable):
        embed buf.tok at buf.pos, 36 blocks (fused RoPE + KV append, decode attention, fused
        residual norms), unembedding into buf.logits (fp32), sample into buf.tok, advance pos and
        seqlens."""
        b, caches = st["buf"], st["caches"]
        torch.index_select(self.weights["embedding"], 0, b["tok"], out=b["x"])

        def attend(i, a):
            kc, vc = caches[i]
            q = self._qkv_rope_append(i, a, b["seq_ids"], b["pos"], kc, vc, q_out=b["q"], qkv_out=b["qkv"])
            return self._attend_decode(i, q, kc, vc, b["seqlens"], out=b["o"])

        h = self._layers(b["x"], attend, buf=b)
        self._unembed(h, out=b["logits"])
        sampling.sample_into(b["logits"], mode, b)
        b["pos"].add_(1)
        b["seqlens"].add_(1)

    def _on_device(self):
        """The model's CUDA device made current (graph capture and replay, the token ring's events
        and the ops' current streams all follow torch's current device), or nothing on the CPU."""
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    @staticmethod
    def _normalize_prompts(prompt_ids) -> tuple[list[list[int]], bool]:
        if isinstance(prompt_ids, torch.Tensor):
            if prompt_ids.dim() == 1:
                return [prompt_ids.tolist()], True
            if prompt_ids.dim() != 2:
                raise ValueError(f"prompt_ids tensor must be [T] or [B, T], got {tuple(prompt_ids.shape)}")
            return prompt_ids.tolist(), prompt_ids.shape[0] == 1
        prompt_ids = list(prompt_ids)
        if prompt_ids and all(isinstance(p, (list, tuple, torch.Tensor)) for p in prompt_ids):
            return [list(map(int, p)) for p in prompt_ids], False
        return [list(map(int, prompt_ids))], True

    #: decode steps queued ahead of the one whose tokens the host reads (stop checks): the GPU
    #: never waits for the host between steps; a stop costs at most this many extra steps.
    decode_lookahead: int = 2

    def stream(self, prompt_ids, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
               stop_token_ids: Sequence[int] | None = None, seed: int | None = None) -> Iterator[list[int | None]]:
        """Yield, per step, the new token of every sequence (None once a sequence has stopped).
        A stop token is yielded, then that sequence stops.

        Sampling (temperature > 0) is seeded by `seed` (None: drawn from torch's default CPU
        generator); the same seed gives the same draws on every device for the same logits."""
        prompts, _ = self._normalize_prompts(prompt_ids)
        c = self.config
        if max_new_tokens <= 0:
            return
        for j, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {j} is empty")
            if min(p) < 0 or max(p) >= c.vocab_size:
                raise ValueError(f"prompt {j} has token ids outside [0, {c.vocab_size})")
        B, lens = len(prompts), [len(p) for p in prompts]
        max_len = max(lens) + max_new_tokens
        if max_len > c.max_position_embeddings:
            warnings.warn(f"generating up to position {max_len} > max_position_embeddings {c.max_position_embeddings}")
        stops = set(stop_token_ids or ())
        mode = sampling.sample_mode(temperature, top_p)
        if seed is None:
            seed = int(torch.randint(0, 2 ** 31 - 1, ()))

        # inference_mode only around the compute: a generator must not leave it set while suspended
        with torch.inference_mode(), self._on_device():
            st = self._decode_state(B, max_len)
            b = st["buf"]
            logits = self._prefill(prompts, st["caches"])
            sampling.set_params(b, temperature, top_p, seed)
            sampling.sample_into(logits, mode, b)
            b["pos"].copy_(torch.tensor(lens, dtype=torch.int32))
            b["seqlens"].copy_(b["pos"] + 1)
            step = self._step_fn(st, mode)
            ring = _TokenRing(b["tok"], max(0, int(self.decode_lookahead)))
            ring.push()
        queued = 0            # decode steps enqueued (token n comes out of step n)
        done = [False] * B
        for n in range(max_new_tokens):
            with torch.inference_mode(), self._on_device():
                while queued < min(n + ring.depth, max_new_tokens - 1):
                    step()
                    ring.push()
                    queued += 1
                host = ring.pop()            # waits for token n only (the steps after it keep running)
            out = []
            for j in range(B):
                if done[j]:
                    out.append(None)
                    continue
                out.append(host[j])
                if host[j] in stops:
                    done[j] = True
            yield out
            if all(done):
                return

    #: full-layer cache length is rounded up to this, so that generate calls of similar lengths
    #: reuse one cache and one captured CUDA graph
    cache_granularity: int = 256

    def _cache_len(self, max_len: int) -> int:
        g = max(1, int(self.cache_granularity))
        return -(-max_len // g) * g

    def _decode_state(self, batch: int, max_len: int) -> dict:
        """The cache, static buffers and captured decode steps for `batch` sequences of up to
        `max_len` positions. Reused across calls with the same batch and rounded length: stale
        entries are never read (a query only sees positions of its own sequence written in this
        call). On CUDA a request that does not fit the free memory raises MemoryPlanError before
        anything is allocated."""
        S = self._cache_len(max_len)
        st = self._state
        if st is not None and st["B"] == batch and st["S"] == S:
            return st
        self._state = self._graph = None   # free the old cache first
        if self.device.type == "cuda":
            self.check_memory(batch, max_len)
        self._state = {"B": batch, "S": S, "caches": self.new_cache(batch, S), "steps": {},
                       "buf": self._decode_buffers(batch)}
        return self._state

    def prepare_decode(self, batch: int, max_len: int, temperature: float = 0.0, top_p: float = 1.0) -> None:
        """Allocate the cache and capture the decode step for `batch` sequences of up to `max_len`
        positions ahead of a generate call (so that its time to first token holds no capture). The
        capture's warm-up step writes slot 0 of each cache row, which every prefill rewrites."""
        with torch.inference_mode(), self._on_device():
            st = self._decode_state(batch, max_len)
            mode = sampling.sample_mode(temperature, top_p)
            if mode not in st["steps"]:
                b = st["buf"]
                b["pos"].zero_()
                b["seqlens"].fill_(1)
                self._step_fn(st, mode)

    def release_cache(self) -> None:
        """Free the KV cache and the captured decode graph kept between generate calls."""
        self._state = self._graph = None

    def _step_fn(self, st: dict, mode: str):
        """The decode step for a sampling mode: a CUDA graph replay on CUDA (captured once per
        state and mode), else the eager step. Both update st's buffers in place."""
        if mode in st["steps"]:
            return st["steps"][mode]
        eager = lambda: self._decode_step(st, mode)  # noqa: E731
        fn = eager
        if self.device.type == "cuda" and self.use_cuda_graph:
            if not _lib.cuda_available() or not self._bf16:
                # the reference path reads tensors on the host: not capturable
                warnings.warn(f"GptOss: decode runs eagerly (no CUDA graph): "
                              f"{_lib.kernels_error() or 'float32 model uses the reference'}", RuntimeWarning)
            else:
                graph = self._capture(st, mode)
                if graph is not None:
                    fn = graph.replay
                    self._graph = graph
        st["steps"][mode] = fn
        return fn

    def _capture(self, st: dict, mode: str):
        """Capture one decode step in a CUDA graph without changing the state: the warm-up step
        runs for real (it writes the cache slot the first real step rewrites with the same
        values), so the small state it advances is saved and restored."""
        b = st["buf"]
        saved = {n: b[n].clone() for n in ("tok", "pos", "seqlens", "counter")}
        try:
            s = torch.cuda.Stream(self.device)
            s.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(s):   # warm-up outside the capture: lazy inits, allocator pools
                self._decode_step(st, mode)
            torch.cuda.current_stream(self.device).wait_stream(s)
            for n, t in saved.items():
                b[n].copy_(t)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._decode_step(st, mode)
        except Exception as e:  # an op that syncs with the host (e.g. a reference fallback) cannot be captured
            warnings.warn(f"GptOss: decode step not captured in a CUDA graph ({type(e).__name__}: {e}); "
                          f"running it eagerly", RuntimeWarning)
            torch.cuda.synchronize(self.device)
            graph = None
        for n, t in saved.items():
            b[n].copy_(t)
        return graph

    def generate(self, prompt_ids, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 stop_token_ids: Sequence[int] | None = None, seed: int | None = None):
        """New token ids (a stop token, if hit, is included as the last id). For a batch of
        prompts (list of lists or [B, T] with B > 1) a list of lists. See the module docstring."""
        prompts, single = self._normalize_prompts(prompt_ids)
        out = [[] for _ in prompts]
        for toks in self.stream(prompts, max_new_tokens, temperature, top_p, stop_token_ids, seed):
            for b, t in enumerate(toks):
                if t is not None:
                    out[b].append(t)
        return out[0] if single else out


class _TokenRing:
    """Sampled ids read back without stalling the device: each push copies the token buffer into
    a slot of a pinned host ring (non-blocking, stream-ordered) and records an event; pop waits for
    the oldest slot's event only. depth + 1 slots: at most depth steps run ahead of the reader."""

    def __init__(self, src: torch.Tensor, depth: int):
        self.src, self.depth = src, depth
        self.cuda = src.is_cuda
        R = depth + 1
        self.host = torch.empty((R,) + tuple(src.shape), dtype=src.dtype, pin_memory=self.cuda)
        self.events = [torch.cuda.Event() for _ in range(R)] if self.cuda else None
        self.w = self.r = 0

    def push(self) -> None:
        s = self.w % len(self.host)
        assert self.w - self.r < len(self.host), "token ring overrun"
        self.host[s].copy_(self.src, non_blocking=self.cuda)
        if self.cuda:
            self.events[s].record()
        self.w += 1

    def pop(self) -> list[int]:
        assert self.r < self.w, "token ring underrun"
        s = self.r % len(self.host)
        if self.cuda:
            self.events[s].synchronize()
        self.r += 1
        return self.host[s].tolist()
