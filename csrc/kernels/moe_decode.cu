// MXFP4 MoE, decode regime (gptoss/moe.h): few routed rows, weight-streaming GEMVs on the tensor
// cores (mma.sync m16n8k16 bf16 -> fp32) with the weights decoded in registers.
//
// Work split. Each block first scans topk_ids itself (tiny in decode: no host sync, no metadata
// launch): a bitmap of the selected experts gives the list of D distinct valid experts, ascending.
// The work items are (expert u < D, tile of kMTiles * 16 output rows); the grid is one wave of
// resident blocks (SMs x blocks per SM, at most the worst-case item count) and block b takes items
// b, b + gridDim.x, ... in (expert, tile) order, so the work is balanced over the whole chip
// whatever D turns out to be, and unselected experts cost nothing. Per item the block gathers the
// expert's routed rows (ordered compaction of the ids) and its 8 warps (kMTiles M-tiles x kKSplit
// K-slices) stream the tile's weights once, every routed row of the expert reusing the decoded
// tile (8 tokens per mma; more tokens = more mmas over the same weights, re-read from L2, not
// DRAM). The K-slices are summed through shared memory in a fixed order (deterministic). One
// thread asks the bulk-copy engine to prefetch the block's next item into L2 (an item's weight
// blocks are one contiguous range), so DRAM stays busy across the per-item barriers.
//
// mma fragments (PTX m16n8k16 .bf16): lane = 4 * g + tq. A: a0 = (row g, k-slots 2tq, 2tq+1),
// a1 = (row g+8, same), a2 = (row g, 2tq+8, 2tq+9), a3 = (row g+8, same); B: b0 = (k-slots 2tq,
// 2tq+1; token column g), b1 = (2tq+8, 2tq+9; column g); C: c0,c1 = (row g; columns 2tq, 2tq+1),
// c2,c3 = (row g+8; same columns). The contraction order is ours to choose as long as A and B
// agree: in chunk c (4 MXFP4 groups = 128 k), lane tq owns group 4c+tq, i.e. one 16-byte block of
// row g and one of row g+8 (its own scale bytes), and mma step s = 2q+h (q = word of the block,
// h = 0, 1) maps k-slots (2tq, 2tq+1) to elements (8q+2h, 8q+2h+4) and (2tq+8, 2tq+9) to
// (8q+2h+1, 8q+2h+5) of that group: exactly the pairs mxfp4_decode_fast.cuh produces, and two
// PRMTs pair the activations the same way.
//
// mlp1 rows: M-row m < 8 is gate row 2j (j = 8 * tile + m), M-row m + 8 is linear row 2j+1, so a
// lane's c0/c2 (c1/c3) are the gate and linear values of the same unit and token: the clamped
// SwiGLU is applied in registers and act is written in bf16. mlp2 rows: 16 consecutive rows.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdlib>

#include "activation.cuh"
#include "common.cuh"
#include "gptoss/moe.h"
#include "mxfp4_decode_fast.cuh"
#include "pdl.cuh"
#include "ptx.cuh"
#include "rms_block.cuh"

