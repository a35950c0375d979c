#include "binding.h"
#include "gptoss/moe.h"
#include "mxfp4_decode_fast.cuh"

GPTOSS_PY_BIND(moe_decode) {
  using namespace gptoss_py;
  m.def("moe_mxfp4_decode_workspace_size", &gptoss_moe_mxfp4_decode_workspace_size, py::arg("T"), py::arg("k"),
        py::arg("H"), py::arg("I"));
  m.def(
      "moe_mxfp4_decode",
      [](uintptr_t x, uintptr_t topk_ids, uintptr_t topk_weights, uintptr_t w1_blocks, uintptr_t w1_scales,
         uintptr_t w1_bias, uintptr_t w2_blocks, uintptr_t w2_scales, uintptr_t w2_bias, float swiglu_alpha,
         float swiglu_limit, uintptr_t out, int64_t T, int64_t H, int64_t I, int64_t E, int64_t k,
         uintptr_t workspace, size_t workspace_bytes, uintptr_t s) {
        check(gptoss_moe_mxfp4_decode(
            ptr<const void>(x), ptr<const int32_t>(topk_ids), ptr<const float>(topk_weights),
            ptr<const uint8_t>(w1_blocks), ptr<const uint8_t>(w1_scales), ptr<const void>(w1_bias),
            ptr<const uint8_t>(w2_blocks), ptr<const uint8_t>(w2_scales), ptr<const void>(w2_bias), swiglu_alpha,
            swiglu_limit, ptr<void>(out), T, H, I, E, k, ptr<void>(workspace), workspace_bytes, stream(s)));
      },
      py::arg("x"), py::arg("topk_ids"), py::arg("topk_weights"), py::arg("w1_blocks"), py::arg("w1_scales"),
      py::arg("w1_bias"), py::arg("w2_blocks"), py::arg("w2_scales"), py::arg("w2_bias"), py::arg("swiglu_alpha"),
      py::arg("swiglu_limit"), py::arg("out"), py::arg("T"), py::arg("H"), py::arg("I"), py::arg("E"), py::arg("k"),
      py::arg("workspace"), py::arg("workspace_bytes"), py::arg("stream"));
  m.def(
      "moe_mxfp4_decode_add_rms_norm",
      [](uintptr_t x, uintptr_t topk_ids, uintptr_t topk_weights, uintptr_t w1_blocks, uintptr_t w1_scales,
         uintptr_t w1_bias, uintptr_t w2_blocks, uintptr_t w2_scales, uintptr_t w2_bias, float swiglu_alpha,
         float swiglu_limit, uintptr_t residual, uintptr_t residual_out, uintptr_t norm_weight, bool norm_weight_fp32,
         float eps, uintptr_t norm_out, int64_t T, int64_t H, int64_t I, int64_t E, int64_t k, uintptr_t workspace,
         size_t workspace_bytes, uintptr_t s) {
        check(gptoss_moe_mxfp4_decode_add_rms_norm(
            ptr<const void>(x), ptr<const int32_t>(topk_ids), ptr<const float>(topk_weights),
            ptr<const uint8_t>(w1_blocks), ptr<const uint8_t>(w1_scales), ptr<const void>(w1_bias),
            ptr<const uint8_t>(w2_blocks), ptr<const uint8_t>(w2_scales), ptr<const void>(w2_bias), swiglu_alpha,
            swiglu_limit, ptr<const void>(residual), ptr<void>(residual_out), ptr<const void>(norm_weight),
            norm_weight_fp32 ? 1 : 0, eps, ptr<void>(norm_out), T, H, I, E, k, ptr<void>(workspace), workspace_bytes,
            stream(s)));
      },
      py::arg("x"), py::arg("topk_ids"), py::arg("topk_weights"), py::arg("w1_blocks"), py::arg("w1_scales"),
      py::arg("w1_bias"), py::arg("w2_blocks"), py::arg("w2_scales"), py::arg("w2_bias"), py::arg("swiglu_alpha"),
      py::arg("swiglu_limit"), py::arg("residual"), py::arg("residual_out"), py::arg("norm_weight"),
      py::arg("norm_weight_fp32"), py::arg("eps"), py::arg("norm_out"), py::arg("T"), py::arg("H"), py::arg("I"),
      py::arg("E"), py::arg("k"), py::arg("workspace"), py::arg("workspace_bytes"), py::arg("stream"));
  m.attr("MOE_DECODE_MAX_ROUTED_ROWS") = GPTOSS_MOE_DECODE_MAX_ROUTED_ROWS;
  m.attr("MOE_DECODE_MAX_EXPERTS") = GPTOSS_MOE_DECODE_MAX_EXPERTS;

  py::module_ host = m.attr("host").cast<py::module_>();
  // blocks uint8 [R, G, 16], scales uint8 [R, G] -> float32 [R, 32*G] through the decode kernels'
  // fast path (gptoss::mxfp4_block_decode_fast: pair bits + two power-of-two factors).
  host.def("mxfp4_decode_fast", [](py::array_t<uint8_t, py::array::c_style> blocks,
                                   py::array_t<uint8_t, py::array::c_style> scales) {
    if (blocks.ndim() != 3 || blocks.shape(2) != 16) throw py::value_error("blocks must be [R, G, 16]");
    if (scales.ndim() != 2 || scales.shape(0) != blocks.shape(0) || scales.shape(1) != blocks.shape(1))
      throw py::value_error("scales must be [R, G] matching blocks");
    const int64_t R = blocks.shape(0), G = blocks.shape(1);
    py::array_t<float> out({R, 32 * G});
    float* o = out.mutable_data();
    for (int64_t r = 0; r < R; ++r)
      for (int64_t g = 0; g < G; ++g)
        gptoss::mxfp4_block_decode_fast(blocks.data(r, g, 0), *scales.data(r, g), o + (r * G + g) * 32);
    return out;
  });
  // The bf16x2 bit pattern of pair i (elements i and i+4) of a word of 8 E2M1 codes, value * 2^-126.
  host.def("fp4x8_pair_bits", [](uint32_t w, int i) {
    if (i < 0 || i > 3) throw py::value_error("i must be 0..3");
    return gptoss::fp4x8_pair_bits(w, i);
  });
}
