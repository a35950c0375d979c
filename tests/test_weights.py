"""The weights' names, shapes and kinds from the config (gptoss_kernels.weights), random weights
of those shapes, and the check a model runs on the weights it is given."""

from __future__ import annotations

import pytest
import torch

from gptoss_kernels import GptOss, GptOssConfig
from gptoss_kernels.weights import FLOAT, UINT8, check_weights, nbytes, random_weights, weight_shapes


def tiny(**kw) -> GptOssConfig:
    base = dict(num_hidden_layers=3, num_experts=4, experts_per_token=2, vocab_size=96, hidden_size=64,
                intermediate_size=32, head_dim=16, num_attention_heads=4, num_key_value_heads=2, sliding_window=4)
    base.update(kw)
    return GptOssConfig(**base)


def test_weight_shapes_follow_the_config():
    cfg = tiny()
    g, layers = weight_shapes(cfg)
    assert len(layers) == 3 and g["embedding"] == ((96, 64), FLOAT) and g["unembedding"] == ((96, 64), FLOAT)
    L = layers[0]
    assert L["qkv_w"] == (((4 + 2 * 2) * 16, 64), FLOAT) and L["out_w"] == ((64, 4 * 16), FLOAT)
    assert L["w1_blocks"] == ((4, 64, 2, 16), UINT8) and L["w1_scales"] == ((4, 64, 2), UINT8)
    assert L["w2_blocks"] == ((4, 64, 1, 16), UINT8) and L["w2_bias"] == ((4, 64), FLOAT)
    assert {k for k, (_, kind) in L.items() if kind == UINT8} == {"w1_blocks", "w1_scales", "w2_blocks", "w2_scales"}
    layers[0]["extra"] = None
    assert "extra" not in layers[1]                       # one dict per layer
    assert nbytes((4, 64, 2, 16), UINT8, 2) == 8192 and nbytes((96, 64), FLOAT, 2) == 12288


def test_random_weights_have_the_shapes_and_are_seeded():
    cfg = tiny()
    w, layers = random_weights(cfg, torch.device("cpu"), seed=5, dtype=torch.float32)
    check_weights(cfg, w, layers, torch.float32)
    again, _ = random_weights(cfg, torch.device("cpu"), seed=5, dtype=torch.float32)
    other, _ = random_weights(cfg, torch.device("cpu"), seed=6, dtype=torch.float32)
    assert torch.equal(w["embedding"], again["embedding"]) and not torch.equal(w["embedding"], other["embedding"])
    s = layers[1]["w2_scales"]
    assert 118 <= int(s.min()) and int(s.max()) <= 122
    assert abs(float(layers[0]["attn_norm"].mean()) - 1.0) < 0.1       # norms ~ 1 + N(0, 0.1^2)
    assert 0.5 < float(w["unembedding"].std()) * 64 ** 0.5 < 1.5        # N(0, 1/fan_in)


def test_check_weights_names_the_bad_weight():
    cfg = tiny()
    w, layers = random_weights(cfg, torch.device("cpu"), seed=0, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"weight layers\[2\].sinks is missing"):
        check_weights(cfg, w, [*layers[:2], {k: v for k, v in layers[2].items() if k != "sinks"}], torch.bfloat16)
    bad = dict(layers[1], qkv_w=layers[1]["qkv_w"][:-1])
    want = r"layers\[1\].qkv_w is torch.bfloat16 \(127, 64\), expected torch.bfloat16 \(128, 64\)"
    with pytest.raises(ValueError, match=want):
        check_weights(cfg, w, [layers[0], bad, layers[2]], torch.bfloat16)
    with pytest.raises(ValueError, match=r"weight embedding is torch.bfloat16 \(96, 64\), expected torch.float32"):
        check_weights(cfg, w, layers, torch.float32)
    scales = dict(layers[0], w1_scales=layers[0]["w1_scales"].to(torch.int8))
    with pytest.raises(ValueError, match=r"layers\[0\].w1_scales is torch.int8"):
        check_weights(cfg, w, [scales, *layers[1:]], torch.bfloat16)
    with pytest.raises(ValueError, match="missing"):
        GptOss(cfg, w, [*layers[:2], {}])
