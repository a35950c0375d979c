#include <cmath>

#include "binding.h"
#include "topk.cuh"

namespace {
namespace py = pybind11;

// Host run of the kernels' selection: experts dealt to `lanes` lists the way the kernels deal
// them (expert e to lane e % lanes), each list built with topk_insert, then merged in K rounds
// of topk_pick over the lanes' heads + topk_pop of the winner (what topk_warp_merge does with
// shuffles), then topk_softmax.
template <int K>
void select_rows(const float* logits, int64_t T, int64_t E, int k, int lanes, int32_t* ids, float* w) {
  std::vector<float> lv(static_cast<size_t>(lanes) * K);
  std::vector<int> li(static_cast<size_t>(lanes) * K);
  for (int64_t t = 0; t < T; ++t) {
    const float* row = logits + t * E;
    for (int l = 0; l < lanes; ++l) {
      float v[K];
      int i[K];
      gptoss::topk_init(v, i);
      for (int64_t e = l; e < E; e += lanes) gptoss::topk_insert(v, i, row[e], static_cast<int>(e));
      for (int j = 0; j < K; ++j) {
        lv[l * K + j] = v[j];
        li[l * K + j] = i[j];
      }
    }
    float sv[K];
    int si[K];
    for (int r = 0; r < K; ++r) {
      float bv = lv[0];
      int bi = li[0], bl = 0;
      for (int l = 1; l < lanes; ++l) {
        const int before = bi;
        gptoss::topk_pick(bv, bi, lv[l * K], li[l * K]);
        if (bi != before) bl = l;
      }
      sv[r] = bv;
      si[r] = bi;
      float v[K];
      int i[K];
      for (int j = 0; j < K; ++j) {
        v[j] = lv[bl * K + j];
        i[j] = li[bl * K + j];
      }
      gptoss::topk_pop(v, i);
      for (int j = 0; j < K; ++j) {
        lv[bl * K + j] = v[j];
        li[bl * K + j] = i[j];
      }
    }
    float wt[K];
    gptoss::topk_softmax(sv, k, wt);
    for (int j = 0; j < k; ++j) {
      ids[t * k + j] = si[j];
      w[t * k + j] = wt[j];
    }
  }
}

}  // namespace

GPTOSS_PY_BIND(router) {
  using namespace gptoss_py;
  m.def(
      "router_topk_workspace_size",
      [](int64_t T, int64_t H, int64_t E, int k, int path) {
        return gptoss_router_topk_workspace_size(T, H, E, k, path);
      },
      py::arg("T"), py::arg("H"), py::arg("E"), py::arg("k"), py::arg("path"));
  m.def(
      "router_topk_bf16",
      [](uintptr_t x, uintptr_t weight, uintptr_t bias, uintptr_t ids, uintptr_t weights, int64_t T,
         int64_t H, int64_t E, int k, int path, uintptr_t workspace, size_t workspace_bytes,
         uintptr_t s) {
        check(gptoss_router_topk_bf16(ptr<const void>(x), ptr<const void>(weight), ptr<const void>(bias),
                                      ptr<int32_t>(ids), ptr<float>(weights), T, H, E, k, path,
                                      ptr<void>(workspace), workspace_bytes, stream(s)));
      },
      py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("topk_ids"), py::arg("topk_weights"),
      py::arg("T"), py::arg("H"), py::arg("E"), py::arg("k"), py::arg("path"), py::arg("workspace"),
      py::arg("workspace_bytes"), py::arg("stream"));
  m.def(
      "add_rms_norm_router_topk_bf16",
      [](uintptr_t delta, uintptr_t residual, uintptr_t residual_out, uintptr_t norm_weight, bool norm_weight_fp32,
         float eps, uintptr_t norm_out, uintptr_t weight, uintptr_t bias, uintptr_t ids, uintptr_t weights, int64_t T,
         int64_t H, int64_t E, int k, uintptr_t s) {
        check(gptoss_add_rms_norm_router_topk_bf16(
            ptr<const void>(delta), ptr<const void>(residual), ptr<void>(residual_out), ptr<const void>(norm_weight),
            norm_weight_fp32 ? 1 : 0, eps, ptr<void>(norm_out), ptr<const void>(weight), ptr<const void>(bias),
            ptr<int32_t>(ids), ptr<float>(weights), T, H, E, k, stream(s)));
      },
      py::arg("delta"), py::arg("residual"), py::arg("residual_out"), py::arg("norm_weight"),
      py::arg("norm_weight_fp32"), py::arg("eps"), py::arg("norm_out"), py::arg("weight"), py::arg("bias"),
      py::arg("topk_ids"), py::arg("topk_weights"), py::arg("T"), py::arg("H"), py::arg("E"), py::arg("k"),
      py::arg("stream"));
  m.attr("add_rms_norm_router_topk_max_tokens") = gptoss_add_rms_norm_router_topk_max_tokens();
  m.def(
      "route_workspace_size", [](int64_t n_rows, int64_t E) { return gptoss_route_workspace_size(n_rows, E); },
      py::arg("n_rows"), py::arg("E"));
  m.def(
      "route",
      [](uintptr_t ids, int64_t n_rows, int64_t E, uintptr_t counts, uintptr_t offsets, uintptr_t perm,
         uintptr_t workspace, size_t workspace_bytes, uintptr_t s) {
        check(gptoss_route(ptr<const int32_t>(ids), n_rows, E, ptr<int32_t>(counts), ptr<int32_t>(offsets),
                           ptr<int32_t>(perm), ptr<void>(workspace), workspace_bytes, stream(s)));
      },
      py::arg("topk_ids"), py::arg("n_rows"), py::arg("E"), py::arg("counts"), py::arg("offsets"),
      py::arg("permutation"), py::arg("workspace"), py::arg("workspace_bytes"), py::arg("stream"));

  py::module_ host = m.attr("host").cast<py::module_>();
  // logits float32 [T, E] -> (ids int32 [T, k], weights float32 [T, k]) through topk.cuh, with the
  // experts dealt over `lanes` lists merged like the warp merge (lanes=32 is what the kernels do;
  // lanes=1 is plain insertion). kmax: the list length the kernels instantiate (4 for k <= 4, else 8).
  host.def(
      "router_select",
      [](py::array_t<float, py::array::c_style | py::array::forcecast> logits, int k, int lanes) {
        if (logits.ndim() != 2) throw py::value_error("logits must be [T, E]");
        const int64_t T = logits.shape(0), E = logits.shape(1);
        if (k < 1 || k > 8 || k > E) throw py::value_error("k must be in [1, min(E, 8)]");
        if (lanes < 1 || lanes > 1024) throw py::value_error("lanes must be in [1, 1024]");
        py::array_t<int32_t> ids({T, static_cast<int64_t>(k)});
        py::array_t<float> w({T, static_cast<int64_t>(k)});
        if (k <= 4)
          select_rows<4>(logits.data(), T, E, k, lanes, ids.mutable_data(), w.mutable_data());
        else
          select_rows<8>(logits.data(), T, E, k, lanes, ids.mutable_data(), w.mutable_data());
        return py::make_tuple(ids, w);
      },
      py::arg("logits"), py::arg("k"), py::arg("lanes") = 32);
}
