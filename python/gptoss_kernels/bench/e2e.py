"""End-to-end benchmark: ``GptOss.from_config`` with random weights of the real shapes.

Measured through the model's public API (``model.stream`` / ``model.generate``, which prefill,
then decode with a KV cache in a CUDA graph): time to first token, decode tok/s (seconds between
the first and the last of N + 1 yielded tokens, per step), prefill tok/s (prompt tokens over the
time to first token), peak GPU memory; and for every decode figure the bound it is measured
against: bytes one step must read (``decode_bytes_per_step``) over the copy bandwidth measured in
the same run.

On a GPU (preset configs) the run starts with the per-op decode-step profile
(``profile_decode_step``; its table goes into the notes; GPTOSS_E2E_PROFILE=0 skips it). Alone:
``python -m gptoss_kernels.bench.e2e --profile`` (the byte table only without a GPU).
"""

from __future__ import annotations

import os
import time

import torch

from .shapes import ModelShape, decode_bytes_per_step, decode_bytes_per_token  # noqa: F401 (public here)
from .timing import Limits
from .. import _lib

DEFAULT_DECODE_BATCH = (1, 4, 16, 64)
DEFAULT_DECODE_CONTEXT = (1024, 32768)
DEFAULT_PREFILL_TOKENS = (2048, 32768)
DECODE_NEW_TOKENS = 32
# families without which the model would run the (slow, fp32) reference path on the GPU
REQUIRED_FAMILIES = ("moe_decode", "attention_decode")