namespace {

constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;
constexpr int kMaxRouted = GPTOSS_MOE_DECODE_MAX_ROUTED_ROWS;
static_assert(kMaxRouted == kThreads, "the routing scan gives each thread one routed row");
constexpr int kMaxExperts = GPTOSS_MOE_DECODE_MAX_EXPERTS;
constexpr int kMTiles = 2;                  // 16-row M-tiles per block
constexpr int kKSplit = kWarps / kMTiles;   // warps sharing one M-tile's K range
static_assert(kMTiles * kKSplit == kWarps, "warps = M-tiles x K-slices");
constexpr int kUnroll = 3;                  // 128-k chunks loaded before the first use (per warp)
// The two numbers (120b, T=1, k=4): 52.96 MB must be read (moe_bytes_read: 4 experts x 13.2 MB),
// 0.2 GFLOP: the floor is the bytes, ~17-18 us at an H100's ~3 TB/s copy rate. Decode costs ~3.3
// instructions per weight element (pair bits, one bf16 multiply, PRMTs, mma), ~11 us of issue at
// T=1, under the memory time. Predicted: within 80% of copy bandwidth at T=1..16 if the loads in
// flight (~49 KB per SM) hide DRAM latency; T*k near 256 with E=32 gets ~8 tokens per expert,
// still one mma column tile, so the same bound holds. Not yet measured.
// Tuning (not yet measured on a GPU): kMTiles (rows per item; x/act L2 traffic per weight byte is
// ~ tokens / (4 kMTiles)), kUnroll (16-byte loads in flight: 2 kUnroll weight + 4 kUnroll x per
// lane; 127 registers now, 128 is the cap for two 256-thread blocks per SM), kWarps.

struct Shared {
  uint32_t bits[kMaxExperts / 32];  // selected-expert bitmap
  int experts[kMaxRouted];          // the distinct selected experts, ascending
  int slots[kMaxRouted];            // routed rows (t*k + j) of the current expert, ascending
  int warp_count[kWarps];
  float red[kWarps][4][32];         // K-slice partial sums [warp][c][lane]
  int n_experts;
};

__device__ __forceinline__ uint4 ldg_stream(const uint4* p) {  // read-once weights: bypass L1
  return gptoss::ld_global_nc_na_v4(p);
}

// The GEMV input (x for mlp1, act for mlp2) may be written by the kernel just before (PDL: that
// kernel is still running when this one starts, and ld.global.nc requires data read-only for the
// whole lifetime of the kernel): L2-coherent ld.cg.
__device__ __forceinline__ uint4 load_in(const uint4* p) { return __ldcg(p); }

__device__ __forceinline__ void mma_16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                          uint32_t b0, uint32_t b1) {
  gptoss::mma_bf16_16816_reorderable(d, a0, a1, a2, a3, b0, b1);
}

// The distinct ids in [0, E) of ids[0..n), ascending, into sh.experts[0..sh.n_experts).
// Returns this thread's id (routed row threadIdx.x; -1 past n). n <= kThreads.
__device__ __forceinline__ int block_distinct_experts(const int32_t* __restrict__ ids, int n, int E, Shared& sh) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int nwords = (E + 31) >> 5;
  for (int i = tid; i < nwords; i += kThreads) sh.bits[i] = 0u;
  const int id = tid < n ? __ldcg(ids + tid) : -1;  // .cg: mlp2 reads them before its PDL wait
  __syncthreads();
  if (id >= 0 && id < E) atomicOr(&sh.bits[id >> 5], 1u << (id & 31));
  __syncthreads();
  if (warp == 0) {
    int before = 0;  // distinct experts in earlier words (warp-uniform)
    for (int base = 0; base < nwords; base += 32) {
      const uint32_t word = base + lane < nwords ? sh.bits[base + lane] : 0u;
      const int c = __popc(word);
      int incl = c;
#pragma unroll
      for (int d = 1; d < 32; d <<= 1) {
        const int v = __shfl_up_sync(0xFFFFFFFFu, incl, d);
        if (lane >= d) incl += v;
      }
      int pos = before + incl - c;
      for (uint32_t w = word; w != 0u; w &= w - 1u) sh.experts[pos++] = 32 * (base + lane) + __ffs(w) - 1;
      before += __shfl_sync(0xFFFFFFFFu, incl, 31);
    }
    if (lane == 0) sh.n_experts = before;
  }
  __syncthreads();
  return id;
}

// The routed rows whose id (one per thread, from block_distinct_experts) is e, ascending, into
// sh.slots; returns their count. Block-wide (every thread must call it).
__device__ __forceinline__ int block_gather_slots(int id, int e, Shared& sh) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const bool match = (id == e);
  const unsigned m = __ballot_sync(0xFFFFFFFFu, match);
  if (lane == 0) sh.warp_count[warp] = __popc(m);
  __syncthreads();
  int off = 0, total = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    const int c = sh.warp_count[w];
    off += (w < warp) ? c : 0;
    total += c;
  }
  if (match) sh.slots[off + __popc(m & ((1u << lane) - 1u))] = tid;
  __syncthreads();
  return total;
}

