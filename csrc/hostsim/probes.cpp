// Probe kernels of the host-simulation build: one emulated PTX operation each, with per-lane
// registers in and out through global memory, so that tests/test_hostsim_ptx.py can check the
// emulator against the PTX ISA's fragment tables independently of the kernels. They call the same
// wrappers as the kernels (csrc/ptx.cuh, csrc/gemm_wgmma.cuh). Compiled only in this build.
#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"
#include "gemm_wgmma.cuh"
#include "hostsim_api.h"
#include "pdl.cuh"
#include "ptx.cuh"

namespace {

// d[lane][4] = mma.sync m16n8k16(a[lane][4], b[lane][2], c[lane][4])
__global__ void probe_mma_kernel(const uint32_t* a, const uint32_t* b, const float* c, float* d) {
  const int l = threadIdx.x;
  float acc[4] = {c[4 * l], c[4 * l + 1], c[4 * l + 2], c[4 * l + 3]};
  gptoss::mma_bf16_16816(acc, a[4 * l], a[4 * l + 1], a[4 * l + 2], a[4 * l + 3], b[2 * l], b[2 * l + 1]);
  for (int i = 0; i < 4; ++i) d[4 * l + i] = acc[i];
}

// Shared memory = image (bytes); out[lane][4] = ldmatrix.x4(.trans) at addr[lane].
__global__ void probe_ldmatrix_kernel(const uint8_t* image, int bytes, const uint32_t* addr, int trans, uint32_t* out) {
  GPTOSS_DYNAMIC_SMEM(uint8_t, smem, 1024);
  for (int i = threadIdx.x; i < bytes; i += blockDim.x) smem[i] = image[i];
  __syncthreads();
  const uint32_t base = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  uint32_t r[4];
  if (trans) gptoss::ldmatrix_x4_trans_b16(r, base + addr[threadIdx.x]);
  else gptoss::ldmatrix_x4_b16(r, base + addr[threadIdx.x]);
  for (int i = 0; i < 4; ++i) out[4 * threadIdx.x + i] = r[i];
}

// One warpgroup: shared memory = image; d[thread][n/2] = A * B through the descriptors (their
// start addresses are offsets into the image: the probe adds the buffer's shared address);
// A from a_regs[thread][4] when a_regs is given. n = 64 (SS, or RS with B transposed), 128, 192, 256 (SS).
template <int N>
__device__ void probe_wgmma_n(const uint32_t* a_regs, uint64_t desc_a, uint64_t desc_b, int tnsp_b, float* d) {
  float acc[N / 2];
  for (int i = 0; i < N / 2; ++i) acc[i] = 0.0f;
  gptoss::wgmma::fence();
  if constexpr (N == 64) {
    float (&a8)[8][4] = *reinterpret_cast<float (*)[8][4]>(acc);
    if (a_regs != nullptr && tnsp_b) {
      const uint32_t a[4] = {a_regs[4 * threadIdx.x], a_regs[4 * threadIdx.x + 1], a_regs[4 * threadIdx.x + 2],
                             a_regs[4 * threadIdx.x + 3]};
      gptoss::wgmma::mma_m64n64k16_rs_tnspb(a8, a, desc_b);
    } else {
      gptoss::wgmma::mma_m64n64k16_ss(a8, desc_a, desc_b);
    }
  } else {
    gptoss::wgmma::mma_m64k16(acc, desc_a, desc_b);
  }
  gptoss::wgmma::commit();
  gptoss::wgmma::wait<0>();
  for (int i = 0; i < N / 2; ++i) d[threadIdx.x * (N / 2) + i] = acc[i];
}

__global__ void probe_wgmma_kernel(const uint8_t* image, int bytes, uint64_t desc_a, uint64_t desc_b, int n,
                                   int tnsp_b, const uint32_t* a_regs, float* d) {
  GPTOSS_DYNAMIC_SMEM(uint8_t, smem, 1024);
  for (int i = threadIdx.x; i < bytes; i += blockDim.x) smem[i] = image[i];
  gptoss::fence_proxy_async_shared_cta();
  __syncthreads();
  const uint64_t base = static_cast<uint64_t>(__cvta_generic_to_shared(smem)) >> 4;
  desc_a += base;
  desc_b += base;
  if (n == 64) probe_wgmma_n<64>(a_regs, desc_a, desc_b, tnsp_b, d);
  else if (n == 128) probe_wgmma_n<128>(a_regs, desc_a, desc_b, tnsp_b, d);
  else if (n == 192) probe_wgmma_n<192>(a_regs, desc_a, desc_b, tnsp_b, d);
  else probe_wgmma_n<256>(a_regs, desc_a, desc_b, tnsp_b, d);
}

}  // namespace

namespace gptoss_hostsim {
GPTOSS_HS_API int probe_mma(const uint32_t* a, const uint32_t* b, const float* c, float* d) {
  return gptoss::pdl::launch_plain(probe_mma_kernel, dim3(1), dim3(32), 0, nullptr, a, b, c, d);
}
GPTOSS_HS_API int probe_ldmatrix(const uint8_t* image, int bytes, const uint32_t* addr, int trans, uint32_t* out) {
  return gptoss::pdl::launch_plain(probe_ldmatrix_kernel, dim3(1), dim3(32), static_cast<size_t>(bytes), nullptr, image,
                                   bytes, addr, trans, out);
}
GPTOSS_HS_API int probe_wgmma(const uint8_t* image, int bytes, uint64_t desc_a, uint64_t desc_b, int n, int tnsp_b,
                              const uint32_t* a_regs, float* d) {
  if (bytes > 48 * 1024)
    cudaFuncSetAttribute(probe_wgmma_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  return gptoss::pdl::launch_plain(probe_wgmma_kernel, dim3(1), dim3(128), static_cast<size_t>(bytes), nullptr,
                                   image, bytes, desc_a, desc_b, n, tnsp_b, a_regs, d);
}
}  // namespace gptoss_hostsim
