"""torch custom ops (namespace gptoss): opcheck on CPU tensors (schema, fake/meta kernels,
autograd registration), torch.compile(fullgraph=True) through them, equality with the Python ops,
and (GPU, else the host build of the kernels) compiled ops equal to eager; (GPU only) graph-captured
ops equal to eager."""

from __future__ import annotations

import pytest
import torch

import gptoss_kernels as gk
import gptoss_kernels.custom_ops as co
from gptoss_kernels import reference as R

from .kernel_device import DEV, sync

bf16 = torch.bfloat16


def moe_inputs(T=5, H=64, I=64, E=6, k=2, device="cpu"):
    x = torch.randn(T, H, dtype=bf16, device=device)
    ids = torch.stack([torch.randperm(E, device=device)[:k] for _ in range(T)]).to(torch.int32)
    w = torch.softmax(torch.randn(T, k, device=device), -1)
    w1b, w1s = R.mxfp4_quantize(torch.randn(E, 2 * I, H, device=device) * 0.1)
    w2b, w2s = R.mxfp4_quantize(torch.randn(E, H, I, device=device) * 0.1)
    return (x, ids, w, w1b, w1s, torch.randn(E, 2 * I, dtype=bf16, device=device), w2b, w2s,
            torch.randn(E, H, dtype=bf16, device=device))


def attn_decode_inputs(B=3, S=16, nq=8, nkv=2, d=64, device="cpu"):
    return (torch.randn(B, nq, d, dtype=bf16, device=device), torch.randn(B, S, nkv, d, dtype=bf16, device=device),
            torch.randn(B, S, nkv, d, dtype=bf16, device=device),
            torch.tensor([1, 7, 16][:B], dtype=torch.int32, device=device), torch.randn(nq, dtype=bf16, device=device))


def cases():
    x, ids, w, w1b, w1s, b1, w2b, w2s, b2 = moe_inputs()
    q, kc, vc, lens, sinks = attn_decode_inputs()
    T = 6
    qp, kp, vp = (torch.randn(T, 8, 64, dtype=bf16), torch.randn(T, 2, 64, dtype=bf16), torch.randn(T, 2, 64, dtype=bf16))
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    return [
        (co.mxfp4_dequantize, (w1b[0], w1s[0]), {}),
        (co.router_topk, (x, torch.randn(6, 64, dtype=bf16), torch.randn(6, dtype=bf16), 3), {}),
        (co.route, (ids, 6), {}),
        (co.moe_mxfp4, (x, ids, w, w1b, w1s, b1, w2b, w2s, b2, 1.702, 7.0), {}),
        (co.moe_mxfp4_out, (x, ids, w, w1b, w1s, b1, w2b, w2s, b2, torch.empty_like(x)), {}),
        (co.moe_mxfp4_add_rms_norm_out, (x, ids, w, w1b, w1s, b1, w2b, w2s, b2, torch.randn_like(x),
                                         torch.randn(x.shape[1], dtype=bf16), torch.empty_like(x),
                                         torch.empty_like(x)), {}),
        (co.attention_decode, (q, kc, vc, lens, sinks), {"sliding_window": 8}),
        (co.attention_decode_out, (q, kc, vc, lens, sinks, torch.empty_like(q)), {}),
        (co.attention_prefill, (qp, kp, vp, torch.randn(8, dtype=bf16)), {"cu_seqlens_q": cu, "sliding_window": 4}),
        (co.attention_prefill, (qp, kp, vp, torch.randn(8, dtype=bf16)),
         {"cu_seqlens_q": cu, "k_cache": torch.randn(2, 8, 2, 64, dtype=bf16),
          "v_cache": torch.randn(2, 8, 2, 64, dtype=bf16), "cache_seqlens": torch.tensor([3, 5], dtype=torch.int32)}),
        (co.attention_prefill_out, (qp, kp, vp, torch.randn(8, dtype=bf16), torch.empty_like(qp)), {}),
        (co.rope_qkv, (torch.randn(4, 12 * 64, dtype=bf16), torch.arange(4, dtype=torch.int32), 8, 2, 64), {}),
        (co.cache_append, (kp[:2], vp[:2], torch.zeros(2, 8, 2, 64, dtype=bf16), torch.zeros(2, 8, 2, 64, dtype=bf16),
                           torch.tensor([0, 1], dtype=torch.int32), torch.tensor([3, 9], dtype=torch.int32)), {}),
        (co.qkv_rope_append, (torch.randn(2, 32, dtype=bf16), torch.randn(12 * 64, 32, dtype=bf16),
                              torch.randn(12 * 64, dtype=bf16), torch.tensor([0, 1], dtype=torch.int32),
                              torch.tensor([3, 9], dtype=torch.int32), torch.zeros(2, 8, 2, 64, dtype=bf16),
                              torch.zeros(2, 8, 2, 64, dtype=bf16), 8, 2, 64), {}),
    ]


