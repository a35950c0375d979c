"""The `gptoss-kernels` command. Each subcommand lives in its own module with a
`register(subparsers)` function that adds its parser and sets `func`."""

from __future__ import annotations

import argparse
import importlib
import sys

# module -> what it provides
_COMMAND_MODULES = (
    "gptoss_kernels.cli_info",        # info
    "gptoss_kernels.bench.cli",       # bench
    "gptoss_kernels.cli_generate",    # generate, chat
    "gptoss_kernels.cli_plan",        # plan
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptoss-kernels",
                                     description="CUDA kernels and a thin model class for gpt-oss")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in _COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if name.startswith(e.name or "?"):  # module (or its package) not written yet
                continue
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