// One 4-group chunk of a warp's tile: 8 mma steps over the lane's two 16-byte blocks (rows g and
// g+8, group 4c+tq) and its token's 64 bytes of activations. kTwo: apply the scale as two bf16
// factors (needed only when a scale byte exceeds 128, i.e. 2^(s-1) is beyond bf16's range).
template <bool kTwo>
__device__ __forceinline__ void chunk_mma(float (&acc)[4], const uint4& wa, const uint4& wb, uint32_t sa,
                                          uint32_t sb, const uint4 (&xv)[4]) {
  uint32_t ca1, ca2, cb1, cb2;
  gptoss::mxfp4_pair_scale_factors(sa, ca1, ca2);
  gptoss::mxfp4_pair_scale_factors(sb, cb1, cb2);
  const uint32_t WA[4] = {wa.x, wa.y, wa.z, wa.w};
  const uint32_t WB[4] = {wb.x, wb.y, wb.z, wb.w};
  const uint32_t X[16] = {xv[0].x, xv[0].y, xv[0].z, xv[0].w, xv[1].x, xv[1].y, xv[1].z, xv[1].w,
                          xv[2].x, xv[2].y, xv[2].z, xv[2].w, xv[3].x, xv[3].y, xv[3].z, xv[3].w};
#pragma unroll
  for (int q = 0; q < 4; ++q) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      uint32_t a0 = gptoss::bf16x2_mul(gptoss::fp4x8_pair_bits(WA[q], 2 * h), ca1);
      uint32_t a2 = gptoss::bf16x2_mul(gptoss::fp4x8_pair_bits(WA[q], 2 * h + 1), ca1);
      uint32_t a1 = gptoss::bf16x2_mul(gptoss::fp4x8_pair_bits(WB[q], 2 * h), cb1);
      uint32_t a3 = gptoss::bf16x2_mul(gptoss::fp4x8_pair_bits(WB[q], 2 * h + 1), cb1);
      if (kTwo) {
        a0 = gptoss::bf16x2_mul(a0, ca2);
        a2 = gptoss::bf16x2_mul(a2, ca2);
        a1 = gptoss::bf16x2_mul(a1, cb2);
        a3 = gptoss::bf16x2_mul(a3, cb2);
      }
      // x words X[m] = (x_2m, x_2m+1): b0 = (x_{8q+2h}, x_{8q+2h+4}), b1 = (x_{8q+2h+1}, x_{8q+2h+5})
      const uint32_t b0 = __byte_perm(X[4 * q + h], X[4 * q + h + 2], 0x5410);
      const uint32_t b1 = __byte_perm(X[4 * q + h], X[4 * q + h + 2], 0x7632);
      mma_16816(acc, a0, a1, a2, a3, b0, b1);
    }
  }
}

