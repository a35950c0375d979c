// RoPE with YaRN (spec §1.3), host-testable (tests/test_rope.py checks the host build against
// reference.yarn_inv_freq / reference.rope_cos_sin and a float64 computation through _C.host).
//
// Precision plan:
//  - inverse frequencies: the spec's fp32 recipe (f_j = theta^(2j/d) in fp32, unrounded ramp
//    bounds), yarn_inv_freq below. The kernels do not compute them: the launcher receives the
//    table (d/2 floats, host memory) and passes it by value in the kernel parameters, so the
//    caller decides; the Python op passes reference.yarn_inv_freq's table, the C ABI offers
//    gptoss_yarn_inv_freq (this function) for C users.
//  - angle phi = t * inv_freq_j rounded once to fp32, exactly as the spec (step 6) and the
//    reference do; the kernels therefore see the same fp32 angle as the oracle.
//  - cos/sin of that fp32 angle: angles reach 131072 rad, so the argument is reduced modulo pi/2
//    in double precision (Cody-Waite with a two-double pi/2 and fma: |error| < 1e-15 rad for
//    |phi| < 2^30) and the reduced |r| <= pi/4 goes to the SFU's __sincosf (abs error < 5e-7 on
//    [-pi, pi]). This avoids sincosf's slow path for |x| > 105615 (Payne-Hanek, which uses a
//    local-memory array) while staying far below bf16 resolution (2^-9).
#pragma once
#include <cmath>
#include <cstdint>

#include "common.cuh"

namespace gptoss {

struct YarnParams {
  int head_dim;          // 64
  float theta;           // 150000
  float factor;          // 32
  float beta_fast;       // 32
  float beta_slow;       // 1
  int original_context;  // 4096
};

GPTOSS_HD YarnParams yarn_default_params() { return YarnParams{64, 150000.0f, 32.0f, 32.0f, 1.0f, 4096}; }

// YaRN attention temperature c = 0.1 ln(factor) + 1 (1 for factor <= 1), multiplied into cos and sin.
GPTOSS_HD float yarn_concentration(float factor) {
  return factor > 1.0f ? static_cast<float>(0.1 * log(static_cast<double>(factor)) + 1.0) : 1.0f;
}

// Inverse frequency of rotation pair j (0 <= j < head_dim/2), spec §1.3 steps 1-4, in fp32 like
// the reference (the ramp bounds are computed in double and rounded to fp32 once, as torch does
// with a Python-float scalar).
GPTOSS_HD float yarn_inv_freq(int j, const YarnParams& p) {
  const float expo = static_cast<float>(2 * j) / static_cast<float>(p.head_dim);
  const float freq = powf(p.theta, expo);
  if (!(p.factor > 1.0f)) return 1.0f / freq;
  const double two_pi = 6.283185307179586;
  const double ln_theta = log(static_cast<double>(p.theta));
  // the correction range clamped to [0, head_dim - 1], as transformers' YaRN and the reference
  // (no effect for gpt-oss's parameters: 8.09 and 17.40)
  const double low = fmax((p.head_dim / 2.0) * log(p.original_context / (p.beta_fast * two_pi)) / ln_theta, 0.0);
  const double high =
      fmin((p.head_dim / 2.0) * log(p.original_context / (p.beta_slow * two_pi)) / ln_theta, p.head_dim - 1.0);
  float ramp = (static_cast<float>(j) - static_cast<float>(low)) / static_cast<float>(high - low);
  ramp = fminf(fmaxf(ramp, 0.0f), 1.0f);
  const float extrapolation = 1.0f - ramp;
  return extrapolation / freq + (1.0f - extrapolation) / (p.factor * freq);
}

// (c cos(phi), c sin(phi)) with phi = pos * inv_freq rounded to fp32 (see the precision plan).
GPTOSS_HD void rope_cos_sin(int32_t pos, float inv_freq, float concentration, float* cos_out, float* sin_out) {
  const float phi = static_cast<float>(pos) * inv_freq;
  const double x = static_cast<double>(phi);
  const double kPio2Hi = 1.5707963267948966;      // nearest double to pi/2
  const double kPio2Lo = 6.123233995736766e-17;   // pi/2 - kPio2Hi
  const double k = rint(x * 0.6366197723675814);  // 2/pi
  double r = fma(-k, kPio2Hi, x);                  // exact product inside the fma; |r| <= ~pi/4
  r = fma(-k, kPio2Lo, r);
  const float rf = static_cast<float>(r);
  float sr, cr;
#if defined(__CUDA_ARCH__)
  __sincosf(rf, &sr, &cr);
#else
  sr = sinf(rf);
  cr = cosf(rf);
#endif
  const int quadrant = static_cast<int>(static_cast<long long>(k) & 3);  // two's complement: -1 -> 3
  float c, s;
  switch (quadrant) {
    case 0: c = cr; s = sr; break;
    case 1: c = -sr; s = cr; break;
    case 2: c = -cr; s = -sr; break;
    default: c = sr; s = -cr; break;
  }
  *cos_out = concentration * c;
  *sin_out = concentration * s;
}

// Non-negative slot of position pos in a ring cache of S slots (gptoss/rope.h: slot = pos mod S).
GPTOSS_HD int64_t cache_slot(int32_t pos, int64_t S) {
  const int64_t s = static_cast<int64_t>(pos) % S;
  return s < 0 ? s + S : s;
}

// Half-split (NeoX) rotation of one pair (x1 = u[j], x2 = u[j + d/2]) with the scaled cos/sin.
// Each product rounded, then the sum (no FMA contraction on the device: every kernel that rotates
// gets the same bits, and the PyTorch reference's fp32 arithmetic too).
GPTOSS_HD void rope_rotate_pair(float x1, float x2, float c, float s, float* y1, float* y2) {
#if defined(__CUDA_ARCH__)
  *y1 = __fsub_rn(__fmul_rn(x1, c), __fmul_rn(x2, s));
  *y2 = __fadd_rn(__fmul_rn(x2, c), __fmul_rn(x1, s));
#else
  *y1 = x1 * c - x2 * s;
  *y2 = x2 * c + x1 * s;
#endif
}

}  // namespace gptoss
