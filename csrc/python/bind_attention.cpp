// Bindings of the decode attention, RoPE and KV-cache writers (gptoss/attention.h, gptoss/rope.h),
// and host builds of their math (softmax.cuh, rope.cuh) under _C.host for the CPU tests.
#include <algorithm>
#include <cmath>
#include <vector>

#include "binding.h"
#include "rope.cuh"
#include "softmax.cuh"

namespace {
namespace py = pybind11;
using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;

const float* inv_freq_ptr(const std::vector<float>& inv, int head_dim) {
  if (static_cast<int>(inv.size()) != head_dim / 2)
    throw py::value_error("inv_freq must hold head_dim/2 = " + std::to_string(head_dim / 2) + " floats, got " +
                          std::to_string(inv.size()));
  return inv.data();
}

// Partial (m, l, o) of logits s [n] (natural log domain, like the kernel's sm_scale * q.k) over
// values v [n, dv], through the same online update the kernel runs, in tiles of `tile` keys.
py::tuple host_softmax_partial(FloatArray logits, FloatArray values, int tile) {
  if (logits.ndim() != 1 || values.ndim() != 2 || values.shape(0) != logits.shape(0))
    throw py::value_error("logits must be [n] and values [n, dv]");
  if (tile < 1) throw py::value_error("tile must be >= 1");
  const int64_t n = logits.shape(0), dv = values.shape(1);
  auto s = logits.unchecked<1>();
  auto v = values.unchecked<2>();
  gptoss::SoftmaxState st = gptoss::softmax_empty();
  std::vector<float> o(dv, 0.0f);
  for (int64_t t0 = 0; t0 < n; t0 += tile) {
    const int64_t t1 = std::min<int64_t>(n, t0 + tile);
    float tmax = -INFINITY;
    for (int64_t k = t0; k < t1; ++k) tmax = std::fmax(tmax, s(k) * gptoss::kLog2e);
    const float alpha = gptoss::softmax_update_max(st, tmax);
    for (auto& x : o) x *= alpha;
    for (int64_t k = t0; k < t1; ++k) {
      const float p = gptoss::softmax_prob(s(k) * gptoss::kLog2e, st.m);
      st.l += p;
      for (int64_t j = 0; j < dv; ++j) o[j] += p * v(k, j);
    }
  }
  py::array_t<float> oa(dv);
  std::copy(o.begin(), o.end(), oa.mutable_data());
  return py::make_tuple(st.m, st.l, oa);
}

// Merge two partials: (m, l, o) x 2 -> (m, l, o).
py::tuple host_softmax_merge(float ma, float la, FloatArray oa, float mb, float lb, FloatArray ob) {
  if (oa.ndim() != 1 || ob.ndim() != 1 || oa.shape(0) != ob.shape(0)) throw py::value_error("o must be [dv] twice");
  float sa, sb;
  const gptoss::SoftmaxState st = gptoss::softmax_merge({ma, la}, {mb, lb}, &sa, &sb);
  py::array_t<float> o(oa.shape(0));
  for (int64_t j = 0; j < oa.shape(0); ++j) o.mutable_data()[j] = oa.data()[j] * sa + ob.data()[j] * sb;
  return py::make_tuple(st.m, st.l, o);
}

// Final output of a complete state with the sink logit (natural domain, as stored in the checkpoint).
py::array_t<float> host_softmax_finalize(float m, float l, FloatArray o, float sink) {
  if (o.ndim() != 1) throw py::value_error("o must be [dv]");
  const float f = gptoss::softmax_sink_normalizer({m, l}, sink * gptoss::kLog2e);
  py::array_t<float> out(o.shape(0));
  for (int64_t j = 0; j < o.shape(0); ++j) out.mutable_data()[j] = o.data()[j] * f;
  return out;
}

}  // namespace

