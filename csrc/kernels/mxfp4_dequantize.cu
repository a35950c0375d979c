// MXFP4 -> bf16 dequantization (gptoss/mxfp4.h). Used for tests, tools and the bf16 fallback;
// the MoE kernels never materialize dequantized weights.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "common.cuh"
#include "gptoss/mxfp4.h"
#include "mxfp4.cuh"
#include "pdl.cuh"

namespace {

// One thread per 16-byte block: 32 elements, four 16-byte stores.
// blocks [n_blocks][16] -> out [n_blocks][32] bf16 (rows are contiguous runs of blocks).
__global__ void mxfp4_dequantize_bf16_kernel(const uint4* __restrict__ blocks,
                                             const uint8_t* __restrict__ scales,
                                             uint4* __restrict__ out, int64_t n_blocks) {
  for (int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; b < n_blocks;
       b += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint4 packed = blocks[b];
    const uint32_t words[4] = {packed.x, packed.y, packed.z, packed.w};
    const uint32_t scale = scales[b];
#pragma unroll
    for (int q = 0; q < 4; ++q) {  // each 32-bit word = 8 elements = one 16-byte output chunk
      __nv_bfloat162 v[4];
#pragma unroll
      for (int p = 0; p < 4; ++p) {
        const uint32_t byte = (words[q] >> (8 * p)) & 0xFFu;
        const float lo = gptoss::mxfp4_scale_apply(gptoss::fp4_e2m1_to_float(byte & 0xFu), scale);
        const float hi = gptoss::mxfp4_scale_apply(gptoss::fp4_e2m1_to_float(byte >> 4), scale);
        v[p] = __floats2bfloat162_rn(lo, hi);  // exact: every finite MXFP4 value fits bf16
      }
      out[4 * b + q] = *reinterpret_cast<const uint4*>(v);
    }
  }
}

}  // namespace

GPTOSS_API gptoss_status gptoss_mxfp4_dequantize_bf16(const uint8_t* blocks, const uint8_t* scales,
                                                      void* out, int64_t rows, int64_t k,
                                                      cudaStream_t stream) {
  GPTOSS_REQUIRE(rows >= 0, "mxfp4_dequantize: rows must be >= 0");
  GPTOSS_REQUIRE(k > 0 && k % 32 == 0, "mxfp4_dequantize: k must be a positive multiple of 32");
  if (rows == 0) return GPTOSS_OK;
  GPTOSS_REQUIRE(blocks && scales && out, "mxfp4_dequantize: null pointer");
  GPTOSS_REQUIRE(gptoss::aligned(blocks, 16) && gptoss::aligned(out, 16),
                 "mxfp4_dequantize: blocks and out must be 16-byte aligned");
  const int64_t n_blocks = rows * (k / 32);
  const int threads = 256;
  const int64_t want = (n_blocks + threads - 1) / threads;
  const int grid = static_cast<int>(want < 65535 * 8 ? want : 65535 * 8);
  return gptoss::cuda_status(gptoss::pdl::launch_plain(mxfp4_dequantize_bf16_kernel, dim3(grid), dim3(threads), 0, stream, 
      reinterpret_cast<const uint4*>(blocks), scales, reinterpret_cast<uint4*>(out), n_blocks), "mxfp4_dequantize_bf16 launch");
}
