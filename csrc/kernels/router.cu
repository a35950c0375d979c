// MoE router: logits (bf16 x bf16 -> fp32, mma.sync m16n8k16), top-k + k-softmax (topk.cuh),
// and the route metadata (histogram, scan, stable scatter). See gptoss/router.h for the contract
// and the two paths (FUSED for large T, SPLIT for small T).
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <string>

#include "norm.cuh"
#include "arch.cuh"
#include "pdl.cuh"
#include "rms_block.cuh"
#include "ptx.cuh"
#include "common.cuh"
#include "gptoss/dense.h"
#include "gptoss/router.h"
#include "topk.cuh"

namespace {
using gptoss::cp_async_commit;
using gptoss::cp_async_wait;
using gptoss::mma_bf16_16816;

using bf16 = __nv_bfloat16;

// ---- logits GEMM tiling -------------------------------------------------------------------------
// A block = 8 warps = 4 (token groups of 16) x 2 (expert halves of EB/2). Each warp owns a 16 x EB/2
// accumulator tile: NT n-tiles of 8 experts, 4 fp32 registers each.
constexpr int kThreads = 256;
constexpr int kTT = 64;              // tokens per block
constexpr int kKC = 64;              // H per pipeline stage
constexpr int kLds = kKC + 8;        // shared row stride in bf16 (144 B: ldmatrix conflict-free)
constexpr int kStages = 3;
constexpr int kSplitEB = 32;         // experts per block on the SPLIT path
constexpr int kTargetBlocks = 256;   // SPLIT path: aim for about 2 blocks per SM (132 SMs)
constexpr int kMaxSplits = 16;       // SPLIT path: slices of H (each adds E floats per token to sum)
constexpr int kFusedMinTiles = 48;   // AUTO: FUSED once there are >= 48 64-token tiles (T > 3008)
constexpr int kMaxE = 256;
constexpr int kMaxK = 8;

template <int EB>
struct Tile {
  static constexpr int NT = EB / 16;                       // n-tiles per warp
  static constexpr int stage_elems = (kTT + EB) * kLds;    // bf16 per stage (x tile, weight tile)
  static constexpr int pipe_bytes = kStages * stage_elems * 2;
  static constexpr int ldl = EB + 8;                       // logits row stride (fp32), epilogue
  static constexpr int logit_bytes = kTT * ldl * 4;
  static constexpr int smem_bytes = pipe_bytes > logit_bytes ? pipe_bytes : logit_bytes;
};

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy global -> shared; zero-fills the destination when !valid (src unread).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  gptoss::cp_async_cg16(smem_u32(dst), src, valid ? 16 : 0);
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  gptoss::ldmatrix_x4_b16(r, smem_u32(p));
}

// Accumulates the block's [64 tokens] x [EB experts] logits over H chunks [c_begin, c_end).
// Rows past T or E and columns past H are zero-filled (never read from memory).
template <int EB>
__device__ __forceinline__ void logits_mainloop(const bf16* __restrict__ x, const bf16* __restrict__ w,
                                                int T, int H, int E, int t0, int e0, int c_begin,
                                                int c_end, bf16* sm, float (&acc)[Tile<EB>::NT][4]) {
  constexpr int NT = Tile<EB>::NT;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp & 3, wn = warp >> 2;
#pragma unroll
  for (int n = 0; n < NT; ++n)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[n][i] = 0.0f;

  auto load_stage = [&](int stage, int c) {
    bf16* sx = sm + stage * Tile<EB>::stage_elems;
    bf16* sw = sx + kTT * kLds;
    const int kbase = c * kKC;
#pragma unroll
    for (int i = tid; i < kTT * 8; i += kThreads) {
      const int r = i >> 3, kk = kbase + (i & 7) * 8, t = t0 + r;
      const bool ok = t < T && kk < H;
      cp_async16(sx + r * kLds + (i & 7) * 8, ok ? x + static_cast<int64_t>(t) * H + kk : x, ok);
    }
#pragma unroll
    for (int i = tid; i < EB * 8; i += kThreads) {
      const int r = i >> 3, kk = kbase + (i & 7) * 8, e = e0 + r;
      const bool ok = e < E && kk < H;
      cp_async16(sw + r * kLds + (i & 7) * 8, ok ? w + static_cast<int64_t>(e) * H + kk : w, ok);
    }
  };

  const int nc = c_end - c_begin;
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < nc) load_stage(s, c_begin + s);
    cp_async_commit();
  }
  // per-lane ldmatrix offsets (bf16 elements) within a stage's x / weight tile
  const int a_off = (wm * 16 + (lane & 15)) * kLds + (lane >> 4) * 8;
  const int b_off = (wn * (EB / 2) + (lane & 7) + ((lane >> 4) << 3)) * kLds + ((lane >> 3) & 1) * 8;
  for (int it = 0; it < nc; ++it) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // stage `it` landed for every thread; stage it-1 is free to overwrite
    const int nx = it + kStages - 1;
    if (nx < nc) load_stage(nx % kStages, c_begin + nx);
    cp_async_commit();
    const bf16* sx = sm + (it % kStages) * Tile<EB>::stage_elems;
    const bf16* sw = sx + kTT * kLds;