// kMlp1: in = x [T, K=H], rows = 2I, dst = act bf16 [n, I] (SwiGLU applied).
// else : in = act [n, K=I], rows = H, dst = y fp32 [n, H] (times the routing weight).
template <bool kMlp1>
__global__ void __launch_bounds__(kThreads, 2) moe_decode_gemv_kernel(
    const __nv_bfloat16* __restrict__ in, const int32_t* __restrict__ ids, const float* __restrict__ topk_weights,
    const uint8_t* __restrict__ blocks, const uint8_t* __restrict__ scales, const __nv_bfloat16* __restrict__ bias,
    void* __restrict__ dst, int n, int k, int E, int K, int rows, float alpha, float limit) {
  __shared__ Shared sh;
  const int n_tiles = rows / 16;                                  // rows is a multiple of 32
  const int n_blocks_rows = (n_tiles + kMTiles - 1) / kMTiles;    // row tiles of the block
  const int G = K >> 5;                             // MXFP4 groups per row
  // Thread 0: bring item `it` (kMTiles * 16 consecutive rows of one expert: one contiguous range
  // of blocks) towards L2, from the experts in sh.
  auto prefetch_item = [&](int64_t it) {
    if (threadIdx.x == 0 && it < static_cast<int64_t>(sh.n_experts) * n_blocks_rows) {
      const int row0 = static_cast<int>(it % n_blocks_rows) * (16 * kMTiles);
      const int nr = min(16 * kMTiles, rows - row0);
      const int64_t first = static_cast<int64_t>(sh.experts[it / n_blocks_rows]) * rows + row0;
      gptoss::pdl::prefetch_l2(blocks + first * G * 16, static_cast<uint32_t>(nr) * G * 16);
    }
  };
  if (kMlp1) {
    // PDL: wait for the router's ids (and x), then let mlp2 launch (its blocks fill the SMs as
    // mlp1's leave)
    gptoss::pdl::wait();
    gptoss::pdl::launch_dependents();
  } else {
    // mlp2, while mlp1 drains: a scan of the ids only to aim an L2 prefetch (a hint: the ids are
    // not formally synchronised with this grid before its wait, though the router finished before
    // mlp1 let this grid launch; ids outside [0, E) are dropped, so any value gives a valid
    // address). The scan after the wait is the one the kernel uses.
    block_distinct_experts(ids, n, E, sh);
    prefetch_item(blockIdx.x);
    gptoss::pdl::wait();  // act: mlp1's output
    gptoss::pdl::launch_dependents();
  }
  const int my_id = block_distinct_experts(ids, n, E, sh);
  const int64_t items = static_cast<int64_t>(sh.n_experts) * n_blocks_rows;
  if (kMlp1) prefetch_item(blockIdx.x);

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, tq = lane & 3;
  const int mt = warp / kKSplit, ks = warp % kKSplit;
  const int nch = (G + 3) >> 2;                     // 4-group chunks
  int cur_e = -1, ne = 0;

  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    prefetch_item(item + gridDim.x);  // keeps DRAM busy across this item's barriers
    const int e = sh.experts[item / n_blocks_rows];
    const int tile = static_cast<int>(item % n_blocks_rows) * kMTiles + mt;  // this warp's 16-row tile
    if (e != cur_e) {  // block-uniform
      ne = block_gather_slots(my_id, e, sh);
      cur_e = e;
    }
    const bool tile_ok = tile < n_tiles;
    // the lane's two weight rows (A rows g and g+8 of the tile)
    const int rowA = kMlp1 ? 2 * (8 * tile + g) : 16 * tile + g;
    const int rowB = kMlp1 ? rowA + 1 : rowA + 8;
    const int64_t erow = static_cast<int64_t>(e) * rows;
    const uint4* wA = reinterpret_cast<const uint4*>(blocks) + (erow + rowA) * G;
    const uint4* wB = reinterpret_cast<const uint4*>(blocks) + (erow + rowB) * G;
    const uint8_t* sA = scales + (erow + rowA) * G;
    const uint8_t* sB = scales + (erow + rowB) * G;

    for (int t0 = 0; t0 < ne; t0 += 8) {
      const int col_slot = (t0 + g < ne) ? sh.slots[t0 + g] : -1;  // this lane's B column
      const uint4* xin = nullptr;
      if (col_slot >= 0)
        xin = reinterpret_cast<const uint4*>(in + static_cast<int64_t>(kMlp1 ? col_slot / k : col_slot) * K);
      float acc[4] = {0.f, 0.f, 0.f, 0.f};
      if (tile_ok) {
        for (int cb = ks; cb < nch; cb += kKSplit * kUnroll) {
          uint4 wa[kUnroll], wb[kUnroll], xv[kUnroll][4];
          uint32_t sa[kUnroll], sb[kUnroll];
#pragma unroll
          for (int uu = 0; uu < kUnroll; ++uu) {
            const int gi = 4 * (cb + uu * kKSplit) + tq;
            const bool ok = gi < G;
            const uint4 z = make_uint4(0u, 0u, 0u, 0u);
            wa[uu] = ok ? ldg_stream(wA + gi) : z;
            wb[uu] = ok ? ldg_stream(wB + gi) : z;
            sa[uu] = ok ? __ldg(sA + gi) : 0u;
            sb[uu] = ok ? __ldg(sB + gi) : 0u;
#pragma unroll
            for (int q = 0; q < 4; ++q) xv[uu][q] = (ok && xin) ? load_in(xin + 4 * gi + q) : z;
          }
#pragma unroll
          for (int uu = 0; uu < kUnroll; ++uu) {
            if (cb + uu * kKSplit >= nch) break;  // warp-uniform
            if (__any_sync(0xFFFFFFFFu, max(sa[uu], sb[uu]) > 128u))
              chunk_mma<true>(acc, wa[uu], wb[uu], sa[uu], sb[uu], xv[uu]);
            else
              chunk_mma<false>(acc, wa[uu], wb[uu], sa[uu], sb[uu], xv[uu]);
          }
        }
      }
      // sum the K-slices of each M-tile in a fixed order
#pragma unroll
      for (int c = 0; c < 4; ++c) sh.red[warp][c][lane] = acc[c];
      __syncthreads();
      if (ks == 0 && tile_ok) {
        float v[4];
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          float s = 0.f;
#pragma unroll
          for (int w = 0; w < kKSplit; ++w) s += sh.red[mt * kKSplit + w][c][lane];
          v[c] = s;
        }
#pragma unroll
        for (int p = 0; p < 2; ++p) {  // token columns 2tq + p
          const int col = t0 + 2 * tq + p;
          if (col >= ne) continue;
          const int slot = sh.slots[col];
          if (kMlp1) {
            const int I = rows >> 1;
            const int j = 8 * tile + g;
            const float gate = v[p] + __bfloat162float(bias[erow + 2 * j]);
            const float lin = v[2 + p] + __bfloat162float(bias[erow + 2 * j + 1]);
            static_cast<__nv_bfloat16*>(dst)[static_cast<int64_t>(slot) * I + j] =
                __float2bfloat16_rn(gptoss::swiglu_clamped(gate, lin, alpha, limit));
          } else {
            const float wgt = __ldcg(topk_weights + slot);  // the router's output
            float* y = static_cast<float*>(dst) + static_cast<int64_t>(slot) * rows;
            y[rowA] = (v[p] + __bfloat162float(bias[erow + rowA])) * wgt;
            y[rowB] = (v[2 + p] + __bfloat162float(bias[erow + rowB])) * wgt;
          }
        }
      }
      __syncthreads();
    }
  }
}

