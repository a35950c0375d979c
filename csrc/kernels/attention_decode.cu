// Decode attention over the KV cache with sinks, sliding window and GQA (gptoss/attention.h).
//
// Work decomposition: one CTA per (key split, KV head, sequence). The CTA reads that KV head's
// keys and values of its split ONCE and serves all 8 query heads of the group with them. Four
// warps take the split's 16-key tiles round-robin; each warp streams its tiles through a private
// 3-stage cp.async pipeline (16-byte copies, zero-filled past the end of the range).
//
// Lane mapping inside a warp (g = lane / 8 selects one of 4 keys, c = lane % 8 one 16-byte chunk
// of 8 dims): in step r of a tile the lane holds dims 8c..8c+7 of key 4r+g.
//   Q.K : the lane keeps q[h][8c..8c+7] for the 8 heads in registers (fp32, pre-scaled by
//         sm_scale * log2 e) and forms 8 partial dot products; a transpose-reduction over the 8
//         lanes of its group (7 shuffles) leaves the full logit of head c in lane (g, c).
//   softmax: lane (g, c) keeps the running (m, l) of head c (m is shared by the 4 groups through
//         two xor-shuffles of the tile max), base-2 exponentials (softmax.cuh).
//   P.V : the lane accumulates o[h][8c..8c+7] for the 8 heads over the keys of its group; the 8
//         probabilities of its key come from the 8 lanes of its group by shuffles.
// At the end the 4 groups and the 4 warps are merged through shared memory (softmax_merge). With
// one split the CTA applies the sink and writes bf16; with several, it writes its partial
// (m, l, o) to the workspace and attention_decode_combine_kernel merges the splits and applies
// the sink once. All math is fp32; only the output is rounded to bf16.
//
// Two main-loop kernels share this decomposition, the split plan, the workspace, the epilogue and
// the combine (gptoss_attention_decode_bf16_variant picks one; kDefaultVariant is the default):
//   1 attention_decode_kernel      fp32 FMAs (described above); about 65 instructions per key and
//                                  KV head per warp, close to the issue rate that H100's HBM
//                                  bandwidth allows (~70 per key per SM), so it may fall short of
//                                  80% of copy bandwidth on long contexts.
//   2 attention_decode_mma_kernel  tensor cores (mma.sync m16n8k16 bf16 -> fp32, described at
//                                  the kernel); ~22 instructions per key, far below that limit.
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "arch.cuh"
#include "pdl.cuh"
#include "ptx.cuh"
#include "common.cuh"
#include "gptoss/attention.h"
#include "softmax.cuh"

namespace {
using gptoss::cp_async_commit;
using gptoss::cp_async_wait;
using gptoss::unpack_bf16x8;
using gptoss::mma_bf16_16816;

constexpr int kHeadDim = 64;
constexpr int kGroup = 8;                 // query heads per KV head
constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kSteps = 4;                 // 4 keys per warp per step
constexpr int kTile = 4 * kSteps;         // 16 keys per warp tile
constexpr int kStages = 3;
constexpr int kChunkQuantum = 64;         // split sizes are multiples of this many keys
constexpr int kMinChunk = 64;
constexpr int kMaxChunk = 2048;
constexpr int kTargetCtas = 2 * 132;      // two CTAs per H100 SM
constexpr int kPartialFloats = kGroup * kHeadDim;  // o of one (sequence, KV head, split)
constexpr int kMaxClusterSplits = 8;                // the portable thread-block cluster size
// Kernel used by variant 0: 1 = fp32 SIMT (attention_decode_kernel), 2 = tensor cores
// (attention_decode_mma_kernel). Both share the split plan, workspace and combine.
constexpr int kDefaultVariant = 1;

// The split plan. The grid holds `splits` CTAs per (sequence, KV head), a pure function of the
// sizes (graph-safe; it sizes the workspace). Each sequence uses only the first plan_for_keys(n)
// of them, n = its visible keys, computed on the device from cache_seqlens, so a decode step's
// work follows the actual lengths, not the cache capacity: the extra CTAs exit at once.
struct SplitPlan {
  int chunk;   // keys per split (a multiple of kChunkQuantum)
  int splits;  // splits used (the last may be short)
};

// Splits wanted for n keys: about kTargetCtas CTAs over `heads` (batch x KV heads), no split
// under kMinChunk or over kMaxChunk keys. Non-decreasing in n, and plan_for_keys(n).splits <=
// wanted_splits(n), so a grid of wanted_splits(most keys) holds every shorter sequence's plan.
GPTOSS_HD int64_t wanted_splits(int64_t n, int64_t heads) {
  const int64_t want = (kTargetCtas + heads - 1) / heads;
  int64_t s = (n + kMinChunk - 1) / kMinChunk;
  if (s > want) s = want;
  const int64_t at_least = (n + kMaxChunk - 1) / kMaxChunk;
  if (s < at_least) s = at_least;
  return s < 1 ? 1 : s;
}

GPTOSS_HD SplitPlan plan_for_keys(int64_t n, int64_t heads) {
  const int64_t s = wanted_splits(n, heads);
  int64_t chunk = ((n + s - 1) / s + kChunkQuantum - 1) / kChunkQuantum * kChunkQuantum;
  if (chunk < kMinChunk) chunk = kMinChunk;
  return SplitPlan{static_cast<int>(chunk), static_cast<int>(n > 0 ? (n + chunk - 1) / chunk : 1)};
}

struct DecodeParams {
  const __nv_bfloat16* q;
  const __nv_bfloat16* k_cache;
  const __nv_bfloat16* v_cache;
  const int32_t* seqlens;
  const __nv_bfloat16* sinks;
  __nv_bfloat16* out;
  float* ws_o;      // [B][nkv][splits][8][64]
  float2* ws_ml;    // [B][nkv][splits][8]  (m, l)
  int S;            // cache slots
  int nkv;
  int window;       // 0 = full
  int64_t heads;    // batch * nkv: the plan aims at kTargetCtas CTAs over these
  int splits;       // splits per (sequence, KV head) in the grid: the most any sequence uses
  int cluster;      // 1: the splits of one (sequence, KV head) are a thread-block cluster that merges
                    // its partials through distributed shared memory (no workspace, no combine kernel)
  float qk_scale;   // sm_scale * log2(e)
};

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int src_bytes) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  gptoss::cp_async_cg16(s, gmem, src_bytes);
}

