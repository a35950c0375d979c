"""End-to-end benchmark: ``GptOss.from_config`` with random weights of the real shapes.

Measured through the model's public API (``model.generate``, which prefills, then decodes with a
KV cache in a CUDA graph): time to first token (a generate of one token), decode tok/s (the extra
time of a generate of 1 + N tokens over one of 1 token), prefill tok/s (prompt tokens over the
time to first token), peak GPU memory; and for every decode figure the bound it is measured
against: bytes one step must read (``decode_bytes_per_step``) over the copy bandwidth measured in
the same run.
"""

from __future__ import annotations

import time

import torch

from .shapes import ModelShape, decode_bytes_per_step, decode_bytes_per_token  # noqa: F401 (public here)
from .timing import Limits

DEFAULT_DECODE_BATCH = (1, 4, 16, 64)
DEFAULT_DECODE_CONTEXT = (1024, 32768)
DEFAULT_PREFILL_TOKENS = (2048, 32768)
DECODE_NEW_TOKENS = 32
# families without which the model would run the (slow, fp32) reference path on the GPU
REQUIRED_FAMILIES = ("moe_decode", "attention_decode")


def load_model_api():
    """(GptOss, GptOssConfig) or raise ImportError saying what is missing."""
    from ..model import GptOss  # noqa: F401 - written by the model issue (#4)
    from ..config import GptOssConfig  # noqa: F401

    return GptOss, GptOssConfig


def config_for(name: str, GptOssConfig):
    factory = {"120b": "gpt_oss_120b", "20b": "gpt_oss_20b"}[name]
    return getattr(GptOssConfig, factory)()


def bound_tok_s(shape: ModelShape, batch: int, context: int, copy_gbps: float) -> float:
    """Tokens per second if a decode step only had to read its bytes at the measured copy rate."""
    step = decode_bytes_per_step(shape, batch, context)["total"]
    return batch / (step / (copy_gbps * 1e9))


def _row(case: str, batch: int, context: int, shape: ModelShape, limits: Limits | None) -> dict:
    step = decode_bytes_per_step(shape, batch, context)
    return {"op": "e2e", "case": case, "batch": batch, "context": context, "status": None, "reason": None,
            "tok_s": None, "ms_per_step": None, "ttft_ms": None, "peak_gib": None,
            "bytes_per_step": step["total"], "bytes_per_token": step["total"] / batch,
            "bytes_breakdown": step,
            "bound_tok_s": bound_tok_s(shape, batch, context, limits.copy_gbps) if limits and case.startswith("decode") else None,
            "pct_of_bound": None}


def plan(shape: ModelShape, limits: Limits | None, batches, contexts, prefill_tokens) -> list[dict]:
    rows = [_row(f"decode B={B} ctx={L}", B, L, shape, limits) for L in contexts for B in batches]
    rows += [_row(f"prefill T={T}", 1, T, shape, limits) for T in prefill_tokens]
    return rows


def fits(shape: ModelShape, batch: int, context: int, device: torch.device) -> tuple[bool, str]:
    total = torch.cuda.get_device_properties(device).total_memory
    need = shape.weight_bytes() + shape.kv_cache_bytes(batch, context) + 2 * 2**30
    return need <= 0.95 * total, f"needs ≈{need / 2**30:.0f} GiB (weights + KV cache + 2 GiB) of {total / 2**30:.0f} GiB"


def _timed(fn) -> tuple[float, object]:
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t, out


def _num_new(out, batch: int) -> int | None:
    """Tokens generated per sequence, from generate's return value (list or tensor)."""
    if isinstance(out, torch.Tensor):
        return int(out.shape[-1])
    if isinstance(out, (list, tuple)):
        if out and isinstance(out[0], (list, tuple, torch.Tensor)):
            return min(len(o) for o in out)
        return len(out)
    return None


