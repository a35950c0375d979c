// MXFP4 mixture of experts, prefill regime (gptoss/moe_prefill.h): device-side grouping of routed
// rows by expert, two grouped GEMMs (one launch each, covering every expert) with MXFP4 -> bf16
// dequantization inside the main loop and fused epilogues, and a deterministic combine.
//
// GEMM variant MMA_SYNC (this file, grouped_gemm_mma_kernel): 256 threads, tile 128x128x64,
// 3-stage cp.async pipeline of A (bf16 rows, gathered by the permutation) and of the packed
// MXFP4 bytes of B; per k-tile the whole block converts the packed B tile to bf16 in a swizzled
// shared-memory tile, then 8 warps (2 x 4, warp tile 64x32) run mma.sync m16n8k16 bf16 with fp32
// accumulators. A persistent grid walks the (expert, m-tile, n-tile) work list of
// gemm_grouped.cuh. The expert weights are never dequantized to global memory.
// GEMM variant WGMMA (grouped_gemm_wgmma_kernel, sm_90a): same structure, tile 128 x BN x 64,
// 2 warpgroups issuing wgmma m64nBNk16 from 128-byte-swizzled shared-memory tiles, 4 stages,
// 2 dequantized-B buffers; BN = 192 (WGMMA), 128 (WGMMA_N128) or 256 (WGMMA_N256).
// GPTOSS_MOE_PREFILL_AUTO picks MMA_SYNC until the wgmma variant has been verified on a GPU.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <mutex>
#include <string>
#include <vector>

#include "arch.cuh"
#include "pdl.cuh"
#include "ptx.cuh"
#include "activation.cuh"
#include "common.cuh"
#include "gemm_grouped.cuh"
#include "gemm_wgmma.cuh"
#include "gptoss/moe_prefill.h"

namespace {
using gptoss::cp_async_commit;
using gptoss::cp_async_wait;
using gptoss::mma_bf16_16816;

using namespace gptoss::grouped;

constexpr int kChunk = 1024;       // routed rows per grouping block (one per thread)
constexpr int kMaxExperts = 256;
constexpr int kMaxK = 16;          // experts per token

// ---------------------------------------------------------------------------------------------
// 1. grouping (chunked stable counting sort, see gemm_grouped.cuh)
// ---------------------------------------------------------------------------------------------

// chunk_counts[c][e] = rows of chunk c routed to expert e. Ids outside [0, E) are ignored (the
// op validates them; an invalid id then leaves its row's output undefined but in bounds).
__global__ __launch_bounds__(kChunk) void route_count_kernel(const int32_t* __restrict__ ids, int rows, int E,
                                                             int32_t* __restrict__ chunk_counts) {
  __shared__ int32_t hist[kMaxExperts];
  for (int e = threadIdx.x; e < E; e += blockDim.x) hist[e] = 0;
  __syncthreads();
  const int r = blockIdx.x * kChunk + threadIdx.x;
  if (r < rows) {
    const int e = ids[r];
    if (static_cast<unsigned>(e) < static_cast<unsigned>(E)) atomicAdd(&hist[e], 1);  // integer: exact
  }
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x) chunk_counts[blockIdx.x * E + e] = hist[e];
}

// Exclusive scan of one value per thread over a block of kMaxExperts threads; returns the total
// through *total.
__device__ int32_t block_exclusive_scan(int32_t v, int32_t* scratch /* [kMaxExperts/32] */, int32_t* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int32_t incl = v;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const int32_t o = __shfl_up_sync(0xffffffffu, incl, d);
    if (lane >= d) incl += o;
  }
  if (lane == 31) scratch[warp] = incl;
  __syncthreads();
  int32_t warp_base = 0, all = 0;
#pragma unroll
  for (int w = 0; w < kMaxExperts / 32; ++w) {
    const int32_t s = scratch[w];
    if (w < warp) warp_base += s;
    all += s;
  }
  __syncthreads();
  *total = all;
  return warp_base + incl - v;
}

// One block of kMaxExperts threads. chunk_base [num_chunks][E]: counts in, absolute bases out.
__global__ __launch_bounds__(kMaxExperts) void route_scan_kernel(int32_t* __restrict__ chunk_base, int num_chunks,
                                                                 int E, int bm, int32_t* __restrict__ counts,
                                                                 int32_t* __restrict__ offsets,
                                                                 int32_t* __restrict__ tile_off) {
  __shared__ int32_t scratch[kMaxExperts / 32];
  const int e = threadIdx.x;
  const int32_t c = e < E ? scan_chunks_for_expert(chunk_base, num_chunks, E, e) : 0;
  int32_t total_rows, total_tiles;
  const int32_t off = block_exclusive_scan(c, scratch, &total_rows);
  const int32_t toff = block_exclusive_scan(e < E ? mtiles(c, bm) : 0, scratch, &total_tiles);
  if (e < E) {
    counts[e] = c;
    offsets[e] = off;
    tile_off[e] = toff;
    for (int ch = 0; ch < num_chunks; ++ch) chunk_base[ch * E + e] += off;
  }
  if (e == 0) {
    offsets[E] = total_rows;
    tile_off[E] = total_tiles;
  }
}

// perm[chunk_base[c][e] + (rank of row r among chunk c's rows of expert e)] = r.
__global__ __launch_bounds__(kChunk) void route_scatter_kernel(const int32_t* __restrict__ ids, int rows, int E,
                                                               const int32_t* __restrict__ chunk_base,
                                                               int32_t* __restrict__ perm) {
  __shared__ int32_t warp_cnt[(kChunk / 32) * kMaxExperts];  // [warp][e]
  for (int i = threadIdx.x; i < (kChunk / 32) * E; i += kChunk) warp_cnt[i] = 0;
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int r = blockIdx.x * kChunk + threadIdx.x;
  int e = r < rows ? ids[r] : -1;
  const bool valid = static_cast<unsigned>(e) < static_cast<unsigned>(E);
  if (!valid) e = -1;
  const unsigned peers = __match_any_sync(0xffffffffu, e);
  const int rank = __popc(peers & ((1u << lane) - 1u));  // earlier lanes of the same expert
  if (valid && rank == 0) warp_cnt[warp * E + e] = __popc(peers);
  __syncthreads();
  for (int x = threadIdx.x; x < E; x += kChunk) {  // exclusive scan over warps, in warp order
    int32_t run = chunk_base[blockIdx.x * E + x];
    for (int w = 0; w < kChunk / 32; ++w) {
      const int32_t n = warp_cnt[w * E + x];
      warp_cnt[w * E + x] = run;
      run += n;
    }
  }
  __syncthreads();
  if (valid) perm[warp_cnt[warp * E + e] + rank] = r;
}

