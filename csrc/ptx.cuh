// Small PTX and bf16 helpers shared by the kernels (device only). Each is one instruction or a
// fixed bit manipulation; the kernels' own headers say how they use them.
#pragma once
#include <cuda_bf16.h>

#include <cstdint>

#include "arch.cuh"

namespace gptoss {

// Every inline-PTX instruction of the kernels is one of these named wrappers, so that the
// host-simulation build (csrc/hostsim, GPTOSS_HOSTSIM) can give each a host definition while the
// kernels' bodies stay the same source in both builds.

// Dynamic shared memory of the launch: `extern __shared__ __align__(A) T name[]` on the GPU.
#if defined(GPTOSS_HOSTSIM)
#define GPTOSS_DYNAMIC_SMEM(T, name, A) T* const name = static_cast<T*>(::gptoss_hostsim::dynamic_smem())
#else
#define GPTOSS_DYNAMIC_SMEM(T, name, A) extern __shared__ __align__(A) T name[]
#endif

// cp.async.cg.shared.global of 16 bytes; src_bytes < 16 zero-fills the rest (0: src unread).
__device__ __forceinline__ void cp_async_cg16(uint32_t smem_dst, const void* src, int src_bytes) {
#if defined(GPTOSS_HOSTSIM)
  ::gptoss_hostsim::cp_async(smem_dst, src, 16, src_bytes);
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_dst), "l"(src), "r"(src_bytes)
               : "memory");
#endif
}

// cp.async groups. The "memory" clobbers keep the compiler from moving shared-memory accesses
// across a commit or a wait.
__device__ __forceinline__ void cp_async_commit() {
#if defined(GPTOSS_HOSTSIM)
  ::gptoss_hostsim::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(GPTOSS_HOSTSIM)
  ::gptoss_hostsim::cp_async_wait(N);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// ldmatrix.sync.aligned.m8n8.x4(.trans).shared.b16: lanes 8i..8i+7 give the row addresses of
// matrix i; r[i] receives matrix i's fragment.
__device__ __forceinline__ void ldmatrix_x4_b16(uint32_t (&r)[4], uint32_t smem_addr) {
#if defined(GPTOSS_HOSTSIM)
  ::gptoss_hostsim::ldmatrix(smem_addr, 4, false, r);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr)
               : "memory");
#endif
}
__device__ __forceinline__ void ldmatrix_x4_trans_b16(uint32_t (&r)[4], uint32_t smem_addr) {
#if defined(GPTOSS_HOSTSIM)
  ::gptoss_hostsim::ldmatrix(smem_addr, 4, true, r);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr)
               : "memory");
#endif
}

// d += A(16x16, row-major fragment a0..a3) * B(16x8, col-major fragment b0, b1); bf16 in, fp32 accumulate.
__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                               uint32_t b0, uint32_t b1) {
#if defined(GPTOSS_HOSTSIM)
  const uint32_t a[4] = {a0, a1, a2, a3}, b[2] = {b0, b1};
  ::gptoss_hostsim::mma_m16n8k16_bf16(d, a, b);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
}
__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  mma_bf16_16816(d, a[0], a[1], a[2], a[3], b0, b1);
}

// The same mma without `volatile`: the compiler may reorder or merge it like arithmetic.
__device__ __forceinline__ void mma_bf16_16816_reorderable(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                                           uint32_t a3, uint32_t b0, uint32_t b1) {
#if defined(GPTOSS_HOSTSIM)
  mma_bf16_16816(d, a0, a1, a2, a3, b0, b1);
#else
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
}

// ld.global.nc.L1::no_allocate.v4.u32: 16 bytes of data that no kernel writes while this one runs.
__device__ __forceinline__ uint4 ld_global_nc_na_v4(const void* p) {
#if defined(GPTOSS_HOSTSIM)
  return *static_cast<const uint4*>(p);
#else
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
#endif
}

// mul.rn.bf16x2: two bf16 products, each rounded to nearest even (subnormals kept). Below sm_90
// (no mul.bf16x2) fma.rn.bf16x2 with a -0.0 addend: the same bits (a*b + -0 is a*b, +0 and -0
// products included; one rounding), as cuda_bf16.h's __hmul2 does there.
__device__ __forceinline__ uint32_t mul_rn_bf16x2(uint32_t a, uint32_t b) {
#if defined(GPTOSS_HOSTSIM)
  return ::gptoss_hostsim::bf16x2_mul_rn(a, b);
#elif GPTOSS_SM90_CODE
  uint32_t d;
  asm("mul.rn.bf16x2 %0, %1, %2;\n" : "=r"(d) : "r"(a), "r"(b));
  return d;
#else
  uint32_t d;
  asm("fma.rn.bf16x2 %0, %1, %2, %3;\n" : "=r"(d) : "r"(a), "r"(b), "r"(0x80008000u));
  return d;
#endif
}

// ex2.approx.ftz.f32: 2^x, subnormal inputs and results flushed to zero.
__device__ __forceinline__ float ex2_approx_ftz(float x) {
#if defined(GPTOSS_HOSTSIM)
  return ::gptoss_hostsim::ex2_approx_ftz(x);
#else
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#endif
}

// fence.proxy.async.shared::cta: this thread's generic-proxy shared-memory writes become visible
// to later async-proxy reads (wgmma operands). sm_90 only: used by the wgmma kernels alone.
__device__ __forceinline__ void fence_proxy_async_shared_cta() {
#if defined(GPTOSS_HOSTSIM)
  ::gptoss_hostsim::fence_proxy_async();
#elif GPTOSS_SM90_CODE
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#else
  GPTOSS_UNAVAILABLE_KERNEL_BODY();
#endif
}

// 8 bf16 in one 16-byte chunk <-> 8 floats (unpack exact; pack rounds to nearest even).
__device__ __forceinline__ void unpack_bf16x8(const uint4& raw, float (&f)[8]) {
  const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = __uint_as_float(w[i] << 16);
    f[2 * i + 1] = __uint_as_float(w[i] & 0xFFFF0000u);
  }
}
__device__ __forceinline__ uint4 pack_bf16x8(const float (&f)[8]) {
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
    w[i] = *reinterpret_cast<const uint32_t*>(&h);
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

}  // namespace gptoss