// Sum acc[h] over the 8 lanes of a group (xor 4, 2, 1); lane c of the group returns the sum of
// acc[c]. 7 shuffles instead of 8 x 3.
__device__ __forceinline__ float transpose_reduce8(float (&acc)[8], int c) {
  const bool up4 = c & 4, up2 = c & 2, up1 = c & 1;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float send = up4 ? acc[i] : acc[i + 4];
    const float keep = up4 ? acc[i + 4] : acc[i];
    acc[i] = keep + __shfl_xor_sync(0xffffffffu, send, 4);
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const float send = up2 ? acc[i] : acc[i + 2];
    const float keep = up2 ? acc[i + 2] : acc[i];
    acc[i] = keep + __shfl_xor_sync(0xffffffffu, send, 2);
  }
  const float send = up1 ? acc[0] : acc[1];
  const float keep = up1 ? acc[1] : acc[0];
  return keep + __shfl_xor_sync(0xffffffffu, send, 1);
}

struct __align__(16) PipeSmem {
  uint4 kv[kWarps][kStages][2][kSteps][32];  // [warp][stage][K|V][step][lane] 16-byte chunks
};
struct __align__(16) MergeSmem {
  float o[kWarps][4][kGroup][kHeadDim];  // [warp][group][head][dim]
  float m[kWarps][kGroup];
  float l[kWarps][kGroup];
};
static_assert(sizeof(MergeSmem) <= sizeof(PipeSmem), "merge scratch reuses the pipeline buffers");
// The in-cluster merge's exchange of one CTA's partial (o per thread, (m, l) per head), placed
// right after MergeSmem inside the same pipeline buffer.
struct __align__(16) ClusterXchg {
  float4 o[kThreads];
  float2 ml[kGroup];
};
static_assert(sizeof(MergeSmem) % 16 == 0 && sizeof(MergeSmem) + sizeof(ClusterXchg) <= sizeof(PipeSmem),
              "the cluster exchange fits in the pipeline buffers' tail");

// out[b, qh, d0..d0+3] = bf16(o * the sink normalizer of the complete state st): the output of a
// head's dims once every key has been merged.
__device__ __forceinline__ void store_normalized(const DecodeParams& p, int64_t b, int qh, int d0, const float4& o,
                                                 gptoss::SoftmaxState st) {
  const float sink2 = __bfloat162float(p.sinks[qh]) * gptoss::kLog2e;
  const float f = gptoss::softmax_sink_normalizer(st, sink2);
  __nv_bfloat162 r01 = __floats2bfloat162_rn(o.x * f, o.y * f);
  __nv_bfloat162 r23 = __floats2bfloat162_rn(o.z * f, o.w * f);
  uint2 packed;
  packed.x = *reinterpret_cast<uint32_t*>(&r01);
  packed.y = *reinterpret_cast<uint32_t*>(&r23);
  *reinterpret_cast<uint2*>(p.out + (b * (kGroup * p.nkv) + qh) * kHeadDim + d0) = packed;
}

