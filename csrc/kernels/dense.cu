// Dense kernels of a decode step (gptoss/dense.h):
//  - fused residual add + RMSNorm: one block per token row, 16-byte loads, the row held in
//    registers between the sum of squares and the scaling (a two-pass loop for very wide rows);
//  - bf16 GEMV / skinny GEMM for T <= 64 tokens: y^T[N, T] = W[N, K] x^T[K, T] on mma.sync
//    m16n8k16 with W as the A operand straight from 16-byte streaming loads (no shared-memory
//    staging: the reduction over k is permuted so that one 16-byte chunk feeds two mmas, see
//    csrc/norm.cuh), x from L1, K split over the warps of a block and reduced in shared memory.
//    Every W byte is read once; several 16-byte loads per thread are in flight.
//  - greedy argmax over float32 logits: 8192-wide slices per block, then one warp per row.
//
// GEMV sizing (not yet measured on a GPU): one block = 16 W rows; 8 warps per block when there are
// fewer than 1024 row tiles (QKV 320, out-proj 180 tiles: ~2 blocks/SM resident), else 4 (the
// unembedding: 12568 tiles). Each warp keeps 8 x 16 B of W per lane in flight (4 KB per warp),
// i.e. >= 40 KB per SM at the occupancies ptxas reports, well above the ~25 KB/SM Little's law
// asks of ~3.3 TB/s. Knobs if a GPU run disagrees: kUnroll (loads in flight), the 1024-tile
// WARPS threshold, kHoistX's NT limit.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "ptx.cuh"
#include "common.cuh"
#include "gptoss/dense.h"
#include "norm.cuh"
#include "rms_block.cuh"
#include "pdl.cuh"
#include "rope.cuh"

namespace {
using gptoss::unpack_bf16x8;
using gptoss::pack_bf16x8;
using gptoss::mma_bf16_16816;

using gptoss::dense::bf16_round;
using gptoss::dense::rms_apply;
using gptoss::dense::rms_inv;
using gptoss::dense::block_sum;
using gptoss::dense::kRmsMaxThreads;
using gptoss::dense::norm_chunk;

// ---------------------------------------------------------------------------------------------
// RMSNorm
// ---------------------------------------------------------------------------------------------

// h chunk: x (+ residual, rounded to bf16, stored to residual_out); returns its sum of squares.
template <bool kResidual>
__device__ __forceinline__ float residual_chunk(const uint4* xr, const uint4* rr, uint4* ro, int c, uint4& h) {
  // x: the previous kernel's output (PDL): L2-coherent
  return gptoss::dense::add_residual_chunk<kResidual>(__ldcg(xr + c), rr, ro, c, h);
}

// V > 0: each thread keeps its V chunks of h in registers (chunks <= V * blockDim.x).
// V == 0: any width; h is read back from residual_out (or x) for the scaling pass.
template <int V, bool kResidual, typename WT>
__global__ void __launch_bounds__(kRmsMaxThreads) rms_norm_kernel(
    const uint4* __restrict__ x, const uint4* residual, const WT* __restrict__ weight, uint4* __restrict__ out,
    uint4* residual_out, int chunks, float eps) {
  gptoss::pdl::wait();  // x and residual are earlier kernels' outputs
  gptoss::pdl::launch_dependents();
  const int64_t base = static_cast<int64_t>(blockIdx.x) * chunks;
  const uint4* xr = x + base;
  const uint4* rr = kResidual ? residual + base : nullptr;
  uint4* ro = kResidual ? residual_out + base : nullptr;
  uint4* yr = out + base;
  float ss = 0.f;
  if constexpr (V > 0) {
    uint4 h[V];
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const int c = threadIdx.x + i * blockDim.x;
      h[i] = make_uint4(0, 0, 0, 0);
      if (c < chunks) ss += residual_chunk<kResidual>(xr, rr, ro, c, h[i]);
    }
    const float inv = rms_inv(block_sum(ss), 8 * chunks, eps);
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const int c = threadIdx.x + i * blockDim.x;
      if (c < chunks) yr[c] = norm_chunk(h[i], weight, c, inv);
    }
  } else {
    for (int c = threadIdx.x; c < chunks; c += blockDim.x) {
      uint4 h;
      ss += residual_chunk<kResidual>(xr, rr, ro, c, h);
    }
    const float inv = rms_inv(block_sum(ss), 8 * chunks, eps);
    // each thread reads back only the chunks it wrote itself
    const uint4* hr = kResidual ? static_cast<const uint4*>(ro) : xr;
    for (int c = threadIdx.x; c < chunks; c += blockDim.x) yr[c] = norm_chunk(hr[c], weight, c, inv);
  }
}

