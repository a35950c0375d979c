/* Prefill attention with learned sinks, causal / sliding-window mask, GQA, varlen and a KV-cache
 * prefix (spec §4.2 steps 4-7; Python op gptoss_kernels.attention_prefill). */
#ifndef GPTOSS_ATTENTION_PREFILL_H_
#define GPTOSS_ATTENTION_PREFILL_H_
#include "gptoss/common.h"

/* out[t, h, :] = sum_k p[h, t, k] v[k, h / group, :], p the sink softmax of
 * sm_scale * <q[t, h], k[k, h / group]> over the keys visible to t (spec §4.2).
 *
 *   q             bf16 [total_q, num_q_heads, head_dim]   the chunk's queries, packed over sequences
 *   k, v          bf16 [total_q, num_kv_heads, head_dim]  the chunk's own (rotated) keys / values
 *   sinks         bf16 [num_q_heads]                      one logit per head (not scaled)
 *   cu_seqlens_q  int32 [batch + 1]                       sequence b = rows cu[b] .. cu[b+1]-1
 *                                                         (non-decreasing, cu[batch] <= total_q)
 *   k_cache, v_cache bf16 [batch, cache_slots, num_kv_heads, head_dim] or NULL (then
 *                 cache_seqlens must be NULL and every p0_b = 0)
 *   cache_seqlens int32 [batch] or NULL: p0_b, the position of sequence b's first chunk row.
 *                 Keys at positions < p0_b are read from the cache (slot p % cache_slots), keys
 *                 >= p0_b from k/v. The cache must hold every needed position (p0_b - first
 *                 visible key <= cache_slots); this is not checked on the device.
 *   sliding_window 0 = full causal, else W > 0 keys including the query's own.
 *   out           bf16 [total_q, num_q_heads, head_dim]; rows of the chunk are written, rows past
 *                 cu[batch] are left alone.
 * Supported: head_dim == 64 and num_q_heads == 8 * num_kv_heads (gpt-oss: 64 / 8); other shapes
 * return GPTOSS_ERROR_UNSUPPORTED. Every pointer 16-byte aligned. The mma.sync kernel runs on
 * sm_80 and later; the wgmma kernel on sm_90a code on a 9.0 device only (gptoss/arch.h: asked
 * for elsewhere, GPTOSS_ERROR_UNSUPPORTED). No workspace; deterministic; CUDA-graph capturable
 * (no host sync). */
GPTOSS_API gptoss_status gptoss_attention_prefill_bf16(
    const void* q, const void* k, const void* v, const void* sinks, const int32_t* cu_seqlens_q,
    int32_t batch, int64_t total_q, int32_t num_q_heads, int32_t num_kv_heads, int32_t head_dim,
    const void* k_cache, const void* v_cache, const int32_t* cache_seqlens, int64_t cache_slots,
    int32_t sliding_window, float sm_scale, void* out, cudaStream_t stream);

/* Kernel choice for gptoss_attention_prefill_bf16_impl (the plain function uses AUTO). */
enum {
  GPTOSS_ATTENTION_PREFILL_AUTO = 0,  /* the library's choice for the shape and device */
  GPTOSS_ATTENTION_PREFILL_MMA = 1,   /* mma.sync m16n8k16 (HMMA) */
  GPTOSS_ATTENTION_PREFILL_WGMMA = 2  /* wgmma m64n64k16 (HGMMA, sm_90a) */
};
GPTOSS_API gptoss_status gptoss_attention_prefill_bf16_impl(
    const void* q, const void* k, const void* v, const void* sinks, const int32_t* cu_seqlens_q,
    int32_t batch, int64_t total_q, int32_t num_q_heads, int32_t num_kv_heads, int32_t head_dim,
    const void* k_cache, const void* v_cache, const int32_t* cache_seqlens, int64_t cache_slots,
    int32_t sliding_window, float sm_scale, void* out, int32_t impl, cudaStream_t stream);

#endif /* GPTOSS_ATTENTION_PREFILL_H_ */
