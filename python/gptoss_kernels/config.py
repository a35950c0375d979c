"""gpt-oss hyper-parameters (spec §1) and the mapping from both checkpoint config files (§1.2)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .reference import YarnParams

__all__ = ["GptOssConfig"]


@dataclass
class GptOssConfig:
    """Shapes and constants of one gpt-oss model. Defaults are gpt-oss-120b's.

    Field names follow the original checkpoint's config (``num_experts``, ``experts_per_token``,
    ``initial_context_length``...); ``from_hf_dict`` maps the Hugging Face names onto them.
    ``layer_types[i]`` is ``"sliding_attention"`` or ``"full_attention"`` (default: even layers
    slide, spec §1.1).
    """

    num_hidden_layers: int = 36
    num_experts: int = 128
    experts_per_token: int = 4
    vocab_size: int = 201088
    hidden_size: int = 2880
    intermediate_size: int = 2880
    head_dim: int = 64
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    sliding_window: int | None = 128
    initial_context_length: int = 4096
    max_position_embeddings: int = 131072
    rope_theta: float = 150000.0
    rope_scaling_factor: float = 32.0
    rope_beta_fast: float = 32.0     # original `rope_ntk_beta`
    rope_beta_slow: float = 1.0      # original `rope_ntk_alpha`
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    rms_norm_eps: float = 1e-5
    layer_types: tuple[str, ...] = field(default=())
    eos_token_id: int = 200002        # <|return|>
    pad_token_id: int = 199999        # <|endoftext|>

    def __post_init__(self):
        if not self.layer_types:
            self.layer_types = tuple("sliding_attention" if i % 2 == 0 else "full_attention"
                                     for i in range(self.num_hidden_layers))
        self.layer_types = tuple(self.layer_types)
        self.validate()

    # -- presets ---------------------------------------------------------------------------
    @classmethod
    def gpt_oss_120b(cls) -> "GptOssConfig":
        return cls()

    @classmethod
    def gpt_oss_20b(cls) -> "GptOssConfig":
        return cls(num_hidden_layers=24, num_experts=32)

    # -- derived ---------------------------------------------------------------------------
    def is_sliding(self, layer: int) -> bool:
        return self.sliding_window is not None and self.layer_types[layer] == "sliding_attention"

    def window(self, layer: int) -> int | None:
        """Sliding window (keys incl. the current one) of a layer, or None for full attention."""
        return self.sliding_window if self.is_sliding(layer) else None

    @property
    def qkv_dim(self) -> int:
        return (self.num_attention_heads + 2 * self.num_key_value_heads) * self.head_dim

    @property
    def yarn(self) -> YarnParams:
        return YarnParams(head_dim=self.head_dim, theta=float(self.rope_theta), factor=float(self.rope_scaling_factor),
                          beta_fast=float(self.rope_beta_fast), beta_slow=float(self.rope_beta_slow),
                          original_context=int(self.initial_context_length))

    @property
    def sm_scale(self) -> float:
        return self.head_dim ** -0.5

    def validate(self) -> None:
        def bad(fieldname, why):
            raise ValueError(f"GptOssConfig.{fieldname}: {why}")

        for f in ("num_hidden_layers", "num_experts", "experts_per_token", "vocab_size", "hidden_size",
                  "intermediate_size", "head_dim", "num_attention_heads", "num_key_value_heads"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                bad(f, f"must be a positive int, got {v!r}")
        if self.hidden_size % 32:
            bad("hidden_size", f"{self.hidden_size} is not a multiple of 32 (MXFP4 block)")
        if self.intermediate_size % 32:
            bad("intermediate_size", f"{self.intermediate_size} is not a multiple of 32 (MXFP4 block)")
        if self.head_dim % 2:
            bad("head_dim", "must be even (RoPE pairs)")
        if self.num_attention_heads % self.num_key_value_heads:
            bad("num_attention_heads", f"{self.num_attention_heads} is not a multiple of num_key_value_heads "
                                       f"{self.num_key_value_heads}")
        if self.experts_per_token > self.num_experts:
            bad("experts_per_token", f"{self.experts_per_token} > num_experts {self.num_experts}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            bad("sliding_window", f"must be positive or None, got {self.sliding_window}")
        if len(self.layer_types) != self.num_hidden_layers:
            bad("layer_types", f"has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        for t in self.layer_types:
            if t not in ("sliding_attention", "full_attention"):
                bad("layer_types", f"unknown layer type {t!r}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["layer_types"] = list(self.layer_types)
        return d

    # -- config files ----------------------------------------------------------------------
    @classmethod
    def from_original_dict(cls, d: dict) -> "GptOssConfig":
        """From ``original/config.json`` (spec §1.2; it has no eps or token ids)."""
        need = ("num_hidden_layers", "num_experts", "experts_per_token", "vocab_size", "hidden_size",
                "intermediate_size", "head_dim", "num_attention_heads", "num_key_value_heads")
        missing = [k for k in need if k not in d]
        if missing:
            raise ValueError(f"original config.json lacks the field(s) {missing}")
        return cls(
            num_hidden_layers=d["num_hidden_layers"], num_experts=d["num_experts"],
            experts_per_token=d["experts_per_token"], vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"], head_dim=d["head_dim"],
            num_attention_heads=d["num_attention_heads"], num_key_value_heads=d["num_key_value_heads"],
            sliding_window=d.get("sliding_window", 128),
            initial_context_length=d.get("initial_context_length", 4096),
            max_position_embeddings=int(d.get("initial_context_length", 4096) * d.get("rope_scaling_factor", 32.0)),
            rope_theta=d.get("rope_theta", 150000.0), rope_scaling_factor=d.get("rope_scaling_factor", 32.0),
            rope_beta_fast=d.get("rope_ntk_beta", 32.0), rope_beta_slow=d.get("rope_ntk_alpha", 1.0),
            swiglu_alpha=d.get("swiglu_alpha", 1.702), swiglu_limit=d.get("swiglu_limit", 7.0),
            rms_norm_eps=d.get("rms_norm_eps", 1e-5),
        )

    def to_original_dict(self) -> dict:
        return {"num_hidden_layers": self.num_hidden_layers, "num_experts": self.num_experts,
                "experts_per_token": self.experts_per_token, "vocab_size": self.vocab_size,
                "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
                "swiglu_limit": self.swiglu_limit, "head_dim": self.head_dim,
                "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
                "sliding_window": self.sliding_window, "initial_context_length": self.initial_context_length,
                "rope_theta": self.rope_theta, "rope_scaling_factor": self.rope_scaling_factor,
                "rope_ntk_alpha": self.rope_beta_slow, "rope_ntk_beta": self.rope_beta_fast}

    @classmethod
    def from_hf_dict(cls, d: dict) -> "GptOssConfig":
        """From a Hugging Face ``config.json`` (``rope_scaling`` + ``rope_theta`` as on the Hub, or
        transformers 5.x's ``rope_parameters``)."""
        if d.get("model_type", "gpt_oss") != "gpt_oss":
            raise ValueError(f"config.json: model_type is {d.get('model_type')!r}, expected 'gpt_oss'")
        need = ("num_hidden_layers", "num_local_experts", "vocab_size", "hidden_size", "intermediate_size",
                "num_attention_heads", "num_key_value_heads")
        missing = [k for k in need if k not in d]
        if missing:
            raise ValueError(f"config.json lacks the field(s) {missing}")
        rope = dict(d.get("rope_scaling") or d.get("rope_parameters") or {})
        theta = d.get("rope_theta", rope.get("rope_theta", 150000.0))
        rtype = rope.get("rope_type", rope.get("type", "yarn" if rope else "default"))
        if rtype == "yarn":
            if rope.get("truncate", True) is not False:
                raise ValueError("config.json: rope_scaling.truncate must be false for gpt-oss (spec §1.3); "
                                 f"got {rope.get('truncate', '(absent: transformers defaults to true)')}")
            factor = float(rope.get("factor", 32.0))
            beta_fast, beta_slow = float(rope.get("beta_fast", 32.0)), float(rope.get("beta_slow", 1.0))
            orig = int(rope.get("original_max_position_embeddings", d.get("initial_context_length", 4096)))
        elif rtype == "default":
            factor, beta_fast, beta_slow, orig = 1.0, 32.0, 1.0, int(d.get("initial_context_length", 4096))
        else:
            raise ValueError(f"config.json: rope_scaling.rope_type {rtype!r} is not supported (yarn or default)")
        head_dim = d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"]
        eos = d.get("eos_token_id", 200002)
        if isinstance(eos, list):
            eos = eos[0]
        return cls(
            num_hidden_layers=d["num_hidden_layers"], num_experts=d["num_local_experts"],
            experts_per_token=d.get("num_experts_per_tok", d.get("experts_per_token", 4)),
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
            head_dim=head_dim, num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d["num_key_value_heads"], sliding_window=d.get("sliding_window", 128),
            initial_context_length=orig, max_position_embeddings=d.get("max_position_embeddings", 131072),
            rope_theta=float(theta), rope_scaling_factor=factor, rope_beta_fast=beta_fast, rope_beta_slow=beta_slow,
            swiglu_alpha=d.get("swiglu_alpha", 1.702), swiglu_limit=d.get("swiglu_limit", 7.0),
            rms_norm_eps=d.get("rms_norm_eps", 1e-5), layer_types=tuple(d.get("layer_types") or ()),
            eos_token_id=eos if eos is not None else 200002,
            pad_token_id=d.get("pad_token_id") if d.get("pad_token_id") is not None else 199999,
        )

    def to_hf_dict(self, *, mxfp4: bool = True) -> dict:
        d = {"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "attention_bias": True,
             "num_hidden_layers": self.num_hidden_layers, "num_local_experts": self.num_experts,
             "num_experts_per_tok": self.experts_per_token, "experts_per_token": self.experts_per_token,
             "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
             "intermediate_size": self.intermediate_size, "head_dim": self.head_dim,
             "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
             "sliding_window": self.sliding_window, "layer_types": list(self.layer_types),
             "initial_context_length": self.initial_context_length,
             "max_position_embeddings": self.max_position_embeddings, "rope_theta": self.rope_theta,
             "rope_scaling": {"rope_type": "yarn", "factor": self.rope_scaling_factor,
                              "beta_fast": self.rope_beta_fast, "beta_slow": self.rope_beta_slow,
                              "original_max_position_embeddings": self.initial_context_length, "truncate": False},
             "swiglu_limit": self.swiglu_limit, "rms_norm_eps": self.rms_norm_eps,
             "tie_word_embeddings": False, "eos_token_id": self.eos_token_id, "pad_token_id": self.pad_token_id}
        if mxfp4:
            d["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
                "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
        return d