template <int V, bool kResidual, typename WT>
cudaError_t launch_rms(const void* x, const void* residual, const void* weight, void* out, void* residual_out,
                       int64_t T, int chunks, int threads, float eps, cudaStream_t stream) {
  return gptoss::pdl::launch(rms_norm_kernel<V, kResidual, WT>, dim3(static_cast<unsigned>(T)), dim3(threads), 0,
                             stream, true, static_cast<const uint4*>(x), static_cast<const uint4*>(residual),
                             static_cast<const WT*>(weight), static_cast<uint4*>(out),
                             static_cast<uint4*>(residual_out), chunks, eps);
}

template <bool kResidual, typename WT>
cudaError_t dispatch_rms(const void* x, const void* residual, const void* weight, void* out, void* residual_out, int64_t T,
                  int chunks, float eps, cudaStream_t stream) {
  auto threads_for = [&](int v) {
    const int t = (chunks + v - 1) / v;
    return (t + 31) / 32 * 32;
  };
  if (chunks <= kRmsMaxThreads)
    return launch_rms<1, kResidual, WT>(x, residual, weight, out, residual_out, T, chunks, threads_for(1), eps, stream);
  if (chunks <= 2 * kRmsMaxThreads)
    return launch_rms<2, kResidual, WT>(x, residual, weight, out, residual_out, T, chunks, threads_for(2), eps, stream);
  if (chunks <= 4 * kRmsMaxThreads)
    return launch_rms<4, kResidual, WT>(x, residual, weight, out, residual_out, T, chunks, threads_for(4), eps, stream);
  return launch_rms<0, kResidual, WT>(x, residual, weight, out, residual_out, T, chunks, kRmsMaxThreads, eps, stream);
}

// ---------------------------------------------------------------------------------------------
// GEMV / skinny GEMM (T <= 64)
// ---------------------------------------------------------------------------------------------

constexpr int kLinearMaxTokens = 64;
constexpr int kRowsPerBlock = 16;  // one mma M tile of W rows per block
constexpr int kUnroll = 4;         // 32-wide k steps per load batch: 8 x 16-byte W loads in flight

// W is streamed once: bypass L1 (it would only evict x).
__device__ __forceinline__ uint4 ld_stream(const void* p) {
  return gptoss::ld_global_nc_na_v4(p);
}

// The fused QKV projection + RoPE + KV-cache append (kRope): where the rotated q, k and the v
// go. Positions and seq_ids as in gptoss/rope.h; inv (the YaRN inverse frequencies) by value.
struct QkvRopeParams {
  const int32_t* seq_ids;
  const int32_t* positions;
  __nv_bfloat16* q_out;    // [T, nq, 64]
  __nv_bfloat16* k_cache;  // [batch, S, nkv, 64]
  __nv_bfloat16* v_cache;
  int64_t batch;
  int64_t S;
  int nq;
  int nkv;
  float concentration;
  float inv[32];
};