// s = sum_j y[t*k+j, 4 h4 .. 4 h4 + 3] over token t's k slots in slot order (fp32), skipping slots
// whose id is outside [0, E); returns whether one was (its token's row is then NaN). y and ids
// are earlier kernels' outputs (PDL): L2-coherent loads, not .nc.
__device__ __forceinline__ bool sum_slots(const float4* __restrict__ y, const int32_t* __restrict__ ids, int t, int k,
                                          int E, int per_row, int h4, float4& s) {
  s = make_float4(0.f, 0.f, 0.f, 0.f);
  bool bad = false;
  for (int j = 0; j < k; ++j) {
    const int r = t * k + j;
    const int id = __ldcg(ids + r);
    if (id < 0 || id >= E) {
      bad = true;
      continue;
    }
    const float4 v = __ldcg(y + static_cast<int64_t>(r) * per_row + h4);
    s.x += v.x;
    s.y += v.y;
    s.z += v.z;
    s.w += v.w;
  }
  return bad;
}

// out[t, h..h+3] = sum_j y[t*k+j, h..h+3] in slot order; NaN where a slot's id is invalid.
__global__ void __launch_bounds__(256) moe_decode_combine_kernel(const float4* __restrict__ y,
                                                                  const int32_t* __restrict__ ids, int n_tokens,
                                                                  int k, int E, int H,
                                                                  __nv_bfloat16* __restrict__ out) {
  gptoss::pdl::wait();  // y is mlp2's output
  gptoss::pdl::launch_dependents();
  const int per_row = H >> 2;
  const int64_t total = static_cast<int64_t>(n_tokens) * per_row;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int t = static_cast<int>(idx / per_row), h4 = static_cast<int>(idx % per_row);
    float4 s;
    const bool bad = sum_slots(y, ids, t, k, E, per_row, h4, s);
    if (bad) s = make_float4(__int_as_float(0x7FC00000), __int_as_float(0x7FC00000),
                             __int_as_float(0x7FC00000), __int_as_float(0x7FC00000));
    __nv_bfloat162 o[2] = {__floats2bfloat162_rn(s.x, s.y), __floats2bfloat162_rn(s.z, s.w)};
    reinterpret_cast<uint2*>(out)[idx] = *reinterpret_cast<const uint2*>(o);
  }
}

constexpr size_t align256(size_t b) { return (b + 255) & ~static_cast<size_t>(255); }

// Resident blocks of one GEMV kernel on the current device (SMs x blocks per SM), cached.
template <bool kMlp1>
gptoss_status resident_blocks(int& blocks) {
  static int cached[64] = {0};
  int dev = 0;
  GPTOSS_CUDA_TRY(cudaGetDevice(&dev), "moe_mxfp4_decode: cudaGetDevice");
  if (dev >= 0 && dev < 64 && cached[dev] > 0) {
    blocks = cached[dev];
    return GPTOSS_OK;
  }
  int sms = 0, per_sm = 0;
  GPTOSS_CUDA_TRY(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev),
                  "moe_mxfp4_decode: multiprocessor count");
  GPTOSS_CUDA_TRY(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, moe_decode_gemv_kernel<kMlp1>, kThreads, 0),
                  "moe_mxfp4_decode: occupancy");
  blocks = sms * (per_sm > 0 ? per_sm : 1);
  if (dev >= 0 && dev < 64) cached[dev] = blocks;
  return GPTOSS_OK;
}

