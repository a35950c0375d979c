"""MoE prefill regime (many routed rows): grouped GEMMs over experts on the GPU.

Called by ops/moe.py (moe_mxfp4) when T*k is large; takes tensors already validated by
ops.moe.check_moe_args (and expert ids in range). Kernels: csrc/kernels/moe_prefill.cu, C ABI
gptoss/moe_prefill.h. Pipeline (one stream, no host sync, CUDA-graph capturable): route (group
rows by expert on the device) -> mlp1 grouped GEMM + bias + clamped SwiGLU -> mlp2 grouped GEMM +
bias, x routing weight -> deterministic combine of the k slots in slot order (no float atomics:
the same inputs give bit-identical outputs).

Cost model at gpt-oss shapes (H = I = 2880, k = 4), for the GPU measurements:
  FLOPs   = 2*T*k*H*2I + 2*T*k*I*H = 6*T*k*H*I  (T=4096: 0.82 TFLOP; ~1.2 ms at 700 TFLOP/s)
  weights = E * (2I*H + H*I) * (0.5 + 1/32) bytes read once per GEMM if the m-tiles of an expert
            run together (E=128: 1.7 GB, ~0.5 ms at 3.3 TB/s)
  workspace traffic: act bf16 [T*k, I] written + read, y bf16 [T*k, H] written + read
            (T=4096: 4 x 94 MB, ~0.12 ms).
Padding: every expert's rows are padded to the 128-row m-tile, so at small T with many experts
(T*k/E << 128) the GEMMs do up to 128*E/(T*k) times the useful MMA work.
"""

from __future__ import annotations

import torch

from .. import _checks, _lib

# Kernel variants of the two GEMMs (gptoss/moe_prefill.h): mma.sync 128x128 tiles; wgmma with
# 128x192 (WGMMA), 128x128 or 128x256 tiles. AUTO is MMA_SYNC until wgmma is verified on a GPU.
AUTO, MMA_SYNC, WGMMA, WGMMA_N128, WGMMA_N256 = 0, 1, 2, 3, 4
VARIANTS = {"mma_sync": MMA_SYNC, "wgmma": WGMMA, "wgmma_n128": WGMMA_N128, "wgmma_n256": WGMMA_N256}
# Workspace parts (GPTOSS_MOE_WS_*), for tests and debugging.
WS_PARTS = ("counts", "offsets", "tile_offsets", "perm", "chunk_base", "act", "y")

FAMILY = "moe_prefill"


def _device(dev) -> torch.device:
    return torch.device("cuda") if dev is None else dev if isinstance(dev, torch.device) else torch.device(dev)


def available(dev: torch.device | str | None = None) -> bool:
    """True when this build has the prefill kernels and they can run tensors of device `dev`
    (default: CUDA, on this machine's GPU; a CPU device: the hostsim backend's kernels)."""
    dev = _device(dev)
    if not _lib.runs_kernels(dev):
        return False
    return FAMILY in getattr(_lib.kernels(dev), "families", ())


def _module(dev):
    return _lib.C() if dev is None else _lib.kernels(dev)


def workspace_bytes(T: int, k: int, E: int, H: int, I: int, dev: torch.device | None = None) -> int:  # noqa: E741
    """Bytes of device workspace one call needs (grouping metadata, act bf16 [T*k, I], y bf16 [T*k, H]);
    asked of the module that runs `dev`'s tensors (default: the CUDA one)."""
    return int(_module(dev).moe_prefill_workspace_layout(T, k, E, H, I)[0])


def workspace_layout(T: int, k: int, E: int, H: int, I: int, dev: torch.device | None = None) -> dict[str, int]:  # noqa: E741
    """Byte offset of each workspace part (see WS_PARTS)."""
    _, offs = _module(dev).moe_prefill_workspace_layout(T, k, E, H, I)
    return dict(zip(WS_PARTS, (int(o) for o in offs)))


def _args(x, topk_ids, topk_weights, w1_blocks, w1_scales, w1_bias, w2_blocks, w2_scales, w2_bias,
          swiglu_alpha, swiglu_limit, out, workspace, variant):
    T, H = x.shape
    k = topk_ids.shape[1]
    E, two_i = w1_blocks.shape[0], w1_blocks.shape[1]
    # tensors, not pointers: _lib.kernels() passes their data_ptr() (and registers their extents
    # with the hostsim bounds checker)
    return (x, topk_ids, topk_weights, w1_blocks, w1_scales, w1_bias, w2_blocks, w2_scales, w2_bias,
            float(swiglu_alpha), float(swiglu_limit), out, T, H, two_i // 2, E, k, workspace, workspace.numel(),
            int(variant), _checks.stream_of(x.device))


