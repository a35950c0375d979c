"""The benchmark's record: environment facts, the JSON document, and the printed tables."""

from __future__ import annotations

import datetime as _dt
import json
import os
import pathlib
import platform
import subprocess

import torch

from .. import _lib, _paths

SCHEMA = "gptoss-kernels-bench/1"
REFERENCE_MODE_LABEL = "reference mode (no GPU): not a kernel measurement"


def _git(*args: str) -> str | None:
    here = pathlib.Path(__file__).resolve().parent
    try:
        r = subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def git_commit() -> tuple[str | None, bool | None]:
    """(commit, dirty). GPTOSS_GIT_COMMIT / GPTOSS_GIT_DIRTY override (the device check sets them:
    the working tree copied to the device has no .git)."""
    if os.environ.get("GPTOSS_GIT_COMMIT"):
        dirty = os.environ.get("GPTOSS_GIT_DIRTY")
        return os.environ["GPTOSS_GIT_COMMIT"], (None if dirty is None else dirty in ("1", "true", "True"))
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return None, None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return commit, (bool(status) if status is not None else None)


def driver_version() -> str | None:
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=10)
        if r.returncode == 0 and r.stdout.strip():
            return r.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        import pynvml  # nvidia-ml-py

        pynvml.nvmlInit()
        v = pynvml.nvmlSystemGetDriverVersion()
        return v.decode() if isinstance(v, bytes) else str(v)
    except Exception:  # noqa: BLE001
        return None


def environment(device: torch.device) -> dict:
    commit, dirty = git_commit()
    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "git_commit": commit,
        "git_dirty": dirty,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "host": platform.node(),
        "build": _lib.build_info(),
        "kernels_in_use": _lib.cuda_available(),
        "kernels_error": _lib.kernels_error(),
        "card": None,
        "driver": None,
        "compute_capability": None,
        "sms": None,
        "memory_gib": None,
        "l2_mib": None,
        "paths": None,
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(card=p.name, driver=driver_version(), compute_capability=f"{p.major}.{p.minor}",
                   sms=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1),
                   l2_mib=round(getattr(p, "L2_cache_size", 0) / 2**20, 1) or None)
        # which path each op takes on this card (gptoss/arch.h): sm_90a's, or sm_80..89's
        try:
            a = _lib.arch_info(device) if _lib.kernels_built() else None
        except (RuntimeError, ValueError) as e:
            env["paths"] = {"error": str(e)}
        else:
            if a is not None:
                env["paths"] = {"cc": a["cc"], "arch": a, "label": _paths.describe(a), "ops": _paths.op_paths(a)}
    else:
        env["card"] = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} threads)"
    return env


def new_document(mode: str, config: str, device: torch.device, args: dict | None) -> dict:
    return {
        "schema": SCHEMA,
        "mode": mode,                       # "gpu" or "reference"
        "label": REFERENCE_MODE_LABEL if mode == "reference" else "kernel measurement",
        "config": config,
        "args": args,
        "env": environment(device),
        "limits": None,
        "results": [],
        "e2e": [],
        "notes": [],
        "complete": False,
    }


