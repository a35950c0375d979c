#!/usr/bin/env python3
"""Helpers of the device check (stdlib only; runs here and on the device).

    helpers.py source-hash REPO                    hash of what the compiled wheel is built from
    helpers.py manifest REPO DEV                   write DEV/manifest.json (prepare.sh)
    helpers.py manifest-get DEV KEY                print one manifest field (run.sh)
    helpers.py summary OUT [--steps FILE]          print summary.md from the files in OUT (run.sh)
    helpers.py save FILES_DIR [--repo REPO]        copy a run's bench.json/suite.json/summary.md into bench/results/
    helpers.py last-suite REPO CARD                print the last saved suite run (*.suite.json) on CARD, if any
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

# what the compiled part of the wheel depends on: a change here makes a prepared wheel stale
SOURCE_PATHS = ("csrc", "CMakeLists.txt", "pyproject.toml")


def source_hash(repo: pathlib.Path) -> str:
    h = hashlib.sha256()
    files = []
    for p in SOURCE_PATHS:
        path = repo / p
        if path.is_dir():
            files += [f for f in path.rglob("*") if f.is_file() and "__pycache__" not in f.parts]
        elif path.is_file():
            files.append(path)
    for f in sorted(files, key=lambda f: f.relative_to(repo).as_posix()):
        h.update(f.relative_to(repo).as_posix().encode() + b"\0")
        h.update(f.read_bytes() + b"\0")
    return h.hexdigest()


def _git(repo: pathlib.Path, *args: str) -> str | None:
    try:
        r = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def write_manifest(repo: pathlib.Path, dev: pathlib.Path) -> dict:
    wheels = sorted(p.name for p in (dev / "wheels").glob("*.whl"))
    status = _git(repo, "status", "--porcelain", "--untracked-files=no")
    m = {
        "prepared": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "git_commit": _git(repo, "rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
        "source_hash": source_hash(repo),
        "wheels": wheels,
        "package_wheel": next((w for w in wheels if w.startswith("gptoss_kernels-")), None),
        "vocab": sorted(p.name for p in (dev / "vocab").glob("*")) if (dev / "vocab").is_dir() else [],
        "python": sys.version.split()[0],
    }
    (dev / "manifest.json").write_text(json.dumps(m, indent=1) + "\n")
    return m


# ---------------------------------------------------------------------------------------------
# summary.md
# ---------------------------------------------------------------------------------------------


def pytest_counts(text: str) -> dict:
    """Counts from pytest's last summary line ('3 passed, 1 failed, 2 skipped in 4.2s')."""
    counts = {}
    lines = [ln for ln in text.splitlines() if re.search(r"\b(passed|failed|error|errors|skipped|deselected)\b", ln)
             and re.search(r" in [\d.]+s", ln)]
    if lines:
        for n, what in re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected|xfailed|xpassed)", lines[-1]):
            counts["errors" if what.startswith("error") else what] = int(n)
    return counts


def sanitizer_results(text: str) -> list[str]:
    out = []
    tool = None
    for ln in text.splitlines():
        m = re.match(r"=+ (\w+) step: (\w+)", ln)
        if m:
            tool = m.group(1)
        if re.search(r"(ERROR SUMMARY|RACECHECK SUMMARY|LEAK SUMMARY)", ln):
            out.append(f"{tool or '?'}: {ln.strip('= ').strip()}")
    return out