#pragma unroll
    for (int kk = 0; kk < kKC; kk += 16) {
      uint32_t a[4];
      ldmatrix_x4(a, sx + a_off + kk);
#pragma unroll
      for (int p = 0; p < NT / 2; ++p) {
        uint32_t b[4];
        ldmatrix_x4(b, sw + b_off + p * 16 * kLds + kk);
        mma_bf16_16816(acc[2 * p], a, b[0], b[1]);
        mma_bf16_16816(acc[2 * p + 1], a, b[2], b[3]);
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // every warp is done with the pipeline buffers (the epilogue may reuse them)
}

// Selects token t's top-k from `logit(e)` for e < E (read by lane e % 32), writes ids/weights.
// Called by a whole warp.
template <int KMAX, int EPL, typename LogitFn>
__device__ __forceinline__ void select_token(LogitFn logit, int E, int k, int64_t t,
                                             int32_t* __restrict__ ids, float* __restrict__ weights) {
  const int lane = threadIdx.x & 31;
  float val[KMAX];
  int idx[KMAX];
  gptoss::topk_init(val, idx);
#pragma unroll
  for (int i = 0; i < EPL; ++i) {
    const int e = lane + 32 * i;
    if (e < E) gptoss::topk_insert(val, idx, logit(i, e), e);
  }
  float sv[KMAX];
  int si[KMAX];
  gptoss::topk_warp_merge(val, idx, sv, si);
  if (lane == 0) {
    float wt[KMAX];
    gptoss::topk_softmax(sv, k, wt);
#pragma unroll
    for (int j = 0; j < KMAX; ++j) {
      if (j < k) {
        ids[t * k + j] = si[j];
        weights[t * k + j] = wt[j];
      }
    }
  }
}

// FUSED path: grid (ceil(T/64)); the block's EB >= E covers every expert.
template <int EB, int KMAX>
__global__ void __launch_bounds__(kThreads) router_fused_kernel(
    const bf16* __restrict__ x, const bf16* __restrict__ w, const bf16* __restrict__ bias, int T,
    int H, int E, int k, int32_t* __restrict__ ids, float* __restrict__ weights) {
  GPTOSS_DYNAMIC_SMEM(unsigned char, smem, 16);
  constexpr int NT = Tile<EB>::NT, LDL = Tile<EB>::ldl, EPL = EB / 32;
  gptoss::pdl::wait();  // x: the norm's output
  gptoss::pdl::launch_dependents();
  const int t0 = blockIdx.x * kTT;
  float acc[NT][4];
  logits_mainloop<EB>(x, w, T, H, E, t0, 0, 0, (H + kKC - 1) / kKC, reinterpret_cast<bf16*>(smem), acc);

  // accumulators -> shared logits [64][LDL]
  float* sl = reinterpret_cast<float*>(smem);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp & 3, wn = warp >> 2, g = lane >> 2, tig = lane & 3;
#pragma unroll
  for (int n = 0; n < NT; ++n) {
    const int col = wn * (EB / 2) + n * 8 + 2 * tig, row = wm * 16 + g;
    *reinterpret_cast<float2*>(sl + row * LDL + col) = make_float2(acc[n][0], acc[n][1]);
    *reinterpret_cast<float2*>(sl + (row + 8) * LDL + col) = make_float2(acc[n][2], acc[n][3]);
  }
  float bl[EPL];
#pragma unroll
  for (int i = 0; i < EPL; ++i) {
    const int e = lane + 32 * i;
    bl[i] = e < E ? __bfloat162float(bias[e]) : 0.0f;
  }
  __syncthreads();
  for (int r = warp; r < kTT; r += kThreads / 32) {
    const int t = t0 + r;
    if (t >= T) break;  // warp-uniform
    const float* row = sl + r * LDL;
    select_token<KMAX, EPL>([&](int i, int e) { return row[e] + bl[i]; }, E, k, t, ids, weights);
  }
}

// CLUSTER path (T <= 64 per tile, E <= 128): one thread-block cluster of kClusterRanks blocks per
// 64-token tile. Rank r accumulates all experts (EB = 128) over its slice of H, chunks
// [r*nc/R, (r+1)*nc/R), into its own shared logits tile. After a cluster barrier, warp w of rank r
// takes tile row r*8 + w: it sums the R ranks' logits in rank order through distributed shared
// memory, adds the bias and selects. One kernel, no workspace, deterministic.
constexpr int kClusterRanks = 8;
constexpr int kClusterEB = 128;
static_assert(kClusterRanks * (kThreads / 32) == kTT, "one warp per token of the tile");

// The residual add + RMSNorm before the router, folded into the CLUSTER kernel (the decode step,
// T <= kAddNormMaxTokens): delta (the attention block's output) + residual -> residual_out (may
// alias residual), RMSNorm * weight -> norm_out, which is also the router's input x.
struct AddNormArgs {
  const uint4* delta;
  const uint4* residual;
  uint4* residual_out;
  const void* weight;   // bf16 or float32 [H] (the kernel's WT)
  float eps;
  uint4* norm_out;
};
constexpr int kAddNormMaxTokens = 16;

static_assert(kAddNormMaxTokens <= kTT, "the add + norm rows lie in one 64-token tile");

// Every rank needs the whole rows' sums of squares, so every rank reads the rows of its tile; it
// sums them exactly as rms_norm_kernel does (rms_block.cuh: 8-element chunks, groups of 32
// chunks reduced by a warp butterfly, lane 0's value, then the groups in order), so norm_out and
// residual_out get the bits of gptoss_rms_norm_bf16. All rows at once: item (row, chunk) over
// rows x (groups * 32); a warp's 32 items are one group of one row. inv[r] for tile row r.
#if !GPTOSS_NO_SM90_CODE_PASS
__device__ __forceinline__ void add_norm_rows_inv(const AddNormArgs& an, int H, int t0, int rows,
                                                  float (*group_sums)[gptoss::dense::kRmsMaxThreads / 32],
                                                  float* inv) {
  const int chunks = H >> 3, lane = threadIdx.x & 31;
  const int groups = (chunks + 31) >> 5, gpad = groups * 32;
  for (int base = 0; base < rows * gpad; base += kThreads) {
    const int item = base + static_cast<int>(threadIdx.x);
    const int r = item / gpad, c = item - r * gpad;
    float s = 0.f;
    if (r < rows && c < chunks) {
      const int64_t row = static_cast<int64_t>(t0 + r) * chunks;
      float f[8], q[8];
      gptoss::unpack_bf16x8(__ldcg(an.delta + row + c), f);
      gptoss::unpack_bf16x8(__ldcg(an.residual + row + c), q);
#pragma unroll
      for (int i = 0; i < 8; ++i) f[i] = gptoss::dense::residual_add(f[i], q[i]);
#pragma unroll
      for (int i = 0; i < 8; ++i) s = fmaf(f[i], f[i], s);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (lane == 0 && r < rows) group_sums[r][c >> 5] = s;
  }
  __syncthreads();
  if (static_cast<int>(threadIdx.x) < rows) {
    float t = 0.f;
    for (int i = 0; i < groups; ++i) t += group_sums[threadIdx.x][i];
    inv[threadIdx.x] = gptoss::dense::rms_inv(t, 8 * chunks, an.eps);
  }
  // (the caller's cluster.sync publishes inv to the block)
}
#endif  // the cluster kernel alone uses it

// x: the router input (with kAddNorm: an.norm_out, which this kernel writes first: not __restrict__).
template <int KMAX, bool kAddNorm, typename WT>
// Launched as clusters of kClusterRanks blocks along x (a launch attribute: see launch_cluster).
__global__ void __launch_bounds__(kThreads, 2) router_cluster_kernel(
    const bf16* x, const bf16* __restrict__ w, const bf16* __restrict__ bias, int T, int H, int E,
    int k, int32_t* __restrict__ ids, float* __restrict__ weights, const AddNormArgs an) {
#if GPTOSS_NO_SM90_CODE_PASS
  GPTOSS_UNAVAILABLE_KERNEL_BODY();  // no clusters in sm_80..89 code: never launched there (resolve_path)
#else
  namespace cg = cooperative_groups;
  GPTOSS_DYNAMIC_SMEM(unsigned char, smem, 16);
  constexpr int EB = kClusterEB, NT = Tile<EB>::NT, LDL = Tile<EB>::ldl, EPL = EB / 32;
  cg::cluster_group cluster = cg::this_cluster();
  const int rank = static_cast<int>(cluster.block_rank());
  const int nc = (H + kKC - 1) / kKC;
  const int c_begin = rank * nc / kClusterRanks, c_end = (rank + 1) * nc / kClusterRanks;
  // PDL: this rank's slice of the gate rows (weights) towards L2, then wait for x (or delta and
  // residual: earlier kernels' outputs)
  if (static_cast<int>(threadIdx.x) < E && c_begin < c_end) {
    const int h0 = c_begin * kKC, h1 = min(H, c_end * kKC);
    gptoss::pdl::prefetch_l2(w + static_cast<int64_t>(threadIdx.x) * H + h0, static_cast<uint32_t>(h1 - h0) * 2u);
  }
  gptoss::pdl::wait();
  gptoss::pdl::launch_dependents();
  const int t0 = static_cast<int>(blockIdx.x / kClusterRanks) * kTT;

  if constexpr (kAddNorm) {
    // 1. every rank: the inverse RMS of each row of the tile (reads whole rows of delta, residual)
    __shared__ float group_sums[kAddNormMaxTokens][gptoss::dense::kRmsMaxThreads / 32];
    __shared__ float inv[kAddNormMaxTokens];
    const int rows = min(T - t0, kAddNormMaxTokens);
    add_norm_rows_inv(an, H, t0, rows, group_sums, inv);
    // 2. every rank has read residual (and inv is published): now rank q writes its slice
    //    [c0, c1) of residual_out (in place) and of norm_out, which its own main loop reads back
    cluster.sync();
    const int chunks = H >> 3, c0 = c_begin * (kKC / 8), c1 = min(chunks, c_end * (kKC / 8));
    const int width = c1 - c0;
    const WT* wt = static_cast<const WT*>(an.weight);
    for (int i = threadIdx.x; width > 0 && i < rows * width; i += kThreads) {
      const int r = i / width, c = c0 + (i - r * width);
      const int64_t row = static_cast<int64_t>(t0 + r) * chunks;
      uint4 h;
      gptoss::dense::add_residual_chunk<true>(__ldcg(an.delta + row + c), an.residual + row, an.residual_out + row, c,
                                              h);
      an.norm_out[row + c] = gptoss::dense::norm_chunk(h, wt, c, inv[r]);
    }
    __threadfence();  // device scope: the cp.async.cg reads below go to L2
    __syncthreads();  // this block's norm_out slice is written before its cp.async reads it
  }

  float acc[NT][4];
  logits_mainloop<EB>(x, w, T, H, E, t0, 0, c_begin, c_end, reinterpret_cast<bf16*>(smem), acc);

  // accumulators -> this rank's shared logits [64][LDL] (the pipeline buffers are free)
  float* sl = reinterpret_cast<float*>(smem);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp & 3, wn = warp >> 2, g = lane >> 2, tig = lane & 3;
#pragma unroll
  for (int n = 0; n < NT; ++n) {
    const int col = wn * (EB / 2) + n * 8 + 2 * tig, row = wm * 16 + g;
    *reinterpret_cast<float2*>(sl + row * LDL + col) = make_float2(acc[n][0], acc[n][1]);
    *reinterpret_cast<float2*>(sl + (row + 8) * LDL + col) = make_float2(acc[n][2], acc[n][3]);
  }
  float bl[EPL];
#pragma unroll
  for (int i = 0; i < EPL; ++i) {
    const int e = lane + 32 * i;
    bl[i] = e < E ? __bfloat162float(bias[e]) : 0.0f;
  }
  cluster.sync();  // every rank's logits tile is written (and visible across the cluster)
  const int r = rank * (kThreads / 32) + warp;
  if (t0 + r < T) {
    const float* part[kClusterRanks];
#pragma unroll
    for (int q = 0; q < kClusterRanks; ++q) part[q] = cluster.map_shared_rank(sl, q) + r * LDL;
    select_token<KMAX, EPL>(
        [&](int i, int e) {
          float v = 0.0f;
#pragma unroll
          for (int q = 0; q < kClusterRanks; ++q) v += part[q][e];
          return v + bl[i];
        },
        E, k, t0 + r, ids, weights);
  }
  cluster.sync();  // this block's logits stay alive until every rank has read them
#endif  // GPTOSS_NO_SM90_CODE_PASS
}

// SPLIT path, part 1: grid (ceil(E/32), ceil(T/64), splits); block z sums H chunks
// [z*nc/splits, (z+1)*nc/splits) into partial[z][T][E] (no bias).
__global__ void __launch_bounds__(kThreads) router_partial_kernel(
    const bf16* __restrict__ x, const bf16* __restrict__ w, int T, int H, int E,
    float* __restrict__ partial) {
  GPTOSS_DYNAMIC_SMEM(unsigned char, smem, 16);
  constexpr int EB = kSplitEB, NT = Tile<EB>::NT;
  const int e0 = blockIdx.x * EB, t0 = blockIdx.y * kTT;
  const int nc = (H + kKC - 1) / kKC;
  const int c_begin = static_cast<int>(static_cast<int64_t>(blockIdx.z) * nc / gridDim.z);
  const int c_end = static_cast<int>(static_cast<int64_t>(blockIdx.z + 1) * nc / gridDim.z);
  // PDL: this block's gate rows (weights, never written by a kernel) start towards L2, then wait
  // for x (the norm's output; the mainloop reads it with cp.async.cg, L2-coherent)
  if (threadIdx.x < EB && e0 + static_cast<int>(threadIdx.x) < E && c_begin < c_end) {
    const int h0 = c_begin * kKC, h1 = min(H, c_end * kKC);
    gptoss::pdl::prefetch_l2(w + static_cast<int64_t>(e0 + threadIdx.x) * H + h0, static_cast<uint32_t>(h1 - h0) * 2u);
  }
  gptoss::pdl::wait();
  gptoss::pdl::launch_dependents();
  float acc[NT][4];
  logits_mainloop<EB>(x, w, T, H, E, t0, e0, c_begin, c_end, reinterpret_cast<bf16*>(smem), acc);

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int wm = warp & 3, wn = warp >> 2, g = lane >> 2, tig = lane & 3;
  float* out = partial + static_cast<int64_t>(blockIdx.z) * T * E;
#pragma unroll
  for (int n = 0; n < NT; ++n) {
    const int col = e0 + wn * (EB / 2) + n * 8 + 2 * tig;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int t = t0 + wm * 16 + g + 8 * h;
      if (t >= T) continue;
      float* o = out + static_cast<int64_t>(t) * E;
      if (col < E) o[col] = acc[n][2 * h];
      if (col + 1 < E) o[col + 1] = acc[n][2 * h + 1];
    }
  }
}

// SPLIT path, part 2: one warp per token: logit = sum over slices (in slice order: deterministic)
// + bias, then select. Loads are batched 4 slices x 8 experts per lane so ~32 are in flight.
template <int KMAX>
__global__ void __launch_bounds__(kThreads) router_select_kernel(
    const float* __restrict__ partial, int splits, const bf16* __restrict__ bias, int T, int E,
    int k, int32_t* __restrict__ ids, float* __restrict__ weights) {
  constexpr int EPL = kMaxE / 32, U = 4;
  gptoss::pdl::wait();  // partial: the partial kernel's output (read L2-coherent)
  gptoss::pdl::launch_dependents();
  const int64_t t = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + (threadIdx.x >> 5);
  if (t >= T) return;  // warp-uniform
  const int lane = threadIdx.x & 31;
  const int64_t slice = static_cast<int64_t>(T) * E;
  const float* p = partial + t * E + lane;
  float lg[EPL];
#pragma unroll
  for (int i = 0; i < EPL; ++i) lg[i] = 0.0f;
  int z = 0;
  for (; z + U <= splits; z += U) {
    float v[U][EPL];
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int i = 0; i < EPL; ++i) v[u][i] = (lane + 32 * i < E) ? __ldcg(p + (z + u) * slice + 32 * i) : 0.0f;
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int i = 0; i < EPL; ++i) lg[i] += v[u][i];
  }
  for (; z < splits; ++z)
