"""Decode attention over the KV cache (sinks, sliding window, GQA; spec §4.2 steps 4-7).

CPU: the online-softmax state and merge with the sink (softmax.cuh via _C.host) against a float64
one-pass sink softmax, the split plan (pure function of the sizes), the op's argument checks,
the bindings' argument errors, the kernel's SASS (16-byte loads, no local memory).
GPU (on the GPU, else on the host build of the kernels: tests/kernel_device.py): both kernels
against reference.attention_decode over context lengths, small caches (tile tails, empty splits),
windows (ring buffer of 128 slots), ragged batches, strongly positive/negative sinks, poisoned
outputs and unused cache slots, the in-cluster merge against the combine kernel; on the GPU only:
CUDA-graph replay and the bandwidth report.

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
from .kernel_device import DEV, HOPPER_PATHS, ON_HOSTSIM, shrink, sync


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


def test_split_plan_follows_the_length_not_the_capacity():
    """Each sequence uses the splits its own length needs (chosen on the device from
    cache_seqlens), never more than the grid holds, and the same at every capacity that holds it."""
    C = _C()
    if not hasattr(C, "attention_decode_splits_used"):
        pytest.skip("this build predates the per-length split plan (rebuild the package)")
    rng = np.random.default_rng()
    for B in (1, 3, 64):
        for S in (128, 2048, 8193, 131072):
            for W in (0, 128):
                grid = C.attention_decode_num_splits(B, S, 64, 8, 64, W)
                lengths = {1, 2, 64, 65, 127, 128, 129, S - 1, S, *rng.integers(1, S + 1, 40).tolist()}
                for L in (L for L in lengths if W or L <= S):  # full attention: the cache holds L
                    used = C.attention_decode_splits_used(B, S, 64, 8, 64, W, L)
                    assert 1 <= used <= grid, (B, S, W, L, used, grid)
                    # a sequence's plan does not depend on the capacity that holds it
                    assert used == C.attention_decode_splits_used(B, 131072, 64, 8, 64, W, L)
                    if L <= 64:
                        assert used == 1
    # 1k positions at batch 1: the same few splits whether the cache holds 2k or 131072 positions
    assert C.attention_decode_splits_used(1, 2048, 64, 8, 64, 0, 1000) == 16
    assert C.attention_decode_num_splits(1, 131072, 64, 8, 64, 0) == 64


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


# ---- GPU (on the GPU, else on the host build of the kernels: tests/kernel_device.py) ----

# KV heads of the GPU cases (8 query heads each, the kernels' only group size): gpt-oss's 8 on the
# GPU, 2 on the host build (emulation cost: every KV head is one more row of CTAs; 2 still exercise
# the KV-head offsets of q, the cache, the sinks and the output).
NKV = shrink(8, 2)


@pytest.fixture(params=[1, 2], ids=["fp32", "mma"])
def variant(request, monkeypatch):
    """Run a GPU test with each decode kernel (1: fp32 SIMT, 2: tensor cores; see gptoss/attention.h)."""
    from gptoss_kernels.ops import attention as A

    monkeypatch.setattr(A, "DECODE_VARIANT", request.param)
    return request.param


def _num_splits(B, S, window, nkv=NKV):
    return _lib.kernels(DEV).attention_decode_num_splits(B, S, 8 * nkv, nkv, 64, window or 0)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _make_case(lengths, window, *, S=None, sinks=None, nkv=NKV, device=DEV):
    """Cache with the visible positions of each sequence filled, every other slot NaN."""
    B = len(lengths)
    if S is None:
        S = 128 if window is not None else max(lengths) + 3
    q = torch.randn(B, 8 * nkv, 64, device=device).to(torch.bfloat16)
    kc = torch.full((B, S, nkv, 64), float("nan"), dtype=torch.bfloat16, device=device)
    vc = torch.full((B, S, nkv, 64), float("nan"), dtype=torch.bfloat16, device=device)
    for b, L in enumerate(lengths):
        lo = max(0, L - (window or L), L - S)
        slots = R.cache_slots(torch.arange(lo, L, device=device), S)
        kc[b, slots] = (torch.randn(L - lo, nkv, 64, device=device) * 1.5).to(torch.bfloat16)
        vc[b, slots] = torch.randn(L - lo, nkv, 64, device=device).to(torch.bfloat16)
    lens = torch.tensor(lengths, dtype=torch.int32, device=device)
    if sinks is None:
        sinks = torch.randn(8 * nkv, device=device) * 2
    return q, kc, vc, lens, sinks.to(torch.bfloat16).to(device)


def _check(q, kc, vc, lens, sinks, window, tol=1e-2, got=None):
    """The kernel (into a NaN-poisoned output; or `got`, a result computed so) against the reference."""
    if got is None:
        out = torch.full_like(q, float("nan"))
        got = gk.attention_decode(q, kc, vc, lens, sinks, sliding_window=window, out=out)
        sync()
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
@pytest.mark.parametrize("S,lengths,window", [
    (16, [1, 5, 16], None),         # L = 1, a tail, L = S
    (40, [17, 33, 40], None),       # tails not a multiple of the 16-key tile, several warps
    (32, [70, 32, 33], 32),         # ring buffer: wrap, L = S = W, L = W + 1
    (48, [70, 40, 20], 32),         # window shorter than the cache (the window, not S, bounds the keys)
    (256, [256, 200, 3], None),     # several splits (chunk 64), an empty split, the merge of the splits
    (128, [300, 129, 128], 128),    # sliding layer: 128-slot ring, window incl. the current token
])
def test_decode_small_caches(S, lengths, window, variant):
    """Small caches with one KV head: tile tails, ring wraps, windows shorter than the cache, an
    empty split (the cases the former lane-level numpy emulations of both kernels covered)."""
    if S == 256:
        assert _num_splits(len(lengths), S, window, nkv=1) > 1
    _check(*_make_case(lengths, window, S=S, nkv=1), window)


@pytest.mark.gpu
@pytest.mark.parametrize("window", [None, 128])
def test_decode_ragged_batch(window, variant):
    lengths = [1, 129, 1000, 8193, 5, 128, 2, 4096]
    _check(*_make_case(lengths, window), window)


@pytest.mark.gpu
@pytest.mark.parametrize("window", [None, 128])
def test_decode_strong_sinks(window, variant):
    sinks = torch.where(torch.arange(8 * NKV) % 2 == 0, 20.0, -20.0)
    sinks[5] = 0.0
    _check(*_make_case([3, 300, 2000], window, sinks=sinks), window)


@pytest.mark.gpu
def test_decode_large_preallocated_cache_mostly_empty_splits(variant):
    # S from the allocation (many splits), lengths short: most splits are empty partials; the
    # 700-key sequence fills one split with several tiles per warp (the cp.async stages reused)
    assert _num_splits(3, 32768, None) > 8
    _check(*_make_case([1, 100, 700], None, S=32768), None)


@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 64])
def test_decode_batch_sizes(B, variant):
    # host build, B = 64: lengths below 60 (one split per sequence) instead of 3000 (emulation
    # cost: 64 sequences of up to 3000 keys); the 64 batch offsets stay
    lengths = torch.randint(1, shrink(3000, 60) if B == 64 else 3000, (B,)).tolist()
    _check(*_make_case(lengths, None), None)


def _combine_launches() -> int:
    """Launches of the combine kernel so far on the host build (its launch statistics)."""
    kernels = _lib.kernels(DEV).module.stats()["kernels"]
    return sum(n for name, n in kernels.items() if "attention_decode_combine_kernel" in name)


@pytest.mark.gpu
@pytest.mark.parametrize("B,S,window,want_splits", [(1, 128, 128, 2), (4, 300, 128, 2), (3, 400, None, 7),
                                                    (1, 512, None, 8), (2, 600, None, 10)])
def test_decode_cluster_merge_equals_combine_kernel(B, S, window, want_splits, variant, monkeypatch):
    """2..8 splits merge inside their thread-block cluster (distributed shared memory); the
    combine kernel (forced with DECODE_NO_CLUSTER, and used above 8 splits) gives the same bits."""
    from gptoss_kernels.ops import attention as A

    assert _num_splits(B, S, window) == want_splits
    q, kc, vc, lens, sinks = _make_case([max(1, S - 13 * b) for b in range(B)], window, S=S)
    out = {}
    for forced in (False, True):
        monkeypatch.setattr(A, "DECODE_VARIANT", variant | (A.DECODE_NO_CLUSTER if forced else 0))
        combines = _combine_launches()
        out[forced] = gk.attention_decode(q, kc, vc, lens, sinks, sliding_window=window, out=torch.full_like(q, float("nan")))
        if ON_HOSTSIM:  # the host build ran the path under test (a refused cluster falls back to the combine;
            # below sm_90 the combine kernel always merges)
            assert (_combine_launches() > combines) == (forced or want_splits > A.MAX_CLUSTER_SPLITS or not HOPPER_PATHS)
    sync()
    assert torch.equal(out[False].view(torch.int16), out[True].view(torch.int16))
    _check(q, kc, vc, lens, sinks, window, got=out[False])


@pytest.mark.gpu
@pytest.mark.parametrize("window", [None, 128])
def test_decode_work_follows_length_not_capacity(window, variant):
    """L = 1000 in a cache of 2048 and of 131072 positions: the same bits, and (on the host build,
    which counts every global access) the same CTAs reading the same cache bytes and the same
    workspace traffic; only the grid's idle CTAs differ, and they touch nothing but cache_seqlens."""
    L = 1000
    case = _make_case([L], window, S=2048)
    q, kc_small, vc_small, lens, sinks = case
    S_big = 131072
    kc_big = torch.full((1, S_big, NKV, 64), float("nan"), dtype=torch.bfloat16, device=DEV)
    vc_big = torch.full_like(kc_big, float("nan"))
    kc_big[:, :2048], vc_big[:, :2048] = kc_small, vc_small  # L <= 2048: the same slots hold the same keys
    used = _lib.kernels(DEV).attention_decode_splits_used(1, 2048, 8 * NKV, NKV, 64, window or 0, L)
    assert used == _lib.kernels(DEV).attention_decode_splits_used(1, S_big, 8 * NKV, NKV, 64, window or 0, L)
    out, traffic = {}, {}
    for name, kc, vc in (("small", kc_small, vc_small), ("big", kc_big, vc_big)):
        out[name] = gk.attention_decode(q, kc, vc, lens, sinks, sliding_window=window,
                                        out=torch.full_like(q, float("nan")))
        if ON_HOSTSIM:
            by_addr = {t["address"]: t for t in _lib.kernels(DEV).module.last_call_traffic()}
            k, v = by_addr[kc.data_ptr()], by_addr[vc.data_ptr()]
            traffic[name] = (k["blocks"], k["bytes_read"], v["blocks"], v["bytes_read"],
                             sum(t["bytes_written"] for t in by_addr.values()))
    sync()
    assert torch.equal(out["small"].view(torch.int16), out["big"].view(torch.int16))
    if ON_HOSTSIM:
        assert traffic["small"] == traffic["big"], traffic
        keys = min(L, window or L)
        k_blocks, k_read = traffic["small"][:2]
        assert k_blocks == NKV * used  # one CTA per used split and KV head, the others read no key
        assert k_read == keys * NKV * 64 * 2  # every visible key once, nothing else
    _check(q, kc_small, vc_small, lens, sinks, window, got=out["small"])


