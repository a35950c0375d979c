// Prefill flash attention with sinks, causal / sliding-window mask, GQA 8:1, head_dim 64, varlen
// and a KV-cache prefix (gptoss/attention_prefill.h). Tensor cores: mma.sync m16n8k16 bf16 with
// ldmatrix (HMMA in SASS); fp32 accumulation and online softmax (csrc/flash_prefill.cuh).
//
// Work decomposition ("packed GQA"): one block of 8 warps per (q-tile of 16 consecutive positions
// of one sequence, KV head g). Its 128 MMA rows are (position, query head of group g):
// row r = 8 * position_in_tile + head_in_group. The 8 query heads that share KV head g are
// contiguous in memory (q[t, 8g .. 8g+7, :] = 1 KB), so the Q tile and the output tile are 16
// contiguous 1 KB runs, and each K/V tile is loaded into shared memory once for all 8 heads.
// Warp w owns rows 16w .. 16w+15 = positions 2w, 2w+1; in the mma accumulator layout a lane
// holds rows lane/4 (position 2w) and lane/4 + 8 (position 2w+1), both of head lane/4. Small
// query tiles (16 positions) keep sliding-window layers tight: a tile visits
// ceil-ish((16 + 127) / 64) = 3 KV tiles of 64 keys, ~2/3 of the computed logits are visible.
//
// KV tiles are 64 absolute key positions (aligned to 64), from the first visible key of the
// q-tile's range to its last (flash::kv_tile_range); tiles outside are never visited, masking
// runs only on tiles with a causal or window edge (flash::tile_needs_mask). A key position
// < p0_b is read from the cache (slot p % S), >= p0_b from the chunk's k/v; key rows outside the
// visible range of the q-tile are zero-filled (never garbage: P = 0 times a NaN would be NaN).
// K/V tiles are double-buffered with cp.async (the next tile loads while this one computes).
// Shared memory rows are 128 bytes (64 bf16) with the 16-byte chunk index XOR-ed with (row & 7),
// so ldmatrix's 8 row addresses of one 8x8 matrix hit 8 different bank groups.
//
// Grid: x = q-tiles over all sequences (over-allocated as ceil(total_q / 16) + batch, extra blocks
// exit), visited last-first so the long causal tiles start first; y = KV head. No host sync.
//
// Two builds of one kernel template:
//  - attention_prefill_kernel<false>: mma.sync m16n8k16 (HMMA); K, V and Q fragments by ldmatrix
//    (V with .trans). Every warp re-reads the whole K/V tile from shared memory (16 rows per warp).
//  - attention_prefill_kernel<true>: wgmma m64n64k16 (HGMMA, sm_90a): each warpgroup (4 warps,
//    64 rows) computes S = Q K^T with both operands from shared memory (K-major, 128B swizzle =
//    the same swizzled tiles), softmax in registers (same per-warp accumulator layout), then
//    O += P V with P from registers and V as a transposed (N-major) shared-memory operand. A K/V
//    tile is read once per 64 rows instead of once per 16: the path for long full-causal prefill.
// The launcher's AUTO choice is the mma.sync kernel until the wgmma one has passed the GPU tests
// (kAutoWgmma); both are reachable through gptoss_attention_prefill_bf16_impl.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <string>

#include "arch.cuh"
#include "pdl.cuh"
#include "ptx.cuh"
#include "gemm_wgmma.cuh"
#include "common.cuh"
#include "flash_prefill.cuh"
#include "gptoss/attention_prefill.h"

