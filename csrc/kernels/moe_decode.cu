// MXFP4 MoE, decode regime (gptoss/moe.h): few routed rows, weight-streaming GEMVs on the tensor
// cores (mma.sync m16n8k16 bf16 -> fp32) with the weights decoded in registers.
//
// Work split. A block owns one selected expert (blockIdx.y = u: the u-th distinct valid id of
// topk_ids, ascending, found by the block itself from the ids: no host sync, no metadata launch;
// blocks with u >= the number of distinct experts exit after the scan) and kMTiles * 16 output
// rows of it (blockIdx.x). Its 8 warps are kMTiles M-tiles x kKSplit K-slices; a warp streams its
// 16 rows x K/kKSplit once, every routed row of the expert reusing the decoded tile (8 tokens per
// mma, more tokens = more mmas over the same weights, re-read from L1/L2, not DRAM). The K-slices
// are summed through shared memory in a fixed order (deterministic).
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

#include "activation.cuh"
#include "common.cuh"
#include "gptoss/moe.h"
#include "mxfp4_decode_fast.cuh"

namespace {

constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;
constexpr int kMaxRouted = GPTOSS_MOE_DECODE_MAX_ROUTED_ROWS;
static_assert(kMaxRouted == kThreads, "the routing scan gives each thread one routed row");
constexpr int kMaxExperts = GPTOSS_MOE_DECODE_MAX_EXPERTS;
constexpr int kMTiles = 2;                  // 16-row M-tiles per block
constexpr int kKSplit = kWarps / kMTiles;   // warps sharing one M-tile's K range
static_assert(kMTiles * kKSplit == kWarps, "warps = M-tiles x K-slices");
constexpr int kRowsPerBlock = 16 * kMTiles;
constexpr int kUnroll = 3;                  // 128-k chunks loaded before the first use (per warp)

struct Shared {
  uint32_t bits[kMaxExperts / 32];  // selected-expert bitmap
  int slots[kMaxRouted];            // routed rows (t*k + j) of this block's expert, ascending
  int warp_count[kWarps];
  float red[kWarps][4][32];         // K-slice partial sums [warp][c][lane]
  int expert;
};

__device__ __forceinline__ uint4 ldg_stream(const uint4* p) {  // read-once weights: bypass L1
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

__device__ __forceinline__ void mma_16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                          uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// The expert of this block (the u-th distinct id in [0, E), ascending) or -1 (block-uniform), and
// its routed rows in sh.slots[0..ne), ascending. n <= kThreads routed rows.
__device__ __forceinline__ int block_route(const int32_t* __restrict__ ids, int n, int E, int u, Shared& sh,
                                           int& ne) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int nwords = (E + 31) >> 5;
  for (int i = tid; i < nwords; i += kThreads) sh.bits[i] = 0u;
  if (tid == 0) sh.expert = -1;
  const int id = tid < n ? __ldg(ids + tid) : -1;
  __syncthreads();
  if (id >= 0 && id < E) atomicOr(&sh.bits[id >> 5], 1u << (id & 31));
  __syncthreads();
  if (warp == 0) {
    int before = 0;  // distinct experts in earlier words (warp-uniform)
    for (int base = 0; base < nwords && before <= u; base += 32) {
      const uint32_t word = base + lane < nwords ? sh.bits[base + lane] : 0u;
      const int c = __popc(word);
      int incl = c;
#pragma unroll
      for (int d = 1; d < 32; d <<= 1) {
        const int v = __shfl_up_sync(0xFFFFFFFFu, incl, d);
        if (lane >= d) incl += v;
      }
      const int excl = incl - c;
      if (u >= before + excl && u < before + incl) {
        uint32_t w = word;
        for (int r = u - before - excl; r > 0; --r) w &= w - 1u;  // drop the lower set bits
        sh.expert = 32 * (base + lane) + __ffs(w) - 1;
      }
      before += __shfl_sync(0xFFFFFFFFu, incl, 31);
    }
  }
  __syncthreads();
  const int e = sh.expert;
  if (e < 0) return -1;
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
  ne = total;
  return e;
}

// kMlp1: in = x [T, K=H], rows = 2I, dst = act bf16 [n, I] (SwiGLU applied).
// else : in = act [n, K=I], rows = H, dst = y fp32 [n, H] (times the routing weight).
template <bool kMlp1>
__global__ void __launch_bounds__(kThreads) moe_decode_gemv_kernel(
    const __nv_bfloat16* __restrict__ in, const int32_t* __restrict__ ids, const float* __restrict__ topk_weights,
    const uint8_t* __restrict__ blocks, const uint8_t* __restrict__ scales, const __nv_bfloat16* __restrict__ bias,
    void* __restrict__ dst, int n, int k, int E, int K, int rows, float alpha, float limit) {
  __shared__ Shared sh;
  int ne = 0;
  const int e = block_route(ids, n, E, static_cast<int>(blockIdx.y), sh, ne);
  if (e < 0) return;

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, tq = lane & 3;
  const int mt = warp / kKSplit, ks = warp % kKSplit;
  const int tile = blockIdx.x * kMTiles + mt;      // 16-row M-tile index within the expert
  const bool tile_ok = 16 * (tile + 1) <= rows;     // rows is a multiple of 32: tiles are whole
  const int G = K >> 5;                             // MXFP4 groups per row
  const int nch = (G + 3) >> 2;                     // 4-group chunks
  // the lane's two weight rows (A row g and A row g+8 of the tile)
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
          for (int q = 0; q < 4; ++q) xv[uu][q] = (ok && xin) ? __ldg(xin + 4 * gi + q) : z;
        }
#pragma unroll
        for (int uu = 0; uu < kUnroll; ++uu) {
          if (cb + uu * kKSplit >= nch) break;  // warp-uniform
          uint32_t ca1, ca2, cb1, cb2;
          gptoss::mxfp4_pair_scale_factors(sa[uu], ca1, ca2);
          gptoss::mxfp4_pair_scale_factors(sb[uu], cb1, cb2);
          const uint32_t WA[4] = {wa[uu].x, wa[uu].y, wa[uu].z, wa[uu].w};
          const uint32_t WB[4] = {wb[uu].x, wb[uu].y, wb[uu].z, wb[uu].w};
          const uint32_t X[16] = {xv[uu][0].x, xv[uu][0].y, xv[uu][0].z, xv[uu][0].w,
                                  xv[uu][1].x, xv[uu][1].y, xv[uu][1].z, xv[uu][1].w,
                                  xv[uu][2].x, xv[uu][2].y, xv[uu][2].z, xv[uu][2].w,
                                  xv[uu][3].x, xv[uu][3].y, xv[uu][3].z, xv[uu][3].w};
#pragma unroll
          for (int q = 0; q < 4; ++q) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              const uint32_t a0 = gptoss::mxfp4_pair_decode(WA[q], 2 * h, ca1, ca2);
              const uint32_t a2 = gptoss::mxfp4_pair_decode(WA[q], 2 * h + 1, ca1, ca2);
              const uint32_t a1 = gptoss::mxfp4_pair_decode(WB[q], 2 * h, cb1, cb2);
              const uint32_t a3 = gptoss::mxfp4_pair_decode(WB[q], 2 * h + 1, cb1, cb2);
              // x words X[m] = (x_2m, x_2m+1): b0 = (x_{8q+2h}, x_{8q+2h+4}), b1 = (x_{8q+2h+1}, x_{8q+2h+5})
              const uint32_t b0 = __byte_perm(X[4 * q + h], X[4 * q + h + 2], 0x5410);
              const uint32_t b1 = __byte_perm(X[4 * q + h], X[4 * q + h + 2], 0x7632);
              mma_16816(acc, a0, a1, a2, a3, b0, b1);
            }
          }
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
          const float wgt = __ldg(topk_weights + slot);
          float* y = static_cast<float*>(dst) + static_cast<int64_t>(slot) * rows;
          y[rowA] = (v[p] + __bfloat162float(bias[erow + rowA])) * wgt;
          y[rowB] = (v[2 + p] + __bfloat162float(bias[erow + rowB])) * wgt;
        }
      }
    }
    __syncthreads();
  }
}