#pragma unroll
    for (int i = 0; i < EPL; ++i)
      if (lane + 32 * i < E) lg[i] += __ldcg(p + z * slice + 32 * i);
#pragma unroll
  for (int i = 0; i < EPL; ++i)
    if (lane + 32 * i < E) lg[i] += __bfloat162float(bias[lane + 32 * i]);
  select_token<KMAX, EPL>([&](int i, int) { return lg[i]; }, E, k, t, ids, weights);
}

int split_count(int64_t T, int64_t H, int64_t E) {
  const int64_t tiles = (T + kTT - 1) / kTT, groups = (E + kSplitEB - 1) / kSplitEB;
  const int64_t nc = (H + kKC - 1) / kKC;
  int64_t s = (kTargetBlocks + tiles * groups - 1) / (tiles * groups);
  if (s > kMaxSplits) s = kMaxSplits;
  if (s > nc) s = nc;
  if (s < 1) s = 1;
  return static_cast<int>(s);
}

int fused_smem_bytes(int64_t E) {
  return E <= 32 ? Tile<32>::smem_bytes : E <= 64 ? Tile<64>::smem_bytes : E <= 128 ? Tile<128>::smem_bytes
                                                                                   : Tile<256>::smem_bytes;
}

// The path AUTO takes on a device with (clusters) thread-block clusters and (max_smem) bytes of
// shared memory per block: CLUSTER for the decode step where clusters exist, else FUSED for many
// tokens when its tile fits, else SPLIT.
int resolve_path(int64_t T, int64_t E, int path, bool clusters, int max_smem) {
  if (path != GPTOSS_ROUTER_PATH_AUTO) return path;
  if (clusters && T <= kTT && E <= kClusterEB) return GPTOSS_ROUTER_PATH_CLUSTER;  // the decode step: one launch
  return (T + kTT - 1) / kTT >= kFusedMinTiles && fused_smem_bytes(E) <= max_smem ? GPTOSS_ROUTER_PATH_FUSED
                                                                                 : GPTOSS_ROUTER_PATH_SPLIT;
}
constexpr int kSmallestSmem = 99 * 1024;  // sm_86/89: the least shared memory per block of any supported device

