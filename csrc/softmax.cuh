// Online softmax with an attention sink (spec §4.2 step 7), host-testable
// (tests/test_attention_decode.py checks the host build through _C.host).
//
// A partial state over a set of keys is (m, l, o): m = running max of the logits, l = sum of
// exp(s_k - m), o = sum of exp(s_k - m) v_k (unnormalized). Everything here works in the base-2
// domain: logits are pre-multiplied by log2(e) (the kernels fold it into the query scale), so
// exp(s - m) is exp2(s2 - m2). An empty state is (m = -inf, l = 0, o = 0) and merges as the
// identity. The sink S_h is not a key: it joins the denominator only, once, at the end
// (softmax_sink_normalizer), so partial states over disjoint key ranges merge in any order.
#pragma once
#include <cmath>

#include "common.cuh"

namespace gptoss {

constexpr float kLog2e = 1.4426950408889634f;

GPTOSS_HD float softmax_exp2(float x) {
#if defined(__CUDA_ARCH__)
  return exp2f(x);  // MUFU.EX2 path, <= 2 ulp
#else
  return std::exp2(x);
#endif
}

struct SoftmaxState {
  float m;  // running max (log2 domain); -inf when no key was seen
  float l;  // sum of exp2(s - m)
};

GPTOSS_HD SoftmaxState softmax_empty() { return SoftmaxState{-INFINITY, 0.0f}; }

// exp2(m_old - m_new) for m_new >= m_old, with the edge cases defined: an empty state (m_old =
// -inf) scales to 0 unless m_new is -inf too (then 1: nothing to rescale, no NaN from -inf + inf).
GPTOSS_HD float softmax_rescale(float m_old, float m_new) {
  if (m_old == m_new) return 1.0f;
  if (m_old == -INFINITY) return 0.0f;
  return softmax_exp2(m_old - m_new);
}

// Probability weight of one logit against the running max (a masked logit -inf gives 0).
GPTOSS_HD float softmax_prob(float s, float m) {
  return s == -INFINITY ? 0.0f : softmax_exp2(s - m);
}

// Online update with a tile of keys whose max logit is tile_max: raises m, returns the factor
// by which the old l and o must be multiplied (the caller then adds the tile's exp2(s - m)).
GPTOSS_HD float softmax_update_max(SoftmaxState& st, float tile_max) {
  const float m_new = fmaxf(st.m, tile_max);
  const float alpha = softmax_rescale(st.m, m_new);
  st.m = m_new;
  st.l *= alpha;
  return alpha;
}

// x_a * s_a + x_b * s_b with one fixed rounding sequence (x_b * s_b rounded, then a fused
// multiply-add), on the device and the host alike: every kernel that merges partial states (the
// split kernel's warps, the combine kernel, the in-cluster merge) gets the same bits, whatever
// the compiler would contract.
GPTOSS_HD float softmax_scaled_sum(float xa, float sa, float xb, float sb) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(xa, sa, __fmul_rn(xb, sb));
#else
  return std::fma(xa, sa, xb * sb);
#endif
}

// Merge two partial states over disjoint key sets. *scale_a and *scale_b multiply the
// corresponding unnormalized outputs: o = softmax_scaled_sum(o_a, scale_a, o_b, scale_b).
GPTOSS_HD SoftmaxState softmax_merge(SoftmaxState a, SoftmaxState b, float* scale_a, float* scale_b) {
  const float m = fmaxf(a.m, b.m);
  const float sa = softmax_rescale(a.m, m);
  const float sb = softmax_rescale(b.m, m);
  *scale_a = sa;
  *scale_b = sb;
  return SoftmaxState{m, softmax_scaled_sum(a.l, sa, b.l, sb)};
}

// Final factor of a complete state with the sink logit sink2 (= S_h * log2 e): the output is
// o_unnormalized * factor, i.e. exp2(m - M) / (l exp2(m - M) + exp2(sink2 - M)), M = max(m, sink2).
// With no keys (l = 0) the output is 0 (the sink takes all the probability mass).
GPTOSS_HD float softmax_sink_normalizer(SoftmaxState st, float sink2) {
  const float M = fmaxf(st.m, sink2);
  const float sc = softmax_rescale(st.m, M);
  const float z = st.l * sc + softmax_rescale(sink2, M);
  return z > 0.0f ? sc / z : 0.0f;
}

}  // namespace gptoss
