"""ops.rms_norm (fused residual add) and ops.linear (bf16 GEMV for T <= 64): argument checks, the
CPU path against the reference, the kernels' host math (_C.host.dense_*), the C ABI's argument
checks (no GPU needed: they return before any launch), SASS/resource checks, and (marked gpu) the
kernels against the reference: on a GPU, or else on the host build of the same kernel source
(tests/kernel_device.py: every thread emulated, with the bounds/race/PDL checkers), where the
largest shapes are shrunk to edge-case shapes that take the same code paths (each GEMV variant
NT x WARPS x fused RoPE, row/k/token tails).

First GPU run: test_gpu_rms_norm_* and test_gpu_linear_shapes first (correctness), then the graph
tests; bench: `python -m gptoss_kernels.bench.dense` (see that module).

Tolerances (DEVELOPERS.md): both kernels compute in fp32 from bf16 inputs and round once to bf16
at the output, so the relative-norm error against the fp32 reference is bounded by the bf16
output rounding (2^-9 per element, ~2e-3 on norms); 1e-2 is generous. RMSNorm's h = bf16(x + r)
is one exact rounding of the same fp32 sum the reference takes, so it must match bit for bit.
fp32 GEMV outputs differ from the (float64) reference only by fp32 accumulation (K <= 4104 terms:
~sqrt(K) * 2^-24 relative on norms, ~1e-6), checked at 1e-4.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from gptoss_kernels import _lib, ops, reference

from . import sass
from .kernel_device import DEV, ON_GPU, shrink, sync

BF = torch.bfloat16


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# ---------------------------------------------------------------------------------------------
# Argument checks (any build)
# ---------------------------------------------------------------------------------------------


def test_rms_norm_arg_checks():
    x = torch.randn(3, 16, dtype=BF)
    w = torch.randn(16, dtype=BF)
    with pytest.raises(TypeError, match="x"):
        ops.rms_norm(x.float(), w)
    with pytest.raises(ValueError, match="x"):
        ops.rms_norm(x.reshape(48), w)
    with pytest.raises(ValueError, match="weight"):
        ops.rms_norm(x, torch.randn(8, dtype=BF))
    with pytest.raises(TypeError, match="weight"):
        ops.rms_norm(x, w.half())
    with pytest.raises(ValueError, match="residual"):
        ops.rms_norm(x, w, residual=torch.randn(2, 16, dtype=BF))
    with pytest.raises(TypeError, match="residual"):
        ops.rms_norm(x, w, residual=x.float())
    with pytest.raises(ValueError, match="out"):
        ops.rms_norm(x, w, out=torch.empty(3, 8, dtype=BF))
    with pytest.raises(TypeError, match="out"):
        ops.rms_norm(x, w, out=torch.empty(3, 16))
    with pytest.raises(ValueError, match="residual_out"):
        ops.rms_norm(x, w, residual=x.clone(), residual_out=torch.empty(3, 8, dtype=BF))
    with pytest.raises(ValueError, match="contiguous"):
        ops.rms_norm(torch.randn(16, 3, dtype=BF).t(), w)


def test_linear_arg_checks():
    x = torch.randn(2, 16, dtype=BF)
    w = torch.randn(5, 16, dtype=BF)
    with pytest.raises(TypeError, match="x"):
        ops.linear(x.float(), w)
    with pytest.raises(ValueError, match="weight"):
        ops.linear(x, torch.randn(5, 8, dtype=BF))
    with pytest.raises(TypeError, match="weight"):
        ops.linear(x, w.float())
    with pytest.raises(ValueError, match="bias"):
        ops.linear(x, w, torch.randn(4, dtype=BF))
    with pytest.raises(TypeError, match="bias"):
        ops.linear(x, w, torch.randn(5))
    with pytest.raises(TypeError, match="out_dtype"):
        ops.linear(x, w, out_dtype=torch.float16)
    with pytest.raises(TypeError, match="out"):
        ops.linear(x, w, out=torch.empty(2, 5, dtype=BF), out_dtype=torch.float32)
    with pytest.raises(ValueError, match="out"):
        ops.linear(x, w, out=torch.empty(2, 4, dtype=BF))


# ---------------------------------------------------------------------------------------------
# CPU path = reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("wdtype", [BF, torch.float32])
def test_rms_norm_cpu_matches_reference(wdtype):
    x = torch.randn(5, 64, dtype=BF)
    r = torch.randn(5, 64, dtype=BF)
    w = torch.randn(64).to(wdtype)
    y = ops.rms_norm(x, w, eps=1e-5)
    assert torch.equal(y, reference.rms_norm(x, w, 1e-5))
    y2, h = ops.rms_norm(x, w, eps=1e-5, residual=r)
    h_ref = (x.float() + r.float()).to(BF)
    assert torch.equal(h, h_ref)
    assert torch.equal(y2, reference.rms_norm(h_ref, w, 1e-5))
    # in-place residual stream
    r2 = r.clone()
    out = torch.full_like(x, float("nan"))
    y3, h3 = ops.rms_norm(x, w, eps=1e-5, residual=r2, residual_out=r2, out=out)
    assert h3.data_ptr() == r2.data_ptr() and y3.data_ptr() == out.data_ptr()
    assert torch.equal(r2, h_ref) and torch.equal(out, y2)


@pytest.mark.parametrize("out_dtype", [BF, torch.float32])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_cpu_matches_reference(out_dtype, with_bias):
    x = torch.randn(3, 40, dtype=BF)
    w = torch.randn(7, 40, dtype=BF)
    b = torch.randn(7, dtype=BF) if with_bias else None
    y = ops.linear(x, w, b, out_dtype=out_dtype)
    ref = x.float() @ w.float().t() + (b.float() if with_bias else 0)
    assert y.dtype == out_dtype and y.shape == (3, 7)
    assert torch.equal(y, ref.to(out_dtype))
    out = torch.full((3, 7), float("nan"), dtype=out_dtype)
    assert ops.linear(x, w, b, out=out, out_dtype=out_dtype) is out
    assert torch.equal(out, y)


def test_linear_cpu_empty():
    assert ops.linear(torch.empty(0, 16, dtype=BF), torch.randn(4, 16, dtype=BF)).shape == (0, 4)


# ---------------------------------------------------------------------------------------------
# Host math of the kernels (_C.host.dense_*) and the C ABI's argument checks
# ---------------------------------------------------------------------------------------------


def _host():
    C = _lib.C()
    if C is None or not hasattr(C.host, "dense_rms_norm"):
        pytest.skip(f"dense host bindings not built: {_lib.kernels_error()}")
    return C.host


def test_host_bf16_round_matches_torch():
    host = _host()
    v = torch.randn(20000) * torch.logspace(-40, 38, 20000)
    # exact ties (bit 15 set, lower bits clear) with even and odd bf16 mantissas
    ties = (torch.randint(0, 2**16, (2000,), dtype=torch.int32) << 16 | 0x8000).view(torch.float32)
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 3.3895e38, -3.3895e38, 1e-45, 65504.0])
    v = torch.cat([v, ties, special])
    v = v[torch.isfinite(v) | torch.isinf(v)]
    got = torch.from_numpy(host.dense_bf16_round(v.numpy()))
    want = v.to(BF).float()
    assert torch.equal(got, want)
    assert np.isnan(host.dense_bf16_round(np.array([float("nan")], dtype=np.float32))[0])


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("wdtype", [BF, torch.float32])
def test_host_rms_norm_math_matches_reference(with_residual, wdtype):
    host = _host()
    T, H = 9, 2880
    x = torch.randn(T, H, dtype=BF) * 3
    r = torch.randn(T, H, dtype=BF) if with_residual else None
    w = (torch.randn(H) * 0.5 + 1).to(wdtype)
    y, h = host.dense_rms_norm(x.float().numpy(), None if r is None else r.float().numpy(), w.float().numpy(), 1e-5)
    y, h = torch.from_numpy(y), torch.from_numpy(h)
    h_ref = x if r is None else (x.float() + r.float()).to(BF)
    assert torch.equal(h, h_ref.float())  # the residual stream: bit-exact
    y_ref = reference.rms_norm(h_ref, w, 1e-5).float()
    assert torch.equal(y, y.to(BF).float())  # y is bf16-valued
    # only the fp32 summation order differs from the reference: a few 1-ulp bf16 differences
    assert rel_err(y, y_ref) < 1e-3
    assert (y != y_ref).sum().item() <= max(2, 0.01 * y.numel())


def test_host_gemv_layout_is_a_permutation_of_k():
    """Simulate the GEMV's two mma.sync m16n8k16 per 32-wide k step with the PTX fragment layouts
    and the kernel's register choice: it must compute W[16, 32] @ x[8, 32]^T exactly."""
    host = _host()
    ak, bk, chunk, wr0, wr1, xt, cr, ct = (np.asarray(a) for a in host.dense_gemv_layout())
    # every lane's chunk covers 8 consecutive k; quads cover the 32-wide step
    assert sorted(set(chunk.tolist())) == [0, 8, 16, 24]
    rng = np.random.default_rng(0)
    W = rng.integers(-8, 8, size=(16, 32)).astype(np.float64)
    X = rng.integers(-8, 8, size=(8, 32)).astype(np.float64)
    C = np.zeros((16, 8))
    for m in range(2):
        A = np.full((16, 16), np.nan)
        B = np.full((16, 8), np.nan)
        for lane in range(32):
            g, q = lane // 4, lane % 4
            cols = [2 * q, 2 * q + 1, 2 * q + 8, 2 * q + 9]  # PTX m16n8k16 A columns / B rows of this lane
            for p in range(4):
                for row in (wr0[lane], wr1[lane]):
                    assert row in (g, g + 8)
                    A[row, cols[p]] = W[row, ak[m, lane, p]]
                B[cols[p], g] = X[xt[lane], bk[m, lane, p]]
        assert not np.isnan(A).any() and not np.isnan(B).any()
        C += A @ B
    np.testing.assert_array_equal(C, W @ X.T)
    # the accumulator layout (PTX: c0,c1 row g cols 2q,2q+1; c2,c3 row g+8)
    for lane in range(32):
        for c in range(4):
            assert cr[lane, c] == lane // 4 + 8 * (c // 2) and ct[lane, c] == 2 * (lane % 4) + c % 2


