"""Router: top-k selection math (host build of csrc/topk.cuh), argument checks, CPU path, SASS
resources, and (marked gpu) the CUDA kernels against reference.router_topk / route_metadata.

Host tests go through _C.host.router_select; with an older build that lacks it they skip. To try
a private build: GPTOSS_ROUTER_TEST_C=/path/to/_C*.so (a module built from csrc/python/*.cpp)."""

from __future__ import annotations

import functools
import importlib.util
import math
import os

import numpy as np
import pytest
import torch

import gptoss_kernels
from gptoss_kernels import _lib, reference
from gptoss_kernels.ops import RouteMetadata, route, router_topk

from . import sass

INF, NAN = float("inf"), float("nan")


# ---------------------------------------------------------------------------------------------
# host build of the selection math
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _load_private(path):
    spec = importlib.util.spec_from_file_location("_C", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.host


def _host():
    path = os.environ.get("GPTOSS_ROUTER_TEST_C")
    if path:
        return _load_private(path)
    if not gptoss_kernels.kernels_built():
        pytest.skip(f"kernels not built: {gptoss_kernels.kernels_error()}")
    host = _lib.C().host
    if not hasattr(host, "router_select"):
        pytest.skip("this build has no _C.host.router_select (rebuild the package)")
    return host


def _oracle(logits: torch.Tensor, k: int):
    """reference.router_topk on exact fp32 logits: per row, x = 0 [1, 1], weight = 0 [E, 1] and
    bias = the row, so logits = 0 + row exactly (also for inf / NaN entries)."""
    T, E = logits.shape
    ids = torch.empty(T, k, dtype=torch.int32)
    w = torch.empty(T, k, dtype=torch.float32)
    zx, zw = torch.zeros(1, 1), torch.zeros(E, 1)
    for t in range(T):
        i, ww = reference.router_topk(zx, zw, logits[t], k)
        ids[t], w[t] = i[0], ww[0]
    return ids, w


def _assert_select_equal(logits: torch.Tensor, k: int, lanes: int):
    ids, w = _host().router_select(logits.numpy(), k, lanes)
    rid, rw = _oracle(logits, k)
    np.testing.assert_array_equal(ids, rid.numpy(), err_msg=f"ids differ (k={k}, lanes={lanes})")
    w = torch.from_numpy(w)
    assert torch.equal(torch.isnan(w), torch.isnan(rw)), "NaN pattern of weights differs"
    # same fp32 formula (max-subtract, exp, sum, divide); exp implementations differ by ulps
    torch.testing.assert_close(w, rw, rtol=1e-6, atol=1e-7, equal_nan=True)
    assert ((ids >= 0) & (ids < logits.shape[1])).all()


@pytest.mark.parametrize("E", [1, 4, 32, 40, 128, 256])
@pytest.mark.parametrize("k", [1, 2, 4, 5, 8])
@pytest.mark.parametrize("lanes", [1, 3, 32])
def test_host_select_random(E, k, lanes):
    if k > E:
        pytest.skip("k > E")
    logits = torch.randn(24, E) * 3
    _assert_select_equal(logits, k, lanes)


@pytest.mark.parametrize("lanes", [1, 32])
@pytest.mark.parametrize("k", [4, 8])
def test_host_select_ties_to_lower_index(lanes, k):
    E = 128
    logits = torch.randint(0, 3, (40, E)).float()       # massive ties
    logits[0] = 1.0                                      # all equal -> 0..k-1
    logits[1, 100:] = 5.0                                # spiked tie block late in the row
    logits[2, ::7] = 9.0                                 # spikes spread over lanes
    logits[3] = -0.0
    logits[3, 1::2] = 0.0                                # -0.0 == 0.0 is a tie
    _assert_select_equal(logits, k, lanes)
    ids, _ = _host().router_select(logits.numpy(), k, lanes)
    assert list(ids[0]) == list(range(k))
    assert list(ids[1]) == list(range(100, 100 + k))


@pytest.mark.parametrize("lanes", [1, 32])
@pytest.mark.parametrize("k", [1, 4, 8])
def test_host_select_nonfinite(lanes, k):
    E = 64
    rows = []
    base = torch.randn(E)
    r = base.clone(); r[[3, 17, 40]] = NAN; rows.append(r)              # NaN ranks last
    r = base.clone(); r[:] = NAN; rows.append(r)                        # all NaN -> 0..k-1, NaN w
    r = base.clone(); r[:] = -INF; rows.append(r)                       # all -inf -> NaN weights
    r = base.clone(); r[5] = INF; rows.append(r)                        # +inf selected -> NaN w
    r = base.clone(); r[:] = -INF; r[9] = 1.0; rows.append(r)           # one finite, rest -inf
    r = torch.full((E,), -INF); r[::2] = NAN; r[7] = 2.0; rows.append(r)  # NaN ties with -inf
    r = base.clone(); r[:k + 2] = -INF; r[k + 2:] = NAN; rows.append(r)
    r = base.clone(); r[10] = 3e38; r[11] = -3e38; rows.append(r)
    logits = torch.stack(rows)
    _assert_select_equal(logits, k, lanes)
    ids, w = _host().router_select(logits.numpy(), k, lanes)
    assert 3 not in ids[0] and 17 not in ids[0] and 40 not in ids[0]
    assert list(ids[1]) == list(range(k)) and np.isnan(w[1]).all()
    assert np.isnan(w[2]).all() and np.isnan(w[3]).all()
    assert ids[4][0] == 9 and w[4][0] == 1.0


def test_host_select_k_equals_e():
    logits = torch.randn(16, 8)
    _assert_select_equal(logits, 8, 32)
    _assert_select_equal(logits[:, :4].contiguous(), 4, 32)


def test_host_select_rejects_bad_k():
    h = _host()
    with pytest.raises(ValueError):
        h.router_select(np.zeros((2, 4), np.float32), 5, 32)
    with pytest.raises(ValueError):
        h.router_select(np.zeros((2, 16), np.float32), 9, 32)


# ---------------------------------------------------------------------------------------------
# argument checks and the CPU path
# ---------------------------------------------------------------------------------------------


def _inputs(T=5, H=64, E=32, device="cpu"):
    x = torch.randn(T, H, device=device).bfloat16()
    w = (torch.randn(E, H, device=device) / math.sqrt(H)).bfloat16()
    b = (torch.randn(E, device=device) * 0.1).bfloat16()
    return x, w, b


def test_router_arg_checks():
    x, w, b = _inputs()
    with pytest.raises(TypeError, match="x"):
        router_topk(x.float(), w, b)
    with pytest.raises(TypeError, match="weight"):
        router_topk(x, w.half(), b)
    with pytest.raises(TypeError, match="bias"):
        router_topk(x, w, b.float())
    with pytest.raises(ValueError, match="weight"):
        router_topk(x, w[:, :32].contiguous(), b)
    with pytest.raises(ValueError, match="bias"):
        router_topk(x, w, b[:-1])
    with pytest.raises(ValueError, match="x"):
        router_topk(x[0], w, b)
    with pytest.raises(ValueError, match="k=33"):
        router_topk(x, w, b, k=33)
    with pytest.raises(ValueError, match="k"):
        router_topk(x, w, b, k=0)
    with pytest.raises(ValueError, match="contiguous"):
        router_topk(x.t().contiguous().t(), w, b)
    with pytest.raises(ValueError, match="contiguous"):
        router_topk(x, torch.randn(64, 32).bfloat16().t(), b)
    with pytest.raises(ValueError, match="path"):
        router_topk(x, w, b, path="fast")
    big = torch.randn(129, x.shape[1], dtype=x.dtype)
    with pytest.raises(ValueError, match="cluster"):
        router_topk(x, big, torch.zeros(129, dtype=x.dtype), path="cluster")
    with pytest.raises(TypeError, match="out"):
        router_topk(x, w, b, out=torch.empty(5, 4, dtype=torch.int32))
    with pytest.raises(TypeError, match="topk_ids"):
        router_topk(x, w, b, out=(torch.empty(5, 4), torch.empty(5, 4)))
    with pytest.raises(ValueError, match="topk_weights"):
        router_topk(x, w, b, out=(torch.empty(5, 4, dtype=torch.int32), torch.empty(5, 3)))
    with pytest.raises(ValueError, match="metadata_out"):
        router_topk(x, w, b, metadata_out=RouteMetadata(*reference.route_metadata(torch.zeros(5, 4, dtype=torch.int32), 32)))


def test_route_arg_checks():
    ids = torch.randint(0, 8, (6, 2), dtype=torch.int32)
    with pytest.raises(TypeError, match="topk_ids"):
        route(ids.long(), 8)
    with pytest.raises(ValueError, match="topk_ids"):
        route(ids[:, 0], 8)
    with pytest.raises(ValueError, match="contiguous"):
        route(ids.t(), 8)
    with pytest.raises(ValueError, match="num_experts"):
        route(ids, 0)
    with pytest.raises(ValueError, match="num_experts"):
        route(ids, 4)          # ids up to 7 are out of range (CPU check)
    with pytest.raises(ValueError, match="out.offsets"):
        route(ids, 8, out=RouteMetadata(torch.empty(8, dtype=torch.int32), torch.empty(8, dtype=torch.int32),
                                        torch.empty(12, dtype=torch.int32)))


def test_router_cpu_path_matches_reference():
    x, w, b = _inputs(T=9, E=32)
    ids, wts = router_topk(x, w, b, k=4)
    rid, rw = reference.router_topk(x, w, b, 4)
    assert torch.equal(ids, rid) and torch.equal(wts, rw)
    o = (torch.full((9, 4), -7, dtype=torch.int32), torch.full((9, 4), NAN))
    ids2, wts2, meta = router_topk(x, w, b, k=4, out=o, return_metadata=True)
    assert ids2 is o[0] and wts2 is o[1]
    assert torch.equal(ids2, rid) and torch.equal(wts2, rw)
    for got, want in zip(meta, reference.route_metadata(rid, 32)):
        assert torch.equal(got, want)


def test_route_cpu_out():
    ids = torch.randint(0, 16, (10, 4), dtype=torch.int32)
    out = RouteMetadata(torch.empty(16, dtype=torch.int32), torch.empty(17, dtype=torch.int32),
                        torch.empty(40, dtype=torch.int32))
    got = route(ids, 16, out=out)
    for g, o, want in zip(got, out, reference.route_metadata(ids, 16)):
        assert g is o and torch.equal(g, want)


# ---------------------------------------------------------------------------------------------
# SASS / resources of the compiled router kernels (no GPU)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def router_kernels():
    if not gptoss_kernels.kernels_built():
        pytest.skip(f"kernels not built: {gptoss_kernels.kernels_error()}")
    if sass.cuobjdump() is None:
        pytest.skip("cuobjdump not found (pip install triton)")
    ks = {n: k for n, k in sass.kernels(_lib.library_path()).items()
          if any(s in k.name for s in ("router_", "route_"))}
    if not ks:
        pytest.skip("this build has no router kernels (rebuild the package)")
    return ks


def test_router_kernels_no_local_memory(router_kernels):
    names = " ".join(k.name for k in router_kernels.values())
    for want in ("router_fused_kernel", "router_partial_kernel", "router_select_kernel", "router_cluster_kernel",
                 "route_count_kernel", "route_scan_kernel", "route_scatter_kernel"):
        assert want in names, f"{want} missing from the library"
    for k in router_kernels.values():
        print(f"{k.name[:100]:100s} REG={k.reg} SHARED={k.shared} LOCAL={k.local} STACK={k.stack}")
        assert k.local == 0 and k.stack == 0, f"{k.name}: LOCAL={k.local} STACK={k.stack}"
        assert "LDL" not in k.sass and "STL" not in k.sass, f"{k.name}: LDL/STL in SASS"


def test_router_kernels_use_tensor_cores(router_kernels):
    for k in router_kernels.values():
        if any(n in k.name for n in ("router_fused_kernel", "router_partial_kernel", "router_cluster_kernel")):
            assert "HMMA" in k.sass and "LDSM" in k.sass and "LDGSTS" in k.sass, k.name
        if "router_cluster_kernel" in k.name:   # two cluster barriers (arrive + wait each)
            assert k.sass.count("UCGABAR_WAIT") >= 2, k.name
        if "route_scatter_kernel" in k.name:
            assert "MATCH" in k.sass, k.name


# ---------------------------------------------------------------------------------------------
# GPU: the CUDA kernels against the reference
# ---------------------------------------------------------------------------------------------


def _tie_free_inputs(T, E, H, k, device="cuda", bias_scale=0.05, seed=0):
    """Inputs whose top-k is unambiguous: expert e reads column e of x through weight[e, e] = 1;
    each token spikes k distinct experts with x = 10, 9, 8, ... (gaps of 1 between the selected,
    >= 10-k+1 - noise above the rest), everything else is noise of std ~0.1 in the logits. The
    gaps are >> the fp32 accumulation-order error (~1e-5), so ids must equal the reference
    exactly, and the softmax weights (non-trivial: gaps of 1) must agree to ~1e-6."""
    assert H >= E
    g = torch.Generator(device="cpu").manual_seed(1234 + T + E + H + k + 7919 * seed)
    x = torch.randn(T, H, generator=g)
    x[:, :E] = 0
    sel = torch.rand(T, E, generator=g).argsort(dim=1)[:, :k]
    levels = 10.0 - torch.arange(k, dtype=torch.float32)
    x.scatter_(1, sel, levels.expand(T, k).contiguous())
    w = torch.randn(E, H, generator=g) * (0.1 / math.sqrt(H))
    w[:, :E] = 0
    w[torch.arange(E), torch.arange(E)] = 1.0
    b = torch.randn(E, generator=g) * bias_scale
    return x.bfloat16().to(device), w.bfloat16().to(device), b.bfloat16().to(device)


def _poisoned(T, k, device="cuda"):
    return (torch.full((T, k), -7, dtype=torch.int32, device=device),
            torch.full((T, k), NAN, dtype=torch.float32, device=device))


def _check_against_reference(x, w, b, k, path):
    T = x.shape[0]
    out = _poisoned(T, k)
    ids, wts = router_topk(x, w, b, k=k, out=out, path=path)
    assert ids is out[0] and wts is out[1]
    rid, rw = reference.router_topk(x, w, b, k)
    mism = (ids != rid).any(dim=1).nonzero().flatten()
    assert mism.numel() == 0, f"{mism.numel()} tokens differ, first {mism[:5].tolist()}: {ids[mism[:3]].tolist()} vs {rid[mism[:3]].tolist()}"
    assert not torch.isnan(wts).any()
    # fp32 softmax of logits that differ from the reference's by accumulation order only
    err = (wts - rw).abs().max().item()
    assert err <= 1e-5, f"max |weights - reference| = {err:.2e}"
    return ids, wts


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["auto", "fused", "split", "cluster"])
@pytest.mark.parametrize("T", [1, 7, 64, 1000, 16384])
@pytest.mark.parametrize("E", [32, 128])
def test_gpu_router_tie_free(E, T, path):
    x, w, b = _tie_free_inputs(T, E, 2880, 4)
    _check_against_reference(x, w, b, 4, path)


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["fused", "split", "cluster"])
@pytest.mark.parametrize("E,H,k", [(128, 200, 4), (40, 64, 4), (256, 512, 8), (256, 2880, 4), (128, 2880, 1),
                                   (128, 2880, 8), (8, 136, 8), (64, 1024, 5), (33, 72, 3)])
