// gptoss hostsim: the runner's interface for the Python binding (bind_hostsim.cpp) and C++ tests.
#pragma once
#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#define GPTOSS_HS_API __attribute__((visibility("default")))

namespace gptoss_hostsim {
// The byte extents that the next kernels may touch in global memory (every tensor argument).
GPTOSS_HS_API void begin_call(const std::vector<std::pair<uintptr_t, size_t>>& regions);
// Ends the call: the checkers' reports since begin_call (empty: clean).
GPTOSS_HS_API std::vector<std::string> end_call();
// Thread and block order: -1 rotates forward / reverse / random between launches; 0, 1, 2 fix one.
GPTOSS_HS_API void set_order(int mode, uint64_t seed);
// Refuse every thread-block-cluster launch (as a partitioned GPU may), to test fallbacks.
GPTOSS_HS_API void set_refuse_clusters(bool refuse);
// The emulated device: compute capability cc (10 * major + minor: its attributes and launch limits)
// running code compiled for code_cc (cudaFuncGetAttributes; 0: the build holds none for it, every
// launch fails with cudaErrorNoKernelImageForDevice). Default (90, 90): an H100 with sm_90a code.
// The kernels themselves are always the sm_90a source: below 9.0, a cluster launch, a launch with
// the PDL attribute, wgmma or more shared memory than the architecture has is an "arch" finding.
GPTOSS_HS_API void set_device(int cc, int code_cc);
GPTOSS_HS_API std::pair<int, int> device();
// Launches with the PDL attribute fail with this CUDA error (0: never), to test the PDL policy.
GPTOSS_HS_API void set_refuse_pdl(int error);
// The next PDL launch has no previous kernel (its pre-wait reads are not checked against one).
GPTOSS_HS_API void forget_previous_kernel();
struct Stats {
  uint64_t launches = 0, blocks = 0, threads = 0;
  std::map<std::string, uint64_t> kernels;  // launches per kernel (demangled name)
  std::map<std::string, uint64_t> reports;  // checker findings per kernel
};
GPTOSS_HS_API Stats stats();
// Global-memory traffic of the last call (begin_call .. end_call), one entry per extent in
// begin_call order: bytes read and written by the kernels, and how many blocks touched it.
struct Traffic {
  uintptr_t address = 0;
  size_t bytes = 0;
  uint64_t bytes_read = 0, bytes_written = 0, blocks = 0;
};
GPTOSS_HS_API std::vector<Traffic> last_call_traffic();
}  // namespace gptoss_hostsim

// Probe kernels (probes.cpp): one emulated PTX operation, registers in and out through memory.
namespace gptoss_hostsim {
GPTOSS_HS_API int probe_mma(const uint32_t* a, const uint32_t* b, const float* c, float* d);
GPTOSS_HS_API int probe_ldmatrix(const uint8_t* image, int bytes, const uint32_t* addr, int trans, uint32_t* out);
GPTOSS_HS_API int probe_wgmma(const uint8_t* image, int bytes, uint64_t desc_a, uint64_t desc_b, int n, int tnsp_b,
                              const uint32_t* a_regs, float* d);
// A kernel with known bug number `which` (probes.cpp; 0: none): the checkers' own test.
GPTOSS_HS_API int probe_checker(int which, float* buf, int n);
}  // namespace gptoss_hostsim
