/* Which kernel paths run on a device (one source for Ampere, Ada and Hopper).
 *
 * Every op has a path on sm_80..89 (A100, A10, RTX 3090, L4, L40S, RTX 4090) and on sm_90a
 * (H100, H200); the launchers choose at run time from the device's compute capability and the
 * code this build holds for it, never from which kernels a build happens to contain:
 *   - thread-block clusters (sm_90): the router's CLUSTER path (AUTO for T <= 64; below sm_90 the
 *     SPLIT path), add_rms_norm_router_topk's one kernel (below sm_90: the RMSNorm kernel, then
 *     the FUSED router), decode attention's in-cluster merge (below sm_90: the combine kernel);
 *   - programmatic dependent launch (sm_90): the decode-path kernels (below sm_90: ordinary
 *     launches, the same results);
 *   - wgmma (sm_90a code on a 9.0 device): the attention-prefill and MoE-prefill variants asked for
 *     by name (AUTO never picks them below sm_90; asked for there they return
 *     GPTOSS_ERROR_UNSUPPORTED with a message).
 * The mma.sync kernels (MoE decode and prefill, router, attention, GEMV) run on every one.
 * A Hopper-only kernel compiled into sm_80..89 code is a stub that traps if launched (never a
 * wrong result); the launchers do not launch it there.
 *
 * A build's code for a device: sm_XY machine code runs on X.Y..X.9 devices (sm_90a only on 9.0),
 * compute_XY PTX (CMake's "XY" holds both) is compiled by the driver for any device >= X.Y, with
 * the features of XY. So an sm_80 build runs on an H100 with the sm_80 paths (code_cc 80).
 * A device for which the build holds no code fails with a message naming the device's compute
 * capability and the GPTOSS_CUDA_ARCHS to rebuild with.
 */
#ifndef GPTOSS_ARCH_H_
#define GPTOSS_ARCH_H_
#include "gptoss/common.h"

typedef struct gptoss_arch_info {
  int device_cc;          /* the device's compute capability, 10 * major + minor (90: H100/H200, 89: L4, L40S,
                             RTX 4090, 86: RTX 3090, A10, 80: A100) */
  int code_cc;            /* the architecture this build's code for the device was compiled for (__CUDA_ARCH__ / 10:
                             90 for sm_90a code, 80 for sm_80 code or compute_80 PTX); 0: none runs there */
  int forced_cc;          /* gptoss_set_arch_override() / GPTOSS_ARCH_OVERRIDE; 0: none */
  int cc;                 /* what the paths are chosen for: the smallest of device_cc, code_cc and forced_cc (> 0) */
  int clusters;           /* 1: thread-block-cluster kernels run (cc >= 90) */
  int pdl;                /* 1: decode-path kernels launch with PDL (cc >= 90 and gptoss_set_pdl on) */
  int wgmma;              /* 1: the wgmma kernels can run (cc == 90 with sm_90a code) */
  int max_smem_per_block; /* dynamic shared memory one block may opt in to, bytes (the device's limit, at most the
                             forced architecture's: 163 KB sm_80, 99 KB sm_86/89, 227 KB sm_90) */
} gptoss_arch_info;

/* The paths for CUDA device `device` (GPTOSS_ERROR_UNSUPPORTED with a message when this build holds
 * no code for it: info is still filled, code_cc 0). Cached per device after the first call; the
 * first call queries the device (call it once before a CUDA graph capture). */
GPTOSS_API gptoss_status gptoss_get_arch_info(int device, gptoss_arch_info* info);

/* Choose the paths as if the device had compute capability `cc` (80, 86, 87, 89 or 90; 0: the
 * device's own), for every device, from the next launch on (a CUDA graph keeps what it captured).
 * It can only lower the choice: forced 90 on an 8.x device changes nothing. For tests (an H100
 * running the sm_80 paths) and for comparing paths on one card. GPTOSS_ARCH_OVERRIDE=80 in the
 * environment sets it at load. */
GPTOSS_API gptoss_status gptoss_set_arch_override(int cc);
GPTOSS_API int gptoss_arch_override(void);

#endif /* GPTOSS_ARCH_H_ */
