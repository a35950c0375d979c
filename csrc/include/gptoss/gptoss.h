/* gptoss-kernels: the whole C ABI. Link with -lgptoss_kernels (the library's path:
 * python -c "import gptoss_kernels; print(gptoss_kernels.library_path())").
 * Compiles as C99 and C++; see common.h for the conventions every function follows. */
#ifndef GPTOSS_GPTOSS_H_
#define GPTOSS_GPTOSS_H_
#include "gptoss/common.h"
#include "gptoss/arch.h"
#include "gptoss/mxfp4.h"
#include "gptoss/router.h"
#include "gptoss/attention_prefill.h"
#include "gptoss/attention.h" /* includes gptoss/rope.h */
#include "gptoss/moe_prefill.h"
#include "gptoss/moe.h"
#include "gptoss/dense.h"
#endif /* GPTOSS_GPTOSS_H_ */
