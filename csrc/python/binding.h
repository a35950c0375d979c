// Shared glue for the pybind11 module gptoss_kernels._C. Each kernel family has one
// bind_<family>.cpp that registers itself with GPTOSS_PY_BIND(<family>) { ... }, so adding a
// family never edits another file. Wrappers take device pointers as Python ints
// (tensor.data_ptr()), sizes as ints and the CUDA stream as an int (torch's
// current_stream().cuda_stream); argument checks with readable messages live on the Python
// side (gptoss_kernels/_checks.py); the C ABI re-checks what it must and its errors become
// Python exceptions here.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <utility>
#include <vector>

#include "gptoss/gptoss.h"

namespace gptoss_py {
namespace py = pybind11;

using BindFn = void (*)(py::module_&);
std::vector<std::pair<const char*, BindFn>>& registry();
struct Register {
  Register(const char* name, BindFn fn) { registry().emplace_back(name, fn); }
};

// Raises ValueError (invalid argument / unsupported) or RuntimeError (CUDA) for a failed call.
void check(gptoss_status status);

template <typename T>
inline T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}
inline cudaStream_t stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

}  // namespace gptoss_py

#define GPTOSS_PY_BIND(family)                                                     \
  static void gptoss_bind_##family(::gptoss_py::py::module_& m);                   \
  static ::gptoss_py::Register gptoss_register_##family(#family, &gptoss_bind_##family); \
  static void gptoss_bind_##family(::gptoss_py::py::module_& m)
