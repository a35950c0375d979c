// Internal helpers shared by every kernel family (not part of the public ABI).
#pragma once
#include <cstdint>
#include <cstdio>
#include <string>

#include "gptoss/common.h"

#if defined(__CUDACC__)
#define GPTOSS_HD __host__ __device__ __forceinline__
#else
#define GPTOSS_HD inline
#endif

namespace gptoss {

// Records the message for gptoss_last_error_message() and returns the code.
gptoss_status set_error(gptoss_status code, const std::string& message);

// Turns a CUDA error (or the last launch error) into a status with a readable message.
gptoss_status cuda_status(cudaError_t err, const char* what);

inline bool aligned(const void* p, uintptr_t bytes) {
  return (reinterpret_cast<uintptr_t>(p) % bytes) == 0;
}

}  // namespace gptoss

// Argument check inside a C-ABI function: returns GPTOSS_ERROR_INVALID_ARGUMENT with a message.
#define GPTOSS_REQUIRE(cond, msg)                                                     \
  do {                                                                                \
    if (!(cond)) return ::gptoss::set_error(GPTOSS_ERROR_INVALID_ARGUMENT, (msg));    \
  } while (0)

// After a kernel launch: reports a launch failure (bad configuration, no device, ...).
#define GPTOSS_RETURN_LAUNCH_STATUS(what) return ::gptoss::cuda_status(cudaGetLastError(), (what))

// Inside a launcher: propagate a CUDA error from a runtime call.
#define GPTOSS_CUDA_TRY(call, what)                                                   \
  do {                                                                                \
    cudaError_t err_ = (call);                                                        \
    if (err_ != cudaSuccess) return ::gptoss::cuda_status(err_, (what));              \
  } while (0)
