"""End-to-end benchmark: ``GptOss.from_config`` with random weights of the real shapes.

Measured through the model's public API (``model.stream`` / ``model.generate``, which prefill,
then decode with a KV cache in a CUDA graph): time to first token, decode tok/s (seconds between
the first and the last of N + 1 yielded tokens, per step), prefill tok/s (prompt tokens over the
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
    """Rows in the order they are measured: the headline figures first (batch 1 decode at the
    shortest context, the shortest prefill), so a time budget cuts the least useful ones."""
    decode = [(B, L) for L in sorted(contexts) for B in sorted(batches)]
    decode.sort(key=lambda bl: (bl[0] * bl[1] > 4 * min(contexts), bl[1], bl[0]))
    rows = [_row(f"decode B={B} ctx={L}", B, L, shape, limits) for B, L in decode]
    pre = [_row(f"prefill T={T}", 1, T, shape, limits) for T in sorted(prefill_tokens)]
    if pre:
        rows.insert(1, pre.pop(0))
    return rows + pre


def fits(shape: ModelShape, batch: int, context: int, device: torch.device) -> tuple[bool, str]:
    if device.type != "cuda":
        return True, "host memory"
    total = torch.cuda.get_device_properties(device).total_memory
    need = shape.weight_bytes() + shape.kv_cache_bytes(batch, context) + 2 * 2**30
    return need <= 0.95 * total, f"needs ≈{need / 2**30:.0f} GiB (weights + KV cache + 2 GiB) of {total / 2**30:.0f} GiB"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure(model, ids: torch.Tensor, n: int) -> tuple[float, float | None, int]:
    """(time to first token s, seconds per decode step or None, decode steps) for a prompt batch.

    Through ``model.stream`` when it exists (each yield follows the step's one host sync, so the
    host clock between yields times the steps); else two ``generate`` calls (1 and n tokens)."""
    _sync(ids.device)
    t0 = time.perf_counter()
    if hasattr(model, "stream"):
        stamps = [time.perf_counter() for _ in model.stream(ids, n, temperature=0.0, stop_token_ids=[])]
        _sync(ids.device)
        if not stamps:
            raise RuntimeError("model.stream yielded nothing")
        steps = len(stamps) - 1
        return stamps[0] - t0, ((stamps[-1] - stamps[0]) / steps if steps else None), steps
    model.generate(ids, max_new_tokens=1, temperature=0.0, stop_token_ids=[])
    _sync(ids.device)
    t1 = time.perf_counter() - t0
    if n <= 1:
        return t1, None, 0
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=n, temperature=0.0, stop_token_ids=[])
    _sync(ids.device)
    tn = time.perf_counter() - t0
    steps = (_num_new(out) or n) - 1
    return t1, ((tn - t1) / steps if steps > 0 and tn > t1 else None), steps


def _num_new(out) -> int | None:
    """Tokens generated per sequence, from generate's return value (list or tensor)."""
    if isinstance(out, torch.Tensor):
        return int(out.shape[-1])
    if isinstance(out, (list, tuple)):
        if out and isinstance(out[0], (list, tuple, torch.Tensor)):
            return min(len(o) for o in out)
        return len(out)
    return None


