"""Op benchmarks: MXFP4 MoE, router, attention decode and prefill.

Each case is verified once against ``gptoss_kernels.reference`` (relative norm error), then
timed (timing.bench) with its baselines timed in the same run: the reference path for moe and
router; torch SDPA (flash backend, no sinks) and FlexAttention (sliding window) for attention.
A row whose op has no kernel in this build is reported as such and not timed as a kernel.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .. import _lib, reference
from .. import ops as gops
from .shapes import ModelShape
from .timing import Limits, bench, rel_err, sets_for_cold_l2

# Relative-norm error a kernel's output may show against the fp32 reference (DEVELOPERS.md:
# bf16 output rounding plus bf16 intermediates).
TOLERANCE = 1e-2

# MoE: routed rows T*k up to this run the decode-regime kernel (family moe_decode), above it the
# prefill regime (moe_prefill). ops/moe.py may define MOE_DECODE_MAX_ROWS to override.
MOE_DECODE_MAX_ROWS_DEFAULT = 256

DEFAULT_TOKENS_MOE = (1, 4, 16, 64, 1024, 4096, 8192)
DEFAULT_TOKENS_ROUTER = (1, 64, 8192)
DEFAULT_DECODE_BATCH = (1, 4, 16, 64)
DEFAULT_DECODE_CONTEXT = (8192, 32768, 131072)
DEFAULT_PREFILL_TOKENS = (8192, 16384, 32768)

# reference mode (no GPU): reduced shapes, so the command finishes in seconds on a CPU
REF_TOKENS_MOE, REF_TOKENS_MOE_QUICK = (1, 16), (1,)
REF_TOKENS_ROUTER, REF_TOKENS_ROUTER_QUICK = (1, 64, 512), (1, 16)
REF_DECODE_BATCH, REF_DECODE_BATCH_QUICK = (1, 4), (1,)
REF_DECODE_CONTEXT, REF_DECODE_CONTEXT_QUICK = (512, 2048), (256,)
REF_PREFILL_TOKENS, REF_PREFILL_TOKENS_QUICK = (128, 256), (128,)


@dataclass
class Context:
    device: torch.device
    shape: ModelShape
    limits: Limits | None
    quick: bool = False
    deadline: float | None = None          # time.monotonic() after which cases are skipped
    progress: Callable[[str], None] = lambda msg: None
    target_ms: float = 300.0               # timing budget per kernel measurement
    baseline_ms: float = 150.0             # per baseline measurement
    flex: bool = True                      # time FlexAttention (compiles once per shape)
    min_runs: int = 5
    warmup: int = 2
    broken: str | None = None              # set when the CUDA context became unusable (sticky error)

    @property
    def gpu(self) -> bool:
        return self.device.type == "cuda"

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline


def family_built(family: str | None) -> bool:
    """This build compiled the kernels of `family` (whether or not this machine can run them)."""
    return _lib.family_built(family)


def has_kernel(family: str | None, ctx: Context) -> bool:
    """The op's CUDA path is this build's kernel (not the reference) on this device."""
    return ctx.gpu and _lib.cuda_available() and family_built(family)


def moe_family(tokens: int, k: int) -> str:
    """Kernel family that runs T tokens: the op (ops/moe.py) takes the prefill kernels above
    MOE_DECODE_MAX_ROWS routed rows when they are built, the decode kernels otherwise."""
    from ..ops import moe as moe_mod

    limit = getattr(moe_mod, "MOE_DECODE_MAX_ROWS", MOE_DECODE_MAX_ROWS_DEFAULT)
    return "moe_prefill" if tokens * k > limit and family_built("moe_prefill") else "moe_decode"


@dataclass
class Case:
    op: str
    name: str
    shape: dict
    family: str | None
    bytes: int
    flops: int
    alloc_bytes: int                                   # device memory one extra input set takes
    make: Callable[[int], dict]                        # seed -> inputs
    run: Callable[[dict], Callable[[], object]]        # inputs -> closure calling the op
    verify: Callable[[dict], dict]                     # inputs -> {"rel_err", "passed", ...}
    baselines: list[tuple[str, Callable[[dict], Callable[[], object]]]] = field(default_factory=list)
    external_baselines: tuple[str, ...] = ()           # baselines worth timing even without a kernel
    shared: dict = field(default_factory=dict)         # tensors shared by all sets (weights)


# ---------------------------------------------------------------------------------------------
# Case builders
# ---------------------------------------------------------------------------------------------


def _gen(seed: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def _randn(shape, g, device, dtype=torch.bfloat16, scale=1.0):
    """Random normal drawn directly in `dtype` (a 17 GB KV cache must not pass through float32)."""
    t = torch.randn(shape, generator=g, device=device, dtype=dtype)
    return t.mul_(scale) if scale != 1.0 else t


def moe_weights(E: int, H: int, I: int, device: torch.device, seed: int = 1234) -> dict:
    """Random MXFP4 expert weights in the checkpoint layout; scales near 2^-6 keep outputs O(1)."""
    g = _gen(seed, device)
    u8 = dict(dtype=torch.uint8, device=device, generator=g)
    return {
        "w1_blocks": torch.randint(0, 256, (E, 2 * I, H // 32, 16), **u8),
        "w1_scales": torch.randint(119, 124, (E, 2 * I, H // 32), **u8),
        "w1_bias": _randn((E, 2 * I), g, device, scale=0.1),
        "w2_blocks": torch.randint(0, 256, (E, H, I // 32, 16), **u8),
        "w2_scales": torch.randint(119, 124, (E, H, I // 32), **u8),
        "w2_bias": _randn((E, H), g, device, scale=0.1),
    }


def random_routing(T: int, E: int, k: int, g: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor]:
    """k distinct experts per token, uniformly; softmax weights."""
    ids = torch.rand((T, E), generator=g, device=device).topk(k, dim=1).indices.to(torch.int32)
    w = torch.softmax(torch.randn((T, k), generator=g, device=device), dim=1)
    return ids.contiguous(), w.contiguous()


def moe_cases(ctx: Context, tokens) -> list[Case]:
    s = ctx.shape
    if ctx.gpu:
        E, H, I = s.num_experts, s.hidden, s.intermediate
    else:  # reference mode: reduced shapes
        E, H, I = (8, 128, 128) if ctx.quick else (8, 256, 256)
    k = s.k
    dev = ctx.device
    shared: dict = {}

    def weights():
        if not shared:
            shared.update(moe_weights(E, H, I, dev))
        return shared

    one_expert = 2 * I * H // 2 + 2 * I * H // 32 + 2 * I * 2 + H * I // 2 + H * I // 32 + H * 2
    cases = []
    for T in tokens:
        def make(seed, T=T):
            g = _gen(seed, dev)
            ids, w = random_routing(T, E, k, g, dev)
            return {"x": _randn((T, H), g, dev), "topk_ids": ids, "topk_weights": w,
                    "out": torch.empty((T, H), dtype=torch.bfloat16, device=dev), **weights()}

        def run(a):
            return lambda: gops.moe_mxfp4(a["x"], a["topk_ids"], a["topk_weights"], a["w1_blocks"], a["w1_scales"],
                                          a["w1_bias"], a["w2_blocks"], a["w2_scales"], a["w2_bias"], out=a["out"])

        def ref(a):
            return lambda: reference.moe(a["x"], a["topk_ids"], a["topk_weights"], a["w1_blocks"], a["w1_scales"],
                                         a["w1_bias"], a["w2_blocks"], a["w2_scales"], a["w2_bias"])

        def verify(a, run=run, ref=ref):
            a["out"].fill_(float("nan"))
            run(a)()
            return _verdict(rel_err(a["out"], ref(a)()))

        distinct = min(E, round(E * (1 - (1 - k / E) ** T)))  # expected distinct experts (uniform routing)
        nbytes = distinct * one_expert + 2 * T * H * 2 + T * k * 8
        cases.append(Case(
            op="moe_mxfp4", name=f"T={T} ({moe_family(T, k).split('_')[1]} kernels)",
            shape={"T": T, "E": E, "k": k, "H": H, "I": I}, family=moe_family(T, k), bytes=int(nbytes),
            flops=2 * T * k * (2 * I * H + H * I), alloc_bytes=T * H * 4 + T * k * 8,
            make=make, run=run, verify=verify, baselines=[("reference", ref)]))
    return cases


def router_cases(ctx: Context, tokens) -> list[Case]:
    s = ctx.shape
    E, H, k, dev = s.num_experts, s.hidden, s.k, ctx.device
    shared: dict = {}
    cases = []
    for T in tokens:
        def make(seed, T=T):
            g = _gen(seed, dev)
            if not shared:
                g0 = _gen(4321, dev)
                shared.update(weight=_randn((E, H), g0, dev, scale=H ** -0.5), bias=_randn((E,), g0, dev, scale=0.1))
            return {"x": _randn((T, H), g, dev), **shared}

        def run(a):
            return lambda: gops.router_topk(a["x"], a["weight"], a["bias"], k)

        def ref(a):
            return lambda: reference.router_topk(a["x"], a["weight"], a["bias"], k)

        def verify(a, run=run, ref=ref):
            ids, w = run(a)()
            rids, rw = ref(a)()
            match = (ids == rids).all(dim=1).float().mean().item() if ids.numel() else 1.0
            err = rel_err(w, rw)
            # a near-tie may order two experts differently under another summation order
            return {"rel_err": err, "ids_match": match, "tol": TOLERANCE,
                    "passed": bool(match >= 0.99 and err == err and err <= TOLERANCE)}

        cases.append(Case(
            op="router_topk", name=f"T={T}", shape={"T": T, "E": E, "H": H, "k": k}, family="router",
            bytes=E * H * 2 + E * 2 + T * H * 2 + T * k * 8, flops=2 * T * E * H, alloc_bytes=T * H * 2,
            make=make, run=run, verify=verify, baselines=[("reference", ref)] + (
                # the two-kernel path the one-kernel cluster path replaces at decode sizes
                [("split path", lambda a: lambda: gops.router_topk(a["x"], a["weight"], a["bias"], k, path="split"))]
                if ctx.gpu and T <= 64 and E <= 128 and _takes_cluster_path(ctx.device) else [])))
    return cases


def _takes_cluster_path(device) -> bool:
    """Whether the router's kernels on `device` take the cluster path (so the split path is a
    baseline); False when the device cannot say (e.g. the suite collecting its cases without a GPU)."""
    try:
        return _lib.clusters_available(device)
    except (RuntimeError, AssertionError):   # no driver; torch without CUDA (its AssertionError)
        return False


def _sdpa_flash(q, k, v, *, causal: bool):
    """torch SDPA restricted to the flash backend (no sinks); q [B, nq, Tq, d], k/v [B, nkv, Tk, d]."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=0.125,
                                                                enable_gqa=True)


