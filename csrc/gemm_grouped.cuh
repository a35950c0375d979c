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

// ---- MXFP4 -> bf16 by byte permutation ------------------------------------------------------
// A 32-bit word of packed MXFP4 holds 8 E2M1 codes (nibble n = element n: the low nibble of each
// byte is the even element). The bf16 of magnitude m = code & 7 (0, .5, 1, 1.5, 2, 3, 4, 6) is
// high byte {00,3F,3F,3F,40,40,40,40}[m], low byte {00,00,80,C0,00,40,80,C0}[m]: two byte
// permutations with the magnitudes as selectors look up 4 high and 4 low bytes at once, two more
// interleave them into bf16 pairs, and the sign bits are moved to bits 15/31. Every value is a
// normal bf16 (no subnormal intermediate), then one bf16x2 product by the E8M0 scale 2^(s-127)
// (e8m0_to_bf16_bits) is exact for every scale byte in [1, 254] (s = 0 gives the subnormal
// 2^-127 as the factor; s = 255 overflows to inf where the fp32 reference gives 2^128 * v:
// neither appears in real checkpoints).

// byte n of the result = byte ((s >> 4n) & 7) of the 8 bytes {y:x} (x = bytes 0-3): prmt.b32.
GPTOSS_HD uint32_t byte_perm(uint32_t x, uint32_t y, uint32_t s) {
#if defined(__CUDA_ARCH__)
  return __byte_perm(x, y, s);
#else
  const uint64_t v = (static_cast<uint64_t>(y) << 32) | x;
  uint32_t r = 0;
  for (int n = 0; n < 4; ++n) r |= static_cast<uint32_t>((v >> (8 * ((s >> (4 * n)) & 7u))) & 0xFFu) << (8 * n);
  return r;
#endif
}

constexpr uint32_t kFp4HiBytes0 = 0x3F3F3F00u, kFp4HiBytes1 = 0x40404040u;  // magnitudes 0-3, 4-7
constexpr uint32_t kFp4LoBytes0 = 0xC0800000u, kFp4LoBytes1 = 0xC0804000u;

// Elements 0..3 of the low 16 bits of `h` (4 codes) -> two bf16x2 words (low half = even element).
GPTOSS_HD void fp4x4_to_bf16x4(uint32_t h, uint32_t& w01, uint32_t& w23) {
  const uint32_t sel = h & 0x7777u;
  const uint32_t hi = byte_perm(kFp4HiBytes0, kFp4HiBytes1, sel);
  const uint32_t lo = byte_perm(kFp4LoBytes0, kFp4LoBytes1, sel);
  w01 = byte_perm(lo, hi, 0x5140u) | ((h << 12) & 0x8000u) | ((h << 24) & 0x80000000u);
  w23 = byte_perm(lo, hi, 0x7362u) | ((h << 4) & 0x8000u) | ((h << 16) & 0x80000000u);
}

// 8 codes of a packed word -> 4 bf16x2 words, exact E2M1 values (no scale).
GPTOSS_HD void fp4x8_to_bf16x8(uint32_t w, uint32_t (&out)[4]) {
  fp4x4_to_bf16x4(w & 0xFFFFu, out[0], out[1]);
  fp4x4_to_bf16x4(w >> 16, out[2], out[3]);
}

// bf16 bits of 2^(s-127): exponent field s for s >= 1; s = 0 is the subnormal 2^-127.
GPTOSS_HD uint32_t e8m0_to_bf16_bits(uint32_t s) { return s ? (s << 7) : 0x0040u; }

}  // namespace grouped
}  // namespace gptoss