def run_e2e(ctx, config_name: str, batches, contexts, prefill_tokens, new_tokens: int = DECODE_NEW_TOKENS) -> tuple[list[dict], list[str]]:
    """Returns (rows, notes). `ctx` is an ops.Context (device, limits, deadline, progress)."""
    from .ops import kernel_families

    shape = ModelShape.preset(config_name)
    rows = plan(shape, ctx.limits, batches, contexts, prefill_tokens)
    notes = [f"bytes per token at batch 1, context {min(contexts) if contexts else 1024}: "
             f"{decode_bytes_per_token(shape, 1, min(contexts) if contexts else 1024) / 1e9:.2f} GB ({shape.name})"]

    def skip_all(status: str, reason: str):
        for r in rows:
            r.update(status=status, reason=reason)
        return rows, notes

    if not ctx.gpu:
        return skip_all("skipped", "e2e needs a GPU (reference mode times the ops only); bytes per token shown")
    try:
        GptOss, GptOssConfig = load_model_api()
    except ImportError as e:
        return skip_all("skipped", f"model class not importable yet ({e})")
    missing = [f for f in REQUIRED_FAMILIES if f not in kernel_families()]
    if missing:
        return skip_all("skipped", f"no kernel for {', '.join(missing)}: the model would run the reference path")
    if ctx.out_of_time():
        return skip_all("skipped", "time budget (--max-seconds) spent")

    ctx.progress(f"e2e: building {shape.name} with random weights on {ctx.device}")
    try:
        model = GptOss.from_config(config_for(config_name, GptOssConfig), device=str(ctx.device), seed=0)
    except Exception as e:  # noqa: BLE001
        return skip_all("error", f"GptOss.from_config failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
    vocab_hi = 199998  # below the special tokens
    gen = torch.Generator().manual_seed(0)

    def prompt(batch: int, length: int) -> torch.Tensor:
        return torch.randint(0, vocab_hi, (batch, length), generator=gen).to(ctx.device)

    def generate(ids: torch.Tensor, n: int):
        return model.generate(ids, max_new_tokens=n, temperature=0.0, stop_token_ids=[])

    warmed: set[int] = set()
    for i, r in enumerate(rows):
        if ctx.out_of_time():
            r.update(status="skipped", reason="time budget (--max-seconds) spent")
            continue
        B = r["batch"]
        ok, why = fits(shape, B, r["context"] + new_tokens, ctx.device)
        if not ok:
            r.update(status="skipped", reason=f"does not fit: {why}")
            continue
        ctx.progress(f"e2e [{i + 1}/{len(rows)}] {r['case']}")
        try:
            if B not in warmed:  # graph capture and allocations outside the timings
                generate(prompt(B, 16), 4)
                warmed.add(B)
            torch.cuda.reset_peak_memory_stats(ctx.device)
            ids = prompt(B, r["context"] if r["case"].startswith("prefill") else r["context"] - new_tokens)
            t1, out1 = _timed(lambda: generate(ids, 1))
            r["ttft_ms"] = t1 * 1e3
            if r["case"].startswith("prefill"):
                r["tok_s"] = B * ids.shape[1] / t1
            else:
                tn, outn = _timed(lambda: generate(ids, 1 + new_tokens))
                n = (_num_new(outn, B) or 1 + new_tokens) - 1
                if n <= 0 or tn <= t1:
                    raise RuntimeError(f"generate returned {n + 1} tokens in {tn:.3f}s (TTFT {t1:.3f}s)")
                r["ms_per_step"] = (tn - t1) / n * 1e3
                r["tok_s"] = B * n / (tn - t1)
                if r["bound_tok_s"]:
                    r["pct_of_bound"] = 100.0 * r["tok_s"] / r["bound_tok_s"]
            r["peak_gib"] = torch.cuda.max_memory_allocated(ctx.device) / 2**30
            r["status"] = "ok"
        except torch.cuda.OutOfMemoryError as e:
            r.update(status="error", reason=f"out of memory: {str(e).splitlines()[0][:160]}")
        except Exception as e:  # noqa: BLE001 - e.g. generate takes no batched prompts
            r.update(status="error", reason=f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
        finally:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
    del model
    torch.cuda.empty_cache()
    return rows, notes
