"""`gptoss-kernels plan`: what fits on a card, computed from the model's config without a GPU
(weights, workspaces, KV bytes per position, the longest context per sequence per batch size)."""

from __future__ import annotations

import argparse
import sys


def _positive_floats(text: str) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None
    if not vals or any(not (v > 0) for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return vals


def _positive_ints(text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return vals


def _config(name: str):
    from .config import GptOssConfig

    if name in ("20b", "120b"):
        return f"gpt-oss-{name}", getattr(GptOssConfig, f"gpt_oss_{name}")()
    from .loader import detect_layout

    _, _, cfg = detect_layout(name)   # a checkpoint folder: its config.json
    return name, cfg


def run(args) -> int:
    from .loader import CheckpointError
    from .memory import CARD_GIB, format_plan_table, plan_table

    try:
        name, cfg = _config(args.config)
    except CheckpointError as e:
        print(f"gptoss-kernels plan: {e}", file=sys.stderr)
        return 2
    print(format_plan_table(name, plan_table(cfg, args.gpu_gib or CARD_GIB, args.batch)))
    print("\nweights: MXFP4 experts, the rest bf16; workspaces: the decode step's buffers and one prefill chunk; "
          "reserve: CUDA context, cuBLAS and allocator slack (1.5 GB); KV: bf16 K and V of the full-attention "
          "layers (the sliding layers keep a 128-position ring). generate/chat check the real free memory "
          "before allocating and refuse what does not fit.")
    return 0


def register(sub) -> None:
    p = sub.add_parser("plan", help="what fits on a card (no GPU needed)",
                       description="The memory plan of gpt-oss on cards of the given sizes: weights, workspaces, "
                                   "KV bytes per position and the longest context per sequence at each batch.")
    p.add_argument("--config", default="20b", help="20b (default), 120b, or a checkpoint folder")
    p.add_argument("--gpu-gib", type=_positive_floats, default=None, metavar="G[,G...]",
                   help="card memory in GiB (default 16,24,48,80)")
    p.add_argument("--batch", type=_positive_ints, default=[1, 4], metavar="B[,B...]",
                   help="sequences decoded together (default 1,4)")
    p.set_defaults(func=run)