@pytest.mark.parametrize("T", [3, 130])
def test_gpu_router_shapes(E, H, k, T, path):
    if path == "cluster" and E > 128:
        pytest.skip("the cluster path takes E <= 128")
    x, w, b = _tie_free_inputs(T, E, H, k)
    _check_against_reference(x, w, b, k, path)


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["fused", "split", "cluster"])
def test_gpu_router_exact_ties_and_nan(path):
    """Rows of x that are zero give logits == bias exactly (every product is 0), so bias ties are
    exact ties: ids must go to the lower index. A NaN in x makes every logit of that token NaN:
    ids 0..k-1, weights NaN (the reference's behaviour)."""
    T, E, H, k = 200, 128, 2880, 4
    x, w, b = _tie_free_inputs(T, E, H, k)
    b = torch.zeros(E, dtype=torch.bfloat16, device="cuda")
    b[[5, 9, 77, 100, 101, 120]] = 1.0     # six tied maxima -> 5, 9, 77, 100
    x[10:20] = 0
    x[30, 100] = NAN
    x[31, :] = NAN
    out = _poisoned(T, k)
    ids, wts = router_topk(x, w, b, k=k, out=out, path=path)
    rid, rw = reference.router_topk(x, w, b, k)
    assert torch.equal(ids, rid)
    assert ids[10:20].tolist() == [[5, 9, 77, 100]] * 10
    assert ids[30].tolist() == [0, 1, 2, 3] and ids[31].tolist() == [0, 1, 2, 3]
    assert torch.isnan(wts[30:32]).all()
    ok = torch.ones(T, dtype=torch.bool)
    ok[30:32] = False
    assert (wts[ok] - rw[ok]).abs().max().item() <= 1e-5
    assert torch.allclose(wts[10:20], torch.full((10, 4), 0.25, device="cuda"))