// ---------------------------------------------------------------------------------------------
// 2/3. grouped GEMM, mma.sync variant
// ---------------------------------------------------------------------------------------------

enum Epilogue { kSwiglu = 0, kWeightedScatter = 1 };

struct GemmParams {
  const __nv_bfloat16* A;  // mlp1: x [T, K]; mlp2: act [T*k, K] (grouped order)
  const uint8_t* Wq;       // [E, N, K/32, 16]
  const uint8_t* Ws;       // [E, N, K/32]
  const __nv_bfloat16* bias;  // [E, N]
  const int32_t* counts;
  const int32_t* offsets;
  const int32_t* tile_off;
  const int32_t* perm;
  const float* topk_w;     // [T*k]
  __nv_bfloat16* C;        // mlp1: act [T*k, N/2]; mlp2: y [T*k, N]
  int N, K, E, topk;
  float alpha, limit;
};

namespace mma {
constexpr int BM = 128, BN = 128, BK = 64, STAGES = 3, THREADS = 256;
constexpr int A_STAGE = BM * BK * 2;   // bytes, bf16 [BM][BK] swizzled
constexpr int BQ_STAGE = BN * BK / 2;  // packed MXFP4 bytes [BN][BK/2]
constexpr int BDQ = BN * BK * 2;       // bf16 [BN][BK] swizzled
constexpr int FIXED_SMEM = STAGES * (A_STAGE + BQ_STAGE) + BDQ;  // then scales [BN][G], tile_off [E+1]

__host__ __device__ constexpr int smem_bytes(int G, int E) { return FIXED_SMEM + BN * G + 4 * (E + 1) + 16; }
}  // namespace mma

// byte offset of 16-byte chunk `c` (0..7) of row `r` in a [rows][64] bf16 tile (128 B rows):
// chunks are XOR-swizzled by the row so ldmatrix's 8 rows of one chunk hit 8 different bank groups.
__device__ __forceinline__ uint32_t swz(int r, int c) { return r * 128 + ((c ^ (r & 7)) << 4); }

__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool pred) {
  gptoss::cp_async_cg16(dst, src, pred ? 16 : 0);
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  gptoss::ldmatrix_x4_b16(r, addr);
}

__device__ __forceinline__ uint32_t bf16x2_mul(uint32_t a, uint32_t b) {
  return gptoss::mul_rn_bf16x2(a, b);
}

// 16 packed bytes (32 E2M1 codes) x 2^(s-127) -> 32 bf16 (4 x 16 bytes), exact (gemm_grouped.cuh).
__device__ __forceinline__ void dequant_block32(const uint4 packed, uint32_t scale_byte, uint32_t (&out)[16]) {
  const uint32_t sc = e8m0_to_bf16_bits(scale_byte) * 0x10001u;
  const uint32_t w[4] = {packed.x, packed.y, packed.z, packed.w};
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    uint32_t v[4];
    fp4x8_to_bf16x8(w[q], v);
#pragma unroll
    for (int i = 0; i < 4; ++i) out[4 * q + i] = bf16x2_mul(v[i], sc);
  }
}

__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