// out[t, h..h+3] = sum_j y[t*k+j, h..h+3] in slot order; NaN where a slot's id is invalid.
__global__ void __launch_bounds__(256) moe_decode_combine_kernel(const float4* __restrict__ y,
                                                                  const int32_t* __restrict__ ids, int n_tokens,
                                                                  int k, int E, int H,
                                                                  __nv_bfloat16* __restrict__ out) {
  const int per_row = H >> 2;
  const int64_t total = static_cast<int64_t>(n_tokens) * per_row;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int t = static_cast<int>(idx / per_row), h4 = static_cast<int>(idx % per_row);
    float4 s = make_float4(0.f, 0.f, 0.f, 0.f);
    bool bad = false;
    for (int j = 0; j < k; ++j) {
      const int r = t * k + j;
      const int id = __ldg(ids + r);
      if (id < 0 || id >= E) {
        bad = true;
        continue;
      }
      const float4 v = y[static_cast<int64_t>(r) * per_row + h4];
      s.x += v.x;
      s.y += v.y;
      s.z += v.z;
      s.w += v.w;
    }
    if (bad) s = make_float4(__int_as_float(0x7FC00000), __int_as_float(0x7FC00000),
                             __int_as_float(0x7FC00000), __int_as_float(0x7FC00000));
    __nv_bfloat162 o[2] = {__floats2bfloat162_rn(s.x, s.y), __floats2bfloat162_rn(s.z, s.w)};
    reinterpret_cast<uint2*>(out)[idx] = *reinterpret_cast<const uint2*>(o);
  }
}