// The combine fused with the residual add and RMSNorm that follow the MoE in a decode step:
// one block per token, thread c owns the 8-element chunk c of the row (blockDim = chunks rounded
// up to 32, chunks = H / 8 <= 1024). m = bf16(sum_j y[t*k+j] in slot order) exactly as the combine
// kernel computes it, then h = bf16(m + residual) -> residual_out (may alias residual) and
// norm_out = RMSNorm(h) * weight with the same code as rms_norm_kernel (rms_block.cuh): the same
// bits as combine, then gptoss_rms_norm_bf16.
template <typename WT>
__global__ void __launch_bounds__(gptoss::dense::kRmsMaxThreads) moe_decode_combine_norm_kernel(
    const float4* __restrict__ y, const int32_t* __restrict__ ids, int k, int E, int H, const uint4* residual,
    uint4* residual_out, const WT* __restrict__ weight, uint4* __restrict__ norm_out, float eps) {
  gptoss::pdl::wait();  // y is mlp2's output
  gptoss::pdl::launch_dependents();
  const int t = blockIdx.x, c = threadIdx.x, chunks = H >> 3, per_row = H >> 2;
  const int64_t row = static_cast<int64_t>(t) * chunks;
  uint4 h = make_uint4(0, 0, 0, 0);
  float ss = 0.f;
  if (c < chunks) {
    float4 a, b;
    const bool bad = sum_slots(y, ids, t, k, E, per_row, 2 * c, a) | sum_slots(y, ids, t, k, E, per_row, 2 * c + 1, b);
    float s[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
    if (bad)
      for (float& v : s) v = __int_as_float(0x7FC00000);
    ss = gptoss::dense::add_residual_chunk<true>(gptoss::pack_bf16x8(s), residual + row, residual_out + row, c, h);
  }
  const float inv = gptoss::dense::rms_inv(gptoss::dense::block_sum(ss), 8 * chunks, eps);
  if (c < chunks) norm_out[row + c] = gptoss::dense::norm_chunk(h, weight, c, inv);
}

// Grid of a GEMV launch: one wave of resident blocks, at most one block per worst-case item.
unsigned gemv_grid(int resident, int max_experts, int64_t rows) {
  const int64_t row_blocks = (rows / 16 + kMTiles - 1) / kMTiles;
  const int64_t items = static_cast<int64_t>(max_experts) * row_blocks;
  return static_cast<unsigned>(items < resident ? items : resident);
}

int64_t chunk_tokens(int64_t k) { return kMaxRouted / k; }

}  // namespace

GPTOSS_API size_t gptoss_moe_mxfp4_decode_workspace_size(int64_t T, int64_t k, int64_t H, int64_t I) {
  if (T <= 0 || k < 1 || k > GPTOSS_MOE_DECODE_MAX_K || H <= 0 || I <= 0) return 0;
  const int64_t tokens = T < chunk_tokens(k) ? T : chunk_tokens(k);
  const int64_t n = tokens * k;
  return align256(static_cast<size_t>(n * I * 2)) + align256(static_cast<size_t>(n * H * 4));
}

