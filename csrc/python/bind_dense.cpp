#include <algorithm>
#include <climits>
#include <cmath>
#include <string>
#include <vector>

#include "binding.h"
#include "norm.cuh"

GPTOSS_PY_BIND(dense) {
  using namespace gptoss_py;
  m.def(
      "rms_norm_bf16",
      [](uintptr_t x, uintptr_t residual, uintptr_t weight, bool weight_fp32, uintptr_t out, uintptr_t residual_out,
         int64_t T, int64_t H, float eps, uintptr_t s) {
        check(gptoss_rms_norm_bf16(ptr<const void>(x), ptr<const void>(residual), ptr<const void>(weight),
                                   weight_fp32 ? 1 : 0, ptr<void>(out), ptr<void>(residual_out), T, H, eps,
                                   stream(s)));
      },
      py::arg("x"), py::arg("residual"), py::arg("weight"), py::arg("weight_fp32"), py::arg("out"),
      py::arg("residual_out"), py::arg("T"), py::arg("H"), py::arg("eps"), py::arg("stream"));
  m.def(
      "linear_bf16",
      [](uintptr_t x, uintptr_t weight, uintptr_t bias, uintptr_t out, bool out_fp32, int64_t T, int64_t N,
         int64_t K, uintptr_t s) {
        check(gptoss_linear_bf16(ptr<const void>(x), ptr<const void>(weight), ptr<const void>(bias), ptr<void>(out),
                                 out_fp32 ? 1 : 0, T, N, K, stream(s)));
      },
      py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("out"), py::arg("out_fp32"), py::arg("T"),
      py::arg("N"), py::arg("K"), py::arg("stream"));
  m.def(
      "linear_qkv_rope_append_bf16",
      [](uintptr_t x, uintptr_t weight, uintptr_t bias, uintptr_t seq_ids, uintptr_t positions, uintptr_t q_out,
         uintptr_t k_cache, uintptr_t v_cache, int64_t T, int64_t K, int nq, int nkv, int d, int64_t batch,
         int64_t cache_size, const std::vector<float>& inv_freq, float concentration, uintptr_t s) {
        if (static_cast<int>(inv_freq.size()) * 2 != d)
          throw py::value_error("inv_freq must hold head_dim/2 floats, got " + std::to_string(inv_freq.size()));
        check(gptoss_linear_qkv_rope_append_bf16(
            ptr<const void>(x), ptr<const void>(weight), ptr<const void>(bias), ptr<const int32_t>(seq_ids),
            ptr<const int32_t>(positions), ptr<void>(q_out), ptr<void>(k_cache), ptr<void>(v_cache), T, K, nq, nkv, d,
            batch, cache_size, inv_freq.data(), concentration, stream(s)));
      },
      py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("seq_ids"), py::arg("positions"), py::arg("q_out"),
      py::arg("k_cache"), py::arg("v_cache"), py::arg("T"), py::arg("K"), py::arg("num_q_heads"),
      py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("batch"), py::arg("cache_size"), py::arg("inv_freq"),
      py::arg("concentration"), py::arg("stream"));
  m.attr("linear_bf16_max_tokens") = gptoss_linear_bf16_max_tokens();
  m.def("argmax_f32_workspace_size", [](int64_t B, int64_t V) { return gptoss_argmax_f32_workspace_size(B, V); },
        py::arg("B"), py::arg("V"));
  m.def(
      "argmax_f32",
      [](uintptr_t logits, int64_t B, int64_t V, uintptr_t out, uintptr_t workspace, size_t workspace_bytes,
         uintptr_t s) {
        check(gptoss_argmax_f32(ptr<const float>(logits), B, V, ptr<int64_t>(out), ptr<void>(workspace),
                                workspace_bytes, stream(s)));
      },
      py::arg("logits"), py::arg("B"), py::arg("V"), py::arg("out"), py::arg("workspace"),
      py::arg("workspace_bytes"), py::arg("stream"));

  py::module_ host = m.attr("host").cast<py::module_>();
  namespace d = gptoss::dense;
  host.def("dense_bf16_round", [](py::array_t<float, py::array::c_style> v) {
    py::array_t<float> out(v.request().shape);
    const float* in = v.data();
    float* o = out.mutable_data();
    for (py::ssize_t i = 0; i < v.size(); ++i) o[i] = d::bf16_round(in[i]);
    return out;
  });
  // The kernel's arithmetic on the host: x, residual (or None), weight float32 holding bf16 values
  // (weight any float32) -> (y before its final bf16 rounding is applied: rounded here too, h).
  host.def(
      "dense_rms_norm",
      [](py::array_t<float, py::array::c_style> x, py::object residual, py::array_t<float, py::array::c_style> w,
         float eps) {
        if (x.ndim() != 2) throw py::value_error("x must be [T, H]");
        const int64_t T = x.shape(0), H = x.shape(1);
        if (w.ndim() != 1 || w.shape(0) != H) throw py::value_error("weight must be [H]");
        py::array_t<float, py::array::c_style> r;
        const bool has_r = !residual.is_none();
        if (has_r) {
          r = residual.cast<py::array_t<float, py::array::c_style>>();
          if (r.ndim() != 2 || r.shape(0) != T || r.shape(1) != H) throw py::value_error("residual must be [T, H]");
        }
        py::array_t<float> y({T, H}), h({T, H});
        float* yo = y.mutable_data();
        float* ho = h.mutable_data();
        for (int64_t t = 0; t < T; ++t) {
          float ss = 0.f;
          for (int64_t i = 0; i < H; ++i) {
            const float xv = x.data()[t * H + i];
            const float hv = has_r ? d::residual_add(xv, r.data()[t * H + i]) : xv;
            ho[t * H + i] = hv;
            ss = std::fma(hv, hv, ss);
          }
          const float inv = d::rms_inv(ss, static_cast<int>(H), eps);
          for (int64_t i = 0; i < H; ++i) yo[t * H + i] = d::bf16_round(d::rms_apply(ho[t * H + i], inv, w.data()[i]));
        }
        return py::make_tuple(y, h);
      },
      py::arg("x"), py::arg("residual"), py::arg("weight"), py::arg("eps"));
  // The GEMV's operand layout, simulated: for each lane and register, the real k the kernel puts
  // in each PTX m16n8k16 fragment position. Returns int32 [2 mmas, 32 lanes, 4 positions] for A
  // (columns 2q, 2q+1, 2q+8, 2q+9 of row g) and for B (rows 2q, 2q+1, 2q+8, 2q+9 of column g),
  // plus the kernel's chunk offset per lane: (a_k, b_k, chunk_k, w_row0, w_row1, x_token, c_row, c_token).
  host.def("dense_gemv_layout", []() {
    py::array_t<int32_t> ak({2, 32, 4}), bk({2, 32, 4}), chunk(32), wr0(32), wr1(32), xt(32), cr({32, 4}), ct({32, 4});
    for (int m = 0; m < 2; ++m)
      for (int lane = 0; lane < 32; ++lane) {
        const int q = lane & 3;
        const int cols[4] = {2 * q, 2 * q + 1, 2 * q + 8, 2 * q + 9};
        for (int p = 0; p < 4; ++p) {
          // A: the kernel passes chunk words 2m (cols 2q, 2q+1) and 2m+1 (cols 2q+8, 2q+9); word i
          // of a 16-byte chunk holds elements 2i, 2i+1 of the chunk, so element (p&1) of word
          // 2m + (p>>1) -> real k offset chunk_k + 2 * (2m + (p >> 1)) + (p & 1).
          const int real = d::gemv_chunk_k(lane) + 2 * (2 * m + (p >> 1)) + (p & 1);
          ak.mutable_at(m, lane, p) = real;
          bk.mutable_at(m, lane, p) = real;  // B gets the same words of the x chunk
          // what the layout contract says it must be
          if (d::gemv_fragment_k(q, m, cols[p]) != real) throw std::runtime_error("gemv layout mismatch");
        }
        if (m == 0) {
          chunk.mutable_at(lane) = d::gemv_chunk_k(lane);
          wr0.mutable_at(lane) = d::gemv_w_row(lane, 0);
          wr1.mutable_at(lane) = d::gemv_w_row(lane, 1);
          xt.mutable_at(lane) = d::gemv_x_token(lane);
          for (int c = 0; c < 4; ++c) {
            cr.mutable_at(lane, c) = d::gemv_c_row(lane, c);
            ct.mutable_at(lane, c) = d::gemv_c_token(lane, c);
          }
        }
      }
    return py::make_tuple(ak, bk, chunk, wr0, wr1, xt, cr, ct);
  });
  // The fused QKV + RoPE GEMV's row map (gptoss::dense::qkv_rope_row): int64 [blocks, 16], the QKV
  // row each block's local W row computes.
  host.def(
      "dense_qkv_rope_rows",
      [](int64_t blocks) {
        if (blocks < 0) throw py::value_error("blocks must be >= 0");
        py::array_t<int64_t> rows({blocks, int64_t{16}});
        for (int64_t b = 0; b < blocks; ++b)
          for (int r = 0; r < 16; ++r) rows.mutable_at(b, r) = d::qkv_rope_row(b, r);
        return rows;
      },
      py::arg("blocks"));
  // The argmax order of the kernels (gptoss::dense::argmax_better), applied in their order:
  // slices of `slice` elements, then the slices' winners. float32 [B, V] -> int64 [B].
  host.def(
      "dense_argmax",
      [](py::array_t<float, py::array::c_style> logits, int64_t slice) {
        if (logits.ndim() != 2 || logits.shape(1) < 1) throw py::value_error("logits must be [B, V], V >= 1");
        if (slice < 1) throw py::value_error("slice must be >= 1");
        const int64_t B = logits.shape(0), V = logits.shape(1);
        py::array_t<int64_t> out(B);
        for (int64_t b = 0; b < B; ++b) {
          const float* row = logits.data(b, 0);
          float bv = -INFINITY;
          int64_t bi = INT64_MAX;
          for (int64_t s0 = 0; s0 < V; s0 += slice) {
            float sv = -INFINITY;
            int64_t si = INT64_MAX;
            for (int64_t j = s0; j < std::min(V, s0 + slice); ++j)
              if (d::argmax_better(row[j], j, sv, si)) {
                sv = row[j];
                si = j;
              }
            if (d::argmax_better(sv, si, bv, bi)) {
              bv = sv;
              bi = si;
            }
          }
          out.mutable_at(b) = bi;
        }
        return out;
      },
      py::arg("logits"), py::arg("slice") = 8192);
}