def _read(path: pathlib.Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def summary(out: pathlib.Path, steps_file: pathlib.Path | None) -> str:
    info = {}
    try:
        info = json.loads(_read(out / "info.json") or "{}")
    except json.JSONDecodeError:
        pass
    bench = None
    try:
        bench = json.loads(_read(out / "bench.json")) if (out / "bench.json").exists() else None
    except json.JSONDecodeError:
        bench = None
    env = (bench or {}).get("env", {})
    dev = (info.get("devices") or [{}])[0]
    card = env.get("card") or dev.get("name") or "unknown card"
    driver = env.get("driver")
    if not driver:
        try:
            r = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=10)
            driver = r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else None
        except (OSError, subprocess.SubprocessError):
            driver = None
    lines = [f"# Device check: {card}",
             "",
             f"- date: {env.get('date') or dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ')}",
             f"- commit: {os.environ.get('GPTOSS_GIT_COMMIT') or env.get('git_commit') or '?'}"
             f"{' (uncommitted changes at prepare time)' if os.environ.get('GPTOSS_GIT_DIRTY') == '1' else ''}",
             f"- driver: {driver or '?'}; torch {info.get('torch') or env.get('torch')} "
             f"(CUDA {info.get('torch_cuda') or env.get('torch_cuda')}); python {info.get('python') or env.get('python')}",
             f"- kernel families in the build: {', '.join((info.get('build') or {}).get('kernel_families') or []) or 'none'}; "
             f"kernels in use: {info.get('cuda_available')}" + (f" ({info.get('kernels_error')})" if info.get("kernels_error") else ""),
             ""]
    if steps_file and steps_file.exists():
        lines += ["## Steps", "", "| step | result | seconds | note |", "|---|---|---|---|"]
        for ln in _read(steps_file).splitlines():
            parts = (ln.split("\t") + ["", "", "", ""])[:4]
            lines.append("| " + " | ".join(p.replace("|", "/") for p in parts) + " |")
        lines.append("")
    text = _read(out / "pytest.log")
    if text:
        c = pytest_counts(text)
        lines += ["## GPU tests (`pytest -m gpu`)", "",
                  ", ".join(f"{v} {k}" for k, v in c.items()) or "no pytest summary line (timed out or crashed?)", ""]
        bad = [ln for ln in text.splitlines() if ln.startswith(("FAILED", "ERROR"))][:25]
        skips = [ln for ln in text.splitlines() if ln.startswith("SKIPPED")][:10]
        if bad:
            lines += ["```", *bad, "```", ""]
        if skips:
            lines += ["skipped (first 10):", "```", *skips, "```", ""]
    text = _read(out / "pytest_sm80.log")
    if text:
        c = pytest_counts(text)
        paths = [ln.strip() for ln in text.splitlines() if "paths on device" in ln][:2]
        lines += ["## The sm_80 build on this card (`pytest -m gpu`, GPTOSS_ARCH_OVERRIDE=80: the sm_80..89 paths)", "",
                  *(f"- {p}" for p in paths),
                  ", ".join(f"{v} {k}" for k, v in c.items()) or "no pytest summary line (timed out or crashed?)", ""]
        bad = [ln for ln in text.splitlines() if ln.startswith(("FAILED", "ERROR"))][:25]
        if bad:
            lines += ["```", *bad, "```", ""]
    text = _read(out / "sanitizer.log")
    if text:
        res = sanitizer_results(text)
        lines += ["## compute-sanitizer", "", *(f"- {r}" for r in res or ["no summary line (timed out or crashed?)"]), ""]
    suite_doc = _load_json(out / "suite.json")
    if suite_doc is not None:
        lines += ["## pytest-benchmark suite (`bench/suite`, device time per call)", "", suite_summary(suite_doc), ""]
    if bench is not None:
        lines += ["## Benchmarks" + ("" if bench.get("complete") else " (incomplete: the step was stopped)"), ""]
        try:
            sys.path[:0] = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
            from gptoss_kernels.bench.report import format_document

            lines.append(format_document(bench, markdown=True))
        except Exception as e:  # noqa: BLE001 - the summary must still be written
            lines.append(f"(could not format the table: {type(e).__name__}: {e}; see bench.json)")
        lines.append("")
    return "\n".join(lines) + "\n"


def _load_json(path: pathlib.Path) -> dict | None:
    try:
        return json.loads(path.read_text()) if path.exists() else None
    except (OSError, json.JSONDecodeError):
        return None


def suite_card(doc: dict) -> str | None:
    """The card a pytest-benchmark suite run timed (machine_info, written by bench/suite/conftest.py)."""
    return (((doc.get("machine_info") or {}).get("gptoss") or {}).get("gpu") or {}).get("card")


def suite_summary(doc: dict) -> str:
    """A markdown table of a suite run (pytest-benchmark JSON): median device µs per call and the
    figures of extra_info."""
    rows = ["| case | median µs | IQR µs | rounds | GB/s | %BW | TFLOP/s | %FLOP | rel err |", "|" + "---|" * 9]

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    for b in doc.get("benchmarks", []):
        st, x = b.get("stats") or {}, b.get("extra_info") or {}
        name = b.get("name", "?")
        case = name[name.find("[") + 1:-1] if "[" in name else name
        med = st.get("median")
        rows.append(f"| {case} | {f(med * 1e6 if med is not None else None, '.2f')} | "
                    f"{f(st['iqr'] * 1e6 if st.get('iqr') is not None else None, '.2f')} | {f(st.get('rounds'), 'd')} | "
                    f"{f(x.get('gbps'), '.0f')} | {f(x.get('pct_bw'), '.0f')} | {f(x.get('tflops'), '.1f')} | "
                    f"{f(x.get('pct_flops'), '.0f')} | {f(x.get('rel_err'), '.1e')} |")
    if len(rows) == 2:
        rows.append("| (no case timed) |" + " |" * 8)
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------------
# save: bench/results/<date>_<card>_<commit>.{json,suite.json,md}
# ---------------------------------------------------------------------------------------------


