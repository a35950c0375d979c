/* MXFP4 mixture of experts, decode regime (few routed rows T*k): weight-streaming GEMVs on the
 * tensor cores, each selected expert's bytes read once per call.
 *
 * out[t] = sum_j w[t,j] * (W2[e] swiglu(W1[e] x[t] + b1[e]) + b2[e]),  e = topk_ids[t,j]
 *
 * Three launches on `stream`, no host synchronization (CUDA-graph capturable), no allocation:
 *   1. mlp1    : per (selected expert, 16 gate/linear row pairs): z = W1 x + b1 for every routed
 *                row (t, j) of that expert, act[t*k+j, :] = swiglu(z)               bf16 [T*k, I]
 *   2. mlp2    : per (selected expert, 32 output rows): y[t*k+j, :] = w[t,j] * (W2 act + b2)
 *                                                                                fp32 [T*k, H]
 *   3. combine : out[t] = sum_{j = 0..k-1} y[t*k+j] in slot order (fp32), bf16.
 * The GEMV launches are one wave of resident blocks; each block finds the distinct selected
 * experts from topk_ids itself and takes (expert, row tile) items in a grid-stride loop, so
 * unselected experts cost nothing and the work spreads over all SMs whatever the routing.
 * Every kernel is launched with programmatic dependent launch (sm_90: it may start while the
 * previous kernel drains and waits for its results; see gptoss_set_pdl in gptoss/common.h; below
 * sm_90, ordinary launches: gptoss/arch.h).
 * Deterministic: no float atomics; two runs give identical bits.
 * Tokens are processed in chunks of GPTOSS_MOE_DECODE_MAX_ROUTED_ROWS / k tokens (the launcher
 * loops; experts chosen in several chunks are read once per chunk). The op routes large T*k to the
 * prefill regime (gptoss/moe_prefill.h).
 *
 * Shapes (device pointers): x bf16 [T,H]; topk_ids int32 [T,k]; topk_weights f32 [T,k];
 * w1_blocks uint8 [E,2I,H/32,16], w1_scales uint8 [E,2I,H/32], w1_bias bf16 [E,2I] (gate row 2j,
 * linear row 2j+1); w2_blocks [E,H,I/32,16], w2_scales [E,H,I/32], w2_bias bf16 [E,H]; out bf16 [T,H].
 * Requirements: H, I positive multiples of 32; 1 <= E <= GPTOSS_MOE_DECODE_MAX_EXPERTS;
 * 1 <= k <= 8; T >= 0; x, w1_blocks, w2_blocks and workspace 16-byte aligned, out 8-byte aligned.
 * Ids outside [0, E) are not read through: the rows of tokens holding one come out NaN.
 * workspace: gptoss_moe_mxfp4_decode_workspace_size(T, k, H, I) bytes (0 when T == 0).
 */
#ifndef GPTOSS_MOE_H_
#define GPTOSS_MOE_H_
#include "gptoss/common.h"

#define GPTOSS_MOE_DECODE_MAX_ROUTED_ROWS 256 /* routed rows (t, j) per kernel chunk */
#define GPTOSS_MOE_DECODE_MAX_EXPERTS 4096
#define GPTOSS_MOE_DECODE_MAX_K 8

/* Bytes of workspace the call needs (act bf16 [n, I] then y fp32 [n, H], n = chunk tokens * k,
 * each part 256-byte aligned). Host-only. Returns 0 for invalid sizes. */
GPTOSS_API size_t gptoss_moe_mxfp4_decode_workspace_size(int64_t T, int64_t k, int64_t H, int64_t I);

GPTOSS_API gptoss_status gptoss_moe_mxfp4_decode(
    const void* x, const int32_t* topk_ids, const float* topk_weights,
    const uint8_t* w1_blocks, const uint8_t* w1_scales, const void* w1_bias,
    const uint8_t* w2_blocks, const uint8_t* w2_scales, const void* w2_bias,
    float swiglu_alpha, float swiglu_limit, void* out,
    int64_t T, int64_t H, int64_t I, int64_t E, int64_t k,
    void* workspace, size_t workspace_bytes, cudaStream_t stream);

/* The decode step's MoE fused with the residual add and RMSNorm that follow it: with m the
 * bf16 output gptoss_moe_mxfp4_decode would write, residual_out = bf16(residual + m) (may alias
 * residual: the residual stream updated in place) and norm_out = bf16(RMSNorm(residual_out) *
 * norm_weight) (eps as given; norm_weight bf16, or float32 when norm_weight_fp32). The same bits as
 * gptoss_moe_mxfp4_decode followed by gptoss_rms_norm_bf16, one kernel fewer (the combine does the
 * norm: one block per token). Other arguments, requirements and workspace as
 * gptoss_moe_mxfp4_decode; additionally H / 8 <= 1024 and residual, residual_out, norm_weight,
 * norm_out bf16 [T, H] ([H] for the weight), 16-byte aligned. */
GPTOSS_API gptoss_status gptoss_moe_mxfp4_decode_add_rms_norm(
    const void* x, const int32_t* topk_ids, const float* topk_weights,
    const uint8_t* w1_blocks, const uint8_t* w1_scales, const void* w1_bias,
    const uint8_t* w2_blocks, const uint8_t* w2_scales, const void* w2_bias,
    float swiglu_alpha, float swiglu_limit, const void* residual, void* residual_out, const void* norm_weight,
    int norm_weight_fp32, float eps, void* norm_out,
    int64_t T, int64_t H, int64_t I, int64_t E, int64_t k,
    void* workspace, size_t workspace_bytes, cudaStream_t stream);

#endif /* GPTOSS_MOE_H_ */
