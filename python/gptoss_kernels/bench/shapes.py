"""Model shapes the benchmarks use (spec §1.1), independent of the model class.

``ModelShape.of(config)`` reads a ``gptoss_kernels.config.GptOssConfig`` (or any object with the
Hugging Face / original field names), so the bench works before and after the model class exists.
"""

from __future__ import annotations

from dataclasses import dataclass

# field -> accepted attribute names, first found wins (HF names, original names, short names)
_ALIASES = {
    "num_layers": ("num_hidden_layers", "num_layers", "n_layers"),
    "hidden": ("hidden_size", "hidden", "d_model"),
    "num_experts": ("num_local_experts", "num_experts", "n_experts"),
    "k": ("num_experts_per_tok", "experts_per_token", "top_k", "k"),
    "intermediate": ("intermediate_size", "intermediate"),
    "nq": ("num_attention_heads", "num_q_heads", "nq"),
    "nkv": ("num_key_value_heads", "num_kv_heads", "nkv"),
    "head_dim": ("head_dim",),
    "vocab": ("vocab_size", "vocab"),
    "sliding_window": ("sliding_window", "window"),
}


@dataclass(frozen=True)
class ModelShape:
    name: str
    num_layers: int
    hidden: int = 2880
    num_experts: int = 128
    k: int = 4
    intermediate: int = 2880
    nq: int = 64
    nkv: int = 8
    head_dim: int = 64
    vocab: int = 201088
    sliding_window: int = 128

    @classmethod
    def gpt_oss_120b(cls) -> "ModelShape":
        return cls("gpt-oss-120b", num_layers=36, num_experts=128)

    @classmethod
    def gpt_oss_20b(cls) -> "ModelShape":
        return cls("gpt-oss-20b", num_layers=24, num_experts=32)

    @classmethod
    def preset(cls, name: str) -> "ModelShape":
        presets = {"120b": cls.gpt_oss_120b, "20b": cls.gpt_oss_20b}
        if name not in presets:
            raise ValueError(f"unknown config {name!r}: choose one of {sorted(presets)}")
        return presets[name]()

    @classmethod
    def of(cls, config, name: str | None = None) -> "ModelShape":
        """From a config object (GptOssConfig, a transformers config, a dict, or a ModelShape)."""
        if isinstance(config, ModelShape):
            return config
        get = config.get if isinstance(config, dict) else (lambda a, d=None: getattr(config, a, d))
        values = {}
        for field, names in _ALIASES.items():
            for n in names:
                v = get(n, None)
                if v is not None:
                    values[field] = int(v)
                    break
        missing = [f for f in ("num_layers", "num_experts") if f not in values]
        if missing:
            raise ValueError(f"config {type(config).__name__} lacks {missing} (looked for "
                             f"{[_ALIASES[m] for m in missing]})")
        if name is None:
            name = get("name", None) or f"gpt-oss ({values['num_layers']} layers, {values['num_experts']} experts)"
        return cls(str(name), **values)

    def is_sliding(self, layer: int) -> bool:
        """Even 0-based layers use the 128-token window; odd layers are full causal (spec §1.1)."""
        return layer % 2 == 0

    @property
    def num_sliding_layers(self) -> int:
        return sum(self.is_sliding(i) for i in range(self.num_layers))

    @property
    def num_full_layers(self) -> int:
        return self.num_layers - self.num_sliding_layers

    # ---- bytes of the weights (checkpoint layout: MXFP4 experts, bf16 everything else) ----
    def expert_bytes(self) -> int:
        """One expert's MXFP4 blocks + E8M0 scales + bf16 biases, mlp1 and mlp2."""
        H, I = self.hidden, self.intermediate
        mlp1 = 2 * I * H // 2 + 2 * I * H // 32 + 2 * I * 2
        mlp2 = H * I // 2 + H * I // 32 + H * 2
        return mlp1 + mlp2

    def attention_weight_bytes(self) -> int:
        """One layer's QKV and output projections with biases, and the sinks (bf16)."""
        H, d = self.hidden, self.head_dim
        qkv = (self.nq + 2 * self.nkv) * d
        return qkv * H * 2 + qkv * 2 + H * self.nq * d * 2 + H * 2 + self.nq * 2

    def router_bytes(self) -> int:
        return self.num_experts * self.hidden * 2 + self.num_experts * 2

    def kv_bytes_per_position(self) -> int:
        """K and V of one position in one layer (bf16)."""
        return 2 * self.nkv * self.head_dim * 2

    def kv_cache_bytes(self, batch: int, context: int) -> int:
        """Cache that holds `context` positions per sequence: full layers all, sliding layers 128."""
        per_seq = (self.num_full_layers * context
                   + self.num_sliding_layers * min(context, self.sliding_window)) * self.kv_bytes_per_position()
        return batch * per_seq

    def weight_bytes(self) -> int:
        """Whole model in memory: embedding + unembedding + layers (experts MXFP4)."""
        per_layer = (self.num_experts * self.expert_bytes() + self.attention_weight_bytes()
                     + self.router_bytes() + 2 * self.hidden * 2)
        return 2 * self.vocab * self.hidden * 2 + self.num_layers * per_layer + self.hidden * 2


def expected_distinct_experts(num_experts: int, k: int, tokens: int) -> float:
    """Expected number of distinct experts chosen by `tokens` tokens under uniform routing
    (each token picks k distinct experts): E * (1 - (1 - k/E)^T). Exactly k for one token."""
    if tokens <= 0:
        return 0.0
    return num_experts * (1.0 - (1.0 - k / num_experts) ** tokens)


def decode_bytes_per_step(shape: ModelShape, batch: int, context: int) -> dict[str, float]:
    """Bytes one decode step of `batch` sequences must read from device memory, by component.

    Each sequence has `context` positions in its cache including the new token. Weights are read
    once per step whatever the batch (experts: the expected number of distinct experts the batch
    selects per layer, uniform routing as with random weights); the KV cache is read per sequence
    (full layers: all positions, sliding layers: the last 128). Activations are left out: at these
    batch sizes they are a few MB against GB of weights.
    """
    if batch < 1 or context < 1:
        raise ValueError(f"batch and context must be >= 1, got batch={batch}, context={context}")
    s = shape
    out = {
        "experts": s.num_layers * expected_distinct_experts(s.num_experts, s.k, batch) * s.expert_bytes(),
        "attention_projections": float(s.num_layers * s.attention_weight_bytes()),
        "unembedding": float(s.vocab * s.hidden * 2),
        "router": float(s.num_layers * s.router_bytes()),
        "norms": float((2 * s.num_layers + 1) * s.hidden * 2),
        "embedding_rows": float(batch * s.hidden * 2),
        "kv_cache": float(s.kv_cache_bytes(batch, context)),
    }
    out["total"] = sum(out.values())
    return out


def decode_bytes_per_token(config, batch: int = 1, context: int = 1024) -> float:
    """Bytes per generated token = bytes of one decode step / batch (≈ 5.0 GB for 120b, batch 1)."""
    return decode_bytes_per_step(ModelShape.of(config), batch, context)["total"] / batch
