"""`gptoss-kernels bench {moe,router,attention,dense,e2e,all}`: the microbenchmark command."""

from __future__ import annotations

import argparse
import gc
import sys
import time

import torch

from ..cli_args import DeviceError, check_device, non_negative_float
from . import dense as D
from . import e2e as e2e_mod
from . import ops as O
from .report import _num, format_document, new_document, write_json
from .shapes import ModelShape
from .timing import measure_limits, refuse_hostsim_timing

OPS = ("moe", "router", "attention", "dense", "e2e", "all")

# (GPU defaults, GPU --quick, reference mode, reference --quick)
_GRID = {
    "moe": (O.DEFAULT_TOKENS_MOE, (1, 16, 4096), O.REF_TOKENS_MOE, O.REF_TOKENS_MOE_QUICK),
    "router": (O.DEFAULT_TOKENS_ROUTER, (1, 8192), O.REF_TOKENS_ROUTER, O.REF_TOKENS_ROUTER_QUICK),
    "decode_batch": (O.DEFAULT_DECODE_BATCH, (1, 16), O.REF_DECODE_BATCH, O.REF_DECODE_BATCH_QUICK),
    "decode_context": (O.DEFAULT_DECODE_CONTEXT, (8192, 32768), O.REF_DECODE_CONTEXT, O.REF_DECODE_CONTEXT_QUICK),
    "prefill": (O.DEFAULT_PREFILL_TOKENS, (8192,), O.REF_PREFILL_TOKENS, O.REF_PREFILL_TOKENS_QUICK),
    "dense": (D.DEFAULT_TOKENS, D.QUICK_TOKENS, D.REF_TOKENS, D.REF_TOKENS_QUICK),
    "e2e_batch": (e2e_mod.DEFAULT_DECODE_BATCH, (1,), (1,), (1,)),
    "e2e_context": (e2e_mod.DEFAULT_DECODE_CONTEXT, (1024,), (1024,), (1024,)),
    "e2e_prefill": (e2e_mod.DEFAULT_PREFILL_TOKENS, (2048,), (2048,), (2048,)),
}