// Epilogue shared by both kernels: merge the kWarps warps' partial states (each warp's o split
// over kGroupsUsed key groups, summed here) and write the final bf16 output (one split) or the
// CTA's partial (m, l, o) to the workspace. Called after a __syncthreads that follows the stores.
template <int kGroupsUsed>
__device__ __forceinline__ void merge_warps_and_store(const MergeSmem& ms, const DecodeParams& p, int split, int kvh,
                                                      int64_t b, int nsplit) {
  // thread t: head h = t / 16, dims 4 (t % 16) .. +3
  const int h = threadIdx.x >> 4;
  const int d0 = (threadIdx.x & 15) * 4;
  gptoss::SoftmaxState acc_st = gptoss::softmax_empty();
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    float sa, sb;
    acc_st = gptoss::softmax_merge(acc_st, gptoss::SoftmaxState{ms.m[w][h], ms.l[w][h]}, &sa, &sb);
    float4 part = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
    for (int gg = 0; gg < kGroupsUsed; ++gg) {
      const float4 v = *reinterpret_cast<const float4*>(&ms.o[w][gg][h][d0]);
      part.x += v.x; part.y += v.y; part.z += v.z; part.w += v.w;
    }
    acc.x = gptoss::softmax_scaled_sum(acc.x, sa, part.x, sb);
    acc.y = gptoss::softmax_scaled_sum(acc.y, sa, part.y, sb);
    acc.z = gptoss::softmax_scaled_sum(acc.z, sa, part.z, sb);
    acc.w = gptoss::softmax_scaled_sum(acc.w, sa, part.w, sb);
  }

  const int qh = kvh * kGroup + h;
  if (nsplit == 1) {
    store_normalized(p, b, qh, d0, acc, acc_st);
  } else if (p.cluster) {
#if GPTOSS_NO_SM90_CODE_PASS
    GPTOSS_UNAVAILABLE_KERNEL_BODY();  // no clusters in sm_80..89 code: the launcher never sets p.cluster there
#else
    // the cluster's partials merged by rank 0 in split order: the combine kernel's arithmetic
    // (softmax_merge per split, then the sink) for this thread's head h and dims d0..d0+3
    namespace cg = cooperative_groups;
    // the exchange buffers: the pipeline buffer's tail, past the MergeSmem that ms occupies (the
    // pipeline is drained; static shared memory stays within 48 KB)
    ClusterXchg& xc = *reinterpret_cast<ClusterXchg*>(
        reinterpret_cast<char*>(const_cast<MergeSmem*>(&ms)) + sizeof(MergeSmem));
    float4* xo = xc.o;
    float2* xml = xc.ml;
    xo[threadIdx.x] = acc;
    if ((threadIdx.x & 15) == 0) xml[h] = make_float2(acc_st.m, acc_st.l);
    cg::cluster_group cluster = cg::this_cluster();
    cluster.sync();  // every split's partial is in its block's shared memory
    if (cluster.block_rank() == 0) {
      gptoss::SoftmaxState st = gptoss::softmax_empty();
      float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
      for (int s = 0; s < nsplit; ++s) {
        const float2 ml = cluster.map_shared_rank(xml, s)[h];
        const float4 v = cluster.map_shared_rank(xo, s)[threadIdx.x];
        float sa, sb;
        st = gptoss::softmax_merge(st, gptoss::SoftmaxState{ml.x, ml.y}, &sa, &sb);
        o.x = gptoss::softmax_scaled_sum(o.x, sa, v.x, sb);
        o.y = gptoss::softmax_scaled_sum(o.y, sa, v.y, sb);
        o.z = gptoss::softmax_scaled_sum(o.z, sa, v.z, sb);
        o.w = gptoss::softmax_scaled_sum(o.w, sa, v.w, sb);
      }
      store_normalized(p, b, qh, d0, o, st);
    }
    cluster.sync();  // the other blocks' shared memory stays alive until rank 0 has read it
#endif
  } else {
    const int64_t part_idx = (b * p.nkv + kvh) * p.splits + split;
    *reinterpret_cast<float4*>(p.ws_o + part_idx * kPartialFloats + h * kHeadDim + d0) = acc;
    if ((threadIdx.x & 15) == 0) p.ws_ml[part_idx * kGroup + h] = make_float2(acc_st.m, acc_st.l);
  }
}

// Sequence b's visible positions [*start, *end) = [max(0, L - W, L - S), L) (never more keys
// than slots: the contract S >= min(L, W)) and its split plan.
__device__ __forceinline__ SplitPlan sequence_plan(const DecodeParams& p, int64_t b, int* start, int* end) {
  const int L = p.seqlens[b];
  *end = L > 0 ? L : 0;
  *start = 0;
  if (p.window > 0) *start = max(*start, *end - p.window);
  *start = max(*start, *end - p.S);
  return plan_for_keys(*end - *start, p.heads);
}

// This split's keys: positions [*k0, *k0 + *n) of sequence b, the split-th chunk of its visible
// positions; *nsplit = the splits sequence b uses (<= p.splits).
__device__ __forceinline__ void split_keys(const DecodeParams& p, int64_t b, int split, int* k0, int* n, int* nsplit) {
  int start, end;
  const SplitPlan plan = sequence_plan(p, b, &start, &end);
  *nsplit = plan.splits;
  *k0 = start + split * plan.chunk;
  *n = max(0, min(end, *k0 + plan.chunk) - *k0);
}