// NT: 8-token tiles (T <= 8 * NT); WARPS: warps splitting K inside a block of 16 W rows.
// kRope: the block's 16 rows are a head's quarter of rotation pairs (dense::qkv_rope_row) and the
// epilogue rotates them and writes q_out and the cache (out is unused); N = (nq + 2 nkv) * 64.
// PDL: the block's W rows start towards L2 before the wait (weights: no kernel writes them);
// x and everything written goes after it.
template <int NT, int WARPS, bool kRope>
__global__ void __launch_bounds__(32 * WARPS, 16 / WARPS) linear_gemv_kernel(
    const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ w, const __nv_bfloat16* __restrict__ bias,
    void* __restrict__ out, int out_fp32, int T, int N, int K, const QkvRopeParams rp) {
  namespace d = gptoss::dense;
  __shared__ float red[WARPS][NT * 4][32];
  __shared__ float ep[kRope ? NT * 8 : 1][17];  // kRope: bf16-rounded outputs [token][local row]
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock;
  auto w_row = [&](int r) -> int64_t {  // W row of local row r (rows past N read row N-1: not stored)
    if constexpr (kRope) return d::qkv_rope_row(blockIdx.x, r);
    return min(n0 + r, static_cast<int64_t>(N) - 1);
  };
  if constexpr (kRope) {
    if (threadIdx.x < 2) gptoss::pdl::prefetch_l2(w + w_row(8 * threadIdx.x) * K, 8u * K * 2u);
  } else {
    // (capped at 256 KB: a hint; the proj and unembedding tiles are 92 KB)
    const int64_t bytes = min(static_cast<int64_t>(kRowsPerBlock), N - n0) * K * 2;
    if (threadIdx.x == 0) gptoss::pdl::prefetch_l2(w + n0 * K, static_cast<uint32_t>(min(bytes, int64_t{1} << 18)));
  }
  gptoss::pdl::wait();
  gptoss::pdl::launch_dependents();

  const int64_t r0 = w_row(d::gemv_w_row(lane, 0));
  const int64_t r1 = w_row(d::gemv_w_row(lane, 1));
  const int kq = d::gemv_chunk_k(lane);
  const __nv_bfloat16* w0 = w + r0 * K + kq;
  const __nv_bfloat16* w1 = w + r1 * K + kq;
  const int tok = d::gemv_x_token(lane);
  const __nv_bfloat16* xq = x + static_cast<int64_t>(tok) * K + kq;

  const int steps = (K + 31) / 32;
  const int s_begin = steps * warp / WARPS, s_end = steps * (warp + 1) / WARPS;

  float acc[NT][4];
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[j][c] = 0.f;

  // x is the previous kernel's output (PDL): L2-coherent loads (.cg), never the non-coherent path.
  // small NT: the x chunks are loaded with the W chunks (their latency overlaps the DRAM wait);
  // large NT: loaded next to their mma (registers).
  constexpr bool kHoistX = NT <= 2;
  for (int s = s_begin; s < s_end; s += kUnroll) {
    uint4 a[kUnroll], b[kUnroll];
    uint4 xs[kUnroll][kHoistX ? NT : 1];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int k = (s + u) * 32;
      a[u] = b[u] = make_uint4(0, 0, 0, 0);
      if (s + u < s_end && k + kq < K) {
        a[u] = ld_stream(w0 + k);
        b[u] = ld_stream(w1 + k);
      }
    }
    if constexpr (kHoistX) {
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          const int k = (s + u) * 32;
          xs[u][j] = make_uint4(0, 0, 0, 0);
          if (s + u < s_end && j * 8 + tok < T && k + kq < K)
            xs[u][j] = __ldcg(reinterpret_cast<const uint4*>(xq + static_cast<int64_t>(j * 8) * K + k));
        }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int k = (s + u) * 32;
      if (s + u < s_end) {  // warp-uniform
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          uint4 xv = make_uint4(0, 0, 0, 0);
          if constexpr (kHoistX) {
            xv = xs[u][j];
          } else if (j * 8 + tok < T && k + kq < K) {
            xv = __ldcg(reinterpret_cast<const uint4*>(xq + static_cast<int64_t>(j * 8) * K + k));
          }
          mma_bf16_16816(acc[j], a[u].x, b[u].x, a[u].y, b[u].y, xv.x, xv.y);
          mma_bf16_16816(acc[j], a[u].z, b[u].z, a[u].w, b[u].w, xv.z, xv.w);
        }
      }
    }
  }