CAPACITY_ROW_SLOTS = 131072  # gpt-oss's context: the cache a user allocates for the longest prompts


def decode_cases(ctx: Context, batches, contexts, *, sliding_rows: bool = True) -> list[Case]:
    s = ctx.shape
    nq, nkv, d, W, dev = s.nq, s.nkv, s.head_dim, s.sliding_window, ctx.device
    cases = []
    # full layers: S = context; sliding layers: a ring of 128
    combos = [(B, L, None, L) for L in contexts for B in batches]
    if sliding_rows:
        combos += [(B, max(contexts), W, W) for B in sorted(set(batches))[-1:]]
    if contexts and batches:
        # the shortest context in caches of twice its size and of the model's whole context: the
        # work of a step follows the lengths, not the capacity (these rows should time alike)
        B0, L0 = min(batches), min(contexts)
        combos += [(B0, L0, None, S) for S in sorted({2 * L0, max(2 * L0, CAPACITY_ROW_SLOTS)})]
    for B, L, win, S in combos:

        def make(seed, B=B, L=L, S=S):
            g = _gen(seed, dev)
            return {"q": _randn((B, nq, d), g, dev), "k_cache": _randn((B, S, nkv, d), g, dev),
                    "v_cache": _randn((B, S, nkv, d), g, dev),
                    "cache_seqlens": torch.full((B,), L, dtype=torch.int32, device=dev),
                    "sinks": _randn((nq,), g, dev), "out": torch.empty((B, nq, d), dtype=torch.bfloat16, device=dev)}

        def run(a, win=win):
            return lambda: gops.attention_decode(a["q"], a["k_cache"], a["v_cache"], a["cache_seqlens"], a["sinks"],
                                                 sliding_window=win, out=a["out"])

        def verify(a, win=win, run=run):
            a["out"].fill_(float("nan"))
            run(a)()
            nb = min(a["q"].shape[0], 2)  # the reference on two sequences bounds its memory and time
            r = reference.attention_decode(a["q"][:nb], a["k_cache"][:nb], a["v_cache"][:nb], a["cache_seqlens"][:nb],
                                           a["sinks"], sliding_window=win)
            v = _verdict(rel_err(a["out"][:nb], r))
            if torch.isnan(a["out"]).any().item():
                v.update(passed=False, note="NaN left in the output")
            return v

        def sdpa(a, win=win, L=L):
            B_, S_ = a["k_cache"].shape[0], a["k_cache"].shape[1]
            n = min(L, S_) if win is None else min(L, win)
            q = a["q"].unsqueeze(2)                                     # [B, nq, 1, d]
            kk = a["k_cache"][:, S_ - n:] if win is not None else a["k_cache"][:, :n]
            vv = a["v_cache"][:, S_ - n:] if win is not None else a["v_cache"][:, :n]
            kk, vv = kk.transpose(1, 2), vv.transpose(1, 2)             # [B, nkv, n, d] views
            return lambda: _sdpa_flash(q, kk, vv, causal=False)

        kv_read = B * min(L, S) * nkv * d * 2 * 2
        name = f"B={B} ctx={L}" + ("" if win is None else f" sliding W={win}") + ("" if S in (L, win) else f" cache={S}")
        cases.append(Case(
            op="attention_decode", name=name, shape={"B": B, "context": L, "cache_slots": S, "window": win,
                                                     "nq": nq, "nkv": nkv, "d": d},
            family="attention_decode", bytes=kv_read + 2 * B * nq * d * 2,
            flops=4 * B * nq * min(L, S) * d, alloc_bytes=2 * B * S * nkv * d * 2 + 2 * B * nq * d * 2,
            make=make, run=run, verify=verify,
            baselines=[("sdpa-flash (no sinks)", sdpa)] if ctx.gpu else [],
            external_baselines=("sdpa-flash (no sinks)",)))
    return cases