template <int EPI>
__global__ __launch_bounds__(mma::THREADS, 1) void grouped_gemm_mma_kernel(const GemmParams p) {
  using namespace mma;
  GPTOSS_DYNAMIC_SMEM(uint8_t, smem, 128);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp >> 2, warp_n = warp & 3;  // 2 x 4 warps, warp tile 64 x 32
  const int K = p.K, N = p.N, G = K / 32;
  const int KT = ceil_div(K, BK), NT = ceil_div(N, BN);

  const uint32_t s_base = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const uint32_t sA = s_base, sBq = sA + STAGES * A_STAGE, sBdq = sBq + STAGES * BQ_STAGE;
  uint8_t* const scales = smem + FIXED_SMEM;
  const uint32_t sS = s_base + FIXED_SMEM;
  int32_t* const s_toff = reinterpret_cast<int32_t*>(smem + ((FIXED_SMEM + BN * G + 15) & ~15));

  for (int e = tid; e <= p.E; e += THREADS) s_toff[e] = p.tile_off[e];
  __syncthreads();
  const int total = s_toff[p.E] * NT;

  for (int work = blockIdx.x; work < total; work += gridDim.x) {
    const Tile tile = decode_tile(s_toff, p.E, NT, work);
    const int e = tile.expert;
    const int group_base = p.offsets[e];
    const int m0 = tile.mtile * BM, n0 = tile.ntile * BN;
    const int rows = min(BM, p.counts[e] - m0);
    const int ncols = min(BN, N - n0);  // multiple of 32

    // A: this thread copies 16-byte chunk (tid & 7) of rows (tid >> 3) + 32 i.
    const int a_chunk = tid & 7;
    const __nv_bfloat16* a_src[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int row = (tid >> 3) + 32 * i;
      int64_t src_row = -1;
      if (row < rows) {
        const int gp = group_base + m0 + row;
        src_row = EPI == kSwiglu ? p.perm[gp] / p.topk : gp;
      }
      a_src[i] = src_row >= 0 ? p.A + src_row * K : nullptr;
    }
    // B: this thread copies MXFP4 block (tid & 1) of the k-tile for weight row (tid >> 1).
    const int b_row = tid >> 1, b_blk = tid & 1;
    const bool b_row_ok = b_row < ncols;
    const uint8_t* b_src = p.Wq + (static_cast<int64_t>(e) * N + n0 + (b_row_ok ? b_row : 0)) * G * 16;

    auto load_stage = [&](int stage, int kt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int row = (tid >> 3) + 32 * i;
        const int col = kt * BK + a_chunk * 8;
        const bool ok = a_src[i] != nullptr && col < K;
        cp_async16(sA + stage * A_STAGE + swz(row, a_chunk), ok ? a_src[i] + col : p.A, ok);
      }
      const int kb = kt * (BK / 32) + b_blk;
      const bool ok = b_row_ok && kb < G;
      cp_async16(sBq + stage * BQ_STAGE + b_row * (BK / 2) + b_blk * 16, ok ? b_src + kb * 16 : p.Wq, ok);
    };

    __syncthreads();  // every thread is done with the previous tile's shared memory
    {  // this tile's scales: rows n0..n0+ncols of expert e are one contiguous run of ncols*G bytes
      const uint8_t* src = p.Ws + (static_cast<int64_t>(e) * N + n0) * G;
      for (int i = tid * 16; i < ncols * G; i += THREADS * 16) cp_async16(sS + i, src + i, true);
    }
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
      if (s < KT) load_stage(s, s);
      cp_async_commit();
    }

    float acc[4][4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[i][j][c] = 0.f;

    for (int kt = 0; kt < KT; ++kt) {
      const int stage = kt % STAGES;
      cp_async_wait<STAGES - 2>();
      __syncthreads();  // stage kt landed for everyone; stage kt-1 and Bdq are free
      if (kt + STAGES - 1 < KT) load_stage((kt + STAGES - 1) % STAGES, kt + STAGES - 1);
      cp_async_commit();

      {  // dequantize this thread's block of the B tile into Bdq (zeros outside N and K)
        const int kb = kt * (BK / 32) + b_blk;
        uint32_t v[16];
        if (b_row_ok && kb < G) {
          const uint4 packed =
              *reinterpret_cast<const uint4*>(smem + (sBq - s_base) + stage * BQ_STAGE + b_row * (BK / 2) + b_blk * 16);
          dequant_block32(packed, scales[b_row * G + kb], v);
        } else {
#pragma unroll
          for (int i = 0; i < 16; ++i) v[i] = 0u;
        }
#pragma unroll
        for (int q = 0; q < 4; ++q)
          *reinterpret_cast<uint4*>(smem + (sBdq - s_base) + swz(b_row, b_blk * 4 + q)) =
              make_uint4(v[4 * q], v[4 * q + 1], v[4 * q + 2], v[4 * q + 3]);
      }
      __syncthreads();  // Bdq complete

      const uint32_t a_tile = sA + stage * A_STAGE;
      const bool has_rows = warp_m * 64 < rows;  // warps whose 64 rows are all padding skip the MMAs
#pragma unroll
      for (int kk = 0; kk < BK / 16 && has_rows; ++kk) {
        uint32_t a[4][4], b[4][2];
#pragma unroll
        for (int mi = 0; mi < 4; ++mi) {
          const int row = warp_m * 64 + mi * 16 + (lane & 15);
          ldmatrix_x4(a[mi], a_tile + swz(row, kk * 2 + (lane >> 4)));
        }
#pragma unroll
        for (int nj2 = 0; nj2 < 2; ++nj2) {
          const int n = warp_n * 32 + nj2 * 16 + (lane & 7) + ((lane >> 4) << 3);
          uint32_t r[4];
          ldmatrix_x4(r, sBdq + swz(n, kk * 2 + ((lane >> 3) & 1)));
          b[2 * nj2][0] = r[0];
          b[2 * nj2][1] = r[1];
          b[2 * nj2 + 1][0] = r[2];
          b[2 * nj2 + 1][1] = r[3];
        }
#pragma unroll
        for (int mi = 0; mi < 4; ++mi)
#pragma unroll
          for (int nj = 0; nj < 4; ++nj) mma_bf16_16816(acc[mi][nj], a[mi], b[nj][0], b[nj][1]);
      }
    }
    cp_async_wait<0>();  // nothing outstanding may target smem the next tile reuses

    // Epilogue straight from the accumulators. Thread holds columns (2c, 2c+1) of each n8 tile:
    // for mlp1 that is one (gate, linear) pair of the interleaved rows.
    const __nv_bfloat16* bias = p.bias + static_cast<int64_t>(e) * N;
#pragma unroll
    for (int mi = 0; mi < 4; ++mi) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = warp_m * 64 + mi * 16 + (lane >> 2) + 8 * h;
        if (row >= rows) continue;
        const int gp = group_base + m0 + row;
        int64_t out_row;
        float wgt = 1.f;
        if (EPI == kSwiglu) {
          out_row = gp;
        } else {
          out_row = p.perm[gp];
          wgt = p.topk_w[out_row];
        }
#pragma unroll
        for (int nj = 0; nj < 4; ++nj) {
          const int n = n0 + warp_n * 32 + nj * 8 + 2 * (lane & 3);
          if (n >= N) continue;
          const float2 bb = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(bias + n));
          const float z0 = acc[mi][nj][2 * h] + bb.x, z1 = acc[mi][nj][2 * h + 1] + bb.y;
          if (EPI == kSwiglu) {
            p.C[out_row * (N / 2) + n / 2] = __float2bfloat16_rn(gptoss::swiglu_clamped(z0, z1, p.alpha, p.limit));
          } else {
            *reinterpret_cast<uint32_t*>(p.C + out_row * N + n) = pack_bf16x2(z0 * wgt, z1 * wgt);
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// 2/3. grouped GEMM, wgmma variant (sm_90a)
// ---------------------------------------------------------------------------------------------
// Same work list, gathers, dequantization and epilogues as the mma.sync variant, tile 128 x BN x 64
// (BN = 128, 192 or 256). The bf16 A and B tiles ([rows][64] bf16, 128-byte rows, 16-byte chunk c
// of row r at c ^ (r & 7)) are exactly wgmma's K-major 128-byte-swizzle layout when each tile
// starts on a 1024-byte boundary, so the two warpgroups (tile rows 0-63 and 64-127) issue wgmma
// m64nBNk16 with both operands in shared memory. 4 A / packed-B stages with prefetch distance 2
// and 2 dequantized-B buffers let the wgmma group of k-tile kt-1 run while the threads
// dequantize k-tile kt. (Bytes per k from L2 per 128 x BN MACs: 256 + BN/2: a wider BN lowers
// the L2 traffic of A; BN = 192 divides 2I = 5760 and H = 2880 exactly.)
namespace wg {
constexpr int BM = 128, BK = 64, STAGES = 4, THREADS = 256;
[[maybe_unused]] constexpr int DIST = 2;  // (unused where the wgmma kernel is a stub: sm_80..89 code)
constexpr int A_STAGE = BM * BK * 2;
template <int BN>
struct Cfg {
  static constexpr int BQ_STAGE = BN * BK / 2;
  static constexpr int BDQ = BN * BK * 2;
  static constexpr int BLOCKS = BN * (BK / 32);                     // MXFP4 blocks per k-tile
  static constexpr int BLOCKS_PER_THREAD = (BLOCKS + THREADS - 1) / THREADS;
  // [A stages][Bdq x 2] (1024-aligned tiles), [Bq stages], then scales [BN][G], tile_off [E+1]
  static constexpr int FIXED_SMEM = STAGES * A_STAGE + 2 * BDQ + STAGES * BQ_STAGE;
  static constexpr int smem_bytes(int G, int E) { return 1024 + FIXED_SMEM + BN * G + 4 * (E + 1) + 16; }
};
}  // namespace wg
static_assert(wg::Cfg<128>::BLOCKS_PER_THREAD == 1 && wg::Cfg<192>::BLOCKS_PER_THREAD == 2 &&
                  wg::Cfg<256>::BLOCKS_PER_THREAD == 2 && wg::Cfg<256>::BLOCKS == 512,
              "one or two packed-B blocks per thread and k-tile");

// Everything one work item (expert, m-tile, n-tile) needs for its loads and its epilogue.
template <int BN>
struct WgTile {
  int e, group_base, m0, n0, rows, ncols;
  const __nv_bfloat16* a_src[4];                      // this thread's 4 A rows (nullptr: padding)
  const uint8_t* b_src[wg::Cfg<BN>::BLOCKS_PER_THREAD];  // this thread's packed-B weight rows
  bool b_ok[wg::Cfg<BN>::BLOCKS_PER_THREAD];
};

template <int EPI, int BN>
__device__ __forceinline__ void wg_setup_tile(WgTile<BN>& t, const GemmParams& p, const int32_t* s_toff, int NT,
                                              int work, int tid) {
  using C = wg::Cfg<BN>;
  const int K = p.K, N = p.N, G = K / 32;
  const Tile tile = decode_tile(s_toff, p.E, NT, work);
  t.e = tile.expert;
  t.group_base = p.offsets[t.e];
  t.m0 = tile.mtile * wg::BM;
  t.n0 = tile.ntile * BN;
  t.rows = min(wg::BM, p.counts[t.e] - t.m0);
  t.ncols = min(BN, N - t.n0);  // multiple of 32
  // A: this thread copies 16-byte chunk (tid & 7) of rows (tid >> 3) + 32 i.
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int row = (tid >> 3) + 32 * i;
    int64_t src_row = -1;
    if (row < t.rows) {
      const int gp = t.group_base + t.m0 + row;
      src_row = EPI == kSwiglu ? p.perm[gp] / p.topk : gp;
    }
    t.a_src[i] = src_row >= 0 ? p.A + src_row * K : nullptr;
  }
  // B: this thread copies (and later dequantizes) MXFP4 blocks tid + 256 i of each k-tile:
  // weight row blk >> 1, block blk & 1 of the k-tile's two.
#pragma unroll
  for (int i = 0; i < C::BLOCKS_PER_THREAD; ++i) {
    const int blk = tid + wg::THREADS * i, row = blk >> 1;
    t.b_ok[i] = blk < C::BLOCKS && row < t.ncols;
    t.b_src[i] = p.Wq + (static_cast<int64_t>(t.e) * N + t.n0 + (t.b_ok[i] ? row : 0)) * G * 16;
  }
}

template <int BN>
__device__ __forceinline__ void wg_load_stage(const WgTile<BN>& t, const GemmParams& p, uint32_t sA, uint32_t sBq,
                                              int stage, int kt, int tid) {
  using C = wg::Cfg<BN>;
  const int K = p.K, G = K / 32;
  const int a_chunk = tid & 7;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int row = (tid >> 3) + 32 * i;
    const int col = kt * wg::BK + a_chunk * 8;
    const bool ok = t.a_src[i] != nullptr && col < K;
    cp_async16(sA + stage * wg::A_STAGE + swz(row, a_chunk), ok ? t.a_src[i] + col : p.A, ok);
  }
#pragma unroll
  for (int i = 0; i < C::BLOCKS_PER_THREAD; ++i) {
    const int blk = tid + wg::THREADS * i;
    if (blk < C::BLOCKS) {
      const int kb = kt * (wg::BK / 32) + (blk & 1);
      const bool ok = t.b_ok[i] && kb < G;
      cp_async16(sBq + stage * C::BQ_STAGE + blk * 16, ok ? t.b_src[i] + kb * 16 : p.Wq, ok);
    }
  }
}

