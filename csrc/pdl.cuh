// Programmatic dependent launch (PDL, sm_90) for the kernels of the decode step.
//
// A kernel launched with `launch(..., pdl = true, ...)` may start while the kernel before it on
// the stream is still running: it must call pdl::wait() before it reads anything that kernel (or
// any earlier one) writes, and before it writes anything they read. Work before the wait may only
// touch data no earlier kernel writes (weights) or give hints (L2 prefetch). pdl::launch_dependents()
// lets the next PDL kernel start; every kernel here calls it right after its wait, so at most one
// kernel runs ahead of the one doing the work (a kernel that never calls it lets the next one
// start when it exits). Chains are transitive: a grid completes only after its own wait returned.
// wait() returns at once in a grid launched without the attribute; launch_dependents() lets a
// following kernel that was launched WITH the attribute start early whatever our own launch was,
// so such a kernel (ours or a caller's) must wait before reading our outputs. Both compile to
// nothing below sm_90, so code compiled for sm_80..89 must never be launched with the attribute,
// on any device: launch() asks gptoss::arch::pdl_ok() (the paths' compute capability >= 90,
// which the code's own architecture bounds; gptoss/arch.h). One exception to "nothing before the
// wait": MoE mlp2 reads the routing ids before it, only to aim an L2 prefetch (a hint), and
// reads them again after it.
//
// GPTOSS_PDL=0 in the environment (read once per process) launches everything the ordinary way;
// GPTOSS_MOE_DECODE_PDL=0, the older switch, does the same. A runtime that refuses the attribute
// itself (cudaErrorNotSupported or cudaErrorInvalidValue, and the same launch works without it)
// turns PDL off for the rest of the process; any other error is returned as it is and changes
// nothing. off_reason() says why PDL is off ("" while on).
#pragma once
#include <cuda_runtime.h>

#include <atomic>
#include <cstdlib>

#include "arch.cuh"