// Raises the kernel's dynamic shared memory limit once per device (not again during a graph
// capture that follows a first, eager call).
template <typename Kernel>
gptoss_status set_smem_once(Kernel kernel, int bytes, std::atomic<uint64_t>& done) {
  if (bytes <= 48 * 1024) return GPTOSS_OK;
  int dev = 0;
  GPTOSS_CUDA_TRY(cudaGetDevice(&dev), "router: cudaGetDevice");
  const uint64_t bit = dev < 64 ? (uint64_t{1} << dev) : 0;
  if (bit && (done.load(std::memory_order_acquire) & bit)) return GPTOSS_OK;
  GPTOSS_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes),
                  "router: cudaFuncSetAttribute(max dynamic shared memory)");
  done.fetch_or(bit, std::memory_order_acq_rel);
  return GPTOSS_OK;
}

template <int EB, int KMAX>
gptoss_status launch_fused(const bf16* x, const bf16* w, const bf16* bias, int32_t* ids, float* wts,
                           int T, int H, int E, int k, cudaStream_t stream) {
  static std::atomic<uint64_t> smem_set{0};
  auto kernel = router_fused_kernel<EB, KMAX>;
  constexpr int smem = Tile<EB>::smem_bytes;
  const gptoss_status st = set_smem_once(kernel, smem, smem_set);
  if (st != GPTOSS_OK) return st;
  GPTOSS_CUDA_TRY(gptoss::pdl::launch(kernel, dim3((T + kTT - 1) / kTT), dim3(kThreads), smem, stream, true, x, w, bias,
                                      T, H, E, k, ids, wts),
                  "router_fused_kernel launch");
  return GPTOSS_OK;
}

