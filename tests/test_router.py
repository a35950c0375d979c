"""Router: top-k selection math (host build of csrc/topk.cuh), argument checks, CPU path, SASS
resources, and (marked gpu) the kernels against reference.router_topk / route_metadata: on a CUDA
GPU, or else on the host build of the same kernels (tests/kernel_device.py), every path (split,
fused, cluster, the add + RMSNorm + router cluster kernel) and route's three kernels.

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
from .kernel_device import DEV, HOPPER_PATHS, ON_GPU, ON_HOSTSIM, shrink, sync

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
# GPU (marked gpu): the kernels against the reference, on DEV (a CUDA GPU, else the host build)
# ---------------------------------------------------------------------------------------------


def _tie_free_inputs(T, E, H, k, device=DEV, bias_scale=0.05, seed=0):
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


def _poisoned(T, k, device=DEV):
    return (torch.full((T, k), -7, dtype=torch.int32, device=device),
            torch.full((T, k), NAN, dtype=torch.float32, device=device))


def _check_against_reference(x, w, b, k, path):
    T = x.shape[0]
    out = _poisoned(T, k)
    ids, wts = router_topk(x, w, b, k=k, out=out, path=path)
    sync()
    assert ids is out[0] and wts is out[1]
    rid, rw = reference.router_topk(x, w, b, k)
    mism = (ids != rid).any(dim=1).nonzero().flatten()
    assert mism.numel() == 0, f"{mism.numel()} tokens differ, first {mism[:5].tolist()}: {ids[mism[:3]].tolist()} vs {rid[mism[:3]].tolist()}"
    assert not torch.isnan(wts).any()
    # fp32 softmax of logits that differ from the reference's by accumulation order only
    err = (wts - rw).abs().max().item()
    assert err <= 1e-5, f"max |weights - reference| = {err:.2e}"
    return ids, wts


# (T, E, H, path) of the tie-free test. GPU: gpt-oss-120b's H = 2880, T from one decode token to a
# 16k-token prefill, every path. Host build (every thread emulated: T = 16384 at H = 2880 would take
# minutes): T = 1 and 7 at the real H (T = 1: 16 split slices of H); T = 64 (one full tile) and 130
# (three tiles, the last partial) at H = 520 (9 chunks of 64: uneven split and cluster slices);
# T = 3073 (> 3008 tokens: AUTO takes the fused path) at H = 64, without the 49-cluster launch.
_PATHS4 = ("auto", "fused", "split", "cluster")


def _hopper_if_cluster(case):
    """A parametrize case asking for the cluster path by name: Hopper only (marked hopper)."""
    return pytest.param(*case, marks=pytest.mark.hopper) if "cluster" in case else case


_TIE_FREE = [_hopper_if_cluster(c) for c in (
    [(T, E, 2880, p) for E in (32, 128) for T in (1, 7, 64, 1000, 16384) for p in _PATHS4] if ON_GPU else
    [(T, E, H, p) for T, E, H in [(1, 32, 2880), (1, 128, 2880), (7, 32, 2880), (7, 128, 2880),
                                  (64, 128, 520), (130, 32, 520), (130, 128, 520)] for p in _PATHS4]
    + [(3073, 32, 64, p) for p in ("auto", "fused", "split")])]
_PATHS3 = ["fused", "split", pytest.param("cluster", marks=pytest.mark.hopper)]


@pytest.mark.gpu
@pytest.mark.parametrize("T,E,H,path", _TIE_FREE)
def test_gpu_router_tie_free(T, E, H, path):
    x, w, b = _tie_free_inputs(T, E, H, 4)
    _check_against_reference(x, w, b, 4, path)


def _launches(name: str) -> int:
    """Launches so far of the host build's kernels whose name holds `name`."""
    return sum(n for kn, n in _lib.kernels(DEV).module.stats()["kernels"].items() if name in kn)


@pytest.mark.gpu
@pytest.mark.hopper
@pytest.mark.skipif(not ON_HOSTSIM, reason="refusing cluster launches is the host build's switch "
                                             "(a GPU refuses them only when partitioned: MIG, MPS limits)")