def test_greedy_argmax_cpu_and_checks():
    logits = torch.randn(3, 1000)
    assert torch.equal(ops.greedy_argmax(logits), torch.argmax(logits, dim=1))
    with pytest.raises(TypeError, match="logits"):
        ops.greedy_argmax(logits.to(BF))
    with pytest.raises(ValueError, match="logits"):
        ops.greedy_argmax(logits[0])
    with pytest.raises(TypeError, match="out"):
        ops.greedy_argmax(logits, out=torch.empty(3, dtype=torch.int32))
    assert ops.greedy_argmax(torch.empty(0, 5)).shape == (0,)


def _argmax_cases():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 20000, generator=g)
    x[0, 17] = x[0, 19000] = 1e4                       # tie across slices: lower index
    x[1, 8191] = x[1, 8192] = 1e4                      # tie at a slice boundary
    x[2, 12345] = float("nan")                         # NaN ranks highest, first NaN wins
    x[2, 3] = float("nan")
    x[3] = -float("inf")                               # all -inf: index 0
    x[4, :] = 0.0                                      # all equal: index 0
    x[5, 19999] = float("inf")
    return x


def test_host_argmax_order_matches_torch():
    host = _host()
    x = _argmax_cases()
    want = torch.argmax(x, dim=1)
    assert want[0] == 17 and want[1] == 8191 and want[2] == 3 and want[3] == 0 and want[4] == 0
    for slice_ in (8192, 1000, 7, 1):
        got = torch.from_numpy(host.dense_argmax(x.numpy(), slice_))
        assert torch.equal(got, want), slice_