@pytest.mark.parametrize("case", range(len(cases())))
def test_opcheck(case):
    op, args, kwargs = cases()[case]
    torch.library.opcheck(op, args, kwargs)


def test_every_op_is_checked():
    checked = {c[0] for c in cases()}
    assert checked == set(co.ALL_OPS)


def test_custom_ops_equal_python_ops():
    x, ids, w, *weights = moe_inputs()
    assert torch.equal(torch.ops.gptoss.moe_mxfp4(x, ids, w, *weights), gk.moe_mxfp4(x, ids, w, *weights))
    args = attn_decode_inputs()
    assert torch.equal(torch.ops.gptoss.attention_decode(*args, sliding_window=4),
                       gk.attention_decode(*args, sliding_window=4))


def test_bad_input_errors_come_through():
    x, ids, w, *weights = moe_inputs()
    with pytest.raises(TypeError, match="x must have dtype bfloat16"):
        torch.ops.gptoss.moe_mxfp4(x.float(), ids, w, *weights)


def test_torch_compile_fullgraph():
    x, ids, w, *weights = moe_inputs()
    router_w, router_b = torch.randn(6, 64, dtype=bf16), torch.randn(6, dtype=bf16)

    def block(h):
        i, s = torch.ops.gptoss.router_topk(h, router_w, router_b, 2)
        return h + torch.ops.gptoss.moe_mxfp4(h, i, s, *weights)

    compiled = torch.compile(block, fullgraph=True, backend="eager")
    assert torch.equal(compiled(x), block(x))


@pytest.mark.gpu
def test_compiled_equals_eager_on_kernels():
    x, ids, w, *weights = moe_inputs(T=4, H=256, I=256, E=8, k=4, device=DEV)
    eager = gk.moe_mxfp4(x, ids, w, *weights)
    compiled = torch.compile(lambda a: torch.ops.gptoss.moe_mxfp4(a, ids, w, *weights), fullgraph=True)
    got = compiled(x)
    out = torch.full_like(x, float("nan"))
    torch.ops.gptoss.moe_mxfp4_out(x, ids, w, *weights, out)
    sync()
    assert not eager.isnan().any()
    assert torch.equal(got, eager)
    assert torch.equal(out, eager)


@pytest.mark.gpu
@pytest.mark.cuda_only  # CUDA graph capture
def test_graph_captured_equals_eager_on_gpu():
    x, ids, w, *weights = moe_inputs(T=4, H=256, I=256, E=8, k=4, device=DEV)
    eager = gk.moe_mxfp4(x, ids, w, *weights)
    out = torch.empty_like(x)
    torch.ops.gptoss.moe_mxfp4_out(x, ids, w, *weights, out)  # warm-up outside capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        torch.ops.gptoss.moe_mxfp4_out(x, ids, w, *weights, out)
    out.fill_(float("nan"))
    g.replay()
    sync()
    assert torch.equal(out, eager)