namespace {

// The residual add + RMSNorm fused into the combine (gptoss_moe_mxfp4_decode_add_rms_norm).
struct AddNorm {
  const void* residual;
  void* residual_out;
  const void* weight;
  int weight_fp32;
  float eps;
  void* norm_out;
};

gptoss_status moe_decode_impl(
    const void* x, const int32_t* topk_ids, const float* topk_weights,
    const uint8_t* w1_blocks, const uint8_t* w1_scales, const void* w1_bias,
    const uint8_t* w2_blocks, const uint8_t* w2_scales, const void* w2_bias,
    float swiglu_alpha, float swiglu_limit, void* out,
    int64_t T, int64_t H, int64_t I, int64_t E, int64_t k,
    void* workspace, size_t workspace_bytes, const AddNorm* an, cudaStream_t stream) {
  GPTOSS_REQUIRE(T >= 0, "moe_mxfp4_decode: T must be >= 0");
  GPTOSS_REQUIRE(H > 0 && H % 32 == 0, "moe_mxfp4_decode: H must be a positive multiple of 32");
  GPTOSS_REQUIRE(I > 0 && I % 32 == 0, "moe_mxfp4_decode: I must be a positive multiple of 32");
  GPTOSS_REQUIRE(H < (1 << 24) && I < (1 << 24), "moe_mxfp4_decode: H and I must be < 2^24");
  GPTOSS_REQUIRE(k >= 1 && k <= GPTOSS_MOE_DECODE_MAX_K, "moe_mxfp4_decode: k must be in [1, 8]");
  if (E < 1 || E > GPTOSS_MOE_DECODE_MAX_EXPERTS)
    return gptoss::set_error(GPTOSS_ERROR_UNSUPPORTED, "moe_mxfp4_decode: E must be in [1, 4096]");
  if (T == 0) return GPTOSS_OK;
  GPTOSS_REQUIRE(x && topk_ids && topk_weights && w1_blocks && w1_scales && w1_bias && w2_blocks && w2_scales &&
                     w2_bias && (out || an) && workspace,
                 "moe_mxfp4_decode: null pointer");
  GPTOSS_REQUIRE(gptoss::aligned(x, 16) && gptoss::aligned(w1_blocks, 16) && gptoss::aligned(w2_blocks, 16) &&
                     gptoss::aligned(workspace, 16) && (an || gptoss::aligned(out, 8)),
                 "moe_mxfp4_decode: x, w1_blocks, w2_blocks and workspace must be 16-byte aligned, out 8-byte");
  const size_t need = gptoss_moe_mxfp4_decode_workspace_size(T, k, H, I);
  GPTOSS_REQUIRE(workspace_bytes >= need, "moe_mxfp4_decode: workspace too small (see _workspace_size)");

  const int64_t ct = chunk_tokens(k);
  const int64_t n_max = (T < ct ? T : ct) * k;
  __nv_bfloat16* act = static_cast<__nv_bfloat16*>(workspace);
  float* y = reinterpret_cast<float*>(static_cast<char*>(workspace) + align256(static_cast<size_t>(n_max * I * 2)));
  const __nv_bfloat16* xb = static_cast<const __nv_bfloat16*>(x);
  __nv_bfloat16* ob = static_cast<__nv_bfloat16*>(out);

  const bool pdl = true;  // every launch here uses PDL (pdl.cuh; GPTOSS_PDL=0 turns it off)
  int resident1 = 0, resident2 = 0;
  gptoss_status st = resident_blocks<true>(resident1);
  if (st != GPTOSS_OK) return st;
  st = resident_blocks<false>(resident2);
  if (st != GPTOSS_OK) return st;

  for (int64_t t0 = 0; t0 < T; t0 += ct) {
    const int nt = static_cast<int>(T - t0 < ct ? T - t0 : ct);
    const int n = nt * static_cast<int>(k);
    const int ny = static_cast<int>(E < n ? E : n);  // at most this many distinct experts
    const int32_t* ids = topk_ids + t0 * k;
    const float* wts = topk_weights + t0 * k;

    // mlp1 waits for everything before it (the router; the previous chunk's combine, which reads
    // the y that this chunk's mlp2 overwrites) before it reads or writes anything
    GPTOSS_CUDA_TRY(gptoss::pdl::launch(moe_decode_gemv_kernel<true>, dim3(gemv_grid(resident1, ny, 2 * I)), dim3(kThreads), 0, stream,
                           pdl, xb + t0 * H, ids, wts, w1_blocks, w1_scales,
                           static_cast<const __nv_bfloat16*>(w1_bias), static_cast<void*>(act), n, static_cast<int>(k),
                           static_cast<int>(E), static_cast<int>(H), static_cast<int>(2 * I), swiglu_alpha,
                           swiglu_limit),
                    "moe_mxfp4_decode mlp1 launch");
    GPTOSS_CUDA_TRY(gptoss::pdl::launch(moe_decode_gemv_kernel<false>, dim3(gemv_grid(resident2, ny, H)), dim3(kThreads), 0, stream,
                           pdl, static_cast<const __nv_bfloat16*>(act), ids, wts, w2_blocks, w2_scales,
                           static_cast<const __nv_bfloat16*>(w2_bias), static_cast<void*>(y), n, static_cast<int>(k),
                           static_cast<int>(E), static_cast<int>(I), static_cast<int>(H), swiglu_alpha, swiglu_limit),
                    "moe_mxfp4_decode mlp2 launch");
    if (an != nullptr) {
      const int chunks = static_cast<int>(H / 8);
      const dim3 threads((chunks + 31) / 32 * 32);
      const auto* res = static_cast<const uint4*>(an->residual) + t0 * chunks;
      auto* res_out = static_cast<uint4*>(an->residual_out) + t0 * chunks;
      auto* nout = static_cast<uint4*>(an->norm_out) + t0 * chunks;
      const auto* yv = reinterpret_cast<const float4*>(y);
      const cudaError_t err =
          an->weight_fp32
              ? gptoss::pdl::launch(moe_decode_combine_norm_kernel<float>, dim3(nt), threads, 0, stream, pdl, yv, ids,
                                    static_cast<int>(k), static_cast<int>(E), static_cast<int>(H), res, res_out,
                                    static_cast<const float*>(an->weight), nout, an->eps)
              : gptoss::pdl::launch(moe_decode_combine_norm_kernel<__nv_bfloat16>, dim3(nt), threads, 0, stream, pdl,
                                    yv, ids, static_cast<int>(k), static_cast<int>(E), static_cast<int>(H), res,
                                    res_out, static_cast<const __nv_bfloat16*>(an->weight), nout, an->eps);
      GPTOSS_CUDA_TRY(err, "moe_mxfp4_decode combine + rms_norm launch");
      continue;
    }
    const int64_t work = static_cast<int64_t>(nt) * (H / 4);
    const int64_t want = (work + 255) / 256;
    const int grid3 = static_cast<int>(want < 4096 ? want : 4096);
    GPTOSS_CUDA_TRY(gptoss::pdl::launch(moe_decode_combine_kernel, dim3(grid3), dim3(256), 0, stream, pdl,
                           reinterpret_cast<const float4*>(y), ids, nt, static_cast<int>(k), static_cast<int>(E),
                           static_cast<int>(H), ob + t0 * H),
                    "moe_mxfp4_decode combine launch");
  }
  return GPTOSS_OK;
}

}  // namespace

