// gptoss-kernels through its C ABI, without Python or torch: MXFP4 MoE and decode attention on
// device buffers, each checked against a small CPU computation in this file.
//
// Build: bash examples/c_api/build.sh (links -lgptoss_kernels and the CUDA runtime).
// Run: ./demo   -> prints the relative error of each op, exits 0 when all are within tolerance,
//                  1 on a wrong result, 2 when no GPU is usable (the message says why).
// GPTOSS_DEMO_DUMP=DIR ./demo also writes every input and CPU expectation to DIR/<name>.bin (raw,
// little-endian) before touching the GPU, so tests/test_c_api_example.py checks this file's CPU
// math against gptoss_kernels.reference on a machine without a GPU.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "gptoss/gptoss.h"

namespace {

#define CUDA_OK(call)                                                                      \
  do {                                                                                     \
    cudaError_t e_ = (call);                                                               \
    if (e_ != cudaSuccess) {                                                               \
      std::fprintf(stderr, "%s failed: %s\n", #call, cudaGetErrorString(e_));             \
      std::exit(2);                                                                        \
    }                                                                                      \
  } while (0)

#define GPTOSS_OK_OR_DIE(call)                                                             \
  do {                                                                                     \
    gptoss_status s_ = (call);                                                             \
    if (s_ != GPTOSS_OK) {                                                                 \
      std::fprintf(stderr, "%s failed (%d): %s\n", #call, int(s_), gptoss_last_error_message()); \
      std::exit(s_ == GPTOSS_ERROR_CUDA ? 2 : 1);                                          \
    }                                                                                      \
  } while (0)

uint64_t g_rng = 0x9E3779B97F4A7C15ull;
uint32_t next_u32() {  // xorshift64*
  g_rng ^= g_rng >> 12; g_rng ^= g_rng << 25; g_rng ^= g_rng >> 27;
  return uint32_t((g_rng * 0x2545F4914F6CDD1Dull) >> 32);
}
float uniform(float lo, float hi) { return lo + (hi - lo) * (next_u32() / 4294967296.0f); }

float bf16_round(float v) { return __bfloat162float(__float2bfloat16(v)); }

std::vector<__nv_bfloat16> to_bf16(const std::vector<float>& v) {
  std::vector<__nv_bfloat16> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = __float2bfloat16(v[i]);
  return out;
}

template <typename T>
T* upload(const std::vector<T>& host) {
  T* dev = nullptr;
  CUDA_OK(cudaMalloc(&dev, host.size() * sizeof(T) + 16));
  CUDA_OK(cudaMemcpy(dev, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
  return dev;
}

// MXFP4 element (spec §3): low nibble = even element, value LUT[code] * 2^(scale - 127).
float mxfp4(const std::vector<uint8_t>& blocks, const std::vector<uint8_t>& scales, size_t row, size_t k, size_t K) {
  static const float lut[16] = {0, .5f, 1, 1.5f, 2, 3, 4, 6, -0.f, -.5f, -1, -1.5f, -2, -3, -4, -6};
  const uint8_t byte = blocks[row * (K / 2) + k / 2];
  const uint8_t code = (k & 1) ? (byte >> 4) : (byte & 0xF);
  return std::ldexp(lut[code], int(scales[row * (K / 32) + k / 32]) - 127);
}

template <typename T>
void dump(const char* name, const std::vector<T>& v) {
  const char* dir = std::getenv("GPTOSS_DEMO_DUMP");
  if (!dir) return;
  const std::string path = std::string(dir) + "/" + name + ".bin";
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f || std::fwrite(v.data(), sizeof(T), v.size(), f) != v.size()) {
    std::fprintf(stderr, "cannot write %s\n", path.c_str());
    std::exit(1);
  }
  std::fclose(f);
}

double rel_err(const std::vector<float>& got, const std::vector<float>& want) {
  double num = 0, den = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (!std::isfinite(got[i])) return INFINITY;
    num += (got[i] - want[i]) * double(got[i] - want[i]);
    den += double(want[i]) * want[i];
  }
  return std::sqrt(num / (den > 0 ? den : 1));
}

std::vector<float> download_bf16(const void* dev, size_t n) {
  std::vector<__nv_bfloat16> h(n);
  CUDA_OK(cudaMemcpy(h.data(), dev, n * 2, cudaMemcpyDeviceToHost));
  std::vector<float> out(n);
  for (size_t i = 0; i < n; ++i) out[i] = __bfloat162float(h[i]);
  return out;
}

// ---------------------------------------------------------------------------------------------
double run_moe(cudaStream_t stream) {
  const int64_t T = 3, H = 256, I = 128, E = 8, k = 4;
  std::vector<float> x(T * H), b1(E * 2 * I), b2(E * H), w(T * k);
  for (auto& v : x) v = bf16_round(uniform(-1, 1));
  for (auto& v : b1) v = bf16_round(uniform(-.1f, .1f));
  for (auto& v : b2) v = bf16_round(uniform(-.1f, .1f));
  std::vector<uint8_t> w1b(E * 2 * I * H / 2), w1s(E * 2 * I * H / 32), w2b(E * H * I / 2), w2s(E * H * I / 32);
  for (auto& v : w1b) v = uint8_t(next_u32());
  for (auto& v : w2b) v = uint8_t(next_u32());
  for (auto& v : w1s) v = uint8_t(118 + next_u32() % 4);
  for (auto& v : w2s) v = uint8_t(118 + next_u32() % 4);
  std::vector<int32_t> ids(T * k);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < k; ++j) ids[t * k + j] = int32_t((t + 3 * j) % E);  // distinct per token
  for (int64_t t = 0; t < T; ++t) {
    float z = 0;
    for (int64_t j = 0; j < k; ++j) z += (w[t * k + j] = uniform(0.1f, 1.f));
    for (int64_t j = 0; j < k; ++j) w[t * k + j] /= z;
  }

  // CPU: out[t] = sum_j w * (W2 swiglu(W1 x + b1) + b2), fp32
  std::vector<float> want(T * H, 0.f);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < k; ++j) {
      const int64_t e = ids[t * k + j];
      std::vector<float> act(I);
      for (int64_t u = 0; u < I; ++u) {
        float g = b1[e * 2 * I + 2 * u], l = b1[e * 2 * I + 2 * u + 1];
        for (int64_t c = 0; c < H; ++c) {
          g += mxfp4(w1b, w1s, e * 2 * I + 2 * u, c, H) * x[t * H + c];
          l += mxfp4(w1b, w1s, e * 2 * I + 2 * u + 1, c, H) * x[t * H + c];
        }
        g = std::fmin(g, 7.f);
        l = std::fmax(std::fmin(l, 7.f), -7.f);
        act[u] = g / (1.f + std::exp(-1.702f * g)) * (l + 1.f);
      }
      for (int64_t r = 0; r < H; ++r) {
        float y = b2[e * H + r];
        for (int64_t u = 0; u < I; ++u) y += mxfp4(w2b, w2s, e * H + r, u, I) * act[u];
        want[t * H + r] += w[t * k + j] * y;
      }
    }

  dump("moe_x", x); dump("moe_ids", ids); dump("moe_w", w); dump("moe_w1b", w1b); dump("moe_w1s", w1s);
  dump("moe_b1", b1); dump("moe_w2b", w2b); dump("moe_w2s", w2s); dump("moe_b2", b2); dump("moe_want", want);
  if (std::getenv("GPTOSS_DEMO_DUMP_ONLY")) return 0.0;
  auto* d_x = upload(to_bf16(x));
  auto* d_ids = upload(ids);
  auto* d_w = upload(w);
  auto* d_w1b = upload(w1b);
  auto* d_w1s = upload(w1s);
  auto* d_b1 = upload(to_bf16(b1));
  auto* d_w2b = upload(w2b);
  auto* d_w2s = upload(w2s);
  auto* d_b2 = upload(to_bf16(b2));
  void* d_out = nullptr;
  CUDA_OK(cudaMalloc(&d_out, T * H * 2));
  const size_t ws_bytes = gptoss_moe_mxfp4_decode_workspace_size(T, k, H, I);
  void* d_ws = nullptr;
  CUDA_OK(cudaMalloc(&d_ws, ws_bytes ? ws_bytes : 16));  // the caller owns every buffer
  GPTOSS_OK_OR_DIE(gptoss_moe_mxfp4_decode(d_x, d_ids, d_w, d_w1b, d_w1s, d_b1, d_w2b, d_w2s, d_b2, 1.702f, 7.0f,
                                           d_out, T, H, I, E, k, d_ws, ws_bytes, stream));
  CUDA_OK(cudaStreamSynchronize(stream));
  const double err = rel_err(download_bf16(d_out, T * H), want);
  for (void* p : {(void*)d_x, (void*)d_ids, (void*)d_w, (void*)d_w1b, (void*)d_w1s, (void*)d_b1, (void*)d_w2b,
                  (void*)d_w2s, (void*)d_b2, d_out, d_ws})
    cudaFree(p);
  return err;
}

// ---------------------------------------------------------------------------------------------
double run_attention_decode(cudaStream_t stream, int window) {
  const int64_t B = 2, S = 300, nq = 64, nkv = 8, d = 64;
  const std::vector<int32_t> lens = {1, 257};
  std::vector<float> q(B * nq * d), kc(B * S * nkv * d), vc(B * S * nkv * d), sinks(nq);
  for (auto& v : q) v = bf16_round(uniform(-1, 1));
  for (auto& v : kc) v = bf16_round(uniform(-1, 1));
  for (auto& v : vc) v = bf16_round(uniform(-1, 1));
  for (auto& v : sinks) v = bf16_round(uniform(-3, 3));
  const float scale = 0.125f;
  std::vector<float> want(B * nq * d, 0.f);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < nq; ++h) {
      const int64_t g = h / (nq / nkv), L = lens[b];
      const int64_t first = window > 0 && L > window ? L - window : 0;
      std::vector<float> s(L - first);
      float m = sinks[h];
      for (int64_t p = first; p < L; ++p) {
        float dot = 0;
        for (int64_t c = 0; c < d; ++c) dot += q[(b * nq + h) * d + c] * kc[((b * S + p % S) * nkv + g) * d + c];
        s[p - first] = dot * scale;
        m = std::fmax(m, s[p - first]);
      }
      float z = std::exp(sinks[h] - m);  // the sink joins the denominator only
      for (auto& v : s) z += (v = std::exp(v - m));
      for (int64_t p = first; p < L; ++p)
        for (int64_t c = 0; c < d; ++c)
          want[(b * nq + h) * d + c] += s[p - first] / z * vc[((b * S + p % S) * nkv + g) * d + c];
    }
  const std::string tag = "attn_w" + std::to_string(window) + "_";
  dump((tag + "q").c_str(), q); dump((tag + "k").c_str(), kc); dump((tag + "v").c_str(), vc);
  dump((tag + "sinks").c_str(), sinks); dump((tag + "lens").c_str(), lens); dump((tag + "want").c_str(), want);
  if (std::getenv("GPTOSS_DEMO_DUMP_ONLY")) return 0.0;
  auto* d_q = upload(to_bf16(q));
  auto* d_k = upload(to_bf16(kc));
  auto* d_v = upload(to_bf16(vc));
  auto* d_s = upload(to_bf16(sinks));
  auto* d_len = upload(lens);
  void* d_out = nullptr;
  CUDA_OK(cudaMalloc(&d_out, B * nq * d * 2));
  const size_t ws_bytes = gptoss_attention_decode_workspace_size(B, S, nq, nkv, d, window);
  void* d_ws = nullptr;
  CUDA_OK(cudaMalloc(&d_ws, ws_bytes ? ws_bytes : 16));
  GPTOSS_OK_OR_DIE(gptoss_attention_decode_bf16(d_q, d_k, d_v, d_len, d_s, d_out, d_ws, ws_bytes, B, S, nq, nkv, d,
                                                window, scale, stream));
  CUDA_OK(cudaStreamSynchronize(stream));
  const double err = rel_err(download_bf16(d_out, B * nq * d), want);
  for (void* p : {(void*)d_q, (void*)d_k, (void*)d_v, (void*)d_s, (void*)d_len, d_out, d_ws}) cudaFree(p);
  return err;
}

}  // namespace

