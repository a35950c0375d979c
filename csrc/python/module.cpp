// gptoss_kernels._C: build facts, then every family's bindings (see binding.h).
#include <stdexcept>
#include <string>

#include "binding.h"

namespace gptoss_py {

std::vector<std::pair<const char*, BindFn>>& registry() {
  static std::vector<std::pair<const char*, BindFn>> r;
  return r;
}

void check(gptoss_status status) {
  if (status == GPTOSS_OK) return;
  const std::string msg = gptoss_last_error_message();
  if (status == GPTOSS_ERROR_CUDA) throw std::runtime_error(msg);
  throw py::value_error(msg);
}

}  // namespace gptoss_py

// The same sources build gptoss_kernels._C (CUDA) and gptoss_kernels._hostsim (the kernels run on
// the CPU, csrc/hostsim); GPTOSS_MODULE_NAME says which.
#ifndef GPTOSS_MODULE_NAME
#define GPTOSS_MODULE_NAME _C
#endif

PYBIND11_MODULE(GPTOSS_MODULE_NAME, m) {
  namespace py = pybind11;
  m.doc() = "gptoss-kernels compiled kernels (thin wrappers over the torch-free C ABI)";
  m.attr("abi_version") = gptoss_abi_version();
  m.attr("version") = gptoss_version();
  m.attr("cuda_archs") = std::string(gptoss_cuda_archs());
  m.attr("cuda_build_version") = gptoss_cuda_build_version();
  m.def("set_pdl", [](bool enabled) { gptoss_set_pdl(enabled ? 1 : 0); }, py::arg("enabled"),
        "programmatic dependent launch of the decode-path kernels on/off for later launches");
  m.def("pdl_enabled", []() { return gptoss_pdl_enabled() != 0; });
  m.def("pdl_off_reason", []() { return std::string(gptoss_pdl_off_reason()); }, "why PDL is off ('' while on)");
  m.def("arch_info", [](int device) {
    gptoss_arch_info a;
    const gptoss_status st = gptoss_get_arch_info(device, &a);
    if (st != GPTOSS_OK && st != GPTOSS_ERROR_UNSUPPORTED) gptoss_py::check(st);
    py::dict d;
    d["device_cc"] = a.device_cc;
    d["code_cc"] = a.code_cc;
    d["forced_cc"] = a.forced_cc;
    d["cc"] = a.cc;
    d["clusters"] = a.clusters != 0;
    d["pdl"] = a.pdl != 0;
    d["wgmma"] = a.wgmma != 0;
    d["max_smem_per_block"] = a.max_smem_per_block;
    d["error"] = st == GPTOSS_OK ? py::object(py::none()) : py::object(py::str(gptoss_last_error_message()));
    return d;
  }, py::arg("device") = 0,
        "the paths the kernels take on a CUDA device (gptoss/arch.h): compute capabilities of the device, of this "
        "build's code for it, of the override, the one the paths are chosen for, the features they use; 'error': why "
        "no code of this build runs there (None when some does)");
  m.def("set_arch_override", [](int cc) { gptoss_py::check(gptoss_set_arch_override(cc)); }, py::arg("cc"),
        "choose the paths as if the device had compute capability cc (80, 86, 89, 90; 0: the device's own)");
  m.def("arch_override", []() { return gptoss_arch_override(); });
  m.def("cuda_device_count", []() {
    int n = 0;
    const gptoss_status st = gptoss_device_count(&n);
    return py::make_tuple(n, std::string(st == GPTOSS_OK ? "" : gptoss_last_error_message()));
  }, "(count, error message or '') as seen by the library's own (static) CUDA runtime");
  py::module_ host = m.def_submodule(
      "host", "Host builds of the kernels' __host__ __device__ math, for CPU tests");
  std::vector<std::string> families;
  for (auto& [name, fn] : gptoss_py::registry()) {
    fn(m);
    if (name[0] != '_') families.emplace_back(name);  // "_name": not a kernel family
  }
  m.attr("families") = families;
}