@pytest.mark.parametrize("T,E,k", [(1, 128, 4), (7, 32, 8), (64, 128, 4)])
def test_hostsim_router_auto_without_clusters(T, E, k):
    """A GPU that refuses the 8-block cluster launch: AUTO (which picks the cluster path for
    T <= 64, E <= 128) falls back to the fused kernel, with the same top-k; path="cluster" reports
    the refusal instead."""
    from gptoss_kernels import _hostsim

    x, w, b = _tie_free_inputs(T, E, 520, k)
    _hostsim.set_refuse_clusters(True)
    try:
        fused, cluster = _launches("router_fused_kernel"), _launches("router_cluster_kernel")
        _check_against_reference(x, w, b, k, "auto")
        assert _launches("router_fused_kernel") == fused + 1 and _launches("router_cluster_kernel") == cluster
        with pytest.raises(ValueError, match="cluster launch was refused"):
            router_topk(x, w, b, k=k, out=_poisoned(T, k), path="cluster")
    finally:
        _hostsim.set_refuse_clusters(False)
    cluster = _launches("router_cluster_kernel")
    _check_against_reference(x, w, b, k, "auto")     # clusters allowed again: AUTO takes the cluster kernel
    assert _launches("router_cluster_kernel") == cluster + 1


# the shapes test's real H = 2880; host build: 520 (9 chunks of 64), emulation cost
_H_REAL = shrink(2880, 520)


@pytest.mark.gpu
@pytest.mark.parametrize("path", _PATHS3)
@pytest.mark.parametrize("E,H,k", [(128, 200, 4), (40, 64, 4), (256, 512, 8), (256, _H_REAL, 4), (128, _H_REAL, 1),
                                   (128, _H_REAL, 8), (8, 136, 8), (64, 1024, 5), (33, 72, 3)])
@pytest.mark.parametrize("T", [3, 130])
def test_gpu_router_shapes(E, H, k, T, path):
    if path == "cluster" and E > 128:
        pytest.skip("the cluster path takes E <= 128")
    x, w, b = _tie_free_inputs(T, E, H, k)
    _check_against_reference(x, w, b, k, path)


@pytest.mark.gpu
@pytest.mark.parametrize("path", _PATHS3)
def test_gpu_router_exact_ties_and_nan(path):
    """Rows of x that are zero give logits == bias exactly (every product is 0), so bias ties are
    exact ties: ids must go to the lower index. A NaN in x makes every logit of that token NaN:
    ids 0..k-1, weights NaN (the reference's behaviour)."""
    # host build: T = 70 (two tiles, the second partial; rows 10..31 below) and H = 264 (4 chunks of 64
    # and a tail of 8) instead of 200 x 2880, emulation cost; E = 128 and k = 4 as in gpt-oss-120b
    T, E, H, k = shrink(200, 70), 128, shrink(2880, 264), 4
    x, w, b = _tie_free_inputs(T, E, H, k)
    b = torch.zeros(E, dtype=torch.bfloat16, device=DEV)
    b[[5, 9, 77, 100, 101, 120]] = 1.0     # six tied maxima -> 5, 9, 77, 100
    x[10:20] = 0
    x[30, 100] = NAN
    x[31, :] = NAN
    out = _poisoned(T, k)
    ids, wts = router_topk(x, w, b, k=k, out=out, path=path)
    sync()
    rid, rw = reference.router_topk(x, w, b, k)
    assert torch.equal(ids, rid)
    assert ids[10:20].tolist() == [[5, 9, 77, 100]] * 10
    assert ids[30].tolist() == [0, 1, 2, 3] and ids[31].tolist() == [0, 1, 2, 3]
    assert torch.isnan(wts[30:32]).all()
    ok = torch.ones(T, dtype=torch.bool)
    ok[30:32] = False
    assert (wts[ok] - rw[ok]).abs().max().item() <= 1e-5
    assert torch.allclose(wts[10:20], torch.full((10, 4), 0.25, device=DEV))


@pytest.mark.gpu
def test_gpu_router_random_inputs_close():
    """Random (not tie-free) gpt-oss-120b-shaped inputs: near-ties may legitimately flip between
    fp32 accumulation orders, so require >= 99.9% of tokens with identical ids, and identical-id
    tokens within 1e-5 in weights."""
    # host build: T = 3073 (still > 3008: AUTO takes the fused path, 49 tiles) and H = 136 (two chunks
    # of 64 and a tail of 8) instead of 4096 x 2880, emulation cost
    x, w, b = _inputs(T=shrink(4096, 3073), H=shrink(2880, 136), E=128, device=DEV)
    ids, wts = router_topk(x, w, b, k=4)
    sync()
    rid, rw = reference.router_topk(x, w, b, 4)
    same = (ids == rid).all(dim=1)
    assert same.float().mean().item() >= 0.999
    assert (wts[same] - rw[same]).abs().max().item() <= 1e-5