#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int c = 0; c < 4; ++c) red[warp][j * 4 + c][lane] = acc[j][c];
  __syncthreads();
  for (int e = threadIdx.x; e < NT * 4 * 32; e += 32 * WARPS) {
    const int l = e & 31, jc = e >> 5, j = jc >> 2, c = jc & 3;
    const int r = d::gemv_c_row(l, c);
    const int64_t row = kRope ? w_row(r) : n0 + r;
    const int t = j * 8 + d::gemv_c_token(l, c);
    if (row >= N || t >= T) continue;
    float v = 0.f;
#pragma unroll
    for (int q = 0; q < WARPS; ++q) v += red[q][jc][l];
    if (bias != nullptr) v += __bfloat162float(bias[row]);
    if constexpr (kRope) {
      ep[t][r] = bf16_round(v);  // the unfused path's bf16 qkv value
      continue;
    }
    const int64_t o = static_cast<int64_t>(t) * N + row;
    if (out_fp32)
      static_cast<float*>(out)[o] = v;
    else
      static_cast<__nv_bfloat16*>(out)[o] = __float2bfloat16_rn(v);
  }
  if constexpr (kRope) {
    // one thread per token: the 8 pairs (dims 8 quarter + i, 32 + 8 quarter + i) of this block's
    // head, rotated for q and k (the same fp32 math as rope_kernel), copied for v
    __syncthreads();
    const int head = static_cast<int>(blockIdx.x >> 2), quarter = static_cast<int>(blockIdx.x & 3);
    for (int t = threadIdx.x; t < T; t += 32 * WARPS) {
      float y1[8], y2[8];
      __nv_bfloat16* dst;
      if (head < rp.nq + rp.nkv) {
        const int32_t pos = rp.positions[t];
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          float cs, sn;
          gptoss::rope_cos_sin(pos, rp.inv[8 * quarter + i], rp.concentration, &cs, &sn);
          gptoss::rope_rotate_pair(ep[t][i], ep[t][8 + i], cs, sn, &y1[i], &y2[i]);
        }
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          y1[i] = ep[t][i];
          y2[i] = ep[t][8 + i];
        }
      }
      if (head < rp.nq) {
        dst = rp.q_out + (static_cast<int64_t>(t) * rp.nq + head) * 64;
      } else {
        const int32_t seq = rp.seq_ids[t];
        if (seq < 0 || seq >= rp.batch) continue;  // no cache row: q only
        const bool is_k = head < rp.nq + rp.nkv;
        const int kvh = is_k ? head - rp.nq : head - rp.nq - rp.nkv;
        const int64_t slot_row = (static_cast<int64_t>(seq) * rp.S + gptoss::cache_slot(rp.positions[t], rp.S)) * rp.nkv;
        dst = (is_k ? rp.k_cache : rp.v_cache) + (slot_row + kvh) * 64;
      }
      reinterpret_cast<uint4*>(dst)[quarter] = pack_bf16x8(y1);
      reinterpret_cast<uint4*>(dst)[4 + quarter] = pack_bf16x8(y2);
    }
  }
}

// kRope: blocks = N / 16 (whole heads); rp is ignored otherwise.
template <int NT, bool kRope>
cudaError_t launch_linear(const void* x, const void* w, const void* bias, void* out, int out_fp32, int T, int N, int K,
                          const QkvRopeParams& rp, cudaStream_t stream) {
  const int64_t blocks = (static_cast<int64_t>(N) + kRowsPerBlock - 1) / kRowsPerBlock;
  const auto* xb = static_cast<const __nv_bfloat16*>(x);
  const auto* wb = static_cast<const __nv_bfloat16*>(w);
  const auto* bb = static_cast<const __nv_bfloat16*>(bias);
  // few row tiles (the projections): more warps per tile keep enough loads in flight per SM
  if (blocks < 1024)
    return gptoss::pdl::launch(linear_gemv_kernel<NT, 8, kRope>, dim3(static_cast<unsigned>(blocks)), dim3(256), 0,
                               stream, true, xb, wb, bb, out, out_fp32, T, N, K, rp);
  return gptoss::pdl::launch(linear_gemv_kernel<NT, 4, kRope>, dim3(static_cast<unsigned>(blocks)), dim3(128), 0,
                             stream, true, xb, wb, bb, out, out_fp32, T, N, K, rp);
}

