// Block-level pieces of the fused residual add + RMSNorm, shared by the kernels that end in one
// (csrc/kernels/dense.cu rms_norm_kernel, csrc/kernels/moe_decode.cu's combine + norm), so that
// they produce the same bits: the row in 16-byte chunks of 8 bf16, one fixed-order block sum.
// Device only; the scalar rounding points are in norm.cuh (host-tested).
#pragma once
#include <cuda_bf16.h>

#include <cstdint>

#include "norm.cuh"
#include "ptx.cuh"

namespace gptoss {
namespace dense {

constexpr int kRmsMaxThreads = 1024;

// 8 weights of chunk c as floats.
__device__ __forceinline__ void load_weight8(const __nv_bfloat16* w, int c, float (&f)[8]) {
  gptoss::unpack_bf16x8(__ldg(reinterpret_cast<const uint4*>(w) + c), f);
}
__device__ __forceinline__ void load_weight8(const float* w, int c, float (&f)[8]) {
  const float4 a = __ldg(reinterpret_cast<const float4*>(w) + 2 * c);
  const float4 b = __ldg(reinterpret_cast<const float4*>(w) + 2 * c + 1);
  f[0] = a.x; f[1] = a.y; f[2] = a.z; f[3] = a.w;
  f[4] = b.x; f[5] = b.y; f[6] = b.z; f[7] = b.w;
}

// One chunk of the residual stream: x_raw holds 8 bf16 of x; with kResidual, h = bf16(x + r)
// (r = rr[c], read L2-coherent: an earlier kernel's output; rr may alias ro) is stored to ro[c],
// else h = x. Returns the chunk's sum of squares (fixed order).
template <bool kResidual>
__device__ __forceinline__ float add_residual_chunk(uint4 x_raw, const uint4* rr, uint4* ro, int c, uint4& h) {
  h = x_raw;
  float f[8];
  gptoss::unpack_bf16x8(h, f);
  if constexpr (kResidual) {
    float r[8];
    gptoss::unpack_bf16x8(__ldcg(rr + c), r);
#pragma unroll
    for (int i = 0; i < 8; ++i) f[i] = residual_add(f[i], r[i]);
    h = gptoss::pack_bf16x8(f);  // exact: f already holds bf16 values
    ro[c] = h;
  }
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < 8; ++i) s = fmaf(f[i], f[i], s);
  return s;
}

template <typename WT>
__device__ __forceinline__ uint4 norm_chunk(const uint4& h, const WT* w, int c, float inv) {
  float f[8], wf[8];
  gptoss::unpack_bf16x8(h, f);
  load_weight8(w, c, wf);
#pragma unroll
  for (int i = 0; i < 8; ++i) f[i] = rms_apply(f[i], inv, wf[i]);
  return gptoss::pack_bf16x8(f);
}

// Sum over the block (blockDim.x a multiple of 32), the same value in every thread; fixed order.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float warp_sums[kRmsMaxThreads / 32];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = v;
  __syncthreads();
  float t = 0.f;
  const int nw = blockDim.x >> 5;
  for (int i = 0; i < nw; ++i) t += warp_sums[i];
  return t;
}

}  // namespace dense
}  // namespace gptoss