def _ints(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 1,4,16, got {text!r}") from None
    if not vals or any(v <= 0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def _flatten(v):
    return None if v is None else [x for group in v for x in group]


def grid(name: str, gpu: bool, quick: bool, override=None) -> tuple[int, ...]:
    if override:
        return tuple(override)
    return _GRID[name][(0 if gpu else 2) + (1 if quick else 0)]


def plan_cases(ctx: O.Context, op: str, *, quick: bool = False, tokens=None, contexts=None, batches=None,
               mode: str = "both") -> list[O.Case]:
    """The op cases `gptoss-kernels bench OP` runs, in its order (GPU grid when ctx is on a GPU,
    else reference mode's; the overrides are --tokens, --context, --batch). The pytest-benchmark
    suite (bench/suite/) takes its cases from here too; "e2e" rows come from `e2e_grids`."""
    gpu = ctx.gpu
    want = {op} if op != "all" else {"router", "moe", "attention", "dense", "e2e"}
    cases: list[O.Case] = []
    if "router" in want:
        cases += O.router_cases(ctx, grid("router", gpu, quick, tokens))
    if "moe" in want:
        cases += O.moe_cases(ctx, grid("moe", gpu, quick, tokens))
    if "attention" in want:
        if mode in ("decode", "both"):
            cases += O.decode_cases(ctx, grid("decode_batch", gpu, quick, batches),
                                    grid("decode_context", gpu, quick, contexts))
        if mode in ("prefill", "both"):
            cases += O.prefill_cases(ctx, grid("prefill", gpu, quick, tokens))
    if "dense" in want:
        cases += D.dense_cases(ctx, grid("dense", gpu, quick, tokens))
    return cases


def e2e_grids(gpu: bool, quick: bool, tokens=None, contexts=None, batches=None) -> tuple[tuple[int, ...], ...]:
    """(batches, contexts, prefill tokens) of `bench e2e` (its rows: ``e2e.plan``)."""
    return (grid("e2e_batch", gpu, quick, batches), grid("e2e_context", gpu, quick, contexts),
            grid("e2e_prefill", gpu, quick, tokens))


def register(sub) -> None:
    p = sub.add_parser(
        "bench", help="microbenchmarks of the kernels (and the model end to end)",
        description="Verify each op once against the reference, then time it (CUDA events, median, cold L2, "
                    "CUDA graphs for microsecond kernels) beside its baselines and the card's measured limits. "
                    "Without a GPU: the reference path at reduced shapes, labelled as such.")
    p.add_argument("op", choices=OPS, help="what to benchmark")
    p.add_argument("--config", choices=("auto", "120b", "20b"), default="auto",
                   help="model shapes (default auto: 120b, or 20b on a card with less than 75 GiB, which 120b's "
                        "weights alone nearly fill)")
    p.add_argument("--tokens", type=_ints, action="append", metavar="T[,T...]",
                   help="token counts for moe, router and attention prefill (and e2e prefill)")
    p.add_argument("--context", type=_ints, action="append", metavar="L[,L...]",
                   help="context lengths for attention decode and e2e decode")
    p.add_argument("--batch", type=_ints, action="append", metavar="B[,B...]",
                   help="batch sizes for attention decode and e2e decode")
    p.add_argument("--mode", choices=("decode", "prefill", "both"), default="both", help="attention: which kernels")
    p.add_argument("--json", metavar="PATH", help="write every figure (and the environment) to PATH")
    p.add_argument("--quick", action="store_true", help="fewer shapes, shorter timings")
    p.add_argument("--max-seconds", type=non_negative_float, default=None,
                   help="skip the cases left once this many seconds (>= 0) have passed (they are reported as skipped)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="auto: CUDA when torch sees a GPU, else reference mode on the CPU")
    p.add_argument("--no-flex", action="store_true", help="do not time FlexAttention (it compiles per shape)")
    p.add_argument("--profile", action="store_true",
                   help="with e2e: only the per-op profile of one decode step (µs against bytes; the byte table "
                        "alone without a GPU)")
    p.set_defaults(func=run)


# 120b's weights are 61 GiB (MXFP4 experts): below this much device memory, auto takes 20b
AUTO_120B_MIN_GIB = 75


def resolve_config(config: str, gpu: bool) -> str:
    """--config auto: 120b on a card that holds it (and without a GPU), else 20b."""
    if config != "auto":
        return config
    if gpu and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        return "120b" if total >= AUTO_120B_MIN_GIB * 2**30 else "20b"
    return "120b"


def run(args) -> int:
    if args.device == "cuda":   # the kernels need not run there: rows without one say "no-kernel"
        try:
            check_device("cuda", need_kernels=False)
        except DeviceError as e:
            print(f"gptoss-kernels bench: {e}", file=sys.stderr)
            return 2
    if args.profile:
        if args.op != "e2e":
            print("gptoss-kernels bench: --profile goes with 'e2e'", file=sys.stderr)
            return 2
        config = resolve_config(args.config, args.device != "cpu" and torch.cuda.is_available())
        argv = ["--config", config] + (["--json", args.json] if args.json else [])
        argv += ["--batch", str(_flatten(args.batch)[0])] if args.batch else []
        argv += ["--context", str(_flatten(args.context)[0])] if args.context else []
        argv += ["--device", "cpu"] if args.device == "cpu" else []
        return e2e_mod.main(argv)
    t_start = time.monotonic()
    refuse_hostsim_timing()
    gpu = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", torch.cuda.current_device()) if gpu else torch.device("cpu")
    mode = "gpu" if gpu else "reference"
    config = resolve_config(args.config, gpu)
    tokens, contexts, batches = _flatten(args.tokens), _flatten(args.context), _flatten(args.batch)

    def progress(msg: str) -> None:
        print(f"[bench {time.monotonic() - t_start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    doc = new_document(mode, config, device, {k: v for k, v in vars(args).items() if k != "func"})
    if not gpu:
        progress("reference mode (no GPU): timing the PyTorch reference at reduced shapes; not a kernel measurement")

    def save():
        if args.json:
            write_json(doc, args.json)

    progress(f"measuring the card's limits on {device} (copy, matmul)")
    limits = measure_limits(device, quick=args.quick)
    doc["limits"] = limits.to_json()
    progress(f"limits: copy {_num(limits.copy_gbps)} GB/s, {limits.matmul_dtype} matmul {_num(limits.matmul_tflops)} TFLOP/s")
    save()

    if config != args.config:
        progress(f"--config auto: {config} shapes on {doc['env'].get('card')}")
    ctx = O.Context(device=device, shape=ModelShape.preset(config), limits=limits, quick=args.quick,
                    deadline=None if args.max_seconds is None else t_start + args.max_seconds,
                    progress=progress, flex=not args.no_flex)
    if not gpu:
        ctx.target_ms, ctx.baseline_ms = (10.0, 10.0) if args.quick else (50.0, 30.0)
        ctx.min_runs, ctx.warmup = (2, 1) if args.quick else (3, 1)
    elif args.quick:
        ctx.target_ms, ctx.baseline_ms = 100.0, 60.0

    want = {args.op} if args.op != "all" else {"router", "moe", "attention", "dense", "e2e"}
    cases = plan_cases(ctx, args.op, quick=args.quick, tokens=tokens, contexts=contexts, batches=batches,
                       mode=args.mode)

    for i, case in enumerate(cases):
        progress(f"[{i + 1}/{len(cases)}] {case.op} {case.name}")
        row = O.run_case(case, ctx)
        doc["results"].append(row)
        progress("    " + _brief(row))
        save()
    cases.clear()
    case = None  # noqa: F841 - drop the last case's closures (the MoE weights) before e2e
    gc.collect()
    if gpu:
        torch.cuda.empty_cache()

    if "e2e" in want:
        progress("e2e: the model end to end")
        rows, notes = e2e_mod.run_e2e(ctx, config, *e2e_grids(gpu, args.quick, tokens, contexts, batches))
        doc["e2e"], doc["notes"] = rows, doc["notes"] + notes
    doc["complete"] = True
    doc["elapsed_s"] = time.monotonic() - t_start
    save()
    print(format_document(doc))
    if args.json:
        progress(f"wrote {args.json}")
    failed = [r for r in doc["results"] if (r.get("verify") and not r["verify"].get("passed")) or r.get("status") == "error"]
    failed += [r for r in doc["e2e"] if r.get("status") == "error"]
    if failed:
        progress(f"{len(failed)} case(s) failed verification or raised: "
                 + ", ".join(f"{r['op']} {r['case']}" for r in failed))
        return 1
    return 0


def _brief(row: dict) -> str:
    parts = [row.get("status") or "?"]
    if row.get("time_us") is not None:
        parts.append(f"{row['time_us']:.1f} µs")
    if row.get("gbps") is not None:
        parts.append(f"{_num(row['gbps'])} GB/s, {_num(row['tflops'])} TFLOP/s")
    v = row.get("verify")
    if v and (row.get("status") != "reference" or not v.get("passed")):   # reference mode: compared with itself
        parts.append(f"rel err {v['rel_err']:.1e}{'' if v.get('passed') else ' FAIL'}")
    for b in row.get("baselines", []):
        if b.get("time_us") is not None:
            parts.append(f"{b['name']} {b['time_us']:.1f} µs")
    if row.get("reason") and row.get("status") not in ("ok", "reference"):
        parts.append(row["reason"])
    return ", ".join(parts)
