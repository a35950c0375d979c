// Index, mask and online-softmax math of the prefill flash-attention kernel
// (csrc/kernels/attention_prefill.cu), host-testable through _C.host.attention_prefill_*
// (tests/test_attention_prefill.py checks them against brute-force Python).
//
// Positions are absolute token positions of one sequence. A query at position q sees key k when
// k <= q and, with a window W > 0, k > q - W (W keys including its own). window == 0 means full
// causal. Keys are grouped in tiles of `tile_keys` consecutive positions starting at multiples of
// tile_keys (tile t = keys [t*tile_keys, (t+1)*tile_keys)).
//
// Online softmax runs in the log2 domain: logits are pre-multiplied by sm_scale*log2(e), the sink
// by log2(e). The running max starts at the sink (so it is never -inf for a finite sink and a
// fully masked tile contributes exp2(-inf) = 0); the sink's exp2(sink - m) joins the denominator
// once, at the end (equivalent to starting the denominator with it).
#pragma once
#include <cmath>
#include <cstdint>

#include "common.cuh"
#if defined(__CUDACC__)
#include "ptx.cuh"  // the device side's PTX wrappers
#endif

namespace gptoss {
namespace flash {

// Key `key` visible to query `q` (window 0 = none).
GPTOSS_HD bool key_visible(int key, int q, int window) {
  return key >= 0 && key <= q && (window <= 0 || key > q - window);
}

// Smallest and largest key position visible to some query in [q_first, q_last] (q_first <= q_last):
// the visible set of the range is exactly [key_first, key_last] (a union of overlapping intervals).
GPTOSS_HD int range_first_key(int q_first, int window) {
  const int k = window > 0 ? q_first - window + 1 : 0;
  return k > 0 ? k : 0;
}
GPTOSS_HD int range_last_key(int q_last) { return q_last; }

// Inclusive range of key tiles the queries [q_first, q_last] must visit: every tile holding at
// least one visible key, and no other (tiles outside are skipped, not masked).
GPTOSS_HD void kv_tile_range(int q_first, int q_last, int window, int tile_keys, int* first, int* last) {
  *first = range_first_key(q_first, window) / tile_keys;
  *last = range_last_key(q_last) / tile_keys;
}

// False only when every key of the tile [tile_start, tile_start + tile_keys) is visible to every
// query in [q_first, q_last]; then the kernel skips the per-element mask.
GPTOSS_HD bool tile_needs_mask(int tile_start, int tile_keys, int q_first, int q_last, int window) {
  if (tile_start + tile_keys - 1 > q_first) return true;        // causal edge inside the tile
  if (window > 0 && tile_start <= q_last - window) return true;  // window edge inside the tile
  return false;
}

// Varlen: global q-tile index -> (sequence b, first chunk row t0 of the tile within sequence b).
// Each sequence b has ceil(T_b / tile_q) tiles, numbered in sequence order. Returns false when
// `tile` is beyond the last tile (the launch grid over-allocates; those blocks exit).
GPTOSS_HD bool locate_q_tile(const int32_t* cu_seqlens, int batch, int tile, int tile_q, int* b, int* t0) {
  int prev = cu_seqlens[0];
  for (int i = 0; i < batch; ++i) {
    const int next = cu_seqlens[i + 1];
    const int n = (next - prev + tile_q - 1) / tile_q;
    if (tile < n) {
      *b = i;
      *t0 = tile * tile_q;
      return true;
    }
    tile -= n;
    prev = next;
  }
  return false;
}

GPTOSS_HD float fast_exp2(float x) {
#if defined(__CUDA_ARCH__)
  return gptoss::ex2_approx_ftz(x);
#else
  return exp2f(x);
#endif
}

// Lower bound of the running max, so that a sink of -inf (or a row with no keys yet) never gives
// exp2(-inf - -inf) = NaN; any logit that matters is far above it.
constexpr float kMaxFloor = -1.0e30f;

// Running max initialised with the sink (log2 domain).
GPTOSS_HD float online_init_max(float sink_log2) { return sink_log2 > kMaxFloor ? sink_log2 : kMaxFloor; }

// New running max after a tile whose (row) max is tile_max; *factor rescales the old O and l.
GPTOSS_HD float online_update_max(float m_old, float tile_max, float* factor) {
  const float m_new = m_old > tile_max ? m_old : tile_max;
  *factor = fast_exp2(m_old - m_new);
  return m_new;
}

// Denominator once every tile is done: the keys' partial sum plus the sink's term.
GPTOSS_HD float online_finish(float l_keys, float m, float sink_log2) { return l_keys + fast_exp2(sink_log2 - m); }

}  // namespace flash
}  // namespace gptoss