template <int KMAX, bool kAddNorm, typename WT>
gptoss_status launch_cluster(const bf16* x, const bf16* w, const bf16* bias, int32_t* ids, float* wts, int T, int H,
                             int E, int k, const AddNormArgs& an, cudaStream_t stream) {
  static std::atomic<uint64_t> smem_set{0};
  auto kernel = router_cluster_kernel<KMAX, kAddNorm, WT>;
  constexpr int smem = Tile<kClusterEB>::smem_bytes;
  const gptoss_status st = set_smem_once(kernel, smem, smem_set);
  if (st != GPTOSS_OK) return st;
  const unsigned tiles = static_cast<unsigned>((T + kTT - 1) / kTT);
  const cudaError_t err = gptoss::pdl::launch_clusters(kernel, dim3(tiles * kClusterRanks), dim3(kThreads), smem, stream,
                                                       kClusterRanks, true, x, w, bias, T, H, E, k, ids, wts, an);
  if (err == cudaSuccess || err == cudaErrorStreamCaptureInvalidated || err == cudaErrorStreamCaptureUnsupported)
    return gptoss::cuda_status(err, "router_cluster_kernel launch");
  // refused (a partitioned GPU: MIG, MPS SM limits, green contexts): the caller may take another path
  return gptoss::set_error(GPTOSS_ERROR_UNSUPPORTED, std::string("router: the 8-block thread-block cluster launch was "
                                                                 "refused (") + cudaGetErrorName(err) + ")");
}

template <int KMAX>
gptoss_status launch_fused_e(const bf16* x, const bf16* w, const bf16* bias, int32_t* ids, float* wts,
                             int T, int H, int E, int k, cudaStream_t stream) {
  if (E <= 32) return launch_fused<32, KMAX>(x, w, bias, ids, wts, T, H, E, k, stream);
  if (E <= 64) return launch_fused<64, KMAX>(x, w, bias, ids, wts, T, H, E, k, stream);
  if (E <= 128) return launch_fused<128, KMAX>(x, w, bias, ids, wts, T, H, E, k, stream);
  return launch_fused<256, KMAX>(x, w, bias, ids, wts, T, H, E, k, stream);
}

// ---- route metadata -------------------------------------------------------------------------
// Rows are cut into NB contiguous chunks of `chunk` rows (NB <= 128); workspace = block_counts
// int32 [NB][E]. count: per-chunk histogram -> block_counts. scan: per expert, exclusive scan of
// block_counts over chunks (in place) and counts[e]; offsets = exclusive scan of counts.
// scatter: chunk b's rows of expert e go to offsets[e] + block_counts[b][e] + (rank among the
// chunk's earlier rows of e), the rank from __match_any_sync within a warp plus earlier warps.
constexpr int kRouteThreads = 256;  // >= kMaxE: one thread per expert in the scan
constexpr int kRouteMaxChunks = 128;

int64_t route_chunk(int64_t n) {
  int64_t c = (n + kRouteMaxChunks - 1) / kRouteMaxChunks;
  c = (c + kRouteThreads - 1) / kRouteThreads * kRouteThreads;
  return c < 1024 ? 1024 : c;
}

