"""The memory plan: what fits on one card, computed from the config without allocating anything
(``memory_plan``, ``format_memory_plan`` for the CLI), and the check of one generate request
against the memory still free (``plan_request`` / ``check_request``): a request that does not
fit raises ``MemoryPlanError`` before anything is allocated.

``GptOss`` keeps these on the model (``GptOss.memory_plan``, ``GptOss.check_memory``...).
"""

from __future__ import annotations

import torch

from .config import GptOssConfig
from .weights import nbytes, weight_shapes

__all__ = ["MemoryPlanError", "PREFILL_CHUNK", "workspace_bytes", "kv_cache_bytes", "memory_plan",
           "format_memory_plan", "free_bytes", "plan_request", "check_request", "weights_bytes",
           "check_weights_fit", "plan_table", "format_plan_table", "CARD_GIB"]

#: the card sizes the plan table shows by default (GiB): 16 GB consumer cards (RTX 4080 / 5080,
#: 4060 Ti 16 GB), 24 GB (RTX 3090 / 4090, L4, A10), 48 GB (L40S, A6000), 80 GB (A100 / H100)
CARD_GIB = (16, 24, 48, 80)

#: tokens per prefill chunk: ``GptOss.prefill_chunk``'s default, and what the plan assumes unless told
PREFILL_CHUNK = 2048


class MemoryPlanError(RuntimeError):
    """A generate request whose KV cache and workspaces do not fit the device's free memory."""


def workspace_bytes(config: GptOssConfig, batch: int = 1, prefill_chunk: int | None = None) -> dict:
    """Device memory besides weights and KV cache, an upper estimate (bytes):

    decode: the step's static buffers (residual stream, projections, fp32 logits [B, V]) and
    the sampler's temporaries (top-p sorts [B, V]: ~40 B per logit), counted twice for the
    CUDA graph's private pool; prefill: one chunk's activations (bf16: x, norm, qkv, q/k/v, attention
    out, projection, MoE in/out, the MoE's routed rows gate/up [T k, 2I] and SwiGLU [T k, I]
    and its gathered inputs [T k, H]), doubled for the allocator's reuse pattern, plus the
    last-token logits."""
    c = config
    chunk = int(prefill_chunk if prefill_chunk is not None else PREFILL_CHUNK)
    H, V, I, k = c.hidden_size, c.vocab_size, c.intermediate_size, c.experts_per_token
    nqd = c.num_attention_heads * c.head_dim
    per_row = 2 * (6 * H + c.qkv_dim + 2 * nqd + k * (2 * I + I + H))
    decode = batch * (2 * (6 * H + c.qkv_dim + 2 * nqd) + V * 4 + V * 40) * 2
    prefill = 2 * chunk * per_row + batch * V * 4
    return {"decode": int(decode), "prefill": int(prefill), "total": int(decode + prefill)}


def kv_cache_bytes(config: GptOssConfig, batch: int, cache_len: int, kv_dtype_bytes: int = 2) -> int:
    """Bytes new_cache(batch, cache_len) allocates: full layers cache_len slots, sliding layers
    the window (a ring)."""
    per_slot = 2 * config.num_key_value_heads * config.head_dim * kv_dtype_bytes
    slots = sum((config.sliding_window if config.is_sliding(i) else cache_len)
                for i in range(config.num_hidden_layers))
    return int(batch * slots * per_slot)