// The tile's scales (rows n0..n0+ncols of expert e: one contiguous run of ncols*G bytes) and its
// first DIST k-tiles, as DIST cp.async groups (the scales in the first).
template <int BN>
__device__ __forceinline__ void wg_prologue(const WgTile<BN>& t, const GemmParams& p, uint32_t sA, uint32_t sBq,
                                            uint32_t sS, int KT, int tid) {
  const int G = p.K / 32;
  const uint8_t* src = p.Ws + (static_cast<int64_t>(t.e) * p.N + t.n0) * G;
  for (int i = tid * 16; i < t.ncols * G; i += wg::THREADS * 16) cp_async16(sS + i, src + i, true);
#pragma unroll
  for (int s = 0; s < wg::DIST; ++s) {
    if (s < KT) wg_load_stage(t, p, sA, sBq, s, s, tid);
    cp_async_commit();
  }
}

template <int EPI, int BN>
__global__ __launch_bounds__(wg::THREADS, 1) void grouped_gemm_wgmma_kernel(const GemmParams p) {
#if GPTOSS_NO_WGMMA_CODE_PASS
  GPTOSS_UNAVAILABLE_KERNEL_BODY();  // sm_80..89 code: never launched there (run_step checks the arch)
#else
  using namespace wg;
  using C = Cfg<BN>;
  namespace W = gptoss::wgmma;
  GPTOSS_DYNAMIC_SMEM(uint8_t, smem_raw, 1024);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wgi = warp >> 2;  // warpgroup: tile rows 64 * wgi .. +63
  const int N = p.N, G = p.K / 32;
  const int KT = ceil_div(p.K, BK), NT = ceil_div(N, BN);

  // 1024-byte aligned base (128-byte swizzle atoms must start on 1024-byte boundaries)
  const uint32_t raw_base = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw));
  const uint32_t s_base = (raw_base + 1023u) & ~1023u;
  uint8_t* const smem = smem_raw + (s_base - raw_base);
  const uint32_t sA = s_base, sBdq = sA + STAGES * A_STAGE, sBq = sBdq + 2 * C::BDQ;
  uint8_t* const scales = smem + C::FIXED_SMEM;
  const uint32_t sS = s_base + C::FIXED_SMEM;
  int32_t* const s_toff = reinterpret_cast<int32_t*>(smem + ((C::FIXED_SMEM + BN * G + 15) & ~15));

  for (int e = tid; e <= p.E; e += THREADS) s_toff[e] = p.tile_off[e];
  __syncthreads();
  const int total = s_toff[p.E] * NT;

  // Persistent loop; the next work item's scales and first k-tiles are loaded while this one's
  // epilogue writes its results.
  int work = blockIdx.x;
  WgTile<BN> cur;
  if (work < total) {
    wg_setup_tile<EPI>(cur, p, s_toff, NT, work, tid);
    wg_prologue(cur, p, sA, sBq, sS, KT, tid);
  }
  while (work < total) {
    // (not zeroed: the first k-step overwrites it, scale-d 0; KT >= 1 as K >= 32)
    float acc[BN / 2];

    for (int kt = 0; kt < KT; ++kt) {
      const int stage = kt % STAGES, buf = kt & 1;
      cp_async_wait<DIST - 1>();  // this thread's copies of k-tile kt (and the scales) landed
      __syncthreads();            // ... everyone's; and every wgmma group <= kt-2 has completed
      if (kt + DIST < KT) wg_load_stage(cur, p, sA, sBq, (kt + DIST) % STAGES, kt + DIST, tid);
      cp_async_commit();
#pragma unroll
      for (int i = 0; i < C::BLOCKS_PER_THREAD; ++i) {  // the blocks this thread copied itself
        const int blk = tid + THREADS * i;
        if (blk >= C::BLOCKS) continue;
        const int row = blk >> 1, kb = kt * (BK / 32) + (blk & 1);
        uint32_t v[16];
        if (cur.b_ok[i] && kb < G) {
          const uint4 packed = *reinterpret_cast<const uint4*>(smem + (sBq - s_base) + stage * C::BQ_STAGE + blk * 16);
          dequant_block32(packed, scales[row * G + kb], v);
        } else {
#pragma unroll
          for (int q = 0; q < 16; ++q) v[q] = 0u;
        }
#pragma unroll
        for (int q = 0; q < 4; ++q)
          *reinterpret_cast<uint4*>(smem + (sBdq - s_base) + buf * C::BDQ + swz(row, (blk & 1) * 4 + q)) =
              make_uint4(v[4 * q], v[4 * q + 1], v[4 * q + 2], v[4 * q + 3]);
      }
      W::fence_proxy_async_smem();  // generic-proxy writes (Bdq stores, A cp.async) -> wgmma's async proxy
      __syncthreads();

      W::fence();
      const uint32_t a_tile = sA + stage * A_STAGE + wgi * 64 * 128;
      const uint32_t b_tile = sBdq + buf * C::BDQ;
      // (All 4 MMAs unconditionally: skipping them for a warpgroup whose rows are all padding made
      // ptxas serialize every HGMMA (C7519, a wait after each) - seen in the SASS, not kept.)
#pragma unroll
      for (int kk = 0; kk < BK / 16; ++kk)
        W::mma_m64k16(acc, W::desc_k_major_sw128(a_tile + kk * 32), W::desc_k_major_sw128(b_tile + kk * 32),
                      (kt > 0 || kk > 0) ? 1 : 0);
      W::commit();
      W::wait<1>();  // keep this k-tile's group in flight while the next one is dequantized
    }
    W::wait<0>();
    cp_async_wait<0>();  // (only empty groups can be outstanding here)

    // Start the next work item's loads: every warpgroup's MMAs and every dequantization of this
    // tile are done after this barrier, so its A stages, packed-B stages and scales are free.
    const int e = cur.e, group_base = cur.group_base, m0 = cur.m0, n0 = cur.n0, rows = cur.rows;
    const int next = work + gridDim.x;
    __syncthreads();
    if (next < total) {
      wg_setup_tile<EPI>(cur, p, s_toff, NT, next, tid);
      wg_prologue(cur, p, sA, sBq, sS, KT, tid);
    }

    // Epilogue: accumulator 4j + c holds row 16*(warp%4) + lane/4 + 8*(c/2) of this warpgroup's
    // 64 rows, column 8j + 2*(lane%4) + (c%2): (gate, linear) pairs stay in one thread.
    const __nv_bfloat16* bias = p.bias + static_cast<int64_t>(e) * N;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = wgi * 64 + 16 * (warp & 3) + (lane >> 2) + 8 * h;
      if (row >= rows) continue;
      const int gp = group_base + m0 + row;
      int64_t out_row;
      float wgt = 1.f;
      if (EPI == kSwiglu) {
        out_row = gp;
      } else {
        out_row = p.perm[gp];
        wgt = p.topk_w[out_row];
      }
#pragma unroll
      for (int j = 0; j < BN / 8; ++j) {
        const int n = n0 + 8 * j + 2 * (lane & 3);
        if (n >= N) continue;
        const float2 bb = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(bias + n));
        const float z0 = acc[4 * j + 2 * h] + bb.x, z1 = acc[4 * j + 2 * h + 1] + bb.y;
        if (EPI == kSwiglu) {
          p.C[out_row * (N / 2) + n / 2] = __float2bfloat16_rn(gptoss::swiglu_clamped(z0, z1, p.alpha, p.limit));
        } else {
          *reinterpret_cast<uint32_t*>(p.C + out_row * N + n) = pack_bf16x2(z0 * wgt, z1 * wgt);
        }
      }
    }
    work = next;
  }
