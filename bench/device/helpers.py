#!/usr/bin/env python3
"""Helpers of the device check (stdlib only; runs here and on the device).

    helpers.py source-hash REPO                    hash of what the compiled wheel is built from
    helpers.py manifest REPO DEV                   write DEV/manifest.json (prepare.sh)
    helpers.py manifest-get DEV KEY                print one manifest field (run.sh)
    helpers.py summary OUT [--steps FILE]          print summary.md from the files in OUT (run.sh)
    helpers.py save FILES_DIR [--repo REPO]        copy a run's bench.json/summary.md into bench/results/
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


# ---------------------------------------------------------------------------------------------
# save: bench/results/<date>_<card>_<commit>.{json,md}
# ---------------------------------------------------------------------------------------------


def result_name(bench: dict) -> str:
    env = bench.get("env", {})
    date = (env.get("date") or "")[:10] or dt.date.today().isoformat()
    card = re.sub(r"[^A-Za-z0-9]+", "-", (env.get("card") or "unknown").replace("NVIDIA ", "")).strip("-")
    commit = (env.get("git_commit") or "nocommit")[:10]
    return f"{date}_{card}_{commit}"


def save(files_dir: pathlib.Path, repo: pathlib.Path) -> list[pathlib.Path]:
    bench_json = files_dir / "bench.json"
    if not bench_json.exists():
        raise SystemExit(f"{bench_json} not found: the bench step wrote no JSON (see run.log and bench.log)")
    bench = json.loads(bench_json.read_text())
    name = result_name(bench)
    dest = repo / "bench" / "results"
    dest.mkdir(parents=True, exist_ok=True)
    saved = [dest / f"{name}.json"]
    shutil.copyfile(bench_json, saved[0])
    if (files_dir / "summary.md").exists():
        saved.append(dest / f"{name}.md")
        shutil.copyfile(files_dir / "summary.md", saved[1])
    return saved


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
    elif a.cmd == "save":
        for p in save(a.files_dir, a.repo):
            print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