namespace gptoss {
namespace pdl {

__device__ __forceinline__ void wait() {
#if defined(GPTOSS_HOSTSIM)
  ::gptoss_hostsim::griddep_wait();
#elif GPTOSS_SM90_CODE
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void launch_dependents() {
#if defined(GPTOSS_HOSTSIM)
  ::gptoss_hostsim::griddep_launch_dependents();
#elif GPTOSS_SM90_CODE
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Hint: bring [p, p + bytes) into L2 (bytes a multiple of 16, p 16-byte aligned). No effect on
// results, so it may run before wait() on data that no earlier kernel writes.
__device__ __forceinline__ void prefetch_l2(const void* p, uint32_t bytes) {
#if defined(GPTOSS_HOSTSIM)
  ::gptoss_hostsim::prefetch_l2(p, bytes);
#elif GPTOSS_SM90_CODE
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(bytes) : "memory");
#endif
}

// The process-wide switch (inline: one instance in the library; atomic: any thread may launch).
inline std::atomic<bool>& disabled() {
  static std::atomic<bool> off{[] {
    for (const char* name : {"GPTOSS_PDL", "GPTOSS_MOE_DECODE_PDL"}) {
      const char* v = std::getenv(name);
      if (v != nullptr && v[0] == '0') return true;
    }
    return false;
  }()};
  return off;
}
inline bool enabled() { return !disabled(); }

// Why PDL is off: 0 on, 1 environment, 2 gptoss_set_pdl(0), 3 refused by the runtime (+ its error).
inline std::atomic<int>& off_cause() {
  static std::atomic<int> cause{disabled() ? 1 : 0};
  return cause;
}
inline std::atomic<int>& refused_error() {
  static std::atomic<int> e{0};
  return e;
}
inline const char* off_reason() {
  if (enabled()) return "";
  switch (off_cause().load()) {
    case 1: return "GPTOSS_PDL=0 (or GPTOSS_MOE_DECODE_PDL=0) in the environment";
    case 3: return refused_error().load() == cudaErrorNotSupported
                       ? "the CUDA runtime refused the launch attribute (cudaErrorNotSupported)"
                       : "the CUDA runtime refused the launch attribute (cudaErrorInvalidValue)";
    default: return "switched off (gptoss_set_pdl(0) / _lib.set_pdl(False))";
  }
}
// The runtime refused the attribute itself (what a plain retry may then fix).
inline bool refuses_attribute(cudaError_t err) { return err == cudaErrorNotSupported || err == cudaErrorInvalidValue; }
inline void turn_off_refused(cudaError_t err) {
  refused_error() = static_cast<int>(err);
  off_cause() = 3;
  disabled() = true;
}

// A cudaLaunchKernelEx configuration without attributes.
inline cudaLaunchConfig_t launch_config(dim3 grid, dim3 block, size_t smem, cudaStream_t stream) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  return cfg;
}

// kernel<<<grid, block, smem, stream>>>(args...) through cudaLaunchKernelEx (the same launch; the
// host-simulation build has no <<< >>>). Returns the launch's error.
template <typename... Params, typename... Args>
cudaError_t launch_plain(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                         Args... args) {
  cudaLaunchConfig_t cfg = launch_config(grid, block, smem, stream);
  return cudaLaunchKernelEx(&cfg, kernel, static_cast<Params>(args)...);
}

// Launch kernel<<<grid, block, smem, stream>>>(args...), with the PDL attribute when pdl, PDL is
// enabled and the current device's paths have it (arch::pdl_ok). Returns the launch's error.
template <typename... Params, typename... Args>
cudaError_t launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, bool pdl,
                   Args... args) {
  if (pdl && enabled() && arch::pdl_ok()) {
    cudaLaunchConfig_t cfg = launch_config(grid, block, smem, stream);
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    const cudaError_t err = cudaLaunchKernelEx(&cfg, kernel, static_cast<Params>(args)...);
    if (err == cudaSuccess) return err;
    (void)cudaGetLastError();  // returned to the caller; not left for an unrelated launch check
    if (!refuses_attribute(err)) return err;  // no device, capture errors, ...: as it is
    // Retry the ordinary way; only if that works was the attribute the problem (a runtime or
    // driver without PDL): then PDL stays off for the process. A bad configuration fails again
    // and is returned as it is.
    const cudaError_t plain = launch_plain(kernel, grid, block, smem, stream, args...);
    (void)cudaGetLastError();
    if (plain == cudaSuccess) turn_off_refused(err);
    return plain;
  }
  const cudaError_t err = launch_plain(kernel, grid, block, smem, stream, args...);
  (void)cudaGetLastError();  // returned to the caller; not left for an unrelated launch check
  return err;
}

// launch() for a grid of thread-block clusters of cluster_x blocks along x (a runtime cluster
// size: grid.x must be a multiple of it), with the PDL attribute as launch() adds it. Only for
// paths the caller chose with arch::current()'s clusters flag.
template <typename... Params, typename... Args>
cudaError_t launch_clusters(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                            unsigned cluster_x, bool pdl, Args... args) {
  cudaLaunchConfig_t cfg = launch_config(grid, block, smem, stream);
  cudaLaunchAttribute attr[2];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = cluster_x;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  attr[1].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[1].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = (pdl && enabled() && arch::pdl_ok()) ? 2 : 1;
  const cudaError_t err = cudaLaunchKernelEx(&cfg, kernel, static_cast<Params>(args)...);
  if (err == cudaSuccess) return err;
  (void)cudaGetLastError();  // errors are returned, not left for an unrelated launch check
  if (cfg.numAttrs == 1 || !refuses_attribute(err)) return err;
  cfg.numAttrs = 1;  // as launch(): retry without PDL; turn PDL off only if that works
  const cudaError_t plain = cudaLaunchKernelEx(&cfg, kernel, static_cast<Params>(args)...);
  if (plain == cudaSuccess) turn_off_refused(err);
  else (void)cudaGetLastError();
  return plain;
}

}  // namespace pdl
}  // namespace gptoss
