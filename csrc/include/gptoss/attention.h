/* Decode attention over the KV cache with sinks, sliding window and GQA (spec §4.2 steps 4-7).
 * KV-cache layout: see gptoss/rope.h (bf16 [batch, cache_size, num_kv_heads, head_dim], position
 * p in slot p mod cache_size). */
#ifndef GPTOSS_ATTENTION_H_
#define GPTOSS_ATTENTION_H_
#include "gptoss/common.h"
#include "gptoss/rope.h" /* the RoPE + KV-cache writers of the same decode step */

/* Number of key splits per (sequence, KV head) the decode kernel's grid holds, and the workspace
 * it needs for the split partials (0 bytes when it holds one split). Both depend only on the sizes,
 * never on the device-side lengths, so a captured CUDA graph stays valid for any cache_seqlens.
 * sliding_window: 0 = full attention, else W (keys including the current one). */
GPTOSS_API int gptoss_attention_decode_num_splits(int64_t batch, int64_t cache_size, int num_q_heads,
                                                  int num_kv_heads, int head_dim, int sliding_window);
/* The splits a sequence of `seqlen` positions actually uses (chosen on the device from
 * cache_seqlens; <= the grid's splits): the work of a step follows the lengths, not cache_size.
 * The other CTAs of the grid exit at once. */
GPTOSS_API int gptoss_attention_decode_splits_used(int64_t batch, int64_t cache_size, int num_q_heads,
                                                   int num_kv_heads, int head_dim, int sliding_window,
                                                   int64_t seqlen);
GPTOSS_API size_t gptoss_attention_decode_workspace_size(int64_t batch, int64_t cache_size, int num_q_heads,
                                                         int num_kv_heads, int head_dim, int sliding_window);

/* One new token per sequence against the cache (already holding that token's K/V).
 *   q             : bf16 [batch, num_q_heads, head_dim]  (rotated; position L_b - 1)
 *   k_cache,v_cache: bf16 [batch, cache_size, num_kv_heads, head_dim]
 *   cache_seqlens : int32 [batch], L_b = positions written including the new token (device memory)
 *   sinks         : bf16 [num_q_heads] (the learned sink logits S_h, unscaled)
 *   out           : bf16 [batch, num_q_heads, head_dim]
 *   workspace     : device memory of gptoss_attention_decode_workspace_size(...) bytes (may be
 *                   NULL when that is 0), 16-byte aligned; clobbered.
 * The query at position L-1 sees positions max(0, L-W, L-cache_size)..L-1 (W = sliding_window,
 * or unbounded when 0); query head h uses KV head h / (num_q_heads / num_kv_heads);
 * logits = sm_scale <q, k>; the sink joins the softmax denominator only. L_b <= 0 gives zeros.
 * Supported: head_dim 64, num_q_heads = 8 num_kv_heads, cache_size < 2^31. fp32 math. */
GPTOSS_API gptoss_status gptoss_attention_decode_bf16(const void* q, const void* k_cache, const void* v_cache,
                                                      const int32_t* cache_seqlens, const void* sinks, void* out,
                                                      void* workspace, size_t workspace_bytes, int64_t batch,
                                                      int64_t cache_size, int num_q_heads, int num_kv_heads,
                                                      int head_dim, int sliding_window, float sm_scale,
                                                      cudaStream_t stream);

/* How the splits are merged: with 2..8 splits on sm_90 (gptoss/arch.h), the splits of one
 * (sequence, KV head) run as a thread-block cluster and merge through distributed shared memory
 * (one kernel; the workspace is then unused, but still required: a refused cluster launch falls
 * back to the second kernel); with more, and below sm_90 always, a second kernel merges them from
 * the workspace. Same bits either way.
 * The same with an explicit kernel choice: variant 0 = the library's default, 1 = fp32 SIMT
 * (q.k, softmax and p.v all in fp32 FMAs), 2 = tensor cores (mma.sync bf16 x bf16 -> fp32; P is
 * rounded to bf16 before P.V); OR GPTOSS_ATTENTION_DECODE_NO_CLUSTER into it to merge with the
 * second kernel whatever the split count (for tests and benchmarks). Same workspace, same split
 * plan. */
#define GPTOSS_ATTENTION_DECODE_NO_CLUSTER 16
GPTOSS_API gptoss_status gptoss_attention_decode_bf16_variant(
    const void* q, const void* k_cache, const void* v_cache, const int32_t* cache_seqlens, const void* sinks,
    void* out, void* workspace, size_t workspace_bytes, int64_t batch, int64_t cache_size, int num_q_heads,
    int num_kv_heads, int head_dim, int sliding_window, float sm_scale, int variant, cudaStream_t stream);

#endif /* GPTOSS_ATTENTION_H_ */
