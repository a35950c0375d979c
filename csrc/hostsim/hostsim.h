// gptoss hostsim: the kernels' own CUDA source, compiled by the host C++ compiler and run on the
// CPU (csrc/hostsim/README.md). This header gives CUDA's built-ins host definitions: qualifiers,
// vector and bf16 types, thread indices, intrinsics, warp collectives, atomics, the launch API,
// and the emulated PTX that csrc/ptx.cuh, csrc/pdl.cuh and the wgmma wrappers call in this build.
// Device code is not forked: a kernel file compiles unchanged with GPTOSS_HOSTSIM defined.
//
// Execution model (runtime.cpp): a launch runs every block; a block's threads are fibers on one
// OS thread, switching only at barriers and collectives (__syncthreads, warp and warpgroup
// collectives, cluster.sync), in an order that changes between launches (forward, reverse,
// seeded random). The blocks of a thread-block cluster run interleaved, each with its own shared
// memory. Every load and store of the kernel code is seen by the checkers (the kernel files are
// compiled with -fsanitize=thread instrumentation, whose callbacks runtime.cpp implements).
#pragma once
#ifndef GPTOSS_HOSTSIM
#error "hostsim.h is only for the host-simulation build (GPTOSS_HOSTSIM)"
#endif

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#include "include/cuda_runtime_api.h"

// ---- qualifiers ----------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __cluster_dims__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __constant__ const
// Static shared memory: a plain static (one copy per variable); the runtime knows it as the device
// code's accesses to the library's writable segment, gives each block its own shadow of it, and
// swaps the bytes between the blocks of a cluster.
#define __shared__ static
// Dynamic shared memory (extern __shared__ on the GPU): see GPTOSS_DYNAMIC_SMEM in csrc/ptx.cuh.

// ---- vector types --------------------------------------------------------------------------
struct uint3 { unsigned x, y, z; };
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};
#define GPTOSS_HS_VEC2(T, N, A) \
  struct __attribute__((aligned(A))) N { T x, y; }; \
  inline N make_##N(T x, T y) { return N{x, y}; }
#define GPTOSS_HS_VEC4(T, N, A) \
  struct __attribute__((aligned(A))) N { T x, y, z, w; }; \
  inline N make_##N(T x, T y, T z, T w) { return N{x, y, z, w}; }
GPTOSS_HS_VEC2(float, float2, 8)
GPTOSS_HS_VEC4(float, float4, 16)
GPTOSS_HS_VEC2(int, int2, 8)
GPTOSS_HS_VEC4(int, int4, 16)
GPTOSS_HS_VEC2(unsigned, uint2, 8)
GPTOSS_HS_VEC4(unsigned, uint4, 16)
GPTOSS_HS_VEC2(unsigned short, ushort2, 4)
GPTOSS_HS_VEC2(long long, longlong2, 16)
#undef GPTOSS_HS_VEC2
#undef GPTOSS_HS_VEC4
struct float3 { float x, y, z; };
inline float3 make_float3(float x, float y, float z) { return float3{x, y, z}; }
inline uint3 make_uint3(unsigned x, unsigned y, unsigned z) { return uint3{x, y, z}; }