__global__ void __launch_bounds__(kThreads) attention_decode_kernel(const DecodeParams p) {
  __shared__ PipeSmem smem;
  gptoss::pdl::wait();  // q, the cache and seqlens are earlier kernels' outputs
  gptoss::pdl::launch_dependents();
  const int split = blockIdx.x;
  const int kvh = blockIdx.y;
  const int64_t b = blockIdx.z;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 3, c = lane & 7;

  int k0, n, nsplit;
  split_keys(p, b, split, &k0, &n, &nsplit);
  // a split this sequence does not use: nothing to do, unless its cluster merges through it
  if (split >= nsplit && (!p.cluster || nsplit == 1)) return;
  const int k1 = k0 + n;  // keys at positions >= k1 are masked
  const int n_tiles = (n + kTile - 1) / kTile;

  // q rows of the 8 heads, dims 8c..8c+7, fp32 scaled into the base-2 logit domain
  float qf[kGroup][8];
  {
    const uint4* qrow = reinterpret_cast<const uint4*>(p.q + (b * (kGroup * p.nkv) + kvh * kGroup) * kHeadDim);
#pragma unroll
    for (int h = 0; h < kGroup; ++h) {
      unpack_bf16x8(__ldcg(qrow + h * (kHeadDim / 8) + c), qf[h]);  // .cg: written by RoPE (PDL)
#pragma unroll
      for (int i = 0; i < 8; ++i) qf[h][i] *= p.qk_scale;
    }
  }

  float o[kGroup][8];
#pragma unroll
  for (int h = 0; h < kGroup; ++h)
#pragma unroll
    for (int i = 0; i < 8; ++i) o[h][i] = 0.0f;
  gptoss::SoftmaxState st = gptoss::softmax_empty();  // of head c, keys of this warp

  const int64_t slot_stride = static_cast<int64_t>(p.nkv) * kHeadDim;  // elements between slots
  const __nv_bfloat16* kbase = p.k_cache + (b * p.S * p.nkv + kvh) * kHeadDim + c * 8;
  const __nv_bfloat16* vbase = p.v_cache + (b * p.S * p.nkv + kvh) * kHeadDim + c * 8;

  // this warp's tiles: warp, warp + 4, ...
  const int my_tiles = n_tiles > warp ? (n_tiles - warp + kWarps - 1) / kWarps : 0;
  auto issue = [&](int i) {
    if (i < my_tiles) {
      const int stage = i % kStages;
      const int pos0 = k0 + (warp + kWarps * i) * kTile + g;
      const uint32_t S = static_cast<uint32_t>(p.S);
      uint32_t slot = static_cast<uint32_t>(pos0) % S;  // one division per tile, then step by 4
#pragma unroll
      for (int r = 0; r < kSteps; ++r) {
        const bool valid = pos0 + 4 * r < k1;
        const int64_t off = valid ? static_cast<int64_t>(slot) * slot_stride : 0;
        cp_async16(&smem.kv[warp][stage][0][r][lane], kbase + off, valid ? 16 : 0);
        cp_async16(&smem.kv[warp][stage][1][r][lane], vbase + off, valid ? 16 : 0);
        slot += 4;
        while (slot >= S) slot -= S;  // at most once when S >= 4
      }
    }
    cp_async_commit();  // always commit (possibly empty) so group counting stays uniform
  };

#pragma unroll
  for (int i = 0; i < kStages - 1; ++i) issue(i);

  for (int i = 0; i < my_tiles; ++i) {
    issue(i + kStages - 1);
    cp_async_wait<kStages - 1>();  // tile i has landed (each lane reads only what it copied)
    const int stage = i % kStages;
    const int pos0 = k0 + (warp + kWarps * i) * kTile + g;

    // logits of head c for keys 4r + g
    float s[kSteps];
#pragma unroll
    for (int r = 0; r < kSteps; ++r) {
      float kf[8];
      unpack_bf16x8(smem.kv[warp][stage][0][r][lane], kf);
      float acc[kGroup];
#pragma unroll
      for (int h = 0; h < kGroup; ++h) {
        float a = qf[h][0] * kf[0];
#pragma unroll
        for (int j = 1; j < 8; ++j) a = fmaf(qf[h][j], kf[j], a);
        acc[h] = a;
      }
      const float logit = transpose_reduce8(acc, c);
      s[r] = (pos0 + 4 * r < k1) ? logit : -INFINITY;
    }

    // online softmax of head c over the tile (max shared by the 4 key groups)
    float tmax = fmaxf(fmaxf(s[0], s[1]), fmaxf(s[2], s[3]));
    tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 8));
    tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 16));
    const float alpha = gptoss::softmax_update_max(st, tmax);
    float pr[kSteps];
#pragma unroll
    for (int r = 0; r < kSteps; ++r) {
      pr[r] = gptoss::softmax_prob(s[r], st.m);
      st.l += pr[r];
    }
    if (__any_sync(0xffffffffu, alpha != 1.0f)) {
#pragma unroll
      for (int h = 0; h < kGroup; ++h) {
        const float a = __shfl_sync(0xffffffffu, alpha, h);  // lane h holds head h's factor
#pragma unroll
        for (int j = 0; j < 8; ++j) o[h][j] *= a;
      }
    }

    // o[h][8c..8c+7] += p[h] * v of key 4r + g
#pragma unroll
    for (int r = 0; r < kSteps; ++r) {
      float vf[8];
      unpack_bf16x8(smem.kv[warp][stage][1][r][lane], vf);
#pragma unroll
      for (int h = 0; h < kGroup; ++h) {
        const float ph = __shfl_sync(0xffffffffu, pr[r], (g << 3) | h);
#pragma unroll
        for (int j = 0; j < 8; ++j) o[h][j] = fmaf(ph, vf[j], o[h][j]);
      }
    }
  }
  cp_async_wait<0>();

  // l of head c over the whole warp (the 4 groups share m)
  st.l += __shfl_xor_sync(0xffffffffu, st.l, 8);
  st.l += __shfl_xor_sync(0xffffffffu, st.l, 16);

  __syncthreads();  // every warp is done with the pipeline buffers
  MergeSmem& ms = *reinterpret_cast<MergeSmem*>(&smem);
