/* RoPE with YaRN (spec §1.3) on the fused QKV projection, and the KV-cache writers.
 *
 * KV-cache layout (every function here and gptoss/attention.h): per layer k_cache, v_cache bf16
 * [batch, cache_size, num_kv_heads, head_dim]; position p of sequence b lives in slot
 * p mod cache_size (full layers: cache_size >= the longest sequence; sliding layers: a ring of
 * cache_size = window = 128 slots). Positions are 0-based and absolute.
 *
 * The rotation tables: the kernels compute cos/sin themselves from the head_dim/2 inverse
 * frequencies given in `inv_freq` (HOST memory, read during the call and passed to the kernel by
 * value, so the call is CUDA-graph safe) and the concentration c (both cos and sin are
 * multiplied by c). gptoss_yarn_inv_freq fills them from the YaRN parameters. The angle
 * t * inv_freq[j] is rounded to fp32 (as the spec says), then evaluated with a double-precision
 * argument reduction (accurate for every position up to 2^24). */
#ifndef GPTOSS_ROPE_H_
#define GPTOSS_ROPE_H_
#include "gptoss/common.h"

/* YaRN inverse frequencies and concentration (spec §1.3; gpt-oss: head_dim 64, theta 150000,
 * factor 32, beta_fast 32, beta_slow 1, original_context 4096). Host-only, no CUDA call.
 *   inv_freq_out : float [head_dim/2] (host);  concentration_out : float (host). */
GPTOSS_API gptoss_status gptoss_yarn_inv_freq(int head_dim, float theta, float factor, float beta_fast,
                                              float beta_slow, int original_context, float* inv_freq_out,
                                              float* concentration_out);

/* Split the fused QKV projection and rotate q and k (half-split / NeoX RoPE).
 *   qkv       : bf16 [T, (num_q_heads + 2 num_kv_heads) * head_dim]  (bias already added)
 *   positions : int32 [T]
 *   q_out     : bf16 [T, num_q_heads, head_dim];  k_out, v_out : bf16 [T, num_kv_heads, head_dim]
 * head_dim must be 64; all bf16 pointers 16-byte aligned. T may be 0. fp32 math. */
GPTOSS_API gptoss_status gptoss_rope_qkv_bf16(const void* qkv, const int32_t* positions, void* q_out, void* k_out,
                                              void* v_out, int64_t T, int num_q_heads, int num_kv_heads,
                                              int head_dim, const float* inv_freq, float concentration,
                                              cudaStream_t stream);

/* Fused decode/prefill step: rotate q into q_out and write the rotated k and the v of token t into
 * k_cache/v_cache[seq_ids[t], positions[t] mod cache_size]. One kernel.
 *   qkv : bf16 [T, (num_q_heads + 2 num_kv_heads) * head_dim]; seq_ids, positions : int32 [T]
 *   q_out : bf16 [T, num_q_heads, head_dim]; k_cache, v_cache : bf16 [batch, cache_size, num_kv_heads, head_dim]
 * A token whose seq_id is outside [0, batch) writes q_out only (nothing in the cache). */
GPTOSS_API gptoss_status gptoss_rope_cache_append_bf16(const void* qkv, const int32_t* seq_ids,
                                                       const int32_t* positions, void* q_out, void* k_cache,
                                                       void* v_cache, int64_t T, int num_q_heads,
                                                       int num_kv_heads, int head_dim, int64_t batch,
                                                       int64_t cache_size, const float* inv_freq,
                                                       float concentration, cudaStream_t stream);

/* Copy rows into the cache: k_cache[seq_ids[t], positions[t] mod cache_size] = k[t] (same for v).
 *   k, v : bf16 [T, num_kv_heads, head_dim]; seq_ids, positions : int32 [T].
 * head_dim * 2 bytes must be a multiple of 16; pointers 16-byte aligned. Out-of-range seq_ids are skipped. */
GPTOSS_API gptoss_status gptoss_cache_append_bf16(const void* k, const void* v, const int32_t* seq_ids,
                                                  const int32_t* positions, void* k_cache, void* v_cache,
                                                  int64_t T, int num_kv_heads, int head_dim, int64_t batch,
                                                  int64_t cache_size, cudaStream_t stream);

#endif /* GPTOSS_ROPE_H_ */
