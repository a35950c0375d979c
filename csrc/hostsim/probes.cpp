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

// Known bugs, one per `which`, each of which a checker must report (0: none). buf holds n floats.
__global__ void probe_checker_kernel(int which, float* buf, int n) {
  __shared__ float sh[64];
  GPTOSS_DYNAMIC_SMEM(float, dyn, 16);
  const int t = threadIdx.x;
  switch (which) {
    case 0:  // clean: write, barrier, read another thread's value
      sh[t % 64] = static_cast<float>(t);
      __syncthreads();
      buf[t % n] = sh[(t + 1) % 64];
      break;
    case 1:  // a shared-memory race: thread 0 writes, thread 32 (another warp) reads, no barrier
      if (t == 0) sh[0] = 1.0f;
      if (t == 32) buf[0] = sh[0];
      break;
    case 2:  // a read of shared memory no thread wrote
      if (t == 0) buf[0] = sh[5];
      break;
    case 3:  // a global write one element past the end
      if (t == 0) buf[n] = 1.0f;
      break;
    case 4:  // __syncthreads not reached by every thread
      if (t >= 16) return;
      __syncthreads();
      buf[t] = 1.0f;
      break;
    case 5:  // a shuffle whose mask names lanes that exited
      if (t % 32 >= 16) return;
      buf[t % n] = __shfl_xor_sync(0xFFFFFFFFu, static_cast<float>(t), 1);
      break;
    case 6: {  // reading a cp.async destination before cp.async.wait_group
      const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(dyn));
      if (t == 0) {
        gptoss::cp_async_cg16(a, buf, 16);
        gptoss::cp_async_commit();
        buf[1] = dyn[0];
        gptoss::cp_async_wait<0>();
      }
      break;
    }
    case 7:  // dynamic shared memory out of bounds (the launch has 64 bytes)
      if (t == 0) dyn[16] = 1.0f;
      break;
    case 8:  // a global read before griddepcontrol.wait of what the previous kernel wrote (PDL launch)
      buf[t % n] += 1.0f;
      gptoss::pdl::wait();
      break;
    case 9:  // the same, correct: the wait first
      gptoss::pdl::wait();
      buf[t % n] += 1.0f;
      break;
  }
}

}  // namespace

namespace gptoss_hostsim {
GPTOSS_HS_API int probe_checker(int which, float* buf, int n) {
  if (which == 8 || which == 9) {  // a plain kernel writes buf, then the PDL kernel follows it
    const int e = gptoss::pdl::launch_plain(probe_checker_kernel, dim3(1), dim3(64), 64, nullptr, 0, buf, n);
    if (e) return e;
    cudaLaunchConfig_t cfg = gptoss::pdl::launch_config(dim3(1), dim3(64), 64, nullptr);
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    return cudaLaunchKernelEx(&cfg, probe_checker_kernel, which, buf, n);
  }
  if (which == 10)  // the clean kernel launched as clusters of 2 (the arch checker: no clusters below sm_90)
    return gptoss::pdl::launch_clusters(probe_checker_kernel, dim3(2), dim3(64), 64, nullptr, 2, false, 0, buf, n);
  return gptoss::pdl::launch_plain(probe_checker_kernel, dim3(1), dim3(64), 64, nullptr, which, buf, n);
}
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