__global__ void __launch_bounds__(kRouteThreads) route_count_kernel(const int32_t* __restrict__ ids,
                                                                    int n, int E, int chunk,
                                                                    int32_t* __restrict__ block_counts) {
  __shared__ int hist[kMaxE];
  const int tid = threadIdx.x;
  if (tid < E) hist[tid] = 0;
  __syncthreads();
  const int begin = blockIdx.x * chunk, end = min(n, begin + chunk);
  for (int r = begin + tid; r < end; r += kRouteThreads) {
    const int e = ids[r];
    if (e >= 0 && e < E) atomicAdd(&hist[e], 1);
  }
  __syncthreads();
  if (tid < E) block_counts[static_cast<int64_t>(blockIdx.x) * E + tid] = hist[tid];
}

__global__ void __launch_bounds__(kRouteThreads) route_scan_kernel(int32_t* __restrict__ block_counts,
                                                                   int nb, int n, int E,
                                                                   int32_t* __restrict__ counts,
                                                                   int32_t* __restrict__ offsets,
                                                                   int32_t* __restrict__ perm) {
  __shared__ int warp_sums[kRouteThreads / 32];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  int total = 0;
  if (tid < E) {
    for (int b = 0; b < nb; ++b) {
      int32_t* p = block_counts + static_cast<int64_t>(b) * E + tid;
      const int c = *p;
      *p = total;
      total += c;
    }
    counts[tid] = total;
  }
  // exclusive scan of `total` over the block (threads >= E contribute 0)
  int incl = total;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const int v = __shfl_up_sync(0xffffffffu, incl, off);
    if (lane >= off) incl += v;
  }
  if (lane == 31) warp_sums[warp] = incl;
  __syncthreads();
  int before = 0;
#pragma unroll
  for (int w2 = 0; w2 < kRouteThreads / 32; ++w2)
    if (w2 < warp) before += warp_sums[w2];
  const int excl = before + incl - total;
  if (tid < E) offsets[tid] = excl;
  if (tid == E - 1) offsets[E] = excl + total;
  int all = 0;
#pragma unroll
  for (int w2 = 0; w2 < kRouteThreads / 32; ++w2) all += warp_sums[w2];
  for (int p = all + tid; p < n; p += kRouteThreads) perm[p] = -1;  // rows with invalid ids
}

__global__ void __launch_bounds__(kRouteThreads) route_scatter_kernel(
    const int32_t* __restrict__ ids, int n, int E, int chunk, const int32_t* __restrict__ block_counts,
    const int32_t* __restrict__ offsets, int32_t* __restrict__ perm) {
  constexpr int W = kRouteThreads / 32;
  __shared__ int base[kMaxE];
  __shared__ int wc[W][kMaxE];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  if (tid < E) {
    base[tid] = offsets[tid] + block_counts[static_cast<int64_t>(blockIdx.x) * E + tid];
#pragma unroll
    for (int w2 = 0; w2 < W; ++w2) wc[w2][tid] = 0;
  }
  __syncthreads();
  const int begin = blockIdx.x * chunk, end = min(n, begin + chunk);
  const unsigned lt = (1u << lane) - 1u;
  for (int start = begin; start < end; start += kRouteThreads) {
    const int r = start + tid;
    int e = r < end ? ids[r] : -1;
    const bool valid = r < end && e >= 0 && e < E;
    if (!valid) e = -1;
    const unsigned same = __match_any_sync(0xffffffffu, e);
    const int rank = __popc(same & lt);
    if (valid && rank == 0) wc[warp][e] = __popc(same);
    __syncthreads();
    if (valid) {
      int pos = base[e] + rank;
#pragma unroll
      for (int w2 = 0; w2 < W; ++w2)
        if (w2 < warp) pos += wc[w2][e];
      perm[pos] = r;
    }
    __syncthreads();
    if (tid < E) {
      int s = 0;
#pragma unroll
      for (int w2 = 0; w2 < W; ++w2) {
        s += wc[w2][tid];
        wc[w2][tid] = 0;
      }
      base[tid] += s;
    }
    __syncthreads();
  }
}

}  // namespace

GPTOSS_API size_t gptoss_router_topk_workspace_size(int64_t T, int64_t H, int64_t E, int k, int path) {
  (void)k;
  if (T <= 0 || H <= 0 || E <= 0) return 0;
  // AUTO: enough for the path any device takes (SPLIT where clusters or shared memory are missing)
  if (resolve_path(T, E, path, false, kSmallestSmem) != GPTOSS_ROUTER_PATH_SPLIT) return 0;
  return static_cast<size_t>(split_count(T, H, E)) * static_cast<size_t>(T) * static_cast<size_t>(E) *
         sizeof(float);
}

