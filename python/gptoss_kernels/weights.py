"""The weights of a gpt-oss model as ``GptOss`` holds them: names, shapes and kinds from the
config (``weight_shapes``, what the loader checks a checkpoint against and the memory plan
counts), random weights of those shapes, and the check of a set of weights.

Per layer (``GptOss.layers[i]``, names after the original checkpoint):
  attn_norm [H], qkv_w [(nq+2nkv)d, H], qkv_b, sinks [nq], out_w [H, nq d], out_b [H],
  mlp_norm [H], gate_w [E, H], gate_b [E],
  w1_blocks u8 [E, 2I, H/32, 16], w1_scales u8 [E, 2I, H/32], w1_bias [E, 2I] (gate/linear interleaved),
  w2_blocks u8 [E, H, I/32, 16], w2_scales u8 [E, H, I/32], w2_bias [E, H];
globals (``GptOss.weights``): embedding [V, H], norm [H], unembedding [V, H].
Kinds: ``FLOAT`` (the model's dtype) or ``UINT8`` (MXFP4 blocks and scales, the checkpoint's bytes).
"""

from __future__ import annotations

import math

import torch

from .config import GptOssConfig

__all__ = ["FLOAT", "UINT8", "weight_shapes", "nbytes", "random_weights", "check_weights"]

FLOAT, UINT8 = "float", "uint8"


def weight_shapes(cfg: GptOssConfig) -> tuple[dict, list[dict]]:
    """(globals, per-layer) dicts name -> (shape, kind), kind "float" (model dtype) or "uint8"."""
    H, V, E, I = cfg.hidden_size, cfg.vocab_size, cfg.num_experts, cfg.intermediate_size
    nq, d = cfg.num_attention_heads, cfg.head_dim
    g = {"embedding": ((V, H), FLOAT), "norm": ((H,), FLOAT), "unembedding": ((V, H), FLOAT)}
    layer = {
        "attn_norm": ((H,), FLOAT), "qkv_w": ((cfg.qkv_dim, H), FLOAT), "qkv_b": ((cfg.qkv_dim,), FLOAT),
        "sinks": ((nq,), FLOAT), "out_w": ((H, nq * d), FLOAT), "out_b": ((H,), FLOAT),
        "mlp_norm": ((H,), FLOAT), "gate_w": ((E, H), FLOAT), "gate_b": ((E,), FLOAT),
        "w1_blocks": ((E, 2 * I, H // 32, 16), UINT8), "w1_scales": ((E, 2 * I, H // 32), UINT8),
        "w1_bias": ((E, 2 * I), FLOAT),
        "w2_blocks": ((E, H, I // 32, 16), UINT8), "w2_scales": ((E, H, I // 32), UINT8), "w2_bias": ((E, H), FLOAT),
    }
    return g, [dict(layer) for _ in range(cfg.num_hidden_layers)]


def nbytes(shape, kind, float_bytes) -> int:
    """Bytes of one weight: MXFP4 bytes one each, float weights ``float_bytes`` each."""
    return math.prod(shape) * (1 if kind == UINT8 else float_bytes)


def random_weights(config: GptOssConfig, device: torch.device, seed: int = 0,
                   dtype: torch.dtype = torch.bfloat16) -> tuple[dict, list[dict]]:
    """(globals, per-layer) random weights generated on ``device`` (for benchmarks and tests).

    MXFP4 bytes are drawn directly with ``torch.randint`` (uniform codes) with scale bytes in
    118..122 (2^-9..2^-5, giving activations of a sane size); no bf16 copy of the experts ever
    exists. Float weights ~ N(0, 1/fan_in), norms ~ 1 + N(0, 0.1^2), biases and sinks small.
    """
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)

    def rnd(shape, std, mean=0.0):
        t = torch.randn(shape, dtype=dtype, device=device, generator=gen)
        return t.mul_(std).add_(mean) if mean else t.mul_(std)

    def make(name, shape, kind):
        if kind == UINT8:
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
    return weights, layers


def check_weights(config: GptOssConfig, weights: dict, layers: list[dict], dtype: torch.dtype) -> None:
    """ValueError naming the first weight that is missing or of the wrong shape or dtype."""
    gshapes, lshapes = weight_shapes(config)
    items = [(n, weights.get(n), s) for n, s in gshapes.items()]
    for i, spec in enumerate(lshapes):
        items += [(f"layers[{i}].{n}", layers[i].get(n), s) for n, s in spec.items()]
    for name, t, (shape, kind) in items:
        if t is None:
            raise ValueError(f"GptOss: weight {name} is missing")
        want = torch.uint8 if kind == UINT8 else dtype
        if tuple(t.shape) != tuple(shape) or t.dtype != want:
            raise ValueError(f"GptOss: weight {name} is {t.dtype} {tuple(t.shape)}, expected {want} {tuple(shape)}")
