// Error reporting and build facts of the C ABI (gptoss/common.h).
#include <cuda_runtime.h>

#include <string>

#include "common.cuh"
#include "pdl.cuh"

#ifndef GPTOSS_CUDA_ARCHS_STR
#define GPTOSS_CUDA_ARCHS_STR "unknown"
#endif

namespace {
thread_local std::string g_last_error;
}

namespace gptoss {

gptoss_status set_error(gptoss_status code, const std::string& message) {
  g_last_error = message;
  return code;
}

gptoss_status cuda_status(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return GPTOSS_OK;
  std::string msg = std::string(what) + ": CUDA error " + cudaGetErrorName(err) + " (" +
                    cudaGetErrorString(err) + ")";
  if (err == cudaErrorInsufficientDriver || err == cudaErrorNoDevice)
    msg += "; no usable NVIDIA GPU/driver is visible to this process";
  else if (err == cudaErrorNoKernelImageForDevice || err == cudaErrorInvalidDeviceFunction)
    msg += "; the kernels were built for CUDA archs " GPTOSS_CUDA_ARCHS_STR
           " (rebuild with GPTOSS_CUDA_ARCHS set for this GPU)";
  return set_error(GPTOSS_ERROR_CUDA, msg);
}

}  // namespace gptoss

GPTOSS_API const char* gptoss_last_error_message(void) { return g_last_error.c_str(); }
GPTOSS_API int gptoss_abi_version(void) { return GPTOSS_ABI_VERSION; }
GPTOSS_API void gptoss_set_pdl(int enabled) {
  gptoss::pdl::disabled() = (enabled == 0);
  gptoss::pdl::off_cause() = enabled == 0 ? 2 : 0;
}
GPTOSS_API const char* gptoss_pdl_off_reason(void) { return gptoss::pdl::off_reason(); }
GPTOSS_API int gptoss_pdl_enabled(void) { return gptoss::pdl::enabled() ? 1 : 0; }
GPTOSS_API const char* gptoss_version(void) { return "0.1.0"; }
GPTOSS_API const char* gptoss_cuda_archs(void) { return GPTOSS_CUDA_ARCHS_STR; }
GPTOSS_API int gptoss_cuda_build_version(void) { return CUDART_VERSION; }
GPTOSS_API gptoss_status gptoss_device_count(int* count) {
  GPTOSS_REQUIRE(count != nullptr, "device_count: null pointer");
  *count = 0;
  GPTOSS_CUDA_TRY(cudaGetDeviceCount(count), "cudaGetDeviceCount");
  return GPTOSS_OK;
}