namespace {
using gptoss::cp_async_commit;
using gptoss::mma_bf16_16816;

namespace fl = gptoss::flash;

constexpr int kHeadDim = 64;
constexpr int kGroup = 8;                      // query heads per KV head
constexpr int kQPos = 16;                      // query positions per block
constexpr int kRows = kQPos * kGroup;          // 128 MMA rows
constexpr int kWarps = kRows / 16;             // 8
constexpr int kThreads = kWarps * 32;          // 256
constexpr int kKeys = 64;                      // keys per KV tile
constexpr int kRowBytes = kHeadDim * 2;        // 128
constexpr int kTileBytes = kKeys * kRowBytes;  // 8 KB per K or V tile
constexpr int kQBytes = kRows * kRowBytes;     // 16 KB
constexpr int kSmemBytes = kQBytes + 2 * 2 * kTileBytes + 1024;  // Q + 2 stages x (K, V) + align = 49 KB
constexpr float kLog2e = 1.4426950408889634f;
// Auto selection of the wgmma kernel (full causal, >= 2048 packed rows). Off until the wgmma
// kernel has passed the GPU tests (tests/test_attention_prefill.py runs both kernels explicitly).
constexpr bool kAutoWgmma = false;

static_assert(2 * kSmemBytes <= 227 * 1024, "two blocks per SM");

struct Params {
  const __nv_bfloat16* q;
  const __nv_bfloat16* k;
  const __nv_bfloat16* v;
  const __nv_bfloat16* sinks;
  const int32_t* cu_seqlens;
  const __nv_bfloat16* k_cache;
  const __nv_bfloat16* v_cache;
  const int32_t* cache_seqlens;
  __nv_bfloat16* out;
  int64_t cache_slots;
  int batch;
  int nkv;
  int window;        // 0 = full causal
  float scale_log2;  // sm_scale * log2(e)
};

// Byte offset of 16-byte chunk c (0..7) of row r in a swizzled [rows][64] bf16 tile.
__device__ __forceinline__ uint32_t swz(int r, int c) {
  return static_cast<uint32_t>(r * kRowBytes + ((c ^ (r & 7)) << 4));
}

__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  gptoss::cp_async_cg16(dst, src, valid ? 16 : 0);  // src-size 0 zero-fills the 16 bytes without reading src
}
__device__ __forceinline__ void cp_async_wait_all() { gptoss::cp_async_wait<0>(); }

__device__ __forceinline__ void ldsm_x4(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3) {
  uint32_t r[4];
  gptoss::ldmatrix_x4_b16(r, addr);
  r0 = r[0], r1 = r[1], r2 = r[2], r3 = r[3];
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3) {
  uint32_t r[4];
  gptoss::ldmatrix_x4_trans_b16(r, addr);
  r0 = r[0], r1 = r[1], r2 = r[2], r3 = r[3];
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x (low half) = lo
  return *reinterpret_cast<const uint32_t*>(&v);
}

// ---- wgmma (sm_90a) ----
// Shared-memory matrix descriptor: start address, leading / stride byte offsets, 128-byte swizzle.
// Our tiles are rows of 128 bytes with chunk c of row r at chunk c ^ (r & 7), 1024-byte aligned:
// the canonical 128B-swizzle layout (8-row x 128-byte atoms, consecutive atoms 1024 bytes apart).
__device__ __forceinline__ uint64_t smem_desc(uint32_t addr, uint32_t lbo_bytes, uint32_t sbo_bytes) {
  return static_cast<uint64_t>((addr & 0x3FFFFu) >> 4) | (static_cast<uint64_t>(lbo_bytes >> 4) << 16) |
         (static_cast<uint64_t>(sbo_bytes >> 4) << 32) | (uint64_t(1) << 62);
}
__device__ __forceinline__ void wgmma_fence() { gptoss::wgmma::fence(); }
__device__ __forceinline__ void wgmma_commit() { gptoss::wgmma::commit(); }
__device__ __forceinline__ void wgmma_wait0() { gptoss::wgmma::wait<0>(); }
__device__ __forceinline__ void fence_proxy_async() { gptoss::fence_proxy_async_shared_cta(); }

