/* Dense kernels between the big ones in a decode step: fused residual add + RMSNorm, and a
 * bf16 GEMV / skinny GEMM for small token counts (projections, unembedding). */
#ifndef GPTOSS_DENSE_H_
#define GPTOSS_DENSE_H_
#include "gptoss/common.h"

/* RMSNorm of T rows of H, optionally fused with the residual add (spec §4.2 step 1).
 *   x            : bf16 [T, H]
 *   residual     : bf16 [T, H] or NULL. With it, h = bf16(x + residual) (fp32 sum, one rounding)
 *                  is written to residual_out (which may alias residual: in-place residual
 *                  stream) and normalized; without it, h = x and residual_out is not touched.
 *   weight       : [H], bf16 (weight_fp32 = 0) or float32 (weight_fp32 = 1)
 *   out          : bf16 [T, H], y = bf16(h * rsqrt(mean(h^2) + eps) * weight), fp32 math.
 * H must be a positive multiple of 8; x, residual, residual_out, out 16-byte aligned (weight
 * 16-byte aligned too). T may be 0. out must not alias x or residual unless equal to them. */
GPTOSS_API gptoss_status gptoss_rms_norm_bf16(const void* x, const void* residual, const void* weight,
                                              int weight_fp32, void* out, void* residual_out, int64_t T,
                                              int64_t H, float eps, cudaStream_t stream);

/* Largest T gptoss_linear_bf16 accepts (callers use cuBLAS above it). */
GPTOSS_API int64_t gptoss_linear_bf16_max_tokens(void);

/* y = x W^T + b for a few tokens, fp32 accumulation, W read once (tensor-core GEMV).
 *   x    : bf16 [T, K]     weight : bf16 [N, K] (row-major, the nn.Linear layout)
 *   bias : bf16 [N] or NULL
 *   out  : [T, N], bf16 (out_fp32 = 0) or float32 (out_fp32 = 1); one rounding of the fp32 sum.
 * 1 <= T <= gptoss_linear_bf16_max_tokens() (T = 0 is a no-op), N >= 1, K a positive multiple
 * of 8; x and weight 16-byte aligned. Graph-safe; no workspace. */
GPTOSS_API gptoss_status gptoss_linear_bf16(const void* x, const void* weight, const void* bias, void* out,
                                            int out_fp32, int64_t T, int64_t N, int64_t K,
                                            cudaStream_t stream);

/* The decode step's QKV projection fused with RoPE and the KV-cache append (one kernel): the
 * GEMV of gptoss_linear_bf16 for qkv = x W^T + b, each value rounded to bf16 (exactly the qkv
 * that gptoss_linear_bf16 writes), then what gptoss_rope_cache_append_bf16 does with it: q
 * rotated into q_out, the rotated k and the v of token t into the caches at
 * [seq_ids[t], positions[t] mod cache_size] (a token whose seq_id is outside [0, batch) writes
 * q only). Bit-identical to gptoss_linear_bf16 followed by gptoss_rope_cache_append_bf16.
 *   x : bf16 [T, K]; weight : bf16 [(num_q_heads + 2 num_kv_heads) * 64, K]; bias : bf16 [N] or NULL
 *   seq_ids, positions : int32 [T]; q_out : bf16 [T, num_q_heads, 64]
 *   k_cache, v_cache : bf16 [batch, cache_size, num_kv_heads, 64]
 *   inv_freq : HOST float [32], concentration: as in gptoss/rope.h.
 * head_dim must be 64; 0 <= T <= 64; K a positive multiple of 8, at most 2^24; 1 <= num_q_heads,
 * num_kv_heads <= 4096; batch >= 0 (0: q only, the caches may be NULL); cache_size >= 1; x,
 * weight, q_out and the caches 16-byte aligned. Graph-safe; no workspace. */
GPTOSS_API gptoss_status gptoss_linear_qkv_rope_append_bf16(
    const void* x, const void* weight, const void* bias, const int32_t* seq_ids, const int32_t* positions, void* q_out,
    void* k_cache, void* v_cache, int64_t T, int64_t K, int num_q_heads, int num_kv_heads, int head_dim, int64_t batch,
    int64_t cache_size, const float* inv_freq, float concentration, cudaStream_t stream);

/* Greedy decoding: out[b] = argmax_v logits[b, v] (torch.argmax's order: NaN ranks highest,
 * ties go to the lower index), two passes over a caller-owned workspace.
 *   logits    : float32 [B, V]        out : int64 [B]
 *   workspace : gptoss_argmax_f32_workspace_size(B, V) bytes, 8-byte aligned.
 * B >= 0 (0 is a no-op), 1 <= V < 2^31. Graph-safe. */
GPTOSS_API size_t gptoss_argmax_f32_workspace_size(int64_t B, int64_t V);
GPTOSS_API gptoss_status gptoss_argmax_f32(const float* logits, int64_t B, int64_t V, int64_t* out,
                                           void* workspace, size_t workspace_bytes, cudaStream_t stream);

#endif /* GPTOSS_DENSE_H_ */