// ---- bf16 ----------------------------------------------------------------------------------
namespace gptoss_hostsim {
inline uint32_t f32_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float bits_f32(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
// float -> bf16, round to nearest even; NaN stays NaN (quiet)
inline unsigned short f32_to_bf16_rn(float f) {
  uint32_t u = f32_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<unsigned short>((u >> 16) | 0x40u);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<unsigned short>(u >> 16);
}
inline float bf16_to_f32(unsigned short h) { return bits_f32(static_cast<uint32_t>(h) << 16); }
}  // namespace gptoss_hostsim

struct __nv_bfloat16_raw { unsigned short x; };
struct __attribute__((aligned(2))) __nv_bfloat16 {
  unsigned short __x;
  __nv_bfloat16() = default;
  __nv_bfloat16(const __nv_bfloat16_raw& r) : __x(r.x) {}
  __nv_bfloat16(float f) : __x(gptoss_hostsim::f32_to_bf16_rn(f)) {}
  __nv_bfloat16(double f) : __x(gptoss_hostsim::f32_to_bf16_rn(static_cast<float>(f))) {}
  operator float() const { return gptoss_hostsim::bf16_to_f32(__x); }
  operator __nv_bfloat16_raw() const { return __nv_bfloat16_raw{__x}; }
};
struct __attribute__((aligned(4))) __nv_bfloat162 {
  __nv_bfloat16 x, y;
};
typedef __nv_bfloat16 nv_bfloat16;
typedef __nv_bfloat162 nv_bfloat162;
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline float __bfloat162float(__nv_bfloat16 h) { return gptoss_hostsim::bf16_to_f32(h.__x); }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return __nv_bfloat162{__nv_bfloat16(a), __nv_bfloat16(b)}; }
inline __nv_bfloat162 __float22bfloat162_rn(float2 v) { return __floats2bfloat162_rn(v.x, v.y); }
inline float2 __bfloat1622float2(__nv_bfloat162 v) { return float2{__bfloat162float(v.x), __bfloat162float(v.y)}; }
inline float __low2float(__nv_bfloat162 v) { return __bfloat162float(v.x); }
inline float __high2float(__nv_bfloat162 v) { return __bfloat162float(v.y); }
inline __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 a, __nv_bfloat16 b) { return __nv_bfloat162{a, b}; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { __nv_bfloat16 h; h.__x = u; return h; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }

// ---- float / int intrinsics ----------------------------------------------------------------
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
inline float __uint_as_float(unsigned u) { return gptoss_hostsim::bits_f32(u); }
inline unsigned __float_as_uint(float f) { return gptoss_hostsim::f32_bits(f); }
// The build uses -ffp-contract=off: a * b + c is two roundings, as the _rn intrinsics promise.
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fdividef(float a, float b) { return a / b; }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __exp2f(float x) { return std::exp2(x); }
inline float exp2f(float x) { return std::exp2(x); }
inline void __sincosf(float x, float* s, float* c) { *s = std::sin(x); *c = std::cos(x); }
inline void sincosf(float x, float* s, float* c) { *s = std::sin(x); *c = std::cos(x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}
// byte i of the result = byte (selector nibble i & 7) of the 8 bytes {y:x}
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  const uint64_t v = (static_cast<uint64_t>(y) << 32) | x;
  unsigned r = 0;
  for (int i = 0; i < 4; ++i) r |= static_cast<unsigned>((v >> (8 * ((s >> (4 * i)) & 7u))) & 0xFFu) << (8 * i);
  return r;
}
inline int max(int a, int b) { return a > b ? a : b; }
inline int min(int a, int b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline unsigned long max(unsigned long a, unsigned long b) { return a > b ? a : b; }
inline unsigned long min(unsigned long a, unsigned long b) { return a < b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline float max(float a, float b) { return std::fmax(a, b); }
inline float min(float a, float b) { return std::fmin(a, b); }

// Cache-hinted loads are plain loads here (the checkers see them as reads).
template <typename T> inline T __ldg(const T* p) { return *p; }
template <typename T> inline T __ldcg(const T* p) { return *p; }
template <typename T> inline T __ldca(const T* p) { return *p; }
template <typename T> inline T __ldcs(const T* p) { return *p; }
template <typename T> inline T __ldlu(const T* p) { return *p; }
template <typename T> inline void __stcg(T* p, T v) { *p = v; }
template <typename T> inline void __stcs(T* p, T v) { *p = v; }
template <typename T> inline void __stwt(T* p, T v) { *p = v; }

// ---- the runtime (runtime.cpp) -------------------------------------------------------------
namespace gptoss_hostsim {
enum ShflMode { kShflIdx = 0, kShflUp = 1, kShflDown = 2, kShflXor = 3 };
enum AtomicOp { kAtomicAdd, kAtomicSub, kAtomicOr, kAtomicAnd, kAtomicXor, kAtomicMax, kAtomicMin, kAtomicExch, kAtomicCas };
enum AtomicType { kAtomicI32, kAtomicU32, kAtomicF32, kAtomicU64 };


void syncthreads();
void syncwarp(unsigned mask);
unsigned activemask();
void threadfence();
uint32_t shfl32(unsigned mask, uint32_t v, int mode, int arg, int width);
unsigned ballot(unsigned mask, int pred);
unsigned match_any(unsigned mask, uint64_t v);
uint64_t atomic_rmw(void* p, int type, int op, uint64_t v, uint64_t cmp);

unsigned cluster_block_rank();
unsigned cluster_num_blocks();
void cluster_sync();
void* map_shared_rank(const void* p, unsigned rank);

size_t cvta_generic_to_shared(const void* p);
void* dynamic_smem();

// emulated PTX (the wrappers in csrc/ptx.cuh, csrc/pdl.cuh, csrc/gemm_wgmma.cuh and the
// attention prefill kernel call these in this build)
void cp_async(uint32_t smem_addr, const void* gsrc, int cp_size, int src_size);
void cp_async_commit();
void cp_async_wait(int n);
void ldmatrix(uint32_t smem_addr, int count, bool trans, uint32_t* out);
void mma_m16n8k16_bf16(float* d, const uint32_t* a, const uint32_t* b);
void wgmma_fence();
void wgmma_commit();
void wgmma_wait(int n);
// d[n/2] (+)= A(64x16) * B(16xn): A from desc_a, or from a_regs (mma.sync A fragment per warp)
// when a_regs != nullptr; B from desc_b (tnsp_b: B stored N-major). scale_d 0: d is not read.
void wgmma_mma(float* d, int n, uint64_t desc_a, const uint32_t* a_regs, uint64_t desc_b, int scale_d,
               int tnsp_a, int tnsp_b);
void fence_proxy_async();
void griddep_wait();
void griddep_launch_dependents();
void prefetch_l2(const void* p, uint32_t bytes);

inline uint32_t bf16x2_mul_rn(uint32_t a, uint32_t b) {
  const float lo = bf16_to_f32(static_cast<unsigned short>(a)) * bf16_to_f32(static_cast<unsigned short>(b));
  const float hi = bf16_to_f32(static_cast<unsigned short>(a >> 16)) * bf16_to_f32(static_cast<unsigned short>(b >> 16));
  return static_cast<uint32_t>(f32_to_bf16_rn(lo)) | (static_cast<uint32_t>(f32_to_bf16_rn(hi)) << 16);
}
// ex2.approx.ftz.f32: 2^x with subnormal inputs and results flushed to zero
inline float ex2_approx_ftz(float x) {
  if (std::fpclassify(x) == FP_SUBNORMAL) x = 0.0f;
  const float y = std::exp2(x);
  return std::fpclassify(y) == FP_SUBNORMAL ? 0.0f : y;
}

// ---- launches ----
struct LaunchSpec {
  dim3 grid, block;
  size_t smem = 0;
  unsigned cluster = 1;  // blocks per cluster along x
  bool pdl = false;      // launched with programmatic stream serialization
};
using KernelThunk = void (*)(void*);
cudaError_t launch(const LaunchSpec& spec, const void* kernel, KernelThunk thunk, void* call, size_t call_bytes);
cudaError_t func_set_attribute(const void* kernel, int attr, int value);
cudaError_t func_get_attributes(cudaFuncAttributes* attr, const void* kernel);
cudaError_t occupancy(int* blocks, const void* kernel, int threads, size_t smem);

template <typename... P>
struct KernelCall {
  void (*fn)(P...);
  std::tuple<std::decay_t<P>...> args;
  template <size_t... I>
  __attribute__((no_sanitize_thread)) static void run_impl(KernelCall* c, std::index_sequence<I...>) {
    c->fn(std::get<I>(c->args)...);
  }
  __attribute__((no_sanitize_thread)) static void run(void* self) {
    run_impl(static_cast<KernelCall*>(self), std::index_sequence_for<P...>{});
  }
};
template <typename T>
inline T shfl(unsigned mask, T v, int mode, int arg, int width) {
  static_assert(sizeof(T) <= 8, "shuffle of a type wider than 8 bytes");
  if constexpr (sizeof(T) <= 4) {
    uint32_t u = 0;
    std::memcpy(&u, &v, sizeof(T));
    u = shfl32(mask, u, mode, arg, width);
    T r;
    std::memcpy(&r, &u, sizeof(T));
    return r;
  } else {
    uint64_t u;
    std::memcpy(&u, &v, 8);
    const uint64_t lo = shfl32(mask, static_cast<uint32_t>(u), mode, arg, width);
    const uint64_t hi = shfl32(mask, static_cast<uint32_t>(u >> 32), mode, arg, width);
    u = lo | (hi << 32);
    T r;
    std::memcpy(&r, &u, 8);
    return r;
  }
}
template <typename T>
constexpr int atomic_type() {
  if constexpr (std::is_same_v<T, float>) return kAtomicF32;
  else if constexpr (sizeof(T) == 8) return kAtomicU64;
  else if constexpr (std::is_signed_v<T>) return kAtomicI32;
  else return kAtomicU32;
}
template <typename T>
inline T atomic(T* p, int op, T v, T cmp = T()) {
  uint64_t bv = 0, bc = 0;
  std::memcpy(&bv, &v, sizeof(T));
  std::memcpy(&bc, &cmp, sizeof(T));
  const uint64_t old = atomic_rmw(p, atomic_type<T>(), op, bv, bc);
  T r;
  std::memcpy(&r, &old, sizeof(T));
  return r;
}
}  // namespace gptoss_hostsim

// The running thread's indices: the runtime sets them whenever it resumes a thread.
extern uint3 threadIdx, blockIdx;
extern dim3 blockDim, gridDim;
constexpr int warpSize = 32;

inline void __syncthreads() { gptoss_hostsim::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xFFFFFFFFu) { gptoss_hostsim::syncwarp(mask); }
inline unsigned __activemask() { return gptoss_hostsim::activemask(); }
inline void __threadfence() { gptoss_hostsim::threadfence(); }
inline void __threadfence_block() { gptoss_hostsim::threadfence(); }
template <typename T> inline T __shfl_sync(unsigned m, T v, int src, int w = 32) { return gptoss_hostsim::shfl(m, v, gptoss_hostsim::kShflIdx, src, w); }
template <typename T> inline T __shfl_up_sync(unsigned m, T v, unsigned d, int w = 32) { return gptoss_hostsim::shfl(m, v, gptoss_hostsim::kShflUp, static_cast<int>(d), w); }
template <typename T> inline T __shfl_down_sync(unsigned m, T v, unsigned d, int w = 32) { return gptoss_hostsim::shfl(m, v, gptoss_hostsim::kShflDown, static_cast<int>(d), w); }
template <typename T> inline T __shfl_xor_sync(unsigned m, T v, int lm, int w = 32) { return gptoss_hostsim::shfl(m, v, gptoss_hostsim::kShflXor, lm, w); }
inline unsigned __ballot_sync(unsigned m, int pred) { return gptoss_hostsim::ballot(m, pred); }
inline int __any_sync(unsigned m, int pred) { return gptoss_hostsim::ballot(m, pred) != 0; }
inline int __all_sync(unsigned m, int pred) { return gptoss_hostsim::ballot(m, pred) == gptoss_hostsim::ballot(m, 1); }
template <typename T> inline unsigned __match_any_sync(unsigned m, T v) {
  uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(T) <= 8 ? sizeof(T) : 8);
  return gptoss_hostsim::match_any(m, u);
}
template <typename T> inline T atomicAdd(T* p, T v) { return gptoss_hostsim::atomic(p, gptoss_hostsim::kAtomicAdd, v); }
template <typename T> inline T atomicSub(T* p, T v) { return gptoss_hostsim::atomic(p, gptoss_hostsim::kAtomicSub, v); }
template <typename T> inline T atomicOr(T* p, T v) { return gptoss_hostsim::atomic(p, gptoss_hostsim::kAtomicOr, v); }
template <typename T> inline T atomicAnd(T* p, T v) { return gptoss_hostsim::atomic(p, gptoss_hostsim::kAtomicAnd, v); }
template <typename T> inline T atomicXor(T* p, T v) { return gptoss_hostsim::atomic(p, gptoss_hostsim::kAtomicXor, v); }
template <typename T> inline T atomicMax(T* p, T v) { return gptoss_hostsim::atomic(p, gptoss_hostsim::kAtomicMax, v); }
template <typename T> inline T atomicMin(T* p, T v) { return gptoss_hostsim::atomic(p, gptoss_hostsim::kAtomicMin, v); }
template <typename T> inline T atomicExch(T* p, T v) { return gptoss_hostsim::atomic(p, gptoss_hostsim::kAtomicExch, v); }
template <typename T> inline T atomicCAS(T* p, T cmp, T v) { return gptoss_hostsim::atomic(p, gptoss_hostsim::kAtomicCas, v, cmp); }
inline size_t __cvta_generic_to_shared(const void* p) { return gptoss_hostsim::cvta_generic_to_shared(p); }

// ---- the launch API ----
typedef enum cudaLaunchAttributeID {
  cudaLaunchAttributeClusterDimension = 4,
  cudaLaunchAttributeProgrammaticStreamSerialization = 6
} cudaLaunchAttributeID;
typedef union cudaLaunchAttributeValue {
  struct { unsigned x, y, z; } clusterDim;
  int programmaticStreamSerializationAllowed;
  char pad[64];
} cudaLaunchAttributeValue;
typedef struct cudaLaunchAttribute {
  cudaLaunchAttributeID id;
  cudaLaunchAttributeValue val;
} cudaLaunchAttribute;
typedef struct cudaLaunchConfig_t {
  dim3 gridDim;
  dim3 blockDim;
  size_t dynamicSmemBytes;
  cudaStream_t stream;
  cudaLaunchAttribute* attrs;
  unsigned numAttrs;
} cudaLaunchConfig_t;

template <typename... P, typename... A>
cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t* cfg, void (*kernel)(P...), A&&... args) {
  gptoss_hostsim::LaunchSpec spec;
  spec.grid = cfg->gridDim;
  spec.block = cfg->blockDim;
  spec.smem = cfg->dynamicSmemBytes;
  for (unsigned i = 0; i < cfg->numAttrs; ++i) {
    if (cfg->attrs[i].id == cudaLaunchAttributeClusterDimension) spec.cluster = cfg->attrs[i].val.clusterDim.x;
    if (cfg->attrs[i].id == cudaLaunchAttributeProgrammaticStreamSerialization)
      spec.pdl = cfg->attrs[i].val.programmaticStreamSerializationAllowed != 0;
  }
  gptoss_hostsim::KernelCall<P...> call{kernel, std::tuple<std::decay_t<P>...>(static_cast<P>(std::forward<A>(args))...)};
  return gptoss_hostsim::launch(spec, reinterpret_cast<const void*>(kernel), &gptoss_hostsim::KernelCall<P...>::run,
                                &call, sizeof(call));
}
template <typename... P>
cudaError_t cudaFuncSetAttribute(void (*kernel)(P...), cudaFuncAttribute attr, int value) {
  return gptoss_hostsim::func_set_attribute(reinterpret_cast<const void*>(kernel), attr, value);
}
template <typename... P>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, void (*kernel)(P...)) {
  return gptoss_hostsim::func_get_attributes(attr, reinterpret_cast<const void*>(kernel));
}
template <typename... P>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, void (*kernel)(P...), int threads, size_t smem) {
  return gptoss_hostsim::occupancy(blocks, reinterpret_cast<const void*>(kernel), threads, smem);
}