// d(64x64 per warpgroup; this warp's 16 rows in mma.sync C layout, n8 chunk j = d[j]) +=
// A(64x16, K-major, smem) * B(16x64 given as [n][k], K-major, smem).
// scale_d 0: d is overwritten, not read (the first k-step of a product).
__device__ __forceinline__ void wgmma_ss(float (&d)[8][4], uint64_t desc_a, uint64_t desc_b, int scale_d = 1) {
  gptoss::wgmma::mma_m64n64k16_ss(d, desc_a, desc_b, scale_d);
}
// d += A(64x16 from registers, mma.sync A layout per warp) * B(16x64 given as [k][n], N-major
// smem: transposed operand).
__device__ __forceinline__ void wgmma_rs_tb(float (&d)[8][4], const uint32_t (&a)[4], uint64_t desc_b) {
  gptoss::wgmma::mma_m64n64k16_rs_tnspb(d, a, desc_b);
}

// kUseWgmma: the same algorithm with the two products on wgmma (warpgroup w/4 owns rows
// 64*(w/4) .. +63, i.e. each warp still owns its 16 rows in the same accumulator layout).
template <bool kUseWgmma>
__device__ __forceinline__ void attention_prefill_body(const Params& p) {
  GPTOSS_DYNAMIC_SMEM(uint8_t, smem_raw, 128);
  // 1024-byte alignment for the 128B-swizzle atoms (wgmma descriptors; the launch adds 1 KB slack)
  const uint32_t s_raw = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw));
  uint8_t* const smem = smem_raw + ((1024u - (s_raw & 1023u)) & 1023u);
  const uint32_t s_base = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const uint32_t sQ = s_base;
  const uint32_t sKV = s_base + kQBytes;  // stage s: K at sKV + s*2*kTileBytes, V after it

  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int lane = tid & 31;
  const int g = blockIdx.y;
  const int nq = p.nkv * kGroup;

  int b, t0;
  if (!fl::locate_q_tile(p.cu_seqlens, p.batch, static_cast<int>(gridDim.x - 1 - blockIdx.x), kQPos, &b, &t0))
    return;
  const int row0 = p.cu_seqlens[b];  // packed row of the sequence's first chunk token
  const int seq_len = p.cu_seqlens[b + 1] - row0;
  const int p0 = p.cache_seqlens != nullptr ? p.cache_seqlens[b] : 0;
  const int n_valid = min(kQPos, seq_len - t0);
  const int q_first = p0 + t0;  // position of the tile's row 0 (rows past n_valid are not stored)
  const int q_last = q_first + n_valid - 1;
  const int key_lo = fl::range_first_key(q_first, p.window);
  const int key_hi = fl::range_last_key(q_last);
  int kt_first, kt_last;
  fl::kv_tile_range(q_first, q_last, p.window, kKeys, &kt_first, &kt_last);

  // ---- Q tile (cp.async group 0) ----
