// gptoss_kernels._hostsim only: the runner's controls and the PTX probes (the kernels' bindings
// are the same files as _C's, csrc/python/bind_*.cpp).
#include "../python/binding.h"
#include "hostsim_api.h"

GPTOSS_PY_BIND(_hostsim_runner) {
  namespace hs = gptoss_hostsim;
  namespace py = pybind11;
  m.attr("is_hostsim") = true;
  m.def("begin_call", [](const std::vector<std::pair<uintptr_t, size_t>>& regions) { hs::begin_call(regions); },
        py::arg("regions"), "the (address, bytes) extents the next kernels may touch in global memory");
  m.def("end_call", []() { return hs::end_call(); }, "the checkers' reports since begin_call (empty: clean)");
  m.def("set_order", [](int mode, uint64_t seed) { hs::set_order(mode, seed); }, py::arg("mode"), py::arg("seed") = 0,
        "thread/block order: -1 rotate (default), 0 forward, 1 reverse, 2 seeded random");
  m.def("set_refuse_clusters", [](bool refuse) { hs::set_refuse_clusters(refuse); }, py::arg("refuse"),
        "refuse thread-block-cluster launches (as a partitioned GPU may)");
  m.def("set_refuse_pdl", [](int error) { hs::set_refuse_pdl(error); }, py::arg("error"),
        "launches with the PDL attribute fail with this CUDA error code (0: never)");
  m.def("set_device", [](int cc, int code_cc) { hs::set_device(cc, code_cc); }, py::arg("cc"), py::arg("code_cc"),
        "emulate a device of compute capability cc (e.g. 86) running code compiled for code_cc (0: none)");
  m.def("device", []() { return hs::device(); }, "(cc, code_cc) of the emulated device");
  m.def("forget_previous_kernel", []() { hs::forget_previous_kernel(); });
  m.def("stats", []() {
    const hs::Stats s = hs::stats();
    py::dict d;
    d["launches"] = s.launches;
    d["blocks"] = s.blocks;
    d["threads"] = s.threads;
    d["kernels"] = s.kernels;
    d["reports"] = s.reports;
    return d;
  }, "launches, blocks and threads run so far, and launches per kernel");
  m.def("last_call_traffic", []() {
    py::list out;
    for (const hs::Traffic& t : hs::last_call_traffic()) {
      py::dict d;
      d["address"] = t.address;
      d["bytes"] = t.bytes;
      d["bytes_read"] = t.bytes_read;
      d["bytes_written"] = t.bytes_written;
      d["blocks"] = t.blocks;
      out.append(d);
    }
    return out;
  }, "per argument extent of the last call (begin_call order): bytes read and written by the kernels and "
     "the number of blocks that touched it");
  py::module_ probe = m.def_submodule("probe", "one emulated PTX operation per call (tests/test_hostsim_ptx.py)");
  probe.def("mma", [](uintptr_t a, uintptr_t b, uintptr_t c, uintptr_t d) {
    return hs::probe_mma(gptoss_py::ptr<const uint32_t>(a), gptoss_py::ptr<const uint32_t>(b), gptoss_py::ptr<const float>(c),
                         gptoss_py::ptr<float>(d));
  });
  probe.def("ldmatrix", [](uintptr_t image, int bytes, uintptr_t addr, int trans, uintptr_t out) {
    return hs::probe_ldmatrix(gptoss_py::ptr<const uint8_t>(image), bytes, gptoss_py::ptr<const uint32_t>(addr), trans,
                              gptoss_py::ptr<uint32_t>(out));
  });
  probe.def("checker", [](int which, uintptr_t buf, int n) { return hs::probe_checker(which, gptoss_py::ptr<float>(buf), n); });
  probe.def("wgmma", [](uintptr_t image, int bytes, uint64_t desc_a, uint64_t desc_b, int n, int tnsp_b, uintptr_t a_regs,
                        uintptr_t d) {
    return hs::probe_wgmma(gptoss_py::ptr<const uint8_t>(image), bytes, desc_a, desc_b, n, tnsp_b,
                           gptoss_py::ptr<const uint32_t>(a_regs), gptoss_py::ptr<float>(d));
  });
}