template <bool kRope>
cudaError_t dispatch_linear(const void* x, const void* w, const void* bias, void* out, int out_fp32, int T, int N,
                            int K, const QkvRopeParams& rp, cudaStream_t stream) {
  if (T <= 8) return launch_linear<1, kRope>(x, w, bias, out, out_fp32, T, N, K, rp, stream);
  if (T <= 16) return launch_linear<2, kRope>(x, w, bias, out, out_fp32, T, N, K, rp, stream);
  if (T <= 32) return launch_linear<4, kRope>(x, w, bias, out, out_fp32, T, N, K, rp, stream);
  return launch_linear<8, kRope>(x, w, bias, out, out_fp32, T, N, K, rp, stream);
}

// ---------------------------------------------------------------------------------------------
// Greedy argmax over float32 logits [B, V]: slices of kArgmaxSlice per block, then one warp per
// row over the slices' (value, index) partials.
// ---------------------------------------------------------------------------------------------

constexpr int kArgmaxThreads = 256;
constexpr int kArgmaxSlice = 8192;

__device__ __forceinline__ void argmax_warp(float& v, int& i) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, v, o);
    const int oi = __shfl_xor_sync(0xffffffffu, i, o);
    if (gptoss::dense::argmax_better(ov, oi, v, i)) {
      v = ov;
      i = oi;
    }
  }
}

__global__ void __launch_bounds__(kArgmaxThreads) argmax_slices_kernel(const float* __restrict__ logits, int V,
                                                                         int slices, float2* __restrict__ part) {
  __shared__ float sv[kArgmaxThreads / 32];
  __shared__ int si[kArgmaxThreads / 32];
  gptoss::pdl::wait();  // logits: the unembedding's output
  gptoss::pdl::launch_dependents();
  const int b = blockIdx.y, p = blockIdx.x;
  const float* row = logits + static_cast<int64_t>(b) * V;
  const int begin = p * kArgmaxSlice, end = min(V, begin + kArgmaxSlice);
  float v = -INFINITY;
  int i = 0x7fffffff;
#pragma unroll 8
  for (int j = begin + threadIdx.x; j < end; j += kArgmaxThreads) {
    const float x = __ldcg(row + j);
    if (gptoss::dense::argmax_better(x, j, v, i)) {
      v = x;
      i = j;
    }
  }
  argmax_warp(v, i);
  if ((threadIdx.x & 31) == 0) {
    sv[threadIdx.x >> 5] = v;
    si[threadIdx.x >> 5] = i;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kArgmaxThreads / 32; ++w)
      if (gptoss::dense::argmax_better(sv[w], si[w], v, i)) {
        v = sv[w];
        i = si[w];
      }
    part[static_cast<int64_t>(b) * slices + p] = make_float2(v, __int_as_float(i));
  }
}

__global__ void __launch_bounds__(32) argmax_rows_kernel(const float2* __restrict__ part, int slices,
                                                          int64_t* __restrict__ out) {
  gptoss::pdl::wait();
  gptoss::pdl::launch_dependents();
  const int b = blockIdx.x;
  float v = -INFINITY;
  int i = 0x7fffffff;
  for (int p = threadIdx.x; p < slices; p += 32) {
    const float2 q = __ldcg(part + static_cast<int64_t>(b) * slices + p);
    const int qi = __float_as_int(q.y);
    if (gptoss::dense::argmax_better(q.x, qi, v, i)) {
      v = q.x;
      i = qi;
    }
  }
  argmax_warp(v, i);
  if (threadIdx.x == 0) out[b] = i;
}

}  // namespace