def load_model_api():
    """(GptOss, GptOssConfig) or raise ImportError saying what is missing."""
    from ..model import GptOss  # noqa: F401
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
    if hasattr(model, "prepare_decode"):   # cache allocation and graph capture outside the timings
        model.prepare_decode(ids.shape[0], ids.shape[1] + n)
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

    if ctx.gpu and config is None and os.environ.get("GPTOSS_E2E_PROFILE", "1") != "0" and not ctx.out_of_time():
        # the per-op decode-step profile first (a 2-layer model, freed before the full one is built)
        try:
            prof = profile_decode_step(config_name, 1, L0, device=ctx.device,
                                       copy_gbps=ctx.limits.copy_gbps if ctx.limits else None, progress=ctx.progress)
            notes += [f"profile | {line}" for line in format_profile(prof).splitlines()]
        except Exception as e:  # noqa: BLE001 - the profile must not cost the e2e figures
            notes.append(f"decode-step profile failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
        torch.cuda.empty_cache()
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
            r["cuda_graph"] = model.engine.graph is not None
            r["status"] = "ok" if ctx.gpu else "reference"
            if not ctx.gpu:
                r["reason"] = "reference mode (no GPU): not a kernel measurement"
            ctx.progress(f"    {r['tok_s']:.1f} tok/s, TTFT {r['ttft_ms']:.1f} ms"
                         + (f", peak {r['peak_gib']:.1f} GiB" if r["peak_gib"] is not None else ""))
        except torch.cuda.OutOfMemoryError as e:
            r.update(status="error", reason=f"out of memory: {str(e).splitlines()[0][:160]}")
        except RuntimeError as e:
            if type(e).__name__ != "MemoryPlanError":
                r.update(status="error", reason=f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
            else:   # the model refused a request its memory plan rejects: not a failure of the bench
                r.update(status="skipped", reason=f"does not fit (model memory plan): {str(e)[:200]}")
        except Exception as e:  # noqa: BLE001 - one failing case must not end the run
            r.update(status="error", reason=f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
        finally:
            try:
                _sync(ctx.device)
                if cuda:
                    torch.cuda.empty_cache()
            except Exception as e:  # noqa: BLE001 - a sticky CUDA error: nothing more can run
                ctx.broken = f"not run: the CUDA context is unusable after '{r['case']}' ({type(e).__name__})"
    notes.append("TTFT and prefill tok/s exclude the cache allocation and the decode-step CUDA graph capture "
                 "(GptOss.prepare_decode runs before each timed call)")
    del model
    if cuda and not getattr(ctx, "broken", None):
        torch.cuda.empty_cache()
    return rows, notes


# ---------------------------------------------------------------------------------------------
# Decode-step profile: every op of one step, its time (eager, CUDA events, cold L2) against its
# bytes. `python -m gptoss_kernels.bench.e2e --profile` (the byte table alone without a GPU).
# ---------------------------------------------------------------------------------------------

def decode_step_ops(shape: ModelShape, batch: int = 1, context: int = 1024) -> list[dict]:
    """The ops of one decode step in the model's order (GptOss.decode_step), each with its calls
    per step and the bytes one call must move at the least: weights read once, activations read
    and written, the KV cache read (`context` positions per sequence including the new token;
    sliding layers at most the window). Experts: moe_bytes_read's expected distinct experts of
    the batch (exactly k at batch 1). Dict keys: op, calls, bytes (per call), group."""
    from ..ops.dense import LINEAR_MAX_TOKENS
    from ..ops.moe import PREFILL_MIN_ROUTED_ROWS, moe_bytes_read

    s, B, bf = shape, batch, 2
    H, V, E, k, I = s.hidden, s.vocab, s.num_experts, s.k, s.intermediate
    nqd, kvd = s.nq * s.head_dim, s.nkv * s.head_dim
    qkv = nqd + 2 * kvd
    L, Ls = s.num_layers, s.num_sliding_layers
    Lf = L - Ls
    kv_pos = 2 * kvd * bf                     # K + V of one position in one layer
    fused = B <= LINEAR_MAX_TOKENS          # the step's QKV GEMV carries RoPE and the cache append
    moe_norm = B * k <= PREFILL_MIN_ROUTED_ROWS   # the MoE decode kernels: combine + add + norm fused
    norm_router = B <= 16 and E <= 128            # ops.add_rms_norm_router_topk's one-kernel range
    rows = [
        ("embedding", 1, 2 * B * H * bf, "other"),
        ("rms_norm (first)", 1, 2 * B * H * bf + H * bf, "norms"),
        ("qkv + rope + cache append", L if fused else 0,
         qkv * H * bf + qkv * bf + B * H * bf + B * qkv * bf + 2 * B * 4, "attention"),
        ("qkv linear + bias", 0 if fused else L, qkv * H * bf + qkv * bf + B * H * bf + B * qkv * bf, "attention"),
        ("rope + cache append", 0 if fused else L, 2 * B * qkv * bf + 2 * B * 4, "attention"),
        ("attention_decode (sliding)", Ls,
         2 * B * nqd * bf + B * min(context, s.sliding_window) * kv_pos + s.nq * bf + B * 4, "attention"),
        ("attention_decode (full)", Lf, 2 * B * nqd * bf + B * context * kv_pos + s.nq * bf + B * 4, "attention"),
        ("out linear + bias", L, H * nqd * bf + H * bf + B * nqd * bf + B * H * bf, "attention"),
        ("residual + rms_norm", (0 if norm_router else L) + (0 if moe_norm else L), 4 * B * H * bf + H * bf, "norms"),
        # small batches: the add + norm before the MoE run in the router's (cluster) kernel
        ("residual + rms_norm + router top-k", L if norm_router else 0,
         4 * B * H * bf + H * bf + E * H * bf + E * bf + B * k * 8, "moe"),
        ("router top-k", 0 if norm_router else L, E * H * bf + E * bf + B * H * bf + B * k * 8, "moe"),
        # decode regime: the residual add + next norm run in the MoE's combine (its out not stored)
        ("moe_mxfp4 + residual + rms_norm", L if moe_norm else 0,
         moe_bytes_read(B, k, E, H, I) + 2 * B * H * bf + H * bf, "moe"),
        ("moe_mxfp4", 0 if moe_norm else L, moe_bytes_read(B, k, E, H, I), "moe"),
        ("unembedding (fp32 logits)", 1, V * H * bf + B * H * bf + B * V * 4, "unembedding"),
        ("sample (argmax)", 1, B * V * 4 + B * 8, "other"),
    ]
    return [{"op": op, "calls": n, "bytes": int(b), "group": g} for op, n, b, g in rows if n]


def decode_step_bytes(shape: ModelShape, batch: int = 1, context: int = 1024) -> dict[str, float]:
    """Bytes of one decode step by group (attention = projections + RoPE/append + KV reads) and in
    total, from decode_step_ops."""
    out: dict[str, float] = {}
    for r in decode_step_ops(shape, batch, context):
        out[r["group"]] = out.get(r["group"], 0.0) + r["calls"] * r["bytes"]
    out["total"] = sum(out.values())
    return out


def _profile_model(shape_name: str, device: torch.device, layers: int = 2):
    """A model of the real shapes with `layers` layers (one sliding, one full): every op of the
    step has the 120b/20b shapes; the step total is the per-layer times times the layer count."""
    import dataclasses

    GptOss, GptOssConfig = load_model_api()
    cfg = config_for(shape_name, GptOssConfig)
    cfg = dataclasses.replace(cfg, num_hidden_layers=layers, layer_types=cfg.layer_types[:layers])
    return GptOss.from_config(cfg, device=device, seed=0)


def _op_calls(model, st: dict, layer_ids: dict[str, int]) -> dict[str, object]:
    """Closures running each op of the decode step on the model's static buffers (the same calls
    decode_step makes). layer_ids: which layer stands for the sliding / full attention ops."""
    from .. import ops

    c, b, W = model.config, st["buf"], model.weights
    eps = c.rms_norm_eps
    Ls = model.layers[layer_ids["sliding"]]
    calls = {
        "embedding": lambda: torch.index_select(W["embedding"], 0, b["tok"], out=b["x"]),
        "rms_norm (first)": lambda: ops.rms_norm(b["x"], Ls["attn_norm"], eps=eps, out=b["a"]),
        "qkv linear + bias": lambda: ops.linear(b["a"], Ls["qkv_w"], Ls["qkv_b"], out=b["qkv"]),
        "out linear + bias": lambda: ops.linear(b["o"].reshape(b["o"].shape[0], -1), Ls["out_w"], Ls["out_b"],
                                                out=b["proj"]),
        "residual + rms_norm": lambda: ops.rms_norm(b["proj"], Ls["mlp_norm"], eps=eps, residual=b["x"],
                                                    out=b["a"], residual_out=b["x"]),
        "router top-k": lambda: ops.router_topk(b["a"], Ls["gate_w"], Ls["gate_b"], c.experts_per_token,
                                                out=(b["ids"], b["wts"])),
        "moe_mxfp4": lambda: ops.moe_mxfp4(b["a"], b["ids"], b["wts"], Ls["w1_blocks"], Ls["w1_scales"],
                                           Ls["w1_bias"], Ls["w2_blocks"], Ls["w2_scales"], Ls["w2_bias"],
                                           swiglu_alpha=c.swiglu_alpha, swiglu_limit=c.swiglu_limit,
                                           out=b["moe"], validate_ids=False),
"residual + rms_norm + router top-k": lambda: ops.add_rms_norm_router_topk(
            b["proj"], b["x"], Ls["mlp_norm"], Ls["gate_w"], Ls["gate_b"], c.experts_per_token, eps=eps,
            norm_out=b["a"], residual_out=b["x"], out=(b["ids"], b["wts"])),
                "moe_mxfp4 + residual + rms_norm": lambda: ops.moe_mxfp4_add_rms_norm(
            b["a"], b["ids"], b["wts"], Ls["w1_blocks"], Ls["w1_scales"], Ls["w1_bias"], Ls["w2_blocks"],
            Ls["w2_scales"], Ls["w2_bias"], b["x"], Ls["attn_norm"], eps=eps, swiglu_alpha=c.swiglu_alpha,
            swiglu_limit=c.swiglu_limit, norm_out=b["moe"], residual_out=b["x"], validate_ids=False),
        "unembedding (fp32 logits)": lambda: ops.linear(b["a"], W["unembedding"], out=b["logits"],
                                                        out_dtype=torch.float32),
        "sample (argmax)": lambda: (ops.greedy_argmax(b["logits"], out=b["tok"]) if hasattr(ops, "greedy_argmax")
                                    else torch.argmax(b["logits"], dim=-1, out=b["tok"])),
    }
    kc, vc = st["caches"][layer_ids["sliding"]]
    calls["qkv + rope + cache append"] = lambda: ops.qkv_rope_append(
        b["a"], Ls["qkv_w"], Ls["qkv_b"], b["seq_ids"], b["pos"], kc, vc, q_out=b["q"],
        num_q_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads, head_dim=c.head_dim, rope=c.yarn)
    calls["rope + cache append"] = lambda: ops.rope_and_cache_append(
        b["qkv"], b["seq_ids"], b["pos"], kc, vc, q_out=b["q"], num_q_heads=c.num_attention_heads,
        num_kv_heads=c.num_key_value_heads, head_dim=c.head_dim, rope=c.yarn)
    for kind in ("sliding", "full"):
        i = layer_ids[kind]
        kci, vci = st["caches"][i]
        calls[f"attention_decode ({kind})"] = (lambda kci=kci, vci=vci, i=i: ops.attention_decode(
            b["q"], kci, vci, b["seqlens"], model.layers[i]["sinks"], sliding_window=c.window(i),
            sm_scale=c.sm_scale, out=b["o"]))
    return calls


def _time_cold(fn, device: torch.device, flush: torch.Tensor, reps: int) -> float:
    """Median µs of fn between CUDA events, each run after overwriting a buffer larger than L2
    (cold weights; the flush also gives the host time to queue the op, so launch latency is not
    timed)."""
    import statistics

    fn()
    torch.cuda.synchronize(device)
    pairs = []
    for _ in range(reps):
        flush.add_(1)
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        fn()
        e1.record()
        pairs.append((e0, e1))
    torch.cuda.synchronize(device)
    return statistics.median(a.elapsed_time(z) * 1e3 for a, z in pairs)


def profile_decode_step(config_name: str = "120b", batch: int = 1, context: int = 1024, *,
                        device: torch.device | str | None = None, copy_gbps: float | None = None,
                        reps: int = 30, progress=lambda msg: None) -> dict:
    """Per-op profile of one decode step at the real shapes. Returns {"rows": [...], "summary":
    {...}, "mode": "gpu" | "bytes-only"}: each row op, calls, bytes, and on a GPU us (per call,
    eager, CUDA events, cold L2), gbps, pct_copy (of the copy bandwidth measured here).

    The GPU run builds the model with 2 layers (one sliding, one full; random weights), fills
    positions up to `context`, times every op of the step, and also times the captured 2-layer
    step (graph replay) against the sum of its ops: the difference is launch gaps and overlap."""
    shape = ModelShape.preset(config_name)
    rows = decode_step_ops(shape, batch, context)
    total_bytes = sum(r["calls"] * r["bytes"] for r in rows)
    dev = torch.device(device) if device is not None else (
        torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu"))
    summary = {"config": shape.name, "batch": batch, "context": context, "bytes_per_step": total_bytes,
               "bytes_per_token": total_bytes / batch}
    if dev.type != "cuda":
        return {"mode": "bytes-only", "rows": rows, "summary": summary,
                "note": "no GPU: the byte table only (no timings)"}
    from .timing import measure_limits

    if copy_gbps is None:
        progress("profile: measuring the copy bandwidth")
        copy_gbps = measure_limits(dev, quick=True).copy_gbps
    progress(f"profile: building {shape.name} shapes with 2 layers on {dev}")
    model = _profile_model(config_name, dev)
    st = model.engine.decode_state(batch, context + 64)     # room for the graph-timed steps after the profile
    b = st["buf"]
    b["tok"].random_(0, min(199998, shape.vocab))
    b["pos"].fill_(context - 1)
    b["seqlens"].fill_(context)
    for kc, vc in st["caches"]:      # a filled cache (values only matter for NaN-free timing)
        kc.normal_()
        vc.normal_()
    layer_ids = {"sliding": 0 if model.config.is_sliding(0) else 1, "full": 1 if model.config.is_sliding(0) else 0}
    with torch.inference_mode():
        calls = _op_calls(model, st, layer_ids)
        l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 50 * 2**20) or 50 * 2**20
        flush = torch.zeros(2 * l2, dtype=torch.float32, device=dev)   # 8 x L2 bytes, ~0.1 ms of host lead
        for r in rows:
            progress(f"profile: {r['op']}")
            us = _time_cold(calls[r["op"]], dev, flush, reps)
            r["us"] = us
            r["gbps"] = r["bytes"] / (us * 1e-6) / 1e9
            r["pct_copy"] = 100.0 * r["gbps"] / copy_gbps
        # the 2-layer step replayed as one graph against the sum of its ops
        def time_step() -> tuple[float, bool]:
            st["steps"].clear()          # capture anew (a graph keeps its launches' attributes)
            model.engine.graph = None
            step = model.engine.step_fn(st, "greedy")
            step()
            torch.cuda.synchronize(dev)
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            n = 20
            e0.record()
            for _ in range(n):
                step()
            e1.record()
            torch.cuda.synchronize(dev)
            return e0.elapsed_time(e1) * 1e3 / n, model.engine.graph is not None

        step_us, graph = time_step()
        info = _lib.arch_info(dev)
        # False: the runtime refused the attribute, or the sm_80..89 paths (no PDL there): ordinary launches
        pdl_on = bool(_lib.pdl_enabled() and info and info["pdl"])
        pdl_off_us = unfused_us = None
        before = _lib.set_pdl(False) if pdl_on else False  # the same step with ordinary launches: what PDL buys
        if before:
            try:
                pdl_off_us, _ = time_step()
            finally:
                _lib.set_pdl(True)
        model.fused_decode = False        # and with the separate ops: what the decode-step fusions buy
        try:
            unfused_us, _ = time_step()
        finally:
            model.fused_decode = True
    summary.update(profile_summary(rows, config_name, batch, model.config.num_hidden_layers, copy_gbps, step_us,
                                   bool(graph)), device_name=torch.cuda.get_device_name(dev), step2_pdl_off_us=pdl_off_us,
                   step2_unfused_us=unfused_us, pdl=pdl_on, paths_cc=info["cc"] if info else None)
    del model, st, calls
    torch.cuda.empty_cache()
    return {"mode": "gpu", "rows": rows, "summary": summary}


def profile_summary(rows: list[dict], config_name: str, batch: int, layers: int, copy_gbps: float,
                    step_us: float, graph: bool) -> dict:
    """The profile's totals from timed rows (each with "us"): the step as the sum of its ops, the
    bound (the step's bytes at the copy bandwidth), the measured `layers`-layer step (`step_us`,
    graph replay when `graph`) against the sum of its own ops, and that step scaled to all
    layers (head ops once, the layers' share times num_layers / layers)."""
    per = {r["op"]: r for r in rows}
    L = layers
    full_layers = ModelShape.preset(config_name).num_layers
    once = ("embedding", "rms_norm (first)", "unembedding (fp32 logits)", "sample (argmax)")
    # the L-layer step runs each per-layer op calls * L / full_layers times (sliding: half the layers)
    small = sum(per[o]["us"] for o in once)
    small += sum(r["us"] * r["calls"] * L / full_layers for r in rows if r["op"] not in once)
    head_us = sum(per[o]["us"] for o in ("embedding", "unembedding (fp32 logits)", "sample (argmax)"))
    est_us = head_us + (full_layers / L) * (step_us - head_us)
    sum_us = sum(r["us"] * r["calls"] for r in rows)
    total_bytes = sum(r["bytes"] * r["calls"] for r in rows)
    bound_us = total_bytes / (copy_gbps * 1e9) * 1e6
    return dict(copy_gbps=copy_gbps, sum_us=sum_us, sum_tok_s=batch / (sum_us * 1e-6), bound_us=bound_us,
                bound_tok_s=batch / (bound_us * 1e-6), pct_of_bound=100.0 * bound_us / sum_us,
                step2_graph=bool(graph), step2_us=step_us, step2_sum_ops_us=small,
                est_graph_step_us=est_us, est_graph_tok_s=batch / (est_us * 1e-6))


def format_profile(prof: dict) -> str:
    s = prof["summary"]
    gpu = prof["mode"] == "gpu"
    head = (f"decode-step profile, {s['config']}, batch {s['batch']}, context {s['context']}"
            + (f", {s['device_name']} (eager per op, CUDA events, cold L2)" if gpu else f" -- {prof['note']}"))
    lines = [head, f"{'op':<36} {'calls':>5} {'MB/call':>9} {'us/call':>8} {'GB/s':>7} {'%copy':>6} {'us/step':>8}"]
    for r in prof["rows"]:
        mb = r["bytes"] / 1e6
        if gpu:
            lines.append(f"{r['op']:<36} {r['calls']:>5} {mb:>9.3f} {r['us']:>8.1f} {r['gbps']:>7.0f} "
                         f"{r['pct_copy']:>5.0f}% {r['us'] * r['calls']:>8.0f}")
        else:
            lines.append(f"{r['op']:<36} {r['calls']:>5} {mb:>9.3f} {'-':>8} {'-':>7} {'-':>6} {'-':>8}")
    lines.append(f"bytes per step {s['bytes_per_step'] / 1e9:.3f} GB ({s['bytes_per_token'] / 1e9:.3f} GB/token)")
    if gpu:
        lines.append(f"sum of ops {s['sum_us']:.0f} us/step = {s['sum_tok_s']:.0f} tok/s; bound at the measured copy "
                     f"{s['copy_gbps']:.0f} GB/s: {s['bound_us']:.0f} us = {s['bound_tok_s']:.0f} tok/s; "
                     f"sum is {s['pct_of_bound']:.0f}% of the bound")
        lines.append(f"2-layer step {'(CUDA graph)' if s['step2_graph'] else '(eager)'}: {s['step2_us']:.0f} us "
                     f"vs its ops summed {s['step2_sum_ops_us']:.0f} us (the difference: launch gaps, overlap, "
                     f"warm L2); scaled to all layers: {s['est_graph_step_us']:.0f} us = "
                     f"{s['est_graph_tok_s']:.0f} tok/s ({100 * s['bound_us'] / s['est_graph_step_us']:.0f}% of the bound)")
        if s.get("pdl") is False:
            lines.append(f"PDL is not used on the sm_{s['paths_cc']} paths: ordinary launches only"
                         if (s.get("paths_cc") or 90) < 90 else
                         "PDL is OFF in this run (the runtime refused the launch attribute): ordinary launches only")
        if s.get("step2_pdl_off_us"):
            lines.append(f"2-layer step with PDL off (ordinary launches): {s['step2_pdl_off_us']:.0f} us "
                         f"(PDL on: {s['step2_us']:.0f} us, {s['step2_pdl_off_us'] / s['step2_us']:.2f}x)")
        if s.get("step2_unfused_us"):
            lines.append(f"2-layer step without the fused QKV + RoPE + append and MoE + add + norm: "
                         f"{s['step2_unfused_us']:.0f} us ({s['step2_unfused_us'] / s['step2_us']:.2f}x the fused step)")
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse
    import json
    import sys

    from .timing import refuse_hostsim_timing

    refuse_hostsim_timing()
    p = argparse.ArgumentParser(prog="python -m gptoss_kernels.bench.e2e",
                                description="Per-op profile of one decode step (bytes only without a GPU).")
    p.add_argument("--profile", action="store_true", help="run the decode-step profile (the only mode here)")
    p.add_argument("--config", choices=("120b", "20b"), default="120b")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--device", default=None)
    p.add_argument("--json", default=None, help="also write the profile to this file")
    a = p.parse_args(argv)
    prof = profile_decode_step(a.config, a.batch, a.context, device=a.device,
                               progress=lambda m: print(m, file=sys.stderr, flush=True))
    print(format_profile(prof))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(prof, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
