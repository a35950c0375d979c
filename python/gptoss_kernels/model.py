"""The thin gpt-oss model: weights in the checkpoint layout (weights.py) and the layer math, built
from this package's public ops (``gptoss_kernels.ops``: rms_norm fused with the residual add,
linear, rope_qkv / rope_and_cache_append, attention_prefill / attention_decode, cache_append,
router_topk, moe_mxfp4) plus ``F.embedding`` / ``index_select``: ``forward`` (every position, no
cache), ``prefill`` (one chunk of prompts into the KV cache) and ``decode_step`` (one token per
sequence on static buffers, capturable in a CUDA graph).

On CUDA the ops run the kernels; on CPU they run the reference. The ops take bf16 activations;
a model loaded with ``dtype=torch.float32`` (CPU, for tight comparisons in tests) calls the same
reference functions the ops call on the CPU, without the bf16 argument checks.

Generation (``generate``, ``stream``, ``prepare_decode``: the decode state, CUDA-graph capture
and replay, the token ring) is ``generation.DecodeEngine``, ``self.engine``; sampling is
``sampling.py``; the memory plan (``memory_plan``, ``check_memory``: what fits one card) is
``memory.py``. The model keeps thin methods for them.

KV cache (DEVELOPERS.md): per layer bf16 [B, S, nkv, d], position p in slot p % S; sliding layers
S = sliding_window (a ring), full layers S = longest prompt + max_new_tokens.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from . import memory, ops
from .config import GptOssConfig
from .generation import DecodeEngine
from .layer_ops import LayerOps
from .loader import load_checkpoint
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


class GptOss(LayerOps):
    """gpt-oss for inference. Build with ``from_pretrained`` or ``from_config``. Each op of a layer
    (``_norm``, ``_linear``, ``_rope``, ``_attend_*``, ``_cache_append``, ``_moe``) runs in the
    model's dtype through ``LayerOps`` (layer_ops.py)."""

    #: tokens per prefill chunk (per sequence)
    prefill_chunk: int = memory.PREFILL_CHUNK
    #: decode steps queued ahead of the one whose tokens the host reads (stop checks): the GPU
    #: never waits for the host between steps; a stop costs at most this many extra steps.
    decode_lookahead: int = 2
    #: full-layer cache length is rounded up to this, so that generate calls of similar lengths
    #: reuse one cache and one captured CUDA graph
    cache_granularity: int = 256
    #: on CUDA, the decode step is captured once as a CUDA graph and replayed (False: run eagerly)
    use_cuda_graph: bool = True

    def __init__(self, config: GptOssConfig, weights: dict, layers: list[dict], *, device=None,
                 dtype: torch.dtype = torch.bfloat16):
        self.config = config
        self.weights = weights
        self.layers = layers
        self.dtype = dtype
        self.device = weights["embedding"].device   # where the weights actually are
        self._fused_decode = True
        check_weights(config, weights, layers, dtype)
        self.engine = DecodeEngine(self)   # the KV cache and captured decode step, reused between calls

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
            self.engine.drop_steps()

    # ------------------------------------------------------------------------------------------
    # construction
    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path, device=None, dtype: torch.dtype = torch.bfloat16, *, progress: bool = True) -> "GptOss":
        """Load a checkpoint folder (HF MXFP4, HF bf16, or original layout; see loader.py).
        device None: CUDA when available, else CPU. dtype: bfloat16 (float32 for CPU checks)."""
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

    def weights_bytes(self) -> int:
        ts = list(self.weights.values()) + [t for L in self.layers for t in L.values()]
        return sum(t.numel() * t.element_size() for t in ts)

    # ------------------------------------------------------------------------------------------
    # the blocks: the layer math of forward, prefill and the decode step
    # ------------------------------------------------------------------------------------------
    def _qkv(self, i, a):
        L = self.layers[i]
        return self._linear(a, L["qkv_w"], L["qkv_b"])

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

    # ------------------------------------------------------------------------------------------
    # forward (every position, no cache), the KV cache, prefill of a chunk, one decode step
    # ------------------------------------------------------------------------------------------
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

    def prefill(self, chunks: list[list[int]], starts: list[int], caches, finishing: list[int]) -> torch.Tensor | None:
        """One prefill chunk: sequence b's tokens chunks[b] (possibly none) at positions starts[b]..,
        packed (cu_seqlens) and attending to what its row of the cache holds before starts[b], then
        appended to it -> float32 logits [len(finishing), V] of the chunk's last token of each
        sequence in ``finishing`` (None when it is empty).

        The host builds the chunk's index tensors once (one upload each); the layers then run
        device work only (no host sync per layer on CUDA: attention_prefill reads the chunk's
        offsets on the device, the MoE skips its id validation)."""
        B, dev = len(chunks), self.device
        take, p0 = [len(t) for t in chunks], list(starts)
        cu = [0]
        for b in range(B):
            cu.append(cu[-1] + take[b])
        ids = torch.tensor([t for b in range(B) for t in chunks[b]], device=dev)
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
        if not finishing:
            return None
        return self._unembed(h[torch.tensor([cu[b + 1] - 1 for b in finishing], device=dev)])

    def decode_buffers(self, batch: int) -> dict:
        """Static tensors of the decode step for `batch` sequences (see decode_step)."""
        c, dev, dt = self.config, self.device, self.dtype
        B, H, V, k = batch, c.hidden_size, c.vocab_size, c.experts_per_token
        z = lambda *shape, dtype=dt: torch.zeros(shape, dtype=dtype, device=dev)  # noqa: E731
        return {
            "tok": z(B, dtype=torch.int64),          # in: token fed at `pos`; out: the sampled next token
            "pos": z(B, dtype=torch.int32),          # position of `tok` (advanced after the step)
            "seqlens": z(B, dtype=torch.int32),      # pos + 1 (cache length incl. the new token)
            "seq_ids": torch.arange(B, dtype=torch.int32, device=dev),
            "x": z(B, H), "a": z(B, H), "qkv": z(B, c.qkv_dim), "q": z(B, c.num_attention_heads, c.head_dim),
            "o": z(B, c.num_attention_heads, c.head_dim), "proj": z(B, H), "moe": z(B, H),
            "ids": z(B, k, dtype=torch.int32), "wts": z(B, k, dtype=torch.float32),
            "logits": z(B, V, dtype=torch.float32),
        }

    def decode_step(self, b: dict, caches) -> None:
        """The layers of one decode step, one token per sequence, all in place on the static
        buffers b (device work only: capturable): embed b.tok at b.pos, the blocks (fused RoPE +
        KV append, decode attention, fused residual norms), unembedding into b.logits (fp32).
        The engine then samples b.tok and advances b.pos and b.seqlens."""
        torch.index_select(self.weights["embedding"], 0, b["tok"], out=b["x"])

        def attend(i, a):
            kc, vc = caches[i]
            q = self._qkv_rope_append(i, a, b["seq_ids"], b["pos"], kc, vc, q_out=b["q"], qkv_out=b["qkv"])
            return self._attend_decode(i, q, kc, vc, b["seqlens"], out=b["o"])

        h = self._layers(b["x"], attend, buf=b)
        self._unembed(h, out=b["logits"])

    # ------------------------------------------------------------------------------------------
    # generation (generation.py) and the memory plan (memory.py), where a user looks for them
    # ------------------------------------------------------------------------------------------
    def generate(self, prompt_ids, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 stop_token_ids: Sequence[int] | None = None, seed: int | None = None):
        """New token ids (a stop token, if hit, is included as the last id); a list of lists for a
        batch of prompts. ``DecodeEngine.generate``."""
        return self.engine.generate(prompt_ids, max_new_tokens, temperature, top_p, stop_token_ids, seed)

    def stream(self, prompt_ids, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
               stop_token_ids: Sequence[int] | None = None, seed: int | None = None) -> Iterator[list[int | None]]:
        """Yield, per step, the new token of every sequence (None once it has stopped). ``DecodeEngine.stream``."""
        return self.engine.stream(prompt_ids, max_new_tokens, temperature, top_p, stop_token_ids, seed)

    def prepare_decode(self, batch: int, max_len: int, temperature: float = 0.0, top_p: float = 1.0) -> None:
        """Allocate the cache and capture the decode step ahead of a generate call. ``DecodeEngine.prepare``."""
        self.engine.prepare(batch, max_len, temperature, top_p)

    def release_cache(self) -> None:
        """Free the KV cache and the captured decode graph kept between generate calls."""
        self.engine.release()

    workspace_bytes = staticmethod(memory.workspace_bytes)
    kv_cache_bytes = staticmethod(memory.kv_cache_bytes)
    memory_plan = staticmethod(memory.memory_plan)
    format_memory_plan = staticmethod(memory.format_memory_plan)

    def plan_request(self, batch: int, max_len: int, available_bytes: float | None = None) -> dict:
        """The memory plan of a generate call on this model's device. ``DecodeEngine.plan_request``."""
        return self.engine.plan_request(batch, max_len, available_bytes)

    def check_memory(self, batch: int, max_len: int, available_bytes: float | None = None) -> dict:
        """plan_request, raising MemoryPlanError when the request does not fit. ``DecodeEngine.check_memory``."""
        return self.engine.check_memory(batch, max_len, available_bytes)
