"""moe_mxfp4: argument checks, the regime choice, the decode kernels' host-testable decode math and
K-split order (CPU), the kernels' SASS (CPU, needs a build), and the decode kernels against the
reference (GPU tests: on a GPU, else on the host build of the same kernels, tests/kernel_device.py;
the host build runs smaller shapes where emulating every thread of the real ones costs too much).

Tolerance of the GPU comparisons: relative norm error < 1e-2. The kernels read the same bf16/MXFP4
inputs as the fp32 reference and accumulate in fp32; what differs is (1) the SwiGLU activation
stored in bf16 between the two GEMMs (2^-9 relative per element, averaging down over the I-long
dot products of mlp2) and (2) the bf16 rounding of the output (2^-9 per element, ~2e-3 on the
norm). Both are far below 1e-2; a wrong index or a missing term gives errors of order 1. The
measured errors are printed (pytest -s).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import gptoss_kernels
from gptoss_kernels import _lib, reference
from gptoss_kernels.ops import moe as moe_ops
from gptoss_kernels.ops import moe_mxfp4

from . import sass
from .kernel_device import DEV, ON_GPU, ON_HOSTSIM, shrink, sync

TOL = 1e-2


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def make_weights(E, H, I, device="cpu", scale_lo=119, scale_hi=124, gen=None):  # noqa: E741
    """Random MXFP4 expert weights (checkpoint layout); scales near 2^-6 keep outputs O(1)."""
    g = gen
    u8 = dict(dtype=torch.uint8, generator=g)
    w = {
        "w1_blocks": torch.randint(0, 256, (E, 2 * I, H // 32, 16), **u8),
        "w1_scales": torch.randint(scale_lo, scale_hi, (E, 2 * I, H // 32), **u8),
        "w1_bias": (torch.randn((E, 2 * I), generator=g) * 0.1).to(torch.bfloat16),
        "w2_blocks": torch.randint(0, 256, (E, H, I // 32, 16), **u8),
        "w2_scales": torch.randint(scale_lo, scale_hi, (E, H, I // 32), **u8),
        "w2_bias": (torch.randn((E, H), generator=g) * 0.1).to(torch.bfloat16),
    }
    return {k: v.to(device) for k, v in w.items()}


def make_routing(T, E, k, device="cpu", gen=None):
    """k distinct experts per token (uniform), softmax weights."""
    ids = torch.rand((T, E), generator=gen).topk(k, dim=1).indices.to(torch.int32)
    w = torch.softmax(torch.randn((T, k), generator=gen), dim=1)
    return ids.contiguous().to(device), w.contiguous().to(device)


def make_x(T, H, device="cpu", gen=None):
    return torch.randn((T, H), generator=gen).to(torch.bfloat16).to(device)


def args_of(x, ids, w, wt):
    return (x, ids, w, wt["w1_blocks"], wt["w1_scales"], wt["w1_bias"], wt["w2_blocks"], wt["w2_scales"],
            wt["w2_bias"])


def rel_err(out, ref):
    out, ref = out.float(), ref.float()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


# ---------------------------------------------------------------------------------------------
# argument checks (CPU, meta)
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def small():
    g = torch.Generator().manual_seed(1)
    T, E, H, I, k = 3, 8, 64, 64, 4  # noqa: E741
    wt = make_weights(E, H, I, gen=g)
    ids, w = make_routing(T, E, k, gen=g)
    return make_x(T, H, gen=g), ids, w, wt


def test_cpu_matches_reference(small):
    x, ids, w, wt = small
    out = moe_mxfp4(*args_of(x, ids, w, wt))
    ref = reference.moe(*args_of(x, ids, w, wt))
    assert torch.equal(out, ref)
    buf = torch.full_like(ref, float("nan"))
    assert moe_mxfp4(*args_of(x, ids, w, wt), out=buf) is buf and torch.equal(buf, ref)


@pytest.mark.parametrize("name,bad,exc,match", [
    ("x", lambda a: a["x"].float(), TypeError, "x must have dtype bfloat16"),
    ("topk_ids", lambda a: a["topk_ids"].long(), TypeError, "topk_ids must have dtype int32"),
    ("topk_weights", lambda a: a["topk_weights"].to(torch.bfloat16), TypeError, "topk_weights must have dtype float32"),
    ("w1_blocks", lambda a: a["w1_blocks"].to(torch.int8), TypeError, "w1_blocks must have dtype uint8"),
    ("w1_bias", lambda a: a["w1_bias"].float(), TypeError, "w1_bias must have dtype bfloat16"),
    ("w2_scales", lambda a: a["w2_scales"][:, :-1].contiguous(), ValueError, "w2_scales must have shape"),
    ("topk_weights", lambda a: a["topk_weights"][:, :2].contiguous(), ValueError, "topk_weights must have shape"),
    ("w2_blocks", lambda a: a["w2_blocks"][:-1].contiguous(), ValueError, "w2_blocks must have shape"),
    ("x", lambda a: a["x"].t().contiguous().t(), ValueError, "x must be contiguous"),
    ("w1_blocks", lambda a: a["w1_blocks"].transpose(0, 1).contiguous().transpose(0, 1), ValueError,
     "w1_blocks must be contiguous"),
    ("x", lambda a: a["x"][:, :48].contiguous(), ValueError, "multiple of 32|must have shape"),
])
def test_argument_errors(small, name, bad, exc, match):
    x, ids, w, wt = small
    a = {"x": x, "topk_ids": ids, "topk_weights": w, **wt}
    a[name] = bad(a)
    with pytest.raises(exc, match=match):
        moe_mxfp4(a["x"], a["topk_ids"], a["topk_weights"], a["w1_blocks"], a["w1_scales"], a["w1_bias"],
                  a["w2_blocks"], a["w2_scales"], a["w2_bias"])


def test_k_limits(small):
    x, ids, w, wt = small
    for k in (0, 9):
        ids_k = torch.zeros((x.shape[0], k), dtype=torch.int32)
        w_k = torch.ones((x.shape[0], k), dtype=torch.float32)
        with pytest.raises(ValueError, match="1 to 8 experts per token"):
            moe_mxfp4(*args_of(x, ids_k, w_k, wt))


def test_ids_out_of_range(small):
    x, ids, w, wt = small
    for v in (-1, wt["w1_blocks"].shape[0]):
        bad = ids.clone()
        bad[1, 2] = v
        with pytest.raises(ValueError, match=r"topk_ids must be in \[0, 8\)"):
            moe_mxfp4(*args_of(x, bad, w, wt))


def test_mixed_devices_meta(small):
    x, ids, w, wt = small
    with pytest.raises(ValueError, match="all tensors must be on one device"):
        moe_mxfp4(*args_of(x, ids, w, {**wt, "w2_bias": wt["w2_bias"].to("meta")}))
    with pytest.raises(ValueError, match="on one device|inputs are on"):
        moe_mxfp4(*args_of(x, ids, w, wt), out=torch.empty(x.shape, dtype=torch.bfloat16, device="meta"))


def test_out_checks(small):
    x, ids, w, wt = small
    with pytest.raises(TypeError, match="out must have dtype bfloat16"):
        moe_mxfp4(*args_of(x, ids, w, wt), out=torch.empty(x.shape, dtype=torch.float32))
    with pytest.raises(ValueError, match="out must have shape"):
        moe_mxfp4(*args_of(x, ids, w, wt), out=torch.empty((x.shape[0] + 1, x.shape[1]), dtype=torch.bfloat16))


def test_regime_choice():
    n = moe_ops.PREFILL_MIN_ROUTED_ROWS
    assert moe_ops.MOE_DECODE_MAX_ROWS == n  # the name bench/ops.py reads
    assert not moe_ops.wants_prefill(n // 4, 4, 128)
    assert moe_ops.wants_prefill(n // 4 + 1, 4, 128)
    assert moe_ops.wants_prefill(1024, 4, 32)
    assert not moe_ops.wants_prefill(1024, 4, 4096)  # beyond the prefill kernels' expert limit
    # the prefill module is optional: its absence or failure means "use the decode kernels"
    pre = moe_ops._prefill_module()
    assert pre is None or hasattr(pre, "run")


def _compiled():
    """The compiled module: _C, else the host build's (the same bindings, host functions and
    constants, compiled from the same source)."""
    C = _lib.C()
    if C is None and _lib.hostsim_built():
        C = _lib.kernels("cpu").module
    return C


def test_python_limits_match_c_abi():
    C = _compiled()
    if C is None or not hasattr(C, "MOE_DECODE_MAX_ROUTED_ROWS"):
        pytest.skip("this build has no moe_decode bindings (rebuild)")
    assert C.MOE_DECODE_MAX_ROUTED_ROWS == moe_ops.MOE_DECODE_MAX_ROUTED_ROWS
    assert C.MOE_DECODE_MAX_EXPERTS == moe_ops.MOE_DECODE_MAX_EXPERTS
    # workspace: act bf16 [n, I] + y fp32 [n, H], n = min(T, 256 // k) * k, parts 256-aligned
    assert C.moe_mxfp4_decode_workspace_size(1, 4, 2880, 2880) == 23040 + 46080
    assert C.moe_mxfp4_decode_workspace_size(1000, 4, 64, 32) == 256 * 32 * 2 + 256 * 64 * 4
    assert C.moe_mxfp4_decode_workspace_size(0, 4, 64, 32) == 0
    assert C.moe_mxfp4_decode_workspace_size(1, 9, 64, 32) == 0


def test_moe_bytes_read():
    T, k, E, H, I = 2, 4, 32, 64, 96  # noqa: E741
    per_expert = 2 * I * (H // 32) * 17 + 2 * I * 2 + H * (I // 32) * 17 + H * 2
    ids = torch.tensor([[0, 1, 2, 3], [3, 4, 0, 7]], dtype=torch.int32)
    assert moe_ops.moe_bytes_read(T, k, E, H, I, ids) == 6 * per_expert + 2 * T * H * 2 + T * k * 8
    # without ids: expected distinct experts under uniform routing
    exp = min(E, round(E * (1 - (1 - k / E) ** T)))
    assert moe_ops.moe_bytes_read(T, k, E, H, I) == exp * per_expert + 2 * T * H * 2 + T * k * 8
    assert moe_ops.moe_bytes_read(1, 4, 128, 2880, 2880) == 4 * (5760 * 90 * 17 + 5760 * 2 + 2880 * 90 * 17
                                                                 + 2880 * 2) + 2 * 2880 * 2 + 32


# ---------------------------------------------------------------------------------------------
# the decode kernels' math on the CPU: the decode bit trick (Python twin and the C++ host functions)
# and the K-split chunk order; the kernels themselves (fragment mapping, index logic) run in the GPU
# tests below, on the host build when there is no GPU
# ---------------------------------------------------------------------------------------------


def _pair_bits(w: int, i: int) -> int:
    """Python twin of gptoss::fp4x8_pair_bits (csrc/mxfp4_decode_fast.cuh)."""
    s = 6 - 4 * i
    mag = ((w << s) & 0xFFFFFFFF) if s >= 0 else (w >> -s)
    sgn = (w << (12 - 4 * i)) & 0xFFFFFFFF
    return (mag & 0x01C001C0) | (sgn & 0x80008000)


def _scale_factors(s: int) -> tuple[float, float]:
    """Python twin of gptoss::mxfp4_pair_scale_factors, as float values."""
    f1 = s + 126 if s <= 128 else 254
    f2 = 127 if s <= 128 else s - 1
    return math.ldexp(1.0, f1 - 127), math.ldexp(1.0, f2 - 127)


def _bf16(bits16: int) -> float:
    return float(np.array([bits16 << 16], dtype=np.uint32).view(np.float32)[0])


def _decode_block_py(block: bytes, s: int) -> list[float]:
    c1, c2 = _scale_factors(s)
    out = [0.0] * 32
    for q in range(4):
        w = int.from_bytes(block[4 * q:4 * q + 4], "little")
        for i in range(4):
            p = _pair_bits(w, i)
            out[8 * q + i] = _bf16(p & 0xFFFF) * c1 * c2
            out[8 * q + i + 4] = _bf16(p >> 16) * c1 * c2
    return out


SCALES = (0, 1, 2, 100, 127, 128, 129, 200, 254, 255)


def _all_code_blocks():
    """Blocks covering all 16 codes in every nibble position (low and high) of every byte."""
    rows = []
    for shift in range(16):
        b = [((j + shift) % 16) | (((j + shift + 7) % 16) << 4) for j in range(16)]
        rows.append(b)
    return torch.tensor(rows, dtype=torch.uint8)  # [16, 16]


def test_pair_decode_python_twin_matches_reference():
    """The pairing/bit trick itself (Python twin) against reference.mxfp4_dequantize: all 16 codes in
    every position, scale bytes 0/1/127/254 and more."""
    blocks = _all_code_blocks()
    for s in SCALES:
        ref = reference.mxfp4_dequantize(blocks.unsqueeze(1), torch.full((16, 1), s, dtype=torch.uint8),
                                         torch.float32)
        got = torch.tensor([_decode_block_py(bytes(b.tolist()), s) for b in blocks], dtype=torch.float32)
        assert torch.equal(got, ref), f"scale byte {s}"


def _host():
    C = _compiled()
    host = getattr(C, "host", None) if C is not None else None
    if host is None or not hasattr(host, "mxfp4_decode_fast"):
        pytest.skip("this build has no _C.host.mxfp4_decode_fast (rebuild with csrc/python/bind_moe.cpp)")
    return host


def test_host_decode_fast_matches_reference():
    """gptoss::mxfp4_block_decode_fast (the C++ the kernels use) against the reference."""
    host = _host()
    blocks = _all_code_blocks()
    for s in SCALES:
        scales = torch.full((16, 1), s, dtype=torch.uint8)
        ref = reference.mxfp4_dequantize(blocks.unsqueeze(1), scales, torch.float32)
        got = torch.from_numpy(host.mxfp4_decode_fast(blocks.unsqueeze(1).numpy(), scales.numpy()))
        assert torch.equal(got, ref), f"scale byte {s}"
    g = torch.Generator().manual_seed(3)
    b = torch.randint(0, 256, (7, 5, 16), dtype=torch.uint8, generator=g)
    sc = torch.randint(0, 256, (7, 5), dtype=torch.uint8, generator=g)
    ref = reference.mxfp4_dequantize(b, sc, torch.float32)
    got = torch.from_numpy(host.mxfp4_decode_fast(b.numpy(), sc.numpy()))
    assert torch.equal(got, ref)


def test_host_pair_bits_matches_python_twin():
    host = _host()
    g = torch.Generator().manual_seed(4)
    for w in torch.randint(0, 2**31, (64,), generator=g).tolist() + [0, 0xFFFFFFFF, 0x88888888, 0x77777777]:
        for i in range(4):
            assert host.fp4x8_pair_bits(w, i) == _pair_bits(w, i)


# ---------------------------------------------------------------------------------------------
# static checks of the compiled kernels (CPU, needs a build with this family)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def decode_kernels():
    if not gptoss_kernels.kernels_built():
        pytest.skip(f"kernels not built: {gptoss_kernels.kernels_error()}")
    if sass.cuobjdump() is None:
        pytest.skip("cuobjdump not found (pip install triton)")
    ks = [k for k in sass.kernels(gptoss_kernels.library_path()).values() if "moe_decode_" in k.name]
    if not ks:
        pytest.skip("this build has no moe_decode kernels (rebuild)")
    return ks


def test_sass_decode_kernels(decode_kernels):
    gemv = [k for k in decode_kernels if "moe_decode_gemv_kernel" in k.name]
    assert len(gemv) == 2, [k.name for k in decode_kernels]
    for k in decode_kernels:
        print(f"{k.name[:90]:90s} REG={k.reg} STACK={k.stack} LOCAL={k.local} SHARED={k.shared}")
        assert k.local == 0 and k.stack == 0, f"{k.name} uses local memory"
        assert "LDL" not in k.sass and "STL" not in k.sass, f"{k.name} has LDL/STL"
    for k in gemv:
        assert "LDG.E.128" in k.sass or "LDG.E.NA.128" in k.sass, f"{k.name}: no 16-byte loads"
        assert "HMMA.16816.F32.BF16" in k.sass, f"{k.name}: no bf16 tensor-core mma"
        # the E2M1 decode relies on bf16 subnormals (codes 0/1 are 2^-126-scaled subnormals)
        hmul = [ln for ln in k.sass.splitlines() if "HMUL2" in ln]
        assert hmul and not any(".FTZ" in ln or ".FMZ" in ln for ln in hmul), f"{k.name}: flushing bf16 multiply"
        assert k.reg <= 128, f"{k.name}: {k.reg} registers (2 blocks of 256 threads per SM need <= 128)"


# ---------------------------------------------------------------------------------------------
# GPU: the decode kernels against the reference
# ---------------------------------------------------------------------------------------------

gpu = pytest.mark.gpu
cuda_only = pytest.mark.cuda_only


def _gpu_case(T, E, H, I, k=4, seed=0, **wkw):  # noqa: E741
    g = torch.Generator().manual_seed(seed)
    wt = make_weights(E, H, I, DEV, gen=g, **wkw)
    ids, w = make_routing(T, E, k, DEV, gen=g)
    return make_x(T, H, DEV, gen=g), ids, w, wt


def _run_decode(x, ids, w, wt, out=None, **kw):
    if out is None:
        out = torch.full((x.shape[0], x.shape[1]), float("nan"), dtype=torch.bfloat16, device=x.device)
    out = moe_ops.run_decode(*args_of(x, ids, w, wt), 1.702, 7.0, out, **kw)
    sync()
    return out


def _check(out, x, ids, w, wt, label="", ref=None):
    if ref is None:  # (the CPU reference is slow at E = 128: callers comparing two outputs pass it)
        ref = reference.moe(*args_of(x, ids, w, wt))
    assert not torch.isnan(out).any(), f"{label}: NaN in output (unwritten or bad math)"
    err = rel_err(out, ref)
    print(f"moe decode {label}: rel err {err:.2e}")
    assert err < TOL, f"{label}: rel err {err:.3e}"
    return err


# T = 64 with E = 128 (~110 distinct experts) on the GPU only: ~20 s on the host build (kernels
# emulated thread by thread, and the CPU reference expert by expert); T = 64 (one full 256-row
# chunk) runs there with E = 32, k = 4 of E = 128 at T = 1 .. 16
@gpu
@pytest.mark.parametrize("T,E", [(T, E) for E in (32, 128) for T in (1, 2, 3, 8, 16, 64)
                                 if ON_GPU or (T, E) != (64, 128)])
def test_gpu_decode_vs_reference(T, E):
    x, ids, w, wt = _gpu_case(T, E, 256, 512, seed=T * 1000 + E)
    ref = reference.moe(*args_of(x, ids, w, wt))
    _check(_run_decode(x, ids, w, wt), x, ids, w, wt, f"T={T} E={E} H=256 I=512", ref=ref)
    # through the public op (T*k <= 256: decode regime), poisoned out
    out = torch.full((T, 256), float("nan"), dtype=torch.bfloat16, device=DEV)
    moe_mxfp4(*args_of(x, ids, w, wt), out=out)
    sync()
    _check(out, x, ids, w, wt, f"op T={T} E={E}", ref=ref)


# T = 1 only on the host build: T = 4 costs ~25 s there (T = 64 minutes), every thread emulated;
# more tokens and experts per call run there at smaller H, I
@gpu
@pytest.mark.parametrize("T", [1, 4, 64] if ON_GPU else [1])
def test_gpu_decode_real_size(T):
    x, ids, w, wt = _gpu_case(T, 32, 2880, 2880, seed=7 + T)
    _check(_run_decode(x, ids, w, wt), x, ids, w, wt, f"T={T} E=32 H=I=2880")


@gpu
def test_gpu_odd_sizes():
    # H, I multiples of 32 but not 64/128: ragged chunks and a partial last block of rows; (128, 192):
    # one full 4-group chunk in mlp1, a full chunk and a ragged one (6 groups) in mlp2
    for H, I in ((96, 160), (32, 32), (2880, 96), (128, 192)):  # noqa: E741
        x, ids, w, wt = _gpu_case(5, 16, H, I, seed=H + I)
        _check(_run_decode(x, ids, w, wt), x, ids, w, wt, f"H={H} I={I}")


@gpu
def test_gpu_duplicate_and_shared_experts():
    T, E, H, I = 16, 32, 256, 256  # noqa: E741
    x, _, w, wt = _gpu_case(T, E, H, I, seed=11)
    # every token picks from the same 4 experts (each expert sees all 16 tokens)
    ids = torch.stack([torch.randperm(4) * 3 + 1 for _ in range(T)]).to(torch.int32).to(DEV)
    _check(_run_decode(x, ids, w, wt), x, ids, w, wt, "duplicates across tokens")
    # one expert chosen by all 64 tokens (8 token tiles of one expert), the rest random
    T = 64
    x, ids, w, wt = _gpu_case(T, E, H, I, seed=12)
    ids[:, 2] = 5
    ids[:, 0] = torch.where(ids[:, 0] == 5, torch.full_like(ids[:, 0], 6), ids[:, 0])
    ids[:, 1] = torch.where(ids[:, 1] == 5, torch.full_like(ids[:, 1], 7), ids[:, 1])
    ids[:, 3] = torch.where(ids[:, 3] == 5, torch.full_like(ids[:, 3], 8), ids[:, 3])
    _check(_run_decode(x, ids, w, wt), x, ids, w, wt, "one expert chosen by all tokens")
    # the same expert twice in one token's top-k (each slot counts, like the reference)
    ids2 = ids.clone()
    ids2[:, 1] = ids2[:, 0]
    _check(_run_decode(x, ids2, w, wt), x, ids2, w, wt, "same expert twice in a token")
    # all 8 slots of every token on experts 0..7 (k = 8, the limit)
    x8, _, w8, wt8 = _gpu_case(8, 8, H, I, k=8, seed=13)
    ids8 = torch.stack([torch.randperm(8) for _ in range(8)]).to(torch.int32).to(DEV)
    _check(_run_decode(x8, ids8, w8, wt8), x8, ids8, w8, wt8, "k=8")


@gpu
def test_gpu_extreme_scales():
    T, E, H, I = 8, 32, 256, 256  # noqa: E741
    x, ids, w, wt = _gpu_case(T, E, H, I, seed=21)
    g = torch.Generator().manual_seed(22)
    for key in ("w1_scales", "w2_scales"):
        s = wt[key].cpu()
        pick = torch.randint(0, 4, s.shape, generator=g)
        choices = torch.tensor([0, 1, 140, 150], dtype=torch.uint8)  # underflow-range and huge scales
        wt[key] = torch.where(torch.rand(s.shape, generator=g) < 0.3, choices[pick], s).to(DEV)
    out = _run_decode(x, ids, w, wt)
    ref = reference.moe(*args_of(x, ids, w, wt))
    assert torch.isfinite(ref).all()
    _check(out, x, ids, w, wt, "extreme scales", ref=ref)


@gpu
def test_gpu_deterministic():
    """Two runs give the same bits. On the host build the second run resumes the threads and
    blocks in reverse order (a different interleaving at every barrier and collective)."""
    # host build: H = I = 256 (2880 at T = 16 costs ~25 s per call there, every thread emulated)
    T, E, H, I = 16, 32, shrink(2880, 256), shrink(2880, 256)  # noqa: E741
    x, ids, w, wt = _gpu_case(T, E, H, I, seed=31)
    a = _run_decode(x, ids, w, wt)
    if ON_HOSTSIM:
        mod = _lib.kernels(DEV).module
        mod.set_order(1)  # reverse
        try:
            b = _run_decode(x, ids, w, wt)
        finally:
            mod.set_order(-1, 0x9E3779B97F4A7C15)  # the default: rotate per launch
    else:
        b = _run_decode(x, ids, w, wt)
    assert torch.equal(a.view(torch.int16), b.view(torch.int16)), "two runs differ"
    _check(a, x, ids, w, wt, "deterministic")


@gpu
@cuda_only  # CUDA graphs and streams
def test_gpu_graph_replay():
    T, E, H, I = 16, 32, 2880, 2880  # noqa: E741
    x, ids, w, wt = _gpu_case(T, E, H, I, seed=31)
    a = _run_decode(x, ids, w, wt)
    out = torch.full_like(a, float("nan"))
    ws = torch.empty(moe_ops.decode_workspace_bytes(T, 4, H, I), dtype=torch.uint8, device=DEV)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up on the capture stream
        _run_decode(x, ids, w, wt, out=out, workspace=ws)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        moe_mxfp4(*args_of(x, ids, w, wt), out=out)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out.view(torch.int16), a.view(torch.int16)), "graph replay differs from eager"
    # new routing, same buffers: the replay follows the ids (no host-side expert list)
    g = torch.Generator().manual_seed(32)
    ids2, w2 = make_routing(T, E, 4, DEV, gen=g)
    ids.copy_(ids2)
    w.copy_(w2)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    _check(out, x, ids, w, wt, "graph replay, new routing")


@gpu
def test_gpu_chunked_large_T_and_empty():
    # T*k above one kernel chunk (256 routed rows): the launcher loops over token chunks (64, 64, 22)
    T, E, H, I = 150, 32, 256, 256  # noqa: E741
    x, ids, w, wt = _gpu_case(T, E, H, I, seed=41)
    _check(_run_decode(x, ids, w, wt), x, ids, w, wt, "T=150 chunked")
    x0 = torch.empty((0, H), dtype=torch.bfloat16, device=DEV)
    out0 = moe_mxfp4(*args_of(x0, ids[:0], w[:0], wt))
    assert out0.shape == (0, H)


@gpu
def test_gpu_invalid_ids_give_nan_rows():
    T, E, H, I = 4, 32, 256, 256  # noqa: E741
    x, ids, w, wt = _gpu_case(T, E, H, I, seed=51)
    bad = ids.clone()
    bad[1, 2] = E
    bad[3, 0] = -1
    out = _run_decode(x, bad, w, wt)
    assert torch.isnan(out[1]).all() and torch.isnan(out[3]).all()
    good = [0, 2]
    ref = reference.moe(*args_of(x[good], ids[good], w[good], wt))
    assert rel_err(out[good], ref) < TOL
    with pytest.raises(ValueError, match="topk_ids must be in"):
        moe_mxfp4(*args_of(x, bad, w, wt), validate_ids=True)


@gpu
def test_gpu_workspace_too_small():
    T, E, H, I = 2, 8, 64, 64  # noqa: E741
    x, ids, w, wt = _gpu_case(T, E, H, I, seed=61)
    with pytest.raises(ValueError, match="workspace"):
        _run_decode(x, ids, w, wt, workspace=torch.empty(16, dtype=torch.uint8, device=DEV))


@gpu
@cuda_only  # timings (CUDA events) and DRAM bandwidth; its correctness check is the 120b shape
@pytest.mark.parametrize("T", [1, 4, 16, 64])
def test_gpu_bandwidth_report(T):
    """Times the op at the 120b shape (E=128, H=I=2880, k=4) on fresh routings (weights 1.6 GB >>
    L2, so the selected experts come from DRAM) and prints the achieved bandwidth on
    moe_bytes_read next to a device-to-device copy's. Reports only (the target is >= 80% of copy
    bandwidth); asserts correctness of the timed call."""
    E, H, I, k = 128, 2880, 2880, 4  # noqa: E741
    g = torch.Generator(device=DEV).manual_seed(71)
    u8 = dict(dtype=torch.uint8, device=DEV, generator=g)
    wt = {"w1_blocks": torch.randint(0, 256, (E, 2 * I, H // 32, 16), **u8),
          "w1_scales": torch.randint(119, 124, (E, 2 * I, H // 32), **u8),
          "w1_bias": (torch.randn((E, 2 * I), device=DEV, generator=g) * 0.1).to(torch.bfloat16),
          "w2_blocks": torch.randint(0, 256, (E, H, I // 32, 16), **u8),
          "w2_scales": torch.randint(119, 124, (E, H, I // 32), **u8),
          "w2_bias": (torch.randn((E, H), device=DEV, generator=g) * 0.1).to(torch.bfloat16)}
    sets = []
    for _ in range(8):
        ids = torch.rand((T, E), device=DEV, generator=g).topk(k, dim=1).indices.to(torch.int32).contiguous()
        w = torch.softmax(torch.randn((T, k), device=DEV, generator=g), dim=1).contiguous()
        sets.append((torch.randn((T, H), device=DEV, generator=g).to(torch.bfloat16), ids, w))
    out = torch.empty((T, H), dtype=torch.bfloat16, device=DEV)
    ws = torch.empty(moe_ops.decode_workspace_bytes(T, k, H, I), dtype=torch.uint8, device=DEV)
    for x, ids, w in sets:  # warm-up
        moe_ops.run_decode(*args_of(x, ids, w, wt), 1.702, 7.0, out, workspace=ws)
    torch.cuda.synchronize()
    times = []
    for rep in range(5):
        for x, ids, w in sets:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            moe_ops.run_decode(*args_of(x, ids, w, wt), 1.702, 7.0, out, workspace=ws)
            b.record()
            b.synchronize()
            times.append((a.elapsed_time(b) * 1e-3, moe_ops.moe_bytes_read(T, k, E, H, I, ids)))
    t_med = sorted(t for t, _ in times)[len(times) // 2]
    nbytes = sum(n for _, n in times) / len(times)
    src = torch.empty(1 << 30, dtype=torch.uint8, device=DEV)
    dst = torch.empty_like(src)
    dst.copy_(src)
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(5):
        dst.copy_(src)
    b.record()
    b.synchronize()
    copy_bw = 2 * src.numel() * 5 / (a.elapsed_time(b) * 1e-3)
    bw = nbytes / t_med
    print(f"moe decode T={T}: {t_med * 1e6:.1f} us, {nbytes / 1e6:.1f} MB, {bw / 1e9:.0f} GB/s = "
          f"{100 * bw / copy_bw:.0f}% of copy {copy_bw / 1e9:.0f} GB/s ({torch.cuda.get_device_name()})")
    x, ids, w = sets[-1]
    _check(out, x, ids, w, wt, f"bandwidth case T={T}")


@gpu
@pytest.mark.hopper  # PDL: below sm_90 every launch is ordinary, nothing to compare
def test_gpu_pdl_off_gives_same_bits():
    """Ordinary launches (PDL off, switched in the kernels' module) give the same bits as the
    default PDL launches (programmatic dependent launch changes scheduling only). On the host
    build a PDL launch is also checked: nothing but weights is touched before its wait."""
    # host build: H = I = 256 (2880 at T = 16 costs ~25 s per call there, every thread emulated)
    T, E, H, I = 16, 32, shrink(2880, 256), shrink(2880, 256)  # noqa: E741
    mod = _lib.kernels(DEV).module
    x, ids, w, wt = _gpu_case(T, E, H, I, seed=81)
    assert mod.pdl_enabled(), "PDL is off in this process: nothing to compare"
    on = _run_decode(x, ids, w, wt).cpu()
    assert mod.pdl_enabled(), "PDL turned itself off (the runtime refused the launch attribute)"
    mod.set_pdl(False)
    try:
        off = _run_decode(x, ids, w, wt).cpu()
    finally:
        mod.set_pdl(True)
    assert torch.equal(on.view(torch.int16), off.view(torch.int16))
    _check(on, x, ids, w, wt, "PDL on")


# ---------------------------------------------------------------------------------------------
# MoE + residual add + RMSNorm (the decode step's layer end; the norm inside the combine kernel)
# ---------------------------------------------------------------------------------------------

def test_moe_add_rms_norm_cpu_is_the_two_ops_and_checks_arguments():
    from gptoss_kernels import ops

    g = torch.Generator().manual_seed(7)
    T, E, H, I, k = 5, 6, 64, 64, 2  # noqa: E741
    wt = make_weights(E, H, I, gen=g)
    ids, w = make_routing(T, E, k, gen=g)
    x, r = make_x(T, H, gen=g), make_x(T, H, gen=g)
    nw = torch.randn(H, generator=g).to(torch.bfloat16)
    y, h = ops.moe_mxfp4_add_rms_norm(*args_of(x, ids, w, wt), r, nw, eps=1e-5)
    m = moe_mxfp4(*args_of(x, ids, w, wt))
    y_ref, h_ref = ops.rms_norm(m, nw, eps=1e-5, residual=r)
    assert torch.equal(y, y_ref) and torch.equal(h, h_ref)
    r2 = r.clone()
    y2, h2 = ops.moe_mxfp4_add_rms_norm(*args_of(x, ids, w, wt), r2, nw.float(), residual_out=r2)   # in place
    assert h2.data_ptr() == r2.data_ptr() and torch.equal(r2, h_ref)
    with pytest.raises(ValueError, match="residual"):
        ops.moe_mxfp4_add_rms_norm(*args_of(x, ids, w, wt), r[:3], nw)
    with pytest.raises(TypeError, match="norm_weight"):
        ops.moe_mxfp4_add_rms_norm(*args_of(x, ids, w, wt), r, nw.half())
    with pytest.raises(ValueError, match="norm_out"):
        ops.moe_mxfp4_add_rms_norm(*args_of(x, ids, w, wt), r, nw, norm_out=torch.empty(T, H + 1, dtype=torch.bfloat16))


def _fused_vs_two_ops(T, E, H, I, k, wdtype, seed, bad_id=False):  # noqa: E741
    from gptoss_kernels import ops

    x, ids, w, wt = _gpu_case(T, E, H, I, k=k, seed=seed)
    if bad_id:
        ids[T // 2, 0] = E        # that token's rows come out NaN on both paths
    g = torch.Generator(device=DEV).manual_seed(seed + 1)
    r = torch.randn(T, H, device=DEV, generator=g).to(torch.bfloat16)
    nw = (torch.randn(H, device=DEV, generator=g) * 0.5 + 1).to(wdtype)
    m = torch.full((T, H), float("nan"), dtype=torch.bfloat16, device=DEV)
    _run_decode(x, ids, w, wt, out=m)
    want_y, want_h = ops.rms_norm(m, nw, eps=1e-5, residual=r)
    sync()
    # the model's pattern: norm_out is the MoE's own input x, residual_out the residual (in place)
    y = x.clone()
    r_inplace = r.clone()
    got_y, got_h = ops.moe_mxfp4_add_rms_norm(*args_of(y, ids, w, wt), r_inplace, nw, eps=1e-5, norm_out=y,
                                              residual_out=r_inplace, validate_ids=False)
    sync()
    assert got_y.data_ptr() == y.data_ptr() and got_h.data_ptr() == r_inplace.data_ptr()
    for got, want in ((got_y, want_y), (got_h, want_h)):
        nan = torch.isnan(want)
        assert torch.equal(torch.isnan(got), nan)
        assert torch.equal(got[~nan], want[~nan]), f"T={T} E={E} {wdtype}: fused norm differs from the two ops"
    if bad_id:
        assert torch.isnan(got_y[T // 2]).all() and not torch.isnan(got_y[:T // 2]).any()


@gpu
@pytest.mark.parametrize("T", [1, 2, 5, 64])
@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float32])
def test_gpu_moe_add_rms_norm_equals_the_two_ops(T, wdtype):
    """gpt-oss shapes (H = I = 2880, 32 experts, k = 4): the same bits as moe_mxfp4 then rms_norm."""
    # host build: I = 64 (H = I = 2880 costs ~4-60 s per call there, every thread emulated); the
    # real H = 2880 stays: the fused norm's whole shape (360 chunks of 8 -> 384 threads, 12 warps
    # in the block sum, the last one partly idle)
    _fused_vs_two_ops(T, 32, 2880, shrink(2880, 64), 4, wdtype, seed=90 + T)


@gpu
def test_gpu_moe_add_rms_norm_chunks_and_bad_ids():
    """E > 256 keeps T*k = 280 routed rows on the decode kernels: two token chunks (64 + 6); a bad
    id gives its token's row NaN on both paths; H = 64 (one warp per row)."""
    _fused_vs_two_ops(70, 300, 64, 64, 4, torch.bfloat16, seed=5, bad_id=True)
    _fused_vs_two_ops(3, 300, 64, 96, 4, torch.float32, seed=6, bad_id=True)
