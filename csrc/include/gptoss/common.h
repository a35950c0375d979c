/* gptoss-kernels C ABI: shared definitions.
 *
 * Conventions for every function in this ABI:
 *  - Pointers are device pointers unless said otherwise; bf16 tensors are passed as void*.
 *  - Work is enqueued on `stream` and the call returns at once; no function allocates memory,
 *    synchronizes the device, or keeps a pointer after it returns. Outputs and workspaces belong
 *    to the caller (see each family's *_workspace_size function where one is needed).
 *  - A function returns GPTOSS_OK, or an error code with a readable message available from
 *    gptoss_last_error_message() on the same thread until the next failing call.
 *  - ABI stability: GPTOSS_ABI_VERSION changes whenever an existing function's signature or
 *    meaning changes; new functions may be added without a change. Check gptoss_abi_version()
 *    at load time against the header you compiled with.
 */
#ifndef GPTOSS_COMMON_H_
#define GPTOSS_COMMON_H_

#include <stddef.h>
#include <stdint.h>
#include <cuda_runtime_api.h>

#ifdef __cplusplus
#define GPTOSS_EXTERN_C extern "C"
#else
#define GPTOSS_EXTERN_C
#endif
#define GPTOSS_API GPTOSS_EXTERN_C __attribute__((visibility("default")))

#define GPTOSS_ABI_VERSION 1

typedef enum gptoss_status {
  GPTOSS_OK = 0,
  GPTOSS_ERROR_INVALID_ARGUMENT = 1, /* a size, pointer or alignment is not accepted */
  GPTOSS_ERROR_CUDA = 2,             /* the CUDA runtime reported an error (message has its name) */
  GPTOSS_ERROR_UNSUPPORTED = 3       /* the shape or device is valid but not supported by this build */
} gptoss_status;

/* Message of the last failing call on this thread ("" if none). Valid until the next call. */
GPTOSS_API const char* gptoss_last_error_message(void);
/* The ABI version the library was built with (compare with GPTOSS_ABI_VERSION). */
GPTOSS_API int gptoss_abi_version(void);
/* Package version string, e.g. "0.1.0". */
GPTOSS_API const char* gptoss_version(void);
/* Semicolon-separated CUDA architectures the kernels were compiled for, e.g. "80;89;90a". */
GPTOSS_API const char* gptoss_cuda_archs(void);
/* CUDA toolkit version the library was built with, as 1000*major + 10*minor (e.g. 13000). */
GPTOSS_API int gptoss_cuda_build_version(void);

/* Programmatic dependent launch (sm_90): the decode-path kernels launch so that each may start
 * while the one before it on the stream finishes (they wait on the device before touching its
 * output; results are identical either way; below sm_90 they launch the ordinary way, see
 * gptoss/arch.h). On by default; GPTOSS_PDL=0 in the environment
 * turns it off at load. gptoss_set_pdl(0/1) switches it for later launches (a CUDA graph keeps
 * the launches it captured). gptoss_pdl_enabled() says which is in force. */
GPTOSS_API void gptoss_set_pdl(int enabled);
GPTOSS_API int gptoss_pdl_enabled(void);
/* Why PDL is off ("" while on): the environment, gptoss_set_pdl(0), or the runtime refusing the
 * launch attribute (then it stays off for the process; any other launch error changes nothing). */
GPTOSS_API const char* gptoss_pdl_off_reason(void);

/* Number of CUDA devices visible to the library (0 with an error status when no driver/GPU). */
GPTOSS_API gptoss_status gptoss_device_count(int* count);

#endif /* GPTOSS_COMMON_H_ */