#endif  // GPTOSS_NO_WGMMA_CODE_PASS
}

// ---------------------------------------------------------------------------------------------
// 4. combine: out[t] = sum_j y[t*k + j], slot order, fp32 (deterministic; no atomics)
// ---------------------------------------------------------------------------------------------

// A token holding an id outside [0, E) (its slot's y row was never written) gets a NaN row, as in
// the decode kernels.
__global__ void combine_kernel(const __nv_bfloat16* __restrict__ y, const int32_t* __restrict__ ids, int E,
                               __nv_bfloat16* __restrict__ out, int64_t T, int H, int k) {
  const int vec_per_row = H / 8;
  const int64_t n = T * vec_per_row;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = i / vec_per_row;
    const int c = static_cast<int>(i - t * vec_per_row);
    float acc[8];
#pragma unroll
    for (int q = 0; q < 8; ++q) acc[q] = 0.f;
    bool bad = false;
    for (int j = 0; j < k; ++j) bad |= static_cast<uint32_t>(ids[t * k + j]) >= static_cast<uint32_t>(E);
    if (bad) {
      const uint32_t nan2 = 0x7FC07FC0u;
      *reinterpret_cast<uint4*>(out + t * H + c * 8) = make_uint4(nan2, nan2, nan2, nan2);
      continue;
    }
    for (int j = 0; j < k; ++j) {
      const uint4 v = *reinterpret_cast<const uint4*>(y + (t * k + j) * H + c * 8);
      const __nv_bfloat162* h2 = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const float2 f = __bfloat1622float2(h2[q]);
        acc[2 * q] += f.x;
        acc[2 * q + 1] += f.y;
      }
    }
    uint4 o;
    o.x = pack_bf16x2(acc[0], acc[1]);
    o.y = pack_bf16x2(acc[2], acc[3]);
    o.z = pack_bf16x2(acc[4], acc[5]);
    o.w = pack_bf16x2(acc[6], acc[7]);
    *reinterpret_cast<uint4*>(out + t * H + c * 8) = o;
  }
}

