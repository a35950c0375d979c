"""numpy models of the warp-level PTX instructions the kernels use, for the CPU emulations of the
kernels in the tests (tests named *emulat*). Fragment semantics from the PTX ISA:

- ldmatrix .m8n8.x4 .b16: lane l addresses row l % 8 of matrix l // 8 and receives in register j
  row l // 4, columns 2 (l % 4), +1 of matrix j (.trans: rows 2 (l % 4), +1 of column l // 4);
- mma.m16n8k16 .row.col bf16: A regs {(g, 2t), (g+8, 2t), (g, 2t+8), (g+8, 2t+8)}, B regs
  {(k=2t, n=g), (k=2t+8, n=g)}, C/D {(g, 2t), (g+8, 2t)}, each a pair along the column, with
  g = lane // 4, t = lane % 4.

These encode our reading of the ISA, not the hardware: only a GPU run confirms them.
"""

from __future__ import annotations

import numpy as np
import torch

LANE = np.arange(32)
G, T = LANE >> 2, LANE & 3
PAIR = np.arange(2)
A_ROW = np.stack([G, G + 8, G, G + 8], 1)
A_COL = np.stack([2 * T, 2 * T, 2 * T + 8, 2 * T + 8], 1)
C_ROW = np.stack([G, G, G + 8, G + 8], 1)
C_COL = np.stack([2 * T, 2 * T + 1, 2 * T, 2 * T + 1], 1)


def ldsm_x4(smem: np.ndarray, row_elem: np.ndarray, trans: bool = False) -> np.ndarray:
    """smem: flat float32 (bf16 values); row_elem [32]: element offset of the 16-byte row each lane
    addresses. -> [32 lanes, 4 regs, 2 halves]."""
    assert np.all(row_elem % 8 == 0), "ldmatrix rows must be 16-byte aligned"
    mats = smem[row_elem[:, None] + np.arange(8)].reshape(4, 8, 8)
    if trans:
        mats = mats.transpose(0, 2, 1)
    return mats[:, G[:, None], 2 * T[:, None] + PAIR].transpose(1, 0, 2)


def mma16816(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """a [32, 4, 2], b [32, 2, 2] (bf16 values), c [32, 4] fp32 -> d [32, 4] = A B + C (float64 math)."""
    A = np.zeros((16, 16), np.float64)
    A[A_ROW[:, :, None], A_COL[:, :, None] + PAIR] = a
    Bm = np.zeros((16, 8), np.float64)
    Bm[np.stack([2 * T, 2 * T + 8], 1)[:, :, None] + PAIR, G[:, None, None]] = b
    Cm = np.zeros((16, 8), np.float64)
    Cm[C_ROW, C_COL] = c
    return (A @ Bm + Cm)[C_ROW, C_COL].astype(np.float32)


def bf16(x) -> np.ndarray:
    """Round float values to bf16 (nearest even), returned as float32."""
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(torch.bfloat16).float().numpy()
