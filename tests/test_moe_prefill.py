"""MoE prefill regime (csrc/kernels/moe_prefill.cu, ops/_moe_prefill.py).

CPU: the kernels' host-built arithmetic (grouping algorithm, tile schedule, MXFP4 -> bf16 bit
conversion) against the reference; workspace layout; SASS of the GEMM kernels (HMMA for the
mma.sync variant, no local memory).
GPU (marked gpu; without a GPU they run on the host build of the kernels, tests/kernel_device.py,
at smaller shapes): each pipeline step against the reference, in correctness order (grouping,
mlp1, mlp2, combine), the grouping kernels alone (route chunks, invalid ids), then the whole op
over shapes, skewed routing, experts without tokens, more work items than resident blocks,
poisoned outputs, determinism; CUDA-graph replay and timings on the GPU only (cuda_only).

First GPU run, in this order (each line only after the previous passes):
  pytest -s -x tests/test_moe_prefill.py -k "steps_in_order and mma_sync"   # grouping, mlp1, mlp2, combine
  pytest -s -x tests/test_moe_prefill.py -k "steps_in_order"                 # the wgmma variants
  pytest -s tests/test_moe_prefill.py -m gpu -k "not bench"
  pytest -s tests/test_moe_prefill.py -k bench                               # timings vs dense bf16
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

import gptoss_kernels as gk
from gptoss_kernels import _lib
from gptoss_kernels import reference as R
from gptoss_kernels.ops import _moe_prefill as P

from . import sass
from .kernel_device import DEV, ON_GPU, ON_HOSTSIM, shrink, sync

BM, BN = 128, 128  # tile of the mma.sync GEMMs (csrc/kernels/moe_prefill.cu, namespace mma)


def _has_family() -> bool:
    C = _lib.C()
    return C is not None and P.FAMILY in getattr(C, "families", ())


def _layout_device() -> torch.device | None:
    """Whose workspace layout and host-built helpers the CPU tests read: _C's (None), else the host
    build's (the same source compiled by g++; "cpu"), else neither (the tests skip)."""
    if _has_family():
        return None
    if _lib.family_built(P.FAMILY, "cpu"):
        return torch.device("cpu")
    pytest.skip("neither _C nor the host build (gptoss_kernels._hostsim) has the moe_prefill family (rebuild)")


# ---------------------------------------------------------------------------------------------
# routing inputs
# ---------------------------------------------------------------------------------------------

def make_routing(T: int, E: int, k: int, *, skew: bool = False, used: int | None = None,
                 device="cpu", gen: torch.Generator | None = None):
    """topk_ids int32 [T, k] (distinct experts per token), topk_weights f32 [T, k] (softmax).

    skew: half the tokens have expert 0 among their k (one expert with ~T/2 rows).
    used: only experts 0, 2, 4, ... (the first `used` even ones) get tokens: the others are empty.
    """
    pool = torch.arange(0, E, 2)[:used] if used is not None else torch.arange(E)
    assert pool.numel() >= k
    keys = torch.rand(T, pool.numel(), generator=gen)
    ids = pool[keys.argsort(dim=1)[:, :k]]
    if skew:
        half = torch.arange(T) < T // 2
        has0 = (ids == 0).any(1)
        fix = half & ~has0
        ids[fix, 0] = 0
    logits = torch.randn(T, k, generator=gen)
    return ids.to(torch.int32).to(device), torch.softmax(logits, -1).to(device)


# ---------------------------------------------------------------------------------------------
# CPU: host-built kernel arithmetic
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def host():
    dev = _layout_device()
    return _lib.C().host if dev is None else _lib.kernels(dev).host


