#include <algorithm>
#include <cmath>
#include <vector>

#include "binding.h"
#include "flash_prefill.cuh"

GPTOSS_PY_BIND(attention_prefill) {
  using namespace gptoss_py;
  m.def(
      "attention_prefill_bf16",
      [](uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t sinks, uintptr_t cu_seqlens_q, int32_t batch,
         int64_t total_q, int32_t num_q_heads, int32_t num_kv_heads, int32_t head_dim, uintptr_t k_cache,
         uintptr_t v_cache, uintptr_t cache_seqlens, int64_t cache_slots, int32_t sliding_window, float sm_scale,
         uintptr_t out, uintptr_t s, int32_t impl) {
        check(gptoss_attention_prefill_bf16_impl(
            ptr<const void>(q), ptr<const void>(k), ptr<const void>(v), ptr<const void>(sinks),
            ptr<const int32_t>(cu_seqlens_q), batch, total_q, num_q_heads, num_kv_heads, head_dim,
            ptr<const void>(k_cache), ptr<const void>(v_cache), ptr<const int32_t>(cache_seqlens), cache_slots,
            sliding_window, sm_scale, ptr<void>(out), impl, stream(s)));
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("sinks"), py::arg("cu_seqlens_q"), py::arg("batch"),
      py::arg("total_q"), py::arg("num_q_heads"), py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("k_cache"),
      py::arg("v_cache"), py::arg("cache_seqlens"), py::arg("cache_slots"), py::arg("sliding_window"),
      py::arg("sm_scale"), py::arg("out"), py::arg("stream"), py::arg("impl") = 0,
      "impl: 0 auto, 1 mma.sync kernel, 2 wgmma kernel (gptoss/attention_prefill.h)");

  namespace fl = gptoss::flash;
  py::module_ host = m.attr("host").cast<py::module_>();
  // Host builds of csrc/flash_prefill.cuh (window 0 = full causal).
  host.def("attention_prefill_kv_tile_range", [](int q_first, int q_last, int window, int tile_keys) {
    if (q_first < 0 || q_last < q_first || tile_keys <= 0 || window < 0)
      throw py::value_error("need 0 <= q_first <= q_last, window >= 0, tile_keys > 0");
    int first = 0, last = 0;
    fl::kv_tile_range(q_first, q_last, window, tile_keys, &first, &last);
    return py::make_tuple(first, last);
  }, py::arg("q_first"), py::arg("q_last"), py::arg("window"), py::arg("tile_keys"));
  host.def("attention_prefill_tile_needs_mask", [](int tile_start, int tile_keys, int q_first, int q_last, int window) {
    return fl::tile_needs_mask(tile_start, tile_keys, q_first, q_last, window);
  }, py::arg("tile_start"), py::arg("tile_keys"), py::arg("q_first"), py::arg("q_last"), py::arg("window"));
  host.def("attention_prefill_key_visible", [](int key, int q, int window) { return fl::key_visible(key, q, window); },
           py::arg("key"), py::arg("q"), py::arg("window"));
  // cu_seqlens list [B+1] -> (b, t0) of global q-tile `tile`, or None past the last tile.
  host.def("attention_prefill_locate_q_tile", [](std::vector<int32_t> cu, int tile, int tile_q) -> py::object {
    if (cu.empty() || tile_q <= 0 || tile < 0) throw py::value_error("need a non-empty cu_seqlens, tile >= 0, tile_q > 0");
    int b = -1, t0 = -1;
    if (!fl::locate_q_tile(cu.data(), static_cast<int>(cu.size()) - 1, tile, tile_q, &b, &t0)) return py::none();
    return py::make_tuple(b, t0);
  }, py::arg("cu_seqlens"), py::arg("tile"), py::arg("tile_q"));
  // One query row through the kernel's online-softmax steps: logits float32 [n] (already scaled
  // by sm_scale; -inf = masked), values float32 [n, d], sink (natural-log units), processed in
  // tiles of `tile_keys` -> float32 [d] = sum_k p_k v_k with the sink in the denominator.
  host.def("attention_prefill_online_softmax", [](py::array_t<float, py::array::c_style> logits,
                                                   py::array_t<float, py::array::c_style> values, float sink,
                                                   int tile_keys) {
    if (logits.ndim() != 1 || values.ndim() != 2 || values.shape(0) != logits.shape(0) || tile_keys <= 0)
      throw py::value_error("logits [n], values [n, d], tile_keys > 0");
    const int64_t n = logits.shape(0), d = values.shape(1);
    const float log2e = 1.4426950408889634f;
    const float sink2 = sink * log2e;
    auto lg = logits.unchecked<1>();
    auto vv = values.unchecked<2>();
    std::vector<double> o(static_cast<size_t>(d), 0.0);
    float mrun = fl::online_init_max(sink2), l = 0.f;
    for (int64_t t = 0; t < n; t += tile_keys) {
      const int64_t e = std::min<int64_t>(n, t + tile_keys);
      float mx = -INFINITY;
      for (int64_t i = t; i < e; ++i) mx = std::fmax(mx, lg(i) * log2e);
      float factor = 0.f;
      mrun = fl::online_update_max(mrun, mx, &factor);
      float rs = 0.f;
      for (auto& x : o) x *= factor;
      for (int64_t i = t; i < e; ++i) {
        const float pe = fl::fast_exp2(lg(i) * log2e - mrun);
        rs += pe;
        for (int64_t j = 0; j < d; ++j) o[j] += static_cast<double>(pe) * vv(i, j);
      }
      l = l * factor + rs;
    }
    const float z = fl::online_finish(l, mrun, sink2);
    py::array_t<float> out(d);
    auto w = out.mutable_unchecked<1>();
    for (int64_t j = 0; j < d; ++j) w(j) = static_cast<float>(o[j] / z);
    return out;
  }, py::arg("logits"), py::arg("values"), py::arg("sink"), py::arg("tile_keys"));
}
