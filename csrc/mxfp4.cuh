// MXFP4 decode math shared by every kernel that reads expert weights, and host-testable:
// these functions compile for the device (nvcc) and for the host (g++/nvcc host pass), and
// tests/test_host_math.py checks the host build against the PyTorch reference (spec §3).
#pragma once
#include <cmath>
#include <cstdint>

#include "common.cuh"

namespace gptoss {

// E2M1 code (0..15) -> value, spec §3.1: +0 .5 1 1.5 2 3 4 6, then the negatives.
GPTOSS_HD float fp4_e2m1_to_float(uint32_t code) {
  const uint32_t mag = code & 7u;
  const uint32_t e = mag >> 1, m = mag & 1u;
  // e == 0: subnormal 0 or 0.5; else (1 + m/2) * 2^(e-1)
  const float v = (e == 0) ? 0.5f * static_cast<float>(m)
                           : (1.0f + 0.5f * static_cast<float>(m)) * static_cast<float>(1u << (e - 1));
  return (code & 8u) ? -v : v;
}

// Element `k_in_block` (0..31) of one 16-byte MXFP4 block: low nibble = even element.
GPTOSS_HD uint32_t fp4_code_at(const uint8_t* block16, int k_in_block) {
  const uint32_t byte = block16[k_in_block >> 1];
  return (k_in_block & 1) ? (byte >> 4) : (byte & 0xFu);
}

// E8M0 scale applied as ldexp (the reference dequantizers' rule: byte 255 is not special-cased).
GPTOSS_HD float mxfp4_scale_apply(float v, uint32_t scale_byte) {
  return ldexpf(v, static_cast<int>(scale_byte) - 127);
}

// Decode element k of a row, given the row's blocks [K/32][16] and scales [K/32].
GPTOSS_HD float mxfp4_element(const uint8_t* row_blocks, const uint8_t* row_scales, int64_t k) {
  const int64_t g = k >> 5;
  return mxfp4_scale_apply(fp4_e2m1_to_float(fp4_code_at(row_blocks + 16 * g, static_cast<int>(k & 31))),
                           row_scales[g]);
}

}  // namespace gptoss
