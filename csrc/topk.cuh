// Router top-k selection and the k-softmax (spec §4.3 steps 3-4), host-testable: these functions
// compile for the device (nvcc) and for the host (g++), and tests/test_router.py checks the host
// build (through _C.host.router_select) against reference.router_topk.
//
// Order (the fixed router contract, = reference.router_topk):
//   key(v) = v, except NaN -> -inf ("NaN ranks below every number"; a NaN and a -inf tie);
//   a is before b  <=>  key(a) > key(b), or key(a) == key(b) and index(a) < index(b).
// This is a strict total order on (value, index) pairs with distinct indices, so any way of
// splitting the experts over threads and merging their lists gives the same top-k.
//
// A top-k list is K (compile-time) registers of values + K of indices, sorted by that order;
// every loop over it is unrolled so no register array is indexed at run time (no local memory).
// Empty slots hold (NaN, TOPK_EMPTY): any real expert, even a NaN one, is before an empty slot,
// so with k <= E the first k slots always name valid experts.
#pragma once
#include <cmath>
#include <cstdint>

#include "common.cuh"

namespace gptoss {

constexpr int TOPK_EMPTY = 0x7fffffff;

GPTOSS_HD float topk_key(float v) { return (v != v) ? -INFINITY : v; }

// (va, ia) before (vb, ib) in the router order.
GPTOSS_HD bool topk_before(float va, int ia, float vb, int ib) {
  const float ka = topk_key(va), kb = topk_key(vb);
  return ka > kb || (ka == kb && ia < ib);
}

template <int K>
GPTOSS_HD void topk_init(float (&val)[K], int (&idx)[K]) {
#pragma unroll
  for (int j = 0; j < K; ++j) {
    val[j] = NAN;
    idx[j] = TOPK_EMPTY;
  }
}

// Insert candidate (v, i) into the sorted list (dropped if not before the last slot).
template <int K>
GPTOSS_HD void topk_insert(float (&val)[K], int (&idx)[K], float v, int i) {
  if (!topk_before(v, i, val[K - 1], idx[K - 1])) return;
  val[K - 1] = v;
  idx[K - 1] = i;
#pragma unroll
  for (int j = K - 1; j > 0; --j) {  // one bubble pass: the new entry moves up to its place
    if (topk_before(val[j], idx[j], val[j - 1], idx[j - 1])) {
      const float tv = val[j];
      val[j] = val[j - 1];
      val[j - 1] = tv;
      const int ti = idx[j];
      idx[j] = idx[j - 1];
      idx[j - 1] = ti;
    }
  }
}

// Remove the head of the list (after it won a merge round); the tail becomes empty.
template <int K>
GPTOSS_HD void topk_pop(float (&val)[K], int (&idx)[K]) {
#pragma unroll
  for (int j = 0; j + 1 < K; ++j) {
    val[j] = val[j + 1];
    idx[j] = idx[j + 1];
  }
  val[K - 1] = NAN;
  idx[K - 1] = TOPK_EMPTY;
}

// Of two candidates, the one that comes first (the combine step of a merge / warp reduction).
GPTOSS_HD void topk_pick(float& v, int& i, float ov, int oi) {
  if (topk_before(ov, oi, v, i)) {
    v = ov;
    i = oi;
  }
}

// Weights = softmax over the first k (<= K) selected values, fp32, with torch.softmax's
// non-finite behaviour (what reference.router_topk returns):
//   any selected NaN  -> all k weights NaN;   a selected +inf -> all NaN (inf - inf);
//   all selected -inf -> all NaN;             some (not all) -inf -> those get 0.
// Slots j >= k of w are left unspecified (set to 0).
template <int K>
GPTOSS_HD void topk_softmax(const float (&val)[K], int k, float (&w)[K]) {
  float m = val[0];
#pragma unroll
  for (int j = 1; j < K; ++j)
    if (j < k) m = fmaxf(m, val[j]);  // fmaxf drops NaN, but a NaN value then makes exp NaN
  float s = 0.0f;
#pragma unroll
  for (int j = 0; j < K; ++j) {
    w[j] = (j < k) ? expf(val[j] - m) : 0.0f;
    s += w[j];
  }
#pragma unroll
  for (int j = 0; j < K; ++j) w[j] = (j < k) ? w[j] / s : 0.0f;
}

#if defined(__CUDACC__)
// Warp-wide merge: every lane holds a sorted list of its own candidates; afterwards every lane
// holds (in out_val/out_idx) the warp's first K in order. K rounds of a butterfly arg-best over
// the lanes' heads; the winning lane pops its head. Call with all 32 lanes active.
template <int K>
__device__ __forceinline__ void topk_warp_merge(float (&val)[K], int (&idx)[K], float (&out_val)[K],
                                                int (&out_idx)[K]) {
#pragma unroll
  for (int r = 0; r < K; ++r) {
    float bv = val[0];
    int bi = idx[0];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, bv, off);
      const int oi = __shfl_xor_sync(0xffffffffu, bi, off);
      topk_pick(bv, bi, ov, oi);
    }
    out_val[r] = bv;
    out_idx[r] = bi;
    // indices are distinct (or TOPK_EMPTY once every list is empty, which k <= E excludes for
    // the slots that are written out), so exactly one lane owns the winner
    if (idx[0] == bi && bi != TOPK_EMPTY) topk_pop(val, idx);
  }
}
#endif

}  // namespace gptoss
