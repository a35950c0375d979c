"""The ops' messages for a new user's mistakes (CPU): a KV cache allocated as [B, nkv, S, d], a
cache_seqlens outside its valid range, CUDA tensors on a torch that cannot run CUDA. Each is a
ValueError whose one line names the argument and says what is valid."""

from __future__ import annotations

import re

import pytest
import torch

import gptoss_kernels as gk

bf16 = torch.bfloat16
LAYOUT = re.escape("looks like [B, nkv, S, d] (dims 1 and 2 swapped): the KV cache is [B, S, nkv, d]")


def _decode_args(B=1, S=256, nq=64, nkv=8, d=64, L=5):
    q = torch.randn(B, nq, d).to(bf16)
    kc = torch.randn(B, S, nkv, d).to(bf16)
    return q, kc, kc.clone(), torch.full((B,), L, dtype=torch.int32), torch.randn(nq).to(bf16)


def test_transposed_cache_names_the_layout():
    q, kc, vc, lens, sinks = _decode_args()
    kt, vt = kc.transpose(1, 2).contiguous(), vc.transpose(1, 2).contiguous()     # [B, nkv, S, d]
    with pytest.raises(ValueError, match=r"q has 64 heads, not a multiple of the cache's 256 KV heads; "
                                         r"k_cache \(1, 8, 256, 64\) " + LAYOUT):
        gk.attention_decode(q, kt, vt, lens, sinks, sliding_window=None)
    with pytest.raises(ValueError, match=r"v_cache must have shape \(1, 256, 8, 64\), got \(1, 8, 256, 64\) "
                                         r"\(dim 1\); v_cache \(1, 8, 256, 64\) " + LAYOUT):
        gk.attention_decode(q, kc, vt, lens, sinks, sliding_window=None)
    # a wrong head count that is not a transposition still names the layout
    with pytest.raises(ValueError, match=re.escape("k_cache is [B, S, nkv, d] = (1, 256, 7, 64)")):
        gk.attention_decode(q, kc[:, :, :7].contiguous(), vc[:, :, :7].contiguous(), lens, sinks, sliding_window=None)
    # the ops that write the cache
    qkv = torch.randn(3, (64 + 16) * 64).to(bf16)
    pos = torch.arange(3, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"k_cache must have shape \(\*, \*, 8, 64\), got \(1, 8, 256, 64\) "
                                         r"\(dim 2\); k_cache \(1, 8, 256, 64\) " + LAYOUT):
        gk.rope_and_cache_append(qkv, pos * 0, pos, kt, vt)
    k = torch.randn(3, 8, 64).to(bf16)
    with pytest.raises(ValueError, match="k_cache .* " + LAYOUT):
        gk.cache_append(k, k, kt, vt, pos * 0, pos)
    x = torch.randn(3, 128).to(bf16)
    w = torch.randn((64 + 16) * 64, 128).to(bf16)
    with pytest.raises(ValueError, match="k_cache .* " + LAYOUT):
        gk.qkv_rope_append(x, w, None, pos * 0, pos, kt, vt)
    qp, kp = torch.randn(3, 64, 64).to(bf16), torch.randn(3, 8, 64).to(bf16)
    with pytest.raises(ValueError, match="k_cache .* " + LAYOUT):
        gk.attention_prefill(qp, kp, kp, sinks, k_cache=kt, v_cache=vt, cache_seqlens=lens, sliding_window=None)


@pytest.mark.parametrize("S,window,L,valid", [
    (256, None, 0, "in [1, 256]"),
    (256, None, -3, "in [1, 256]"),
    (256, None, 257, "in [1, 256]"),
    (256, 128, 0, ">= 1"),
    (64, 128, 65, "in [1, 64]"),
])
def test_cache_seqlens_range(S, window, L, valid):
    q, kc, vc, _, sinks = _decode_args(S=S)
    lens = torch.tensor([L], dtype=torch.int32)
    with pytest.raises(ValueError) as e:
        gk.attention_decode(q, kc, vc, lens, sinks, sliding_window=window)
    msg = str(e.value)
    assert msg.startswith(f"attention_decode: cache_seqlens[0] is {L}, must be {valid} (the positions written "
                          f"including the new token; the cache holds {S} slots"), msg
    assert ("fewer than the window" in msg) == (window is not None and S < window)
    assert "needs >=" not in msg and len(msg.splitlines()) == 1


def test_valid_cache_seqlens_still_run():
    q, kc, vc, _, sinks = _decode_args(S=64)
    for L, window in ((1, None), (64, None), (1000, 64), (1000, 32)):
        gk.attention_decode(q, kc, vc, torch.tensor([L], dtype=torch.int32), sinks, sliding_window=window)


@pytest.mark.skipif(torch.cuda.is_available(), reason="torch runs CUDA here")
def test_cuda_tensors_on_a_torch_without_cuda():
    """A CUDA tensor can reach an op on a CPU-only torch (e.g. a fake tensor while tracing); the op
    says so up front instead of failing inside torch."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    want = "is on cuda:0, but this torch build .* has no CUDA support: pass CPU tensors"
    with FakeTensorMode():
        c = dict(device="cuda")
        x = torch.empty(4, 64, dtype=bf16, **c)
        with pytest.raises(ValueError, match="x " + want):
            gk.router_topk(x, torch.empty(8, 64, dtype=bf16, **c), torch.empty(8, dtype=bf16, **c), k=2)
        with pytest.raises(ValueError, match="blocks " + want):
            gk.mxfp4_dequantize(torch.empty(2, 2, 16, dtype=torch.uint8, **c), torch.empty(2, 2, dtype=torch.uint8, **c))
        with pytest.raises(ValueError, match="x " + want):
            gk.linear(x, torch.empty(32, 64, dtype=bf16, **c))
        kc = torch.empty(1, 16, 8, 64, dtype=bf16, **c)
        with pytest.raises(ValueError, match="q " + want):
            gk.attention_decode(torch.empty(1, 64, 64, dtype=bf16, **c), kc, kc, torch.ones(1, dtype=torch.int32, **c),
                                torch.empty(64, dtype=bf16, **c), sliding_window=None)