# ---------------------------------------------------------------------------------------------
# QKV projection + RoPE + cache append (the decode step's fused op)
# ---------------------------------------------------------------------------------------------

def _qkv_case(T, nq, nkv, K, B, S, device, seed=0, bias=True):
    g = torch.Generator(device=device).manual_seed(seed)
    N = (nq + 2 * nkv) * 64
    x = torch.randn(T, K, dtype=BF, device=device, generator=g)
    w = (torch.randn(N, K, device=device, generator=g) * K ** -0.5).to(BF)
    b = torch.randn(N, dtype=BF, device=device, generator=g) if bias else None
    seq = torch.randint(0, B, (T,), dtype=torch.int32, device=device, generator=g)
    pos = torch.randint(0, 3 * S, (T,), dtype=torch.int32, device=device, generator=g)   # ring wraps
    kc = torch.randn(B, S, nkv, 64, dtype=BF, device=device, generator=g)
    vc = torch.randn(B, S, nkv, 64, dtype=BF, device=device, generator=g)
    return x, w, b, seq, pos, kc, vc


def _qkv_unfused(x, w, b, seq, pos, kc, vc, nq, nkv, rope=reference.YarnParams()):
    kc, vc = kc.clone(), vc.clone()
    qkv = ops.linear(x, w, b)
    q = ops.rope_and_cache_append(qkv, seq, pos, kc, vc, num_q_heads=nq, num_kv_heads=nkv, head_dim=64, rope=rope)
    return q, kc, vc


def test_qkv_rope_append_cpu_matches_reference_and_checks():
    """CPU: the op is the reference's projection, RoPE and cache write (slot = p mod S)."""
    nq, nkv, K, B, S = 4, 2, 32, 2, 8
    x, w, b, seq, pos, kc, vc = _qkv_case(5, nq, nkv, K, B, S, "cpu")
    seq[0] = B            # out of range: q only, nothing in the cache
    kc2, vc2 = kc.clone(), vc.clone()
    q = ops.qkv_rope_append(x, w, b, seq, pos, kc2, vc2, num_q_heads=nq, num_kv_heads=nkv, head_dim=64)
    qkv = (x.float() @ w.float().t() + b.float()).to(BF)
    cos, sin = reference.rope_cos_sin(pos, reference.YarnParams())
    want_q = reference.apply_rope(qkv[:, :nq * 64].reshape(5, nq, 64), cos, sin).to(BF)
    want_k = reference.apply_rope(qkv[:, nq * 64:(nq + nkv) * 64].reshape(5, nkv, 64), cos, sin).to(BF)
    want_v = qkv[:, (nq + nkv) * 64:].reshape(5, nkv, 64)
    assert torch.equal(q, want_q)
    wk, wv = kc.clone(), vc.clone()
    for t in range(1, 5):
        wk[seq[t], pos[t] % S] = want_k[t]
        wv[seq[t], pos[t] % S] = want_v[t]
    assert torch.equal(kc2, wk) and torch.equal(vc2, wv)
    empty = torch.zeros(0, S, nkv, 64, dtype=BF)        # no sequences: q only
    assert torch.equal(ops.qkv_rope_append(x, w, b, seq, pos, empty, empty.clone(), num_q_heads=nq,
                                           num_kv_heads=nkv), want_q)
    with pytest.raises(ValueError, match="weight"):
        ops.qkv_rope_append(x, w[:-64], b, seq, pos, kc, vc, num_q_heads=nq, num_kv_heads=nkv)
    with pytest.raises(ValueError, match="k_cache"):
        ops.qkv_rope_append(x, w, b, seq, pos, kc[:, :, :1], vc, num_q_heads=nq, num_kv_heads=nkv)
    with pytest.raises(TypeError, match="seq_ids"):
        ops.qkv_rope_append(x, w, b, seq.float(), pos, kc, vc, num_q_heads=nq, num_kv_heads=nkv)


