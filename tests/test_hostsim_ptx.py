"""The host build's emulated PTX, checked against the PTX ISA on its own (not against our kernels).

Each probe kernel (csrc/hostsim/probes.cpp) runs one instruction through the same wrapper the
kernels call, with every lane's registers in and out through memory. The fragment layouts below
are restated from the PTX ISA ("Matrix fragments for mma.m16n8k16 with floating point type",
"ldmatrix", "Asynchronous Warpgroup Level Matrix Shared Memory Layout" / "Register Fragments" and
the matrix-descriptor format), and the 128-byte swizzle is an encoder written here. Data is random
(never uniform: uniform data hides fragment mix-ups), so a wrong lane, row or swizzle fails.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gptoss_kernels import _lib

pytestmark = pytest.mark.skipif(not _lib.hostsim_built(), reason=f"no host build: {_lib.hostsim_error()}")


def _hs():
    from gptoss_kernels import _hostsim
    return _hostsim


def _run(fn, *args):
    """Calls a probe with tensors' addresses; their extents are the only global memory allowed."""
    hs = _hs()
    hs.begin_call([_lib.tensor_extent(a) for a in args if isinstance(a, torch.Tensor)])
    try:
        rc = fn(*[a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args])
    finally:
        reports = hs.end_call()
    assert rc == 0, f"probe launch failed with CUDA error {rc}"
    assert not reports, "\n".join(reports)


def _bf16(shape, gen):
    return torch.randn(shape, generator=gen).to(torch.bfloat16)


