"""The worked engine integration: transformers' GptOss patched onto gptoss-kernels' ops gives
transformers' own logits (CPU: the ops run their reference; GPU, or the host build of the kernels: the kernels)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
from transformers import GptOssForCausalLM  # noqa: E402

from gptoss_kernels.integrations.transformers import KernelMoE, patch_gpt_oss  # noqa: E402

from .kernel_device import DEV  # noqa: E402
from .test_reference_vs_transformers import mxfp4_experts, randomize, rel_err, tiny_config  # noqa: E402


def _model(device="cpu"):
    torch.manual_seed(7)
    model = GptOssForCausalLM(tiny_config()).float().eval()
    randomize(model)
    mxfp4_experts(model)  # experts on the MXFP4 grid, so patching quantizes exactly
    return model.to(device)


def _check(device):
    model = _model(device)
    ids = torch.randint(0, 97, (2, 11), device=device)  # longer than the window (4)
    with torch.no_grad():
        want = model(ids).logits
        patch_gpt_oss(model)
        assert all(isinstance(layer.mlp, KernelMoE) for layer in model.model.layers)
        got = model(ids).logits
    # the patched path runs with bf16 activations (the kernels' input type) against an fp32 model:
    # bf16 rounding of each layer's inputs (2^-9 relative) accumulates over 2 layers; 3e-2 allows
    # that with margin, while a semantic error (mask, sink, routing) gives O(1).
    assert rel_err(got.float(), want.float()) < 3e-2
    return model, ids


def test_patched_logits_match_transformers_cpu():
    _check("cpu")


def test_patched_generate_uses_the_cache_correctly_cpu():
    model, ids = _check("cpu")
    with torch.no_grad():
        out = model.generate(ids[:1, :6], max_new_tokens=6, do_sample=False)
        # greedy with the cache equals greedy by full recomputation
        seq = ids[:1, :6]
        for _ in range(6):
            nxt = model(seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert torch.equal(out, seq)


@pytest.mark.gpu
def test_patched_logits_match_transformers_gpu():
    _check(DEV)