@pytest.mark.gpu
def test_gpu_router_random_inputs_close():
    """Random (not tie-free) gpt-oss-120b-shaped inputs: near-ties may legitimately flip between
    fp32 accumulation orders, so require >= 99.9% of tokens with identical ids, and identical-id
    tokens within 1e-5 in weights."""
    x, w, b = _inputs(T=4096, H=2880, E=128, device="cuda")
    ids, wts = router_topk(x, w, b, k=4)
    rid, rw = reference.router_topk(x, w, b, 4)
    same = (ids == rid).all(dim=1)
    assert same.float().mean().item() >= 0.999
    assert (wts[same] - rw[same]).abs().max().item() <= 1e-5


@pytest.mark.gpu
def test_gpu_router_empty_and_deterministic():
    x, w, b = _tie_free_inputs(0, 32, 64, 4)
    ids, wts = router_topk(x, w, b, k=4)
    assert ids.shape == (0, 4) and wts.shape == (0, 4)
    x, w, b = _inputs(T=777, H=2880, E=128, device="cuda")
    for path in ("fused", "split", "cluster"):
        a = router_topk(x, w, b, k=4, path=path)
        c = router_topk(x, w, b, k=4, path=path)
        assert torch.equal(a[0], c[0]) and torch.equal(a[1], c[1]), "not deterministic"


