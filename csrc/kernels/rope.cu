// RoPE (YaRN) on the fused QKV projection and the KV-cache writers (gptoss/rope.h).
//
// rope_kernel: one CTA per token. 32 threads compute the token's (c cos, c sin) of the 32
// rotation pairs into shared memory (rope.cuh: fp32 angle, double argument reduction), then the
// CTA rotates every q and k head in 16-byte chunks (8 pairs: dims 8i..8i+7 and 32+8i..32+8i+7)
// in fp32 and copies v. The output of k and v goes either to separate [T, nkv, 64] tensors
// (rope_qkv) or straight into the cache slot of (seq_ids[t], positions[t]) (the fused append).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "pdl.cuh"
#include "ptx.cuh"
#include "common.cuh"
#include "gptoss/rope.h"
#include "rope.cuh"

namespace {
using gptoss::unpack_bf16x8;
using gptoss::pack_bf16x8;

constexpr int kHeadDim = 64;
constexpr int kPairs = kHeadDim / 2;
constexpr int kChunksPerHalf = kPairs / 8;  // 4 chunks of 8 pairs
constexpr int kRopeThreads = 128;

struct InvFreq {
  float v[kPairs];
};

struct RopeParams {
  const __nv_bfloat16* qkv;
  const int32_t* positions;
  const int32_t* seq_ids;  // cache mode only
  __nv_bfloat16* q_out;
  __nv_bfloat16* k_out;    // [T, nkv, 64] or k_cache
  __nv_bfloat16* v_out;
  int64_t batch;           // cache mode
  int64_t S;               // cache mode
  int nq;
  int nkv;
  float concentration;
  InvFreq inv;
};

template <bool kToCache>
__global__ void __launch_bounds__(kRopeThreads) rope_kernel(const RopeParams p) {
  __shared__ float cs[kPairs], sn[kPairs];
  gptoss::pdl::wait();  // qkv, positions, seq_ids: earlier kernels' outputs
  gptoss::pdl::launch_dependents();
  const int64_t t = blockIdx.x;
  const int32_t pos = p.positions[t];
  if (threadIdx.x < kPairs) {
    float c, s;
    gptoss::rope_cos_sin(pos, p.inv.v[threadIdx.x], p.concentration, &c, &s);
    cs[threadIdx.x] = c;
    sn[threadIdx.x] = s;
  }

  const int nheads = p.nq + 2 * p.nkv;
  const uint4* row = reinterpret_cast<const uint4*>(p.qkv + t * nheads * kHeadDim);
  __nv_bfloat16* kdst;
  __nv_bfloat16* vdst;
  bool write_kv = true;
  if constexpr (kToCache) {
    const int32_t seq = p.seq_ids[t];
    write_kv = seq >= 0 && seq < p.batch;
    const int64_t slot_row = (static_cast<int64_t>(write_kv ? seq : 0) * p.S + gptoss::cache_slot(pos, p.S)) * p.nkv;
    kdst = p.k_out + slot_row * kHeadDim;
    vdst = p.v_out + slot_row * kHeadDim;
  } else {
    kdst = p.k_out + t * p.nkv * kHeadDim;
    vdst = p.v_out + t * p.nkv * kHeadDim;
  }
  __syncthreads();

  // rotated heads (q then k): item = head * 4 + chunk
  const int n_rot = (p.nq + p.nkv) * kChunksPerHalf;
  for (int item = threadIdx.x; item < n_rot; item += kRopeThreads) {
    const int head = item / kChunksPerHalf;
    const int ch = item % kChunksPerHalf;
    const bool is_q = head < p.nq;
    if (!is_q && !write_kv) continue;
    float x1[8], x2[8], y1[8], y2[8];
    unpack_bf16x8(__ldcg(row + head * (kHeadDim / 8) + ch), x1);  // .cg: PDL
    unpack_bf16x8(__ldcg(row + head * (kHeadDim / 8) + kChunksPerHalf + ch), x2);
#pragma unroll
    for (int i = 0; i < 8; ++i) gptoss::rope_rotate_pair(x1[i], x2[i], cs[8 * ch + i], sn[8 * ch + i], &y1[i], &y2[i]);
    uint4* dst = is_q ? reinterpret_cast<uint4*>(p.q_out + (t * p.nq + head) * kHeadDim)
                      : reinterpret_cast<uint4*>(kdst + (head - p.nq) * kHeadDim);
    dst[ch] = pack_bf16x8(y1);
    dst[kChunksPerHalf + ch] = pack_bf16x8(y2);
  }
  // v: nkv heads x 8 chunks, copied
  if (write_kv) {
    const int n_v = p.nkv * (kHeadDim / 8);
    const uint4* vsrc = row + (p.nq + p.nkv) * (kHeadDim / 8);
    for (int item = threadIdx.x; item < n_v; item += kRopeThreads)
      reinterpret_cast<uint4*>(vdst)[item] = __ldcg(vsrc + item);
  }
}

// One thread per 16-byte chunk of k or v: chunk index e over [T][nkv * d / 8].
__global__ void __launch_bounds__(256) cache_append_kernel(const uint4* __restrict__ k, const uint4* __restrict__ v,
                                                           const int32_t* __restrict__ seq_ids,
                                                           const int32_t* __restrict__ positions,
                                                           uint4* __restrict__ k_cache, uint4* __restrict__ v_cache,
                                                           int64_t T, int64_t row_chunks, int64_t batch, int64_t S) {
  const int64_t total = T * row_chunks;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = e / row_chunks;
    const int64_t j = e - t * row_chunks;
    const int32_t seq = seq_ids[t];
    if (seq < 0 || seq >= batch) continue;
    const int64_t dst = (static_cast<int64_t>(seq) * S + gptoss::cache_slot(positions[t], S)) * row_chunks + j;
    k_cache[dst] = k[e];
    v_cache[dst] = v[e];
  }
}

