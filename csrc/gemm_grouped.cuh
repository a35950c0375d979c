// Host-testable arithmetic of the grouped (per-expert) GEMMs of the MoE prefill regime
// (csrc/kernels/moe_prefill.cu): the tile schedule, the chunked stable counting sort that groups
// routed rows by expert, and the MXFP4 -> bf16 bit conversion used inside the GEMM main loops.
// Everything here is GPTOSS_HD (host + device) and checked on the CPU through
// _C.host.moe_prefill_* (csrc/python/bind_moe_prefill.cpp, tests/test_moe_prefill.py).
#pragma once
#include <cstdint>

#include "common.cuh"

namespace gptoss {
namespace grouped {

// ---- tile schedule ------------------------------------------------------------------------
// Work items of one grouped GEMM launch are (expert e, m-tile, n-tile). Expert e owns
// mtiles(count_e) m-tiles; tile_off[e] is the exclusive prefix sum of those over experts
// (tile_off[E] = total m-tiles). The flat work index w = mt_global * n_tiles + nt, so the
// n-tiles of one m-tile (same A rows) are consecutive (A stays in L2) and consecutive m-tiles of
// one expert follow each other (that expert's weights stay in L2).

GPTOSS_HD int ceil_div(int a, int b) { return (a + b - 1) / b; }

GPTOSS_HD int mtiles(int count, int bm) { return ceil_div(count, bm); }

struct Tile {
  int expert;  // e
  int mtile;   // m-tile inside expert e (rows m0 = mtile * BM of the expert's group)
  int ntile;   // n-tile (columns n0 = ntile * BN)
};

// The expert owning global m-tile `mt`: the largest e with tile_off[e] <= mt (experts with no
// tiles have tile_off[e] == tile_off[e+1] and are skipped). Requires 0 <= mt < tile_off[E].
GPTOSS_HD int expert_of_mtile(const int32_t* tile_off, int num_experts, int mt) {
  int lo = 0, hi = num_experts;  // invariant: tile_off[lo] <= mt < tile_off[hi]
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if (tile_off[mid] <= mt) lo = mid; else hi = mid;
  }
  return lo;
}

GPTOSS_HD Tile decode_tile(const int32_t* tile_off, int num_experts, int n_tiles, int w) {
  const int mt = w / n_tiles;
  Tile t;
  t.ntile = w - mt * n_tiles;
  t.expert = expert_of_mtile(tile_off, num_experts, mt);
  t.mtile = mt - tile_off[t.expert];
  return t;
}

// ---- grouping: chunked stable counting sort ----------------------------------------------
// Routed rows r = t*k + j (flat topk_ids) are cut into chunks of `chunk` rows. Pass 1 counts
// rows per (chunk, expert); pass 2 (one block, one thread per expert) turns the counts into
// counts[e], offsets[e] (exclusive prefix over experts) and base[c][e] = offsets[e] + rows of
// expert e in chunks before c; pass 3 gives each row its rank among the rows of its expert
// inside its chunk (in row order) and writes perm[base[c][e] + rank] = r. The result is the
// stable sort of reference.route_metadata: rows of one expert in increasing r.
//
// The scan of pass 2 for one expert: walks the chunks in order. Returns counts[e].
GPTOSS_HD int32_t scan_chunks_for_expert(int32_t* chunk_counts_to_base, int num_chunks, int num_experts, int e) {
  int32_t running = 0;
  for (int c = 0; c < num_chunks; ++c) {
    const int32_t n = chunk_counts_to_base[c * num_experts + e];
    chunk_counts_to_base[c * num_experts + e] = running;  // in-place: counts -> base (before offsets)
    running += n;
  }
  return running;
}

// ---- MXFP4 -> bf16 by bit arithmetic --------------------------------------------------------
// One byte holds two E2M1 codes (low nibble = even element). Placing a code's 3 magnitude bits
// at bf16 bits 6..8 (exponent field low 2 bits + top mantissa bit) and its sign at bit 15 gives
// the bf16 whose value is exactly value(code) * 2^-126 (the zero-exponent code 1 = 0.5 lands on
// the bf16 subnormal 2^-127, also exact). Multiplying by 2^126 (kFp4RawToValueBits) and then by
// the E8M0 scale 2^(s-127) (e8m0_to_bf16_bits) are exact bf16 products for every scale byte
// s in [0, 254] (s = 255 overflows to inf where the fp32 reference gives 2^128 * v: not a value
// a real checkpoint holds). Returns the bf16x2 word: low half = even element.
GPTOSS_HD uint32_t fp4x2_to_bf16x2_raw(uint32_t byte) {
  return ((byte & 0x8u) << 12) | ((byte & 0x7u) << 6) | ((byte & 0x80u) << 24) | ((byte & 0x70u) << 18);
}

constexpr uint32_t kFp4RawToValueBits = 253u << 7;  // bf16 2^126 = exponent field 253

// bf16 bits of 2^(s-127): exponent field s for s >= 1; s = 0 is the subnormal 2^-127.
GPTOSS_HD uint32_t e8m0_to_bf16_bits(uint32_t s) { return s ? (s << 7) : 0x0040u; }

}  // namespace grouped
}  // namespace gptoss
