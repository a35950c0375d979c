"""gptoss_kernels.attention_prefill: argument checks, the reference (CPU) path against
reference.attention with explicit concatenated keys, the kernel's index/mask/online-softmax math
(csrc/flash_prefill.cuh through _C.host) against brute force, the kernel's SASS (mma.sync: HMMA +
LDSM, no local memory), and GPU tests of both kernels against the reference (on the GPU, else on
the host build of the kernels, tests/kernel_device.py).

GPU tolerance: relative Frobenius error 1e-2. The kernel rounds P (the softmax weights, in [0, 1])
to bf16 for the P·V tensor-core product (relative 2^-9 per weight, random in sign, so the output
error is ~2^-9/sqrt(keys) .. 2^-9 relative) and rounds the output to bf16 (2^-9 per element,
~2e-3 on the norm); logits are fp32 accumulations of exact bf16 products and the softmax runs in
fp32 (ex2.approx: ~2 ulp). Expected error ~3e-3; 1e-2 leaves headroom while a wrong mask, a
window off by one, a missed sink or a wrong cache slot give errors > 5e-2.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import gptoss_kernels
from gptoss_kernels import _lib, reference
from gptoss_kernels.ops import attention_prefill

from . import sass
from .kernel_device import DEV, ON_GPU, ON_HOSTSIM, shrink, sync

NQ, NKV, D = 64, 8, 64
TOL = 1e-2


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# ------------------------------------------------------------------------------------------------
# case construction shared by the CPU and GPU tests


def make_case(lengths, p0s, *, window, cache="full", nq=NQ, nkv=NKV, d=D, q_scale=2.0, sink_range=(-2.0, 2.0),
              device="cpu", poison_cache=True, gen=None):
    """Random packed chunks. Returns (args dict for attention_prefill, full per-sequence K/V lists).

    cache: None (p0s must be all 0), "full" (S = max(p0 + T) + 3, unwritten slots NaN) or "ring"
    (S = 128; positions < p0 written in order like cache_append would, then the slot of the
    oldest position that the window no longer needs (p0 - 128) is NaN, as are unwritten slots).
    """
    g = gen or torch.Generator().manual_seed(1234)
    B = len(lengths)
    Tq = sum(lengths)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32)
    full_k, full_v, qs = [], [], []
    for T, p0 in zip(lengths, p0s):
        L = p0 + T
        full_k.append(torch.randn(L, nkv, d, generator=g).bfloat16())
        full_v.append(torch.randn(L, nkv, d, generator=g).bfloat16())
        qs.append((torch.randn(T, nq, d, generator=g) * q_scale).bfloat16())
    q = torch.cat(qs) if Tq else torch.empty(0, nq, d, dtype=torch.bfloat16)
    k = torch.cat([fk[p0:] for fk, p0 in zip(full_k, p0s)]) if Tq else torch.empty(0, nkv, d, dtype=torch.bfloat16)
    v = torch.cat([fv[p0:] for fv, p0 in zip(full_v, p0s)]) if Tq else torch.empty(0, nkv, d, dtype=torch.bfloat16)
    lo, hi = sink_range
    sinks = (torch.rand(nq, generator=g) * (hi - lo) + lo).bfloat16()
    args = dict(q=q, k=k, v=v, sinks=sinks, cu_seqlens_q=cu, sliding_window=window)
    if cache is not None:
        S = max(p0 + T for T, p0 in zip(lengths, p0s)) + 3 if cache == "full" else 128
        kc = torch.full((B, S, nkv, d), float("nan"), dtype=torch.bfloat16)
        vc = torch.full((B, S, nkv, d), float("nan"), dtype=torch.bfloat16)
        for b, p0 in enumerate(p0s):
            pos = torch.arange(p0)
            if cache == "ring":
                pos = pos[max(0, p0 - S):]
            slots = reference.cache_slots(pos, S)
            kc[b, slots] = full_k[b][pos]
            vc[b, slots] = full_v[b][pos]
            if poison_cache and cache == "ring" and window is not None and p0 >= S and S >= window:
                stale = p0 - S  # no query of the chunk sees it (window <= S)
                kc[b, stale % S] = float("nan")
                vc[b, stale % S] = float("nan")
        args.update(k_cache=kc, v_cache=vc, cache_seqlens=torch.tensor(p0s, dtype=torch.int32))
    else:
        assert all(p0 == 0 for p0 in p0s)
    if device != "cpu":
        args = {n: (t.to(device) if isinstance(t, torch.Tensor) else t) for n, t in args.items()}
    return args, full_k, full_v


def expected(args, full_k, full_v, lengths, p0s, *, q_block=None, device=None):
    """reference.attention per sequence on explicit concatenated keys 0 .. p0+T-1 (float32),
    optionally over blocks of queries (memory: the logits are nq x q_block x keys)."""
    q, sinks, window = args["q"], args["sinks"], args["sliding_window"]
    dev = device or q.device
    out = torch.empty(q.shape, dtype=torch.float32, device=dev)
    start = 0
    for T, p0, fk, fv in zip(lengths, p0s, full_k, full_v):
        fk, fv = fk.to(dev), fv.to(dev)
        blk = q_block or max(T, 1)
        for i0 in range(0, T, blk):
            i1 = min(T, i0 + blk)
            first = 0 if window is None else max(0, p0 + i0 - window + 1)
            qq = q[start + i0:start + i1].to(dev).float()
            out[start + i0:start + i1] = reference.attention(
                qq, fk[first:p0 + i1].float(), fv[first:p0 + i1].float(), sinks.to(dev), sliding_window=window,
                q_offset=p0 + i0 - first)
        start += T
    return out


# ------------------------------------------------------------------------------------------------
# argument checks (CPU)


def _small(**kw):
    args, _, _ = make_case([5, 3], [0, 4], window=None, cache="full", **kw)
    return args


def test_args_dtype_and_shapes():
    a = _small()
    with pytest.raises(TypeError, match="q must have dtype bfloat16"):
        attention_prefill(**{**a, "q": a["q"].float()})
    with pytest.raises(ValueError, match="k must have shape"):
        attention_prefill(**{**a, "k": a["k"][:-1]})
    with pytest.raises(ValueError, match="v must have shape"):
        attention_prefill(**{**a, "v": a["v"][:, :4]})
    with pytest.raises(ValueError, match="sinks must have shape"):
        attention_prefill(**{**a, "sinks": a["sinks"][:-1]})
    with pytest.raises(ValueError, match="not a multiple"):
        attention_prefill(**{**a, "k": a["k"][:, :7].contiguous(), "v": a["v"][:, :7].contiguous(),
                             "k_cache": a["k_cache"][:, :, :7].contiguous(),
                             "v_cache": a["v_cache"][:, :, :7].contiguous()})
    with pytest.raises(TypeError, match="cu_seqlens_q must have dtype int32"):
        attention_prefill(**{**a, "cu_seqlens_q": a["cu_seqlens_q"].long()})
    with pytest.raises(ValueError, match="q must be contiguous"):
        attention_prefill(**{**a, "q": a["q"].transpose(0, 1).contiguous().transpose(0, 1)})


def test_args_cache():
    a = _small()
    with pytest.raises(ValueError, match="go together"):
        attention_prefill(**{**a, "v_cache": None})
    with pytest.raises(ValueError, match="go together"):
        attention_prefill(**{**a, "cache_seqlens": None})
    with pytest.raises(ValueError, match="k_cache must have shape"):
        attention_prefill(**{**a, "k_cache": a["k_cache"][:1]})
    with pytest.raises(ValueError, match="v_cache must have shape"):
        attention_prefill(**{**a, "v_cache": a["v_cache"][:, :-1]})
    with pytest.raises(ValueError, match="cache_seqlens must have shape"):
        attention_prefill(**{**a, "cache_seqlens": a["cache_seqlens"][:1]})
    with pytest.raises(TypeError, match="cache_seqlens must have dtype int32"):
        attention_prefill(**{**a, "cache_seqlens": a["cache_seqlens"].long()})
    # the reference path refuses a cache too small for the needed prefix
    b, _, _ = make_case([4], [200], window=None, cache="ring")
    with pytest.raises(ValueError, match="cache has 128 slots"):
        attention_prefill(**b)


def test_args_window_and_out():
    a = _small()
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="sliding_window must be a positive int"):
            attention_prefill(**{**a, "sliding_window": bad})
    with pytest.raises(ValueError, match="out must have shape"):
        attention_prefill(**a, out=torch.empty(8, NQ, D + 1, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="out must have dtype bfloat16"):
        attention_prefill(**a, out=torch.empty(8, NQ, D))
    with pytest.raises(TypeError):
        attention_prefill(a["q"], a["k"], a["v"], a["sinks"])  # sliding_window is required


# ------------------------------------------------------------------------------------------------
# reference (CPU) path: chunked prefill against explicit concatenated keys


@pytest.mark.parametrize("window", [None, 128])
@pytest.mark.parametrize("p0", [0, 5, 1000])
@pytest.mark.parametrize("cache", ["full", "ring"])
def test_reference_path_chunked(window, p0, cache):
    if cache == "ring" and window is None and p0 > 128:
        pytest.skip("a 128-slot ring cannot serve a full-causal prefix of 1000")
    lengths, p0s = [37, 1, 130], [p0, p0 + 3 if p0 else 0, p0]
    args, fk, fv = make_case(lengths, p0s, window=window, cache=cache)
    out = torch.full_like(args["q"], float("nan"))
    attention_prefill(**args, out=out)
    ref = expected(args, fk, fv, lengths, p0s)
    assert not out.isnan().any()
    # both compute in float32 from the same bf16 inputs; they differ in key order/offsets only
    assert rel_err(out, ref) < 2e-3, rel_err(out, ref)
    torch.testing.assert_close(out.float(), ref.to(torch.bfloat16).float(), atol=1e-2, rtol=1e-2)


def test_reference_path_default_single_sequence():
    args, fk, fv = make_case([50], [0], window=None, cache=None)
    del args["cu_seqlens_q"]
    out = attention_prefill(**args)
    ref = reference.attention(args["q"], fk[0], fv[0], args["sinks"])
    assert rel_err(out, ref) < 2e-3


# ------------------------------------------------------------------------------------------------
# host math (csrc/flash_prefill.cuh through _C.host); needs a build with bind_attention_prefill.cpp


def _host():
    C = _lib.C()
    if C is None:
        pytest.skip(f"kernels not built: {gptoss_kernels.kernels_error()}")
    if not hasattr(C.host, "attention_prefill_kv_tile_range"):
        pytest.skip("this build predates bind_attention_prefill.cpp (rebuild the package)")
    return C.host


def _visible(key, q, window):
    return 0 <= key <= q and (window is None or key > q - window)


@pytest.mark.parametrize("window", [None, 1, 2, 63, 64, 65, 128, 129, 1000])
@pytest.mark.parametrize("tile_keys", [16, 64])
def test_host_tile_range_and_mask(window, tile_keys):
    host = _host()
    W = 0 if window is None else window
    for q_first in list(range(0, 200, 7)) + [255, 256, 1000, 1023, 1024, 1025]:
        for nq in (1, 2, 15, 16, 17, 64):
            q_last = q_first + nq - 1
            vis = {k for q in range(q_first, q_last + 1) for k in range(0, q + 1) if _visible(k, q, window)}
            tiles = {k // tile_keys for k in vis}
            first, last = host.attention_prefill_kv_tile_range(q_first, q_last, W, tile_keys)
            assert (first, last) == (min(tiles), max(tiles)), (q_first, q_last, window)
            assert tiles == set(range(first, last + 1)), "every visited tile holds a visible key"
            for t in range(first, last + 1):
                ks = range(t * tile_keys, (t + 1) * tile_keys)
                full = all(_visible(k, q, window) for k in ks for q in range(q_first, q_last + 1))
                need = host.attention_prefill_tile_needs_mask(t * tile_keys, tile_keys, q_first, q_last, W)
                assert need or full, f"tile {t} skips the mask but is not fully visible ({q_first}, {q_last}, {window})"
                if full and window is None:
                    # full causal: only tiles reaching past q_first are masked
                    assert not need


def test_host_key_visible():
    host = _host()
    for window in (None, 1, 5, 128):
        W = 0 if window is None else window
        for q in range(0, 300, 13):
            for k in range(-2, 310, 3):
                assert host.attention_prefill_key_visible(k, q, W) == _visible(k, q, window)


def test_host_locate_q_tile():
    host = _host()
    for lengths in ([5], [0], [16], [17, 0, 1, 33, 16, 100], [0, 0, 3], [1] * 40):
        cu = [0]
        for L in lengths:
            cu.append(cu[-1] + L)
        want = [(b, t0) for b, L in enumerate(lengths) for t0 in range(0, L, 16)]
        grid = (cu[-1] + 15) // 16 + len(lengths)  # the launcher's over-allocated grid
        got = [host.attention_prefill_locate_q_tile(cu, t, 16) for t in range(grid)]
        assert [x for x in got if x is not None] == want
        assert got[len(want):] == [None] * (grid - len(want))


@pytest.mark.parametrize("sink", [-30.0, -3.0, 0.0, 1.5, 30.0, float("-inf")])
@pytest.mark.parametrize("tile_keys", [1, 7, 64])
def test_host_online_softmax(sink, tile_keys):
    host = _host()
    g = torch.Generator().manual_seed(7)
    n, d = 200, 8
    logits = torch.randn(n, generator=g) * 3
    mask = torch.rand(n, generator=g) < 0.3
    mask[:70] = True  # a whole masked prefix: the running max must stay finite
    logits[mask] = float("-inf")
    values = torch.randn(n, d, generator=g)
    got = torch.from_numpy(host.attention_prefill_online_softmax(logits.numpy(), values.numpy(), sink, tile_keys))
    m = torch.maximum(logits.max(), torch.tensor(sink))
    z = torch.exp(logits - m).sum() + torch.exp(torch.tensor(sink) - m)
    want = (torch.exp(logits - m) / z) @ values
    assert not got.isnan().any()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------------
# SASS (no GPU): the mma.sync version


@pytest.mark.parametrize("variant,opcode", [("attention_prefill_kernel<false>", "HMMA.16816.F32.BF16"),
                                            ("attention_prefill_kernel<true>", "HGMMA.64x64x16.F32.BF16")])
def test_sass_kernels(variant, opcode):
    """<false>: mma.sync m16n8k16 + ldmatrix (HMMA, LDSM); <true>: wgmma m64n64k16 (HGMMA)."""
    if not gptoss_kernels.kernels_built():
        pytest.skip(f"kernels not built: {gptoss_kernels.kernels_error()}")
    if sass.cuobjdump() is None:
        pytest.skip("cuobjdump not found (pip install triton)")
    ks = [k for k in sass.kernels(gptoss_kernels.library_path()).values() if variant in k.name]
    if not ks:
        pytest.skip("this build predates csrc/kernels/attention_prefill.cu's kernels (rebuild the package)")
    for k in ks:
        print(f"{k.name}: REG={k.reg} STACK={k.stack} SHARED={k.shared} LOCAL={k.local}")
        assert k.local == 0 and k.stack == 0, "local memory (spills)"
        assert "LDL" not in k.sass and "STL" not in k.sass
        assert opcode in k.sass, f"{opcode} expected in {k.name}"
        assert "LDGSTS" in k.sass, "cp.async expected"
        assert k.reg <= 128, "2 blocks of 256 threads per SM need <= 128 registers"
        if "<false>" in variant:
            assert "LDSM" in k.sass and "HGMMA" not in k.sass


# ------------------------------------------------------------------------------------------------
# GPU: the kernels against the reference, on the GPU or on the host build of the kernels
# (tests/kernel_device.py: same source on the CPU, every checker on)


_op_module = importlib.import_module("gptoss_kernels.ops.attention_prefill")

# The two kernels: 1 = mma.sync, 2 = wgmma (gptoss/attention_prefill.h; sm_90a only: marked hopper);
# 0 = the public op's choice.
WGMMA = pytest.param(2, marks=pytest.mark.hopper)
IMPLS = [1, WGMMA]

# Heads of the GPU cases: gpt-oss's 64 query / 8 KV heads on the GPU, 16 / 2 on the host build
# (emulation cost: each KV head is one more row of blocks; 2 still exercise the KV-head offsets).
HEADS = dict(nq=shrink(NQ, 16), nkv=shrink(NKV, 2))
# The public op (0) besides the two kernels; on the host build its choice is the mma.sync kernel
# for every shape here (the auto wgmma choice needs >= 2048 rows), so 1 is not run a second time.
IMPLS_OP = [0] + IMPLS if ON_GPU else [0, WGMMA]

_HOSTSIM_DEFAULT_SEED = 0x9E3779B97F4A7C15  # the runner's default seed (set_order(-1, it) restores it)
_HOSTSIM_DEFAULT_SEED = 0x9E3779B97F4A7C15  # the runner's default seed (set_order(-1, it) restores it)


def run_impl(args, impl, out=None):
    """The op with a chosen kernel, into a NaN-poisoned output unless given."""
    if out is None:
        out = torch.full_like(args["q"], float("nan"))
    if impl == 0:
        return attention_prefill(**args, out=out)
    a = args
    _op_module._attention_prefill_cuda(a["q"], a["k"], a["v"], a["sinks"], a["cu_seqlens_q"], a.get("k_cache"),
                                       a.get("v_cache"), a.get("cache_seqlens"), a["sliding_window"], 0.125, out,
                                       a["q"].device, impl)
    return out


def _run_gpu(lengths, p0s, *, window, cache, impl, sink_range=(-2.0, 2.0), q_block=1024, seed=0):
    gen = torch.Generator().manual_seed(seed)
    args, fk, fv = make_case(lengths, p0s, window=window, cache=cache, device=DEV, sink_range=sink_range, gen=gen,
                             **HEADS)
    out = run_impl(args, impl)
    sync()
    ref = expected(args, fk, fv, lengths, p0s, q_block=q_block)
    assert not out.isnan().any(), "unwritten or NaN outputs"
    err = rel_err(out, ref)
    print(f"impl={impl} lengths={lengths} p0={p0s} window={window} cache={cache}: rel err {err:.2e}")
    assert err < TOL, err
    return args, out


# Host build (emulation cost): no 1000 / 8192-row chunks (longer chunks: test_gpu_ragged_batch) and
# a 200-position prefix instead of 1000 (> 128: the sliding layer's ring still wraps); T = 1, 5,
# 127..129 keep the q-tile and KV-tile tails and the window edge.
VS_REF_T = [1, 5, 127, 128, 129] + ([1000, 8192] if ON_GPU else [])


@pytest.mark.gpu
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("T", VS_REF_T)
@pytest.mark.parametrize("window", [None, 128])
@pytest.mark.parametrize("p0", [0, 5, shrink(1000, 200)])
def test_gpu_vs_reference(T, window, p0, impl):
    cache = None if p0 == 0 else ("ring" if window == 128 else "full")
    _run_gpu([T], [p0], window=window, cache=cache, impl=impl, q_block=512)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("lengths,p0s,window,cache", [  # (cheap: the same shapes on the host build)
    ([1], [0], None, None),                    # one row, one key
    ([37], [0], None, None),                   # tails: 37 rows (3 q-tiles, last has 5), keys < 64
    ([70, 3], [0, 0], 16, None),               # varlen, window edge inside tiles, a KV tile skipped
    ([20, 9], [100, 61], None, "full"),        # cache prefix (keys < p0 from the cache), 2 KV tiles
    ([18, 5], [150, 127], 128, "ring"),        # sliding layer: 128-slot ring, wrap, window incl. self
    ([0, 30], [5, 200], 128, "ring"),          # an empty sequence, p0 > S
])
def test_gpu_edge_cases(lengths, p0s, window, cache, impl):
    _run_gpu(lengths, p0s, window=window, cache=cache, impl=impl, seed=sum(lengths) + sum(p0s))


@pytest.mark.gpu
@pytest.mark.parametrize("impl", IMPLS_OP)
@pytest.mark.parametrize("window", [None, 128])
def test_gpu_full_cache_with_window_and_zero_prefix(window, impl):
    # a cache given with p0 = 0 for some sequences, a full-size cache on a sliding layer
    # (host build: 40 rows after a 300-position prefix instead of 200 after 1000: emulation cost)
    _run_gpu([70, 3, shrink(200, 40)], [0, 130, shrink(1000, 300)], window=window, cache="full", impl=impl)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("window", [None, 128])
def test_gpu_ragged_batch(window, impl):
    # host build: the 300-row chunk at 1000 -> 100 rows at 400, the prefix 4000 -> 1000 (emulation
    # cost); T = 1, 0 (empty), 129, 64 and p0 = 127 / 128 / > 128 (ring wrap) stay
    lengths = [1, 17, shrink(300, 100), 0, 129, 64, 2]
    p0s = [0, 5, shrink(1000, 400), 3, 128, 127, shrink(4000, 1000)]
    _run_gpu(lengths, p0s, window=window, cache="ring" if window else "full", impl=impl, seed=3)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("sinks", [(20.0, 40.0), (-40.0, -20.0)])
@pytest.mark.parametrize("window", [None, 128])
def test_gpu_extreme_sinks(sinks, window, impl):
    # large positive sinks: nearly all mass on the sink (outputs tiny; relative error still holds);
    # large negative: plain softmax (host build: 300 rows -> 40, prefix 700 -> 200: emulation cost)
    _run_gpu([shrink(300, 40), 33], [0, shrink(700, 200)], window=window, cache="ring" if window else "full",
             sink_range=sinks, impl=impl, seed=5)


def _replay_case(window):
    # host build: 500 rows -> 40, 77 after 300 -> 33 after 150 (emulation cost; odd, ring wraps)
    lengths, p0s = [shrink(500, 40), shrink(77, 33)], [0, shrink(300, 150)]
    gen = torch.Generator().manual_seed(11)
    args, _, _ = make_case(lengths, p0s, window=window, cache="ring" if window else "full", device=DEV, gen=gen,
                           **HEADS)
    return args


@pytest.mark.gpu
@pytest.mark.parametrize("impl", IMPLS_OP)
@pytest.mark.parametrize("window", [None, 128])
def test_gpu_deterministic(impl, window):
    # (on the host build consecutive launches run blocks and threads in different orders)
    args = _replay_case(window)
    eager1 = run_impl(args, impl)
    eager2 = run_impl(args, impl)
    sync()
    assert not eager1.isnan().any()
    assert torch.equal(eager1, eager2), "not deterministic"


@pytest.mark.gpu
@pytest.mark.cuda_only  # CUDA graph capture and side streams
@pytest.mark.parametrize("impl", [0] + IMPLS)
@pytest.mark.parametrize("window", [None, 128])
def test_gpu_graph_replay(impl, window):
    args = _replay_case(window)
    eager1 = run_impl(args, impl)
    static_out = torch.full_like(args["q"], float("nan"))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        run_impl(args, impl, out=static_out)  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run_impl(args, impl, out=static_out)
    static_out.fill_(float("nan"))
    graph.replay()
    sync()
    assert torch.equal(static_out, eager1), "graph replay differs from eager"
    # new inputs through the same graph
    args["q"].copy_(torch.randn(args["q"].shape, device=DEV).bfloat16())
    graph.replay()
    eager3 = run_impl(args, impl)
    sync()
    assert torch.equal(static_out, eager3)


@pytest.mark.gpu
@pytest.mark.hopper
def test_gpu_kernels_agree():
    # the two kernels compute the same function (different accumulation order: close, not equal)
    # (host build: 700 rows -> 100, prefix 900 -> 200: emulation cost)
    args, _, _ = make_case([shrink(700, 100), 40], [0, shrink(900, 200)], window=None, cache="full", device=DEV,
                           **HEADS)
    a, b = run_impl(args, 1), run_impl(args, 2)
    sync()
    assert not a.isnan().any() and not b.isnan().any()
    assert rel_err(a, b) < TOL


@pytest.mark.gpu
def test_gpu_leaves_rows_past_cu_alone_and_empty():
    args, fk, fv = make_case([40], [0], window=None, cache=None, device=DEV, **HEADS)
    q, k, v = args["q"], args["k"], args["v"]
    # 8 extra packed rows not covered by cu_seqlens_q
    pad = lambda t: torch.cat((t, torch.randn(8, *t.shape[1:], device=DEV).bfloat16()))
    out = torch.full((48, *q.shape[1:]), 7.0, dtype=torch.bfloat16, device=DEV)
    attention_prefill(pad(q), pad(k), pad(v), args["sinks"], cu_seqlens_q=args["cu_seqlens_q"],
                      sliding_window=None, out=out)
    sync()
    assert (out[40:] == 7.0).all()
    assert rel_err(out[:40], expected(args, fk, fv, [40], [0])) < TOL
    empty = attention_prefill(q[:0], k[:0], v[:0], args["sinks"], cu_seqlens_q=torch.zeros(2, dtype=torch.int32,
                                                                                           device=DEV),
                              sliding_window=128)
    assert empty.shape == (0, *q.shape[1:])


@pytest.mark.gpu
def test_gpu_unsupported_shape_falls_back_to_reference():
    args, fk, fv = make_case([20], [0], window=None, cache=None, nq=8, nkv=2, d=32, device=DEV)
    _lib._warned.difference_update({w for w in _lib._warned if w[0] == "attention_prefill"})  # warn again
    with pytest.warns(RuntimeWarning):
        out = attention_prefill(**args)
    assert rel_err(out, expected(args, fk, fv, [20], [0])) < TOL


@pytest.mark.gpu
@pytest.mark.hopper
@pytest.mark.skipif(not ON_HOSTSIM, reason="the host build's thread orders")
@pytest.mark.parametrize("mode", [0, 1, 2], ids=["forward", "reverse", "random"])
def test_hostsim_wgmma_kernel_in_every_thread_order(mode):
    """The wgmma kernel with each thread order fixed (the runner otherwise rotates them between
    launches): warps finish their shuffles between wgmma steps in any order."""
    lengths, p0s = [20, 9], [100, 61]
    args, fk, fv = make_case(lengths, p0s, window=None, cache="full", **HEADS)
    out = torch.full_like(args["q"], float("nan"))
    a = args
    hs = _lib.kernels(torch.device("cpu")).module
    hs.set_order(mode, 1234)
    try:
        _op_module._attention_prefill_cuda(a["q"], a["k"], a["v"], a["sinks"], a["cu_seqlens_q"], a["k_cache"],
                                           a["v_cache"], a["cache_seqlens"], None, 0.125, out, a["q"].device, 2)
    finally:
        hs.set_order(-1, _HOSTSIM_DEFAULT_SEED)
    assert not out.isnan().any()
    assert rel_err(out, expected(args, fk, fv, lengths, p0s)) < TOL