@pytest.mark.gpu
def test_gpu_router_empty_and_deterministic():
    x, w, b = _tie_free_inputs(0, 32, 64, 4)
    ids, wts = router_topk(x, w, b, k=4)
    assert ids.shape == (0, 4) and wts.shape == (0, 4)
    # host build: T = 133 (three tiles) and H = 264 instead of 777 x 2880, emulation cost (the host
    # build runs the threads in a different order at each launch)
    x, w, b = _inputs(T=shrink(777, 133), H=shrink(2880, 264), E=128, device=DEV)
    for path in ("fused", "split") + (("cluster",) if HOPPER_PATHS else ()):
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
    ids = torch.rand(T, E, device=DEV).argsort(dim=1)[:, :k].to(torch.int32).contiguous()
    out = RouteMetadata(torch.full((E,), -5, dtype=torch.int32, device=DEV),
                        torch.full((E + 1,), -5, dtype=torch.int32, device=DEV),
                        torch.full((T * k,), -5, dtype=torch.int32, device=DEV))
    meta = route(ids, E, out=out)
    sync()
    assert meta.counts is out.counts
    _check_route(ids, E, meta)


@pytest.mark.gpu
def test_gpu_route_skewed_and_edge():
    E = 128
    ids = torch.full((5000, 4), 7, dtype=torch.int32, device=DEV)  # every row to one expert
    ids[:, 1:] = torch.tensor([3, 126, 127], dtype=torch.int32, device=DEV)
    _check_route(ids, E, route(ids, E))
    ids = torch.randint(0, 3, (20000, 8), dtype=torch.int32, device=DEV)  # few experts, > 128 chunks of 1024 rows
    _check_route(ids, 256, route(ids, 256))
    empty = torch.empty(0, 4, dtype=torch.int32, device=DEV)
    m = route(empty, E)
    assert (m.counts == 0).all() and (m.offsets == 0).all() and m.permutation.numel() == 0


def _ids_with_invalid(case):
    if case == "few":
        E = 32
        ids = torch.randint(0, E, (300, 4), dtype=torch.int32, device=DEV)
        ids[5, 2] = -1
        ids[77, 0] = E
        return ids, E
    # every row holds two invalid ids (-1 and 99 >= E); 2100 routed rows: three chunks of route's kernels
    return torch.tensor([[3, -1, 0, 7, 3, 99, 0]] * 300, dtype=torch.int32, device=DEV), 8


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["few", "many"])
def test_gpu_route_invalid_ids_documented(case):
    ids, E = _ids_with_invalid(case)
    m = route(ids, E)
    sync()
    valid = ids.flatten()
    keep = (valid >= 0) & (valid < E)
    assert m.offsets[E].item() == keep.sum().item() == m.counts.sum().item()
    assert (m.permutation[m.offsets[E].item():] == -1).all()
    perm = m.permutation[: m.offsets[E].item()].long()
    assert torch.equal(perm, torch.nonzero(keep).flatten()[valid[keep].long().sort(stable=True).indices])


@pytest.mark.gpu
def test_gpu_router_return_metadata():
    x, w, b = _tie_free_inputs(333, 128, shrink(2880, 264), 4)   # host build: H = 264, emulation cost
    ids, wts, meta = router_topk(x, w, b, k=4, return_metadata=True)
    sync()
    rid, _ = reference.router_topk(x, w, b, 4)
    assert torch.equal(ids, rid)
    _check_route(ids, 128, meta)


@pytest.mark.gpu
@pytest.mark.cuda_only  # CUDA graph capture and replay on a side stream
@pytest.mark.parametrize("T", [1, 64, 8192])
def test_gpu_router_cuda_graph(T):
    E, H, k = 128, 2880, 4
    x, w, b = _tie_free_inputs(T, E, H, k)
    ids = torch.empty(T, k, dtype=torch.int32, device=DEV)
    wts = torch.empty(T, k, dtype=torch.float32, device=DEV)
    meta = RouteMetadata(torch.empty(E, dtype=torch.int32, device=DEV),
                         torch.empty(E + 1, dtype=torch.int32, device=DEV),
                         torch.empty(T * k, dtype=torch.int32, device=DEV))
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
    # host build: the real H = 2880 for one token with 128 experts, else H = 520 (9 chunks of 64, 3
    # norm groups of 32 chunks), emulation cost; test_gpu_add_rms_norm_router_topk_shapes has more H
    H = 2880 if ON_GPU or (T == 1 and E == 128) else 520
    _add_norm_router_vs_two_ops(T, E, H, 4, wdtype)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 16])