// ---------------------------------------------------------------------------------------------
// host side
// ---------------------------------------------------------------------------------------------

size_t align256(size_t v) { return (v + 255) & ~static_cast<size_t>(255); }

int num_chunks(int64_t rows) { return static_cast<int>((rows + kChunk - 1) / kChunk); }

struct Problem {
  const void* x;
  const int32_t* topk_ids;
  const float* topk_weights;
  const uint8_t *w1_blocks, *w1_scales;
  const void* w1_bias;
  const uint8_t *w2_blocks, *w2_scales;
  const void* w2_bias;
  float alpha, limit;
  void* out;
  int64_t T, H, I, E, k;
  uint8_t* ws;
  size_t off[GPTOSS_MOE_WS_NUM_PARTS];
  template <typename P>
  P* part(int i) const { return reinterpret_cast<P*>(ws + off[i]); }
};

// Kernel, threads, dynamic shared memory and tile of one GEMM variant.
using GemmKernel = void (*)(const GemmParams);
struct GemmLaunch {
  GemmKernel fn;
  int threads, smem, bm, bn;
};

template <int EPI>
GemmLaunch gemm_launch(int variant, int G, int E) {
  switch (variant) {
    case GPTOSS_MOE_PREFILL_WGMMA:
      return {&grouped_gemm_wgmma_kernel<EPI, 192>, wg::THREADS,
              wg::Cfg<192>::smem_bytes(G, E), wg::BM, 192};
    case GPTOSS_MOE_PREFILL_WGMMA_N128:
      return {&grouped_gemm_wgmma_kernel<EPI, 128>, wg::THREADS,
              wg::Cfg<128>::smem_bytes(G, E), wg::BM, 128};
    case GPTOSS_MOE_PREFILL_WGMMA_N256:
      return {&grouped_gemm_wgmma_kernel<EPI, 256>, wg::THREADS,
              wg::Cfg<256>::smem_bytes(G, E), wg::BM, 256};
    default:
      return {&grouped_gemm_mma_kernel<EPI>, mma::THREADS, mma::smem_bytes(G, E),
              mma::BM, mma::BN};
  }
}

// Per (kernel, device, shared-memory size): the SM count and resident blocks per SM, after raising
// the kernel's dynamic shared-memory limit. Filled on first use (an eager call), so a later call
// being captured into a CUDA graph makes no attribute or occupancy calls.
struct LaunchFacts {
  GemmKernel fn;
  int dev, smem, sms, per_sm;
};

gptoss_status launch_facts(const GemmLaunch& L, int dev, int* sms, int* per_sm) {
  static std::mutex mu;
  static std::vector<LaunchFacts> cache;
  std::lock_guard<std::mutex> lock(mu);
  int attr = L.smem;
  for (const LaunchFacts& f : cache) {
    if (f.fn == L.fn && f.dev == dev && f.smem == L.smem) {
      *sms = f.sms;
      *per_sm = f.per_sm;
      return GPTOSS_OK;
    }
    if (f.fn == L.fn && f.dev == dev) attr = std::max(attr, f.smem);  // keep the largest limit set so far
  }
  GPTOSS_CUDA_TRY(cudaFuncSetAttribute(L.fn, cudaFuncAttributeMaxDynamicSharedMemorySize, attr),
                  "moe_prefill: cudaFuncSetAttribute");
  GPTOSS_CUDA_TRY(cudaDeviceGetAttribute(sms, cudaDevAttrMultiProcessorCount, dev), "moe_prefill: SM count");
  GPTOSS_CUDA_TRY(cudaOccupancyMaxActiveBlocksPerMultiprocessor(per_sm, L.fn, L.threads, L.smem),
                  "moe_prefill: occupancy");
  *per_sm = std::max(*per_sm, 1);
  cache.push_back({L.fn, dev, L.smem, *sms, *per_sm});
  return GPTOSS_OK;
}

gptoss_status launch_gemm(const GemmParams& gp, int epi, int64_t rows, int variant, cudaStream_t stream) {
  const int G = gp.K / 32;
  const GemmLaunch L = epi == kSwiglu ? gemm_launch<kSwiglu>(variant, G, gp.E)
                                      : gemm_launch<kWeightedScatter>(variant, G, gp.E);
  int dev = 0, sms = 0, per_sm = 0;
  GPTOSS_CUDA_TRY(cudaGetDevice(&dev), "moe_prefill: cudaGetDevice");
  const gptoss_status st = launch_facts(L, dev, &sms, &per_sm);
  if (st != GPTOSS_OK) return st;
  // Persistent grid: at most one wave of resident blocks, at most the work list's upper bound
  // sum_e ceil(count_e / BM) * n_tiles <= (rows / BM + min(E, rows)) * n_tiles.
  const int64_t max_mtiles = rows / L.bm + std::min<int64_t>(gp.E, rows);
  const int64_t max_work = max_mtiles * ceil_div(gp.N, L.bn);
  const int grid = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(max_work, int64_t{sms} * per_sm)));
  GPTOSS_CUDA_TRY(gptoss::pdl::launch_plain(L.fn, dim3(grid), dim3(L.threads), static_cast<size_t>(L.smem), stream, gp),
                  "moe_prefill grouped GEMM launch");
  return GPTOSS_OK;
}

