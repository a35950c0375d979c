"""Run `python -m gptoss_kernels.cli ARGS` for several argument lists, each in a process of its
own, paying the interpreter's and torch's start-up once (3 s or more on a loaded CPU runner).

This script imports the package, then forks one child per case. The child runs the module as
``python -m`` does (``runpy.run_module(..., run_name="__main__", alter_sys=True)`` with
``sys.argv`` set), with stdin from /dev/null and stdout/stderr into files, and exits with the
command's status; an exception that escapes prints its traceback and exits 1, as the interpreter
does. So each case shows what a user's terminal would: exit status, stdout, stderr.

    python tests/cli_batch.py CASES.json OUT_DIR

CASES.json: a list of {"argv": [...], "env": {NAME: value or null (unset)}}. Writes OUT_DIR/N.out
and OUT_DIR/N.err and prints the list of exit statuses as JSON.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import traceback


def _child(case: dict, out: str, err: str) -> None:
    for fd, path, mode in ((0, os.devnull, os.O_RDONLY), (1, out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                           (2, err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
        f = os.open(path, mode, 0o644)
        os.dup2(f, fd)
        os.close(f)
    for name, value in (case.get("env") or {}).items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    sys.argv = ["gptoss-kernels", *case["argv"]]
    code = 0
    try:
        runpy.run_module("gptoss_kernels.cli", run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - what the interpreter would print
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main() -> int:
    cases = json.loads(open(sys.argv[1]).read())
    out_dir = sys.argv[2]
    # the start-up the children share: everything `gptoss_kernels.cli` imports, but not the module
    # itself (it runs as __main__ in each child, as with python -m)
    import torch  # noqa: F401

    import gptoss_kernels.bench.cli  # noqa: F401
    import gptoss_kernels.cli_generate  # noqa: F401
    import gptoss_kernels.cli_info  # noqa: F401

    statuses = []
    for i, case in enumerate(cases):
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(case, os.path.join(out_dir, f"{i}.out"), os.path.join(out_dir, f"{i}.err"))
        _, status = os.waitpid(pid, 0)
        statuses.append(os.waitstatus_to_exitcode(status))
    print(json.dumps(statuses))
    return 0


if __name__ == "__main__":
    sys.exit(main())