#pragma unroll
  for (int h = 0; h < kGroup; ++h) {
    float4* dst = reinterpret_cast<float4*>(&ms.o[warp][g][h][8 * c]);
    dst[0] = make_float4(o[h][0], o[h][1], o[h][2], o[h][3]);
    dst[1] = make_float4(o[h][4], o[h][5], o[h][6], o[h][7]);
  }
  if (g == 0) {
    ms.m[warp][c] = st.m;
    ms.l[warp][c] = st.l;
  }
  __syncthreads();

  merge_warps_and_store<4>(ms, p, split, kvh, b, nsplit);
}

// ---- tensor-core variant (variant 2) ----------------------------------------------------------
// Same CTA decomposition, pipeline depth and epilogue; the products run on mma.sync m16n8k16
// (bf16 inputs, fp32 accumulation) in the FlashAttention-2 register layout with M = 16 rows of
// which rows 0..7 are the group's 8 query heads and rows 8..15 are zero padding:
//   S[16 x 16 keys] = Q[16 x 64] K^T : A = q from registers, B = K tile via ldmatrix (4 x4 loads)
//   O[16 x 64] += P[16 x 16] V       : A = P from the S accumulators (rounded to bf16), B = V tile
//                                      via ldmatrix.trans (4 x4 loads)
// Lane (g = lane / 4, t = lane % 4) holds head g's logits of keys 2t, 2t+1 (+8) and o of head g,
// dims 8n + 2t, +1. The tile in shared memory is [16 keys][8 chunks of 16 bytes], chunk index
// XOR-swizzled with (key & 7) so that ldmatrix's 8 rows hit 8 different bank groups.
// Differences from the fp32 SIMT kernel: q.k products are exact in fp32 either way (bf16 x bf16),
// only the summation order differs; P is rounded to bf16 before P.V (relative 2^-9 per weight,
// DEVELOPERS.md's accepted intermediate rounding); l sums the fp32 probabilities.

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  gptoss::ldmatrix_x4_b16(r, a);
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  gptoss::ldmatrix_x4_trans_b16(r, a);
}
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

