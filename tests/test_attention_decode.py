"""Decode attention over the KV cache (sinks, sliding window, GQA; spec §4.2 steps 4-7).

CPU: the online-softmax state and merge with the sink (softmax.cuh via _C.host) against a float64
one-pass sink softmax, the split plan (pure function of the sizes), the op's argument checks,
the bindings' argument errors, the kernel's SASS (16-byte loads, no local memory).
GPU: the kernel against reference.attention_decode over context lengths, windows (ring buffer of
128 slots), ragged batches, strongly positive/negative sinks, poisoned outputs and unused cache
slots, CUDA-graph replay.

Tolerance: q, k, v and sinks are bf16, the kernel computes logits, softmax and P.V in fp32 (the
reference in fp32 too) and rounds only the output to bf16: 2^-9 relative per element, at most
~4e-3 on a norm; rel-norm 1e-2 (DEVELOPERS.md) leaves margin for fp32 summation-order effects.
The tensor-core variant (2) also rounds P to bf16 before P.V (2^-9 relative per weight, errors
of different keys average out): same 1e-2 bound. The GPU tests run both variants and print the
measured worst per-head error (run with -s)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import gptoss_kernels as gk
from gptoss_kernels import _lib
from gptoss_kernels import reference as R

from . import sass


def _C():
    if not gk.kernels_built():
        pytest.skip(f"kernels not built: {gk.kernels_error()}")
    C = _lib.C()
    if not hasattr(C.host, "softmax_merge"):
        pytest.skip("this build predates the attention bindings (rebuild the package)")
    return C


# ---- online softmax with the sink (softmax.cuh, host build) ----

def _sink_softmax_f64(s: np.ndarray, v: np.ndarray, sink: float) -> np.ndarray:
    s = s.astype(np.float64)
    m = max(s.max(initial=-np.inf), sink)
    p = np.exp(s - m)
    return (p @ v.astype(np.float64)) / (p.sum() + np.exp(sink - m))


def _merge_all(C, parts, order):
    m, l, o = parts[order[0]]
    for i in order[1:]:
        m, l, o = C.host.softmax_merge(m, l, o, *parts[i])
    return m, l, o


@pytest.mark.parametrize("sink", [-20.0, -1.0, 0.0, 3.0, 20.0])
@pytest.mark.parametrize("n", [1, 7, 100, 1000])
def test_host_merge_any_split_any_order_equals_one_pass(n, sink):
    C = _C()
    rng = np.random.default_rng(n * 7 + int(sink) + 100)
    s = (rng.standard_normal(n) * 4).astype(np.float32)
    v = rng.standard_normal((n, 64)).astype(np.float32)
    want = _sink_softmax_f64(s, v, sink)
    scale = np.abs(want).max() + 1e-30
    for trial in range(4):
        cuts = np.sort(rng.integers(0, n + 1, size=rng.integers(0, 6)))
        bounds = [0, *cuts.tolist(), n]  # repeated cuts give empty partials
        parts = [C.host.softmax_partial(s[a:b], v[a:b].reshape(b - a, 64), tile=int(rng.integers(1, 20)))
                 for a, b in zip(bounds[:-1], bounds[1:])]
        order = rng.permutation(len(parts))
        m, l, o = _merge_all(C, parts, order)
        got = C.host.softmax_finalize(m, l, o, sink)
        assert np.abs(got - want).max() / scale < 1e-5, (bounds, order)


def test_host_empty_partial_is_identity():
    C = _C()
    e = C.host.softmax_partial(np.zeros(0, np.float32), np.zeros((0, 4), np.float32))
    assert e[0] == -np.inf and e[1] == 0.0 and np.all(e[2] == 0)
    p = C.host.softmax_partial(np.array([1.0, 2.0], np.float32), np.ones((2, 4), np.float32))
    for merged in (C.host.softmax_merge(*e, *p), C.host.softmax_merge(*p, *e)):
        assert merged[0] == p[0] and merged[1] == p[1] and np.array_equal(merged[2], p[2])
    ee = C.host.softmax_merge(*e, *e)
    assert ee[0] == -np.inf and ee[1] == 0.0 and not np.isnan(ee[2]).any()
    # no keys at all: the sink takes all the mass, output 0 (never NaN), also for a -inf sink
    assert np.all(C.host.softmax_finalize(*e, 5.0) == 0)
    assert np.all(C.host.softmax_finalize(*e, -np.inf) == 0)


def test_host_partial_masked_logits_and_large_values():
    C = _C()
    s = np.array([-np.inf, 50.0, -np.inf, 49.0], np.float32)
    v = np.eye(4, dtype=np.float32)
    m, l, o = C.host.softmax_partial(s, v, tile=1)
    got = C.host.softmax_finalize(m, l, o, -20.0)
    want = np.zeros(4)
    w = np.exp([0.0, -1.0]) / (np.exp(0.0) + np.exp(-1.0) + np.exp(-70.0))
    want[1], want[3] = w
    assert np.abs(got - want).max() < 1e-6


# ---- split plan ----

def test_split_plan_is_a_function_of_sizes():
    C = _C()
    for B in (1, 2, 8, 64):
        for S in (1, 128, 1000, 8193, 32768, 131072):
            for W in (0, 128):
                splits = C.attention_decode_num_splits(B, S, 64, 8, 64, W)
                ws = C.attention_decode_workspace_size(B, S, 64, 8, 64, W)
                assert splits >= 1
                assert (ws == 0) == (splits == 1)
                if splits > 1:
                    assert ws == B * 8 * splits * (8 * 64 + 8 * 2) * 4
    # long single sequences are spread over the SMs; the window needs few splits
    assert 1 * 8 * C.attention_decode_num_splits(1, 8192, 64, 8, 64, 0) >= 132
    assert 1 * 8 * C.attention_decode_num_splits(1, 131072, 64, 8, 64, 0) >= 132
    assert C.attention_decode_num_splits(64, 131072, 64, 8, 64, 128) == C.attention_decode_num_splits(64, 128, 64, 8, 64, 0)
    assert C.attention_decode_num_splits(1, 128, 64, 8, 64, 128) <= 2


# ---- op argument checks (CPU) ----

def _decode_args(B=2, S=16, L=5):
    q = torch.randn(B, 64, 64).to(torch.bfloat16)
    kc = torch.randn(B, S, 8, 64).to(torch.bfloat16)
    vc = torch.randn(B, S, 8, 64).to(torch.bfloat16)
    lens = torch.full((B,), L, dtype=torch.int32)
    sinks = torch.randn(64).to(torch.bfloat16)
    return q, kc, vc, lens, sinks


def test_op_cpu_equals_reference():
    q, kc, vc, lens, sinks = _decode_args()
    for w in (None, 4):
        got = gk.attention_decode(q, kc, vc, lens, sinks, sliding_window=w)
        assert torch.equal(got, R.attention_decode(q, kc, vc, lens, sinks, sliding_window=w))


def test_op_argument_checks():
    q, kc, vc, lens, sinks = _decode_args()
    with pytest.raises(TypeError, match="q must have dtype bfloat16"):
        gk.attention_decode(q.float(), kc, vc, lens, sinks, sliding_window=None)
    with pytest.raises(ValueError, match="k_cache must have shape"):
        gk.attention_decode(q, kc[:, :, :, :32].contiguous(), vc, lens, sinks, sliding_window=None)
    with pytest.raises(ValueError, match="v_cache must have shape"):
        gk.attention_decode(q, kc, vc[:, :8].contiguous(), lens, sinks, sliding_window=None)
    with pytest.raises(TypeError, match="cache_seqlens must have dtype int32"):
        gk.attention_decode(q, kc, vc, lens.long(), sinks, sliding_window=None)
    with pytest.raises(ValueError, match="sinks must have shape"):
        gk.attention_decode(q, kc, vc, lens, sinks[:8].contiguous(), sliding_window=None)
    with pytest.raises(ValueError, match="sliding_window must be a positive int"):
        gk.attention_decode(q, kc, vc, lens, sinks, sliding_window=0)
    with pytest.raises(ValueError, match="not a multiple"):
        gk.attention_decode(q[:, :60].contiguous(), kc, vc, lens, sinks[:60].contiguous(), sliding_window=None)
    with pytest.raises(ValueError, match="out must have shape"):
        gk.attention_decode(q, kc, vc, lens, sinks, sliding_window=None, out=torch.empty(2, 64, 32, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="must be contiguous"):
        gk.attention_decode(q.transpose(1, 2), kc, vc, lens, sinks, sliding_window=None)
    with pytest.raises(ValueError, match="is on meta"):
        gk.attention_decode(q, kc, vc, lens.to("meta"), sinks, sliding_window=None)


def test_bindings_reject_bad_arguments_before_touching_cuda():
    C = _C()
    ok = dict(batch=1, cache_size=16, num_q_heads=64, num_kv_heads=8, head_dim=64, sliding_window=0, sm_scale=0.125,
              stream=0)
    ptrs = dict(q=16, k_cache=16, v_cache=16, cache_seqlens=16, sinks=16, out=16, workspace=0, workspace_bytes=0)
    with pytest.raises(ValueError, match="head_dim 64"):
        C.attention_decode_bf16(**ptrs, **{**ok, "head_dim": 128})
    with pytest.raises(ValueError, match="8 query heads per KV head"):
        C.attention_decode_bf16(**ptrs, **{**ok, "num_q_heads": 32})
    with pytest.raises(ValueError, match="16-byte aligned"):
        C.attention_decode_bf16(**{**ptrs, "q": 18}, **ok)
    with pytest.raises(ValueError, match="null pointer"):
        C.attention_decode_bf16(**{**ptrs, "sinks": 0}, **ok)
    big = {**ok, "cache_size": 8192}
    need = C.attention_decode_workspace_size(1, 8192, 64, 8, 64, 0)
    with pytest.raises(ValueError, match="workspace too small"):
        C.attention_decode_bf16(**{**ptrs, "workspace": 16, "workspace_bytes": need - 1}, **big)
    with pytest.raises(ValueError, match="cache_size"):
        C.attention_decode_bf16(**ptrs, **{**ok, "cache_size": 0})
    with pytest.raises(ValueError, match="variant must be"):
        C.attention_decode_bf16(**ptrs, **ok, variant=3)
    C.attention_decode_bf16(**ptrs, **{**ok, "batch": 0})  # nothing to do, no CUDA call


@pytest.mark.skipif(not gk.kernels_built(), reason="kernels not built")
def test_binding_without_gpu_raises_clear_error():
    C = _C()
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="no usable NVIDIA GPU"):
        C.attention_decode_bf16(16, 16, 16, 16, 16, 16, 0, 0, 1, 16, 64, 8, 64, 0, 0.125, 0)


# ---- SASS (no GPU) ----

@pytest.fixture(scope="module")
def decode_kernels():
    if not gk.kernels_built():
        pytest.skip(f"kernels not built: {gk.kernels_error()}")
    if sass.cuobjdump() is None:
        pytest.skip("cuobjdump not found (pip install triton)")
    ks = {k.name: k for k in sass.kernels(gk.library_path()).values()
          if "attention_decode" in k.name or "rope_kernel" in k.name or "cache_append_kernel" in k.name}
    if not any("attention_decode_kernel" in n for n in ks):
        pytest.skip("this build predates the decode kernel (rebuild the package)")
    return ks


def test_decode_kernel_sass(decode_kernels):
    main = [k for n, k in decode_kernels.items() if "attention_decode_kernel(" in n]
    assert len(main) == 1
    k = main[0]
    assert "LDGSTS.E.BYPASS.128" in k.sass  # K/V tiles: 16-byte cp.async copies
    assert "LDG.E.128" in k.sass            # q rows: 16-byte loads
    assert "LDL" not in k.sass and "STL" not in k.sass and k.local == 0 and k.stack == 0
    assert k.reg <= 168, f"{k.reg} registers: fewer than 3 CTAs of 128 threads per SM"
    # the in-cluster merge of 2..8 splits: cluster barriers (arrive + wait) around the
    # distributed-shared-memory reads, in both decode kernels
    for n, kk in decode_kernels.items():
        if "attention_decode_kernel(" in n or "attention_decode_mma_kernel" in n:
            assert kk.sass.count("UCGABAR_WAIT") >= 2, n


def test_decode_mma_kernel_sass(decode_kernels):
    mma = [k for n, k in decode_kernels.items() if "attention_decode_mma_kernel" in n]
    assert len(mma) == 1
    k = mma[0]
    assert "HMMA.16816.F32.BF16" in k.sass and "LDSM.16.M88.4" in k.sass and "LDSM.16.MT88.4" in k.sass
    assert "LDGSTS.E.BYPASS.128" in k.sass
    assert "LDL" not in k.sass and "STL" not in k.sass and k.local == 0 and k.stack == 0


def test_rope_and_append_kernels_sass(decode_kernels):
    for n, k in decode_kernels.items():
        assert "LDL" not in k.sass and "STL" not in k.sass and k.local == 0, n
        if "rope_kernel" in n or "cache_append_kernel" in n:
            assert "STG.E.128" in k.sass, n


# ---- GPU ----

@pytest.fixture(params=[1, 2], ids=["fp32", "mma"])
def variant(request, monkeypatch):
    """Run a GPU test with each decode kernel (1: fp32 SIMT, 2: tensor cores; see gptoss/attention.h)."""
    from gptoss_kernels.ops import attention as A

    monkeypatch.setattr(A, "DECODE_VARIANT", request.param)
    return request.param


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _make_case(lengths, window, *, S=None, sinks=None, device="cuda"):
    """Cache with the visible positions of each sequence filled, every other slot NaN."""
    B = len(lengths)
    if S is None:
        S = 128 if window is not None else max(lengths) + 3
    q = torch.randn(B, 64, 64, device=device).to(torch.bfloat16)
    kc = torch.full((B, S, 8, 64), float("nan"), dtype=torch.bfloat16, device=device)
    vc = torch.full((B, S, 8, 64), float("nan"), dtype=torch.bfloat16, device=device)
    for b, L in enumerate(lengths):
        lo = max(0, L - (window or L), L - S)
        slots = R.cache_slots(torch.arange(lo, L, device=device), S)
        kc[b, slots] = (torch.randn(L - lo, 8, 64, device=device) * 1.5).to(torch.bfloat16)
        vc[b, slots] = torch.randn(L - lo, 8, 64, device=device).to(torch.bfloat16)
    lens = torch.tensor(lengths, dtype=torch.int32, device=device)
    if sinks is None:
        sinks = torch.randn(64, device=device) * 2
    return q, kc, vc, lens, sinks.to(torch.bfloat16).to(device)


def _check(q, kc, vc, lens, sinks, window, tol=1e-2):
    out = torch.full_like(q, float("nan"))
    got = gk.attention_decode(q, kc, vc, lens, sinks, sliding_window=window, out=out)
    torch.cuda.synchronize()
    assert got is out
    # the reference must not see the NaN slots: it reads only the visible ones
    want = R.attention_decode(q, kc, vc, lens, sinks, sliding_window=window)
    assert not torch.isnan(got).any()
    # per (sequence, head): a +20 sink makes a head's output tiny, judge it on its own scale
    rel = (got.double() - want.double()).norm(dim=-1) / want.double().norm(dim=-1).clamp_min(1e-30)
    worst = rel.max().item()
    b, h = divmod(int(rel.argmax().item()), rel.shape[1])
    assert worst < tol, f"b={b} L={lens[b].item()} h={h}: rel {worst:.2e}"
    print(f"attention_decode lengths={lens.tolist()[:8]} window={window}: worst per-head rel {worst:.2e}, "
          f"overall {_rel(got, want):.2e}")
    return worst


LENGTHS = [1, 2, 127, 128, 129, 1000, 8193]


@pytest.mark.gpu
@pytest.mark.parametrize("window", [None, 128])
@pytest.mark.parametrize("L", LENGTHS)
def test_decode_matches_reference(L, window, variant):
    _check(*_make_case([L], window), window)


@pytest.mark.gpu
@pytest.mark.parametrize("window", [None, 128])
def test_decode_ragged_batch(window, variant):
    lengths = [1, 129, 1000, 8193, 5, 128, 2, 4096]
    _check(*_make_case(lengths, window), window)


@pytest.mark.gpu
@pytest.mark.parametrize("window", [None, 128])
def test_decode_strong_sinks(window, variant):
    sinks = torch.where(torch.arange(64) % 2 == 0, 20.0, -20.0)
    sinks[5] = 0.0
    _check(*_make_case([3, 300, 2000], window, sinks=sinks), window)


@pytest.mark.gpu
def test_decode_large_preallocated_cache_mostly_empty_splits(variant):
    # S from the allocation (many splits), lengths short: most splits are empty partials
    _check(*_make_case([1, 100, 700], None, S=32768), None)


@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 64])
def test_decode_batch_sizes(B, variant):
    lengths = torch.randint(1, 3000, (B,)).tolist()
    _check(*_make_case(lengths, None), None)


@pytest.mark.gpu
@pytest.mark.parametrize("B,S,window,want_splits", [(1, 128, 128, 2), (4, 300, 128, 2), (3, 400, None, 7),
                                                    (1, 512, None, 8), (2, 600, None, 10)])
def test_decode_cluster_merge_equals_combine_kernel(B, S, window, want_splits, variant, monkeypatch):
    """2..8 splits merge inside their thread-block cluster (distributed shared memory); the
    combine kernel (forced with DECODE_NO_CLUSTER, and used above 8 splits) gives the same bits."""
    from gptoss_kernels.ops import attention as A

    assert _lib.C().attention_decode_num_splits(B, S, 64, 8, 64, window or 0) == want_splits
    q, kc, vc, lens, sinks = _make_case([max(1, S - 13 * b) for b in range(B)], window, S=S)
    out = {}
    for forced in (False, True):
        monkeypatch.setattr(A, "DECODE_VARIANT", variant | (A.DECODE_NO_CLUSTER if forced else 0))
        out[forced] = gk.attention_decode(q, kc, vc, lens, sinks, sliding_window=window, out=torch.full_like(q, float("nan")))
    assert torch.equal(out[False].view(torch.int16), out[True].view(torch.int16))
    _check(q, kc, vc, lens, sinks, window)


@pytest.mark.gpu
def test_decode_huge_window_equals_full(variant):
    # the op clamps a window beyond int32 (the C ABI's type) to 2^30: same split plan, same keys
    q, kc, vc, lens, sinks = _make_case([300, 5], None)
    full = gk.attention_decode(q, kc, vc, lens, sinks, sliding_window=None)
    huge = gk.attention_decode(q, kc, vc, lens, sinks, sliding_window=2 ** 40)
    assert torch.equal(full, huge)


@pytest.mark.gpu
def test_decode_longest_context(variant):
    _check(*_make_case([131072], None), None)


@pytest.mark.gpu
@pytest.mark.parametrize("S", [4096, 320], ids=["combine-16-splits", "cluster-5-splits"])
def test_decode_cuda_graph_replay_equals_eager(variant, S):
    """Captured and replayed with other lengths: the same bits as eager calls, through the
    combine kernel (B=2, S=4096: 16 splits) and through the in-cluster merge (S=320: 5 splits)."""
    from gptoss_kernels.ops import attention as A

    splits = _lib.C().attention_decode_num_splits(2, S, 64, 8, 64, 0)
    assert (splits > A.MAX_CLUSTER_SPLITS) == (S == 4096)
    q, kc, vc, lens, sinks = _make_case([min(700, S), min(3000, S - 1)], None, S=S)
    # fill the rest of the cache so that changing the lengths stays within written slots
    kc[torch.isnan(kc)] = 0.5
    vc[torch.isnan(vc)] = -0.25
    out = torch.empty_like(q)
    gk.attention_decode(q, kc, vc, lens, sinks, sliding_window=None, out=out)  # warm-up
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        gk.attention_decode(q, kc, vc, lens, sinks, sliding_window=None, out=out)
    for new in ([1, S], [S // 2 + 1, 17], [min(700, S), min(3000, S - 1)]):
        lens.copy_(torch.tensor(new, dtype=torch.int32))
        q.copy_(torch.randn_like(q, dtype=torch.float32).to(torch.bfloat16))
        out.fill_(float("nan"))
        g.replay()
        eager = gk.attention_decode(q, kc, vc, lens, sinks, sliding_window=None)
        torch.cuda.synchronize()
        assert torch.equal(out, eager), new
        assert _rel(out, R.attention_decode(q, kc, vc, lens, sinks)) < 1e-2


@pytest.mark.gpu
def test_decode_after_fused_append_matches_reference_pipeline(variant):
    # the decode step as the model runs it: RoPE + append, then attention over the cache
    B, S = 3, 512
    lengths = [5, 200, 512]
    q0, kc, vc, _, sinks = _make_case([L - 1 if L > 1 else 1 for L in lengths], None, S=S)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    qkv = (torch.randn(B, (64 + 16) * 64, device="cuda") * 2).to(torch.bfloat16)
    pos = torch.tensor([L - 1 for L in lengths], dtype=torch.int32, device="cuda")
    seq = torch.arange(B, dtype=torch.int32, device="cuda")
    q = gk.rope_and_cache_append(qkv, seq, pos, kc, vc)
    lens = pos + 1
    got = gk.attention_decode(q, kc, vc, lens, sinks, sliding_window=None)
    qr, kr, vr = gk.rope_qkv(qkv.cpu(), pos.cpu())
    kc_ref, vc_ref = kc_ref.cpu(), vc_ref.cpu()
    gk.cache_append(kr, vr, kc_ref, vc_ref, seq.cpu(), pos.cpu())
    want = R.attention_decode(qr, kc_ref, vc_ref, lens.cpu(), sinks.cpu())
    torch.cuda.synchronize()
    assert _rel(got.cpu(), want) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 8, 64])
@pytest.mark.parametrize("L", [8192, 32768, 131072])
def test_decode_bandwidth_report(L, B, variant):
    """Not a pass/fail performance gate: prints the fraction of copy bandwidth the kernel reaches on
    the K/V bytes it must read (goal >= 80%); run with -s. Asserts only a sane result."""
    kc = torch.empty(B, L, 8, 64, dtype=torch.bfloat16, device="cuda").normal_()
    vc = torch.empty_like(kc).normal_()
    q = torch.randn(B, 64, 64, device="cuda").to(torch.bfloat16)
    lens = torch.full((B,), L, dtype=torch.int32, device="cuda")
    sinks = torch.randn(64, device="cuda").to(torch.bfloat16)
    out = torch.empty_like(q)

    def timed(fn, iters=20):
        for _ in range(3):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / iters

    t = timed(lambda: gk.attention_decode(q, kc, vc, lens, sinks, sliding_window=None, out=out))
    dst = torch.empty_like(kc)
    t_copy = timed(lambda: dst.copy_(kc))
    kv_bytes = 2 * kc.numel() * 2
    copy_bw = 2 * kc.numel() * 2 / t_copy  # read + write
    frac = (kv_bytes / t) / copy_bw
    print(f"\nattention_decode variant={variant} B={B} L={L}: {t * 1e6:.1f} us, {kv_bytes / t / 1e9:.0f} GB/s on K/V = "
          f"{frac:.0%} of copy bandwidth ({copy_bw / 1e9:.0f} GB/s); splits="
          f"{_lib.C().attention_decode_num_splits(B, L, 64, 8, 64, 0)}")
    assert not torch.isnan(out).any() and frac > 0.05


# ---- lane-level emulation of the mma.sync path (CPU) ----------------------------------------------
# The fragment semantics below are the PTX ISA's (written from the ISA's tables, not from the
# kernel): ldmatrix .m8n8.x4 .b16 -- lane l gives the address of row l % 8 of matrix l // 8 and
# receives in register j row l // 4, columns 2 (l % 4), +1 of matrix j (.trans: rows 2 (l % 4), +1
# of column l // 4); mma.m16n8k16 .row.col bf16 -- A regs {(g, 2t), (g+8, 2t), (g, 2t+8),
# (g+8, 2t+8)}, B regs {(k=2t, n=g), (k=2t+8, n=g)}, C/D {(g, 2t), (g+8, 2t)}, each a pair along the
# column (g = lane // 4, t = lane % 4). The emulators then follow the kernel's own index math line
# by line, so a wrong swizzle, fragment index, mask or tile range shows up as a mismatch against
# the reference on the CPU.
from .ptx_emulation import A_COL as _A_COL, A_ROW as _A_ROW, C_COL as _C_COL, C_ROW as _C_ROW  # noqa: E402
from .ptx_emulation import G as _G, LANE as _LANE, PAIR as _PAIR, T as _T  # noqa: E402
from .ptx_emulation import ldsm_x4 as _ldsm_x4, mma16816 as _mma16816  # noqa: E402
from .ptx_emulation import bf16 as _bf16  # noqa: E402


def test_emulated_fragments_multiply_matrices():
    """The fragment helpers themselves: ldmatrix + mma of plain row-major tiles give A B^T."""
    rng = np.random.default_rng(0)
    A = _bf16(rng.standard_normal((16, 16)))
    Bt = _bf16(rng.standard_normal((8, 16)))   # [n][k], k contiguous (the K tile of Q K^T)
    sa, sb = A.reshape(-1), Bt.reshape(-1)
    a = _ldsm_x4(sa, ((_LANE & 7) + ((_LANE >> 3) & 1) * 8) * 16 + (_LANE >> 4) * 8)
    b = _ldsm_x4(sb, (_LANE & 7) * 16 + (_LANE >> 3) * 8 % 16)[:, :2]
    d = _mma16816(a, b, np.zeros((32, 4), np.float32))
    D = np.zeros((16, 8))
    D[_C_ROW, _C_COL] = d
    np.testing.assert_allclose(D, A.astype(np.float64) @ Bt.T.astype(np.float64), rtol=1e-6, atol=1e-6)
    # .trans: a [k][n] tile (n contiguous) gives the same B operand
    Bkn = Bt.T.copy()  # [16 k][8 n]
    bt = _ldsm_x4(Bkn.reshape(-1), (((_LANE & 7) + ((_LANE >> 3) & 1) * 8) * 8), trans=True)[:, :2]
    np.testing.assert_array_equal(bt, b)


_LOG2E = np.float32(1.4426950408889634)


def _plan_chunk(B, S, nkv, window):
    """attention_decode.cu plan_splits (the chunk; the binding gives the split count to check it)."""
    n = window if 0 < window < S else S
    heads = max(B * nkv, 1)
    want = -(-264 // heads)
    chunk = -(-(-(-n // want)) // 64) * 64
    return min(max(chunk, 64), 2048)


def _emulate_decode_mma(q, kc, vc, lens, sinks, window, sm_scale, splits):
    """attention_decode_mma_kernel + merge_warps_and_store<1> + attention_decode_combine_kernel,
    lane by lane (fp32 where the kernel is fp32, P rounded to bf16 like pack_bf16x2)."""
    q, kc, vc = q.float().numpy(), kc.float().numpy(), vc.float().numpy()
    sinks = sinks.float().numpy()
    B, nq, d = q.shape
    S, nkv = kc.shape[1], kc.shape[2]
    chunk = _plan_chunk(B, S, nkv, window)
    n_max = window if 0 < window < S else S
    assert splits == -(-n_max // chunk), "the emulated split plan differs from the library's"
    qk_scale = np.float32(sm_scale) * _LOG2E
    out = np.full((B, nq, d), np.nan, np.float32)
    lm, lr = _LANE >> 3, _LANE & 7
    cg, cc = _LANE >> 3, _LANE & 7
    for b in range(B):
        L = int(lens[b])
        end = max(L, 0)
        start = 0
        if window > 0:
            start = max(start, end - window)
        start = max(start, end - S)
        for kvh in range(nkv):
            parts = []
            for split in range(splits):
                k0 = start + split * chunk
                k1 = min(end, k0 + chunk)
                n = max(0, k1 - k0)
                n_tiles = (n + 15) // 16
                # A fragments of q: head g; regs 1 and 3 (rows 8..15) are zero
                qh = q[b, kvh * 8 + _G]  # [32, 64]
                qa = [np.stack([np.take_along_axis(qh, 16 * ks + 2 * _T[:, None] + _PAIR, 1),
                                np.zeros((32, 2), np.float32),
                                np.take_along_axis(qh, 16 * ks + 8 + 2 * _T[:, None] + _PAIR, 1),
                                np.zeros((32, 2), np.float32)], 1) for ks in range(4)]
                warp_state = []
                for warp in range(4):
                    o = np.zeros((8, 32, 4), np.float32)
                    m = np.full(32, -np.inf, np.float32)
                    l = np.zeros(32, np.float32)
                    my_tiles = (n_tiles - warp + 3) // 4 if n_tiles > warp else 0
                    for i in range(my_tiles):
                        tile = np.full((2, 16, 8, 8), np.nan, np.float32)  # [K|V][key][chunk][8]
                        pos0 = k0 + (warp + 4 * i) * 16 + cg
                        slot = pos0 % S
                        for r in range(4):
                            key = 4 * r + cg
                            valid = pos0 + 4 * r < k1
                            for ln in range(32):
                                src_k = kc[b, slot[ln], kvh, cc[ln] * 8:cc[ln] * 8 + 8] if valid[ln] else 0.0
                                src_v = vc[b, slot[ln], kvh, cc[ln] * 8:cc[ln] * 8 + 8] if valid[ln] else 0.0
                                tile[0, key[ln], cc[ln] ^ (key[ln] & 7)] = src_k
                                tile[1, key[ln], cc[ln] ^ (key[ln] & 7)] = src_v
                            slot = slot + 4
                            slot = np.where(slot >= S, slot - S, slot)
                            while np.any(slot >= S):
                                slot = np.where(slot >= S, slot - S, slot)
                        assert not np.isnan(tile).any(), "a tile element was never written"
                        flat = tile.reshape(-1)
                        elem = lambda kv, key, ch: ((kv * 16 + key) * 8 + (ch ^ (key & 7))) * 8
                        base = k0 + (warp + 4 * i) * 16
                        s = [np.zeros((32, 4), np.float32), np.zeros((32, 4), np.float32)]
                        for ks in range(4):
                            key = (lm >> 1) * 8 + lr
                            ch = 2 * ks + (lm & 1)
                            kb = _ldsm_x4(flat, elem(0, key, ch))
                            s[0] = _mma16816(qa[ks], kb[:, 0:2], s[0])
                            s[1] = _mma16816(qa[ks], kb[:, 2:4], s[1])
                        x = np.empty((32, 4), np.float32)
                        for j in range(2):
                            for e in range(2):
                                key = base + 8 * j + 2 * _T + e
                                x[:, 2 * j + e] = np.where(key < k1, s[j][:, e] * qk_scale, -np.inf)
                        tmax = x.max(1)
                        tmax = np.maximum(tmax, tmax[_LANE ^ 1])
                        tmax = np.maximum(tmax, tmax[_LANE ^ 2])
                        m_new = np.maximum(m, tmax)
                        alpha = np.where(m == m_new, 1.0, np.where(m == -np.inf, 0.0, np.exp2(m - m_new))).astype(np.float32)
                        m = m_new
                        l = l * alpha
                        pr = np.where(x == -np.inf, 0.0, np.exp2(x - m[:, None])).astype(np.float32)
                        l = l + pr.sum(1, dtype=np.float32)
                        o[:, :, 0] *= alpha
                        o[:, :, 1] *= alpha
                        pb = _bf16(pr)
                        pa = np.stack([pb[:, 0:2], np.zeros((32, 2), np.float32), pb[:, 2:4],
                                       np.zeros((32, 2), np.float32)], 1)
                        for nt in range(0, 8, 2):
                            key = (lm & 1) * 8 + lr
                            ch = nt + (lm >> 1)
                            vb = _ldsm_x4(flat, elem(1, key, ch), trans=True)
                            o[nt] = _mma16816(pa, vb[:, 0:2], o[nt])
                            o[nt + 1] = _mma16816(pa, vb[:, 2:4], o[nt + 1])
                    l = l + l[_LANE ^ 1]
                    l = l + l[_LANE ^ 2]
                    # ms.o[warp][0][g][8 nt + 2t .. +1], ms.m/l[warp][g] from t == 0
                    ow = np.zeros((8, 64), np.float32)
                    for nt in range(8):
                        ow[_G, 8 * nt + 2 * _T] = o[nt][:, 0]
                        ow[_G, 8 * nt + 2 * _T + 1] = o[nt][:, 1]
                    warp_state.append((m[_T == 0], l[_T == 0], ow))
                # merge the warps (softmax_merge semantics)
                am, al, ao = np.full(8, -np.inf, np.float32), np.zeros(8, np.float32), np.zeros((8, 64), np.float32)
                for wm, wl, wo in warp_state:
                    mm = np.maximum(am, wm)
                    sa = np.where(am == mm, 1.0, np.where(am == -np.inf, 0.0, np.exp2(am - mm)))
                    sb = np.where(wm == mm, 1.0, np.where(wm == -np.inf, 0.0, np.exp2(wm - mm)))
                    am, al, ao = mm, al * sa + wl * sb, ao * sa[:, None] + wo * sb[:, None]
                parts.append((am, al, ao))
            # combine the splits, then the sink once
            am, al, ao = np.full(8, -np.inf, np.float32), np.zeros(8, np.float32), np.zeros((8, 64), np.float32)
            for wm, wl, wo in parts:
                mm = np.maximum(am, wm)
                sa = np.where(am == mm, 1.0, np.where(am == -np.inf, 0.0, np.exp2(am - mm)))
                sb = np.where(wm == mm, 1.0, np.where(wm == -np.inf, 0.0, np.exp2(wm - mm)))
                am, al, ao = mm, al * sa + wl * sb, ao * sa[:, None] + wo * sb[:, None]
            sink2 = sinks[kvh * 8:kvh * 8 + 8] * _LOG2E
            M = np.maximum(am, sink2)
            sc = np.where(am == M, 1.0, np.where(am == -np.inf, 0.0, np.exp2(am - M)))
            z = al * sc + np.where(sink2 == M, 1.0, np.exp2(sink2 - M))
            f = np.where(z > 0, sc / np.where(z > 0, z, 1.0), 0.0)
            out[b, kvh * 8:kvh * 8 + 8] = ao * f[:, None]
    return torch.from_numpy(out).to(torch.bfloat16)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # exp2(-inf - -inf), masked by where
@pytest.mark.parametrize("S,lengths,window", [
    (16, [1, 5, 16], 0),          # L = 1, a tail, L = S
    (40, [17, 33, 40], 0),        # tails not a multiple of the 16-key tile, several warps
    (32, [70, 32, 33], 32),       # ring buffer: wrap, L = S = W, L = W + 1
    (48, [70, 40, 20], 32),       # window shorter than the cache (the window, not S, bounds the keys)
    (256, [256, 200, 3], 0),      # several splits (chunk 64), an empty split, the combine
    (128, [300, 129, 128], 128),  # sliding layer: 128-slot ring, window incl. the current token
])
def test_emulated_mma_decode_matches_reference(S, lengths, window):
    """CPU evidence for attention_decode_mma_kernel's index math: split plan, warp tiles, ring-buffer
    slots, swizzled tile, ldmatrix/mma fragments, masking, online softmax, warp merge, combine and
    the sink, emulated lane by lane against reference.attention_decode."""
    B, nkv = len(lengths), 1
    torch.manual_seed(S + len(lengths))
    q = (torch.randn(B, 8 * nkv, 64) * 0.5).to(torch.bfloat16)
    kc = torch.randn(B, S, nkv, 64).to(torch.bfloat16)
    vc = torch.randn(B, S, nkv, 64).to(torch.bfloat16)
    sinks = torch.randn(8 * nkv).to(torch.bfloat16)
    lens = torch.tensor(lengths, dtype=torch.int32)
    splits = _C().attention_decode_num_splits(B, S, 8 * nkv, nkv, 64, window)
    if S == 256:
        assert splits > 1
    got = _emulate_decode_mma(q, kc, vc, lens, sinks, window, 0.125, splits)
    ref = R.attention_decode(q, kc, vc, lens, sinks, sliding_window=window or None)
    err = ((got.double() - ref.double()).norm() / ref.double().norm()).item()
    assert err < 1e-2, err


def _transpose_reduce8(acc: np.ndarray) -> np.ndarray:
    """attention_decode.cu transpose_reduce8 with shuffles: acc [32, 8] -> [32] (lane c of a group of
    8 returns the group's sum of acc[:, c])."""
    acc = acc.copy()
    c = _LANE & 7
    for width, xor in ((4, 4), (2, 2), (1, 1)):
        up = (c & xor) != 0
        send = np.where(up[:, None], acc[:, :width], acc[:, width:2 * width])
        keep = np.where(up[:, None], acc[:, width:2 * width], acc[:, :width])
        acc[:, :width] = keep + send[_LANE ^ xor]
    return acc[:, 0]


def _emulate_decode_fp32(q, kc, vc, lens, sinks, window, sm_scale, splits):
    """attention_decode_kernel (the default variant) + merge_warps_and_store<4> + combine, lane by
    lane: lane (g = lane / 8, c = lane % 8) holds dims 8c..8c+7 of key 4r + g."""
    q, kc, vc = q.float().numpy(), kc.float().numpy(), vc.float().numpy()
    sinks = sinks.float().numpy()
    B, nq, d = q.shape
    S, nkv = kc.shape[1], kc.shape[2]
    chunk = _plan_chunk(B, S, nkv, window)
    qk_scale = np.float32(sm_scale) * _LOG2E
    g, c = _LANE >> 3, _LANE & 7
    out = np.full((B, nq, d), np.nan, np.float32)

    def merge(states):
        am, al, ao = np.full(8, -np.inf, np.float32), np.zeros(8, np.float32), np.zeros((8, 64), np.float32)
        for wm, wl, wo in states:
            mm = np.maximum(am, wm)
            sa = np.where(am == mm, 1.0, np.where(am == -np.inf, 0.0, np.exp2(am - mm)))
            sb = np.where(wm == mm, 1.0, np.where(wm == -np.inf, 0.0, np.exp2(wm - mm)))
            am, al, ao = mm, al * sa + wl * sb, ao * sa[:, None] + wo * sb[:, None]
        return am, al, ao

    for b in range(B):
        L = int(lens[b])
        end = max(L, 0)
        start = 0
        if window > 0:
            start = max(start, end - window)
        start = max(start, end - S)
        for kvh in range(nkv):
            # qf[lane][h][i] = q[head 8 kvh + h][8c + i] * qk_scale
            qf = q[b, kvh * 8:kvh * 8 + 8][:, (8 * c)[:, None] + np.arange(8)].transpose(1, 0, 2) * qk_scale
            parts = []
            for split in range(splits):
                k0 = start + split * chunk
                k1 = min(end, k0 + chunk)
                n = max(0, k1 - k0)
                n_tiles = (n + 15) // 16
                warp_state = []
                for warp in range(4):
                    o = np.zeros((32, 8, 8), np.float32)   # [lane][h][j]
                    m = np.full(32, -np.inf, np.float32)
                    l = np.zeros(32, np.float32)
                    my_tiles = (n_tiles - warp + 3) // 4 if n_tiles > warp else 0
                    for i in range(my_tiles):
                        pos0 = k0 + (warp + 4 * i) * 16 + g
                        slot = pos0 % S
                        kv = np.zeros((2, 4, 32, 8), np.float32)  # [K|V][r][lane]: what each lane copied
                        for r in range(4):
                            valid = pos0 + 4 * r < k1
                            kv[0, r] = np.where(valid[:, None], kc[b, slot, kvh][np.arange(32)[:, None], (8 * c)[:, None] + np.arange(8)], 0)
                            kv[1, r] = np.where(valid[:, None], vc[b, slot, kvh][np.arange(32)[:, None], (8 * c)[:, None] + np.arange(8)], 0)
                            slot = slot + 4
                            while np.any(slot >= S):
                                slot = np.where(slot >= S, slot - S, slot)
                        s = np.empty((32, 4), np.float32)
                        for r in range(4):
                            acc = qf[:, :, 0] * kv[0, r][:, None, 0]
                            for j in range(1, 8):
                                acc = (qf[:, :, j] * kv[0, r][:, None, j] + acc).astype(np.float32)
                            logit = _transpose_reduce8(acc)
                            s[:, r] = np.where(pos0 + 4 * r < k1, logit, -np.inf)
                        tmax = s.max(1)
                        tmax = np.maximum(tmax, tmax[_LANE ^ 8])
                        tmax = np.maximum(tmax, tmax[_LANE ^ 16])
                        m_new = np.maximum(m, tmax)
                        alpha = np.where(m == m_new, 1.0, np.where(m == -np.inf, 0.0, np.exp2(m - m_new))).astype(np.float32)
                        m = m_new
                        l = l * alpha
                        pr = np.where(s == -np.inf, 0.0, np.exp2(s - m[:, None])).astype(np.float32)
                        l = l + pr.sum(1, dtype=np.float32)
                        o *= alpha[np.arange(8)][None, :, None]           # head h's factor from lane h
                        for r in range(4):
                            ph = pr[(g << 3)[:, None] | np.arange(8), r]  # [lane][h] from lane (g, h)
                            o += ph[:, :, None] * kv[1, r][:, None, :]
                    l = l + l[_LANE ^ 8]
                    l = l + l[_LANE ^ 16]
                    ow = np.zeros((4, 8, 64), np.float32)  # ms.o[warp][group][head][dim]
                    for ln in range(32):
                        ow[g[ln], :, 8 * c[ln]:8 * c[ln] + 8] = o[ln]
                    warp_state.append((m[:8].copy(), l[:8].copy(), ow.sum(0)))  # g == 0 lanes: head c
                parts.append(merge(warp_state))
            am, al, ao = merge(parts)
            sink2 = sinks[kvh * 8:kvh * 8 + 8] * _LOG2E
            M = np.maximum(am, sink2)
            sc = np.where(am == M, 1.0, np.where(am == -np.inf, 0.0, np.exp2(am - M)))
            z = al * sc + np.where(sink2 == M, 1.0, np.exp2(sink2 - M))
            f = np.where(z > 0, sc / np.where(z > 0, z, 1.0), 0.0)
            out[b, kvh * 8:kvh * 8 + 8] = ao * f[:, None]
    return torch.from_numpy(out).to(torch.bfloat16)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("S,lengths,window", [
    (16, [1, 5, 16], 0),
    (40, [17, 33, 40], 0),
    (32, [70, 32, 33], 32),
    (48, [70, 40, 20], 32),
    (256, [256, 200, 3], 0),
])
def test_emulated_fp32_decode_matches_reference(S, lengths, window):
    """The same for attention_decode_kernel (variant 1, the library default): the lane mapping,
    transpose_reduce8's shuffles, the max/alpha/probability shuffles and the 4-group merge."""
    B, nkv = len(lengths), 1
    torch.manual_seed(S + 7 * len(lengths))
    q = (torch.randn(B, 8 * nkv, 64) * 0.5).to(torch.bfloat16)
    kc = torch.randn(B, S, nkv, 64).to(torch.bfloat16)
    vc = torch.randn(B, S, nkv, 64).to(torch.bfloat16)
    sinks = torch.randn(8 * nkv).to(torch.bfloat16)
    lens = torch.tensor(lengths, dtype=torch.int32)
    splits = _C().attention_decode_num_splits(B, S, 8 * nkv, nkv, 64, window)
    got = _emulate_decode_fp32(q, kc, vc, lens, sinks, window, 0.125, splits)
    ref = R.attention_decode(q, kc, vc, lens, sinks, sliding_window=window or None)
    err = ((got.double() - ref.double()).norm() / ref.double().norm()).item()
    assert err < 5e-3, err  # fp32 throughout: only the output rounding to bf16 remains