def _visible_pairs(T: int, window: int | None) -> int:
    if window is None or window >= T:
        return T * (T + 1) // 2
    return window * (window + 1) // 2 + (T - window) * window


_flex_cache: dict = {}


def _flex_sliding(q, k, v, window: int):
    """FlexAttention (torch.compile'd) with a sliding-window causal block mask; [1, h, T, d] layout."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    T = q.shape[2]
    if "fn" not in _flex_cache:
        _flex_cache["fn"] = torch.compile(flex_attention, dynamic=False)
    key = (T, window, str(q.device))
    if key not in _flex_cache:
        def mask(b, h, qi, ki):
            return (ki <= qi) & (qi - ki < window)
        _flex_cache[key] = create_block_mask(mask, None, None, T, T, device=q.device)
    fn, bm = _flex_cache["fn"], _flex_cache[key]
    return lambda: fn(q, k, v, block_mask=bm, scale=0.125, enable_gqa=True)


def prefill_cases(ctx: Context, tokens) -> list[Case]:
    s = ctx.shape
    nq, nkv, d, W, dev = s.nq, s.nkv, s.head_dim, s.sliding_window, ctx.device
    cases = []
    for win in (None, W):
        for T in tokens:
            def make(seed, T=T):
                g = _gen(seed, dev)
                return {"q": _randn((T, nq, d), g, dev), "k": _randn((T, nkv, d), g, dev),
                        "v": _randn((T, nkv, d), g, dev), "sinks": _randn((nq,), g, dev),
                        "out": torch.empty((T, nq, d), dtype=torch.bfloat16, device=dev)}

            def run(a, win=win):
                return lambda: gops.attention_prefill(a["q"], a["k"], a["v"], a["sinks"], sliding_window=win,
                                                      out=a["out"])

            def verify(a, win=win, T=T, run=run):
                a["out"].fill_(float("nan"))
                run(a)()
                # the reference on two slices of 256 queries (first and last) bounds its memory
                errs, n = [], min(T, 256)
                for s0 in sorted({0, T - n}):
                    first = 0 if win is None else max(0, s0 - win + 1)
                    r = reference.attention(a["q"][s0:s0 + n], a["k"][first:s0 + n], a["v"][first:s0 + n], a["sinks"],
                                            sliding_window=win, q_offset=s0 - first)
                    errs.append(rel_err(a["out"][s0:s0 + n], r))
                v = _verdict(max(errs))
                if torch.isnan(a["out"]).any().item():
                    v.update(passed=False, note="NaN left in the output")
                return v

            def as_bhtd(a):
                return (a["q"].unsqueeze(0).transpose(1, 2), a["k"].unsqueeze(0).transpose(1, 2),
                        a["v"].unsqueeze(0).transpose(1, 2))

            if win is None:
                baselines = [("sdpa-flash (no sinks)", lambda a: (lambda q, k, v: lambda: _sdpa_flash(q, k, v, causal=True))(*as_bhtd(a)))]
            elif ctx.flex and T == min(tokens):  # torch.compile per shape: one shape keeps the run short
                baselines = [("flex-attention (no sinks)", lambda a, win=win: _flex_sliding(*[t.contiguous() for t in as_bhtd(a)], win))]
            else:
                baselines = []
            pairs = _visible_pairs(T, win)
            cases.append(Case(
                op="attention_prefill", name=f"T={T} " + ("causal" if win is None else f"sliding W={win}"),
                shape={"T": T, "window": win, "nq": nq, "nkv": nkv, "d": d}, family="attention_prefill",
                bytes=T * (nq + 2 * nkv) * d * 2 + T * nq * d * 2, flops=4 * nq * d * pairs,
                alloc_bytes=T * (2 * nq + 2 * nkv) * d * 2, make=make, run=run, verify=verify,
                baselines=baselines if ctx.gpu else [], external_baselines=tuple(b[0] for b in baselines)))
    return cases


def _verdict(err: float) -> dict:
    return {"rel_err": err, "tol": TOLERANCE, "passed": bool(err == err and err <= TOLERANCE)}


# ---------------------------------------------------------------------------------------------
# Running a case
# ---------------------------------------------------------------------------------------------


def _rates(row: dict, time_us: float, limits: Limits | None) -> None:
    row["time_us"] = time_us
    row["gbps"] = row["bytes"] / (time_us * 1e-6) / 1e9 if time_us else None
    row["tflops"] = row["flops"] / (time_us * 1e-6) / 1e12 if time_us else None
    if limits is not None and time_us:
        row["pct_bw"] = 100.0 * row["gbps"] / limits.copy_gbps
        row["pct_flops"] = 100.0 * row["tflops"] / limits.matmul_tflops


def run_case(case: Case, ctx: Context) -> dict:
    row = {"op": case.op, "case": case.name, "shape": case.shape, "family": case.family, "bytes": case.bytes,
           "flops": case.flops, "status": None, "reason": None, "time_us": None, "gbps": None, "tflops": None,
           "pct_bw": None, "pct_flops": None, "timing": None, "verify": None, "baselines": [], "speedup": None}
    if ctx.broken:
        row.update(status="skipped", reason=ctx.broken)
        return row
    if ctx.out_of_time():
        row.update(status="skipped", reason="time budget (--max-seconds) spent")
        return row
    kernel = has_kernel(case.family, ctx)
    if ctx.gpu and not kernel:
        why = (f"no kernel: family '{case.family}' is not in this build"
               if not family_built(case.family) else f"kernels not usable: {_lib.kernels_error()}")
        row.update(status="no-kernel", reason=why)
        if not case.external_baselines:
            return row
    try:
        if kernel or not ctx.gpu:
            sets, row["verify"] = prepare_case(case, ctx)
            t = bench([case.run(a) for a in sets], ctx.device, target_ms=ctx.target_ms, min_runs=ctx.min_runs,
                      warmup=ctx.warmup)
            row["timing"] = t.to_json()
            _rates(row, t.median_us, ctx.limits)
            row["status"] = "ok" if ctx.gpu else "reference"
            if not ctx.gpu:
                row["reason"] = "reference mode (no GPU): not a kernel measurement"
        else:
            sets = [case.make(0)]
        for name, make_fn in case.baselines:
            if not kernel and name not in case.external_baselines:
                continue
            row["baselines"].append(_run_baseline(name, make_fn, sets, case, ctx, row["time_us"]))
        ok = [b for b in row["baselines"] if b.get("speedup")]
        row["speedup"] = ok[0]["speedup"] if ok else None
    except torch.cuda.OutOfMemoryError as e:
        row.update(status="error", reason=f"out of memory: {str(e).splitlines()[0][:160]}")
    except Exception as e:  # noqa: BLE001 - one failing case must not end the run
        row.update(status="error", reason=f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
    finally:
        _settle(ctx, f"{case.op} {case.name}")
    return row


def prepare_case(case: Case, ctx: Context, *, stop_if_failed: bool = False) -> tuple[list[dict], dict]:
    """(input sets, verification): input set 0, the op verified once on it against the reference
    (before any timing), then the further sets a pass rotates through to keep L2 cold (as many as
    overflow L2 about 3 times and fit in half the free memory). With stop_if_failed, a failed
    verification returns set 0 alone. Used by run_case and by the pytest-benchmark suite."""
    a0 = case.make(0)
    verify = case.verify(a0)
    if stop_if_failed and not verify.get("passed"):
        return [a0], verify
    n = sets_for_cold_l2(max(case.bytes, 1), ctx.device, memory_cap=None)
    n = max(1, min(n, _fit_sets(case, ctx)))
    return [a0] + [case.make(i) for i in range(1, n)], verify


def _settle(ctx: Context, what: str) -> None:
    """Synchronise after a case; a sticky CUDA error (e.g. an illegal address) ends the GPU work."""
    if not ctx.gpu:
        return
    try:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    except Exception as e:  # noqa: BLE001
        ctx.broken = (f"not run: the CUDA context is unusable after '{what}' "
                      f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})")
        ctx.progress(ctx.broken)


def _fit_sets(case: Case, ctx: Context) -> int:
    if not ctx.gpu:
        return 1
    free, _ = torch.cuda.mem_get_info(ctx.device)
    return max(1, int(0.5 * free // max(case.alloc_bytes, 1)))


def _run_baseline(name, make_fn, sets, case, ctx, kernel_us) -> dict:
    b = {"name": name, "time_us": None, "speedup": None, "status": "ok", "reason": None, "timing": None}
    try:
        # the reference is slow: a few runs over at most 2 sets
        use = sets[: 2 if name == "reference" else len(sets)]
        t = bench([make_fn(a) for a in use], ctx.device, target_ms=ctx.baseline_ms, min_runs=3, warmup=1,
                  use_graph=False)
        b["timing"] = t.to_json()
        b["time_us"] = t.median_us
        if kernel_us:
            b["speedup"] = t.median_us / kernel_us
    except Exception as e:  # noqa: BLE001 - a baseline unavailable here (e.g. no flash backend)
        b.update(status="unavailable", reason=f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")
        _settle(ctx, f"baseline {name}")
    return b