__global__ void __launch_bounds__(kThreads) attention_decode_mma_kernel(const DecodeParams p) {
  __shared__ PipeSmem smem;
  // [warp][stage][K|V][key 0..15][chunk 0..7] view of the same buffer
  uint4 (*tile)[kStages][2][kTile][8] = reinterpret_cast<uint4 (*)[kStages][2][kTile][8]>(&smem);
  gptoss::pdl::wait();  // q, the cache and seqlens are earlier kernels' outputs
  gptoss::pdl::launch_dependents();
  const int split = blockIdx.x;
  const int kvh = blockIdx.y;
  const int64_t b = blockIdx.z;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;

  int k0, n, nsplit;
  split_keys(p, b, split, &k0, &n, &nsplit);
  // a split this sequence does not use: nothing to do, unless its cluster merges through it
  if (split >= nsplit && (!p.cluster || nsplit == 1)) return;
  const int k1 = k0 + n;  // keys at positions >= k1 are masked
  const int n_tiles = (n + kTile - 1) / kTile;

  // A fragments of q (head g; rows 8..15 are zero): qa[ks][0] = dims 16ks + 2t, +1; qa[ks][1] = +8
  uint32_t qa[4][2];
  {
    const uint32_t* qrow = reinterpret_cast<const uint32_t*>(p.q + (b * (kGroup * p.nkv) + kvh * kGroup + g) * kHeadDim);
#pragma unroll
    for (int ks = 0; ks < 4; ++ks) {
      qa[ks][0] = __ldcg(qrow + 8 * ks + t);  // .cg: written by RoPE (PDL)
      qa[ks][1] = __ldcg(qrow + 8 * ks + 4 + t);
    }
  }

  float o[8][4];
#pragma unroll
  for (int nt = 0; nt < 8; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) o[nt][i] = 0.0f;
  gptoss::SoftmaxState st = gptoss::softmax_empty();  // head g, keys of this warp

  const int64_t slot_stride = static_cast<int64_t>(p.nkv) * kHeadDim;
  const int cg = lane >> 3, cc = lane & 7;  // copy mapping: key 4r + cg, chunk cc
  const __nv_bfloat16* kbase = p.k_cache + (b * p.S * p.nkv + kvh) * kHeadDim + cc * 8;
  const __nv_bfloat16* vbase = p.v_cache + (b * p.S * p.nkv + kvh) * kHeadDim + cc * 8;
  const int my_tiles = n_tiles > warp ? (n_tiles - warp + kWarps - 1) / kWarps : 0;
  auto issue = [&](int i) {
    if (i < my_tiles) {
      const int stage = i % kStages;
      const int pos0 = k0 + (warp + kWarps * i) * kTile + cg;
      const uint32_t S = static_cast<uint32_t>(p.S);
      uint32_t slot = static_cast<uint32_t>(pos0) % S;
#pragma unroll
      for (int r = 0; r < kSteps; ++r) {
        const int key = 4 * r + cg;
        const bool valid = pos0 + 4 * r < k1;
        const int64_t off = valid ? static_cast<int64_t>(slot) * slot_stride : 0;
        cp_async16(&tile[warp][stage][0][key][cc ^ (key & 7)], kbase + off, valid ? 16 : 0);
        cp_async16(&tile[warp][stage][1][key][cc ^ (key & 7)], vbase + off, valid ? 16 : 0);
        slot += 4;
        while (slot >= S) slot -= S;  // at most once when S >= 4
      }
    }
    cp_async_commit();
  };

#pragma unroll
  for (int i = 0; i < kStages - 1; ++i) issue(i);

  // ldmatrix row addresses: lane supplies row (lane & 7) of matrix (lane >> 3)
  const int lm = lane >> 3, lr = lane & 7;
  for (int i = 0; i < my_tiles; ++i) {
    __syncwarp();  // every lane is done reading the stage about to be refilled
    issue(i + kStages - 1);
    cp_async_wait<kStages - 1>();
    __syncwarp();  // the other lanes' copies of tile i are visible
    const int stage = i % kStages;
    const int base = k0 + (warp + kWarps * i) * kTile;

    // S = Q K^T for keys 0..7 (s[0]) and 8..15 (s[1])
    float s[2][4];
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[j][e] = 0.0f;
#pragma unroll
    for (int ks = 0; ks < 4; ++ks) {
      // matrices: (keys 0-7, chunk 2ks), (keys 0-7, chunk 2ks+1), (keys 8-15, 2ks), (keys 8-15, 2ks+1)
      const int key = (lm >> 1) * 8 + lr;
      const int chunk = 2 * ks + (lm & 1);
      uint32_t kb[4];
      ldmatrix_x4(kb, &tile[warp][stage][0][key][chunk ^ (key & 7)]);
      mma_bf16_16816(s[0], qa[ks][0], 0u, qa[ks][1], 0u, kb[0], kb[1]);
      mma_bf16_16816(s[1], qa[ks][0], 0u, qa[ks][1], 0u, kb[2], kb[3]);
    }

    // online softmax of head g (rows 8..15 of s are padding and ignored)
    float x[4];
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int key = base + 8 * j + 2 * t + e;
        x[2 * j + e] = key < k1 ? s[j][e] * p.qk_scale : -INFINITY;
      }
    float tmax = fmaxf(fmaxf(x[0], x[1]), fmaxf(x[2], x[3]));
    tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 1));
    tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 2));
    const float alpha = gptoss::softmax_update_max(st, tmax);
    float pr[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      pr[e] = gptoss::softmax_prob(x[e], st.m);
      st.l += pr[e];
    }
    if (__any_sync(0xffffffffu, alpha != 1.0f)) {
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        o[nt][0] *= alpha;
        o[nt][1] *= alpha;
      }
    }
    const uint32_t pa0 = pack_bf16x2(pr[0], pr[1]);  // row g, keys 2t, 2t+1
    const uint32_t pa2 = pack_bf16x2(pr[2], pr[3]);  // row g, keys 8 + 2t, +1

    // O += P V: matrices (keys 0-7, chunk nt), (keys 8-15, chunk nt), (keys 0-7, nt+1), (keys 8-15, nt+1)
#pragma unroll
    for (int nt = 0; nt < 8; nt += 2) {
      const int key = (lm & 1) * 8 + lr;
      const int chunk = nt + (lm >> 1);
      uint32_t vb[4];
      ldmatrix_x4_trans(vb, &tile[warp][stage][1][key][chunk ^ (key & 7)]);
      mma_bf16_16816(o[nt], pa0, 0u, pa2, 0u, vb[0], vb[1]);
      mma_bf16_16816(o[nt + 1], pa0, 0u, pa2, 0u, vb[2], vb[3]);
    }
  }
  cp_async_wait<0>();

  st.l += __shfl_xor_sync(0xffffffffu, st.l, 1);
  st.l += __shfl_xor_sync(0xffffffffu, st.l, 2);

  __syncthreads();
  MergeSmem& ms = *reinterpret_cast<MergeSmem*>(&smem);
#pragma unroll
  for (int nt = 0; nt < 8; ++nt)
    *reinterpret_cast<float2*>(&ms.o[warp][0][g][8 * nt + 2 * t]) = make_float2(o[nt][0], o[nt][1]);
  if (t == 0) {
    ms.m[warp][g] = st.m;
    ms.l[warp][g] = st.l;
  }
  __syncthreads();
  merge_warps_and_store<1>(ms, p, split, kvh, b, nsplit);
}