gptoss_status run_step(const Problem& pr, int step, int variant, cudaStream_t stream) {
  const int64_t rows = pr.T * pr.k;
  const int E = static_cast<int>(pr.E);
  // AUTO: mma.sync on every architecture (wgmma only when asked for, on sm_90a: check_problem)
  // until the wgmma variant has been verified on a GPU
  if (variant == GPTOSS_MOE_PREFILL_AUTO) variant = GPTOSS_MOE_PREFILL_MMA_SYNC;
  GemmParams gp{};
  gp.counts = pr.part<int32_t>(GPTOSS_MOE_WS_COUNTS);
  gp.offsets = pr.part<int32_t>(GPTOSS_MOE_WS_OFFSETS);
  gp.tile_off = pr.part<int32_t>(GPTOSS_MOE_WS_TILE_OFFSETS);
  gp.perm = pr.part<int32_t>(GPTOSS_MOE_WS_PERM);
  gp.topk_w = pr.topk_weights;
  gp.E = E;
  gp.topk = static_cast<int>(pr.k);
  gp.alpha = pr.alpha;
  gp.limit = pr.limit;
  switch (step) {
    case 1: {
      const int nc = num_chunks(rows);
      int32_t* chunk = pr.part<int32_t>(GPTOSS_MOE_WS_CHUNK_BASE);
      GPTOSS_CUDA_TRY(gptoss::pdl::launch_plain(route_count_kernel, dim3(nc), dim3(kChunk), 0, stream, pr.topk_ids, static_cast<int>(rows), E, chunk), "moe_prefill route_count launch");
      static_assert(mma::BM == wg::BM, "one m-tile size for both variants");
      GPTOSS_CUDA_TRY(gptoss::pdl::launch_plain(route_scan_kernel, dim3(1), dim3(kMaxExperts), 0, stream, chunk, nc, E, mma::BM, pr.part<int32_t>(GPTOSS_MOE_WS_COUNTS),
                                                       pr.part<int32_t>(GPTOSS_MOE_WS_OFFSETS),
                                                       pr.part<int32_t>(GPTOSS_MOE_WS_TILE_OFFSETS)), "moe_prefill route_scan launch");
      return gptoss::cuda_status(gptoss::pdl::launch_plain(route_scatter_kernel, dim3(nc), dim3(kChunk), 0, stream, pr.topk_ids, static_cast<int>(rows), E, chunk,
                                                      pr.part<int32_t>(GPTOSS_MOE_WS_PERM)), "moe_prefill route_scatter launch");
    }
    case 2:
      gp.A = static_cast<const __nv_bfloat16*>(pr.x);
      gp.Wq = pr.w1_blocks;
      gp.Ws = pr.w1_scales;
      gp.bias = static_cast<const __nv_bfloat16*>(pr.w1_bias);
      gp.C = pr.part<__nv_bfloat16>(GPTOSS_MOE_WS_ACT);
      gp.N = static_cast<int>(2 * pr.I);
      gp.K = static_cast<int>(pr.H);
      return launch_gemm(gp, kSwiglu, rows, variant, stream);
    case 3:
      gp.A = pr.part<const __nv_bfloat16>(GPTOSS_MOE_WS_ACT);
      gp.Wq = pr.w2_blocks;
      gp.Ws = pr.w2_scales;
      gp.bias = static_cast<const __nv_bfloat16*>(pr.w2_bias);
      gp.C = pr.part<__nv_bfloat16>(GPTOSS_MOE_WS_Y);
      gp.N = static_cast<int>(pr.H);
      gp.K = static_cast<int>(pr.I);
      return launch_gemm(gp, kWeightedScatter, rows, variant, stream);
    case 4: {
      const int64_t vecs = pr.T * (pr.H / 8);
      const int threads = 256;
      const int grid = static_cast<int>(std::min<int64_t>((vecs + threads - 1) / threads, 65535 * 8));
      return gptoss::cuda_status(gptoss::pdl::launch_plain(combine_kernel, dim3(grid), dim3(threads), 0, stream, pr.part<const __nv_bfloat16>(GPTOSS_MOE_WS_Y),
                                                   pr.topk_ids, static_cast<int>(pr.E), static_cast<__nv_bfloat16*>(pr.out), pr.T, static_cast<int>(pr.H),
                                                   static_cast<int>(pr.k)), "moe_prefill combine launch");
    }
    default:
      return gptoss::set_error(GPTOSS_ERROR_INVALID_ARGUMENT, "moe_prefill: step must be 1..4");
  }
}