#pragma unroll
  for (int i = 0; i < kRows * 8 / kThreads; ++i) {
    const int idx = tid + i * kThreads;
    const int r = idx >> 3, c = idx & 7;
    const int pos = r >> 3, h = r & 7;
    const bool valid = pos < n_valid;
    const __nv_bfloat16* src =
        valid ? p.q + ((static_cast<int64_t>(row0 + t0 + pos) * nq + g * kGroup + h) * kHeadDim + c * 8) : p.q;
    cp_async16(sQ + swz(r, c), src, valid);
  }
  cp_async_commit();

  auto load_kv = [&](int kt, int stage) {
    const uint32_t sK = sKV + stage * 2 * kTileBytes;
    const uint32_t sV = sK + kTileBytes;
#pragma unroll
    for (int i = 0; i < kKeys * 8 / kThreads; ++i) {
      const int idx = tid + i * kThreads;
      const int j = idx >> 3, c = idx & 7;
      const int kp = kt * kKeys + j;
      const bool valid = kp >= key_lo && kp <= key_hi;
      const __nv_bfloat16* ks = p.k;
      const __nv_bfloat16* vs = p.v;
      if (valid) {
        int64_t off;
        if (kp < p0) {
          off = ((static_cast<int64_t>(b) * p.cache_slots + kp % p.cache_slots) * p.nkv + g) * kHeadDim + c * 8;
          ks = p.k_cache + off;
          vs = p.v_cache + off;
        } else {
          off = (static_cast<int64_t>(row0 + kp - p0) * p.nkv + g) * kHeadDim + c * 8;
          ks = p.k + off;
          vs = p.v + off;
        }
      }
      cp_async16(sK + swz(j, c), ks, valid);
      cp_async16(sV + swz(j, c), vs, valid);
    }
    cp_async_commit();
  };

  load_kv(kt_first, 0);

  // Per-lane state: rows A (position 2w, head lane/4) and B (position 2w + 1, same head).
  const float sink_log2 = __bfloat162float(p.sinks[g * kGroup + (lane >> 2)]) * kLog2e;
  float m[2] = {fl::online_init_max(sink_log2), fl::online_init_max(sink_log2)};
  float l[2] = {0.f, 0.f};  // this lane's partial sums (its 16 columns of each tile)
  float o[8][4];            // O: 8 n-tiles of 8 dims x (row A: 0,1; row B: 2,3)