def memory_plan(config: GptOssConfig, gpu_bytes: float = 80e9, batch: int = 1, context: int | None = None, *,
                reserve_bytes: float = 1.5e9, prefill_chunk: int | None = None, kv_dtype_bytes: int = 2,
                weight_dtype_bytes: int = 2) -> dict:
    """The memory plan of one card, computed without allocating anything.

    weights_bytes: every weight as GptOss stores it (MXFP4 experts, the rest bf16; equals
    the HF checkpoint's total_size). workspace_bytes: decode buffers + sampler + one prefill
    chunk (``workspace_bytes()``). reserve_bytes: CUDA context, cuBLAS workspace and allocator
    slack (default 1.5 GB). kv_bytes_per_token: K+V of one position over all full layers (what
    grows with the context). sliding_kv_bytes: the sliding layers' fixed rings for ``batch``
    sequences. tokens_fit: positions (summed over the batch) that fit in the rest;
    tokens_per_sequence = tokens_fit // batch, also capped at max_position_embeddings as
    ``context_per_sequence``. With ``context`` (positions per sequence, prompt + new tokens):
    kv_cache_bytes, need_bytes (everything) and fits = need_bytes <= gpu_bytes; without it,
    fits = the weights, workspaces and rings fit.
    """
    wb = weights_bytes(config, weight_dtype_bytes)
    ws = workspace_bytes(config, batch, prefill_chunk)["total"]
    per_layer_token = 2 * config.num_key_value_heads * config.head_dim * kv_dtype_bytes
    n_sliding = sum(config.is_sliding(i) for i in range(config.num_hidden_layers))
    n_full = config.num_hidden_layers - n_sliding
    kv_per_token = n_full * per_layer_token
    sliding = n_sliding * batch * (config.sliding_window or 0) * per_layer_token
    free = gpu_bytes - wb - ws - reserve_bytes - sliding
    tokens_fit = max(0, int(free // kv_per_token)) if kv_per_token else (1 << 62 if free >= 0 else 0)
    per_seq = tokens_fit // batch
    plan = {"gpu_bytes": int(gpu_bytes), "weights_bytes": int(wb), "workspace_bytes": int(ws),
            "reserve_bytes": int(reserve_bytes), "kv_bytes_per_token": int(kv_per_token),
            "sliding_kv_bytes": int(sliding), "full_layers": n_full, "sliding_layers": n_sliding,
            "batch": batch, "tokens_fit": tokens_fit, "tokens_per_sequence": per_seq,
            "context_per_sequence": min(per_seq, config.max_position_embeddings), "fits": free >= 0}
    if context is not None:
        kv = kv_cache_bytes(config, batch, context, kv_dtype_bytes)
        need = wb + ws + reserve_bytes + kv
        plan.update(context=int(context), kv_cache_bytes=int(kv), need_bytes=int(need),
                    fits=bool(need <= gpu_bytes and context <= config.max_position_embeddings))
    return plan


def weights_bytes(config: GptOssConfig, weight_dtype_bytes: int = 2) -> int:
    """Bytes of every weight as GptOss stores it (MXFP4 experts, the rest in the model dtype)."""
    gshapes, lshapes = weight_shapes(config)
    total = sum(nbytes(s, k, weight_dtype_bytes) for s, k in gshapes.values())
    return int(total + sum(nbytes(s, k, weight_dtype_bytes) for spec in lshapes for s, k in spec.values()))


#: what must stay free beside the weights for a load to be worth starting: the smallest decode
#: state, the allocator's slack and the CUDA context's growth (cuBLAS workspaces)
LOAD_HEADROOM_BYTES = 0.5e9


def check_weights_fit(config: GptOssConfig, device: torch.device, weight_dtype_bytes: int = 2) -> int:
    """Before a checkpoint is loaded onto a CUDA device: MemoryPlanError when its weights (plus
    LOAD_HEADROOM_BYTES) exceed the device's free memory, so nothing is allocated for a model
    that cannot run there. Returns the weights' bytes."""
    need = weights_bytes(config, weight_dtype_bytes)
    free, total = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if need + LOAD_HEADROOM_BYTES > free:
        G = 2 ** 30
        raise MemoryPlanError(
            f"this checkpoint's weights need {need / G:.1f} GiB ({config.num_hidden_layers} layers, "
            f"{config.num_experts} experts; + {LOAD_HEADROOM_BYTES / G:.1f} GiB to run), {device} has "
            f"{free / G:.1f} GiB free of {total / G:.1f} GiB: nothing was loaded "
            f"(gpt-oss-20b needs a 16 GB card, gpt-oss-120b an 80 GB one; see `gptoss-kernels plan`)")
    return need


def plan_table(config: GptOssConfig, cards_gib=CARD_GIB, batches=(1, 4)) -> list[dict]:
    """memory_plan for each card size (GiB of card memory) and batch: the rows of
    ``gptoss-kernels plan`` and of the README's table."""
    return [memory_plan(config, gpu_bytes=g * 2 ** 30, batch=b) for g in cards_gib for b in batches]


def format_plan_table(name: str, rows: list[dict]) -> str:
    """A markdown table of plan_table rows (the README's form)."""
    G = 2 ** 30
    out = [f"| {name} on | batch | weights | workspaces + reserve | KV per position | longest context per sequence |",
           "|---|---|---|---|---|---|"]
    for p in rows:
        ctx = f"{p['context_per_sequence']:,}" if p["fits"] and p["context_per_sequence"] > 0 else "does not fit"
        out.append(f"| {p['gpu_bytes'] / G:.0f} GiB | {p['batch']} | {p['weights_bytes'] / G:.2f} GiB | "
                   f"{(p['workspace_bytes'] + p['reserve_bytes']) / G:.2f} GiB | "
                   f"{p['kv_bytes_per_token'] / 1024:.0f} KiB | {ctx} |")
    return "\n".join(out)


def format_memory_plan(plan: dict) -> str:
    """One line for the CLI."""
    G = 2 ** 30
    s = (f"memory plan ({plan['gpu_bytes'] / G:.1f} GiB card): weights {plan['weights_bytes'] / G:.1f} GiB, "
         f"workspaces {plan['workspace_bytes'] / G:.2f} GiB, reserve {plan['reserve_bytes'] / G:.1f} GiB, "
         f"KV {plan['kv_bytes_per_token'] / 1024:.0f} KiB/position; batch {plan['batch']}: up to "
         f"{plan['context_per_sequence']} positions per sequence")
    if "context" in plan:
        s += (f"; this request: {plan['context']} positions x {plan['batch']} -> KV cache "
              f"{plan['kv_cache_bytes'] / G:.2f} GiB, {'fits' if plan['fits'] else 'does NOT fit'}")
    return s


def free_bytes(device: torch.device, held_bytes: int = 0) -> float:
    """Memory a request may use beside the loaded weights: on CUDA what is still free
    (driver-free + torch-cached + ``held_bytes``, the cache the request replaces), on the CPU
    unlimited."""
    if device.type != "cuda":
        return float(1 << 62)
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return free + cached + held_bytes


def plan_request(config: GptOssConfig, batch: int, cache_len: int, available_bytes: float, *, weights_bytes: int,
                 weight_dtype_bytes: int = 2, prefill_chunk: int | None = None) -> dict:
    """The memory plan of a generate call: ``batch`` sequences, full-layer caches of ``cache_len``
    positions, ``available_bytes`` beside the loaded weights (``weights_bytes`` of them)."""
    # reserve: allocator slack and cuBLAS workspaces (the CUDA context is already outside `free`)
    return memory_plan(config, gpu_bytes=available_bytes + weights_bytes, batch=batch, context=cache_len,
                       prefill_chunk=prefill_chunk, reserve_bytes=0.5e9, weight_dtype_bytes=weight_dtype_bytes)


def check_request(plan: dict, batch: int, max_len: int, device) -> dict:
    """The plan of a request (``plan_request``) for ``batch`` sequences of up to ``max_len``
    positions on ``device``; MemoryPlanError, with the largest context that would fit, when it
    does not fit."""
    if not plan["fits"]:
        G = 2 ** 30
        raise MemoryPlanError(
            f"{batch} sequence(s) x {max_len} positions do not fit on {device}: KV cache "
            f"{plan['kv_cache_bytes'] / G:.2f} GiB + workspaces {plan['workspace_bytes'] / G:.2f} GiB + reserve "
            f"{plan['reserve_bytes'] / G:.1f} GiB, with {(plan['gpu_bytes'] - plan['weights_bytes']) / G:.2f} GiB "
            f"available beside the weights; at most {plan['context_per_sequence']} positions per sequence fit "
            f"at batch {batch} (shorten the prompt or the number of new tokens)")
    return plan
