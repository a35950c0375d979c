"""The kernel benchmarks as a pytest-benchmark suite (``bench/suite/``): what it needs besides pytest.

The cases are the CLI's: ``cli.plan_cases(ctx, "all")`` for the ops and ``e2e.plan`` over
``cli.e2e_grids`` for the model end to end, at the GPU grid (``--quick``'s with ``quick``), so
the suite's test ids are ``gptoss-kernels bench all``'s rows on any machine.

How a round is timed, and why this way
--------------------------------------
pytest-benchmark times a round as ``timer()`` after it minus ``timer()`` before it. A host
clock (``time.perf_counter``), even one that synchronises the stream first, would put the
launch latency and the synchronisation's wake-up (several µs each) into every round: for a
5 µs kernel that is most of the number, and it would not be the figure ``gptoss-kernels bench``
reports. So the suite's timer is ``device_clock``: a clock that moves only inside a round, by
the device time that round measured.

- A round (``EventTimer``) is one pass over the rotated input sets that keep L2 cold, built by
  ``timing.prepare_pass`` exactly as the CLI builds it (a CUDA graph replay for calls under
  200 µs, eager launches otherwise), between two CUDA events on the current stream. Before
  the first event the GPU is kept busy by a spin kernel (``torch.cuda._sleep``, no memory
  traffic) for about twice the time the host takes to queue the pass, so the interval between
  the events holds the pass's device work and no host gap. The host waits on the end event,
  outside the interval.
- The round's duration is that interval divided by the calls in the pass: the time per call,
  as the CLI's ``time_us``. pedantic's ``setup`` (not timed) resets the clock to 0 before each
  round, so the duration pytest-benchmark records is exactly the measured value.
- Warm-up: ``prepare_pass`` runs the calls first (and captures the graph), then pedantic's
  ``warmup_rounds`` run whole rounds whose durations are discarded.
- The verification against the reference runs once, on input set 0, before any timing
  (``ops.prepare_case``); a failed verification fails the test and nothing is timed.

pytest-benchmark's statistics, saved runs, ``compare``, ``--benchmark-compare-fail`` and
histograms then all work on device time. ``device_clock`` is only meaningful with
``benchmark.pedantic`` (``benchmark(fn)`` calibrates against a clock that would not move).
The host build of the kernels is never timed: without a CUDA GPU the suite skips.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .. import _lib
from . import cli as bench_cli
from . import e2e as e2e_mod
from . import ops as O
from .shapes import ModelShape
from .timing import Limits, measure_limits, prepare_pass

# pedantic's rounds: explicit, not calibrated (the CLI repeats for ~300 ms; a round here is a whole pass)
DEFAULT_ROUNDS, QUICK_ROUNDS = 30, 15
DEFAULT_WARMUP_ROUNDS = 3
# the model's prefill takes up to seconds a round: this many times fewer rounds (at least 2)
E2E_PREFILL_ROUND_DIVISOR = 10
# a model row is not started with less than this left before --gk-max-seconds (the first builds the model)
E2E_MIN_SECONDS = 30.0


# ---------------------------------------------------------------------------------------------
# The clock pytest-benchmark reads
# ---------------------------------------------------------------------------------------------


class DeviceClock:
    """Seconds of device time; moved by the rounds only (``advance``), reset before each round."""

    def __init__(self) -> None:
        self.now = 0.0

    def reset(self) -> None:
        self.now = 0.0

    def advance(self, seconds: float) -> None:
        self.now += seconds


CLOCK = DeviceClock()


def device_clock() -> float:
    """The suite's pytest-benchmark timer (``@pytest.mark.benchmark(timer=device_clock)``)."""
    return CLOCK.now


# ---------------------------------------------------------------------------------------------
# The device timer of one round
# ---------------------------------------------------------------------------------------------