GPTOSS_API gptoss_status gptoss_rms_norm_bf16(const void* x, const void* residual, const void* weight,
                                              int weight_fp32, void* out, void* residual_out, int64_t T,
                                              int64_t H, float eps, cudaStream_t stream) {
  GPTOSS_REQUIRE(T >= 0, "rms_norm: T must be >= 0");
  GPTOSS_REQUIRE(H > 0 && H % 8 == 0, "rms_norm: H must be a positive multiple of 8");
  GPTOSS_REQUIRE(H / 8 <= INT32_MAX, "rms_norm: H too large");
  GPTOSS_REQUIRE(T <= 0x7fffffff, "rms_norm: T too large (at most 2^31 - 1 rows)");
  if (T == 0) return GPTOSS_OK;
  GPTOSS_REQUIRE(x && weight && out, "rms_norm: null pointer");
  GPTOSS_REQUIRE(!residual || residual_out, "rms_norm: residual_out is required with residual");
  GPTOSS_REQUIRE(gptoss::aligned(x, 16) && gptoss::aligned(out, 16) && gptoss::aligned(weight, 16) &&
                     (!residual || (gptoss::aligned(residual, 16) && gptoss::aligned(residual_out, 16))),
                 "rms_norm: x, residual, residual_out, weight and out must be 16-byte aligned");
  const int chunks = static_cast<int>(H / 8);
  cudaError_t err;
  if (residual)
    err = weight_fp32 ? dispatch_rms<true, float>(x, residual, weight, out, residual_out, T, chunks, eps, stream)
                      : dispatch_rms<true, __nv_bfloat16>(x, residual, weight, out, residual_out, T, chunks, eps, stream);
  else
    err = weight_fp32 ? dispatch_rms<false, float>(x, nullptr, weight, out, nullptr, T, chunks, eps, stream)
                      : dispatch_rms<false, __nv_bfloat16>(x, nullptr, weight, out, nullptr, T, chunks, eps, stream);
  GPTOSS_CUDA_TRY(err, "rms_norm_bf16 launch");
  return GPTOSS_OK;
}

GPTOSS_API int64_t gptoss_linear_bf16_max_tokens(void) { return kLinearMaxTokens; }

GPTOSS_API gptoss_status gptoss_linear_bf16(const void* x, const void* weight, const void* bias, void* out,
                                            int out_fp32, int64_t T, int64_t N, int64_t K,
                                            cudaStream_t stream) {
  GPTOSS_REQUIRE(T >= 0 && T <= kLinearMaxTokens, "linear: T must be in [0, 64] (use cuBLAS above)");
  GPTOSS_REQUIRE(N >= 1 && N <= INT32_MAX - kRowsPerBlock, "linear: N must be in [1, 2^31 - 17]");
  GPTOSS_REQUIRE(K > 0 && K % 8 == 0 && K <= INT32_MAX - 64, "linear: K must be a positive multiple of 8");
  if (T == 0) return GPTOSS_OK;
  GPTOSS_REQUIRE(x && weight && out, "linear: null pointer");
  GPTOSS_REQUIRE(gptoss::aligned(x, 16) && gptoss::aligned(weight, 16),
                 "linear: x and weight must be 16-byte aligned");
  GPTOSS_REQUIRE(gptoss::aligned(out, out_fp32 ? 4 : 2) && (!bias || gptoss::aligned(bias, 2)),
                 "linear: out and bias must be aligned to their element size");
  const QkvRopeParams none = {};
  GPTOSS_CUDA_TRY(dispatch_linear<false>(x, weight, bias, out, out_fp32 ? 1 : 0, static_cast<int>(T), static_cast<int>(N),
                                         static_cast<int>(K), none, stream),
                  "linear_bf16 launch");
  return GPTOSS_OK;
}