bool rope_fill_params(RopeParams& p, const float* inv_freq, float concentration, int nq, int nkv) {
  p.nq = nq;
  p.nkv = nkv;
  p.concentration = concentration;
  for (int j = 0; j < kPairs; ++j) p.inv.v[j] = inv_freq[j];
  return true;
}

}  // namespace

GPTOSS_API gptoss_status gptoss_yarn_inv_freq(int head_dim, float theta, float factor, float beta_fast,
                                              float beta_slow, int original_context, float* inv_freq_out,
                                              float* concentration_out) {
  GPTOSS_REQUIRE(head_dim > 0 && head_dim % 2 == 0, "yarn_inv_freq: head_dim must be a positive even number");
  GPTOSS_REQUIRE(theta > 1.0f && beta_fast > 0.0f && beta_slow > 0.0f && original_context > 0,
                 "yarn_inv_freq: theta must be > 1, beta_fast, beta_slow and original_context > 0");
  GPTOSS_REQUIRE(inv_freq_out && concentration_out, "yarn_inv_freq: null pointer");
  const gptoss::YarnParams prm{head_dim, theta, factor, beta_fast, beta_slow, original_context};
  for (int j = 0; j < head_dim / 2; ++j) inv_freq_out[j] = gptoss::yarn_inv_freq(j, prm);
  *concentration_out = gptoss::yarn_concentration(factor);
  return GPTOSS_OK;
}

#define ROPE_COMMON_CHECKS(name)                                                                          \
  GPTOSS_REQUIRE(T >= 0, name ": T must be >= 0");                                                         \
  GPTOSS_REQUIRE(head_dim == kHeadDim, name ": head_dim must be 64");                                      \
  GPTOSS_REQUIRE(num_q_heads > 0 && num_kv_heads > 0, name ": num_q_heads and num_kv_heads must be > 0"); \
  GPTOSS_REQUIRE(T <= 0x7fffffff, name ": T must be < 2^31");                                             \
  GPTOSS_REQUIRE(inv_freq != nullptr, name ": inv_freq (host array of head_dim/2 floats) is null")

GPTOSS_API gptoss_status gptoss_rope_qkv_bf16(const void* qkv, const int32_t* positions, void* q_out, void* k_out,
                                              void* v_out, int64_t T, int num_q_heads, int num_kv_heads,
                                              int head_dim, const float* inv_freq, float concentration,
                                              cudaStream_t stream) {
  ROPE_COMMON_CHECKS("rope_qkv");
  if (T == 0) return GPTOSS_OK;
  GPTOSS_REQUIRE(qkv && positions && q_out && k_out && v_out, "rope_qkv: null pointer");
  GPTOSS_REQUIRE(gptoss::aligned(qkv, 16) && gptoss::aligned(q_out, 16) && gptoss::aligned(k_out, 16) &&
                     gptoss::aligned(v_out, 16),
                 "rope_qkv: qkv, q_out, k_out and v_out must be 16-byte aligned");
  RopeParams p{};
  p.qkv = static_cast<const __nv_bfloat16*>(qkv);
  p.positions = positions;
  p.q_out = static_cast<__nv_bfloat16*>(q_out);
  p.k_out = static_cast<__nv_bfloat16*>(k_out);
  p.v_out = static_cast<__nv_bfloat16*>(v_out);
  rope_fill_params(p, inv_freq, concentration, num_q_heads, num_kv_heads);
  GPTOSS_CUDA_TRY(gptoss::pdl::launch(rope_kernel<false>, dim3(static_cast<unsigned>(T)), dim3(kRopeThreads), 0,
                                      stream, true, p),
                  "rope_qkv launch");
  return GPTOSS_OK;
}

