// Clamped SwiGLU of gpt-oss experts (spec §4.3 step 5), host-testable (tests/test_host_math.py).
#pragma once
#include <cmath>

#include "common.cuh"

namespace gptoss {

// gate = min(gate, limit); lin = clamp(lin, -limit, limit); gate * sigmoid(alpha * gate) * (lin + 1).
// gate is row 2j of mlp1's output, lin row 2j+1 (interleaved in the checkpoint).
GPTOSS_HD float swiglu_clamped(float gate, float lin, float alpha, float limit) {
  // comparisons, not fminf/fmaxf: a NaN stays NaN as in the reference's clamp (never hidden)
  gate = gate > limit ? limit : gate;
  lin = lin > limit ? limit : (lin < -limit ? -limit : lin);
#if defined(__CUDA_ARCH__)
  const float sig = 1.0f / (1.0f + __expf(-alpha * gate));
#else
  const float sig = 1.0f / (1.0f + expf(-alpha * gate));
#endif
  return gate * sig * (lin + 1.0f);
}

}  // namespace gptoss