def _check_route(ids, E, meta):
    want = reference.route_metadata(ids, E)
    for name, got, ref in zip(("counts", "offsets", "permutation"), meta, want):
        assert got.dtype == torch.int32
        assert torch.equal(got, ref), f"{name} differs from reference.route_metadata"
    # the stable permutation is unique; check its properties directly too
    perm = meta.permutation.long()
    assert torch.equal(perm.sort().values, torch.arange(ids.numel(), device=perm.device))
    flat = ids.flatten().long()
    assert (flat[perm][1:] >= flat[perm][:-1]).all()


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 7, 64, 1000, 16384])
@pytest.mark.parametrize("E,k", [(32, 4), (128, 4), (128, 8), (256, 8)])
def test_gpu_route(T, E, k):
    ids = torch.rand(T, E, device="cuda").argsort(dim=1)[:, :k].to(torch.int32).contiguous()
    out = RouteMetadata(torch.full((E,), -5, dtype=torch.int32, device="cuda"),
                        torch.full((E + 1,), -5, dtype=torch.int32, device="cuda"),
                        torch.full((T * k,), -5, dtype=torch.int32, device="cuda"))
    meta = route(ids, E, out=out)
    assert meta.counts is out.counts
    _check_route(ids, E, meta)


@pytest.mark.gpu
def test_gpu_route_skewed_and_edge():
    E = 128
    ids = torch.full((5000, 4), 7, dtype=torch.int32, device="cuda")  # every row to one expert
    ids[:, 1:] = torch.tensor([3, 126, 127], dtype=torch.int32, device="cuda")
    _check_route(ids, E, route(ids, E))
    ids = torch.randint(0, 3, (20000, 8), dtype=torch.int32, device="cuda")  # few experts, many rows
    _check_route(ids, 256, route(ids, 256))
    empty = torch.empty(0, 4, dtype=torch.int32, device="cuda")
    m = route(empty, E)
    assert (m.counts == 0).all() and (m.offsets == 0).all() and m.permutation.numel() == 0