GPTOSS_API gptoss_status gptoss_router_topk_bf16(const void* x, const void* weight, const void* bias,
                                                 int32_t* topk_ids, float* topk_weights, int64_t T,
                                                 int64_t H, int64_t E, int k, int path,
                                                 void* workspace, size_t workspace_bytes,
                                                 cudaStream_t stream) {
  GPTOSS_REQUIRE(T >= 0 && T <= (int64_t{1} << 30), "router_topk: T must be in [0, 2^30]");
  GPTOSS_REQUIRE(H > 0 && H % 8 == 0 && H <= (int64_t{1} << 24),
                 "router_topk: H must be a positive multiple of 8");
  GPTOSS_REQUIRE(E >= 1, "router_topk: E must be >= 1");
  if (E > kMaxE) return gptoss::set_error(GPTOSS_ERROR_UNSUPPORTED, "router_topk: E > 256 is not supported");
  GPTOSS_REQUIRE(k >= 1 && k <= E, "router_topk: k must be in [1, E]");
  if (k > kMaxK) return gptoss::set_error(GPTOSS_ERROR_UNSUPPORTED, "router_topk: k > 8 is not supported");
  GPTOSS_REQUIRE(path == GPTOSS_ROUTER_PATH_AUTO || path == GPTOSS_ROUTER_PATH_FUSED ||
                     path == GPTOSS_ROUTER_PATH_SPLIT || path == GPTOSS_ROUTER_PATH_CLUSTER,
                 "router_topk: unknown path");
  if (path == GPTOSS_ROUTER_PATH_CLUSTER && E > kClusterEB)
    return gptoss::set_error(GPTOSS_ERROR_UNSUPPORTED, "router_topk: the CLUSTER path takes E <= 128");
  if (T == 0) return GPTOSS_OK;
  GPTOSS_REQUIRE(x && weight && bias && topk_ids && topk_weights, "router_topk: null pointer");
  GPTOSS_REQUIRE(gptoss::aligned(x, 16) && gptoss::aligned(weight, 16),
                 "router_topk: x and weight must be 16-byte aligned");
  const bf16* xb = static_cast<const bf16*>(x);
  const bf16* wb = static_cast<const bf16*>(weight);
  const bf16* bb = static_cast<const bf16*>(bias);
  const int Ti = static_cast<int>(T), Hi = static_cast<int>(H), Ei = static_cast<int>(E);
  gptoss_arch_info arch;
  const gptoss_status arch_st = gptoss::arch::current(&arch);
  if (arch_st != GPTOSS_OK) return arch_st;
  if (path == GPTOSS_ROUTER_PATH_CLUSTER && !arch.clusters)
    return gptoss::set_error(GPTOSS_ERROR_UNSUPPORTED,
                             std::string("router_topk: the CLUSTER path needs thread-block clusters (compute capability "
                                         ">= 9.0); the paths here are ") +
                                 gptoss::arch::cc_name(arch.cc) + "'s (use AUTO, SPLIT or FUSED)");
  if (path == GPTOSS_ROUTER_PATH_FUSED && fused_smem_bytes(E) > arch.max_smem_per_block)
    return gptoss::set_error(GPTOSS_ERROR_UNSUPPORTED,
                             "router_topk: the FUSED path's tile for E = " + std::to_string(E) + " needs " +
                                 std::to_string(fused_smem_bytes(E)) + " bytes of shared memory per block; the device "
                                 "allows " + std::to_string(arch.max_smem_per_block) + " (use AUTO or SPLIT)");
  const int resolved = resolve_path(T, E, path, arch.clusters != 0, arch.max_smem_per_block);
  if (resolved == GPTOSS_ROUTER_PATH_CLUSTER) {
    const gptoss_status st =
        k <= 4 ? launch_cluster<4, false, bf16>(xb, wb, bb, topk_ids, topk_weights, Ti, Hi, Ei, k, AddNormArgs{}, stream)
               : launch_cluster<8, false, bf16>(xb, wb, bb, topk_ids, topk_weights, Ti, Hi, Ei, k, AddNormArgs{}, stream);
    // AUTO picked the cluster path: a refused cluster falls back to the fused path (the same top-k
    // up to the logits' summation order)
    if (st != GPTOSS_ERROR_UNSUPPORTED || path == GPTOSS_ROUTER_PATH_CLUSTER) return st;
  }
  if (resolved == GPTOSS_ROUTER_PATH_FUSED || resolved == GPTOSS_ROUTER_PATH_CLUSTER) {
    return k <= 4 ? launch_fused_e<4>(xb, wb, bb, topk_ids, topk_weights, Ti, Hi, Ei, k, stream)
                  : launch_fused_e<8>(xb, wb, bb, topk_ids, topk_weights, Ti, Hi, Ei, k, stream);
  }
  const size_t need = gptoss_router_topk_workspace_size(T, H, E, k, path);
  GPTOSS_REQUIRE(workspace && workspace_bytes >= need && gptoss::aligned(workspace, 16),
                 "router_topk: workspace missing, too small or not 16-byte aligned "
                 "(see gptoss_router_topk_workspace_size)");
  const int splits = split_count(T, H, E);
  float* partial = static_cast<float*>(workspace);
  {
    constexpr int smem = Tile<kSplitEB>::smem_bytes;
    static_assert(smem <= 48 * 1024, "split kernel shared memory");
    const dim3 grid((Ei + kSplitEB - 1) / kSplitEB, (Ti + kTT - 1) / kTT, splits);
    GPTOSS_CUDA_TRY(gptoss::pdl::launch(router_partial_kernel, grid, dim3(kThreads), smem, stream, true, xb, wb, Ti, Hi,
                                        Ei, partial),
                    "router_partial_kernel launch");
  }
  const dim3 grid((Ti + kThreads / 32 - 1) / (kThreads / 32));
  GPTOSS_CUDA_TRY(gptoss::pdl::launch(k <= 4 ? router_select_kernel<4> : router_select_kernel<8>, grid, dim3(kThreads), 0,
                                      stream, true, static_cast<const float*>(partial), splits, bb, Ti, Ei, k,
                                      topk_ids, topk_weights),
                  "router_select_kernel launch");
  return GPTOSS_OK;
}

GPTOSS_API int64_t gptoss_add_rms_norm_router_topk_max_tokens(void) { return kAddNormMaxTokens; }