def spin_rate(device: torch.device) -> float | None:
    """Cycles per µs of ``torch.cuda._sleep`` (the SM clock, measured while it runs: the fastest
    of three spins, so the lead it gives is never shorter than asked); None if unavailable."""
    sleep = getattr(torch.cuda, "_sleep", None)
    if sleep is None:
        return None
    try:
        cycles = 2_000_000
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        sleep(cycles // 10)
        best_us = None
        for _ in range(3):
            e0.record()
            sleep(cycles)
            e1.record()
            e1.synchronize()
            us = e0.elapsed_time(e1) * 1e3
            best_us = us if best_us is None else min(best_us, us)
        torch.cuda.synchronize(device)
        return cycles / best_us if best_us and best_us > 0 else None
    except Exception:  # noqa: BLE001 - no spin kernel: time without a lead (and say so)
        return None


class EventTimer:
    """Device seconds of one pass: CUDA events around it, the GPU kept busy for ``lead_us``
    before the first event (see the module docstring), the host synchronised after the last."""

    name = "cuda-events"

    def __init__(self, device: torch.device, cycles_per_us: float | None):
        self.device = device
        self.cycles_per_us = cycles_per_us
        self.lead_us = 50.0
        self._events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))

    def set_lead(self, host_us: float) -> float:
        """Lead for a pass the host queues in `host_us`: twice that plus 20 µs, at most 20 ms."""
        self.lead_us = min(20_000.0, 2.0 * host_us + 20.0)
        return self.lead_us

    def __call__(self, one_pass: Callable[[], object]) -> float:
        e0, e1 = self._events
        if self.cycles_per_us:
            torch.cuda._sleep(int(self.lead_us * self.cycles_per_us))
        e0.record()
        one_pass()
        e1.record()
        e1.synchronize()
        return e0.elapsed_time(e1) * 1e-3