@pytest.mark.gpu
def test_decode_huge_window_equals_full(variant):
    # the op clamps a window beyond int32 (the C ABI's type) to 2^30: same split plan, same keys
    q, kc, vc, lens, sinks = _make_case([300, 5], None)
    full = gk.attention_decode(q, kc, vc, lens, sinks, sliding_window=None)
    huge = gk.attention_decode(q, kc, vc, lens, sinks, sliding_window=2 ** 40)
    sync()
    assert torch.equal(full, huge)


@pytest.mark.gpu
def test_decode_longest_context(variant):
    # host build: 32768 positions instead of 131072 (emulation cost: every key of every KV head is
    # emulated); still a long softmax over 129 splits of 256 keys (4 tiles per warp: the cp.async
    # stages reused) merged by the combine kernel
    _check(*_make_case([shrink(131072, 32768)], None), None)


@pytest.mark.gpu
@pytest.mark.cuda_only  # CUDA graph capture and replay
@pytest.mark.parametrize("S", [4096, 320], ids=["combine-16-splits", "cluster-5-splits"])
def test_decode_cuda_graph_replay_equals_eager(variant, S):
    """Captured and replayed with other lengths: the same bits as eager calls, through the
    combine kernel (B=2, S=4096: 16 splits) and through the in-cluster merge (S=320: 5 splits)."""
    from gptoss_kernels.ops import attention as A

    splits = _lib.C().attention_decode_num_splits(2, S, 64, 8, 64, 0)
    assert (splits > A.MAX_CLUSTER_SPLITS) == (S == 4096)
    q, kc, vc, lens, sinks = _make_case([min(700, S), min(3000, S - 1)], None, S=S, nkv=8, device="cuda")
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
    # (host build: 2 KV heads, NKV; the 512-slot cache of 8 splits merged in the cluster stays)
    B, S = 3, 512
    lengths = [5, 200, 512]
    q0, kc, vc, _, sinks = _make_case([L - 1 if L > 1 else 1 for L in lengths], None, S=S)
    kc_ref, vc_ref = kc.cpu().clone(), vc.cpu().clone()
    heads = dict(num_q_heads=8 * NKV, num_kv_heads=NKV)
    qkv = (torch.randn(B, (8 * NKV + 2 * NKV) * 64, device=DEV) * 2).to(torch.bfloat16)
    pos = torch.tensor([L - 1 for L in lengths], dtype=torch.int32, device=DEV)
    seq = torch.arange(B, dtype=torch.int32, device=DEV)
    q = gk.rope_and_cache_append(qkv, seq, pos, kc, vc, **heads)
    lens = pos + 1
    got = gk.attention_decode(q, kc, vc, lens, sinks, sliding_window=None)
    sync()
    # the reference of every step (on the host build CPU tensors would run the kernels)
    with _lib.use_backend("reference"):
        qr, kr, vr = gk.rope_qkv(qkv.cpu(), pos.cpu(), **heads)
        gk.cache_append(kr, vr, kc_ref, vc_ref, seq.cpu(), pos.cpu())
    want = R.attention_decode(qr, kc_ref, vc_ref, lens.cpu(), sinks.cpu())
    assert _rel(got.cpu(), want) < 1e-2


@pytest.mark.gpu
@pytest.mark.cuda_only  # timings with CUDA events against the device's copy bandwidth
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
