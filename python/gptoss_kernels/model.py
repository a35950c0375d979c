"""The thin gpt-oss model: weights in the checkpoint layout, a forward pass and generation built
from this package's public ops (``gptoss_kernels.ops``) plus ``reference.rms_norm`` and plain torch
(``F.linear`` for the projections, ``F.embedding``).

On CUDA the ops run the kernels; on CPU they run the reference. The ops take bf16 activations;
a model loaded with ``dtype=torch.float32`` (CPU, for tight comparisons in tests) calls the same
reference functions the ops call on the CPU, without the bf16 argument checks.

Weights (``GptOss.layers[i]`` dict, names after the original checkpoint):
  attn_norm [H], qkv_w [(nq+2nkv)d, H], qkv_b, sinks [nq], out_w [H, nq d], out_b [H],
  mlp_norm [H], gate_w [E, H], gate_b [E],
  w1_blocks u8 [E, 2I, H/32, 16], w1_scales u8 [E, 2I, H/32], w1_bias [E, 2I] (gate/linear interleaved),
  w2_blocks u8 [E, H, I/32, 16], w2_scales u8 [E, H, I/32], w2_bias [E, H];
globals (``GptOss.weights``): embedding [V, H], norm [H], unembedding [V, H].

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

import math
import warnings
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from . import _lib, ops, reference
from .config import GptOssConfig

__all__ = ["GptOss", "GptOssConfig", "weight_shapes"]

_FLOAT, _U8 = "float", "uint8"


def weight_shapes(cfg: GptOssConfig) -> tuple[dict, list[dict]]:
    """(globals, per-layer) dicts name -> (shape, kind), kind "float" (model dtype) or "uint8"."""
    H, V, E, I = cfg.hidden_size, cfg.vocab_size, cfg.num_experts, cfg.intermediate_size
    nq, d = cfg.num_attention_heads, cfg.head_dim
    g = {"embedding": ((V, H), _FLOAT), "norm": ((H,), _FLOAT), "unembedding": ((V, H), _FLOAT)}
    layer = {
        "attn_norm": ((H,), _FLOAT), "qkv_w": ((cfg.qkv_dim, H), _FLOAT), "qkv_b": ((cfg.qkv_dim,), _FLOAT),
        "sinks": ((nq,), _FLOAT), "out_w": ((H, nq * d), _FLOAT), "out_b": ((H,), _FLOAT),
        "mlp_norm": ((H,), _FLOAT), "gate_w": ((E, H), _FLOAT), "gate_b": ((E,), _FLOAT),
        "w1_blocks": ((E, 2 * I, H // 32, 16), _U8), "w1_scales": ((E, 2 * I, H // 32), _U8),
        "w1_bias": ((E, 2 * I), _FLOAT),
        "w2_blocks": ((E, H, I // 32, 16), _U8), "w2_scales": ((E, H, I // 32), _U8), "w2_bias": ((E, H), _FLOAT),
    }
    return g, [dict(layer) for _ in range(cfg.num_hidden_layers)]


def _default_device(device) -> torch.device:
    """None -> the current CUDA device when torch sees one, else the CPU."""
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _nbytes(shape, kind, float_bytes):
    return math.prod(shape) * (1 if kind == _U8 else float_bytes)


class GptOss:
    """gpt-oss for inference. Build with ``from_pretrained`` or ``from_config``."""

    #: tokens per prefill chunk (per sequence)
    prefill_chunk: int = 2048

    def __init__(self, config: GptOssConfig, weights: dict, layers: list[dict], *, device=None,
                 dtype: torch.dtype = torch.bfloat16):
        self.config = config
        self.weights = weights
        self.layers = layers
        self.dtype = dtype
        self.device = weights["embedding"].device   # where the weights actually are
        self.use_cuda_graph = True
        self._graph = None
        self._state = None   # the KV cache and captured decode step, reused by generate calls of the same shape
        self._check_weights()

    # ------------------------------------------------------------------------------------------
    # construction
    # ------------------------------------------------------------------------------------------
    def _check_weights(self):
        gshapes, lshapes = weight_shapes(self.config)
        items = [(n, self.weights.get(n), s) for n, s in gshapes.items()]
        for i, spec in enumerate(lshapes):
            items += [(f"layers[{i}].{n}", self.layers[i].get(n), s) for n, s in spec.items()]
        for name, t, (shape, kind) in items:
            if t is None:
                raise ValueError(f"GptOss: weight {name} is missing")
            want = torch.uint8 if kind == _U8 else self.dtype
            if tuple(t.shape) != tuple(shape) or t.dtype != want:
                raise ValueError(f"GptOss: weight {name} is {t.dtype} {tuple(t.shape)}, expected {want} {tuple(shape)}")

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
        """Random weights generated on ``device`` (for benchmarks and tests).

        MXFP4 bytes are drawn directly with ``torch.randint`` (uniform codes) with scale bytes in
        118..122 (2^-9..2^-5, giving activations of a sane size); no bf16 copy of the experts ever
        exists. Float weights ~ N(0, 1/fan_in), norms ~ 1 + N(0, 0.1^2), biases and sinks small.
        """
        device = _default_device(device)
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)

        def rnd(shape, std, mean=0.0):
            t = torch.randn(shape, dtype=dtype, device=device, generator=gen)
            return t.mul_(std).add_(mean) if mean else t.mul_(std)

        def make(name, shape, kind):
            if kind == _U8:
                lo, hi = (118, 123) if name.endswith("scales") else (0, 256)
                return torch.randint(lo, hi, shape, dtype=torch.uint8, device=device, generator=gen)
            if name in ("norm", "attn_norm", "mlp_norm"):
                return rnd(shape, 0.1, 1.0)
            if name == "sinks":
                return rnd(shape, 1.0)
            if name.endswith("_b") or name.endswith("bias"):
                return rnd(shape, 0.02)
            return rnd(shape, shape[-1] ** -0.5)

        gshapes, lshapes = weight_shapes(config)
        weights = {n: make(n, s, k) for n, (s, k) in gshapes.items()}
        layers = [{n: make(n, s, k) for n, (s, k) in spec.items()} for spec in lshapes]
        return cls(config, weights, layers, device=device, dtype=dtype)

    def to(self, device) -> "GptOss":
        """A copy of this model on another device (same dtype); the original is untouched."""
        mv = lambda t: t.to(device)  # noqa: E731
        return GptOss(self.config, {n: mv(t) for n, t in self.weights.items()},
                      [{n: mv(t) for n, t in L.items()} for L in self.layers], device=device, dtype=self.dtype)

    # ------------------------------------------------------------------------------------------
    # memory
    # ------------------------------------------------------------------------------------------
    @staticmethod
    def memory_plan(config: GptOssConfig, gpu_bytes: float = 80e9, batch: int = 1, *,
                    reserve_bytes: float = 3e9, kv_dtype_bytes: int = 2, weight_dtype_bytes: int = 2) -> dict:
        """How many KV-cache tokens fit on a card, computed without allocating anything.

        weights_bytes: every weight as this class stores it (MXFP4 experts, the rest bf16; equals
        the HF checkpoint's total_size). kv_bytes_per_token: K+V of one position over all full
        layers (what grows with the context). sliding_kv_bytes: the fixed ring buffers of the
        sliding layers for ``batch`` sequences. reserve_bytes: CUDA context, activations, prefill
        chunk workspace and allocator slack (default 3 GB). tokens_fit: positions (summed over the
        batch) that fit in the rest; tokens_per_sequence = tokens_fit // batch, also capped at
        max_position_embeddings as ``context_per_sequence``.
        """
        gshapes, lshapes = weight_shapes(config)
        weights_bytes = sum(_nbytes(s, k, weight_dtype_bytes) for s, k in gshapes.values())
        weights_bytes += sum(_nbytes(s, k, weight_dtype_bytes) for spec in lshapes for s, k in spec.values())
        per_layer_token = 2 * config.num_key_value_heads * config.head_dim * kv_dtype_bytes
        n_sliding = sum(config.is_sliding(i) for i in range(config.num_hidden_layers))
        n_full = config.num_hidden_layers - n_sliding
        kv_per_token = n_full * per_layer_token
        sliding = n_sliding * batch * (config.sliding_window or 0) * per_layer_token
        free = gpu_bytes - weights_bytes - reserve_bytes - sliding
        tokens_fit = max(0, int(free // kv_per_token)) if kv_per_token else (1 << 62 if free >= 0 else 0)
        per_seq = tokens_fit // batch
        return {"gpu_bytes": int(gpu_bytes), "weights_bytes": int(weights_bytes), "reserve_bytes": int(reserve_bytes),
                "kv_bytes_per_token": int(kv_per_token), "sliding_kv_bytes": int(sliding),
                "full_layers": n_full, "sliding_layers": n_sliding, "batch": batch,
                "tokens_fit": tokens_fit, "tokens_per_sequence": per_seq,
                "context_per_sequence": min(per_seq, config.max_position_embeddings), "fits": free >= 0}

    def weights_bytes(self) -> int:
        ts = list(self.weights.values()) + [t for L in self.layers for t in L.values()]
        return sum(t.numel() * t.element_size() for t in ts)

    # ------------------------------------------------------------------------------------------
    # op dispatch: bf16 -> public ops; float32 (CPU tests) -> the same reference math
    # ------------------------------------------------------------------------------------------
    @property
    def _bf16(self) -> bool:
        return self.dtype == torch.bfloat16

    def _rope(self, qkv, positions):
        c = self.config
        if self._bf16:
            return ops.rope_qkv(qkv, positions, num_q_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads,
                                head_dim=c.head_dim, rope=c.yarn)
        T, nq, nkv, d = qkv.shape[0], c.num_attention_heads, c.num_key_value_heads, c.head_dim
        q = qkv[:, : nq * d].reshape(T, nq, d)
        k = qkv[:, nq * d: (nq + nkv) * d].reshape(T, nkv, d)
        v = qkv[:, (nq + nkv) * d:].reshape(T, nkv, d)
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

    def _attend_decode(self, i, q, kc, vc, seqlens):
        W, sinks = self.config.window(i), self.layers[i]["sinks"]
        if self._bf16:
            return ops.attention_decode(q, kc, vc, seqlens, sinks, sliding_window=W, sm_scale=self.config.sm_scale)
        return reference.attention_decode(q, kc, vc, seqlens, sinks, sliding_window=W, sm_scale=self.config.sm_scale)

    def _moe(self, L, u):
        c = self.config
        if self._bf16:
            ids, w = ops.router_topk(u, L["gate_w"], L["gate_b"], c.experts_per_token)
            return ops.moe_mxfp4(u, ids, w, L["w1_blocks"], L["w1_scales"], L["w1_bias"], L["w2_blocks"],
                                 L["w2_scales"], L["w2_bias"], swiglu_alpha=c.swiglu_alpha, swiglu_limit=c.swiglu_limit)
        ids, w = reference.router_topk(u, L["gate_w"], L["gate_b"], c.experts_per_token)
        return reference.moe(u, ids, w, L["w1_blocks"], L["w1_scales"], L["w1_bias"], L["w2_blocks"],
                             L["w2_scales"], L["w2_bias"], swiglu_alpha=c.swiglu_alpha, swiglu_limit=c.swiglu_limit)

    # ------------------------------------------------------------------------------------------
    # forward
    # ------------------------------------------------------------------------------------------
    def _block(self, i, x, positions, attend):
        """Block i on hidden states x [T, H] (spec §4.2-4.3); attend(i, q, k, v) -> [T, nq, d]."""
        L, eps = self.layers[i], self.config.rms_norm_eps
        a = reference.rms_norm(x, L["attn_norm"], eps)
        q, k, v = self._rope(F.linear(a, L["qkv_w"], L["qkv_b"]), positions)
        o = attend(i, q, k, v)
        x = x + F.linear(o.reshape(x.shape[0], -1), L["out_w"], L["out_b"])
        u = reference.rms_norm(x, L["mlp_norm"], eps)
        return x + self._moe(L, u)

    def _logits(self, x):
        h = reference.rms_norm(x, self.weights["norm"], self.config.rms_norm_eps)
        return F.linear(h, self.weights["unembedding"]).float()

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
        attend = lambda i, q, k, v: self._attend_packed(i, q, k, v, cu)  # noqa: E731
        for i in range(self.config.num_hidden_layers):
            x = self._block(i, x, positions, attend)
        return self._logits(x).reshape(B, T, -1)

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
        each sequence continues from where its previous chunk stopped (cache_seqlens)."""
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
            keep: dict[int, torch.Tensor | None] = {}   # cache length S -> rows a ring of S keeps

            def kept(S: int):
                if S not in keep:
                    idx = [cu[b] + j for b in range(B) for j in range(take[b]) if p0[b] + j >= p0[b] + take[b] - S]
                    keep[S] = None if len(idx) == cu[-1] else torch.tensor(idx, dtype=torch.long, device=dev)
                return keep[S]

            def attend(i, q, k, v):
                kc, vc = caches[i]
                o = self._attend_chunk(i, q, k, v, kc, vc, cu, p0, cu_t, p0_t)
                sel = kept(kc.shape[1])
                if sel is None:
                    self._cache_append(k, v, kc, vc, seq_ids, positions)
                else:   # a ring keeps only the last S positions of each chunk
                    self._cache_append(k[sel].contiguous(), v[sel].contiguous(), kc, vc, seq_ids[sel], positions[sel])
                return o

            x = F.embedding(ids, self.weights["embedding"])
            for i in range(self.config.num_hidden_layers):
                x = self._block(i, x, positions, attend)
            last = [b for b in range(B) if take[b] and p0[b] + take[b] == lens[b]]
            if last:
                lg = self._logits(x[torch.tensor([cu[b + 1] - 1 for b in last], device=dev)])
                for j, b in enumerate(last):
                    rows[b] = lg[j]
            for b in range(B):
                done[b] += take[b]
        return torch.stack(rows)

    def _decode_step(self, tokens: torch.Tensor, positions: torch.Tensor, seq_ids: torch.Tensor, caches) -> torch.Tensor:
        """tokens int64 [B] at positions int32 [B] -> float32 logits [B, V]; appends to the cache.
        Device-only work (capturable in a CUDA graph when the ops are)."""
        x = F.embedding(tokens, self.weights["embedding"])
        seqlens = positions + 1

        def attend(i, q, k, v):
            kc, vc = caches[i]
            self._cache_append(k, v, kc, vc, seq_ids, positions)
            return self._attend_decode(i, q, kc, vc, seqlens)

        for i in range(self.config.num_hidden_layers):
            x = self._block(i, x, positions, attend)
        return self._logits(x)

    @staticmethod
    def _sample(logits: torch.Tensor, temperature: float, top_p: float, gen) -> torch.Tensor:
        """logits float32 [B, V] -> int64 [B], on the device, no host sync."""
        if temperature <= 0.0:
            return logits.argmax(-1)
        probs = torch.softmax(logits / temperature, dim=-1)
        if top_p < 1.0:
            p_sorted, idx = torch.sort(probs, dim=-1, descending=True)
            drop = (torch.cumsum(p_sorted, -1) - p_sorted) > top_p   # keeps the smallest prefix reaching top_p
            p_sorted = p_sorted.masked_fill(drop, 0.0)
            noise = torch.empty_like(p_sorted).exponential_(generator=gen)
            return idx.gather(-1, (p_sorted / noise).argmax(-1, keepdim=True)).squeeze(-1)
        noise = torch.empty_like(probs).exponential_(generator=gen)   # Gumbel/exponential trick
        return (probs / noise).argmax(-1)

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

    def stream(self, prompt_ids, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
               stop_token_ids: Sequence[int] | None = None, seed: int | None = None) -> Iterator[list[int | None]]:
        """Yield, per step, the new token of every sequence (None once a sequence has stopped).
        A stop token is yielded, then that sequence stops."""
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
        gen = None
        if seed is not None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(seed)

        # inference_mode only around the compute: a generator must not leave it set while suspended
        with torch.inference_mode():
            st = self._decode_state(B, max_len)
            caches = st["caches"]
            logits = self._prefill(prompts, caches)
            tokens = self._sample(logits, temperature, top_p, gen)
            positions = torch.tensor(lens, dtype=torch.int32, device=self.device)
            if st["step"] is None:
                st["step"] = self._make_decode_fn(tokens, positions, st["seq_ids"], caches)
            step = st["step"]
        done = [False] * B
        for n in range(max_new_tokens):
            host = tokens.tolist()           # the one host sync per step (stop checks)
            out = []
            for b in range(B):
                if done[b]:
                    out.append(None)
                    continue
                out.append(host[b])
                if host[b] in stops:
                    done[b] = True
            yield out
            if all(done) or n == max_new_tokens - 1:
                return
            with torch.inference_mode():
                logits = step(tokens, positions)
                tokens = self._sample(logits, temperature, top_p, gen)
                positions = positions + 1

    #: full-layer cache length is rounded up to this, so that generate calls of similar lengths
    #: reuse one cache and one captured CUDA graph
    cache_granularity: int = 256

    def _decode_state(self, batch: int, max_len: int) -> dict:
        """The cache (and decode step) for `batch` sequences of up to `max_len` positions. Reused
        across calls with the same batch and rounded length: stale entries are never read (a query
        only sees positions of its own sequence written in this call)."""
        g = max(1, int(self.cache_granularity))
        S = -(-max_len // g) * g
        st = self._state
        if st is not None and st["B"] == batch and st["S"] == S:
            return st
        self._state = self._graph = None   # free the old cache first
        self._state = {"B": batch, "S": S, "caches": self.new_cache(batch, S), "step": None,
                       "seq_ids": torch.arange(batch, dtype=torch.int32, device=self.device)}
        return self._state

    def release_cache(self) -> None:
        """Free the KV cache and the captured decode graph kept between generate calls."""
        self._state = self._graph = None

    def _make_decode_fn(self, tokens, positions, seq_ids, caches):
        """Decode step function (tokens, positions) -> logits; a CUDA graph replay on CUDA."""
        eager = lambda t, p: self._decode_step(t, p, seq_ids, caches)  # noqa: E731
        if self.device.type != "cuda" or not self.use_cuda_graph:
            return eager
        if not _lib.cuda_available() or not self._bf16:
            # the reference path reads tensors on the host: not capturable
            warnings.warn(f"GptOss: decode runs eagerly (no CUDA graph): "
                          f"{_lib.kernels_error() or 'float32 model uses the reference'}", RuntimeWarning)
            return eager
        try:
            tok_buf, pos_buf = tokens.clone(), positions.clone()
            s = torch.cuda.Stream(self.device)
            s.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(s):  # warm-up: writes the same cache slot the first real step writes
                self._decode_step(tok_buf, pos_buf, seq_ids, caches)
            torch.cuda.current_stream(self.device).wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self._decode_step(tok_buf, pos_buf, seq_ids, caches)
        except Exception as e:  # an op that syncs with the host (e.g. a reference fallback) cannot be captured
            warnings.warn(f"GptOss: decode step not captured in a CUDA graph ({type(e).__name__}: {e}); "
                          f"running it eagerly", RuntimeWarning)
            torch.cuda.synchronize(self.device)
            return eager

        def replay(t, p):
            tok_buf.copy_(t)
            pos_buf.copy_(p)
            graph.replay()
            return out

        self._graph = graph
        return replay

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