#pragma unroll
  for (int d = 0; d < 8; ++d)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[d][e] = 0.f;
  const int qpos_a = q_first + 2 * warp;

  for (int kt = kt_first; kt <= kt_last; ++kt) {
    const int stage = (kt - kt_first) & 1;
    cp_async_wait_all();
    if constexpr (kUseWgmma) fence_proxy_async();  // cp.async data -> tensor-core (async proxy) reads
    __syncthreads();  // tile kt visible to all; everyone is done with the other stage
    if (kt < kt_last) load_kv(kt + 1, stage ^ 1);
    const uint32_t sK = sKV + stage * 2 * kTileBytes;
    const uint32_t sV = sK + kTileBytes;

    // ---- S = Q K^T (16 rows x 64 keys per warp) ----
    float s[8][4];
    if constexpr (kUseWgmma) {
      // K-major A (Q rows of this warpgroup) and B (K): leading offset unused with 128B swizzle,
      // stride 1024 bytes between 8-row atoms; a k-step of 16 dims = 32 bytes into each row. The
      // first k-step overwrites s (scale-d 0): no zeroing moves between the fence and the mma.
      const uint32_t qa = sQ + (warp >> 2) * 64 * kRowBytes;
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < 4; ++kk)
        wgmma_ss(s, smem_desc(qa + 32 * kk, 16, 1024), smem_desc(sK + 32 * kk, 16, 1024), kk > 0 ? 1 : 0);
      wgmma_commit();
      wgmma_wait0();
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[j][e] = 0.f;
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        // Q A-fragment of this k-step, re-read from shared memory each tile (keeps 16 registers free)
        uint32_t qf[4];
        ldsm_x4(sQ + swz(warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, 2 * kk + (lane >> 4)), qf[0], qf[1], qf[2],
                qf[3]);
#pragma unroll
        for (int jj = 0; jj < 4; ++jj) {
          const int mat = lane >> 3;
          const int key = (2 * jj + (mat >> 1)) * 8 + (lane & 7);
          uint32_t b0, b1, b2, b3;
          ldsm_x4(sK + swz(key, 2 * kk + (mat & 1)), b0, b1, b2, b3);
          mma_bf16_16816(s[2 * jj], qf, b0, b1);
          mma_bf16_16816(s[2 * jj + 1], qf, b2, b3);
        }
      }
    }

    // ---- scale, mask, online softmax ----
    const int kbase = kt * kKeys;
    const bool masked = fl::tile_needs_mask(kbase, kKeys, q_first, q_last, p.window);
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = s[j][e] * p.scale_log2;
        if (masked) {
          const int key = kbase + 8 * j + 2 * (lane & 3) + (e & 1);
          if (!fl::key_visible(key, qpos_a + (e >> 1), p.window)) x = -INFINITY;
        }
        s[j][e] = x;
      }
    float factor[2];
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      float mx = -INFINITY;
#pragma unroll
      for (int j = 0; j < 8; ++j) mx = fmaxf(mx, fmaxf(s[j][2 * rr], s[j][2 * rr + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      m[rr] = fl::online_update_max(m[rr], mx, &factor[rr]);
    }
    float rs[2] = {0.f, 0.f};
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float pe = fl::fast_exp2(s[j][e] - m[e >> 1]);
        s[j][e] = pe;
        rs[e >> 1] += pe;
      }
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) l[rr] = l[rr] * factor[rr] + rs[rr];
#pragma unroll
    for (int d = 0; d < 8; ++d) {
      o[d][0] *= factor[0];
      o[d][1] *= factor[0];
      o[d][2] *= factor[1];
      o[d][3] *= factor[1];
    }

    // ---- O += P V (P rounded to bf16 as the A operand) ----
    if constexpr (kUseWgmma) {
      // V [key][dim] is N-major for this product (transposed B). With 64 dims = one 128-byte
      // swizzle row, only the 1024-byte step between 8-key atoms matters; both offsets are set
      // to it. A k-step of 16 keys = 2 atoms = 2048 bytes.
      uint32_t a[4][4];
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        a[kk][0] = pack_bf16(s[2 * kk][0], s[2 * kk][1]);
        a[kk][1] = pack_bf16(s[2 * kk][2], s[2 * kk][3]);
        a[kk][2] = pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]);
        a[kk][3] = pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3]);
      }
      wgmma_fence();  // after the last register writes to o (rescale) and a
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) wgmma_rs_tb(o, a[kk], smem_desc(sV + 2048 * kk, 1024, 1024));
      wgmma_commit();
      wgmma_wait0();
    } else {
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        const uint32_t a[4] = {pack_bf16(s[2 * kk][0], s[2 * kk][1]), pack_bf16(s[2 * kk][2], s[2 * kk][3]),
                               pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                               pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
        for (int dd = 0; dd < 4; ++dd) {
          const int mat = lane >> 3;
          const int key = 16 * kk + (mat & 1) * 8 + (lane & 7);
          uint32_t b0, b1, b2, b3;
          ldsm_x4_t(sV + swz(key, 2 * dd + (mat >> 1)), b0, b1, b2, b3);
          mma_bf16_16816(o[2 * dd], a, b0, b1);
          mma_bf16_16816(o[2 * dd + 1], a, b2, b3);
        }
      }
    }
  }

  // ---- finish: O / (sum + sink term), stage through this warp's own Q rows, 16-byte stores ----
  float inv[2];
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    float lt = l[rr];
    lt += __shfl_xor_sync(0xffffffffu, lt, 1);
    lt += __shfl_xor_sync(0xffffffffu, lt, 2);
    inv[rr] = 1.0f / fl::online_finish(lt, m[rr], sink_log2);
  }
  if constexpr (kUseWgmma) __syncthreads();  // every warpgroup's reads of its Q rows are done
  {
    uint8_t* sq_gen = smem;  // generic pointer of the Q region
    const int ra = warp * 16 + (lane >> 2);
#pragma unroll
    for (int d = 0; d < 8; ++d) {
      *reinterpret_cast<uint32_t*>(sq_gen + swz(ra, d) + (lane & 3) * 4) = pack_bf16(o[d][0] * inv[0], o[d][1] * inv[0]);
      *reinterpret_cast<uint32_t*>(sq_gen + swz(ra + 8, d) + (lane & 3) * 4) =
          pack_bf16(o[d][2] * inv[1], o[d][3] * inv[1]);
    }
    __syncwarp();
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int idx = lane + 32 * i;
      const int r = warp * 16 + (idx >> 3), c = idx & 7;
      const int pos = r >> 3, h = r & 7;
      if (pos < n_valid) {
        const uint4 val = *reinterpret_cast<const uint4*>(sq_gen + swz(r, c));
        *reinterpret_cast<uint4*>(p.out + ((static_cast<int64_t>(row0 + t0 + pos) * nq + g * kGroup + h) * kHeadDim +
                                           c * 8)) = val;
      }
    }
  }
}