constexpr size_t align256(size_t b) { return (b + 255) & ~static_cast<size_t>(255); }

int64_t chunk_tokens(int64_t k) { return kMaxRouted / k; }

}  // namespace

GPTOSS_API size_t gptoss_moe_mxfp4_decode_workspace_size(int64_t T, int64_t k, int64_t H, int64_t I) {
  if (T <= 0 || k < 1 || k > GPTOSS_MOE_DECODE_MAX_K || H <= 0 || I <= 0) return 0;
  const int64_t tokens = T < chunk_tokens(k) ? T : chunk_tokens(k);
  const int64_t n = tokens * k;
  return align256(static_cast<size_t>(n * I * 2)) + align256(static_cast<size_t>(n * H * 4));
}

GPTOSS_API gptoss_status gptoss_moe_mxfp4_decode(
    const void* x, const int32_t* topk_ids, const float* topk_weights,
    const uint8_t* w1_blocks, const uint8_t* w1_scales, const void* w1_bias,
    const uint8_t* w2_blocks, const uint8_t* w2_scales, const void* w2_bias,
    float swiglu_alpha, float swiglu_limit, void* out,
    int64_t T, int64_t H, int64_t I, int64_t E, int64_t k,
    void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  GPTOSS_REQUIRE(T >= 0, "moe_mxfp4_decode: T must be >= 0");
  GPTOSS_REQUIRE(H > 0 && H % 32 == 0, "moe_mxfp4_decode: H must be a positive multiple of 32");
  GPTOSS_REQUIRE(I > 0 && I % 32 == 0, "moe_mxfp4_decode: I must be a positive multiple of 32");
  GPTOSS_REQUIRE(H < (1 << 24) && I < (1 << 24), "moe_mxfp4_decode: H and I must be < 2^24");
  GPTOSS_REQUIRE(k >= 1 && k <= GPTOSS_MOE_DECODE_MAX_K, "moe_mxfp4_decode: k must be in [1, 8]");
  if (E < 1 || E > GPTOSS_MOE_DECODE_MAX_EXPERTS)
    return gptoss::set_error(GPTOSS_ERROR_UNSUPPORTED, "moe_mxfp4_decode: E must be in [1, 4096]");
  if (T == 0) return GPTOSS_OK;
  GPTOSS_REQUIRE(x && topk_ids && topk_weights && w1_blocks && w1_scales && w1_bias && w2_blocks && w2_scales &&
                     w2_bias && out && workspace,
                 "moe_mxfp4_decode: null pointer");
  GPTOSS_REQUIRE(gptoss::aligned(x, 16) && gptoss::aligned(w1_blocks, 16) && gptoss::aligned(w2_blocks, 16) &&
                     gptoss::aligned(workspace, 16) && gptoss::aligned(out, 8),
                 "moe_mxfp4_decode: x, w1_blocks, w2_blocks and workspace must be 16-byte aligned, out 8-byte");
  const size_t need = gptoss_moe_mxfp4_decode_workspace_size(T, k, H, I);
  GPTOSS_REQUIRE(workspace_bytes >= need, "moe_mxfp4_decode: workspace too small (see _workspace_size)");

  const int64_t ct = chunk_tokens(k);
  const int64_t n_max = (T < ct ? T : ct) * k;
  __nv_bfloat16* act = static_cast<__nv_bfloat16*>(workspace);
  float* y = reinterpret_cast<float*>(static_cast<char*>(workspace) + align256(static_cast<size_t>(n_max * I * 2)));
  const __nv_bfloat16* xb = static_cast<const __nv_bfloat16*>(x);
  __nv_bfloat16* ob = static_cast<__nv_bfloat16*>(out);

  for (int64_t t0 = 0; t0 < T; t0 += ct) {
    const int nt = static_cast<int>(T - t0 < ct ? T - t0 : ct);
    const int n = nt * static_cast<int>(k);
    const int ny = static_cast<int>(E < n ? E : n);  // at most this many distinct experts
    const int32_t* ids = topk_ids + t0 * k;
    const float* wts = topk_weights + t0 * k;

    const dim3 grid1(static_cast<unsigned>((2 * I + kRowsPerBlock - 1) / kRowsPerBlock), ny);
    moe_decode_gemv_kernel<true><<<grid1, kThreads, 0, stream>>>(
        xb + t0 * H, ids, wts, w1_blocks, w1_scales, static_cast<const __nv_bfloat16*>(w1_bias), act, n,
        static_cast<int>(k), static_cast<int>(E), static_cast<int>(H), static_cast<int>(2 * I), swiglu_alpha,
        swiglu_limit);
    GPTOSS_CUDA_TRY(cudaGetLastError(), "moe_mxfp4_decode mlp1 launch");

    const dim3 grid2(static_cast<unsigned>((H + kRowsPerBlock - 1) / kRowsPerBlock), ny);
    moe_decode_gemv_kernel<false><<<grid2, kThreads, 0, stream>>>(
        act, ids, wts, w2_blocks, w2_scales, static_cast<const __nv_bfloat16*>(w2_bias), y, n, static_cast<int>(k),
        static_cast<int>(E), static_cast<int>(I), static_cast<int>(H), swiglu_alpha, swiglu_limit);
    GPTOSS_CUDA_TRY(cudaGetLastError(), "moe_mxfp4_decode mlp2 launch");

    const int64_t work = static_cast<int64_t>(nt) * (H / 4);
    const int64_t want = (work + 255) / 256;
    const int grid3 = static_cast<int>(want < 4096 ? want : 4096);
    moe_decode_combine_kernel<<<grid3, 256, 0, stream>>>(reinterpret_cast<const float4*>(y), ids, nt,
                                                         static_cast<int>(k), static_cast<int>(E),
                                                         static_cast<int>(H), ob + t0 * H);
    GPTOSS_CUDA_TRY(cudaGetLastError(), "moe_mxfp4_decode combine launch");
  }
  return GPTOSS_OK;
}
