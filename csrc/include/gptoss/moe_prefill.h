/* MXFP4 mixture of experts, prefill regime (many routed rows): grouped GEMMs over experts.
 *
 * out[t] = sum_j w[t,j] * (W2[e] swiglu(W1[e] x[t] + b1[e]) + b2[e]),  e = topk_ids[t,j]
 *
 * Pipeline, all on `stream`, no host synchronization (CUDA-graph capturable):
 *   1. route   : counts[E], offsets[E+1], permutation[T*k] (layout of
 *                gptoss_kernels.reference.route_metadata: flat rows r = t*k+j stably sorted by
 *                expert) and the m-tile prefix tile_offsets[E+1] of the grouped GEMMs.
 *   2. mlp1    : act[p, :] = swiglu(W1[e] x[perm[p]/k] + b1[e])  bf16 [T*k, I], grouped order p.
 *   3. mlp2    : y[r, :] = w[r] * (W2[e] act[p] + b2[e])        bf16 [T*k, H], row r = perm[p].
 *   4. combine : out[t] = sum_{j=0..k-1} y[t*k+j] in slot order, fp32 sum, bf16 out.
 * Deterministic: no float atomics anywhere (the only atomics are integer counts in shared memory).
 *
 * Shapes (device pointers): x bf16 [T,H]; topk_ids int32 [T,k] in [0,E) (an id outside is not read
 * through: the rows of tokens holding one come out NaN, as in gptoss/moe.h); topk_weights f32 [T,k];
 * w1_blocks uint8 [E,2I,H/32,16], w1_scales uint8 [E,2I,H/32], w1_bias bf16 [E,2I] (gate row 2j,
 * linear row 2j+1); w2_blocks [E,H,I/32,16], w2_scales [E,H,I/32], w2_bias bf16 [E,H]; out bf16 [T,H].
 * Requirements: H, I multiples of 32; 1 <= E <= 256; 1 <= k <= 16; T*k < 2^31; x, out, blocks,
 * scales and workspace 16-byte aligned. T may be 0.
 * Scales: exact (ldexp) for scale bytes 0..254; byte 255 (2^128, in no real checkpoint) is not:
 * its E2M1 zeros give NaN and its 0.5 codes inf where the fp32 reference has 0 and 2^127 (the
 * decode kernels, gptoss/moe.h, are exact for every byte).
 * workspace: at least gptoss_moe_prefill_workspace_size(T,k,E,H,I) bytes, 256-byte aligned.
 */
#ifndef GPTOSS_MOE_PREFILL_H_
#define GPTOSS_MOE_PREFILL_H_
#include "gptoss/common.h"

/* Parts of the workspace (indices into the `offsets` array of ..._workspace_layout). */
enum {
  GPTOSS_MOE_WS_COUNTS = 0,       /* int32 [E]                                  */
  GPTOSS_MOE_WS_OFFSETS = 1,      /* int32 [E+1]                                */
  GPTOSS_MOE_WS_TILE_OFFSETS = 2, /* int32 [E+1]   m-tile prefix of the GEMMs    */
  GPTOSS_MOE_WS_PERM = 3,         /* int32 [T*k]                                */
  GPTOSS_MOE_WS_CHUNK_BASE = 4,   /* int32 [ceil(T*k/1024), E]  (grouping scratch) */
  GPTOSS_MOE_WS_ACT = 5,          /* bf16  [T*k, I]  grouped order              */
  GPTOSS_MOE_WS_Y = 6,            /* bf16  [T*k, H]  row r = t*k+j              */
  GPTOSS_MOE_WS_NUM_PARTS = 7
};

/* Kernel variant for the two GEMMs (all compute the same function). The wgmma variants run on
 * sm_90a code on a 9.0 device only (gptoss/arch.h); asked for elsewhere GPTOSS_ERROR_UNSUPPORTED.
 * Below sm_90 the GEMMs' shared memory (about 90 KB at H = I = 2880; 99 KB allowed on sm_86/89)
 * bounds H and I: larger ones return GPTOSS_ERROR_UNSUPPORTED with the sizes. */
enum {
  GPTOSS_MOE_PREFILL_AUTO = 0,        /* the default on every device (currently MMA_SYNC)   */
  GPTOSS_MOE_PREFILL_MMA_SYNC = 1,    /* mma.sync m16n8k16, tile 128 x 128                  */
  GPTOSS_MOE_PREFILL_WGMMA = 2,       /* wgmma (sm_90a), tile 128 x 192                     */
  GPTOSS_MOE_PREFILL_WGMMA_N128 = 3,  /* wgmma, tile 128 x 128                              */
  GPTOSS_MOE_PREFILL_WGMMA_N256 = 4   /* wgmma, tile 128 x 256                              */
};

/* Total workspace bytes; fills offsets[GPTOSS_MOE_WS_NUM_PARTS] (byte offsets, 256-aligned)
 * when `offsets` is not NULL. Host-only, no CUDA call. */
GPTOSS_API size_t gptoss_moe_prefill_workspace_layout(int64_t T, int64_t k, int64_t E, int64_t H, int64_t I,
                                                      size_t* offsets);
GPTOSS_API size_t gptoss_moe_prefill_workspace_size(int64_t T, int64_t k, int64_t E, int64_t H, int64_t I);

/* The whole op (steps 1-4). */
GPTOSS_API gptoss_status gptoss_moe_prefill_mxfp4(
    const void* x, const int32_t* topk_ids, const float* topk_weights,
    const uint8_t* w1_blocks, const uint8_t* w1_scales, const void* w1_bias,
    const uint8_t* w2_blocks, const uint8_t* w2_scales, const void* w2_bias,
    float swiglu_alpha, float swiglu_limit, void* out,
    int64_t T, int64_t H, int64_t I, int64_t E, int64_t k,
    void* workspace, size_t workspace_bytes, int variant, cudaStream_t stream);

/* The steps one at a time (for tests and debugging; same arguments, same workspace). `step` is
 * 1 (route), 2 (mlp1), 3 (mlp2) or 4 (combine); each step reads what the earlier ones wrote. */
GPTOSS_API gptoss_status gptoss_moe_prefill_step(
    int step, const void* x, const int32_t* topk_ids, const float* topk_weights,
    const uint8_t* w1_blocks, const uint8_t* w1_scales, const void* w1_bias,
    const uint8_t* w2_blocks, const uint8_t* w2_scales, const void* w2_bias,
    float swiglu_alpha, float swiglu_limit, void* out,
    int64_t T, int64_t H, int64_t I, int64_t E, int64_t k,
    void* workspace, size_t workspace_bytes, int variant, cudaStream_t stream);

#endif /* GPTOSS_MOE_PREFILL_H_ */