def result_name(bench: dict) -> str:
    env = bench.get("env", {})
    date = (env.get("date") or "")[:10] or dt.date.today().isoformat()
    card = re.sub(r"[^A-Za-z0-9]+", "-", (env.get("card") or "unknown").replace("NVIDIA ", "")).strip("-")
    commit = (env.get("git_commit") or "nocommit")[:10]
    return f"{date}_{card}_{commit}"


def suite_result_name(doc: dict) -> str:
    """result_name for a suite run alone (no bench.json): its date, card and commit."""
    return result_name({"env": {"date": doc.get("datetime"), "card": suite_card(doc),
                                "git_commit": (doc.get("commit_info") or {}).get("id")}})


def save(files_dir: pathlib.Path, repo: pathlib.Path) -> list[pathlib.Path]:
    """Copy bench.json (-> NAME.json), the suite's suite.json (-> NAME.suite.json, beside it, so
    `pytest-benchmark compare bench/results/*.suite.json` shows every saved run) and summary.md."""
    bench_json, suite_json = files_dir / "bench.json", files_dir / "suite.json"
    if not bench_json.exists() and not suite_json.exists():
        raise SystemExit(f"neither {bench_json} nor {suite_json} found: the bench steps wrote no JSON "
                         "(see run.log and bench.log)")
    if bench_json.exists():
        name = result_name(json.loads(bench_json.read_text()))
    else:
        name = suite_result_name(json.loads(suite_json.read_text()))
    dest = repo / "bench" / "results"
    dest.mkdir(parents=True, exist_ok=True)
    saved = []
    for src, suffix in ((bench_json, ".json"), (suite_json, ".suite.json"), (files_dir / "summary.md", ".md")):
        if src.exists():
            saved.append(dest / f"{name}{suffix}")
            shutil.copyfile(src, saved[-1])
    return saved


def last_suite_run(repo: pathlib.Path, card: str) -> pathlib.Path | None:
    """The newest saved suite run (bench/results/*.suite.json) timed on `card` (the name torch
    gives it), for --benchmark-compare; None if there is none."""
    found = []
    for p in (repo / "bench" / "results").glob("*.suite.json"):
        doc = _load_json(p)
        if doc is not None and suite_card(doc) == card:
            found.append((str(doc.get("datetime") or ""), p.name, p))
    return max(found)[2] if found else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("source-hash")
    p.add_argument("repo", type=pathlib.Path)
    p = sub.add_parser("manifest")
    p.add_argument("repo", type=pathlib.Path)
    p.add_argument("dev", type=pathlib.Path)
    p = sub.add_parser("manifest-get")
    p.add_argument("dev", type=pathlib.Path)
    p.add_argument("key")
    p = sub.add_parser("summary")
    p.add_argument("out", type=pathlib.Path)
    p.add_argument("--steps", type=pathlib.Path)
    p = sub.add_parser("last-suite")
    p.add_argument("repo", type=pathlib.Path)
    p.add_argument("card")
    p = sub.add_parser("save")
    p.add_argument("files_dir", type=pathlib.Path)
    p.add_argument("--repo", type=pathlib.Path, default=pathlib.Path(__file__).resolve().parents[2])
    a = ap.parse_args(argv)
    if a.cmd == "source-hash":
        print(source_hash(a.repo))
    elif a.cmd == "manifest":
        print(json.dumps(write_manifest(a.repo, a.dev), indent=1))
    elif a.cmd == "manifest-get":
        try:
            v = json.loads((a.dev / "manifest.json").read_text()).get(a.key)
        except (OSError, json.JSONDecodeError):
            v = None
        print("" if v is None else (int(v) if isinstance(v, bool) else v))
    elif a.cmd == "summary":
        sys.stdout.write(summary(a.out, a.steps))
    elif a.cmd == "last-suite":
        last = last_suite_run(a.repo, a.card)
        print("" if last is None else last)
    elif a.cmd == "save":
        for p in save(a.files_dir, a.repo):
            print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