def test_host_qkv_rope_rows_pair_halves_in_one_block():
    """The fused GEMV's row map: a bijection onto the QKV rows, each block one head's quarter,
    local rows r and r + 8 the RoPE pair (dims i, i + 32)."""
    host = _host()
    if not hasattr(host, "dense_qkv_rope_rows"):
        pytest.skip("rebuild: no dense_qkv_rope_rows")
    heads = 64 + 2 * 8
    rows = np.asarray(host.dense_qkv_rope_rows(heads * 4))
    assert sorted(rows.ravel().tolist()) == list(range(heads * 64))
    for blk in range(heads * 4):
        head, quarter = divmod(blk, 4)
        assert (rows[blk] // 64 == head).all()
        dims = rows[blk] % 64
        assert dims[:8].tolist() == list(range(8 * quarter, 8 * quarter + 8))
        assert (dims[8:] == dims[:8] + 32).all()


def _c_api():
    C = _lib.C()
    if C is None or not hasattr(C, "linear_bf16"):
        pytest.skip(f"dense kernels not built: {_lib.kernels_error()}")
    return C


def test_c_api_argument_errors():
    """The C ABI rejects bad sizes/alignment before launching anything (so no GPU is needed)."""
    C = _c_api()
    assert C.linear_bf16_max_tokens == 64
    ok = 1 << 20  # a 16-byte aligned fake address; never dereferenced (every call below fails)
    with pytest.raises(ValueError, match="T must be"):
        C.linear_bf16(ok, ok, 0, ok, False, 65, 8, 16, 0)
    with pytest.raises(ValueError, match="K must be"):
        C.linear_bf16(ok, ok, 0, ok, False, 1, 8, 12, 0)
    with pytest.raises(ValueError, match="N must be"):
        C.linear_bf16(ok, ok, 0, ok, False, 1, 0, 16, 0)
    with pytest.raises(ValueError, match="aligned"):
        C.linear_bf16(ok + 2, ok, 0, ok, False, 1, 8, 16, 0)
    with pytest.raises(ValueError, match="null"):
        C.linear_bf16(0, ok, 0, ok, False, 1, 8, 16, 0)
    with pytest.raises(ValueError, match="H must be"):
        C.rms_norm_bf16(ok, 0, ok, False, ok, 0, 1, 12, 1e-5, 0)
    with pytest.raises(ValueError, match="residual_out"):
        C.rms_norm_bf16(ok, ok, ok, False, ok, 0, 1, 16, 1e-5, 0)
    with pytest.raises(ValueError, match="aligned"):
        C.rms_norm_bf16(ok, 0, ok + 8, True, ok, 0, 1, 16, 1e-5, 0)
    with pytest.raises(ValueError, match="workspace"):
        C.argmax_f32(ok, 2, 20000, ok, ok, C.argmax_f32_workspace_size(2, 20000) - 8, 0)
    with pytest.raises(ValueError, match="V must be"):
        C.argmax_f32(ok, 2, 0, ok, ok, 64, 0)
    assert C.argmax_f32_workspace_size(2, 20000) == 2 * 3 * 8
    # empty work is a no-op that needs no device
    C.linear_bf16(0, 0, 0, 0, False, 0, 8, 16, 0)
    C.rms_norm_bf16(0, 0, 0, False, 0, 0, 0, 16, 1e-5, 0)


# ---------------------------------------------------------------------------------------------
# SASS / resources (no GPU)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dense_kernels():
    if not _lib.kernels_built() or not _lib.family_built("dense"):
        pytest.skip(f"dense kernels not built: {_lib.kernels_error()}")
    if sass.cuobjdump() is None:
        pytest.skip("cuobjdump not found (pip install triton)")
    ks = {n: k for n, k in sass.kernels(_lib.library_path()).items()
          if any(n in k.name for n in ("rms_norm_kernel", "linear_gemv_kernel", "argmax_slices_kernel",
                                       "argmax_rows_kernel"))}
    assert ks, "no dense kernels in the library"
    return ks


def test_dense_kernels_no_local_memory(dense_kernels):
    for k in dense_kernels.values():
        print(f"{k.name[:100]:100s} REG={k.reg} SHARED={k.shared}")
        assert k.local == 0 and k.stack == 0, f"{k.name}: LOCAL={k.local} STACK={k.stack}"
        assert "LDL" not in k.sass and "STL" not in k.sass, f"{k.name}: LDL/STL in SASS"


def test_gemv_uses_wide_streaming_loads_and_tensor_cores(dense_kernels):
    gemv = [k for k in dense_kernels.values() if "linear_gemv_kernel" in k.name]
    assert len(gemv) == 16  # NT in {1, 2, 4, 8} x WARPS in {4, 8} x (plain, fused QKV + RoPE)
    for k in gemv:
        # W: 16-byte loads that skip L1 (LDG.E.NA.128...); x (the previous kernel's output under
        # PDL): 16-byte L2-coherent loads (ld.global.cg -> LDG.E.128.STRONG.GPU); HMMA bf16;
        # the block's W rows prefetched into L2 (UBLKPF) before the PDL wait
        assert re.search(r"LDG\.E\.NA\.128", k.sass), k.name
        assert re.search(r"LDG\.E\.128\.STRONG\.GPU", k.sass), k.name
        assert "UBLKPF.L2" in k.sass, k.name
        assert "HMMA.16816.F32.BF16" in k.sass, k.name
        # at least 8 W loads issued back to back (several 16-byte loads in flight per thread)
        assert len(re.findall(r"LDG\.E\.NA\.128", k.sass)) >= 8, k.name


def test_rms_norm_uses_16_byte_accesses(dense_kernels):
    for k in dense_kernels.values():
        if "rms_norm_kernel" in k.name:
            assert "LDG.E.128" in k.sass and "STG.E.128" in k.sass, k.name


# ---------------------------------------------------------------------------------------------
# GPU (on the host build of the kernels when there is no GPU: tests/kernel_device.py)
# ---------------------------------------------------------------------------------------------


def _nan(shape, dtype=BF):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEV)


