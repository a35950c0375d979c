"""Dense-op benchmarks: fused residual add + RMSNorm and the bf16 GEMV (ops.rms_norm, ops.linear).

Cases follow bench/ops.py (ops.Case, run_case: verified once against the fp32 reference with
poisoned outputs, then timed with cold L2 and CUDA graphs, baselines timed in the same run):
  - rms_norm, in-place residual stream, T tokens of H = hidden; baseline: torch eager
    (add into the residual, then F.rms_norm); bytes = x + residual read + h + y written + weight.
  - linear at the 120b decode shapes: QKV (N = (nq + 2 nkv) * head_dim, K = hidden, bias),
    out-projection (N = hidden, K = nq * head_dim, bias) and the unembedding (N = vocab,
    K = hidden, float32 logits); baseline: torch F.linear (cuBLAS) in the same run;
    bytes = W + x + bias + out. Each rotated input set has its own W (a 30 MB QKV weight would
    otherwise stay in L2).

Standalone: `python -m gptoss_kernels.bench.dense [--quick] [--tokens 1,4,16] [--json PATH]`.
Hook into `gptoss-kernels bench` (bench/cli.py, owned elsewhere): add "dense" to OPS and to the
ops of "all", a grid row `"dense": (DEFAULT_TOKENS, QUICK_TOKENS, REF_TOKENS, REF_TOKENS_QUICK)`,
and `cases += dense.dense_cases(ctx, grid("dense", gpu, args.quick, tokens))`.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from .. import ops as gops
from .. import reference
from .ops import Case, Context, _gen, _randn, _verdict, run_case
from .timing import rel_err

DEFAULT_TOKENS = (1, 2, 4, 8, 16, 32, 64)
QUICK_TOKENS = (1, 16)
REF_TOKENS, REF_TOKENS_QUICK = (1, 4), (1,)

EPS = 1e-5


def _nan_check(v: dict, *outs: torch.Tensor) -> dict:
    if any(torch.isnan(o).any().item() for o in outs):
        v.update(passed=False, note="NaN left in the output")
    return v


def rms_norm_cases(ctx: Context, tokens) -> list[Case]:
    H = ctx.shape.hidden if ctx.gpu else 256
    dev = ctx.device
    shared: dict = {}
    cases = []
    for T in tokens:
        def make(seed, T=T):
            g = _gen(seed, dev)
            if not shared:
                shared["weight"] = _randn((H,), _gen(777, dev), dev, scale=0.5).add_(1.0)
            return {"x": _randn((T, H), g, dev), "residual": _randn((T, H), g, dev),
                    "out": torch.empty((T, H), dtype=torch.bfloat16, device=dev), **shared}

        def run(a):
            return lambda: gops.rms_norm(a["x"], a["weight"], eps=EPS, residual=a["residual"],
                                         residual_out=a["residual"], out=a["out"])

        def torch_eager(a):
            def f():
                a["residual"].add_(a["x"])
                return F.rms_norm(a["residual"], (H,), a["weight"], EPS)
            return f

        def verify(a, run=run):
            r0 = a["residual"].clone()
            a["out"].fill_(float("nan"))
            run(a)()
            h_ref = (a["x"].float() + r0.float()).to(torch.bfloat16)
            v = _verdict(rel_err(a["out"], reference.rms_norm(h_ref, a["weight"], EPS)))
            v["residual_exact"] = bool(torch.equal(a["residual"], h_ref))
            if not v["residual_exact"]:
                v.update(passed=False, note="residual stream h != bf16(x + residual)")
            a["residual"].copy_(r0)
            return _nan_check(v, a["out"])

        cases.append(Case(
            op="rms_norm", name=f"T={T} H={H} (+residual, in place)", shape={"T": T, "H": H}, family="dense",
            bytes=4 * T * H * 2 + H * 2, flops=4 * T * H, alloc_bytes=3 * T * H * 2, make=make, run=run,
            verify=verify, baselines=[("torch eager", torch_eager)] if ctx.gpu else [],
            external_baselines=("torch eager",)))
    return cases


def linear_shapes(ctx: Context) -> list[tuple[str, int, int, bool, torch.dtype]]:
    """(name, N, K, bias, out dtype) at the model's decode projections."""
    s = ctx.shape
    if not ctx.gpu:  # reference mode: reduced shapes
        return [("qkv", 640, 256, True, torch.bfloat16), ("unembed", 4096, 256, False, torch.float32)]
    q = s.nq * s.head_dim
    return [("qkv", (s.nq + 2 * s.nkv) * s.head_dim, s.hidden, True, torch.bfloat16),
            ("out-proj", s.hidden, q, True, torch.bfloat16),
            ("unembed", s.vocab, s.hidden, False, torch.float32)]