def _bits(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(torch.int16).numpy().astype(np.uint16).astype(np.uint32)


def _pack(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return lo | (hi << 16)


# ---- mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 -------------------------------------
# ISA fragments (groupID g = lane >> 2, threadID_in_group t = lane % 4):
#   A (16x16): a0,a1: (g, 2t+i); a2,a3: (g+8, 2t+i); a4,a5: (g, 2t+8+i); a6,a7: (g+8, 2t+8+i);
#              register j holds the pair a_{2j}, a_{2j+1} (low half first)
#   B (16x8):  b0,b1: (k = 2t+i, n = g); b2,b3: (k = 2t+8+i, n = g)
#   C, D (16x8): c0,c1: (g, 2t+i); c2,c3: (g+8, 2t+i)
def _mma_fragments(A, B, C):
    a = np.zeros((32, 4), np.uint32)
    b = np.zeros((32, 2), np.uint32)
    c = np.zeros((32, 4), np.float32)
    Ab, Bb = _bits(A), _bits(B)
    for lane in range(32):
        g, t = lane >> 2, lane % 4
        a[lane, 0] = _pack(Ab[g, 2 * t], Ab[g, 2 * t + 1])
        a[lane, 1] = _pack(Ab[g + 8, 2 * t], Ab[g + 8, 2 * t + 1])
        a[lane, 2] = _pack(Ab[g, 2 * t + 8], Ab[g, 2 * t + 9])
        a[lane, 3] = _pack(Ab[g + 8, 2 * t + 8], Ab[g + 8, 2 * t + 9])
        b[lane, 0] = _pack(Bb[2 * t, g], Bb[2 * t + 1, g])
        b[lane, 1] = _pack(Bb[2 * t + 8, g], Bb[2 * t + 9, g])
        c[lane] = [C[g, 2 * t], C[g, 2 * t + 1], C[g + 8, 2 * t], C[g + 8, 2 * t + 1]]
    return a, b, c


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mma_m16n8k16_is_a_times_b_plus_c(seed):
    gen = torch.Generator().manual_seed(seed)
    A, B = _bf16((16, 16), gen), _bf16((16, 8), gen)
    C = torch.randn(16, 8, generator=gen)
    a, b, c = _mma_fragments(A, B, C)
    d = torch.full((32, 4), float("nan"))
    _run(_hs().probe.mma, torch.from_numpy(a.view(np.int32)), torch.from_numpy(b.view(np.int32)),
         torch.from_numpy(c), d)
    want = A.double() @ B.double() + C.double()
    got = torch.empty(16, 8, dtype=torch.float64)
    for lane in range(32):
        g, t = lane >> 2, lane % 4
        got[g, 2 * t], got[g, 2 * t + 1], got[g + 8, 2 * t], got[g + 8, 2 * t + 1] = d[lane].double()
    # fp32 accumulation of exact bf16 products: a few ulps of the fp32 result
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


# ---- ldmatrix.sync.aligned.m8n8.x4(.trans).shared.b16 -------------------------------------------
# ISA: threads 8i..8i+7 give the addresses of rows 0..7 of matrix i (16 bytes each); without
# .trans, lane l receives row l/4, elements 2(l%4) and 2(l%4)+1 of each matrix (register i for
# matrix i, the lower-indexed element in the low half); with .trans the matrix is delivered
# transposed: lane l receives elements (2(l%4), l/4) and (2(l%4)+1, l/4).
@pytest.mark.parametrize("trans", [False, True])
def test_ldmatrix_x4_delivers_the_isa_fragments(trans):
    gen = torch.Generator().manual_seed(7 + trans)
    image = torch.randint(0, 2 ** 16, (2048,), generator=gen, dtype=torch.int32).to(torch.int16)  # 4 KB
    # 32 distinct, scattered 16-byte rows
    rows = torch.randperm(256, generator=gen)[:32].to(torch.int32) * 16
    out = torch.full((32, 4), -1, dtype=torch.int32)
    _run(_hs().probe.ldmatrix, image, image.numel() * 2, rows, int(trans), out)
    img = image.numpy().view(np.uint16)
    M = np.stack([np.stack([img[rows[8 * i + r] // 2: rows[8 * i + r] // 2 + 8] for r in range(8)]) for i in range(4)])
    got = out.numpy().view(np.uint32)
    for lane in range(32):
        for i in range(4):
            r, c = lane // 4, 2 * (lane % 4)
            lo, hi = (M[i, c, r], M[i, c + 1, r]) if trans else (M[i, r, c], M[i, r, c + 1])
            assert got[lane, i] == (int(lo) | (int(hi) << 16)), (lane, i)


# ---- wgmma.mma_async m64nNk16 bf16 -> f32 ------------------------------------------------------
# Descriptor (ISA "matrix descriptor"): bits 0-13 start address >> 4, 16-29 leading-dimension
# byte offset >> 4, 32-45 stride-dimension byte offset >> 4, 62-63 swizzle (1 = 128B).
# Canonical 128B-swizzled layouts (8 rows x 128 bytes per atom, atoms SBO apart):
#   K-major operand (rows = M or N, 64 bf16 of K per row): byte (r, k) = (r // 8) SBO + (r % 8) 128 + 2k
#   MN-major operand (rows = K, 64 bf16 of M/N per row):   byte (k, n) = (k // 8) SBO + (k % 8) 128 + 2n
# then the swizzle: address bits [4:6] ^= bits [7:9] (16-byte chunk c of row r lands at c ^ (r % 8)
# for 1024-byte-aligned atoms). Accumulator fragment: warp w of the warpgroup, lane l, register i:
# row 16w + l/4 + 8 ((i/2) % 2), column 8 (i/4) + 2 (l % 4) + i % 2.
def _swizzle128(addr: int) -> int:
    return addr ^ (((addr >> 7) & 7) << 4)


def _place(image: np.ndarray, base: int, offset: int, value: int) -> None:
    a = _swizzle128(base + offset)
    image[a // 2] = value


def _desc(start: int, lbo: int, sbo: int) -> int:
    return (start >> 4) | ((lbo >> 4) << 16) | ((sbo >> 4) << 32) | (1 << 62)


def _unpack_d(d: torch.Tensor, n: int) -> torch.Tensor:
    out = torch.empty(64, n, dtype=torch.float64)
    for thread in range(128):
        w, lane = thread // 32, thread % 32
        for i in range(n // 2):
            out[16 * w + lane // 4 + 8 * ((i // 2) % 2), 8 * (i // 4) + 2 * (lane % 4) + i % 2] = d[thread, i]
    return out


@pytest.mark.parametrize("n", [64, 128, 192, 256])
def test_wgmma_ss_k_major_swizzled_is_a_times_b(n):
    gen = torch.Generator().manual_seed(n)
    A, B = _bf16((64, 16), gen), _bf16((16, n), gen)
    Ab, Bb = _bits(A), _bits(B)
    sbo = 1024
    a_base, b_base = 0, 64 // 8 * sbo          # B's tile after A's 8 atoms
    image = np.zeros((b_base + n // 8 * sbo) // 2, np.uint16)
    image[:] = np.random.default_rng(n).integers(0, 2 ** 16, image.size)  # garbage outside the tiles
    for m in range(64):
        for k in range(16):
            _place(image, a_base, (m // 8) * sbo + (m % 8) * 128 + 2 * k, Ab[m, k])
    for j in range(n):
        for k in range(16):
            _place(image, b_base, (j // 8) * sbo + (j % 8) * 128 + 2 * k, Bb[k, j])
    d = torch.full((128, n // 2), float("nan"))
    img = torch.from_numpy(image.view(np.int16).copy())
    _run(_hs().probe.wgmma, img, img.numel() * 2, _desc(a_base, 16, sbo), _desc(b_base, 16, sbo), n, 0, 0, d)
    torch.testing.assert_close(_unpack_d(d, n), A.double() @ B.double(), rtol=1e-6, atol=1e-6)


def test_wgmma_rs_with_b_mn_major_is_a_times_b():
    """A from registers (the mma.sync A fragment per warp: warp w holds rows 16w..16w+15), B given
    as [k][n] (MN-major, .tnspB)."""
    n = 64
    gen = torch.Generator().manual_seed(11)
    A, B = _bf16((64, 16), gen), _bf16((16, n), gen)
    Ab, Bb = _bits(A), _bits(B)
    sbo = 1024
    image = np.random.default_rng(3).integers(0, 2 ** 16, 2 * sbo // 2).astype(np.uint16)
    for k in range(16):
        for j in range(n):
            _place(image, 0, (k // 8) * sbo + (k % 8) * 128 + 2 * j, Bb[k, j])
    a_regs = np.zeros((128, 4), np.uint32)
    for thread in range(128):
        w, lane = thread // 32, thread % 32
        g, t = lane >> 2, lane % 4
        r0, r1 = 16 * w + g, 16 * w + g + 8
        a_regs[thread] = [_pack(Ab[r0, 2 * t], Ab[r0, 2 * t + 1]), _pack(Ab[r1, 2 * t], Ab[r1, 2 * t + 1]),
                          _pack(Ab[r0, 2 * t + 8], Ab[r0, 2 * t + 9]), _pack(Ab[r1, 2 * t + 8], Ab[r1, 2 * t + 9])]
    d = torch.full((128, n // 2), float("nan"))
    img = torch.from_numpy(image.view(np.int16).copy())
    _run(_hs().probe.wgmma, img, img.numel() * 2, 0, _desc(0, 16, sbo), n, 1,
         torch.from_numpy(a_regs.view(np.int32)), d)
    torch.testing.assert_close(_unpack_d(d, n), A.double() @ B.double(), rtol=1e-6, atol=1e-6)


def test_wgmma_swizzle_matters():
    """The same tiles stored without the swizzle give a different product (the test can fail)."""
    n = 64
    gen = torch.Generator().manual_seed(5)
    A, B = _bf16((64, 16), gen), _bf16((16, n), gen)
    Ab, Bb = _bits(A), _bits(B)
    sbo = 1024
    image = np.zeros((2 * 8 * sbo) // 2, np.uint16)
    for m in range(64):
        for k in range(16):
            image[((m // 8) * sbo + (m % 8) * 128 + 2 * k) // 2] = Ab[m, k]          # unswizzled
    for j in range(n):
        for k in range(16):
            image[(8 * sbo + (j // 8) * sbo + (j % 8) * 128 + 2 * k) // 2] = Bb[k, j]
    d = torch.full((128, n // 2), float("nan"))
    img = torch.from_numpy(image.view(np.int16).copy())
    _run(_hs().probe.wgmma, img, img.numel() * 2, _desc(0, 16, sbo), _desc(8 * sbo, 16, sbo), n, 0, 0, d)
    assert not torch.allclose(_unpack_d(d, n), A.double() @ B.double(), rtol=1e-3, atol=1e-3)
