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
# GPU
# ---------------------------------------------------------------------------------------------
# Tolerance: relative Frobenius error 1e-2. The kernels take the same bf16 x and exact (MXFP4 ->
# bf16 is exact) weights as the fp32 reference and accumulate in fp32, so the error comes from
# bf16 roundings only: act stored as bf16 between the GEMMs (<= 2^-9 relative per element,
# ~1.1e-3 rms), y stored as bf16 per (token, slot) (~1.1e-3 rms) and the bf16 output (~1.1e-3 rms):
# about 2e-3 expected; 1e-2 leaves 5x margin while any indexing/layout error gives O(1).

TOL = 1e-2


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


def make_problem(T, E, H, I, k=4, *, device="cuda", seed=0, **routing):  # noqa: E741
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


def run_kernel(p, variant=P.AUTO, out=None, workspace=None):
    T, H = p["x"].shape
    if out is None:
        out = torch.full((T, H), float("nan"), dtype=torch.bfloat16, device=p["x"].device)
    return P.run(*args(p), 1.702, 7.0, out, workspace=workspace, variant=variant)


def variants():
    return [pytest.param(v, id=name) for name, v in P.VARIANTS.items()]


@pytest.mark.gpu
@pytest.mark.parametrize("variant", variants())
@pytest.mark.parametrize("T,E,H,I,kw", [
    (500, 32, 2880, 2880, {}),
    (1024, 128, 288, 160, {"skew": True, "used": 40}),  # K tails (288 = 4.5 x 64), N tail, empty experts
])
def test_steps_in_order(variant, T, E, H, I, kw):  # noqa: E741
    """Each step against the reference, in the order a failure must be looked at."""
    k = 4
    p = make_problem(T, E, H, I, k, **kw)
    ws = P.new_workspace(p["x"], p["topk_ids"], p["w1_blocks"]).fill_(0xFF)  # poison: NaN bf16, -1 ints
    out = torch.full((T, H), float("nan"), dtype=torch.bfloat16, device="cuda")
    v = P.workspace_views(ws, T, k, E, H, I)
    step = lambda s: P.run_step(s, *args(p), 1.702, 7.0, out, workspace=ws, variant=variant)  # noqa: E731

    # 1. grouping: exact
    step(1)
    rc, ro, rp = R.route_metadata(p["topk_ids"], E)
    assert torch.equal(v["counts"], rc), "grouping: counts"
    assert torch.equal(v["offsets"], ro), "grouping: offsets"
    assert torch.equal(v["perm"], rp), "grouping: permutation (stable order)"
    tiles = torch.zeros(E + 1, dtype=torch.int32, device="cuda")
    tiles[1:] = torch.cumsum((rc + BM - 1) // BM, 0)
    assert torch.equal(v["tile_offsets"], tiles), "grouping: m-tile offsets"

    # 2. mlp1 + bias + SwiGLU, rows in grouped order p (row p = routed row perm[p])
    step(2)
    perm = rp.long()
    tok = perm // k
    act_ref = torch.empty(T * k, I, device="cuda")
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
    y_ref = torch.empty(T * k, H, device="cuda")
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
    y = v["y"].float().view(T, k, H)
    acc = y[:, 0]
    for j in range(1, k):  # the kernel's order: slot 0, 1, ..., k-1, fp32 adds
        acc = acc + y[:, j]
    assert torch.equal(out, acc.to(torch.bfloat16)), "combine: not the slot-order fp32 sum of y"
    err = rel_err(out, R.moe(*args(p)))
    print(f"moe rel err {err:.2e}")
    assert err < TOL


@functools.lru_cache(maxsize=2)
def _problem_and_reference(T, E):
    """Inputs at the real shape (H = I = 2880) and their reference, shared by the variants (read only)."""
    p = make_problem(T, E, 2880, 2880, seed=T + E)
    return p, R.moe(*args(p))


@pytest.mark.gpu
@pytest.mark.parametrize("variant", variants())
@pytest.mark.parametrize("T", [128, 500, 1024, 4096])
@pytest.mark.parametrize("E", [32, 128])
def test_moe_prefill_vs_reference(T, E, variant):
    p, ref = _problem_and_reference(T, E)
    out = run_kernel(p, variant)
    err = rel_err(out, ref)
    print(f"T={T} E={E} rel err {err:.2e}")
    assert err < TOL


@pytest.mark.gpu
@pytest.mark.parametrize("variant", variants())
@pytest.mark.parametrize("case", ["skew", "empty_experts", "big_small_hidden"])
def test_moe_prefill_routing_cases(variant, case):
    if case == "skew":            # half the tokens on expert 0: one expert with many m-tiles
        p = make_problem(2048, 128, 2880, 2880, skew=True, seed=1)
    elif case == "empty_experts":  # only 8 of 128 experts have tokens
        p = make_problem(1000, 128, 2880, 2880, used=8, seed=2)
    else:                          # T = 8192 at small H/I with K and N tails
        p = make_problem(8192, 32, 288, 160, seed=3)
    out = run_kernel(p, variant)
    err = rel_err(out, R.moe(*args(p)))
    print(f"{case}: rel err {err:.2e}")
    assert err < TOL


@pytest.mark.gpu
@pytest.mark.parametrize("variant", variants())
def test_deterministic_and_graph_replay(variant):
    p = make_problem(1536, 128, 2880, 2880, skew=True, seed=4)
    T, H = p["x"].shape
    a = run_kernel(p, variant)
    b = run_kernel(p, variant)
    assert torch.equal(a, b), "two runs differ: the op must be deterministic (no float atomics)"

    ws = P.new_workspace(p["x"], p["topk_ids"], p["w1_blocks"])
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
    out = torch.empty(0, 288, dtype=torch.bfloat16, device="cuda")
    assert run_kernel(p, out=out) is out


@pytest.mark.gpu
def test_available():
    assert P.available()


@pytest.mark.gpu
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
    p = make_problem(300, 32, 288, 160, seed=6)
    T, H = p["x"].shape
    E = p["w1_bias"].shape[0]
    buf = torch.full((T * H + 4,), float("nan"), dtype=torch.bfloat16, device="cuda")
    out = buf[4:].view(T, H)  # 8-byte aligned
    assert out.data_ptr() % 16 == 8
    b1 = torch.empty(p["w1_bias"].numel() + 1, dtype=torch.bfloat16, device="cuda")[1:].view(E, -1)
    b1.copy_(p["w1_bias"])
    p["w1_bias"] = b1
    P.run(*args(p), 1.702, 7.0, out)
    assert rel_err(out, R.moe(*args(p))) < TOL


# ---------------------------------------------------------------------------------------------
# CPU: the GEMM kernels' index and fragment logic, emulated
# ---------------------------------------------------------------------------------------------
# A numpy twin of grouped_gemm_mma_kernel and grouped_gemm_wgmma_kernel (csrc/kernels/moe_prefill.cu)
# that mirrors their code line by line: which thread copies which 16 bytes to which swizzled
# shared-memory offset (load_stage / wg_load_stage, the dequantization stores), ldmatrix.x4 (lanes
# 8i..8i+7 give the row addresses of matrix i; thread t receives row t/4, 32-bit word t%4), the
# PTX mma.m16n8k16 A/B/C fragment layouts, the wgmma K-major 128-byte-swizzle read of the
# descriptor (fields decoded from gemm_wgmma.cuh's bit layout: address = start + (m%8)*128 +
# (m/8)*SBO + 2k, then bits 4-6 ^= bits 7-9), wgmma's accumulator layout, the persistent work list,
# the gathers through the permutation and both epilogues. Values stay in float64 (the weights are
# exact bf16 values), so every accumulator is checked against the dense product to 1e-9: any
# misplaced element shows. What it cannot check: the hardware itself (the layouts are the PTX ISA's
# as written here), cp.async/wgmma ordering, and the bf16 bit trick (test_host_dequant_bits_exact).

import numpy as np


def _swz(r, c):
    return r * 128 + ((c ^ (r & 7)) << 4)


def _ldmatrix_x4(smem16, addr):
    """smem16: float64 [bytes/2]; addr: int [32] byte addresses given by the lanes -> [4, 32, 2]."""
    lane = np.arange(32)
    out = np.empty((4, 32, 2))
    for i in range(4):
        row_addr = addr[8 * i + lane // 4]
        idx = row_addr // 2 + 2 * (lane % 4)
        out[i, :, 0] = smem16[idx]
        out[i, :, 1] = smem16[idx + 1]
    return out


def _mma_16816(acc, a, b0, b1):
    """acc [32, 4] += mma.m16n8k16 with the PTX fragment layouts; a [4, 32, 2], b0/b1 [32, 2]."""
    lane = np.arange(32)
    g, tq = lane >> 2, lane & 3
    A = np.zeros((16, 16))
    B = np.zeros((16, 8))
    for j in range(2):
        A[g, 2 * tq + j] = a[0, :, j]
        A[g + 8, 2 * tq + j] = a[1, :, j]
        A[g, 2 * tq + 8 + j] = a[2, :, j]
        A[g + 8, 2 * tq + 8 + j] = a[3, :, j]
        B[2 * tq + j, g] = b0[:, j]
        B[2 * tq + 8 + j, g] = b1[:, j]
    D = A @ B
    for j in range(2):
        acc[:, j] += D[g, 2 * tq + j]
        acc[:, 2 + j] += D[g + 8, 2 * tq + j]


def _stage_a(A_tile, K, kt):
    """load_stage's A part: thread tid copies chunk tid&7 of rows (tid>>3)+32i (zeros: padding, col >= K)."""
    s = np.zeros(128 * 64)
    for tid in range(256):
        for i in range(4):
            row, ch = (tid >> 3) + 32 * i, tid & 7
            col = kt * 64 + ch * 8
            if col < K:
                o = _swz(row, ch) // 2
                s[o:o + 8] = A_tile[row, col:col + 8]
    return s


def _store_bdq(s, W_tile, ncols, G, kt, blk, row):
    """One thread's dequantized block (row, block blk&1 of k-tile kt) -> 4 swizzled chunks.
    dequant_block32: word 4q+i = elements (8q+2i, 8q+2i+1), so chunk q = elements 8q..8q+7."""
    kb = kt * 2 + (blk & 1)
    v = W_tile[row, 32 * kb:32 * kb + 32] if (row < ncols and kb < G) else np.zeros(32)
    for q in range(4):
        o = _swz(row, (blk & 1) * 4 + q) // 2
        s[o:o + 8] = v[8 * q:8 * q + 8]


def _tile_mma_sync(A_tile, W_tile, rows, ncols, K):
    """grouped_gemm_mma_kernel's main loop for one work item -> acc [8 warps, 4 mi, 4 nj, 32, 4]."""
    G = K // 32
    acc = np.zeros((8, 4, 4, 32, 4))
    lane = np.arange(32)
    for kt in range((K + 63) // 64):
        sA = _stage_a(A_tile, K, kt)
        sB = np.zeros(128 * 64)
        for tid in range(256):
            _store_bdq(sB, W_tile, ncols, G, kt, tid & 1, tid >> 1)
        for warp in range(8):
            warp_m, warp_n = warp >> 2, warp & 3
            if not warp_m * 64 < rows:
                continue
            for kk in range(4):
                a = [_ldmatrix_x4(sA, _swz(warp_m * 64 + mi * 16 + (lane & 15), kk * 2 + (lane >> 4)))
                     for mi in range(4)]
                b = [None] * 4
                for nj2 in range(2):
                    n = warp_n * 32 + nj2 * 16 + (lane & 7) + ((lane >> 4) << 3)
                    r = _ldmatrix_x4(sB, _swz(n, kk * 2 + ((lane >> 3) & 1)))
                    b[2 * nj2], b[2 * nj2 + 1] = (r[0], r[1]), (r[2], r[3])
                for mi in range(4):
                    for nj in range(4):
                        _mma_16816(acc[warp, mi, nj], a[mi], *b[nj])
    # (row, col, value) of every accumulator, in the epilogue's mapping
    out = []
    for warp in range(8):
        warp_m, warp_n = warp >> 2, warp & 3
        for mi in range(4):
            for h in range(2):
                row = warp_m * 64 + mi * 16 + (lane >> 2) + 8 * h
                for nj in range(4):
                    n = warp_n * 32 + nj * 8 + 2 * (lane & 3)
                    out.append((row, n, acc[warp, mi, nj, :, 2 * h], acc[warp, mi, nj, :, 2 * h + 1]))
    return out


def _desc_k_major_sw128(addr):  # gemm_wgmma.cuh desc_k_major_sw128, bit for bit
    return ((addr & 0x3FFFF) >> 4) | (1 << 16) | ((1024 >> 4) << 32) | (1 << 62)


def _wgmma_read(smem16, desc, nrows):
    """The [nrows, 16] bf16 operand a K-major descriptor names (PTX canonical layouts)."""
    start = (desc & 0x3FFF) << 4
    sbo = ((desc >> 32) & 0x3FFF) << 4
    mode = desc >> 62
    assert mode == 1 and (desc >> 49) & 7 == 0, "128-byte swizzle, base offset 0"
    m = np.arange(nrows)[:, None]
    k = np.arange(16)[None, :]
    addr = start + (m % 8) * 128 + (m // 8) * sbo + 2 * k
    addr = addr ^ (((addr >> 7) & 7) << 4)
    return smem16[addr // 2]


def _tile_wgmma(A_tile, W_tile, rows, ncols, K, BN):
    """grouped_gemm_wgmma_kernel's main loop for one work item: the shared memory (1024-aligned base:
    A stages, then 2 Bdq buffers) as the threads write it, read back through the descriptors."""
    STAGES, A_STAGE, BDQ = 4, 128 * 64 * 2, BN * 64 * 2
    G = K // 32
    smem = np.zeros((STAGES * A_STAGE + 2 * BDQ) // 2)
    sA, sBdq = 0, STAGES * A_STAGE
    D = np.zeros((128, BN))
    for kt in range((K + 63) // 64):
        stage, buf = kt % STAGES, kt & 1
        smem[(sA + stage * A_STAGE) // 2:(sA + (stage + 1) * A_STAGE) // 2] = _stage_a(A_tile, K, kt)
        b = np.zeros(BDQ // 2)
        for tid in range(256):
            for i in range((BN * 2 + 255) // 256):  # BLOCKS_PER_THREAD
                blk = tid + 256 * i
                if blk < BN * 2:
                    _store_bdq(b, W_tile, ncols, G, kt, blk, blk >> 1)
        smem[(sBdq + buf * BDQ) // 2:(sBdq + (buf + 1) * BDQ) // 2] = b
        for wgi in range(2):
            a_tile = sA + stage * A_STAGE + wgi * 64 * 128
            b_tile = sBdq + buf * BDQ
            for kk in range(4):
                Am = _wgmma_read(smem, _desc_k_major_sw128(a_tile + kk * 32), 64)
                Bm = _wgmma_read(smem, _desc_k_major_sw128(b_tile + kk * 32), BN)
                D[64 * wgi:64 * wgi + 64] += Am @ Bm.T
    # accumulator i of lane l of warp w (PTX wgmma D layout) -> the epilogue's (row, col)
    out = []
    lane = np.arange(32)
    for warp in range(8):
        wgi = warp >> 2
        reg = np.zeros((32, BN // 2))
        for i in range(BN // 2):
            r = 64 * wgi + 16 * (warp % 4) + lane // 4 + 8 * ((i // 2) % 2)
            c = 8 * (i // 4) + 2 * (lane % 4) + i % 2
            reg[:, i] = D[r, c]
        for h in range(2):
            row = wgi * 64 + 16 * (warp & 3) + (lane >> 2) + 8 * h
            for j in range(BN // 8):
                n = 8 * j + 2 * (lane & 3)
                out.append((row, n, reg[:, 4 * j + 2 * h], reg[:, 4 * j + 2 * h + 1]))
    return out


def _emulate_prefill(host, p, variant, alpha=1.702, limit=7.0):
    """The whole op (route, mlp1, mlp2, combine) with the GEMM work items run through the tile
    emulations above; also checks every accumulator against the dense product of its tile."""
    x = p["x"].float().double().numpy()
    ids = p["topk_ids"]
    T, k = ids.shape
    E = p["w1_blocks"].shape[0]
    H = x.shape[1]
    I = p["w1_blocks"].shape[1] // 2  # noqa: E741
    BN = {P.MMA_SYNC: 128, P.WGMMA: 192, P.WGMMA_N128: 128, P.WGMMA_N256: 256}[variant]
    counts, offsets, perm, tile_off = host.moe_prefill_route(ids.numpy(), E, 128, 1024)
    wflat = p["topk_weights"].reshape(-1).double().numpy()
    act = np.full((T * k, I), np.nan)
    y = np.full((T * k, H), np.nan)
    for mlp1 in (True, False):
        pre = "w1" if mlp1 else "w2"
        A = x if mlp1 else act
        N, K = (2 * I, H) if mlp1 else (H, I)
        NT = (N + BN - 1) // BN
        W = R.mxfp4_dequantize(p[pre + "_blocks"], p[pre + "_scales"], torch.float32).double().numpy()
        bias = p[pre + "_bias"].double().numpy()
        for e, mt, nt in host.moe_prefill_decode_tiles(tile_off, NT).tolist():
            gb, m0, n0 = int(offsets[e]), mt * 128, nt * BN
            rows, ncols = min(128, int(counts[e]) - m0), min(BN, N - n0)
            A_tile = np.zeros((128, K))
            for row in range(rows):
                gp = gb + m0 + row
                A_tile[row] = A[perm[gp] // k] if mlp1 else A[gp]
            W_tile = np.zeros((BN, K))
            W_tile[:ncols] = W[e, n0:n0 + ncols]
            want = A_tile @ W_tile.T
            if variant == P.MMA_SYNC:
                accs = _tile_mma_sync(A_tile, W_tile, rows, ncols, K)
            else:
                accs = _tile_wgmma(A_tile, W_tile, rows, ncols, K, BN)
            for row, n, v0, v1 in accs:  # the epilogue, per lane
                for ln in range(32):
                    r, c = int(row[ln]) if np.ndim(row) else int(row), int(n[ln]) if np.ndim(n) else int(n)
                    if r >= rows or n0 + c >= N:
                        continue
                    assert abs(v0[ln] - want[r, c]) <= 1e-9 * (1 + abs(want[r, c])), (e, mt, nt, r, c)
                    assert abs(v1[ln] - want[r, c + 1]) <= 1e-9 * (1 + abs(want[r, c + 1])), (e, mt, nt, r, c + 1)
                    gp = gb + m0 + r
                    z0, z1 = v0[ln] + bias[e, n0 + c], v1[ln] + bias[e, n0 + c + 1]
                    if mlp1:
                        gate, lin = min(z0, limit), min(max(z1, -limit), limit)
                        a = gate / (1.0 + np.exp(-alpha * gate)) * (lin + 1.0)
                        act[gp, (n0 + c) // 2] = float(torch.tensor(a).to(torch.bfloat16).double())
                    else:
                        rr = int(perm[gp])
                        y[rr, n0 + c] = z0 * wflat[rr]
                        y[rr, n0 + c + 1] = z1 * wflat[rr]
    out = y.reshape(T, k, H).sum(1)
    return torch.from_numpy(out).float().to(torch.bfloat16)


@pytest.mark.parametrize("variant", [P.MMA_SYNC, P.WGMMA, P.WGMMA_N128, P.WGMMA_N256])
def test_gemm_tile_emulation(host, variant):
    # H = 96 (K tail of mlp1: 1.5 k-tiles; mlp2 N = 96 < BN), I = 160 (2I = 320: N tails for every
    # BN; mlp2 K = 160 = 2.5 k-tiles), expert 0 in every token (150 rows: 2 m-tiles, the second
    # partial), expert 5 without rows, T*k = 300.
    T, E, H, I, k = 150, 6, 96, 160, 2  # noqa: E741
    g = torch.Generator().manual_seed(3)
    p = make_problem(T, E, H, I, k, device="cpu", seed=3)
    ids = torch.stack([torch.zeros(T, dtype=torch.int64), torch.randint(1, E - 1, (T,), generator=g)], 1)
    p["topk_ids"] = ids.to(torch.int32)
    got = _emulate_prefill(host, p, variant)
    ref = R.moe(*args(p))
    assert not torch.isnan(got).any()
    assert rel_err(got, ref) < TOL


def _emulate_route_kernels(ids_flat, E, bm=128, chunk=1024):
    """route_count_kernel, route_scan_kernel and route_scatter_kernel as written (chunks of 1024
    threads, warp-level __match_any_sync ranks, per-warp counts scanned in warp order from the
    chunk's base; invalid ids ignored) -> counts, offsets, perm (-1 where unwritten), tile_off."""
    rows = len(ids_flat)
    nc = (rows + chunk - 1) // chunk
    cb = np.zeros((nc, E), dtype=np.int64)
    for c in range(nc):  # route_count_kernel
        for r in range(c * chunk, min(rows, (c + 1) * chunk)):
            if 0 <= ids_flat[r] < E:
                cb[c, ids_flat[r]] += 1
    counts = cb.sum(0)  # route_scan_kernel: in-place exclusive scan over chunks, then + offsets
    cb = np.cumsum(cb, 0) - cb
    offsets = np.concatenate([[0], np.cumsum(counts)])
    tiles = (counts + bm - 1) // bm
    tile_off = np.concatenate([[0], np.cumsum(tiles)])
    cb += offsets[:E][None, :]
    perm = np.full(rows, -1, dtype=np.int64)
    for c in range(nc):  # route_scatter_kernel
        lanes = {}
        warp_cnt = np.zeros((chunk // 32, E), dtype=np.int64)
        for tid in range(chunk):
            r = c * chunk + tid
            e = ids_flat[r] if r < rows else -1
            e = e if 0 <= e < E else -1
            lanes[tid] = e
        for w in range(chunk // 32):
            es = [lanes[32 * w + ln] for ln in range(32)]
            for e in set(es) - {-1}:
                warp_cnt[w, e] = es.count(e)  # popc(peers) by the lowest peer
        run = cb[c].copy()
        for w in range(chunk // 32):  # exclusive scan over warps, in warp order
            n = warp_cnt[w].copy()
            warp_cnt[w] = run
            run += n
        for tid in range(chunk):
            e = lanes[tid]
            if e >= 0:
                w, ln = tid // 32, tid % 32
                rank = sum(1 for l2 in range(ln) if lanes[32 * w + l2] == e)  # popc(peers & lanemask_lt)
                perm[warp_cnt[w, e] + rank] = c * chunk + tid
    return counts, offsets, perm, tile_off


@pytest.mark.parametrize("T,E,k,bad", [(700, 32, 3, False), (300, 8, 4, True)])
def test_route_kernels_emulation(T, E, k, bad):
    # 2100 routed rows: 3 chunks, the last ragged; `bad`: ids -1 and E are skipped (not counted,
    # not placed: perm's valid prefix is the reference's metadata of the valid rows)
    g = torch.Generator().manual_seed(T + E)
    ids = torch.randint(0, E, (T, k), generator=g, dtype=torch.int32)
    if bad:
        ids[::7, 0] = -1
        ids[3::11, k - 1] = E
    counts, offsets, perm, tile_off = _emulate_route_kernels(ids.reshape(-1).tolist(), E)
    valid = (ids >= 0) & (ids < E)
    flat = ids.reshape(-1).long()
    rc = torch.bincount(flat[valid.reshape(-1)], minlength=E)
    assert counts.tolist() == rc.tolist()
    rows_valid = torch.nonzero(valid.reshape(-1)).reshape(-1)
    want_perm = rows_valid[torch.sort(flat[rows_valid], stable=True).indices]
    n = int(offsets[E])
    assert perm[:n].tolist() == want_perm.tolist() and (perm[n:] == -1).all()
    if not bad:
        rc2, ro, rp = R.route_metadata(ids, E)
        assert offsets.tolist() == ro.tolist() and perm.tolist() == rp.tolist()
    assert tile_off.tolist() == [0] + torch.cumsum((rc + 127) // 128, 0).tolist()
