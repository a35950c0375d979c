"""Which kernel path each op takes on a device, from its architecture facts (gptoss/arch.h).

The launchers choose (csrc/kernels/*.cu, from ``gptoss_get_arch_info``); this table says in words
what they choose, for ``gptoss-kernels info``, the benchmarks' JSON and bench/RESULTS.md. The
host-build tests (tests/test_arch_paths.py) run every op with each architecture forced and check
the kernels that ran against it.
"""

from __future__ import annotations

# op -> (path on sm_90a: clusters, PDL, wgmma available; path on sm_80..89)
OPS: dict[str, tuple[str, str]] = {
    "mxfp4_dequantize": ("dequantize kernel", "same"),
    "moe_mxfp4 (decode regime)": ("mma.sync GEMVs mlp1 + mlp2, combine", "same"),
    "moe_mxfp4 (prefill regime)": ("route (3 kernels), mma.sync grouped GEMMs, combine (wgmma GEMMs on request)",
                                   "route (3 kernels), mma.sync grouped GEMMs, combine"),
    "moe_mxfp4_add_rms_norm": ("mma.sync GEMVs, combine + residual add + RMSNorm", "same"),
    "router_topk (T <= 64, E <= 128)": ("cluster: one kernel, 8-block thread-block cluster",
                                        "split: partial logits + select (2 kernels)"),
    "router_topk (larger T)": ("split; fused for T > 3008",
                               "split; fused for T > 3008 (E > 128 on sm_86/89: split, the fused tile needs 135 KB)"),
    "add_rms_norm_router_topk": ("one kernel (the router's cluster kernel)", "rms_norm, then router_topk (split)"),
    "attention_decode": ("split-KV kernel; 2..8 splits merged in a thread-block cluster, more by the combine kernel",
                         "split-KV kernel + combine kernel"),
    "attention_prefill": ("mma.sync flash kernel (wgmma kernel on request)", "mma.sync flash kernel"),
    "rope_qkv / cache_append": ("rope kernels", "same"),
    "rms_norm / linear / qkv_rope_append / argmax": ("fused add + RMSNorm, mma.sync GEMV (+ RoPE + append), argmax",
                                                     "same"),
    "decode-path launches": ("programmatic dependent launch (PDL)", "ordinary launches (no PDL below sm_90)"),
}

PRE_HOPPER_ARCHS = ("sm_80", "sm_86", "sm_87", "sm_89")


def hopper_paths(info: dict | None) -> bool:
    """True when `info` (an ``arch_info`` dict) chooses the sm_90 paths (clusters, PDL)."""
    return bool(info) and info.get("cc", 0) >= 90


def op_paths(info: dict | None) -> dict[str, str]:
    """op -> the path it takes with these architecture facts (None: unknown, the sm_90a column)."""
    hopper = info is None or hopper_paths(info)
    out = {}
    for op, (h, pre) in OPS.items():
        text = h if hopper else (h if pre == "same" else pre)
        if op == "decode-path launches" and hopper and info is not None and not info.get("pdl", True):
            text = "ordinary launches (PDL switched off)"
        if hopper and info is not None and not info.get("wgmma", True):
            text = text.replace(" (wgmma GEMMs on request)", "").replace(" (wgmma kernel on request)", "")
        out[op] = text
    return out


def cc_label(cc: int) -> str:
    return f"sm_{cc}{'a' if cc == 90 else ''}" if cc else "none"


def describe(info: dict) -> str:
    """One line: what the paths are chosen for, and why."""
    dev, code, forced, cc = info["device_cc"], info["code_cc"], info["forced_cc"], info["cc"]
    parts = [f"compute capability {dev // 10}.{dev % 10}"]
    parts.append(f"this build's code for it: {cc_label(code)}" if code else "no code of this build runs on it")
    if forced:
        parts.append(f"forced to {forced // 10}.{forced % 10} (GPTOSS_ARCH_OVERRIDE / set_arch_override)")
    return f"{cc_label(cc)} paths ({'; '.join(parts)})"


def table_markdown() -> str:
    """The per-architecture table of bench/RESULTS.md (a test keeps the two equal)."""
    lines = ["| op | sm_90a (H100, H200) | sm_80, sm_86, sm_87, sm_89 (A100, A10, RTX 3090, L4, L40S, RTX 4090) |",
             "|---|---|---|"]
    for op, (h, pre) in OPS.items():
        lines.append(f"| {op} | {h} | {pre} |")
    return "\n".join(lines)