def write_json(doc: dict, path: str | os.PathLike) -> None:
    """Write atomically (the device check may stop the run at any point)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(o):
    if isinstance(o, (torch.dtype, torch.device)):
        return str(o)
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------


def _f(v, fmt: str, none: str = "-") -> str:
    return none if v is None else format(v, fmt)


def _num(v) -> str:
    if v is None:
        return "-"
    a = abs(v)
    return f"{v:.0f}" if a >= 100 else f"{v:.1f}" if a >= 10 else f"{v:.2f}" if a >= 0.01 else f"{v:.1e}"


def _us(v) -> str:
    if v is None:
        return "-"
    return f"{v:.1f}" if v < 1e4 else f"{v:,.0f}"


def shape_text(shape: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items() if v is not None)


#: What reference mode shows in %BW, %FLOP and rel err: the CPU's measured copy and matmul rates
#: are no ceilings for the reference's code paths (a row can exceed 100 %), and the verification
#: compares the reference with itself.
NOT_APPLICABLE = "–"


def model_dims(row: dict, model) -> list[tuple[str, int, int]]:
    """(dimension, value in the row, the model's value) for the model dimensions of a row's shape
    (`model`: a bench.shapes.ModelShape); token counts, batches and contexts are not model dims."""
    op, shape = row.get("op"), row.get("shape") or {}
    s = model
    want: dict = {}
    if op == "moe_mxfp4":
        want = {"E": s.num_experts, "k": s.k, "H": s.hidden, "I": s.intermediate}
    elif op == "router_topk":
        want = {"E": s.num_experts, "H": s.hidden, "k": s.k}
    elif op in ("attention_decode", "attention_prefill"):
        want = {"nq": s.nq, "nkv": s.nkv, "d": s.head_dim}
    elif op == "rms_norm":
        want = {"H": s.hidden}
    elif op == "linear":
        proj = str(row.get("case", "")).split(" ")[0]
        want = {"qkv": {"N": (s.nq + 2 * s.nkv) * s.head_dim, "K": s.hidden},
                "out-proj": {"N": s.hidden, "K": s.nq * s.head_dim},
                "unembed": {"N": s.vocab, "K": s.hidden}}.get(proj, {})
    return [(k, shape[k], v) for k, v in want.items() if shape.get(k) is not None]


def model_dims_text(row: dict, model, config: str) -> str:
    """'as 120b', or which model dims the row reduced and why (reference mode on the CPU)."""
    dims = model_dims(row, model)
    if not dims:
        return "-"
    reduced = [(k, got, want) for k, got, want in dims if got != want]
    if not reduced:
        return f"as {config}"
    return "reduced for the CPU: " + ", ".join(f"{k} {got} of {want}" for k, got, want in reduced)


def format_ops_table(rows: list[dict], limits: dict | None, markdown: bool = False,
                     config: str | None = None) -> str:
    """The ops table. Reference-mode rows (status "reference") show NOT_APPLICABLE for %BW, %FLOP
    and rel err (FAIL stays visible), and, given `config`, a column saying which model dims they
    reduced."""
    reference_mode = any(r.get("status") == "reference" for r in rows)
    model = None
    if reference_mode and config is not None:
        from .shapes import ModelShape

        try:
            model = ModelShape.preset(config)
        except ValueError:
            model = None
    head = ["op", "case", "shape"] + (["model dims"] if model else []) + [
        "µs", "GB/s", "TFLOP/s", "%BW", "%FLOP", "rel err", "baseline (µs, speed-up)", "status"]
    body = []
    for r in rows:
        v = r.get("verify") or {}
        ref = r.get("status") == "reference"
        err = "-" if not v else (f"{v['rel_err']:.1e}" + ("" if v.get("passed") else " FAIL"))
        if ref and v:
            err = NOT_APPLICABLE if v.get("passed") else "FAIL"
        bl = "; ".join(f"{b['name']} {_us(b['time_us'])}" + (f" ({b['speedup']:.2f}x)" if b.get("speedup") else "")
                       if b.get("status") == "ok" else f"{b['name']}: {b.get('status')}" for b in r.get("baselines", []))
        status = r.get("status") or "-"
        if r.get("reason") and status not in ("ok", "reference"):
            status += f": {r['reason']}"
        if r.get("timing") and r["timing"].get("method") == "cuda-graph":
            status += " (graph)"
        pct_bw, pct_flops = ((NOT_APPLICABLE, NOT_APPLICABLE) if ref else
                             (_num(r.get("pct_bw")), _num(r.get("pct_flops"))))
        dims = [model_dims_text(r, model, config)] if model else []
        body.append([r["op"], r["case"], shape_text(r.get("shape", {}))] + dims + [
                     _us(r.get("time_us")), _num(r.get("gbps")), _num(r.get("tflops")), pct_bw, pct_flops, err,
                     bl or "-", status])
    title = ""
    if limits:
        title = (f"limits measured in this run: copy {_num(limits['copy_gbps'])} GB/s (read+write), "
                 f"{limits['matmul_dtype']} matmul {_num(limits['matmul_tflops'])} TFLOP/s\n")
    return title + _render(head, body, markdown)


def format_e2e_table(rows: list[dict], markdown: bool = False) -> str:
    head = ["case", "batch", "context", "tok/s", "bound tok/s", "% of bound", "TTFT ms", "peak GiB", "status"]
    body = []
    for r in rows:
        status = r.get("status") or "-"
        if r.get("reason") and status != "ok":
            status += f": {r['reason']}"
        body.append([r.get("case", "-"), _f(r.get("batch"), "d"), _f(r.get("context"), "d"), _f(r.get("tok_s"), ".1f"),
                     _f(r.get("bound_tok_s"), ".0f"), _f(r.get("pct_of_bound"), ".0f"), _f(r.get("ttft_ms"), ".1f"),
                     _f(r.get("peak_gib"), ".1f"), status])
    return _render(head, body, markdown)


def _render(head: list[str], body: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(head)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip(),
           "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in body]
    return "\n".join(out)


def format_document(doc: dict, markdown: bool = False) -> str:
    env = doc["env"]
    lines = []
    if doc["mode"] == "reference":
        lines.append(f"*** {REFERENCE_MODE_LABEL} ***" if not markdown else f"**{REFERENCE_MODE_LABEL}**")
    reference = doc["mode"] == "reference"
    lines.append(f"card: {env.get('card')}, driver {env.get('driver')}, torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), "
                 f"commit {(env.get('git_commit') or '?')[:12]}{' (dirty)' if env.get('git_dirty') else ''}, {env.get('date')}, "
                 f"config {doc.get('config')}"
                 + (" (reference mode: the 'model dims' column says which rows run reduced shapes)" if reference else ""))
    paths = env.get("paths") or {}
    if paths.get("label") or paths.get("error"):
        lines.append(f"kernels: {paths.get('label') or paths.get('error')}")
    if doc.get("results"):
        lines += ["", format_ops_table(doc["results"], doc.get("limits"), markdown,
                                       config=doc.get("config") if reference else None)]
    if doc.get("e2e"):
        lines += ["", format_e2e_table(doc["e2e"], markdown)]
    notes = list(doc.get("notes", []))
    if reference and doc.get("results"):
        notes.append(f"reference mode: {NOT_APPLICABLE} in %BW and %FLOP (the CPU's measured copy and matmul rates are "
                     f"no ceilings for the reference's code paths) and in rel err (the reference is compared with "
                     f"itself); rows run the reference-mode grid of tokens, batches and contexts, and the model "
                     f"dims marked 'reduced' are smaller than {doc.get('config')} so that the run takes seconds on a CPU")
    for n in notes:
        lines.append(f"note: {n}")
    return "\n".join(lines)