def new_workspace(x: torch.Tensor, topk_ids: torch.Tensor, w1_blocks: torch.Tensor) -> torch.Tensor:
    T, H = x.shape
    n = workspace_bytes(T, topk_ids.shape[1], w1_blocks.shape[0], H, w1_blocks.shape[1] // 2, x.device)
    # the C ABI wants 256-byte alignment: CUDA's caching allocator gives it, the CPU allocator
    # (host build) only 64 bytes: over-allocate and slice
    raw = torch.empty(max(n, 1) + 255, dtype=torch.uint8, device=x.device)
    skip = (-raw.data_ptr()) % 256
    return raw[skip:skip + max(n, 1)]


def run(x, topk_ids, topk_weights, w1_blocks, w1_scales, w1_bias, w2_blocks, w2_scales, w2_bias,
        swiglu_alpha, swiglu_limit, out, *, workspace: torch.Tensor | None = None, variant: int = AUTO):
    """out bf16 [T, H] = moe(x, ...) (see ops.moe.moe_mxfp4). Arguments must already be checked
    (ops.moe.check_moe_args; ids in [0, E): an id outside gives its token a NaN row, as the decode kernels, and
    never accesses memory out of bounds); `out` is allocated when None; `workspace` (uint8, >=
    workspace_bytes(T, k, E, H, I)) is allocated from torch's caching allocator when not given.
    Enqueued on torch's current stream; no host synchronization (CUDA-graph capturable once one
    eager call has run with the same shapes and variant)."""
    if out is None:
        out = torch.empty(x.shape, dtype=torch.bfloat16, device=x.device)
    if x.shape[0] == 0:
        return out
    if workspace is None:
        workspace = new_workspace(x, topk_ids, w1_blocks)
    # The C ABI wants x, out, blocks, scales 16-byte aligned and biases 4-byte aligned (vector
    # loads/stores); a view that is not (rare: odd slices) is copied to a fresh allocation.
    x, w1_blocks, w1_scales, w2_blocks, w2_scales = (_aligned(t, 16) for t in (x, w1_blocks, w1_scales, w2_blocks,
                                                                               w2_scales))
    w1_bias, w2_bias = _aligned(w1_bias, 4), _aligned(w2_bias, 4)
    dst = out if out.data_ptr() % 16 == 0 else torch.empty_like(out)
    with _lib.device_guard(x.device):
        _lib.kernels(x.device).moe_prefill_mxfp4(*_args(x, topk_ids, topk_weights, w1_blocks, w1_scales, w1_bias,
                                                        w2_blocks, w2_scales, w2_bias, swiglu_alpha, swiglu_limit, dst,
                                                        workspace, variant))
    if dst is not out:
        out.copy_(dst)
    return out


def _aligned(t: torch.Tensor, nbytes: int) -> torch.Tensor:
    return t if t.data_ptr() % nbytes == 0 else t.clone()


def run_step(step: int, x, topk_ids, topk_weights, w1_blocks, w1_scales, w1_bias, w2_blocks, w2_scales, w2_bias,
             swiglu_alpha, swiglu_limit, out, *, workspace: torch.Tensor, variant: int = AUTO) -> None:
    """One step of the pipeline (1 route, 2 mlp1, 3 mlp2, 4 combine) into `workspace` (tests)."""
    with _lib.device_guard(x.device):
        _lib.kernels(x.device).moe_prefill_step(step, *_args(x, topk_ids, topk_weights, w1_blocks, w1_scales,
                                                             w1_bias, w2_blocks, w2_scales, w2_bias, swiglu_alpha,
                                                             swiglu_limit, out, workspace, variant))


def workspace_views(workspace: torch.Tensor, T: int, k: int, E: int, H: int, I: int) -> dict[str, torch.Tensor]:  # noqa: E741
    """Typed views of the workspace parts (tests): counts, offsets, tile_offsets, perm, act, y."""
    off = workspace_layout(T, k, E, H, I, workspace.device)
    R = T * k

    def view(name, dtype, shape):
        n = 1
        for s in shape:
            n *= s
        nbytes = n * torch.empty((), dtype=dtype).element_size()
        return workspace[off[name]:off[name] + nbytes].view(dtype).view(*shape)

    return {"counts": view("counts", torch.int32, (E,)), "offsets": view("offsets", torch.int32, (E + 1,)),
            "tile_offsets": view("tile_offsets", torch.int32, (E + 1,)), "perm": view("perm", torch.int32, (R,)),
            "act": view("act", torch.bfloat16, (R, I)), "y": view("y", torch.bfloat16, (R, H))}
