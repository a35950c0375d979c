// Host-testable math of the dense kernels (csrc/kernels/dense.cu): the rounding points of the
// fused residual add + RMSNorm, and the register layout that lets the bf16 GEMV feed mma.sync
// m16n8k16 straight from 16-byte global loads. Checked on the CPU through _C.host.dense_*.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "common.cuh"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#endif

namespace gptoss {
namespace dense {

// float -> nearest bf16 (ties to even), returned as a float. NaN stays NaN.
GPTOSS_HD float bf16_round(float v) {
#if defined(__CUDA_ARCH__)
  return __bfloat162float(__float2bfloat16_rn(v));
#else
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu)) return v;  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  u &= 0xffff0000u;
  float r;
  std::memcpy(&r, &u, 4);
  return r;
#endif
}

// The residual stream: h = bf16(x + r), the sum taken in fp32 (as the reference does).
GPTOSS_HD float residual_add(float x, float r) { return bf16_round(x + r); }

// 1 / sqrt(mean(h^2) + eps) from the fp32 sum of squares of the (bf16-rounded) row.
GPTOSS_HD float rms_inv(float sum_sq, int H, float eps) {
#if defined(__CUDA_ARCH__)
  return rsqrtf(sum_sq / static_cast<float>(H) + eps);
#else
  return 1.0f / std::sqrt(sum_sq / static_cast<float>(H) + eps);
#endif
}

// One output element before its bf16 rounding: (h * inv_rms) * w, in this order (the reference's).
GPTOSS_HD float rms_apply(float h, float inv, float w) { return (h * inv) * w; }

// ---------------------------------------------------------------------------------------------
// GEMV operand layout (y^T[N, T] = W[N, K] x^T[K, T] as mma.sync m16n8k16: A = W tile, B = x^T).
//
// Per 32-wide k step, lane (g = lane/4, q = lane%4) loads 16 bytes of W row g, 16 bytes of W row
// g+8 and 16 bytes of x row (token) g, all at k = k0 + 8q .. k0 + 8q + 7. Those 8 k values are
// spread over two mma k16 steps (m = 0, 1): mma m uses the 32-bit words 2m and 2m+1 of each
// 16-byte chunk. Inside mma m, the PTX fragment position "k = 2q + e" (e = 0, 1) holds the real
// k = k0 + 8q + 4m + e and "k = 2q + 8 + e" holds k0 + 8q + 4m + 2 + e, for A and B alike, so
// every product pairs the same real k (a permutation of the reduction, which leaves the sum
// unchanged up to fp32 rounding order).
// ---------------------------------------------------------------------------------------------

// Offset (in elements, from the step's k0) of the 16-byte chunk lane loads.
GPTOSS_HD int gemv_chunk_k(int lane) { return 8 * (lane & 3); }
// W row (inside the 16-row tile) of the lane's first (half = 0) and second (half = 1) chunk.
GPTOSS_HD int gemv_w_row(int lane, int half) { return (lane >> 2) + 8 * half; }
// Token (inside the 8-token tile) whose x chunk the lane loads.
GPTOSS_HD int gemv_x_token(int lane) { return lane >> 2; }
// Real k offset (from k0) of PTX fragment column `col` (0..15) for lane's quad q in mma m (0, 1).
GPTOSS_HD int gemv_fragment_k(int q, int m, int col) {
  // PTX m16n8k16 A/B fragments: lane quad q holds columns 2q, 2q+1 (regs a0/a1, b0) and
  // 2q+8, 2q+9 (a2/a3, b1); the half-word e picks the even or odd column.
  const int e = col & 1;
  const int hi = (col >> 3) & 1;  // 0 for 2q+e, 1 for 2q+8+e
  return 8 * q + 4 * m + 2 * hi + e;
}
// Output position of accumulator c (0..3) of lane: row (inside the 16-row tile) and token.
GPTOSS_HD int gemv_c_row(int lane, int c) { return (lane >> 2) + 8 * (c >> 1); }
GPTOSS_HD int gemv_c_token(int lane, int c) { return 2 * (lane & 3) + (c & 1); }

// The QKV GEMV fused with RoPE (head_dim 64, half-split pairs (i, i + 32)): block b computes head
// b / 4 and quarter b % 4 of its rotation pairs, so that both halves of each pair land in the
// same block. Local W row r (0..15) of block b is QKV row head * 64 + 8 * quarter + r for r < 8
// and head * 64 + 32 + 8 * quarter + (r - 8) for r >= 8: local rows r and r + 8 form a pair.
GPTOSS_HD int64_t qkv_rope_row(int64_t block, int r) {
  const int64_t head = block >> 2;
  const int quarter = static_cast<int>(block & 3);
  return head * 64 + (r < 8 ? 8 * quarter + r : 32 + 8 * quarter + (r - 8));
}

}  // namespace dense
}  // namespace gptoss

namespace gptoss {
namespace dense {

// Greedy argmax order (torch.argmax's): NaN ranks above every number, ties (and NaN vs NaN) go
// to the lower index. True when candidate (v, i) beats the current best (bv, bi).
GPTOSS_HD bool argmax_better(float v, int64_t i, float bv, int64_t bi) {
  const bool vn = v != v, bn = bv != bv;
  if (vn || bn) return vn && (!bn || i < bi);
  return v > bv || (v == bv && i < bi);
}

}  // namespace dense
}  // namespace gptoss
