// Fast MXFP4 -> bf16-pair decode for the MoE decode kernels (csrc/kernels/moe_decode.cu), and
// host-testable: the bit manipulation is plain integer code, and the host build emulates the two
// bf16 multiplies in float (exact: both factors are powers of two and every product is a bf16
// value or an overflow, the rule of gptoss::mxfp4_element). Checked against
// gptoss_kernels.reference.mxfp4_dequantize in tests/test_moe.py through _C.host.mxfp4_decode_fast.
//
// The trick. An E2M1 code is s e1 e0 m. Put the three magnitude bits e1 e0 m at bf16 bits 8..6
// (the two low exponent bits and the top mantissa bit) and the sign at bit 15: the bf16 with those
// bits equals the E2M1 value times 2^-126 for every code (e >= 1: (1 + m/2) 2^(e-127); e == 0: the
// subnormal m 2^-127 = (m/2) 2^-126). Multiplying by 2^126 * 2^(scale-127) = 2^(scale-1) gives the
// dequantized value. 2^(scale-1) can exceed bf16's range (scale > 128), so it is applied as two
// bf16 factors c1 * c2 (c1 = 2^min(scale-1, 127), c2 = 2^(scale-1-that)). Both multiplies are
// exact: the results are E2M1 values times powers of two no smaller than 2^-128 (bf16 subnormals
// reach 2^-133), i.e. the ldexp of spec §3.4, or +-inf exactly where the fp32 reference overflows
// (bf16 has fp32's exponent range and the E2M1 values have two significant bits).
//
// Pairing. Nibbles i and i+4 of a 32-bit word are 16 bits apart, so one shift moves both to
// the same place in the two bf16 halves: pair i (0..3) of word q of a 16-byte block holds elements
// (8q + i) in its low half and (8q + i + 4) in its high half. The kernels pair the activations the
// same way (two PRMTs), so the dot products see matching elements.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "common.cuh"
#if defined(__CUDACC__)
#include "ptx.cuh"  // the device side's PTX wrappers
#endif

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#endif

namespace gptoss {

// bf16x2 bit pattern of the E2M1 codes in nibbles i (low half) and i+4 (high half) of `w`, each
// as value * 2^-126 (see above). i must be 0..3 (a compile-time constant in the kernels).
GPTOSS_HD uint32_t fp4x8_pair_bits(uint32_t w, int i) {
  const int mag_shift = 6 - 4 * i;  // nibble bits 4i..4i+2 -> 6..8 (and 4i+16.. -> 22..24)
  const uint32_t mag = mag_shift >= 0 ? (w << mag_shift) : (w >> (-mag_shift));
  const uint32_t sgn = w << (12 - 4 * i);  // nibble bit 4i+3 -> 15 (and 4i+19 -> 31)
  return (mag & 0x01C001C0u) | (sgn & 0x80008000u);
}

// The two bf16x2 factors whose product is 2^(scale_byte - 1), each a normal power of two
// (same value in both halves).
GPTOSS_HD void mxfp4_pair_scale_factors(uint32_t scale_byte, uint32_t& c1, uint32_t& c2) {
  // bf16 biased exponent field of 2^(s-1) is s + 126; cap the first factor at 2^127 (field 254).
  const uint32_t f1 = scale_byte <= 128u ? scale_byte + 126u : 254u;
  const uint32_t f2 = scale_byte <= 128u ? 127u : scale_byte - 1u;  // 2^0, or 2^(s-128): field s-1
  c1 = (f1 << 7) | (f1 << 23);
  c2 = (f2 << 7) | (f2 << 23);
}

GPTOSS_HD float bf16_bits_to_float(uint32_t bits16) {
  const uint32_t u = bits16 << 16;
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

#if defined(__CUDACC__)
// bf16x2 multiply (mul.rn.bf16x2 on sm_90; subnormal inputs and results are kept).
__device__ __forceinline__ uint32_t bf16x2_mul(uint32_t a, uint32_t b) {
  return gptoss::mul_rn_bf16x2(a, b);
}
#endif

// Decoded, scaled pair i of word w: the device computes it with two bf16x2 multiplies; the host
// returns the same two values as floats (lo = element i, hi = element i+4 of the word).
#if defined(__CUDACC__)
__device__ __forceinline__ uint32_t mxfp4_pair_decode(uint32_t w, int i, uint32_t c1, uint32_t c2) {
  return bf16x2_mul(bf16x2_mul(fp4x8_pair_bits(w, i), c1), c2);
}
#endif

// Host (and device) reference of the fast path: one 16-byte block + scale byte -> 32 floats in
// element order, built from fp4x8_pair_bits and mxfp4_pair_scale_factors exactly as the kernels
// pair them. Float products of powers of two are exact here; the result equals the bf16 the
// device multiplies produce (all values are bf16-representable or overflow to inf in both).
GPTOSS_HD void mxfp4_block_decode_fast(const uint8_t* block16, uint32_t scale_byte, float* out32) {
  uint32_t c1, c2;
  mxfp4_pair_scale_factors(scale_byte, c1, c2);
  const float f1 = bf16_bits_to_float(c1 & 0xFFFFu), f2 = bf16_bits_to_float(c2 & 0xFFFFu);
  for (int q = 0; q < 4; ++q) {
    const uint32_t w = static_cast<uint32_t>(block16[4 * q]) | (static_cast<uint32_t>(block16[4 * q + 1]) << 8) |
                       (static_cast<uint32_t>(block16[4 * q + 2]) << 16) |
                       (static_cast<uint32_t>(block16[4 * q + 3]) << 24);
    for (int i = 0; i < 4; ++i) {
      const uint32_t p = fp4x8_pair_bits(w, i);
      out32[8 * q + i] = bf16_bits_to_float(p & 0xFFFFu) * f1 * f2;
      out32[8 * q + i + 4] = bf16_bits_to_float(p >> 16) * f1 * f2;
    }
  }
}

}  // namespace gptoss