def host_enqueue_us(one_pass: Callable[[], object], device: torch.device, reps: int = 3) -> float:
    """The host's time to queue one pass (median of `reps`; synchronised between them)."""
    samples = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        one_pass()
        samples.append((time.perf_counter() - t) * 1e6)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return sorted(samples)[len(samples) // 2]


def measure(benchmark, one_pass: Callable[[], object], calls_per_round: int, *,
            timer: Callable[[Callable[[], object]], float], rounds: int, warmup_rounds: int) -> dict | None:
    """Run pedantic with explicit rounds; each round's duration is ``timer(one_pass)`` seconds
    (the device time of one pass) / ``calls_per_round``. Returns pytest-benchmark's statistics
    of the timed rounds in seconds per call ({"median", "min", "max", "mean", "stddev",
    "iqr", "rounds"}), or None when benchmarks are disabled (--benchmark-disable)."""
    fixture_timer = getattr(benchmark, "_timer", device_clock)
    if fixture_timer is not device_clock:
        raise RuntimeError("the suite's tests must read the device clock: mark them "
                           "@pytest.mark.benchmark(timer=gptoss_kernels.bench.suite.device_clock)")

    def one_round():
        CLOCK.advance(timer(one_pass) / calls_per_round)

    benchmark.pedantic(one_round, setup=CLOCK.reset, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
    st = getattr(benchmark, "stats", None)
    if not st:
        return None
    s = st.stats
    return {"median": s.median, "min": s.min, "max": s.max, "mean": s.mean, "stddev": s.stddev, "iqr": s.iqr,
            "rounds": s.rounds}


# ---------------------------------------------------------------------------------------------
# The cases: the CLI's
# ---------------------------------------------------------------------------------------------


def collection_context(config: str = "120b", quick: bool = False) -> O.Context:
    """A context that builds the CLI's GPU cases without touching a GPU (the case builders only
    allocate when a case is made)."""
    return O.Context(device=torch.device("cuda"), shape=ModelShape.preset(config), limits=None, quick=quick)


def kernel_cases(config: str = "120b", quick: bool = False) -> list[O.Case]:
    """``gptoss-kernels bench all``'s op cases on a GPU (``--quick``'s with quick), in its order."""
    return bench_cli.plan_cases(collection_context(config, quick), "all", quick=quick)


def e2e_rows(config: str = "120b", quick: bool = False) -> list[dict]:
    """``gptoss-kernels bench all``'s end-to-end rows on a GPU (decode steps, prefills), in its order."""
    return e2e_mod.plan(ModelShape.preset(config), None, *bench_cli.e2e_grids(True, quick))


def case_id(case: O.Case) -> str:
    """A kernel test's id: the CLI's op and case name, as its table prints them."""
    return f"{case.op} {case.name}"


def e2e_id(row: dict) -> str:
    return f"e2e {row['case']}"


# ---------------------------------------------------------------------------------------------
# The session: the card, its measured limits, the timer
# ---------------------------------------------------------------------------------------------


def no_gpu_reason() -> str | None:
    """Why the suite cannot time anything here (None: it can)."""
    if not torch.cuda.is_available():
        hs = "present in this install" if _lib.hostsim_built() else "not built here"
        return ("no CUDA GPU visible to torch: the suite times the kernels on a GPU only; the host build of the "
                f"kernels (gptoss_kernels._hostsim, {hs}) is for testing and is never timed")
    err = _lib.kernels_error()
    if err:
        return f"this package's kernels do not run on this GPU ({err}): nothing to time"
    return None


def environment(device: torch.device) -> dict:
    """The card and the commit, as the CLI's JSON records them."""
    from .report import environment as report_env

    env = report_env(device)
    return {k: env.get(k) for k in ("card", "driver", "compute_capability", "sms", "memory_gib", "l2_mib",
                                    "git_commit", "git_dirty", "torch", "torch_cuda", "python")}


@dataclass
class Session:
    device: torch.device
    config: str
    quick: bool
    limits: Limits | None
    ctx: O.Context
    timer: Callable[[Callable[[], object]], float]
    env: dict
    rounds: int = DEFAULT_ROUNDS
    warmup_rounds: int = DEFAULT_WARMUP_ROUNDS
    deadline: float | None = None             # time.monotonic() after which tests skip
    spin_cycles_per_us: float | None = None
    notes: list[str] = field(default_factory=list)

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline


def make_session(config: str = "120b", quick: bool = False, *, rounds: int | None = None,
                 warmup_rounds: int = DEFAULT_WARMUP_ROUNDS, deadline: float | None = None) -> Session:
    """On the GPU: the copy and matmul ceilings measured now (as the CLI does, in the same
    session), then the spin kernel's rate (clocks are up after the matmul), then the timer."""
    device = torch.device("cuda", torch.cuda.current_device())
    limits = measure_limits(device, quick=quick)
    ctx = O.Context(device=device, shape=ModelShape.preset(config), limits=limits, quick=quick, deadline=deadline)
    rate = spin_rate(device)
    s = Session(device=device, config=config, quick=quick, limits=limits, ctx=ctx, timer=EventTimer(device, rate),
                env=environment(device), rounds=rounds or (QUICK_ROUNDS if quick else DEFAULT_ROUNDS),
                warmup_rounds=warmup_rounds, deadline=deadline, spin_cycles_per_us=rate)
    if rate is None:
        s.notes.append("torch.cuda._sleep unavailable: rounds start without a lead (launch latency may be timed)")
    return s


def machine_info(s: Session | None) -> dict:
    """What pytest-benchmark's machine_info gets (the card next to the CPU it already records)."""
    if s is None:
        return {"gpu": None}
    lim = s.limits.to_json() if s.limits is not None else None
    return {"gpu": {**s.env, "limits": lim, "spin_cycles_per_us": s.spin_cycles_per_us}, "config": s.config,
            "quick": s.quick}


# ---------------------------------------------------------------------------------------------
# extra_info
# ---------------------------------------------------------------------------------------------


def kernel_variant(family: str | None) -> dict:
    """The family and the selection knobs in effect for it (the C side's AUTO choices are
    named as such: which instance AUTO picks is the kernel's decision, see bench/RESULTS.md)."""
    v: dict = {"family": family, "pdl": _lib.pdl_enabled()}
    if family == "attention_decode":
        from ..ops import attention

        v["decode_variant"] = attention.DECODE_VARIANT          # 0: the library's default
    elif family == "attention_prefill":
        v["prefill_impl"] = os.environ.get("GPTOSS_ATTENTION_PREFILL_IMPL", "0")   # 0: the build's choice
    elif family == "moe_prefill":
        v["moe_prefill_variant"] = "auto"                       # ops._moe_prefill.AUTO, the op's default
    elif family == "router":
        v["router_path"] = "auto"                               # router_topk(path="auto")
    return v


def _rates(nbytes: int | None, flops: int | None, t_s: float | None, limits: Limits | None) -> dict:
    out = {"time_us": None, "gbps": None, "pct_bw": None, "tflops": None, "pct_flops": None}
    if not t_s:
        return out
    out["time_us"] = t_s * 1e6
    if nbytes:
        out["gbps"] = nbytes / t_s / 1e9
        if limits is not None:
            out["pct_bw"] = 100.0 * out["gbps"] / limits.copy_gbps
    if flops:
        out["tflops"] = flops / t_s / 1e12
        if limits is not None:
            out["pct_flops"] = 100.0 * out["tflops"] / limits.matmul_tflops
    return out


def _session_info(s: Session) -> dict:
    lim = s.limits
    return {"config": s.config, "card": s.env.get("card"), "commit": s.env.get("git_commit"),
            "dirty": s.env.get("git_dirty"),
            "copy_gbps": lim.copy_gbps if lim else None, "matmul_tflops": lim.matmul_tflops if lim else None,
            "matmul_dtype": lim.matmul_dtype if lim else None}


def kernel_extra_info(case: O.Case, verify: dict, stats: dict | None, s: Session, timing: dict) -> dict:
    """What a kernel engineer reads first, from the median round (the CLI's statistic): bytes,
    GB/s and % of the copy bandwidth measured in this session, TFLOP/s and % of the matmul rate,
    the relative error of the verification, the card, the commit, the kernel variant."""
    t = stats["median"] if stats else None
    return {"op": case.op, "case": case.name, "shape": case.shape, "bytes": case.bytes, "flops": case.flops,
            **_rates(case.bytes, case.flops, t, s.limits), **_session_info(s),
            "rel_err": verify.get("rel_err"), "tol": verify.get("tol"), "verify": verify,
            "variant": kernel_variant(case.family), "statistic": "median", "timing": timing}


def e2e_extra_info(row: dict, stats: dict | None, s: Session, variant: dict, verify: dict, timing: dict) -> dict:
    """The decode step: bytes one step must read, GB/s and % of the copy bandwidth, tok/s and the
    bound (the step's bytes at the measured copy rate). The prefill: tok/s and time to first token
    (as `bench e2e`: prefill + the first token; no byte count, it is compute bound)."""
    t = stats["median"] if stats else None
    B, L = row["batch"], row["context"]
    decode = row["case"].startswith("decode")
    info = {"op": "e2e", "case": row["case"], "batch": B, "context": L, **_session_info(s),
            "bytes": int(row["bytes_per_step"]) if decode else None, "flops": None,
            **_rates(int(row["bytes_per_step"]) if decode else None, None, t, s.limits),
            "tok_s": None, "ms_per_step": None, "ttft_ms": None, "bound_tok_s": None, "pct_of_bound": None,
            "rel_err": None, "tol": None, "verify": verify, "variant": variant, "statistic": "median",
            "timing": timing}
    if t:
        if decode:
            info["ms_per_step"] = t * 1e3
            info["tok_s"] = B / t
            if s.limits is not None:
                info["bound_tok_s"] = e2e_mod.bound_tok_s(s.ctx.shape, B, L, s.limits.copy_gbps)
                info["pct_of_bound"] = 100.0 * info["tok_s"] / info["bound_tok_s"]
        else:
            info["ttft_ms"] = t * 1e3
            info["tok_s"] = B * L / t
    return info


# ---------------------------------------------------------------------------------------------
# The tests' bodies
# ---------------------------------------------------------------------------------------------


def kernel_skip_reason(case: O.Case, s: Session) -> str | None:
    if s.ctx.broken:
        return s.ctx.broken
    if s.out_of_time():
        return "time budget (--gk-max-seconds) spent"
    if s.ctx.gpu and not O.has_kernel(case.family, s.ctx):
        if not O.family_built(case.family):
            return f"no kernel: family '{case.family}' is not in this build (the op would time the reference)"
        return f"kernels not usable: {_lib.kernels_error()}"
    return None


def _verify_failed(what: str, v: dict) -> str:
    err = v.get("rel_err")
    return (f"{what}: the verification against the reference failed (rel err "
            f"{'nan' if err is None or err != err else f'{err:.2e}'} > tol {v.get('tol')}"
            f"{'; ' + v['note'] if v.get('note') else ''}): not timed")


def bench_kernel(benchmark, case: O.Case, s: Session) -> dict:
    """Verify once, then time the CLI's pass over cold-L2 input sets; fill extra_info."""
    import pytest

    benchmark.group = case.op
    try:
        sets, verify = O.prepare_case(case, s.ctx, stop_if_failed=True)
        if not verify.get("passed"):
            benchmark.extra_info.update(op=case.op, case=case.name, verify=verify, rel_err=verify.get("rel_err"))
            pytest.fail(_verify_failed(f"{case.op} {case.name}", verify), pytrace=False)
        p = prepare_pass([case.run(a) for a in sets], s.device, warmup=s.ctx.warmup)
        host_us = host_enqueue_us(p.run, s.device)
        lead_us = s.timer.set_lead(host_us) if hasattr(s.timer, "set_lead") else None
        stats = measure(benchmark, p.run, p.calls, timer=s.timer, rounds=s.rounds, warmup_rounds=s.warmup_rounds)
        timing = {"timer": getattr(s.timer, "name", type(s.timer).__name__), "method": p.method,
                  "calls_per_round": p.calls, "input_sets": len(sets), "rounds": s.rounds,
                  "warmup_rounds": s.warmup_rounds, "lead_us": lead_us, "host_enqueue_us": host_us,
                  "note": p.note}
        info = kernel_extra_info(case, verify, stats, s, timing)
        benchmark.extra_info.update(info)
        return info
    finally:
        sets = p = None  # noqa: F841 - free the input sets before the next case
        O._settle(s.ctx, f"{case.op} {case.name}")


def build_model(s: Session):
    """The model at the config's real shapes with random weights (as `bench e2e`)."""
    GptOss, GptOssConfig = e2e_mod.load_model_api()
    return GptOss.from_config(e2e_mod.config_for(s.config, GptOssConfig), device=str(s.device), seed=0)


def e2e_skip_reason(row: dict, s: Session, steps: int) -> str | None:
    if s.ctx.broken:
        return s.ctx.broken
    if s.out_of_time():
        return "time budget (--gk-max-seconds) spent"
    if s.deadline is not None and s.deadline - time.monotonic() < E2E_MIN_SECONDS:
        return (f"less than {E2E_MIN_SECONDS:.0f} s of --gk-max-seconds left: not enough for the model "
                "(its build and a row)")
    missing = [f for f in e2e_mod.REQUIRED_FAMILIES if not O.family_built(f)]
    if missing:
        return f"no kernel for {', '.join(missing)}: the model would run the reference path"
    ok, why = e2e_mod.fits(s.ctx.shape, row["batch"], row["context"] + steps, s.device)
    return None if ok else f"does not fit: {why}"


def bench_e2e(benchmark, row: dict, s: Session, model) -> dict:
    """decode rows: the captured decode step (one graph replay per round, the cache filled to
    `context` positions, growing one position a round); prefill rows: prefill + first token."""
    import pytest

    benchmark.group = "e2e"
    B, L = row["batch"], row["context"]
    decode = row["case"].startswith("decode")
    rounds = s.rounds if decode else max(2, s.rounds // E2E_PREFILL_ROUND_DIVISOR)
    warmup = s.warmup_rounds if decode else 1
    vocab_hi = min(199998, s.ctx.shape.vocab)   # below the special tokens
    try:
        with torch.inference_mode():
            if decode:
                st = model.engine.decode_state(B, L + rounds + warmup + 8)
                b = st["buf"]
                b["tok"].random_(0, vocab_hi)
                b["pos"].fill_(L - 1)
                b["seqlens"].fill_(L)
                for kc, vc in st["caches"]:   # a filled cache (values only matter for NaN-free timing)
                    kc.normal_()
                    vc.normal_()
                one_pass = model.engine.step_fn(st, "greedy")
                one_pass()
                if s.device.type == "cuda":
                    torch.cuda.synchronize(s.device)
                finite = bool(torch.isfinite(b["logits"]).all().item())
                tok_ok = bool(((b["tok"] >= 0) & (b["tok"] < s.ctx.shape.vocab)).all().item())
                verify = {"kind": "finite logits and token ids in the vocabulary (no reference at this size; "
                                  "tests/test_decode_step.py checks the step against it)",
                          "passed": finite and tok_ok}
            else:
                gen = torch.Generator().manual_seed(0)
                ids = torch.randint(0, vocab_hi, (B, L), generator=gen).to(s.device)
                model.prepare_decode(B, L + 1)
                out: list = []

                def one_pass():
                    out[:] = list(model.stream(ids, 1, temperature=0.0, stop_token_ids=[]))

                one_pass()
                toks = [t for step in out for t in step]
                verify = {"kind": "one token per sequence, in the vocabulary (no reference at this size)",
                          "passed": len(toks) == B and all(t is not None and 0 <= t < s.ctx.shape.vocab for t in toks)}
            if not verify["passed"]:
                benchmark.extra_info.update(op="e2e", case=row["case"], verify=verify)
                pytest.fail(f"e2e {row['case']}: {verify['kind']}: failed; not timed", pytrace=False)
            # the prefill synchronises with the host inside the pass: a lead buys nothing there
            host_us = host_enqueue_us(one_pass, s.device) if decode else None
            lead_us = s.timer.set_lead(host_us or 0.0) if hasattr(s.timer, "set_lead") else None
            stats = measure(benchmark, one_pass, 1, timer=s.timer, rounds=rounds, warmup_rounds=warmup)
        variant = {"fused_decode": getattr(model, "fused_decode", None), "pdl": _lib.pdl_enabled(),
                   "cuda_graph": model.engine.graph is not None if decode else None}
        timing = {"timer": getattr(s.timer, "name", type(s.timer).__name__),
                  "method": "cuda-graph" if variant["cuda_graph"] else "eager",
                  "calls_per_round": 1, "rounds": rounds, "warmup_rounds": warmup, "lead_us": lead_us,
                  "host_enqueue_us": host_us, "note": None if decode else "prefill + first token (model.stream)"}
        info = e2e_extra_info(row, stats, s, variant, verify, timing)
        benchmark.extra_info.update(info)
        return info
    finally:
        one_pass = None  # noqa: F841
        model.release_cache()
        O._settle(s.ctx, f"e2e {row['case']}")