// <false>: every architecture; <true>: sm_90a code only (a stub that traps elsewhere; the launcher
// picks it only where gptoss_arch_info.wgmma says it runs).
template <bool kUseWgmma>
__global__ void __launch_bounds__(kThreads, 2) attention_prefill_kernel(const Params p) {
  if constexpr (kUseWgmma && GPTOSS_NO_WGMMA_CODE_PASS) {
    GPTOSS_UNAVAILABLE_KERNEL_BODY();
  } else {
    attention_prefill_body<kUseWgmma>(p);
  }
}

}  // namespace

GPTOSS_API gptoss_status gptoss_attention_prefill_bf16_impl(
    const void* q, const void* k, const void* v, const void* sinks, const int32_t* cu_seqlens_q, int32_t batch,
    int64_t total_q, int32_t num_q_heads, int32_t num_kv_heads, int32_t head_dim, const void* k_cache,
    const void* v_cache, const int32_t* cache_seqlens, int64_t cache_slots, int32_t sliding_window, float sm_scale,
    void* out, int32_t impl, cudaStream_t stream) {
  GPTOSS_REQUIRE(impl >= GPTOSS_ATTENTION_PREFILL_AUTO && impl <= GPTOSS_ATTENTION_PREFILL_WGMMA,
                 "attention_prefill: impl must be 0 (auto), 1 (mma.sync) or 2 (wgmma)");
  GPTOSS_REQUIRE(batch >= 0 && total_q >= 0, "attention_prefill: batch and total_q must be >= 0");
  GPTOSS_REQUIRE(num_kv_heads > 0 && num_q_heads > 0 && head_dim > 0,
                 "attention_prefill: head counts and head_dim must be positive");
  GPTOSS_REQUIRE(sliding_window >= 0, "attention_prefill: sliding_window must be >= 0 (0 = full causal)");
  GPTOSS_REQUIRE((k_cache == nullptr) == (v_cache == nullptr) && (k_cache == nullptr) == (cache_seqlens == nullptr),
                 "attention_prefill: k_cache, v_cache and cache_seqlens go together");
  GPTOSS_REQUIRE(k_cache == nullptr || cache_slots > 0, "attention_prefill: cache_slots must be > 0 with a cache");
  if (head_dim != kHeadDim || num_q_heads != kGroup * num_kv_heads)
    return gptoss::set_error(GPTOSS_ERROR_UNSUPPORTED,
                             "attention_prefill: only head_dim 64 and 8 query heads per KV head are supported");
  GPTOSS_REQUIRE(num_kv_heads <= 65535, "attention_prefill: too many KV heads");
  if (total_q == 0 || batch == 0) return GPTOSS_OK;
  GPTOSS_REQUIRE(q && k && v && sinks && cu_seqlens_q && out, "attention_prefill: null pointer");
  GPTOSS_REQUIRE(gptoss::aligned(q, 16) && gptoss::aligned(k, 16) && gptoss::aligned(v, 16) &&
                     gptoss::aligned(out, 16) && gptoss::aligned(k_cache, 16) && gptoss::aligned(v_cache, 16),
                 "attention_prefill: q, k, v, out and the caches must be 16-byte aligned");
  GPTOSS_REQUIRE(total_q * num_q_heads * kHeadDim < (int64_t(1) << 62) && total_q < (int64_t(1) << 30),
                 "attention_prefill: total_q too large");
  const int64_t tiles = (total_q + kQPos - 1) / kQPos + batch;
  GPTOSS_REQUIRE(tiles < (int64_t(1) << 31), "attention_prefill: too many query tiles");
  Params prm;
  prm.q = static_cast<const __nv_bfloat16*>(q);
  prm.k = static_cast<const __nv_bfloat16*>(k);
  prm.v = static_cast<const __nv_bfloat16*>(v);
  prm.sinks = static_cast<const __nv_bfloat16*>(sinks);
  prm.cu_seqlens = cu_seqlens_q;
  prm.k_cache = static_cast<const __nv_bfloat16*>(k_cache);
  prm.v_cache = static_cast<const __nv_bfloat16*>(v_cache);
  prm.cache_seqlens = cache_seqlens;
  prm.out = static_cast<__nv_bfloat16*>(out);
  prm.cache_slots = k_cache ? cache_slots : 1;
  prm.batch = batch;
  prm.nkv = num_kv_heads;
  prm.window = sliding_window;
  prm.scale_log2 = sm_scale * kLog2e;
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(num_kv_heads));
  gptoss_arch_info arch;
  const gptoss_status arch_st = gptoss::arch::current(&arch);
  if (arch_st != GPTOSS_OK) return arch_st;
  if (impl == GPTOSS_ATTENTION_PREFILL_WGMMA && !arch.wgmma)
    return gptoss::set_error(GPTOSS_ERROR_UNSUPPORTED,
                             std::string("attention_prefill: the wgmma kernel needs sm_90a code on a compute capability "
                                         "9.0 device; the paths here are ") +
                                 gptoss::arch::cc_name(arch.cc) + "'s (use impl 0 or 1: the mma.sync kernel)");
  const bool wgmma = impl == GPTOSS_ATTENTION_PREFILL_WGMMA ||
                     (impl == GPTOSS_ATTENTION_PREFILL_AUTO && kAutoWgmma && arch.wgmma && sliding_window == 0 &&
                      total_q >= 2048);
  const auto kernel = wgmma ? attention_prefill_kernel<true> : attention_prefill_kernel<false>;
  // > 48 KB of dynamic shared memory needs the opt-in, once per (kernel, device)
  int dev = 0;
  GPTOSS_CUDA_TRY(cudaGetDevice(&dev), "attention_prefill: cudaGetDevice");
  static std::atomic<uint64_t> opted_in[2] = {0, 0};
  const uint64_t bit = uint64_t(1) << (dev & 63);
  if (!(opted_in[wgmma].load(std::memory_order_relaxed) & bit)) {
    GPTOSS_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes),
                    "attention_prefill: cudaFuncSetAttribute");
    opted_in[wgmma].fetch_or(bit, std::memory_order_relaxed);
  }
  return gptoss::cuda_status(gptoss::pdl::launch_plain(kernel, grid, dim3(kThreads), kSmemBytes, stream, prm),
                             wgmma ? "attention_prefill_kernel<wgmma> launch" : "attention_prefill_kernel<mma> launch");
}

GPTOSS_API gptoss_status gptoss_attention_prefill_bf16(
    const void* q, const void* k, const void* v, const void* sinks, const int32_t* cu_seqlens_q, int32_t batch,
    int64_t total_q, int32_t num_q_heads, int32_t num_kv_heads, int32_t head_dim, const void* k_cache,
    const void* v_cache, const int32_t* cache_seqlens, int64_t cache_slots, int32_t sliding_window, float sm_scale,
    void* out, cudaStream_t stream) {
  return gptoss_attention_prefill_bf16_impl(q, k, v, sinks, cu_seqlens_q, batch, total_q, num_q_heads, num_kv_heads,
                                            head_dim, k_cache, v_cache, cache_seqlens, cache_slots, sliding_window,
                                            sm_scale, out, GPTOSS_ATTENTION_PREFILL_AUTO, stream);
}