GPTOSS_API gptoss_status gptoss_linear_qkv_rope_append_bf16(
    const void* x, const void* weight, const void* bias, const int32_t* seq_ids, const int32_t* positions, void* q_out,
    void* k_cache, void* v_cache, int64_t T, int64_t K, int num_q_heads, int num_kv_heads, int head_dim, int64_t batch,
    int64_t cache_size, const float* inv_freq, float concentration, cudaStream_t stream) {
  GPTOSS_REQUIRE(T >= 0 && T <= kLinearMaxTokens, "linear_qkv_rope_append: T must be in [0, 64]");
  GPTOSS_REQUIRE(head_dim == 64, "linear_qkv_rope_append: head_dim must be 64");
  GPTOSS_REQUIRE(num_q_heads >= 1 && num_kv_heads >= 1 && num_q_heads <= 4096 && num_kv_heads <= 4096,
                 "linear_qkv_rope_append: num_q_heads and num_kv_heads must be in [1, 4096]");
  GPTOSS_REQUIRE(K > 0 && K % 8 == 0 && K <= (1 << 24), "linear_qkv_rope_append: K must be a positive multiple of 8");
  GPTOSS_REQUIRE(batch >= 0 && cache_size >= 1, "linear_qkv_rope_append: batch must be >= 0, cache_size >= 1");
  GPTOSS_REQUIRE(inv_freq != nullptr, "linear_qkv_rope_append: inv_freq (host, head_dim / 2 floats) is required");
  if (T == 0) return GPTOSS_OK;
  GPTOSS_REQUIRE(x && weight && seq_ids && positions && q_out && (batch == 0 || (k_cache && v_cache)),
                 "linear_qkv_rope_append: null pointer");
  GPTOSS_REQUIRE(gptoss::aligned(x, 16) && gptoss::aligned(weight, 16) && gptoss::aligned(q_out, 16) &&
                     gptoss::aligned(k_cache, 16) && gptoss::aligned(v_cache, 16) && (!bias || gptoss::aligned(bias, 2)),
                 "linear_qkv_rope_append: x, weight, q_out, k_cache and v_cache must be 16-byte aligned");
  QkvRopeParams rp = {};
  rp.seq_ids = seq_ids;
  rp.positions = positions;
  rp.q_out = static_cast<__nv_bfloat16*>(q_out);
  rp.k_cache = static_cast<__nv_bfloat16*>(k_cache);
  rp.v_cache = static_cast<__nv_bfloat16*>(v_cache);
  rp.batch = batch;
  rp.S = cache_size;
  rp.nq = num_q_heads;
  rp.nkv = num_kv_heads;
  rp.concentration = concentration;
  for (int j = 0; j < 32; ++j) rp.inv[j] = inv_freq[j];
  const int N = (num_q_heads + 2 * num_kv_heads) * 64;
  GPTOSS_CUDA_TRY(dispatch_linear<true>(x, weight, bias, nullptr, 0, static_cast<int>(T), N, static_cast<int>(K), rp,
                                        stream),
                  "linear_qkv_rope_append launch");
  return GPTOSS_OK;
}

GPTOSS_API size_t gptoss_argmax_f32_workspace_size(int64_t B, int64_t V) {
  if (B <= 0 || V <= 0) return 0;
  return static_cast<size_t>(B) * static_cast<size_t>((V + kArgmaxSlice - 1) / kArgmaxSlice) * sizeof(float2);
}

GPTOSS_API gptoss_status gptoss_argmax_f32(const float* logits, int64_t B, int64_t V, int64_t* out,
                                           void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  GPTOSS_REQUIRE(B >= 0 && B <= 65535, "argmax: B must be in [0, 65535]");
  GPTOSS_REQUIRE(V >= 1 && V <= INT32_MAX - kArgmaxSlice, "argmax: V must be in [1, 2^31 - 8193]");
  if (B == 0) return GPTOSS_OK;
  GPTOSS_REQUIRE(logits && out && workspace, "argmax: null pointer");
  GPTOSS_REQUIRE(workspace_bytes >= gptoss_argmax_f32_workspace_size(B, V),
                 "argmax: workspace smaller than gptoss_argmax_f32_workspace_size(B, V)");
  GPTOSS_REQUIRE(gptoss::aligned(logits, 4) && gptoss::aligned(out, 8) && gptoss::aligned(workspace, 8),
                 "argmax: logits 4-byte, out and workspace 8-byte aligned");
  const int slices = static_cast<int>((V + kArgmaxSlice - 1) / kArgmaxSlice);
  auto* part = static_cast<float2*>(workspace);
  GPTOSS_CUDA_TRY(gptoss::pdl::launch(argmax_slices_kernel, dim3(slices, static_cast<unsigned>(B)),
                                      dim3(kArgmaxThreads), 0, stream, true, logits, static_cast<int>(V), slices, part),
                  "argmax_f32 launch");
  GPTOSS_CUDA_TRY(gptoss::pdl::launch(argmax_rows_kernel, dim3(static_cast<unsigned>(B)), dim3(32), 0, stream, true,
                                      static_cast<const float2*>(part), slices, out),
                  "argmax_f32 launch");
  return GPTOSS_OK;
}
