#include <cstring>
#include <vector>

#include "binding.h"
#include "gemm_grouped.cuh"

namespace {

float bf16_bits_to_float(uint32_t bits) {
  const uint32_t u = (bits & 0xFFFFu) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// float -> nearest bf16 (ties to even), as a float: what the device's bf16 products round to.
float round_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7F800000u) != 0x7F800000u) u += 0x7FFFu + ((u >> 16) & 1u);
  u &= 0xFFFF0000u;
  std::memcpy(&f, &u, 4);
  return f;
}

}  // namespace

GPTOSS_PY_BIND(moe_prefill) {
  using namespace gptoss_py;
  // Full op and single steps: device pointers as ints (python/gptoss_kernels/ops/_moe_prefill.py).
  auto full = [](uintptr_t x, uintptr_t ids, uintptr_t w, uintptr_t w1b, uintptr_t w1s, uintptr_t w1bias,
                 uintptr_t w2b, uintptr_t w2s, uintptr_t w2bias, float alpha, float limit, uintptr_t out, int64_t T,
                 int64_t H, int64_t I, int64_t E, int64_t k, uintptr_t ws, size_t ws_bytes, int variant,
                 uintptr_t s) {
    check(gptoss_moe_prefill_mxfp4(ptr<const void>(x), ptr<const int32_t>(ids), ptr<const float>(w),
                                   ptr<const uint8_t>(w1b), ptr<const uint8_t>(w1s), ptr<const void>(w1bias),
                                   ptr<const uint8_t>(w2b), ptr<const uint8_t>(w2s), ptr<const void>(w2bias), alpha,
                                   limit, ptr<void>(out), T, H, I, E, k, ptr<void>(ws), ws_bytes, variant, stream(s)));
  };
  m.def("moe_prefill_mxfp4", full, py::arg("x"), py::arg("topk_ids"), py::arg("topk_weights"), py::arg("w1_blocks"),
        py::arg("w1_scales"), py::arg("w1_bias"), py::arg("w2_blocks"), py::arg("w2_scales"), py::arg("w2_bias"),
        py::arg("swiglu_alpha"), py::arg("swiglu_limit"), py::arg("out"), py::arg("T"), py::arg("H"), py::arg("I"),
        py::arg("E"), py::arg("k"), py::arg("workspace"), py::arg("workspace_bytes"), py::arg("variant"),
        py::arg("stream"));
  m.def(
      "moe_prefill_step",
      [](int step, uintptr_t x, uintptr_t ids, uintptr_t w, uintptr_t w1b, uintptr_t w1s, uintptr_t w1bias,
         uintptr_t w2b, uintptr_t w2s, uintptr_t w2bias, float alpha, float limit, uintptr_t out, int64_t T, int64_t H,
         int64_t I, int64_t E, int64_t k, uintptr_t ws, size_t ws_bytes, int variant, uintptr_t s) {
        check(gptoss_moe_prefill_step(step, ptr<const void>(x), ptr<const int32_t>(ids), ptr<const float>(w),
                                      ptr<const uint8_t>(w1b), ptr<const uint8_t>(w1s), ptr<const void>(w1bias),
                                      ptr<const uint8_t>(w2b), ptr<const uint8_t>(w2s), ptr<const void>(w2bias),
                                      alpha, limit, ptr<void>(out), T, H, I, E, k, ptr<void>(ws), ws_bytes, variant,
                                      stream(s)));
      },
      py::arg("step"), py::arg("x"), py::arg("topk_ids"), py::arg("topk_weights"), py::arg("w1_blocks"),
      py::arg("w1_scales"), py::arg("w1_bias"), py::arg("w2_blocks"), py::arg("w2_scales"), py::arg("w2_bias"),
      py::arg("swiglu_alpha"), py::arg("swiglu_limit"), py::arg("out"), py::arg("T"), py::arg("H"), py::arg("I"),
      py::arg("E"), py::arg("k"), py::arg("workspace"), py::arg("workspace_bytes"), py::arg("variant"),
      py::arg("stream"));
  // (total bytes, [byte offset of each part]) - parts in GPTOSS_MOE_WS_* order.
  m.def(
      "moe_prefill_workspace_layout",
      [](int64_t T, int64_t k, int64_t E, int64_t H, int64_t I) {
        std::vector<size_t> off(GPTOSS_MOE_WS_NUM_PARTS);
        const size_t total = gptoss_moe_prefill_workspace_layout(T, k, E, H, I, off.data());
        return py::make_tuple(total, off);
      },
      py::arg("T"), py::arg("k"), py::arg("E"), py::arg("H"), py::arg("I"));

  py::module_ host = m.attr("host").cast<py::module_>();

  // The grouping algorithm of route_{count,scan,scatter}_kernel run sequentially on the host with
  // the same chunking and the shared scan helper: topk_ids int32 [T, k] ->
  // (counts [E], offsets [E+1], perm [T*k], tile_offsets [E+1]).
  host.def(
      "moe_prefill_route",
      [](py::array_t<int32_t, py::array::c_style> ids, int E, int bm, int chunk) {
        if (ids.ndim() != 2) throw py::value_error("topk_ids must be [T, k]");
        if (E < 1 || bm < 1 || chunk < 1) throw py::value_error("E, bm, chunk must be positive");
        const int rows = static_cast<int>(ids.shape(0) * ids.shape(1));
        const int32_t* id = ids.data();
        for (int r = 0; r < rows; ++r)
          if (id[r] < 0 || id[r] >= E) throw py::value_error("topk_ids out of range");
        const int nc = (rows + chunk - 1) / chunk;
        std::vector<int32_t> base(static_cast<size_t>(nc) * E, 0);
        for (int r = 0; r < rows; ++r) ++base[static_cast<size_t>(r / chunk) * E + id[r]];  // pass 1
        py::array_t<int32_t> counts(E), offsets(E + 1), tile_off(E + 1), perm(rows);
        int32_t *cnt = counts.mutable_data(), *off = offsets.mutable_data(), *toff = tile_off.mutable_data();
        int32_t run = 0, trun = 0;
        for (int e = 0; e < E; ++e) {  // pass 2
          cnt[e] = gptoss::grouped::scan_chunks_for_expert(base.data(), nc, E, e);
          off[e] = run;
          toff[e] = trun;
          for (int c = 0; c < nc; ++c) base[static_cast<size_t>(c) * E + e] += run;
          run += cnt[e];
          trun += gptoss::grouped::mtiles(cnt[e], bm);
        }
        off[E] = run;
        toff[E] = trun;
        int32_t* pm = perm.mutable_data();
        for (int c = 0; c < nc; ++c) {  // pass 3: rank inside the chunk, in row order
          std::vector<int32_t> rank(E, 0);
          for (int r = c * chunk; r < rows && r < (c + 1) * chunk; ++r)
            pm[base[static_cast<size_t>(c) * E + id[r]] + rank[id[r]]++] = r;
        }
        return py::make_tuple(counts, offsets, perm, tile_off);
      },
      py::arg("topk_ids"), py::arg("num_experts"), py::arg("bm") = 128, py::arg("chunk") = 1024);

  // Work list of one grouped GEMM: tile_offsets int32 [E+1] -> int32 [tile_offsets[E]*n_tiles, 3]
  // rows (expert, m-tile, n-tile) in launch order (gptoss::grouped::decode_tile).
  host.def(
      "moe_prefill_decode_tiles",
      [](py::array_t<int32_t, py::array::c_style> tile_off, int n_tiles) {
        if (tile_off.ndim() != 1 || tile_off.shape(0) < 2) throw py::value_error("tile_offsets must be [E+1]");
        const int E = static_cast<int>(tile_off.shape(0)) - 1;
        const int total = tile_off.data()[E] * n_tiles;
        py::array_t<int32_t> out({total, 3});
        auto o = out.mutable_unchecked<2>();
        for (int w = 0; w < total; ++w) {
          const gptoss::grouped::Tile t = gptoss::grouped::decode_tile(tile_off.data(), E, n_tiles, w);
          o(w, 0) = t.expert;
          o(w, 1) = t.mtile;
          o(w, 2) = t.ntile;
        }
        return out;
      },
      py::arg("tile_offsets"), py::arg("n_tiles"));

  // The GEMM main loop's MXFP4 -> bf16 conversion (byte-permutation lookup, then one bf16 product
  // by the scale): blocks uint8 [R, G, 16], scales uint8 [R, G] -> float32 [R, 32G].
  host.def("moe_prefill_dequant", [](py::array_t<uint8_t, py::array::c_style> blocks,
                                     py::array_t<uint8_t, py::array::c_style> scales) {
    if (blocks.ndim() != 3 || blocks.shape(2) != 16) throw py::value_error("blocks must be [R, G, 16]");
    if (scales.ndim() != 2 || scales.shape(0) != blocks.shape(0) || scales.shape(1) != blocks.shape(1))
      throw py::value_error("scales must be [R, G] matching blocks");
    const int64_t R = blocks.shape(0), G = blocks.shape(1);
    py::array_t<float> out({R, 32 * G});
    auto o = out.mutable_unchecked<2>();
    for (int64_t r = 0; r < R; ++r)
      for (int64_t g = 0; g < G; ++g) {
        const float sc = bf16_bits_to_float(gptoss::grouped::e8m0_to_bf16_bits(*scales.data(r, g)));
        for (int q = 0; q < 4; ++q) {
          uint32_t w;
          std::memcpy(&w, blocks.data(r, g, 4 * q), 4);  // little-endian, as the device reads it
          uint32_t v[4];
          gptoss::grouped::fp4x8_to_bf16x8(w, v);
          for (int i = 0; i < 4; ++i) {
            o(r, 32 * g + 8 * q + 2 * i) = round_to_bf16(bf16_bits_to_float(v[i]) * sc);
            o(r, 32 * g + 8 * q + 2 * i + 1) = round_to_bf16(bf16_bits_to_float(v[i] >> 16) * sc);
          }
        }
      }
    return out;
  });
}
