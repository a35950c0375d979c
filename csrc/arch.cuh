// Architecture facts for the kernels (gptoss/arch.h): what the code being compiled may use (device
// side), and which paths the launchers choose for the current device (host side).
#pragma once
#include <cuda_runtime.h>

#include "gptoss/arch.h"

// ---- device code: the features of the architecture being compiled ----
// GPTOSS_SM90_CODE: thread-block clusters, griddepcontrol (PDL), the bulk L2 prefetch (sm_90 and
// later). GPTOSS_WGMMA_CODE: wgmma and the async proxy fence (sm_90a only). The host build
// (csrc/hostsim) compiles the kernels as sm_90a: both. In nvcc's host pass (no __CUDA_ARCH__)
// they are 0, but kernel bodies are not compiled there.
#if defined(GPTOSS_HOSTSIM) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900)
#define GPTOSS_SM90_CODE 1
#else
#define GPTOSS_SM90_CODE 0
#endif
#if defined(GPTOSS_HOSTSIM) || defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define GPTOSS_WGMMA_CODE 1
#else
#define GPTOSS_WGMMA_CODE 0
#endif
// In a device pass lacking the feature, a kernel that needs it is compiled as this stub: it
// stops the grid with an error (cudaErrorLaunchFailure), never writes a result. The launchers do
// not launch it there (gptoss::arch::current()).
#if defined(__CUDA_ARCH__) && !GPTOSS_SM90_CODE
#define GPTOSS_NO_SM90_CODE_PASS 1
#else
#define GPTOSS_NO_SM90_CODE_PASS 0
#endif
#if defined(__CUDA_ARCH__) && !GPTOSS_WGMMA_CODE
#define GPTOSS_NO_WGMMA_CODE_PASS 1
#else
#define GPTOSS_NO_WGMMA_CODE_PASS 0
#endif
#if defined(GPTOSS_HOSTSIM)
#define GPTOSS_UNAVAILABLE_KERNEL_BODY() __builtin_trap()  // never compiled in: the host build is sm_90a
#else
#define GPTOSS_UNAVAILABLE_KERNEL_BODY() __trap()
#endif

// ---- host code: the paths for the current device ----
namespace gptoss {
namespace arch {

// The current device's facts (gptoss_get_arch_info on cudaGetDevice()), cached per device. On a
// device without code in this build: GPTOSS_ERROR_UNSUPPORTED with the message naming the fix.
gptoss_status current(gptoss_arch_info* info);

// Whether launches on the current device may carry the PDL attribute (the code has griddepcontrol
// and the device honours it): cc >= 90. The process-wide switch (pdl.cuh) is checked apart.
bool pdl_ok();

// Forget the devices' cached facts (the host build's emulated device changed).
void reset_cache();

// "sm_XY" style name of a compute capability (for messages).
const char* cc_name(int cc);

}  // namespace arch
}  // namespace gptoss
