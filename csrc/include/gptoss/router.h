/* MoE router (spec §4.3 steps 2-4) and the grouping of routed rows by expert. */
#ifndef GPTOSS_ROUTER_H_
#define GPTOSS_ROUTER_H_
#include "gptoss/common.h"

/* How gptoss_router_topk_bf16 computes (AUTO picks from T, E, H; the others are for tests and
 * benchmarks, and give the same results):
 *   FUSED: one kernel; each block takes 64 tokens and ALL experts (mma.sync bf16 -> fp32, x and
 *          weight tiles streamed through shared memory), then top-k + softmax in its epilogue.
 *          Best for large T (every block re-reads the whole E x H weight from L2).
 *   SPLIT: two kernels; the first spreads (64-token tile, 32-expert group, slice of H) over many
 *          blocks and writes fp32 partial logits to the workspace, the second (one warp per
 *          token) sums the slices + bias and selects. Best for small T: the E x H weight is
 *          read once, by ~hundreds of blocks (T = 1: about a weight read at memory bandwidth
 *          plus two launch latencies; at most 16 slices of H). Deterministic: no atomics.
 *   CLUSTER: one kernel for E <= 128 (AUTO's choice for T <= 64, the decode step, on sm_90;
 *          below sm_90 (no thread-block clusters, gptoss/arch.h) AUTO takes SPLIT there, and
 *          CLUSTER returns GPTOSS_ERROR_UNSUPPORTED): a cluster of 8
 *          blocks per 64-token tile, each block all experts over 1/8 of H; the 8 partial logit
 *          tiles are summed in a fixed order through distributed shared memory, then selected.
 *          No workspace; the weight read once by 8 blocks per tile.
 * Every path is deterministic (no atomics); they add the H slices in different orders, so logits
 * within an ulp of a tie may select differently between paths. */
#define GPTOSS_ROUTER_PATH_AUTO 0
#define GPTOSS_ROUTER_PATH_FUSED 1
#define GPTOSS_ROUTER_PATH_SPLIT 2
#define GPTOSS_ROUTER_PATH_CLUSTER 3

/* Bytes of workspace gptoss_router_topk_bf16 needs for these sizes and path (0 for FUSED).
 * Depends only on its arguments (not on the device): for AUTO, enough for the path any device
 * takes (SPLIT's where AUTO may take it: for T <= 64 on sm_90 the CLUSTER path leaves it unused). */
GPTOSS_API size_t gptoss_router_topk_workspace_size(int64_t T, int64_t H, int64_t E, int k, int path);

/* Router logits (fp32 accumulation), top-k and softmax over the k selected logits.
 *   x       : bf16 [T, H]   weight : bf16 [E, H]   bias : bf16 [E]
 *   topk_ids     : int32   [T, k]  experts in descending logit order, ties to the LOWER expert
 *                                  index; a NaN logit ranks below every number (it ties with
 *                                  -inf), so ids are always in [0, E).
 *   topk_weights : float32 [T, k]  softmax of the k selected logits with torch.softmax's rules:
 *                                  all NaN if a selected logit is NaN or +inf, or if all are -inf.
 * T >= 0; H a positive multiple of 8; 1 <= E <= 256; 1 <= k <= min(E, 8). x and weight 16-byte
 * aligned. workspace: at least gptoss_router_topk_workspace_size(T, H, E, k, path) bytes,
 * 16-byte aligned (may be NULL when that is 0). No state is kept between calls (graph-safe). */
GPTOSS_API gptoss_status gptoss_router_topk_bf16(const void* x, const void* weight, const void* bias,
                                                 int32_t* topk_ids, float* topk_weights, int64_t T,
                                                 int64_t H, int64_t E, int k, int path,
                                                 void* workspace, size_t workspace_bytes,
                                                 cudaStream_t stream);

/* The decode step's residual add + RMSNorm fused with the router (one kernel, the CLUSTER path;
 * below sm_90: gptoss_rms_norm_bf16, then the FUSED router: the same norm bits, the same top-k
 * up to the logits' summation order):
 *   residual_out = bf16(delta + residual)            (may alias residual: in-place residual stream)
 *   norm_out     = bf16(RMSNorm(residual_out) * norm_weight)   (eps; norm_weight bf16, or float32
 *                  when norm_weight_fp32) -- the bits of gptoss_rms_norm_bf16
 *   topk_ids, topk_weights = gptoss_router_topk_bf16(norm_out, weight, bias, k)
 *   delta, residual, residual_out, norm_out : bf16 [T, H]; weight bf16 [E, H]; bias bf16 [E].
 * 0 <= T <= gptoss_add_rms_norm_router_topk_max_tokens() (16); H a positive multiple of 8, at most
 * 8192; 1 <= E <= 128; 1 <= k <= min(E, 8). Pointers to rows and weights 16-byte aligned.
 * No workspace; graph-safe. */
GPTOSS_API int64_t gptoss_add_rms_norm_router_topk_max_tokens(void);
GPTOSS_API gptoss_status gptoss_add_rms_norm_router_topk_bf16(
    const void* delta, const void* residual, void* residual_out, const void* norm_weight, int norm_weight_fp32,
    float eps, void* norm_out, const void* weight, const void* bias, int32_t* topk_ids, float* topk_weights, int64_t T,
    int64_t H, int64_t E, int k, cudaStream_t stream);

/* Bytes of workspace gptoss_route needs for n_rows = T * k routed rows and E experts. */
GPTOSS_API size_t gptoss_route_workspace_size(int64_t n_rows, int64_t E);

/* Group routed rows by expert (= reference.route_metadata), with no host synchronization:
 *   topk_ids    : int32 [n_rows] (a [T, k] tensor read flat; row r = t*k + j)
 *   counts      : int32 [E]      rows routed to each expert
 *   offsets     : int32 [E+1]    exclusive prefix sum of counts (offsets[E] = rows counted)
 *   permutation : int32 [n_rows] row ids sorted by expert, stable (token order within an
 *                                expert): rows of expert e are permutation[offsets[e]:offsets[e+1]].
 * Rows whose id is outside [0, E) are not counted; the tail permutation[offsets[E]:] is -1.
 * Three small kernels (per-chunk histogram, scan, stable scatter); 1 <= E <= 256. */
GPTOSS_API gptoss_status gptoss_route(const int32_t* topk_ids, int64_t n_rows, int64_t E,
                                      int32_t* counts, int32_t* offsets, int32_t* permutation,
                                      void* workspace, size_t workspace_bytes, cudaStream_t stream);

#endif /* GPTOSS_ROUTER_H_ */
