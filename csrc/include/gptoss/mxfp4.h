/* MXFP4 (OCP MX E2M1 elements, E8M0 scale per 32 elements) utilities. */
#ifndef GPTOSS_MXFP4_H_
#define GPTOSS_MXFP4_H_
#include "gptoss/common.h"

/* Dequantize an MXFP4 matrix to bf16.
 *   blocks : uint8 [rows, k/32, 16]  byte j of block g holds element 32g+2j (low nibble) and
 *                                    32g+2j+1 (high nibble); the checkpoint layout.
 *   scales : uint8 [rows, k/32]      E8M0: value 2^(s-127).
 *   out    : bf16  [rows, k]         row-major, written completely.
 * k must be a positive multiple of 32; blocks and out must be 16-byte aligned. rows may be 0.
 * Exact (every MXFP4 value with a finite scale is representable in bf16). */
GPTOSS_API gptoss_status gptoss_mxfp4_dequantize_bf16(const uint8_t* blocks, const uint8_t* scales,
                                                      void* out, int64_t rows, int64_t k,
                                                      cudaStream_t stream);

#endif /* GPTOSS_MXFP4_H_ */