def _check_rms(T, H, mode, wdtype, eps=1e-5):
    x = torch.randn(T, H, dtype=BF, device=DEV) * 2
    r = torch.randn(T, H, dtype=BF, device=DEV) * 4
    w = (torch.randn(H, device=DEV) * 0.3 + 1).to(wdtype)
    out = _nan((T, H))
    if mode == "none":
        y = ops.rms_norm(x, w, eps=eps, out=out)
        h_ref = x
    else:
        h_ref = (x.float() + r.float()).to(BF)
        r_in = r.clone()
        r_out = r_in if mode == "inplace" else _nan((T, H))
        y, h = ops.rms_norm(x, w, eps=eps, residual=r_in, residual_out=r_out, out=out)
        assert h.data_ptr() == r_out.data_ptr()
        assert torch.equal(h, h_ref), "residual stream h = bf16(x + r) must be bit-exact"
    assert y.data_ptr() == out.data_ptr()
    assert not torch.isnan(y).any()
    ref = reference.rms_norm(h_ref, w, eps)
    err = rel_err(y, ref)
    assert err < 1e-2, f"rel err {err}"
    # fp32 sums in another order: 1-ulp bf16 flips on a tiny fraction of elements at most
    assert (y != ref).sum().item() <= max(2, 0.02 * y.numel()), err
    return err


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["none", "separate", "inplace"])
@pytest.mark.parametrize("T", [1, 7, 64, 300])
@pytest.mark.parametrize("H", [64, 2880])
@pytest.mark.parametrize("wdtype", [BF, torch.float32])
def test_gpu_rms_norm(H, T, mode, wdtype):
    _check_rms(T, H, mode, wdtype)


@pytest.mark.gpu
@pytest.mark.parametrize("H", [8, 8 * 1024 + 8, 8 * 3000, 8 * 4096 + 8])  # V=1, 2, 4 and the two-pass loop path
@pytest.mark.parametrize("mode", ["none", "inplace"])
@pytest.mark.parametrize("wdtype", [BF, torch.float32])
def test_gpu_rms_norm_widths(H, mode, wdtype):
    _check_rms(3, H, mode, wdtype)


@pytest.mark.gpu
def test_gpu_rms_norm_misaligned_falls_back():
    x = torch.randn(2 * 64 + 1, dtype=BF, device=DEV)[1:].view(2, 64)
    w = torch.randn(64, dtype=BF, device=DEV)
    _lib._warned.clear()  # the fallback warning is said once per session
    with pytest.warns(RuntimeWarning):
        y = ops.rms_norm(x, w)
    assert rel_err(y, reference.rms_norm(x, w, 1e-5)) < 1e-2


_W_CACHE: dict = {}