GPTOSS_API gptoss_status gptoss_moe_mxfp4_decode(
    const void* x, const int32_t* topk_ids, const float* topk_weights,
    const uint8_t* w1_blocks, const uint8_t* w1_scales, const void* w1_bias,
    const uint8_t* w2_blocks, const uint8_t* w2_scales, const void* w2_bias,
    float swiglu_alpha, float swiglu_limit, void* out,
    int64_t T, int64_t H, int64_t I, int64_t E, int64_t k,
    void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  return moe_decode_impl(x, topk_ids, topk_weights, w1_blocks, w1_scales, w1_bias, w2_blocks, w2_scales, w2_bias,
                         swiglu_alpha, swiglu_limit, out, T, H, I, E, k, workspace, workspace_bytes, nullptr, stream);
}

GPTOSS_API gptoss_status gptoss_moe_mxfp4_decode_add_rms_norm(
    const void* x, const int32_t* topk_ids, const float* topk_weights,
    const uint8_t* w1_blocks, const uint8_t* w1_scales, const void* w1_bias,
    const uint8_t* w2_blocks, const uint8_t* w2_scales, const void* w2_bias,
    float swiglu_alpha, float swiglu_limit, const void* residual, void* residual_out, const void* norm_weight,
    int norm_weight_fp32, float eps, void* norm_out,
    int64_t T, int64_t H, int64_t I, int64_t E, int64_t k,
    void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  GPTOSS_REQUIRE(H > 0 && H % 32 == 0 && H / 8 <= gptoss::dense::kRmsMaxThreads,
                 "moe_mxfp4_decode_add_rms_norm: H must be a positive multiple of 32, at most 8192");
  if (T > 0) {
    GPTOSS_REQUIRE(residual && residual_out && norm_weight && norm_out,
                   "moe_mxfp4_decode_add_rms_norm: null pointer");
    GPTOSS_REQUIRE(gptoss::aligned(residual, 16) && gptoss::aligned(residual_out, 16) &&
                       gptoss::aligned(norm_weight, 16) && gptoss::aligned(norm_out, 16),
                   "moe_mxfp4_decode_add_rms_norm: residual, residual_out, norm_weight and norm_out must be "
                   "16-byte aligned");
  }
  const AddNorm an{residual, residual_out, norm_weight, norm_weight_fp32 ? 1 : 0, eps, norm_out};
  return moe_decode_impl(x, topk_ids, topk_weights, w1_blocks, w1_scales, w1_bias, w2_blocks, w2_scales, w2_bias,
                         swiglu_alpha, swiglu_limit, nullptr, T, H, I, E, k, workspace, workspace_bytes, &an, stream);
}