def run_e2e(ctx, config_name: str, batches, contexts, prefill_tokens, new_tokens: int = DECODE_NEW_TOKENS, *,
            config=None) -> tuple[list[dict], list[str]]:
    """Returns (rows, notes). `ctx` is an ops.Context (device, limits, deadline, progress).

    `config`: a GptOssConfig to use instead of the `config_name` preset; with it the run also
    goes ahead on the CPU (tests exercise the measurement code with a tiny model)."""
    from .ops import family_built

    shape = ModelShape.of(config, "custom config") if config is not None else ModelShape.preset(config_name)
    rows = plan(shape, ctx.limits, batches, contexts, prefill_tokens)
    L0 = min(contexts) if contexts else 1024
    notes = [f"bytes per token at batch 1, context {L0}: {decode_bytes_per_token(shape, 1, L0) / 1e9:.2f} GB ({shape.name})"]

    def skip_all(status: str, reason: str):
        for r in rows:
            r.update(status=status, reason=reason)
        return rows, notes

    if not ctx.gpu and config is None:
        return skip_all("skipped", "e2e needs a GPU (reference mode times the ops only); bytes per token shown")
    try:
        GptOss, GptOssConfig = load_model_api()
    except ImportError as e:
        return skip_all("skipped", f"model class not importable yet ({e})")
    if ctx.gpu:
        missing = [f for f in REQUIRED_FAMILIES if not family_built(f)]
        if missing:
            return skip_all("skipped", f"no kernel for {', '.join(missing)}: the model would run the reference path")
    if getattr(ctx, "broken", None):
        return skip_all("skipped", ctx.broken)
    if ctx.out_of_time():
        return skip_all("skipped", "time budget (--max-seconds) spent")

    ctx.progress(f"e2e: building {shape.name} with random weights on {ctx.device}")
    try:
        cfg = config if config is not None else config_for(config_name, GptOssConfig)
        model = GptOss.from_config(cfg, device=str(ctx.device), seed=0)
    except Exception as e:  # noqa: BLE001
        return skip_all("error", f"GptOss.from_config failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
    vocab_hi = min(199998, shape.vocab)  # below the special tokens
    gen = torch.Generator().manual_seed(0)
    cuda = ctx.device.type == "cuda"

    def prompt(batch: int, length: int) -> torch.Tensor:
        return torch.randint(0, vocab_hi, (batch, length), generator=gen).to(ctx.device)

    warmed: set[int] = set()
    prefill_tok_s = None  # measured by the first prefill row, to skip rows that cannot finish in time
    for i, r in enumerate(rows):
        if getattr(ctx, "broken", None):
            r.update(status="skipped", reason=ctx.broken)
            continue
        if ctx.out_of_time():
            r.update(status="skipped", reason="time budget (--max-seconds) spent")
            continue
        B, L = r["batch"], r["context"]
        is_prefill = r["case"].startswith("prefill")
        prompt_len = L if is_prefill else max(1, L - new_tokens)
        ok, why = fits(shape, B, prompt_len + new_tokens, ctx.device)
        if not ok:
            r.update(status="skipped", reason=f"does not fit: {why}")
            continue
        if prefill_tok_s and ctx.deadline is not None:
            need = B * prompt_len / prefill_tok_s
            if time.monotonic() + need > ctx.deadline:
                r.update(status="skipped", reason=f"its prefill (≈{need:.0f} s at the measured rate) would pass --max-seconds")
                continue
        ctx.progress(f"e2e [{i + 1}/{len(rows)}] {r['case']}")
        try:
            if B not in warmed:  # first-use costs (module loads, handles) outside the timings
                _measure(model, prompt(B, 16), 3)
                warmed.add(B)
            if cuda:
                torch.cuda.reset_peak_memory_stats(ctx.device)
            ttft, step_s, steps = _measure(model, prompt(B, prompt_len), 1 if is_prefill else 1 + new_tokens)
            r["ttft_ms"] = ttft * 1e3
            if is_prefill:
                r["tok_s"] = B * prompt_len / ttft
                prefill_tok_s = r["tok_s"]
            else:
                if not step_s:
                    raise RuntimeError(f"no decode steps were timed ({steps} steps)")
                r["ms_per_step"] = step_s * 1e3
                r["tok_s"] = B / step_s
                if r["bound_tok_s"]:
                    r["pct_of_bound"] = 100.0 * r["tok_s"] / r["bound_tok_s"]
            r["peak_gib"] = torch.cuda.max_memory_allocated(ctx.device) / 2**30 if cuda else None
            r["status"] = "ok" if ctx.gpu else "reference"
            if not ctx.gpu:
                r["reason"] = "reference mode (no GPU): not a kernel measurement"
            ctx.progress(f"    {r['tok_s']:.1f} tok/s, TTFT {r['ttft_ms']:.1f} ms"
                         + (f", peak {r['peak_gib']:.1f} GiB" if r["peak_gib"] is not None else ""))
        except torch.cuda.OutOfMemoryError as e:
            r.update(status="error", reason=f"out of memory: {str(e).splitlines()[0][:160]}")
        except Exception as e:  # noqa: BLE001 - one failing case must not end the run
            r.update(status="error", reason=f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
        finally:
            try:
                _sync(ctx.device)
                if cuda:
                    torch.cuda.empty_cache()
            except Exception as e:  # noqa: BLE001 - a sticky CUDA error: nothing more can run
                ctx.broken = f"not run: the CUDA context is unusable after '{r['case']}' ({type(e).__name__})"
    notes.append("TTFT and prefill tok/s include the decode-step CUDA graph capture that each generate call does")
    del model
    if cuda and not getattr(ctx, "broken", None):
        torch.cuda.empty_cache()
    return rows, notes