@pytest.mark.parametrize("T,E,k,chunk,kw", [
    (1, 1, 1, 1024, {}),
    (37, 32, 4, 7, {}),                 # many chunks, ragged last chunk
    (500, 32, 4, 1024, {"skew": True}),
    (1000, 128, 4, 64, {"used": 20}),   # 108 experts without tokens
    (4096, 128, 4, 1024, {}),
    (3000, 256, 8, 1000, {"skew": True}),
])
def test_host_grouping_matches_route_metadata(host, T, E, k, chunk, kw):
    ids, _ = make_routing(T, E, k, **kw)
    counts, offsets, perm, tile_off = host.moe_prefill_route(ids.numpy(), E, BM, chunk)
    rc, ro, rp = R.route_metadata(ids, E)
    assert torch.equal(torch.from_numpy(counts), rc)
    assert torch.equal(torch.from_numpy(offsets), ro)
    assert torch.equal(torch.from_numpy(perm), rp)  # stable: rows of an expert in increasing t*k+j
    want_tiles = torch.zeros(E + 1, dtype=torch.int64)
    want_tiles[1:] = torch.cumsum((rc.long() + BM - 1) // BM, 0)
    assert torch.equal(torch.from_numpy(tile_off).long(), want_tiles)


@pytest.mark.parametrize("E,n_tiles", [(1, 1), (32, 45), (128, 23)])
def test_host_tile_schedule(host, E, n_tiles):
    counts = torch.randint(0, 400, (E,))
    counts[::3] = 0  # experts without rows own no tiles
    tile_off = torch.zeros(E + 1, dtype=torch.int32)
    tile_off[1:] = torch.cumsum((counts + BM - 1) // BM, 0)
    got = torch.from_numpy(host.moe_prefill_decode_tiles(tile_off.numpy(), n_tiles))
    want = [(e, m, n) for e in range(E) for m in range(int(tile_off[e + 1] - tile_off[e])) for n in range(n_tiles)]
    assert got.tolist() == [list(w) for w in want]


def test_host_dequant_bits_exact(host):
    # every byte (two codes) x every scale byte 0..254: the main loop's bf16 bit conversion equals
    # the reference exactly (infinities included: 2^127 * |code| >= 2 overflows in both).
    # Scale byte 255 is excluded: the kernel's bf16 2^128 is inf where the fp32 reference's ldexp
    # gives a finite 2^128 * 0.5 (and 0 * inf = NaN): no real checkpoint has it.
    scales = torch.arange(255, dtype=torch.uint8).repeat_interleave(16).view(-1, 1)       # [255*16, 1]
    blocks = torch.arange(256, dtype=torch.uint8).view(16, 16).repeat(255, 1).view(-1, 1, 16)
    got = torch.from_numpy(host.moe_prefill_dequant(blocks.numpy(), scales.numpy()))
    want = R.mxfp4_dequantize(blocks, scales, torch.float32).view(got.shape)
    assert torch.equal(got, want)
    assert torch.equal(torch.signbit(got), torch.signbit(want))


def test_workspace_layout():
    dev = _layout_device()
    T, k, E, H, I = 1000, 4, 128, 2880, 2880
    off = P.workspace_layout(T, k, E, H, I, dev)
    total = P.workspace_bytes(T, k, E, H, I, dev)
    sizes = {"counts": 4 * E, "offsets": 4 * (E + 1), "tile_offsets": 4 * (E + 1), "perm": 4 * T * k,
             "chunk_base": 4 * E * math.ceil(T * k / 1024), "act": 2 * T * k * I, "y": 2 * T * k * H}
    names = list(P.WS_PARTS)
    for a, b in zip(names, names[1:]):
        assert off[a] % 256 == 0 and off[a] + sizes[a] <= off[b]
    assert off["y"] + sizes["y"] <= total
    assert P.workspace_bytes(0, 4, E, H, I, dev) < 4096


# ---------------------------------------------------------------------------------------------
# CPU: SASS and resources of the compiled kernels
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def prefill_kernels():
    if not _has_family():
        pytest.skip("this build's _C has no moe_prefill family (rebuild)")
    if sass.cuobjdump() is None:
        pytest.skip("cuobjdump not found (pip install triton)")
    ks = {n: k for n, k in sass.kernels(gk.library_path()).items()
          if any(s in k.name for s in ("grouped_gemm", "route_", "combine_kernel")) and "moe_prefill" in n}
    if not ks:
        pytest.fail("no moe_prefill kernels in libgptoss_kernels.so")
    return ks


def test_prefill_resources(prefill_kernels):
    for k in sorted(prefill_kernels.values(), key=lambda k: k.name):
        print(f"{k.name[:100]:100s} REG={k.reg:3d} SHARED={k.shared} STACK={k.stack} LOCAL={k.local}")
        assert k.local == 0 and k.stack == 0, f"{k.name} uses local memory"
        assert "LDL" not in k.sass and "STL" not in k.sass, f"{k.name} has LDL/STL"


def test_mma_sync_gemm_uses_hmma(prefill_kernels):
    # The mma.sync variant (grouped_gemm_mma_kernel) must issue bf16 tensor-core HMMA in its main
    # loop (HMMA.16816.F32.BF16); no FFMA-only fallback.
    gemms = [k for k in prefill_kernels.values() if "grouped_gemm_mma_kernel" in k.name]
    assert len(gemms) == 2, [k.name for k in prefill_kernels.values()]  # mlp1 (SwiGLU) and mlp2 epilogues
    for k in gemms:
        assert "HMMA.16816.F32.BF16" in k.sass, f"{k.name}: no bf16 HMMA"
        assert "LDSM" in k.sass, f"{k.name}: no ldmatrix"
        assert "LDGSTS" in k.sass, f"{k.name}: no cp.async"


def test_wgmma_gemm_uses_hgmma(prefill_kernels):
    # The wgmma variant (grouped_gemm_wgmma_kernel): HGMMA 64x128x16 bf16 from shared-memory
    # descriptors, and the async-proxy fence after the threads' dequantized-B stores.
    gemms = [k for k in prefill_kernels.values() if "grouped_gemm_wgmma_kernel" in k.name]
    assert len(gemms) == 6, [k.name for k in prefill_kernels.values()]  # 2 epilogues x BN 128/192/256
    for k in gemms:
        bn = next(n for n in (128, 192, 256) if f", {n}>" in k.name)
        assert f"HGMMA.64x{bn}x16.F32.BF16" in k.sass, f"{k.name}: no HGMMA 64x{bn}x16"
        # the k-tile's wgmma group stays in flight while the next tile is dequantized
        assert "WARPGROUP.DEPBAR.LE gsb0, 0x1" in k.sass, f"{k.name}: no overlapped wgmma wait"
        # ...and the only full wait is the one after the k loop: ptxas serializes the HGMMA chain
        # (a full wait after each, warning C7519) when accumulators are touched between them
        assert k.sass.count("WARPGROUP.DEPBAR.LE gsb0, 0x0") == 1, f"{k.name}: serialized HGMMAs"
        assert "FENCE.VIEW.ASYNC.S" in k.sass, f"{k.name}: no fence.proxy.async"


# ---------------------------------------------------------------------------------------------
# GPU (on the host build without one: DEV = "cpu", the ops run the kernels' host build)
# ---------------------------------------------------------------------------------------------
# Tolerance: relative Frobenius error 1e-2. The kernels take the same bf16 x and exact (MXFP4 ->
# bf16 is exact) weights as the fp32 reference and accumulate in fp32, so the error comes from
# bf16 roundings only: act stored as bf16 between the GEMMs (<= 2^-9 relative per element,
# ~1.1e-3 rms), y stored as bf16 per (token, slot) (~1.1e-3 rms) and the bf16 output (~1.1e-3 rms):
# about 2e-3 expected; 1e-2 leaves 5x margin while any indexing/layout error gives O(1).
#
# Host build shapes: the grouped GEMMs are the costly kernels to emulate (every mma.sync and
# wgmma is a warp/warpgroup collective over emulated threads): ~5 ms per tile step (one 128 x BN
# work item's 64-wide k-tile), so H = I = 2880 (45 k-tiles x 23-45 n-tiles per 128-row m-tile)
# costs minutes per m-tile there. The host shapes below keep each test's edge cases at H, I in
# {64, 96, 160, 288} with 4 to ~300 work items per GEMM.

TOL = 1e-2


@pytest.fixture(autouse=True, scope="module")
def _one_cpu_thread():
    """Without a GPU the references here are CPU matmuls of a few rows per expert: with torch's
    intra-op threads on a machine whose cores are busy (the host build's other tests) they take 10 to
    50 times longer than on one thread (E = 256 experts: 0.4 s -> up to 20 s)."""
    if ON_GPU:
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    assert not torch.isnan(got).any(), "NaN in output"
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def _random_mxfp4(E, rows, K, gen, device):
    """Random MXFP4 weights [E, rows, K] made directly on `device` (quantizing fp32 weights on the
    host would take minutes at E=128, 5760 x 2880): uniform random code bytes (every E2M1 code,
    both nibbles, -0 included) and scale bytes s0 + {-1, 0, 1} per block with s0 chosen so the
    dequantized weights have rms ~ 1/sqrt(K) (rms of the E2M1 values over all codes: 2.93)."""
    s0 = 127 + round(math.log2(1.0 / (math.sqrt(K) * 2.93)))
    blocks = torch.randint(0, 256, (E, rows, K // 32, 16), generator=gen, device=device, dtype=torch.uint8)
    scales = (s0 + torch.randint(-1, 2, (E, rows, K // 32), generator=gen, device=device)).to(torch.uint8)
    return blocks, scales


def make_problem(T, E, H, I, k=4, *, device=DEV, seed=0, **routing):  # noqa: E741
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(T, H, generator=g, device=device).to(torch.bfloat16)
    # weights with rms ~ 1/sqrt(fan_in), so z = W1 x is O(1): SwiGLU's clamp and curve both matter
    w1b, w1s = _random_mxfp4(E, 2 * I, H, g, device)
    w2b, w2s = _random_mxfp4(E, H, I, g, device)
    b1 = (0.5 * torch.randn(E, 2 * I, generator=g, device=device)).to(torch.bfloat16)
    b2 = (0.5 * torch.randn(E, H, generator=g, device=device)).to(torch.bfloat16)
    ids, wts = make_routing(T, E, k, gen=torch.Generator().manual_seed(seed), **routing)
    return dict(x=x, topk_ids=ids.to(device), topk_weights=wts.to(device), w1_blocks=w1b, w1_scales=w1s,
                w1_bias=b1, w2_blocks=w2b, w2_scales=w2s, w2_bias=b2)


def test_make_problem_cpu():
    """The GPU tests' input generator (runs here on the CPU): shapes, dtypes, O(1) pre-activations."""
    p = make_problem(64, 4, 288, 160, device="cpu", seed=1, skew=True)
    assert p["w1_blocks"].shape == (4, 320, 9, 16) and p["w2_scales"].shape == (4, 288, 5)
    w1 = R.mxfp4_dequantize(p["w1_blocks"][0], p["w1_scales"][0], torch.float32)
    z = p["x"].float() @ w1.t()
    assert 0.3 < z.std().item() < 3.0
    assert (p["topk_ids"] == 0).any(1).float().mean() >= 0.5
    out = R.moe(*[p[n] for n in ORDER])
    assert torch.isfinite(out.float()).all() and out.float().std() > 0.05


ORDER = ("x", "topk_ids", "topk_weights", "w1_blocks", "w1_scales", "w1_bias", "w2_blocks", "w2_scales", "w2_bias")


def args(p):
    return [p[n] for n in ORDER]


def new_workspace(p) -> torch.Tensor:
    ws = P.new_workspace(p["x"], p["topk_ids"], p["w1_blocks"])
    assert ws.data_ptr() % 256 == 0  # the C ABI's alignment, on the CPU allocator too
    return ws


def run_kernel(p, variant=P.AUTO, out=None, workspace=None):
    T, H = p["x"].shape
    if out is None:
        out = torch.full((T, H), float("nan"), dtype=torch.bfloat16, device=p["x"].device)
    return P.run(*args(p), 1.702, 7.0, out, workspace=workspace, variant=variant)


def variants():
    """Every GEMM variant; the wgmma ones (sm_90a only) marked hopper."""
    return [pytest.param(v, id=name, marks=[pytest.mark.hopper] if name.startswith("wgmma") else [])
            for name, v in P.VARIANTS.items()]


def _mtiles(ids: torch.Tensor, E: int) -> int:
    """Work list m-tiles: sum over experts of ceil(rows / 128) (ids in [0, E))."""
    counts = torch.bincount(ids.reshape(-1).long().cpu(), minlength=E)
    return int(((counts + BM - 1) // BM).sum())


@pytest.mark.gpu
@pytest.mark.parametrize("variant", variants())
@pytest.mark.parametrize("T,E,H,I,kw", ([(500, 32, 2880, 2880, {})] if ON_GPU else [
    # host build: instead of the case above (emulation cost: 500 tokens at H = I = 2880 are ~65000
    # tile steps per GEMM there, about an hour for the 4 variants), 160 tokens on 5 of 10 experts
    # at the small H, I of the next case, routed so that expert rows are 143 (two m-tiles, the
    # second partial), 128 (exactly one) and 127. The next case runs as on the GPU (~6 s a variant).
    (160, 10, 288, 160, {"skew": True, "used": 5}),
]) + [
    (1024, 128, 288, 160, {"skew": True, "used": 40}),  # K tails (288 = 4.5 x 64), N tail, empty experts
])
def test_steps_in_order(variant, T, E, H, I, kw):  # noqa: E741
    """Each step against the reference, in the order a failure must be looked at."""
    k = 4
    p = make_problem(T, E, H, I, k, **kw)
    ws = new_workspace(p).fill_(0xFF)  # poison: NaN bf16, -1 ints
    out = torch.full((T, H), float("nan"), dtype=torch.bfloat16, device=DEV)
    v = P.workspace_views(ws, T, k, E, H, I)
    step = lambda s: P.run_step(s, *args(p), 1.702, 7.0, out, workspace=ws, variant=variant)  # noqa: E731

    # 1. grouping: exact
    step(1)
    sync()
    rc, ro, rp = R.route_metadata(p["topk_ids"], E)
    assert torch.equal(v["counts"], rc), "grouping: counts"
    assert torch.equal(v["offsets"], ro), "grouping: offsets"
    assert torch.equal(v["perm"], rp), "grouping: permutation (stable order)"
    tiles = torch.zeros(E + 1, dtype=torch.int32, device=DEV)
    tiles[1:] = torch.cumsum((rc + BM - 1) // BM, 0)
    assert torch.equal(v["tile_offsets"], tiles), "grouping: m-tile offsets"

    # 2. mlp1 + bias + SwiGLU, rows in grouped order p (row p = routed row perm[p])
    step(2)
    sync()
    perm = rp.long()
    tok = perm // k
    act_ref = torch.empty(T * k, I, device=DEV)
    xf = p["x"].float()
    for e in range(E):
        s, t = int(ro[e]), int(ro[e + 1])
        if s == t:
            continue
        w1 = R.mxfp4_dequantize(p["w1_blocks"][e], p["w1_scales"][e], torch.float32)
        act_ref[s:t] = R.swiglu(xf[tok[s:t]] @ w1.t() + p["w1_bias"][e].float())
    err1 = rel_err(v["act"], act_ref)
    print(f"mlp1 act rel err {err1:.2e}")
    assert err1 < TOL

    # 3. mlp2 + bias, x routing weight, row r = t*k+j (from the kernel's own act, so this checks mlp2 alone)
    step(3)
    sync()
    y_ref = torch.empty(T * k, H, device=DEV)
    act = v["act"].float()
    wflat = p["topk_weights"].reshape(-1)
    for e in range(E):
        s, t = int(ro[e]), int(ro[e + 1])
        if s == t:
            continue
        w2 = R.mxfp4_dequantize(p["w2_blocks"][e], p["w2_scales"][e], torch.float32)
        y_ref[perm[s:t]] = (act[s:t] @ w2.t() + p["w2_bias"][e].float()) * wflat[perm[s:t]].unsqueeze(1)
    err2 = rel_err(v["y"], y_ref)
    print(f"mlp2 y rel err {err2:.2e}")
    assert err2 < TOL

    # 4. combine: sum of the k slots in slot order, fp32 -> bf16
    step(4)
    sync()
    y = v["y"].float().view(T, k, H)
    acc = y[:, 0]
    for j in range(1, k):  # the kernel's order: slot 0, 1, ..., k-1, fp32 adds
        acc = acc + y[:, j]
    assert torch.equal(out, acc.to(torch.bfloat16)), "combine: not the slot-order fp32 sum of y"
    err = rel_err(out, R.moe(*args(p)))
    print(f"moe rel err {err:.2e}")
    assert err < TOL


@pytest.mark.gpu
@pytest.mark.parametrize("T,E,k,bad", [
    (700, 32, 3, False),    # 2100 routed rows: 3 chunks of 1024, the last ragged
    (1024, 256, 4, False),  # 4096 rows: 4 full chunks; E = 256, the most the kernels take
    (300, 8, 4, True),      # ids -1 and E among valid ones
])
def test_route_step(T, E, k, bad):
    """Step 1 alone (route_count, route_scan, route_scatter: chunks of 1024 rows, warp-level
    match/popc ranks, per-warp counts scanned in warp order) against the reference metadata,
    exactly. `bad`: ids -1 and E are skipped (not counted, not placed: perm's valid prefix is the
    reference's metadata of the valid rows, the rest of perm stays as it was); the whole op then
    stays in bounds (the host build's checkers), the tokens without a bad id are right and the
    others' rows are NaN (as the decode kernels')."""
    g = torch.Generator().manual_seed(T + E)
    ids = torch.randint(0, E, (T, k), generator=g, dtype=torch.int32)
    if bad:
        ids[::7, 0] = -1
        ids[3::11, k - 1] = E
    # H = I = 64: step 1 does not depend on them; the whole op (bad ids) stays cheap
    p = make_problem(T, E, 64, 64, k, seed=T + E)
    p["topk_ids"] = ids.to(DEV)
    ws = new_workspace(p).fill_(0xFF)  # poison: perm -1 where unwritten
    out = torch.full((T, 64), float("nan"), dtype=torch.bfloat16, device=DEV)
    v = P.workspace_views(ws, T, k, E, 64, 64)
    P.run_step(1, *args(p), 1.702, 7.0, out, workspace=ws)
    sync()

    valid = (ids >= 0) & (ids < E)
    flat = ids.reshape(-1).long()
    rc = torch.bincount(flat[valid.reshape(-1)], minlength=E).to(torch.int32)
    ro = torch.zeros(E + 1, dtype=torch.int32)
    ro[1:] = torch.cumsum(rc, 0)
    rows_valid = torch.nonzero(valid.reshape(-1)).reshape(-1)
    want_perm = rows_valid[torch.sort(flat[rows_valid], stable=True).indices].to(torch.int32)
    n = int(ro[E])
    tiles = torch.zeros(E + 1, dtype=torch.int32)
    tiles[1:] = torch.cumsum((rc + BM - 1) // BM, 0)
    assert torch.equal(v["counts"].cpu(), rc), "counts"
    assert torch.equal(v["offsets"].cpu(), ro), "offsets"
    assert torch.equal(v["perm"][:n].cpu(), want_perm), "permutation (stable order)"
    assert (v["perm"][n:] == -1).all(), "perm written past the valid rows"
    assert torch.equal(v["tile_offsets"].cpu(), tiles), "m-tile offsets"
    if not bad:
        rc2, ro2, rp2 = R.route_metadata(ids, E)
        assert torch.equal(ro, ro2) and torch.equal(v["perm"].cpu(), rp2)
        return

    for s in (2, 3, 4):
        P.run_step(s, *args(p), 1.702, 7.0, out, workspace=ws)
    sync()
    good = valid.all(1)
    q = {n_: (t[good.to(t.device)] if n_ in ("x", "topk_ids", "topk_weights") else t) for n_, t in p.items()}
    assert rel_err(out[good.to(DEV)], R.moe(*args(q))) < TOL
    # the documented behaviour, as the decode kernels: a token holding a bad id gets a NaN row
    assert (~good).any() and out[(~good).to(DEV)].isnan().all()


@functools.lru_cache(maxsize=2)
def _problem_and_reference(T, E, H, I):  # noqa: E741
    """Inputs and their reference, shared by the variants (read only)."""
    p = make_problem(T, E, H, I, seed=T + E)
    return p, R.moe(*args(p))


# host build: one (T, E) = (56, 256) at H = 160 and I = 64 (mma.sync: 96) instead of T in
# {128, ..., 4096} x E in {32, 128} at H = I = 2880 (emulation cost: 10 min to 1 h per call
# there). Kept: many experts with few rows each (T*k / E < 1: the padded m-tiles), E = 256 (the
# most the kernels take), K tails (mlp1: 2.5 k-tiles; mma.sync mlp2: 1.5) and, in both GEMMs, more
# work items than resident blocks (the host build has 132 SMs holding 1 wgmma or 2 mma.sync
# blocks each; 149 m-tiles, x 2 n-tiles where N = 2I or H exceeds BN), so the persistent blocks
# take further items (the wgmma variant loads the next item while the current one's epilogue runs).
@pytest.mark.gpu
@pytest.mark.parametrize("variant", variants())
@pytest.mark.parametrize("T", [128, 500, 1024, 4096] if ON_GPU else [56])
@pytest.mark.parametrize("E", [32, 128] if ON_GPU else [256])
def test_moe_prefill_vs_reference(T, E, variant):
    H, I = shrink(2880, 160), shrink(2880, 96 if variant == P.MMA_SYNC else 64)  # noqa: E741
    p, ref = _problem_and_reference(T, E, H, I)
    if ON_HOSTSIM:  # the point of the host shape: more work items than resident blocks, in both GEMMs
        bn = {P.MMA_SYNC: 128, P.WGMMA: 192, P.WGMMA_N128: 128, P.WGMMA_N256: 256}[variant]
        work = [_mtiles(p["topk_ids"], E) * math.ceil(N / bn) for N in (2 * I, H)]
        assert min(work) > 132 * (2 if variant == P.MMA_SYNC else 1), work
    out = run_kernel(p, variant)
    sync()
    err = rel_err(out, ref)
    print(f"T={T} E={E} rel err {err:.2e}")
    assert err < TOL


def _routing_case(case):
    # host build (emulation cost: these GPU shapes take ~1 min to ~1 h per call there): H = I = 64
    # instead of 2880 for skew and empty_experts, and big_small_hidden on 512 tokens and 8 experts
    # instead of 8192 and 32 (still 2-3 m-tiles per expert).
    if case == "skew":            # half the tokens on expert 0: one expert with many m-tiles
        return make_problem(shrink(2048, 1024), 128, shrink(2880, 64), shrink(2880, 64), skew=True, seed=1)
    if case == "empty_experts":   # only 8 of 128 experts have tokens
        return make_problem(1000, 128, shrink(2880, 64), shrink(2880, 64), used=8, seed=2)
    # T = 8192 at small H/I with K and N tails
    return make_problem(shrink(8192, 512), shrink(32, 8), 288, 160, seed=3)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", variants())
@pytest.mark.parametrize("case", ["skew", "empty_experts", "big_small_hidden"])
def test_moe_prefill_routing_cases(variant, case):
    p = _routing_case(case)
    out = run_kernel(p, variant)
    sync()
    err = rel_err(out, R.moe(*args(p)))
    print(f"{case}: rel err {err:.2e}")
    assert err < TOL


def _deterministic_problem():
    # host build: 384 tokens at H = I = 64 instead of 1536 at 2880 (emulation cost: ~30 min per run
    # there); 128 experts and skewed routing kept
    return make_problem(shrink(1536, 384), 128, shrink(2880, 64), shrink(2880, 64), skew=True, seed=4)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", variants())
def test_deterministic(variant):
    """Two runs give the same bits (no float atomics). On the host build the second run resumes
    the threads and blocks in reverse order (a different interleaving at every barrier)."""
    p = _deterministic_problem()
    a = run_kernel(p, variant)
    if ON_HOSTSIM:
        mod = _lib.kernels(DEV).module
        mod.set_order(1)  # reverse
        try:
            b = run_kernel(p, variant)
        finally:
            mod.set_order(-1, 0x9E3779B97F4A7C15)  # the default: rotate per launch
    else:
        b = run_kernel(p, variant)
    sync()
    assert torch.equal(a, b), "two runs differ: the op must be deterministic (no float atomics)"
    assert rel_err(a, R.moe(*args(p))) < TOL


@pytest.mark.gpu
@pytest.mark.cuda_only  # CUDA graphs
@pytest.mark.parametrize("variant", variants())
def test_graph_replay(variant):
    p = make_problem(1536, 128, 2880, 2880, skew=True, seed=4)
    T, H = p["x"].shape
    a = run_kernel(p, variant)

    ws = new_workspace(p)
    out = torch.full((T, H), float("nan"), dtype=torch.bfloat16, device="cuda")
    run_kernel(p, variant, out=out, workspace=ws)  # warm-up (function attributes) outside the capture
    torch.cuda.synchronize()
    out.fill_(float("nan"))
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        run_kernel(p, variant, out=out, workspace=ws)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, a), "graph replay differs from eager"
    # new routing in place, replay again: the graph has no host-side sizes baked in except T
    ids, wts = make_routing(T, 128, 4, gen=torch.Generator().manual_seed(9), device="cuda")
    p["topk_ids"].copy_(ids)
    p["topk_weights"].copy_(wts)
    g.replay()
    torch.cuda.synchronize()
    assert rel_err(out, R.moe(*args(p))) < TOL


@pytest.mark.gpu
def test_empty_batch_is_noop():
    p = make_problem(0, 32, 288, 160)
    out = torch.empty(0, 288, dtype=torch.bfloat16, device=DEV)
    assert run_kernel(p, out=out) is out


@pytest.mark.gpu
def test_available():
    assert P.available(DEV)


@pytest.mark.gpu
@pytest.mark.cuda_only  # timings (CUDA events)
@pytest.mark.parametrize("T,E", [(4096, 128), (16384, 128)])
def test_bench_prefill(T, E):
    """Timings (printed; run with -s), not a pass/fail gate: each step per variant against a dense
    bf16 torch.matmul of the same FLOPs (the goal: grouped GEMMs >= 60% of the dense rate)."""
    H = I = 2880  # noqa: E741
    k = 4
    p = make_problem(T, E, H, I, k, seed=5)
    R_ = T * k
    out = torch.empty(T, H, dtype=torch.bfloat16, device="cuda")
    ws = P.new_workspace(p["x"], p["topk_ids"], p["w1_blocks"])

    def timed(fn, reps=10):
        fn()
        torch.cuda.synchronize()
        ts = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b))
        return sorted(ts)[len(ts) // 2]

    a1 = torch.randn(R_, H, device="cuda", dtype=torch.bfloat16)
    b1 = torch.randn(H, 2 * I, device="cuda", dtype=torch.bfloat16)
    a2 = torch.randn(R_, I, device="cuda", dtype=torch.bfloat16)
    b2 = torch.randn(I, H, device="cuda", dtype=torch.bfloat16)
    d1, d2 = timed(lambda: a1 @ b1), timed(lambda: a2 @ b2)
    f1, f2 = 2.0 * R_ * H * 2 * I, 2.0 * R_ * I * H
    print(f"\nT={T} E={E} k={k}: dense bf16 matmul mlp1 {d1:.3f} ms ({f1 / d1 / 1e9:.0f} TFLOP/s), "
          f"mlp2 {d2:.3f} ms ({f2 / d2 / 1e9:.0f} TFLOP/s)")
    for name, v in P.VARIANTS.items():
        try:
            run_kernel(p, v, out=out, workspace=ws)
        except ValueError as e:
            print(f"  {name}: {e}")
            continue
        st = [timed(lambda s=s: P.run_step(s, *args(p), 1.702, 7.0, out, workspace=ws, variant=v)) for s in (1, 2, 3, 4)]
        tot = timed(lambda: run_kernel(p, v, out=out, workspace=ws))
        print(f"  {name:11s} route {st[0]:.3f}  mlp1 {st[1]:.3f} ({f1 / st[1] / 1e9:.0f} TF/s, {d1 / st[1]:.0%} of dense)"
              f"  mlp2 {st[2]:.3f} ({f2 / st[2] / 1e9:.0f} TF/s, {d2 / st[2]:.0%})  combine {st[3]:.3f}  total {tot:.3f} ms")


@pytest.mark.gpu
def test_misaligned_out_and_bias_views():
    """run() copies views the C ABI cannot take (out 8-byte aligned, biases 2-byte aligned)."""
    # host build: 100 tokens on 4 experts instead of 300 on 32 (emulation cost; the subject is
    # run()'s copies, the shape keeps the K and N tails)
    p = make_problem(shrink(300, 100), shrink(32, 4), 288, 160, seed=6)
    T, H = p["x"].shape
    E = p["w1_bias"].shape[0]
    buf = torch.full((T * H + 4,), float("nan"), dtype=torch.bfloat16, device=DEV)
    out = buf[4:].view(T, H)  # 8-byte aligned
    assert out.data_ptr() % 16 == 8
    b1 = torch.empty(p["w1_bias"].numel() + 1, dtype=torch.bfloat16, device=DEV)[1:].view(E, -1)
    b1.copy_(p["w1_bias"])
    p["w1_bias"] = b1
    P.run(*args(p), 1.702, 7.0, out, workspace=None if ON_GPU else new_workspace(p))
    sync()
    assert rel_err(out, R.moe(*args(p))) < TOL