def _weight(N, K):
    """Shared random weights per shape (the 201088 x 4096 one is 1.6 GB), scaled to O(1) outputs."""
    if (N, K) not in _W_CACHE:
        if len(_W_CACHE) > 3:
            _W_CACHE.clear()
        g = torch.Generator(device=DEV).manual_seed(N * 7 + K)
        w = torch.randn(N, K, dtype=BF, device=DEV, generator=g).mul_(K ** -0.5)
        _W_CACHE[(N, K)] = w
    return _W_CACHE[(N, K)]


def _linear_ref(x, w, b):
    """float64 (so TF32 settings elsewhere in the session cannot matter), in row chunks."""
    y = torch.empty(x.shape[0], w.shape[0], device=DEV, dtype=torch.float64)
    for n0 in range(0, w.shape[0], 16384):  # bounded temporaries
        y[:, n0:n0 + 16384] = x.double() @ w[n0:n0 + 16384].double().t()
    return y + b.double() if b is not None else y


def _check_linear(T, N, K, with_bias, out_dtype):
    w = _weight(N, K)
    x = torch.randn(T, K, dtype=BF, device=DEV)
    b = torch.randn(N, dtype=BF, device=DEV) if with_bias else None
    out = _nan((T, N), out_dtype)
    y = ops.linear(x, w, b, out=out, out_dtype=out_dtype)
    assert y.data_ptr() == out.data_ptr() and y.dtype == out_dtype
    assert not torch.isnan(y).any(), "NaN left in the output (rows or tokens not written)"
    ref = _linear_ref(x, w, b)
    err = rel_err(y, ref)
    # fp32 out from the kernel: only summation order differs; T > 64 (cuBLAS) rounds to bf16 first
    tol = 1e-4 if (out_dtype == torch.float32 and T <= 64) else 1e-2
    assert err < tol, f"T={T} N={N} K={K} bias={with_bias} {out_dtype}: rel err {err}"
    return err


@pytest.mark.gpu
@pytest.mark.parametrize("out_dtype", [BF, torch.float32])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("K", [2880, 4096])
# host build: the model's row counts (96 cases of up to 5120 x 4096 and 201088 x 4096 would take
# many minutes emulated: 64 x 5120 x 2880 is ~4 s, the 4-warp 201088-row tiles far more); 8
# (one block, half of it clamped rows) and 48 (three blocks) take the same 8-warp path at the real
# K; the 4-warp path (>= 1024 row tiles) is test_gpu_linear_four_warp_tiles
@pytest.mark.parametrize("N", [8, 2880, 5120, 201088] if ON_GPU else [8, 48])
@pytest.mark.parametrize("T", [1, 2, 4, 16, 64, 65])
def test_gpu_linear_shapes(T, N, K, with_bias, out_dtype):
    _check_linear(T, N, K, with_bias, out_dtype)


@pytest.mark.gpu
# host build: (17, 2881, 2880) and (64, 1000, 4104) as (17, 161, 2880) and (64, 40, 4104) (~3 s a case
# emulated otherwise): the same row tails (N mod 16 = 1 and 8) and k tails in a twentieth of the threads
@pytest.mark.parametrize("T,N,K", [(1, 37, 40), (3, 37, 2888), (9, 100, 72), (33, 17, 8), (8, 1, 16),
                                   (17, shrink(2881, 161), 2880), (64, shrink(1000, 40), 4104)])