GPTOSS_API gptoss_status gptoss_add_rms_norm_router_topk_bf16(
    const void* delta, const void* residual, void* residual_out, const void* norm_weight, int norm_weight_fp32,
    float eps, void* norm_out, const void* weight, const void* bias, int32_t* topk_ids, float* topk_weights, int64_t T,
    int64_t H, int64_t E, int k, cudaStream_t stream) {
  GPTOSS_REQUIRE(T >= 0 && T <= kAddNormMaxTokens, "add_rms_norm_router_topk: T must be in [0, 16]");
  GPTOSS_REQUIRE(H > 0 && H % 8 == 0 && H / 8 <= gptoss::dense::kRmsMaxThreads,
                 "add_rms_norm_router_topk: H must be a positive multiple of 8, at most 8192");
  if (E < 1 || E > kClusterEB)
    return gptoss::set_error(GPTOSS_ERROR_UNSUPPORTED, "add_rms_norm_router_topk: E must be in [1, 128]");
  GPTOSS_REQUIRE(k >= 1 && k <= E, "add_rms_norm_router_topk: k must be in [1, E]");
  if (k > kMaxK) return gptoss::set_error(GPTOSS_ERROR_UNSUPPORTED, "add_rms_norm_router_topk: k > 8 is not supported");
  if (T == 0) return GPTOSS_OK;
  GPTOSS_REQUIRE(delta && residual && residual_out && norm_weight && norm_out && weight && bias && topk_ids &&
                     topk_weights,
                 "add_rms_norm_router_topk: null pointer");
  GPTOSS_REQUIRE(gptoss::aligned(delta, 16) && gptoss::aligned(residual, 16) && gptoss::aligned(residual_out, 16) &&
                     gptoss::aligned(norm_weight, 16) && gptoss::aligned(norm_out, 16) && gptoss::aligned(weight, 16),
                 "add_rms_norm_router_topk: delta, residual, residual_out, norm_weight, norm_out and weight must be "
                 "16-byte aligned");
  const AddNormArgs an{static_cast<const uint4*>(delta), static_cast<const uint4*>(residual),
                       static_cast<uint4*>(residual_out), norm_weight, eps, static_cast<uint4*>(norm_out)};
  const auto* xb = static_cast<const bf16*>(norm_out);
  const auto* wb = static_cast<const bf16*>(weight);
  const auto* bb = static_cast<const bf16*>(bias);
  const int Ti = static_cast<int>(T), Hi = static_cast<int>(H), Ei = static_cast<int>(E);
  gptoss_arch_info arch;
  const gptoss_status arch_st = gptoss::arch::current(&arch);
  if (arch_st != GPTOSS_OK) return arch_st;
  if (!arch.clusters) {
    // below sm_90: the RMSNorm kernel, then the FUSED router (no workspace); the same values
    const gptoss_status st = gptoss_rms_norm_bf16(delta, residual, norm_weight, norm_weight_fp32, norm_out, residual_out,
                                                  T, H, eps, stream);
    if (st != GPTOSS_OK) return st;
    return k <= 4 ? launch_fused_e<4>(xb, wb, bb, topk_ids, topk_weights, Ti, Hi, Ei, k, stream)
                  : launch_fused_e<8>(xb, wb, bb, topk_ids, topk_weights, Ti, Hi, Ei, k, stream);
  }
  if (norm_weight_fp32)
    return k <= 4 ? launch_cluster<4, true, float>(xb, wb, bb, topk_ids, topk_weights, Ti, Hi, Ei, k, an, stream)
                  : launch_cluster<8, true, float>(xb, wb, bb, topk_ids, topk_weights, Ti, Hi, Ei, k, an, stream);
  return k <= 4 ? launch_cluster<4, true, bf16>(xb, wb, bb, topk_ids, topk_weights, Ti, Hi, Ei, k, an, stream)
                : launch_cluster<8, true, bf16>(xb, wb, bb, topk_ids, topk_weights, Ti, Hi, Ei, k, an, stream);
}

GPTOSS_API size_t gptoss_route_workspace_size(int64_t n_rows, int64_t E) {
  if (n_rows <= 0 || E <= 0) return 0;
  const int64_t nb = (n_rows + route_chunk(n_rows) - 1) / route_chunk(n_rows);
  return static_cast<size_t>(nb * E) * sizeof(int32_t);
}

GPTOSS_API gptoss_status gptoss_route(const int32_t* topk_ids, int64_t n_rows, int64_t E,
                                      int32_t* counts, int32_t* offsets, int32_t* permutation,
                                      void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  GPTOSS_REQUIRE(n_rows >= 0 && n_rows < (int64_t{1} << 30), "route: n_rows must be in [0, 2^30)");
  GPTOSS_REQUIRE(E >= 1, "route: E must be >= 1");
  if (E > kMaxE) return gptoss::set_error(GPTOSS_ERROR_UNSUPPORTED, "route: E > 256 is not supported");
  GPTOSS_REQUIRE(counts && offsets, "route: null pointer");
  GPTOSS_REQUIRE(n_rows == 0 || (topk_ids && permutation), "route: null pointer");
  const size_t need = gptoss_route_workspace_size(n_rows, E);
  GPTOSS_REQUIRE(need == 0 || (workspace && workspace_bytes >= need && gptoss::aligned(workspace, 4)),
                 "route: workspace missing or too small (see gptoss_route_workspace_size)");
  const int n = static_cast<int>(n_rows), Ei = static_cast<int>(E);
  const int chunk = static_cast<int>(route_chunk(n_rows));
  const int nb = n == 0 ? 0 : (n + chunk - 1) / chunk;
  int32_t* bc = static_cast<int32_t*>(workspace);
  if (nb > 0) {
    GPTOSS_CUDA_TRY(gptoss::pdl::launch_plain(route_count_kernel, dim3(nb), dim3(kRouteThreads), 0, stream, topk_ids, n, Ei, chunk, bc), "route_count_kernel launch");
  }
  GPTOSS_CUDA_TRY(gptoss::pdl::launch_plain(route_scan_kernel, dim3(1), dim3(kRouteThreads), 0, stream, bc, nb, n, Ei, counts, offsets, permutation), "route_scan_kernel launch");
  if (nb > 0) {
    GPTOSS_CUDA_TRY(gptoss::pdl::launch_plain(route_scatter_kernel, dim3(nb), dim3(kRouteThreads), 0, stream, topk_ids, n, Ei, chunk, bc, offsets, permutation), "route_scatter_kernel launch");
  }
  return GPTOSS_OK;
}