// Merge the split partials of one (sequence, KV head) and apply the sink once.
// 256 threads: head h = t / 32, dims 2 (t % 32), +1.
__global__ void __launch_bounds__(256) attention_decode_combine_kernel(const DecodeParams p) {
  gptoss::pdl::wait();  // the partials are the split kernel's output
  gptoss::pdl::launch_dependents();
  const int kvh = blockIdx.x;
  const int64_t b = blockIdx.y;
  const int h = threadIdx.x >> 5;
  const int d0 = (threadIdx.x & 31) * 2;
  int start, end;
  const int nsplit = sequence_plan(p, b, &start, &end).splits;
  if (nsplit == 1) return;  // the split kernel wrote this sequence's output itself
  const int64_t base = (b * p.nkv + kvh) * p.splits;
  gptoss::SoftmaxState st = gptoss::softmax_empty();
  float2 acc = make_float2(0.f, 0.f);
  for (int s = 0; s < nsplit; ++s) {
    const float2 ml = __ldcg(p.ws_ml + (base + s) * kGroup + h);
    const float2 v = __ldcg(reinterpret_cast<const float2*>(p.ws_o + (base + s) * kPartialFloats + h * kHeadDim + d0));
    float sa, sb;
    st = gptoss::softmax_merge(st, gptoss::SoftmaxState{ml.x, ml.y}, &sa, &sb);
    acc.x = gptoss::softmax_scaled_sum(acc.x, sa, v.x, sb);
    acc.y = gptoss::softmax_scaled_sum(acc.y, sa, v.y, sb);
  }
  const int qh = kvh * kGroup + h;
  const float sink2 = __bfloat162float(p.sinks[qh]) * gptoss::kLog2e;
  const float f = gptoss::softmax_sink_normalizer(st, sink2);
  *reinterpret_cast<__nv_bfloat162*>(p.out + (b * (kGroup * p.nkv) + qh) * kHeadDim + d0) =
      __floats2bfloat162_rn(acc.x * f, acc.y * f);
}

int64_t plan_heads(int64_t batch, int nkv) { return batch * nkv > 0 ? batch * nkv : 1; }

// The grid's splits per (sequence, KV head): a pure function of the sizes (graph-safe), enough for
// the most keys one query can see (min(S, W)); each sequence's own plan is chosen on the device.
int grid_splits(int64_t batch, int64_t S, int nkv, int window) {
  const int64_t n = (window > 0 && window < S) ? window : S;
  return static_cast<int>(wanted_splits(n, plan_heads(batch, nkv)));
}

bool supported(int nq, int nkv, int d) { return d == kHeadDim && nkv > 0 && nq == kGroup * nkv; }

}  // namespace

GPTOSS_API int gptoss_attention_decode_num_splits(int64_t batch, int64_t cache_size, int num_q_heads,
                                                  int num_kv_heads, int head_dim, int sliding_window) {
  (void)num_q_heads;
  (void)head_dim;
  return grid_splits(batch, cache_size, num_kv_heads, sliding_window);
}

GPTOSS_API int gptoss_attention_decode_splits_used(int64_t batch, int64_t cache_size, int num_q_heads,
                                                   int num_kv_heads, int head_dim, int sliding_window,
                                                   int64_t seqlen) {
  (void)num_q_heads;
  (void)head_dim;
  const int64_t end = seqlen > 0 ? seqlen : 0;
  int64_t n = end;
  if (sliding_window > 0 && n > sliding_window) n = sliding_window;
  if (n > cache_size) n = cache_size;
  return plan_for_keys(n, plan_heads(batch, num_kv_heads)).splits;
}

GPTOSS_API size_t gptoss_attention_decode_workspace_size(int64_t batch, int64_t cache_size, int num_q_heads,
                                                         int num_kv_heads, int head_dim, int sliding_window) {
  const int splits = gptoss_attention_decode_num_splits(batch, cache_size, num_q_heads, num_kv_heads, head_dim,
                                                        sliding_window);
  if (splits <= 1 || batch <= 0 || num_kv_heads <= 0) return 0;
  const size_t parts = static_cast<size_t>(batch) * num_kv_heads * splits;
  return parts * kPartialFloats * sizeof(float) + parts * kGroup * sizeof(float2);
}

GPTOSS_API gptoss_status gptoss_attention_decode_bf16(const void* q, const void* k_cache, const void* v_cache,
                                                      const int32_t* cache_seqlens, const void* sinks, void* out,
                                                      void* workspace, size_t workspace_bytes, int64_t batch,
                                                      int64_t cache_size, int num_q_heads, int num_kv_heads,
                                                      int head_dim, int sliding_window, float sm_scale,
                                                      cudaStream_t stream) {
  return gptoss_attention_decode_bf16_variant(q, k_cache, v_cache, cache_seqlens, sinks, out, workspace,
                                              workspace_bytes, batch, cache_size, num_q_heads, num_kv_heads, head_dim,
                                              sliding_window, sm_scale, 0, stream);
}