@pytest.mark.parametrize("out_dtype", [BF, torch.float32])
def test_gpu_linear_tails(T, N, K, out_dtype):
    """N not a multiple of 16 (row tails), K not a multiple of 32 (k tails), T tile tails."""
    _check_linear(T, N, K, True, out_dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("T,K,out_dtype", [(1, 40, BF), (9, 40, torch.float32), (20, 40, BF),
                                           (33, 8, torch.float32)])
def test_gpu_linear_four_warp_tiles(T, K, out_dtype):
    """>= 1024 row tiles take the 4-warp blocks (the unembedding's): N = 16369 = 1023 * 16 + 1 (a
    one-row last tile), each token tile count NT = 1, 2, 4, 8 with token tails, K = 40 (a k tail;
    two k steps over four warps, so two warps have none) and K = 8 (one step)."""
    _check_linear(T, 16369, K, True, out_dtype)


@pytest.mark.gpu
def test_gpu_linear_misaligned_and_large_t_paths():
    w = _weight(2880, 2880)
    x = torch.randn(2 * 2880 + 1, dtype=BF, device=DEV)[1:].view(2, 2880)  # not 16-byte aligned
    assert rel_err(ops.linear(x, w), _linear_ref(x, w, None)) < 1e-2
    x = torch.randn(300, 2880, dtype=BF, device=DEV)
    assert rel_err(ops.linear(x, w), _linear_ref(x, w, None)) < 1e-2


@pytest.mark.gpu
def test_gpu_deterministic():
    w = _weight(5120, 2880)
    x = torch.randn(4, 2880, dtype=BF, device=DEV)
    a = ops.linear(x, w, out_dtype=torch.float32)
    assert torch.equal(a, ops.linear(x, w, out_dtype=torch.float32))
    xs = torch.randn(7, 2880, dtype=BF, device=DEV)
    wn = torch.randn(2880, dtype=BF, device=DEV)
    assert torch.equal(ops.rms_norm(xs, wn), ops.rms_norm(xs, wn))


@pytest.mark.gpu
@pytest.mark.cuda_only  # CUDA graph capture and a side stream
def test_gpu_cuda_graph_replay_equals_eager():
    T, H, N = 4, 2880, 5120
    w = _weight(N, H)
    b = torch.randn(N, dtype=BF, device=DEV)
    wn = torch.randn(H, dtype=BF, device=DEV)
    x = torch.randn(T, H, dtype=BF, device=DEV)
    r = torch.randn(T, H, dtype=BF, device=DEV)
    y = torch.empty(T, H, dtype=BF, device=DEV)
    logits = torch.empty(T, N, device=DEV)

    def step():
        ops.rms_norm(x, wn, residual=r, residual_out=r, out=y)  # in-place residual stream
        ops.linear(y, w, b, out=logits, out_dtype=torch.float32)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up outside the capture
        r0 = r.clone()
        step()
        r.copy_(r0)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    for _ in range(3):
        x.copy_(torch.randn(T, H, dtype=BF, device=DEV))
        r.copy_(torch.randn(T, H, dtype=BF, device=DEV))
        x0, r0 = x.clone(), r.clone()
        y.fill_(float("nan"))
        logits.fill_(float("nan"))
        g.replay()
        sync()
        gy, gr, gl = y.clone(), r.clone(), logits.clone()
        ey, eh = ops.rms_norm(x0, wn, residual=r0.clone())
        el = ops.linear(ey, w, b, out_dtype=torch.float32)
        assert torch.equal(gy, ey) and torch.equal(gr, eh) and torch.equal(gl, el)


@pytest.mark.gpu
@pytest.mark.parametrize("B,V", [(1, 201088), (4, 201088), (64, 201088), (3, 1), (2, 8193), (5, 100)])
def test_gpu_greedy_argmax(B, V):
    x = torch.randn(B, V, device=DEV)
    out = torch.full((B,), -1, dtype=torch.int64, device=DEV)
    assert ops.greedy_argmax(x, out=out) is out
    assert torch.equal(out, torch.argmax(x, dim=1))


@pytest.mark.gpu
def test_gpu_greedy_argmax_ties_nan_inf():
    x = _argmax_cases().to(DEV)
    assert torch.equal(ops.greedy_argmax(x), torch.argmax(x, dim=1))


@pytest.mark.gpu
@pytest.mark.cuda_only  # CUDA graph capture and a side stream
def test_gpu_greedy_argmax_cuda_graph():
    x = torch.randn(4, 201088, device=DEV)
    out = torch.empty(4, dtype=torch.int64, device=DEV)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        ops.greedy_argmax(x, out=out)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        ops.greedy_argmax(x, out=out)
    for _ in range(2):
        x.copy_(torch.randn(4, 201088, device=DEV))
        out.fill_(-1)
        g.replay()
        sync()
        assert torch.equal(out, torch.argmax(x, dim=1))


def _qkv_params():
    Ts, biases = [1, 3, 8, 9, 17, 64], [True, False]
    if ON_GPU:
        return ([(T, nq, nkv, K, bias) for bias in biases for nq, nkv, K in [(64, 8, 2880), (8, 2, 72)] for T in Ts]
                + _qkv_four_warp_params())
    # host build: the model's 64 + 2 x 8 heads at K = 2880 (82k emulated threads, 2-9 s a case fused and
    # unfused, ~45 s for all T) only at decode's T = 1; 8 + 2 x 2 heads at K = 72 (a k tail) for every
    # T, and 2 + 2 x 1 heads at K = 2880 (several unrolled k batches per warp) for T = 9, 17 (two and
    # four token tiles)
    return ([(1, 64, 8, 2880, bias) for bias in biases] + [(T, 8, 2, 72, bias) for bias in biases for T in Ts]
            + [(T, 2, 1, 2880, bias) for bias in biases for T in (9, 17)] + _qkv_four_warp_params())


def _qkv_four_warp_params():
    """208 + 2 x 26 heads: 1040 row tiles, the 4-warp instance of the fused kernel (>= 1024 tiles),
    for each token-tile count (T = 1, 9, 20, 33); K = 32 keeps it cheap."""
    return [(T, 208, 26, 32, True) for T in (1, 9, 20, 33)]


@pytest.mark.gpu
@pytest.mark.parametrize("T,nq,nkv,K,bias", _qkv_params())
def test_gpu_qkv_rope_append_equals_linear_then_rope(T, nq, nkv, K, bias):
    """The fused kernel against the two-kernel path it replaces: q, the whole k and v caches
    (written slots and untouched ones) bit for bit; an out-of-range seq_id writes q only."""
    B, S = 3, 128
    x, w, b, seq, pos, kc, vc = _qkv_case(T, nq, nkv, K, B, S, DEV, seed=T * 13 + nq, bias=bias)
    if T > 2:
        seq[1] = -1
        pos[2] = pos[0] + S            # same slot as token 0 in another sequence or the ring
    # unique (seq, slot) per token so that the cache contents do not depend on write order
    key = seq.long() * S + pos.long() % S
    _, first = np.unique(key.cpu().numpy(), return_index=True)
    keep = torch.zeros(T, dtype=torch.bool)
    keep[torch.from_numpy(first)] = True
    seq = torch.where(keep.to(DEV), seq, torch.full_like(seq, -1))
    want_q, want_k, want_v = _qkv_unfused(x, w, b, seq, pos, kc, vc, nq, nkv)
    q_out = _nan((T, nq, 64))
    q = ops.qkv_rope_append(x, w, b, seq, pos, kc, vc, q_out=q_out, num_q_heads=nq, num_kv_heads=nkv, head_dim=64)
    assert q.data_ptr() == q_out.data_ptr()
    assert torch.equal(q.view(torch.int16), want_q.view(torch.int16))
    assert torch.equal(kc.view(torch.int16), want_k.view(torch.int16))
    assert torch.equal(vc.view(torch.int16), want_v.view(torch.int16))


@pytest.mark.gpu
@pytest.mark.cuda_only  # CUDA graph capture
def test_gpu_qkv_rope_append_cuda_graph():
    """Captured in a CUDA graph it gives the eager bits."""
    nq, nkv, K, B, S = 64, 8, 2880, 2, 256
    x, w, b, seq, pos, kc, vc = _qkv_case(4, nq, nkv, K, B, S, DEV, seed=5)
    seq = torch.tensor([0, 1, 0, 1], dtype=torch.int32, device=DEV)
    pos = torch.tensor([10, 10, 11, 11], dtype=torch.int32, device=DEV)
    want = _qkv_unfused(x, w, b, seq, pos, kc, vc, nq, nkv)
    q_out = torch.empty(4, nq, 64, dtype=BF, device=DEV)
    kc_g, vc_g = kc.clone(), vc.clone()
    ops.qkv_rope_append(x, w, b, seq, pos, kc_g, vc_g, q_out=q_out)    # warm-up
    kc_g.copy_(kc)
    vc_g.copy_(vc)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        ops.qkv_rope_append(x, w, b, seq, pos, kc_g, vc_g, q_out=q_out)
    q_out.fill_(float("nan"))
    g.replay()
    sync()
    for got, exp in zip((q_out, kc_g, vc_g), want):
        assert torch.equal(got.view(torch.int16), exp.view(torch.int16))


@pytest.mark.gpu
def test_gpu_qkv_rope_append_large_t_path_and_no_cache():
    """T = 65 takes the unfused path; with no sequences (batch 0) the fused kernel writes q only."""
    nq, nkv, K = 64, 8, 2880
    x, w, b, seq, pos, kc, vc = _qkv_case(65, nq, nkv, K, 1, 4096, DEV, seed=6)
    seq.zero_()
    pos = torch.arange(65, dtype=torch.int32, device=DEV)
    want = _qkv_unfused(x, w, b, seq, pos, kc, vc, nq, nkv)
    q = ops.qkv_rope_append(x, w, b, seq, pos, kc, vc, num_q_heads=nq, num_kv_heads=nkv)
    for got, exp in zip((q, kc, vc), want):
        assert torch.equal(got.view(torch.int16), exp.view(torch.int16))
    # no sequences (batch 0): q only
    x, w, b, seq, pos, kc, vc = _qkv_case(3, nq, nkv, K, 1, 8, DEV, seed=7)
    empty = torch.zeros(0, 8, nkv, 64, dtype=BF, device=DEV)
    want_q = _qkv_unfused(x, w, b, seq, pos, kc, vc, nq, nkv)[0]
    assert torch.equal(ops.qkv_rope_append(x, w, b, seq, pos, empty, empty.clone(), num_q_heads=nq,
                                           num_kv_heads=nkv).view(torch.int16), want_q.view(torch.int16))


def test_pdl_switch_round_trips():
    """The PDL switch is host state of the library (no GPU needed): on by default unless
    GPTOSS_PDL=0, set_pdl returns the previous setting, build_info reports it."""
    import os

    if _lib.pdl_enabled() is None:
        pytest.skip(f"kernels not built: {_lib.kernels_error()}")
    default = os.environ.get("GPTOSS_PDL", "1") != "0" and os.environ.get("GPTOSS_MOE_DECODE_PDL", "1") != "0"
    before = _lib.pdl_enabled()
    try:
        assert before == default
        assert _lib.set_pdl(False) == before and _lib.pdl_enabled() is False
        assert _lib.build_info()["pdl"] is False
        assert _lib.set_pdl(True) is False and _lib.pdl_enabled() is True
    finally:
        _lib.set_pdl(before)