@pytest.mark.parametrize("H,E,k", [(8, 32, 4), (64, 5, 4), (136, 33, 3), (520, 128, 8), (8192, 32, 8), (200, 128, 1)])
def test_gpu_add_rms_norm_router_topk_shapes(T, H, E, k):
    """H below 8 chunks of 64 (ranks with empty slices; H = 8: one 8-wide chunk), H not a multiple
    of 64, H = 8192 (32 groups of chunks), E not a multiple of 32, k = 1 and 8; k = 8 with a float32
    norm weight (every instance of the kernel)."""
    _add_norm_router_vs_two_ops(T, E, H, k, torch.bfloat16)
    if k == 8 and H == 520:
        _add_norm_router_vs_two_ops(T, E, H, k, torch.float32)


@pytest.mark.gpu
@pytest.mark.hopper
@pytest.mark.skipif(not ON_HOSTSIM, reason="refusing cluster launches is the host build's switch "
                                             "(a GPU refuses them only when partitioned: MIG, MPS limits)")
def test_hostsim_add_rms_norm_router_topk_without_clusters():
    """A GPU that refuses the cluster launch (the decode step's add + RMSNorm + router kernel): the
    op gives the two ops' results, as router_topk's AUTO path does."""
    from gptoss_kernels import _hostsim
    from gptoss_kernels.ops import add_rms_norm_router_topk, rms_norm
    from gptoss_kernels.ops import router as router_ops

    T, H, E, k = 1, 520, 128, 4
    g = torch.Generator(device=DEV).manual_seed(5)
    d, r = torch.randn(T, H, generator=g).bfloat16(), torch.randn(T, H, generator=g).bfloat16()
    nw = (torch.randn(H, generator=g) * 0.3 + 1).bfloat16()
    w, b = (torch.randn(E, H, generator=g) / math.sqrt(H)).bfloat16(), (torch.randn(E, generator=g) * 0.1).bfloat16()
    _hostsim.set_refuse_clusters(True)
    try:
        a_ref, h_ref = rms_norm(d, nw, eps=1e-5, residual=r)
        rid, rw = router_topk(a_ref, w, b, k)
        a, h, ids, wts = add_rms_norm_router_topk(d, r, nw, w, b, k, eps=1e-5)
        assert ("cpu", None) in router_ops._CLUSTER_REFUSED  # remembered: the next call goes straight to the two ops
    finally:
        _hostsim.set_refuse_clusters(False)
        router_ops._CLUSTER_REFUSED.discard(("cpu", None))
    assert torch.equal(a.view(torch.int16), a_ref.view(torch.int16))
    assert torch.equal(h.view(torch.int16), h_ref.view(torch.int16))
    assert torch.equal(ids, rid) and torch.equal(wts, rw)


def _add_norm_router_vs_two_ops(T, E, H, k, wdtype):
    """The one-kernel path (T <= 16) against rms_norm then router_topk (the cluster path for
    T <= 64): the same normed activations and residual stream bit for bit, and then the same
    logits in the same order, so the same ids and weights; in place on the residual stream.
    T = 17 takes the two-op path itself."""
    from gptoss_kernels.ops import add_rms_norm_router_topk, rms_norm

    g = torch.Generator(device=DEV).manual_seed(T * 31 + E + H + k)
    d = torch.randn(T, H, device=DEV, generator=g).bfloat16()
    r = torch.randn(T, H, device=DEV, generator=g).bfloat16()
    nw = (torch.randn(H, device=DEV, generator=g) * 0.3 + 1).to(wdtype)
    w = (torch.randn(E, H, device=DEV, generator=g) / math.sqrt(H)).bfloat16()
    b = (torch.randn(E, device=DEV, generator=g) * 0.1).bfloat16()
    a_ref, h_ref = rms_norm(d, nw, eps=1e-5, residual=r)
    rid, rw = router_topk(a_ref, w, b, k, path="cluster" if HOPPER_PATHS else "auto")  # the op's own router path
    x = r.clone()
    a = torch.full((T, H), float("nan"), dtype=torch.bfloat16, device=DEV)
    out = _poisoned(T, k)
    got = add_rms_norm_router_topk(d, x, nw, w, b, k, eps=1e-5, norm_out=a, residual_out=x, out=out)
    sync()
    assert got[0] is a and got[1] is x and got[2] is out[0] and got[3] is out[1]
    assert torch.equal(a.view(torch.int16), a_ref.view(torch.int16))
    assert torch.equal(x.view(torch.int16), h_ref.view(torch.int16))
    assert torch.equal(out[0], rid) and torch.equal(out[1], rw)