GPTOSS_API gptoss_status gptoss_rope_cache_append_bf16(const void* qkv, const int32_t* seq_ids,
                                                       const int32_t* positions, void* q_out, void* k_cache,
                                                       void* v_cache, int64_t T, int num_q_heads,
                                                       int num_kv_heads, int head_dim, int64_t batch,
                                                       int64_t cache_size, const float* inv_freq,
                                                       float concentration, cudaStream_t stream) {
  ROPE_COMMON_CHECKS("rope_cache_append");
  GPTOSS_REQUIRE(batch >= 0 && cache_size > 0, "rope_cache_append: batch must be >= 0 and cache_size > 0");
  if (T == 0) return GPTOSS_OK;
  GPTOSS_REQUIRE(qkv && seq_ids && positions && q_out && (batch == 0 || (k_cache && v_cache)),
                 "rope_cache_append: null pointer");
  GPTOSS_REQUIRE(gptoss::aligned(qkv, 16) && gptoss::aligned(q_out, 16) && gptoss::aligned(k_cache, 16) &&
                     gptoss::aligned(v_cache, 16),
                 "rope_cache_append: qkv, q_out, k_cache and v_cache must be 16-byte aligned");
  RopeParams p{};
  p.qkv = static_cast<const __nv_bfloat16*>(qkv);
  p.positions = positions;
  p.seq_ids = seq_ids;
  p.q_out = static_cast<__nv_bfloat16*>(q_out);
  p.k_out = static_cast<__nv_bfloat16*>(k_cache);
  p.v_out = static_cast<__nv_bfloat16*>(v_cache);
  p.batch = batch;
  p.S = cache_size;
  rope_fill_params(p, inv_freq, concentration, num_q_heads, num_kv_heads);
  GPTOSS_CUDA_TRY(gptoss::pdl::launch(rope_kernel<true>, dim3(static_cast<unsigned>(T)), dim3(kRopeThreads), 0,
                                      stream, true, p),
                  "rope_cache_append launch");
  return GPTOSS_OK;
}

GPTOSS_API gptoss_status gptoss_cache_append_bf16(const void* k, const void* v, const int32_t* seq_ids,
                                                  const int32_t* positions, void* k_cache, void* v_cache,
                                                  int64_t T, int num_kv_heads, int head_dim, int64_t batch,
                                                  int64_t cache_size, cudaStream_t stream) {
  GPTOSS_REQUIRE(T >= 0 && batch >= 0 && cache_size > 0, "cache_append: T, batch must be >= 0, cache_size > 0");
  GPTOSS_REQUIRE(num_kv_heads > 0 && head_dim > 0 && head_dim % 8 == 0,
                 "cache_append: num_kv_heads > 0 and head_dim a positive multiple of 8 required");
  if (T == 0 || batch == 0) return GPTOSS_OK;
  GPTOSS_REQUIRE(k && v && seq_ids && positions && k_cache && v_cache, "cache_append: null pointer");
  GPTOSS_REQUIRE(gptoss::aligned(k, 16) && gptoss::aligned(v, 16) && gptoss::aligned(k_cache, 16) &&
                     gptoss::aligned(v_cache, 16),
                 "cache_append: k, v, k_cache and v_cache must be 16-byte aligned");
  const int64_t row_chunks = static_cast<int64_t>(num_kv_heads) * head_dim / 8;
  const int64_t total = T * row_chunks;
  const int threads = 256;
  const int64_t want = (total + threads - 1) / threads;
  const int grid = static_cast<int>(want < 65535 * 8 ? want : 65535 * 8);
  return gptoss::cuda_status(gptoss::pdl::launch_plain(cache_append_kernel, dim3(grid), dim3(threads), 0, stream, 
      static_cast<const uint4*>(k), static_cast<const uint4*>(v), seq_ids, positions, static_cast<uint4*>(k_cache),
      static_cast<uint4*>(v_cache), T, row_chunks, batch, cache_size), "cache_append launch");
}