GPTOSS_API gptoss_status gptoss_attention_decode_bf16_variant(
    const void* q, const void* k_cache, const void* v_cache, const int32_t* cache_seqlens, const void* sinks,
    void* out, void* workspace, size_t workspace_bytes, int64_t batch, int64_t cache_size, int num_q_heads,
    int num_kv_heads, int head_dim, int sliding_window, float sm_scale, int variant, cudaStream_t stream) {
  GPTOSS_REQUIRE((variant & ~GPTOSS_ATTENTION_DECODE_NO_CLUSTER) >= 0 && (variant & ~GPTOSS_ATTENTION_DECODE_NO_CLUSTER) <= 2,
                 "attention_decode: variant must be 0 (default), 1 (fp32) or 2 (mma), optionally | "
                 "GPTOSS_ATTENTION_DECODE_NO_CLUSTER");
  GPTOSS_REQUIRE(batch >= 0, "attention_decode: batch must be >= 0");
  GPTOSS_REQUIRE(cache_size > 0 && cache_size < (int64_t(1) << 31),
                 "attention_decode: cache_size must be in [1, 2^31)");
  GPTOSS_REQUIRE(sliding_window >= 0, "attention_decode: sliding_window must be >= 0 (0 = full attention)");
  if (!supported(num_q_heads, num_kv_heads, head_dim))
    return gptoss::set_error(GPTOSS_ERROR_UNSUPPORTED,
                             "attention_decode: supports head_dim 64 with 8 query heads per KV head (got head_dim " +
                                 std::to_string(head_dim) + ", " + std::to_string(num_q_heads) + " query heads, " +
                                 std::to_string(num_kv_heads) + " KV heads)");
  GPTOSS_REQUIRE(num_kv_heads <= 65535, "attention_decode: num_kv_heads must be <= 65535");
  GPTOSS_REQUIRE(batch <= 65535, "attention_decode: batch must be <= 65535");
  if (batch == 0) return GPTOSS_OK;
  GPTOSS_REQUIRE(q && k_cache && v_cache && cache_seqlens && sinks && out, "attention_decode: null pointer");
  GPTOSS_REQUIRE(gptoss::aligned(q, 16) && gptoss::aligned(k_cache, 16) && gptoss::aligned(v_cache, 16) &&
                     gptoss::aligned(out, 16),
                 "attention_decode: q, k_cache, v_cache and out must be 16-byte aligned");
  const size_t need = gptoss_attention_decode_workspace_size(batch, cache_size, num_q_heads, num_kv_heads,
                                                             head_dim, sliding_window);
  GPTOSS_REQUIRE(workspace_bytes >= need,
                 "attention_decode: workspace too small (" + std::to_string(workspace_bytes) + " bytes, needs " +
                     std::to_string(need) + ")");
  GPTOSS_REQUIRE(need == 0 || (workspace && gptoss::aligned(workspace, 16)),
                 "attention_decode: workspace must be a 16-byte aligned device pointer");

  DecodeParams p;
  p.q = static_cast<const __nv_bfloat16*>(q);
  p.k_cache = static_cast<const __nv_bfloat16*>(k_cache);
  p.v_cache = static_cast<const __nv_bfloat16*>(v_cache);
  p.seqlens = cache_seqlens;
  p.sinks = static_cast<const __nv_bfloat16*>(sinks);
  p.out = static_cast<__nv_bfloat16*>(out);
  p.S = static_cast<int>(cache_size);
  p.nkv = num_kv_heads;
  p.window = sliding_window;
  p.heads = plan_heads(batch, num_kv_heads);
  p.splits = grid_splits(batch, cache_size, num_kv_heads, sliding_window);
  p.qk_scale = sm_scale * gptoss::kLog2e;
  const size_t parts = static_cast<size_t>(batch) * num_kv_heads * p.splits;
  p.ws_o = need ? static_cast<float*>(workspace) : nullptr;
  p.ws_ml = need ? reinterpret_cast<float2*>(static_cast<float*>(workspace) + parts * kPartialFloats) : nullptr;

  const dim3 grid(static_cast<unsigned>(p.splits), static_cast<unsigned>(num_kv_heads), static_cast<unsigned>(batch));
  const bool no_cluster = (variant & GPTOSS_ATTENTION_DECODE_NO_CLUSTER) != 0;
  variant &= ~GPTOSS_ATTENTION_DECODE_NO_CLUSTER;
  if (variant == 0) variant = kDefaultVariant;
  auto* kernel = variant == 2 ? attention_decode_mma_kernel : attention_decode_kernel;
  gptoss_arch_info arch;
  const gptoss_status arch_st = gptoss::arch::current(&arch);
  if (arch_st != GPTOSS_OK) return arch_st;
  // 2..8 splits (a portable cluster size) on a device with clusters (sm_90): the splits merge
  // inside their cluster; below sm_90 the combine kernel merges them
  p.cluster = (arch.clusters && !no_cluster && p.splits > 1 && p.splits <= kMaxClusterSplits) ? 1 : 0;
  if (p.cluster) {
    const cudaError_t err = gptoss::pdl::launch_clusters(kernel, grid, dim3(kThreads), 0, stream,
                                                         static_cast<unsigned>(p.splits), true, p);
    if (err == cudaSuccess) return GPTOSS_OK;
    if (err == cudaErrorStreamCaptureInvalidated || err == cudaErrorStreamCaptureUnsupported)
      return gptoss::cuda_status(err, "attention_decode (cluster) launch");
    // the cluster was refused (e.g. too few SMs per GPC in a partitioned GPU): merge with the
    // combine kernel instead (the workspace is always required for this)
    p.cluster = 0;
  }
  GPTOSS_CUDA_TRY(gptoss::pdl::launch(kernel, grid, dim3(kThreads), 0, stream, true, p), "attention_decode launch");
  if (p.splits > 1)
    GPTOSS_CUDA_TRY(gptoss::pdl::launch(attention_decode_combine_kernel,
                                        dim3(static_cast<unsigned>(num_kv_heads), static_cast<unsigned>(batch)),
                                        dim3(256), 0, stream, true, p),
                    "attention_decode combine launch");
  return GPTOSS_OK;
}