gptoss_status check_problem(Problem& pr, size_t workspace_bytes, int variant) {
  GPTOSS_REQUIRE(pr.T >= 0, "moe_prefill: T must be >= 0");
  GPTOSS_REQUIRE(pr.H > 0 && pr.H % 32 == 0, "moe_prefill: H must be a positive multiple of 32");
  GPTOSS_REQUIRE(pr.I > 0 && pr.I % 32 == 0, "moe_prefill: I must be a positive multiple of 32");
  GPTOSS_REQUIRE(pr.H <= 8192 && pr.I <= 8192, "moe_prefill: H and I must be <= 8192");
  GPTOSS_REQUIRE(pr.E >= 1 && pr.E <= kMaxExperts, "moe_prefill: E must be in [1, 256]");
  GPTOSS_REQUIRE(pr.k >= 1 && pr.k <= kMaxK, "moe_prefill: k must be in [1, 16]");
  GPTOSS_REQUIRE(pr.T * pr.k < (int64_t{1} << 31), "moe_prefill: T*k must be < 2^31");
  GPTOSS_REQUIRE(variant >= GPTOSS_MOE_PREFILL_AUTO && variant <= GPTOSS_MOE_PREFILL_WGMMA_N256,
                 "moe_prefill: unknown variant");
  const size_t need = gptoss_moe_prefill_workspace_layout(pr.T, pr.k, pr.E, pr.H, pr.I, pr.off);
  GPTOSS_REQUIRE(workspace_bytes >= need, "moe_prefill: workspace too small (see gptoss_moe_prefill_workspace_size)");
  if (pr.T == 0) return GPTOSS_OK;
  GPTOSS_REQUIRE(pr.x && pr.topk_ids && pr.topk_weights && pr.w1_blocks && pr.w1_scales && pr.w1_bias &&
                     pr.w2_blocks && pr.w2_scales && pr.w2_bias && pr.out && pr.ws,
                 "moe_prefill: null pointer");
  GPTOSS_REQUIRE(gptoss::aligned(pr.x, 16) && gptoss::aligned(pr.out, 16) && gptoss::aligned(pr.w1_blocks, 16) &&
                     gptoss::aligned(pr.w2_blocks, 16) && gptoss::aligned(pr.w1_scales, 16) &&
                     gptoss::aligned(pr.w2_scales, 16) && gptoss::aligned(pr.w1_bias, 4) &&
                     gptoss::aligned(pr.w2_bias, 4) && gptoss::aligned(pr.ws, 256),
                 "moe_prefill: x, out, blocks, scales must be 16-byte aligned, biases 4-byte, workspace 256-byte");
  // the device's paths: wgmma only with sm_90a code on a 9.0 device; the GEMMs' shared memory
  gptoss_arch_info arch;
  const gptoss_status arch_st = gptoss::arch::current(&arch);
  if (arch_st != GPTOSS_OK) return arch_st;
  if (variant >= GPTOSS_MOE_PREFILL_WGMMA && !arch.wgmma)
    return gptoss::set_error(GPTOSS_ERROR_UNSUPPORTED,
                             std::string("moe_prefill: the wgmma variants need sm_90a code on a compute capability 9.0 "
                                         "device; the paths here are ") +
                                 gptoss::arch::cc_name(arch.cc) + "'s (use AUTO or MMA_SYNC: the mma.sync GEMMs)");
  const int v = variant == GPTOSS_MOE_PREFILL_AUTO ? GPTOSS_MOE_PREFILL_MMA_SYNC : variant;
  const int E = static_cast<int>(pr.E);
  const int smem = std::max(gemm_launch<kSwiglu>(v, static_cast<int>(pr.H / 32), E).smem,
                            gemm_launch<kWeightedScatter>(v, static_cast<int>(pr.I / 32), E).smem);
  if (smem > arch.max_smem_per_block)
    return gptoss::set_error(GPTOSS_ERROR_UNSUPPORTED,
                             "moe_prefill: H = " + std::to_string(pr.H) + ", I = " + std::to_string(pr.I) +
                                 " need " + std::to_string(smem) + " bytes of shared memory per block; the device allows " +
                                 std::to_string(arch.max_smem_per_block) + " (" + gptoss::arch::cc_name(arch.cc) + ")");
  return GPTOSS_OK;
}

}  // namespace

GPTOSS_API size_t gptoss_moe_prefill_workspace_layout(int64_t T, int64_t k, int64_t E, int64_t H, int64_t I,
                                                      size_t* offsets) {
  const size_t rows = static_cast<size_t>(T > 0 ? T : 0) * static_cast<size_t>(k > 0 ? k : 0);
  const size_t e = static_cast<size_t>(E > 0 ? E : 0);
  const size_t sizes[GPTOSS_MOE_WS_NUM_PARTS] = {
      4 * e,                                                     // counts
      4 * (e + 1),                                               // offsets
      4 * (e + 1),                                               // tile offsets
      4 * rows,                                                  // perm
      4 * e * static_cast<size_t>(num_chunks(static_cast<int64_t>(rows))),  // chunk bases
      2 * rows * static_cast<size_t>(I > 0 ? I : 0),             // act
      2 * rows * static_cast<size_t>(H > 0 ? H : 0),             // y
  };
  size_t total = 0;
  for (int i = 0; i < GPTOSS_MOE_WS_NUM_PARTS; ++i) {
    if (offsets) offsets[i] = total;
    total += align256(sizes[i]);
  }
  return total;
}

GPTOSS_API size_t gptoss_moe_prefill_workspace_size(int64_t T, int64_t k, int64_t E, int64_t H, int64_t I) {
  return gptoss_moe_prefill_workspace_layout(T, k, E, H, I, nullptr);
}

GPTOSS_API gptoss_status gptoss_moe_prefill_step(
    int step, const void* x, const int32_t* topk_ids, const float* topk_weights, const uint8_t* w1_blocks,
    const uint8_t* w1_scales, const void* w1_bias, const uint8_t* w2_blocks, const uint8_t* w2_scales,
    const void* w2_bias, float swiglu_alpha, float swiglu_limit, void* out, int64_t T, int64_t H, int64_t I,
    int64_t E, int64_t k, void* workspace, size_t workspace_bytes, int variant, cudaStream_t stream) {
  Problem pr{x,   topk_ids, topk_weights, w1_blocks, w1_scales, w1_bias, w2_blocks, w2_scales, w2_bias,
             swiglu_alpha, swiglu_limit, out, T, H, I, E, k, static_cast<uint8_t*>(workspace), {}};
  const gptoss_status st = check_problem(pr, workspace_bytes, variant);
  if (st != GPTOSS_OK || T == 0) return st;
  return run_step(pr, step, variant, stream);
}

GPTOSS_API gptoss_status gptoss_moe_prefill_mxfp4(
    const void* x, const int32_t* topk_ids, const float* topk_weights, const uint8_t* w1_blocks,
    const uint8_t* w1_scales, const void* w1_bias, const uint8_t* w2_blocks, const uint8_t* w2_scales,
    const void* w2_bias, float swiglu_alpha, float swiglu_limit, void* out, int64_t T, int64_t H, int64_t I,
    int64_t E, int64_t k, void* workspace, size_t workspace_bytes, int variant, cudaStream_t stream) {
  Problem pr{x,   topk_ids, topk_weights, w1_blocks, w1_scales, w1_bias, w2_blocks, w2_scales, w2_bias,
             swiglu_alpha, swiglu_limit, out, T, H, I, E, k, static_cast<uint8_t*>(workspace), {}};
  const gptoss_status st = check_problem(pr, workspace_bytes, variant);
  if (st != GPTOSS_OK || T == 0) return st;
  for (int step = 1; step <= 4; ++step) {
    const gptoss_status s = run_step(pr, step, variant, stream);
    if (s != GPTOSS_OK) return s;
  }
  return GPTOSS_OK;
}