@pytest.mark.gpu
def test_gpu_route_invalid_ids_documented():
    E = 32
    ids = torch.randint(0, E, (300, 4), dtype=torch.int32, device="cuda")
    ids[5, 2] = -1
    ids[77, 0] = E
    m = route(ids, E)
    valid = ids.flatten()
    keep = (valid >= 0) & (valid < E)
    assert m.offsets[E].item() == keep.sum().item() == m.counts.sum().item()
    assert (m.permutation[m.offsets[E].item():] == -1).all()
    perm = m.permutation[: m.offsets[E].item()].long()
    assert torch.equal(perm, torch.nonzero(keep).flatten()[valid[keep].long().sort(stable=True).indices])


@pytest.mark.gpu
def test_gpu_router_return_metadata():
    x, w, b = _tie_free_inputs(333, 128, 2880, 4)
    ids, wts, meta = router_topk(x, w, b, k=4, return_metadata=True)
    rid, _ = reference.router_topk(x, w, b, 4)
    assert torch.equal(ids, rid)
    _check_route(ids, 128, meta)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 64, 8192])
def test_gpu_router_cuda_graph(T):
    E, H, k = 128, 2880, 4
    x, w, b = _tie_free_inputs(T, E, H, k)
    ids = torch.empty(T, k, dtype=torch.int32, device="cuda")
    wts = torch.empty(T, k, dtype=torch.float32, device="cuda")
    meta = RouteMetadata(torch.empty(E, dtype=torch.int32, device="cuda"),
                         torch.empty(E + 1, dtype=torch.int32, device="cuda"),
                         torch.empty(T * k, dtype=torch.int32, device="cuda"))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up outside capture
        router_topk(x, w, b, k=k, out=(ids, wts), return_metadata=True, metadata_out=meta)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        router_topk(x, w, b, k=k, out=(ids, wts), return_metadata=True, metadata_out=meta)
    for seed in range(3):
        x2, w2, b2 = _tie_free_inputs(T, E, H, k, seed=seed + 1)
        x.copy_(x2)
        b.copy_(b2)
        ids.fill_(-7)
        wts.fill_(NAN)
        for t in meta:
            t.fill_(-7)
        g.replay()
        torch.cuda.synchronize()
        eid, ew, emeta = router_topk(x, w, b, k=k, return_metadata=True)
        assert torch.equal(ids, eid) and torch.equal(wts, ew)
        for a, c in zip(meta, emeta):
            assert torch.equal(a, c)


# ---------------------------------------------------------------------------------------------
# lane-level CPU emulation of the router's index math (mma.sync mainloop, epilogues, split
# slices, route's histogram / scan / stable scatter). Fragment semantics from the PTX ISA:
# ldmatrix .m8n8.x4 .b16 (lane l addresses row l % 8 of matrix l // 8, receives row l // 4,
# columns 2 (l % 4), +1 of matrix j in register j); mma.m16n8k16 .row.col (A regs (g, 2t)
# (g+8, 2t) (g, 2t+8) (g+8, 2t+8), B regs (k=2t, n=g) (k=2t+8, n=g), C/D (g, 2t) (g+8, 2t)).
# ---------------------------------------------------------------------------------------------

from .ptx_emulation import A_COL as _A_COL, A_ROW as _A_ROW, C_COL as _C_COL, C_ROW as _C_ROW  # noqa: E402
from .ptx_emulation import G as _G, LANE as _LANE, PAIR as _PAIR, T as _T  # noqa: E402
from .ptx_emulation import ldsm_x4 as _ldsm_x4, mma16816 as _mma16816  # noqa: E402

_KLDS = 72  # kLds