def _linear_ref(x, w, b):
    y = torch.empty(x.shape[0], w.shape[0], device=x.device)
    for n0 in range(0, w.shape[0], 32768):  # bounded fp32 temporaries (the unembedding is 1.2 GB in bf16)
        y[:, n0:n0 + 32768] = x.float() @ w[n0:n0 + 32768].float().t()
    return y + b.float() if b is not None else y


def linear_cases(ctx: Context, tokens) -> list[Case]:
    dev = ctx.device
    cases = []
    for name, N, K, with_bias, odt in linear_shapes(ctx):
        for T in tokens:
            def make(seed, T=T, N=N, K=K, with_bias=with_bias, odt=odt):
                g = _gen(seed, dev)
                return {"x": _randn((T, K), g, dev), "w": _randn((N, K), g, dev, scale=K ** -0.5),
                        "b": _randn((N,), g, dev, scale=0.1) if with_bias else None,
                        "out": torch.empty((T, N), dtype=odt, device=dev)}

            def run(a, odt=odt):
                return lambda: gops.linear(a["x"], a["w"], a["b"], out=a["out"], out_dtype=odt)

            def cublas(a, odt=odt):
                if odt == torch.float32:
                    return lambda: F.linear(a["x"], a["w"], a["b"]).float()
                return lambda: F.linear(a["x"], a["w"], a["b"])

            def verify(a, run=run):
                a["out"].fill_(float("nan"))
                run(a)()
                return _nan_check(_verdict(rel_err(a["out"], _linear_ref(a["x"], a["w"], a["b"]))), a["out"])

            osz = 4 if odt == torch.float32 else 2
            nbytes = N * K * 2 + T * K * 2 + (N * 2 if with_bias else 0) + T * N * osz
            base = "torch F.linear (cuBLAS)" + (" + .float()" if odt == torch.float32 else "")
            cases.append(Case(
                op="linear", name=f"{name} T={T} N={N} K={K}" + (" fp32 out" if odt == torch.float32 else ""),
                shape={"T": T, "N": N, "K": K, "bias": with_bias, "out": str(odt).replace("torch.", "")},
                family="dense", bytes=nbytes, flops=2 * T * N * K, alloc_bytes=nbytes, make=make, run=run,
                verify=verify, baselines=[(base, cublas)] if ctx.gpu else [], external_baselines=(base,)))
    return cases


def dense_cases(ctx: Context, tokens) -> list[Case]:
    return rms_norm_cases(ctx, tokens) + linear_cases(ctx, tokens)


def main(argv=None) -> int:
    from .report import format_ops_table
    from .shapes import ModelShape
    from .timing import measure_limits

    p = argparse.ArgumentParser(prog="python -m gptoss_kernels.bench.dense", description=__doc__.split("\n")[0])
    p.add_argument("--config", choices=("120b", "20b"), default="120b")
    p.add_argument("--tokens", default=None, help="comma-separated token counts")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    gpu = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if gpu else torch.device("cpu")
    t0 = time.monotonic()

    def progress(msg):
        print(f"[bench dense {time.monotonic() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    limits = measure_limits(device, quick=args.quick)
    ctx = Context(device=device, shape=ModelShape.preset(args.config), limits=limits, quick=args.quick,
                  progress=progress)
    if not gpu:
        ctx.target_ms, ctx.baseline_ms, ctx.min_runs, ctx.warmup = 10.0, 10.0, 2, 1
    elif args.quick:
        ctx.target_ms, ctx.baseline_ms = 100.0, 60.0
    if args.tokens:
        tokens = tuple(int(t) for t in args.tokens.split(","))
    elif gpu:
        tokens = QUICK_TOKENS if args.quick else DEFAULT_TOKENS
    else:
        tokens = REF_TOKENS_QUICK if args.quick else REF_TOKENS
    rows = []
    for case in dense_cases(ctx, tokens):
        progress(f"{case.op} {case.name}")
        rows.append(run_case(case, ctx))
    print(format_ops_table(rows, limits.to_json()))
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump({"limits": limits.to_json(), "results": rows}, f, indent=1, default=str)
    return 1 if any((r.get("verify") and not r["verify"].get("passed")) or r.get("status") == "error"
                    for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
