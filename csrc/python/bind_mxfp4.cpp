#include "binding.h"
#include "mxfp4.cuh"

GPTOSS_PY_BIND(mxfp4) {
  using namespace gptoss_py;
  m.def(
      "mxfp4_dequantize_bf16",
      [](uintptr_t blocks, uintptr_t scales, uintptr_t out, int64_t rows, int64_t k, uintptr_t s) {
        check(gptoss_mxfp4_dequantize_bf16(ptr<const uint8_t>(blocks), ptr<const uint8_t>(scales),
                                           ptr<void>(out), rows, k, stream(s)));
      },
      py::arg("blocks"), py::arg("scales"), py::arg("out"), py::arg("rows"), py::arg("k"),
      py::arg("stream"));

  py::module_ host = m.attr("host").cast<py::module_>();
  // blocks uint8 [R, G, 16], scales uint8 [R, G] -> float32 [R, 32*G], via gptoss::mxfp4_element.
  host.def("mxfp4_dequantize", [](py::array_t<uint8_t, py::array::c_style> blocks,
                                  py::array_t<uint8_t, py::array::c_style> scales) {
    if (blocks.ndim() != 3 || blocks.shape(2) != 16) throw py::value_error("blocks must be [R, G, 16]");
    if (scales.ndim() != 2 || scales.shape(0) != blocks.shape(0) || scales.shape(1) != blocks.shape(1))
      throw py::value_error("scales must be [R, G] matching blocks");
    const int64_t R = blocks.shape(0), G = blocks.shape(1), K = 32 * G;
    py::array_t<float> out({R, K});
    auto o = out.mutable_unchecked<2>();
    for (int64_t r = 0; r < R; ++r)
      for (int64_t k = 0; k < K; ++k)
        o(r, k) = gptoss::mxfp4_element(blocks.data(r, 0, 0), scales.data(r, 0), k);
    return out;
  });
  host.def("fp4_e2m1_to_float", [](uint32_t code) { return gptoss::fp4_e2m1_to_float(code); });
}

#include "activation.cuh"

GPTOSS_PY_BIND(activation) {
  using namespace gptoss_py;
  py::module_ host = m.attr("host").cast<py::module_>();
  host.def("swiglu_clamped", [](py::array_t<float, py::array::c_style> z, float alpha, float limit) {
    // z float32 [N, 2I] interleaved -> [N, I]
    if (z.ndim() != 2 || z.shape(1) % 2) throw py::value_error("z must be [N, 2I]");
    const int64_t N = z.shape(0), I = z.shape(1) / 2;
    py::array_t<float> out({N, I});
    auto o = out.mutable_unchecked<2>();
    auto zi = z.unchecked<2>();
    for (int64_t n = 0; n < N; ++n)
      for (int64_t j = 0; j < I; ++j) o(n, j) = gptoss::swiglu_clamped(zi(n, 2 * j), zi(n, 2 * j + 1), alpha, limit);
    return out;
  }, py::arg("z"), py::arg("alpha") = 1.702f, py::arg("limit") = 7.0f);
}