def _emulate_mainloop(x, w, EB, t0, e0, c_begin, c_end):
    """logits_mainloop<EB>: returns acc [8 warps][NT][32 lanes][4]."""
    T, Hd = x.shape
    E = w.shape[0]
    NT = EB // 16
    acc = np.zeros((8, NT, 32, 4), np.float32)
    for c in range(c_begin, c_end):
        sx = np.full(64 * _KLDS, np.nan, np.float32)
        sw = np.full(EB * _KLDS, np.nan, np.float32)
        kbase = c * 64
        for i in range(64 * 8):
            r, kk = i >> 3, kbase + (i & 7) * 8
            ok = t0 + r < T and kk < Hd
            sx[r * _KLDS + (i & 7) * 8:][:8] = x[t0 + r, kk:kk + 8] if ok else 0
        for i in range(EB * 8):
            r, kk = i >> 3, kbase + (i & 7) * 8
            ok = e0 + r < E and kk < Hd
            sw[r * _KLDS + (i & 7) * 8:][:8] = w[e0 + r, kk:kk + 8] if ok else 0
        for warp in range(8):
            wm, wn = warp & 3, warp >> 2
            a_off = (wm * 16 + (_LANE & 15)) * _KLDS + (_LANE >> 4) * 8
            b_off = (wn * (EB // 2) + (_LANE & 7) + ((_LANE >> 4) << 3)) * _KLDS + ((_LANE >> 3) & 1) * 8
            for kk in range(0, 64, 16):
                a = _ldsm_x4(sx, a_off + kk)
                for p in range(NT // 2):
                    b = _ldsm_x4(sw, b_off + p * 16 * _KLDS + kk)
                    acc[warp, 2 * p] = _mma16816(a, b[:, 0:2], acc[warp, 2 * p])
                    acc[warp, 2 * p + 1] = _mma16816(a, b[:, 2:4], acc[warp, 2 * p + 1])
    return acc


@pytest.mark.parametrize("T,H,E", [(5, 200, 32), (64, 64, 20), (70, 136, 128), (3, 72, 256)])
def test_emulated_fused_logits_tile(T, H, E):
    """router_fused_kernel's mainloop + epilogue (accumulators -> shared logits [64][EB + 8]) for
    the block t0 = 0 (and t0 = 64 when T > 64): every logit in place, tails of T, E and H zero-filled."""
    torch.manual_seed(T + H + E)
    x = torch.randn(T, H).bfloat16().float().numpy()
    w = torch.randn(E, H).bfloat16().float().numpy()
    EB = 32 if E <= 32 else 64 if E <= 64 else 128 if E <= 128 else 256
    ref = x.astype(np.float64) @ w.T.astype(np.float64)
    for t0 in range(0, T, 64):
        acc = _emulate_mainloop(x, w, EB, t0, 0, 0, (H + 63) // 64)
        sl = np.full((64, EB + 8), np.nan, np.float32)
        for warp in range(8):
            wm, wn = warp & 3, warp >> 2
            for n in range(EB // 16):
                col = wn * (EB // 2) + n * 8 + 2 * _T
                row = wm * 16 + _G
                sl[row, col], sl[row, col + 1] = acc[warp, n][:, 0], acc[warp, n][:, 1]
                sl[row + 8, col], sl[row + 8, col + 1] = acc[warp, n][:, 2], acc[warp, n][:, 3]
        rows = min(64, T - t0)
        np.testing.assert_allclose(sl[:rows, :E], ref[t0:t0 + rows], rtol=1e-4, atol=1e-3)
        assert np.all(sl[:, E:EB] == 0) and np.all(sl[rows:, :EB] == 0)


@pytest.mark.parametrize("T,H,E", [(1, 2880, 32), (5, 200, 40), (2, 4096, 128)])
def test_emulated_split_partials_sum_to_logits(T, H, E):
    """router_partial_kernel's slice ranges [z nc / splits, (z+1) nc / splits) and its store mapping
    (with the split count of split_count) cover every H chunk exactly once and every (t, e < E)."""
    torch.manual_seed(T * H + E)
    x = torch.randn(T, H).bfloat16().float().numpy()
    w = torch.randn(E, H).bfloat16().float().numpy()
    tiles, groups, nc = (T + 63) // 64, (E + 31) // 32, (H + 63) // 64
    splits = max(1, min(-(-256 // (tiles * groups)), 16, nc))
    ws = _lib.C().router_topk_workspace_size(T, H, E, 4, 2) if gptoss_kernels.kernels_built() else None
    if ws is not None:
        assert ws == splits * T * E * 4, "the emulated split count differs from the library's"
    partial = np.full((splits, T, E), np.nan, np.float32)
    covered = np.zeros(nc, int)
    for z in range(splits):
        cb, ce = z * nc // splits, (z + 1) * nc // splits
        covered[cb:ce] += 1
        for e0 in range(0, E, 32):
            acc = _emulate_mainloop(x, w, 32, 0, e0, cb, ce)
            for warp in range(8):
                wm, wn = warp & 3, warp >> 2
                for n in range(2):
                    col = e0 + wn * 16 + n * 8 + 2 * _T
                    for h in range(2):
                        t = wm * 16 + _G + 8 * h
                        for ln in range(32):
                            if t[ln] >= T:
                                continue
                            if col[ln] < E:
                                partial[z, t[ln], col[ln]] = acc[warp, n][ln, 2 * h]
                            if col[ln] + 1 < E:
                                partial[z, t[ln], col[ln] + 1] = acc[warp, n][ln, 2 * h + 1]
    assert np.all(covered == 1)
    assert not np.isnan(partial).any(), "a partial logit was never written"
    np.testing.assert_allclose(partial.sum(0), x.astype(np.float64) @ w.T.astype(np.float64), rtol=1e-4, atol=1e-3)


def _emulate_route(ids: np.ndarray, E: int):
    """route_count_kernel + route_scan_kernel + route_scatter_kernel (chunking of route_chunk,
    __match_any_sync ranks within a warp, earlier warps' counts, per-chunk bases)."""
    n = ids.size
    chunk = -(-n // 128)
    chunk = max(-(-chunk // 256) * 256, 1024)
    nb = -(-n // chunk) if n else 0
    bc = np.zeros((nb, E), np.int64)
    for blk in range(nb):
        for r in range(blk * chunk, min(n, blk * chunk + chunk)):
            if 0 <= ids[r] < E:
                bc[blk, ids[r]] += 1
    counts = bc.sum(0)
    bc = np.cumsum(bc, 0) - bc  # exclusive over chunks, in place
    offsets = np.concatenate([[0], np.cumsum(counts)])
    perm = np.full(n, -7, np.int64)
    perm[offsets[E]:] = -1
    for blk in range(nb):
        base = offsets[:E] + bc[blk]
        begin, end = blk * chunk, min(n, blk * chunk + chunk)
        for start in range(begin, end, 256):
            r = start + np.arange(256)
            e = np.where(r < end, ids[np.minimum(r, n - 1)], -1)
            valid = (r < end) & (e >= 0) & (e < E)
            e = np.where(valid, e, -1)
            wc = np.zeros((8, E), np.int64)
            rank = np.zeros(256, np.int64)
            for warp in range(8):
                ew = e[32 * warp:32 * warp + 32]
                for ln in range(32):
                    same = ew == ew[ln]
                    rank[32 * warp + ln] = same[:ln].sum()
                    if valid[32 * warp + ln] and rank[32 * warp + ln] == 0:
                        wc[warp, ew[ln]] = same.sum()
            for tid in range(256):
                if valid[tid]:
                    pos = base[e[tid]] + rank[tid] + wc[:tid // 32, e[tid]].sum()
                    assert perm[pos] == -7, "two rows scattered to one slot"
                    perm[pos] = r[tid]
            base = base + wc.sum(0)
    assert not np.any(perm == -7), "a permutation slot was never written"
    return counts, offsets, perm


@pytest.mark.parametrize("T,k,E,skew", [(1, 4, 32, False), (700, 4, 32, False), (1000, 4, 128, True),
                                        (3000, 4, 32, True), (257, 8, 256, False)])
def test_emulated_route_matches_reference(T, k, E, skew):
    g = torch.Generator().manual_seed(T + E)
    if skew:  # most rows on a few experts: long runs inside warps and chunks
        ids = torch.where(torch.rand(T, k, generator=g) < 0.8, torch.randint(0, 3, (T, k), generator=g),
                          torch.randint(0, E, (T, k), generator=g))
    else:
        ids = torch.randint(0, E, (T, k), generator=g)
    ids = ids.to(torch.int32)
    counts, offsets, perm = _emulate_route(ids.reshape(-1).numpy(), E)
    rc, ro, rp = reference.route_metadata(ids, E)
    np.testing.assert_array_equal(counts, rc.numpy())
    np.testing.assert_array_equal(offsets, ro.numpy())
    np.testing.assert_array_equal(perm, rp.numpy())


def test_emulated_route_invalid_ids_go_to_the_tail():
    ids = np.array([3, -1, 0, 7, 3, 99, 0] * 300, np.int64)
    counts, offsets, perm = _emulate_route(ids, 8)
    valid = (ids >= 0) & (ids < 8)
    assert offsets[8] == valid.sum() and np.all(perm[offsets[8]:] == -1)
    order = np.argsort(np.where(valid, ids, 8), kind="stable")[:valid.sum()]
    np.testing.assert_array_equal(perm[:offsets[8]], order)


# ---------------------------------------------------------------------------------------------
# residual add + RMSNorm + router in one kernel (the decode step, T <= 16)
# ---------------------------------------------------------------------------------------------

def test_add_rms_norm_router_topk_cpu_is_the_two_ops_and_checks():
    from gptoss_kernels.ops import add_rms_norm_router_topk, rms_norm

    g = torch.Generator().manual_seed(3)
    T, H, E = 5, 64, 32
    d, r = torch.randn(T, H, generator=g).bfloat16(), torch.randn(T, H, generator=g).bfloat16()
    nw = torch.randn(H, generator=g).bfloat16()
    _, w, b = _inputs(T, H, E)
    a, h, ids, wts = add_rms_norm_router_topk(d, r, nw, w, b, 4, eps=1e-5)
    a_ref, h_ref = rms_norm(d, nw, eps=1e-5, residual=r)
    rid, rw = router_topk(a_ref, w, b, 4)
    assert torch.equal(a, a_ref) and torch.equal(h, h_ref) and torch.equal(ids, rid) and torch.equal(wts, rw)
    r2 = r.clone()
    out = (torch.empty(T, 4, dtype=torch.int32), torch.empty(T, 4))
    a2, h2, ids2, _ = add_rms_norm_router_topk(d, r2, nw.float(), w, b, 4, residual_out=r2, out=out)
    assert h2.data_ptr() == r2.data_ptr() and ids2 is out[0] and torch.equal(r2, h_ref)
    with pytest.raises(ValueError, match="residual"):
        add_rms_norm_router_topk(d, r[:2], nw, w, b, 4)
    with pytest.raises(TypeError, match="norm_weight"):
        add_rms_norm_router_topk(d, r, nw.half(), w, b, 4)
    with pytest.raises(ValueError, match="norm_out"):
        add_rms_norm_router_topk(d, r, nw, w, b, 4, norm_out=torch.empty(T, H + 8, dtype=torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 3, 16, 17])
@pytest.mark.parametrize("E", [32, 128])
@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float32])
def test_gpu_add_rms_norm_router_topk_equals_the_two_ops(T, E, wdtype):
    _add_norm_router_vs_two_ops(T, E, 2880, 4, wdtype)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 16])
@pytest.mark.parametrize("H,E,k", [(64, 5, 4), (136, 33, 3), (520, 128, 8), (8192, 32, 8), (200, 128, 1)])
def test_gpu_add_rms_norm_router_topk_shapes(T, H, E, k):
    """H below 8 chunks of 64 (ranks with empty slices), H not a multiple of 64, H = 8192 (32
    groups of chunks), E not a multiple of 32, k = 1 and 8."""
    _add_norm_router_vs_two_ops(T, E, H, k, torch.bfloat16)


def _add_norm_router_vs_two_ops(T, E, H, k, wdtype):
    """The one-kernel path (T <= 16) against rms_norm then router_topk (the cluster path for
    T <= 64): the same normed activations and residual stream bit for bit, and then the same
    logits in the same order, so the same ids and weights; in place on the residual stream.
    T = 17 takes the two-op path itself."""
    from gptoss_kernels.ops import add_rms_norm_router_topk, rms_norm

    g = torch.Generator(device="cuda").manual_seed(T * 31 + E + H + k)
    d = torch.randn(T, H, device="cuda", generator=g).bfloat16()
    r = torch.randn(T, H, device="cuda", generator=g).bfloat16()
    nw = (torch.randn(H, device="cuda", generator=g) * 0.3 + 1).to(wdtype)
    w = (torch.randn(E, H, device="cuda", generator=g) / math.sqrt(H)).bfloat16()
    b = (torch.randn(E, device="cuda", generator=g) * 0.1).bfloat16()
    a_ref, h_ref = rms_norm(d, nw, eps=1e-5, residual=r)
    rid, rw = router_topk(a_ref, w, b, k, path="cluster")
    x = r.clone()
    a = torch.full((T, H), float("nan"), dtype=torch.bfloat16, device="cuda")
    out = _poisoned(T, k)
    got = add_rms_norm_router_topk(d, x, nw, w, b, k, eps=1e-5, norm_out=a, residual_out=x, out=out)
    assert got[0] is a and got[1] is x and got[2] is out[0] and got[3] is out[1]
    assert torch.equal(a.view(torch.int16), a_ref.view(torch.int16))
    assert torch.equal(x.view(torch.int16), h_ref.view(torch.int16))
    assert torch.equal(out[0], rid) and torch.equal(out[1], rw)


def test_cluster_kernel_index_logic_emulated():
    """The CLUSTER kernel's index logic in numpy (csrc/kernels/router.cu, router_cluster_kernel and
    add_norm_rows_inv), for many H and T: the 8 ranks' 64-wide H slices partition the chunks; each
    rank's 8-wide norm slice [c0, c1) is exactly the columns its main loop reads; the rank-order sum
    of the ranks' partial logits is the full product; token row r of the tile is warp r % 8 of rank
    r // 8; and in the norm pass every warp's 32 items are one group of one row, so each group sum
    is one warp butterfly, as in rms_norm_kernel."""
    R, kKC, kThreads, kTT = 8, 64, 256, 64
    rng = np.random.default_rng(0)
    for H in (8, 64, 136, 200, 520, 2880, 4096, 8192):
        nc = (H + kKC - 1) // kKC
        chunks = H // 8
        covered = np.zeros(nc, int)
        cols = np.zeros(H, int)
        x = rng.standard_normal(H)
        W = rng.standard_normal((5, H))
        total = np.zeros(5)
        for rank in range(R):
            cb, ce = rank * nc // R, (rank + 1) * nc // R
            covered[cb:ce] += 1
            c0, c1 = cb * (kKC // 8), min(chunks, ce * (kKC // 8))
            # the main loop's columns: chunks [cb, ce) of 64, clipped at H
            loop_cols = [kk for c in range(cb, ce) for kk in range(c * kKC, min(H, (c + 1) * kKC))]
            norm_cols = [8 * c + i for c in range(c0, max(c0, c1)) for i in range(8)]
            assert loop_cols == norm_cols, (H, rank)
            cols[loop_cols] += 1
            total += W[:, loop_cols] @ x[loop_cols]          # rank order
        assert (covered == 1).all() and (cols == 1).all(), H
        np.testing.assert_allclose(total, W @ x, rtol=1e-12)
        groups = (chunks + 31) // 32
        gpad = groups * 32
        for rows in (1, 3, 16):
            seen = {}
            for base in range(0, rows * gpad, kThreads):
                for warp in range(kThreads // 32):
                    items = [base + warp * 32 + lane for lane in range(32)]
                    rc = {(i // gpad, (i % gpad) >> 5) for i in items}
                    assert len(rc) == 1, (H, rows, base, warp)
                    r, g = rc.pop()
                    if r < rows:
                        assert (r, g) not in seen
                        seen[(r, g)] = [i % gpad for i in items]
            assert sorted(seen) == [(r, g) for r in range(rows) for g in range(groups)]
            for (r, g), cs in seen.items():          # the chunks rms_norm_kernel's warp g holds
                assert cs == list(range(32 * g, 32 * g + 32))
    rows_of = sorted(rank * (kThreads // 32) + warp for rank in range(R) for warp in range(kThreads // 32))
    assert rows_of == list(range(kTT))