int main() {
  if (gptoss_abi_version() != GPTOSS_ABI_VERSION) {
    std::fprintf(stderr, "ABI mismatch: library %d, header %d\n", gptoss_abi_version(), GPTOSS_ABI_VERSION);
    return 1;
  }
  std::printf("gptoss-kernels %s (ABI %d, CUDA %d, archs %s)\n", gptoss_version(), gptoss_abi_version(),
              gptoss_cuda_build_version(), gptoss_cuda_archs());
  int devices = 0;
  if (std::getenv("GPTOSS_DEMO_DUMP_ONLY")) {  // CPU expectations only (tests without a GPU)
    run_moe(nullptr);
    run_attention_decode(nullptr, 0);
    run_attention_decode(nullptr, 128);
    return 0;
  }
  if (gptoss_device_count(&devices) != GPTOSS_OK || devices == 0) {
    std::fprintf(stderr, "no usable GPU: %s\n", gptoss_last_error_message());
    return 2;
  }
  cudaStream_t stream;
  CUDA_OK(cudaStreamCreate(&stream));
  // bf16 inputs and outputs, fp32 math: 1e-2 relative (Frobenius) error is generous
  const double tol = 1e-2;
  const double e_moe = run_moe(stream);
  const double e_full = run_attention_decode(stream, 0);
  const double e_win = run_attention_decode(stream, 128);
  std::printf("moe_mxfp4_decode       rel err %.2e\n", e_moe);
  std::printf("attention_decode full  rel err %.2e\n", e_full);
  std::printf("attention_decode w=128 rel err %.2e\n", e_win);
  CUDA_OK(cudaStreamDestroy(stream));
  const bool ok = e_moe < tol && e_full < tol && e_win < tol;
  std::printf("%s\n", ok ? "OK" : "FAILED");
  return ok ? 0 : 1;
}