GPTOSS_PY_BIND(attention) {
  using namespace gptoss_py;
  m.def("attention_decode_num_splits", &gptoss_attention_decode_num_splits, py::arg("batch"),
        py::arg("cache_size"), py::arg("num_q_heads"), py::arg("num_kv_heads"), py::arg("head_dim"),
        py::arg("sliding_window"));
  m.def("attention_decode_splits_used", &gptoss_attention_decode_splits_used, py::arg("batch"),
        py::arg("cache_size"), py::arg("num_q_heads"), py::arg("num_kv_heads"), py::arg("head_dim"),
        py::arg("sliding_window"), py::arg("seqlen"));
  m.def("attention_decode_workspace_size", &gptoss_attention_decode_workspace_size, py::arg("batch"),
        py::arg("cache_size"), py::arg("num_q_heads"), py::arg("num_kv_heads"), py::arg("head_dim"),
        py::arg("sliding_window"));
  m.def(
      "attention_decode_bf16",
      [](uintptr_t q, uintptr_t k_cache, uintptr_t v_cache, uintptr_t seqlens, uintptr_t sinks, uintptr_t out,
         uintptr_t workspace, size_t workspace_bytes, int64_t batch, int64_t cache_size, int nq, int nkv, int d,
         int window, float sm_scale, uintptr_t s, int variant) {
        check(gptoss_attention_decode_bf16_variant(
            ptr<const void>(q), ptr<const void>(k_cache), ptr<const void>(v_cache), ptr<const int32_t>(seqlens),
            ptr<const void>(sinks), ptr<void>(out), ptr<void>(workspace), workspace_bytes, batch, cache_size, nq, nkv,
            d, window, sm_scale, variant, stream(s)));
      },
      py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("cache_seqlens"), py::arg("sinks"),
      py::arg("out"), py::arg("workspace"), py::arg("workspace_bytes"), py::arg("batch"), py::arg("cache_size"),
      py::arg("num_q_heads"), py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("sliding_window"),
      py::arg("sm_scale"), py::arg("stream"), py::arg("variant") = 0);
  m.def(
      "rope_qkv_bf16",
      [](uintptr_t qkv, uintptr_t positions, uintptr_t q_out, uintptr_t k_out, uintptr_t v_out, int64_t T, int nq,
         int nkv, int d, const std::vector<float>& inv_freq, float concentration, uintptr_t s) {
        check(gptoss_rope_qkv_bf16(ptr<const void>(qkv), ptr<const int32_t>(positions), ptr<void>(q_out),
                                   ptr<void>(k_out), ptr<void>(v_out), T, nq, nkv, d, inv_freq_ptr(inv_freq, d),
                                   concentration, stream(s)));
      },
      py::arg("qkv"), py::arg("positions"), py::arg("q_out"), py::arg("k_out"), py::arg("v_out"), py::arg("T"),
      py::arg("num_q_heads"), py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("inv_freq"),
      py::arg("concentration"), py::arg("stream"));
  m.def(
      "rope_cache_append_bf16",
      [](uintptr_t qkv, uintptr_t seq_ids, uintptr_t positions, uintptr_t q_out, uintptr_t k_cache,
         uintptr_t v_cache, int64_t T, int nq, int nkv, int d, int64_t batch, int64_t cache_size,
         const std::vector<float>& inv_freq, float concentration, uintptr_t s) {
        check(gptoss_rope_cache_append_bf16(ptr<const void>(qkv), ptr<const int32_t>(seq_ids),
                                            ptr<const int32_t>(positions), ptr<void>(q_out), ptr<void>(k_cache),
                                            ptr<void>(v_cache), T, nq, nkv, d, batch, cache_size,
                                            inv_freq_ptr(inv_freq, d), concentration, stream(s)));
      },
      py::arg("qkv"), py::arg("seq_ids"), py::arg("positions"), py::arg("q_out"), py::arg("k_cache"),
      py::arg("v_cache"), py::arg("T"), py::arg("num_q_heads"), py::arg("num_kv_heads"), py::arg("head_dim"),
      py::arg("batch"), py::arg("cache_size"), py::arg("inv_freq"), py::arg("concentration"), py::arg("stream"));
  m.def(
      "cache_append_bf16",
      [](uintptr_t k, uintptr_t v, uintptr_t seq_ids, uintptr_t positions, uintptr_t k_cache, uintptr_t v_cache,
         int64_t T, int nkv, int d, int64_t batch, int64_t cache_size, uintptr_t s) {
        check(gptoss_cache_append_bf16(ptr<const void>(k), ptr<const void>(v), ptr<const int32_t>(seq_ids),
                                       ptr<const int32_t>(positions), ptr<void>(k_cache), ptr<void>(v_cache), T, nkv,
                                       d, batch, cache_size, stream(s)));
      },
      py::arg("k"), py::arg("v"), py::arg("seq_ids"), py::arg("positions"), py::arg("k_cache"), py::arg("v_cache"),
      py::arg("T"), py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("batch"), py::arg("cache_size"),
      py::arg("stream"));
  m.def(
      "yarn_inv_freq",
      [](int head_dim, float theta, float factor, float beta_fast, float beta_slow, int original_context) {
        std::vector<float> inv(head_dim > 0 ? head_dim / 2 : 0);
        float conc = 0.0f;
        check(gptoss_yarn_inv_freq(head_dim, theta, factor, beta_fast, beta_slow, original_context, inv.data(),
                                   &conc));
        return py::make_tuple(inv, conc);
      },
      "(inv_freq list[head_dim/2], concentration) through the C ABI (host only)", py::arg("head_dim") = 64,
      py::arg("theta") = 150000.0f, py::arg("factor") = 32.0f, py::arg("beta_fast") = 32.0f,
      py::arg("beta_slow") = 1.0f, py::arg("original_context") = 4096);

  py::module_ host = m.attr("host").cast<py::module_>();
  host.def(
      "yarn_inv_freq",
      [](int head_dim, float theta, float factor, float beta_fast, float beta_slow, int original_context) {
        const gptoss::YarnParams p{head_dim, theta, factor, beta_fast, beta_slow, original_context};
        py::array_t<float> out(head_dim / 2);
        for (int j = 0; j < head_dim / 2; ++j) out.mutable_data()[j] = gptoss::yarn_inv_freq(j, p);
        return out;
      },
      "rope.cuh yarn_inv_freq for j = 0..head_dim/2-1", py::arg("head_dim") = 64, py::arg("theta") = 150000.0f,
      py::arg("factor") = 32.0f, py::arg("beta_fast") = 32.0f, py::arg("beta_slow") = 1.0f,
      py::arg("original_context") = 4096);
  host.def("yarn_concentration", &gptoss::yarn_concentration, py::arg("factor") = 32.0f);
  host.def(
      "rope_cos_sin",
      [](py::array_t<int32_t, py::array::c_style | py::array::forcecast> positions, FloatArray inv_freq,
         float concentration) {
        // positions int32 [T], inv_freq float32 [P] -> (cos, sin) float32 [T, P] (scaled by concentration)
        if (positions.ndim() != 1 || inv_freq.ndim() != 1) throw py::value_error("positions [T], inv_freq [P]");
        const int64_t T = positions.shape(0), P = inv_freq.shape(0);
        py::array_t<float> c({T, P}), s({T, P});
        for (int64_t t = 0; t < T; ++t)
          for (int64_t j = 0; j < P; ++j)
            gptoss::rope_cos_sin(positions.data()[t], inv_freq.data()[j], concentration,
                                 c.mutable_data() + t * P + j, s.mutable_data() + t * P + j);
        return py::make_tuple(c, s);
      },
      py::arg("positions"), py::arg("inv_freq"), py::arg("concentration"));
  host.def("softmax_partial", &host_softmax_partial, py::arg("logits"), py::arg("values"), py::arg("tile") = 16,
           "online-softmax partial (m, l, o) of natural-domain logits [n] over values [n, dv] (m in log2 units)");
  host.def("softmax_merge", &host_softmax_merge, py::arg("m_a"), py::arg("l_a"), py::arg("o_a"), py::arg("m_b"),
           py::arg("l_b"), py::arg("o_b"));
  host.def("softmax_finalize", &host_softmax_finalize, py::arg("m"), py::arg("l"), py::arg("o"), py::arg("sink"));
}
