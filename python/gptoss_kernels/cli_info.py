"""`gptoss-kernels info`: the device, the build, which ops run kernels and which path each takes."""

from __future__ import annotations

import json
import platform

import torch

from . import _lib, _paths

# public op -> kernel family in _C that implements its CUDA path
OP_FAMILIES = {
    "mxfp4_dequantize": "mxfp4",
    "moe_mxfp4 (decode regime)": "moe_decode",
    "moe_mxfp4 (prefill regime)": "moe_prefill",
    "moe_mxfp4_add_rms_norm": "moe_decode",
    "router_topk / route": "router",
    "add_rms_norm_router_topk": "router",
    "attention_decode": "attention_decode",
    "attention_prefill": "attention_prefill",
    "rope_qkv / cache_append": "rope",
    "rms_norm / linear / qkv_rope_append": "dense",
}


def collect() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "build": _lib.build_info(), "cuda_available": _lib.cuda_available(),
            "kernels_error": _lib.kernels_error(), "devices": []}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            info["devices"].append({"index": i, "name": p.name, "compute_capability": f"{p.major}.{p.minor}",
                                    "memory_gib": round(p.total_memory / 2**30, 1),
                                    "multiprocessors": p.multi_processor_count})
    info["ops"] = {op: ("kernel" if _lib.family_built(fam) and info["cuda_available"] else
                        "reference" + ("" if _lib.family_built(fam) else " (no kernel in this build)"))
                   for op, fam in OP_FAMILIES.items()}
    # which path each op takes: on every CUDA device the kernels can see, else on the host build
    info["paths"] = []
    for d in info["devices"]:
        try:
            a = _lib.arch_info(torch.device("cuda", d["index"]))
        except (RuntimeError, ValueError) as e:
            d["arch_error"] = str(e)
            continue
        if a is not None:
            d["arch"] = a
            info["paths"].append({"where": a["where"], "arch": a, "ops": _paths.op_paths(a)})
    if not info["devices"] and _lib.hostsim_built():
        try:
            a = _lib.arch_info(torch.device("cpu"))
        except (RuntimeError, ValueError) as e:
            info["paths_error"] = str(e)
        else:
            info["paths"].append({"where": a["where"], "arch": a, "ops": _paths.op_paths(a)})
    return info


def run(args) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    b = info["build"]
    print(f"gptoss-kernels {b['abi_version'] and 'ABI v' + str(b['abi_version']) or ''}".strip())
    print(f"  python {info['python']}, torch {info['torch']} (CUDA {info['torch_cuda']})")
    if b["reference_only"]:
        print("  build: reference-only (no CUDA kernels compiled)")
    else:
        print(f"  build: nvcc {b['cuda_build_version']}, archs {', '.join(b['cuda_archs'])}, "
              f"kernel families: {', '.join(b['kernel_families']) or 'none'}")
    if info["devices"]:
        for d in info["devices"]:
            print(f"  device {d['index']}: {d['name']}, compute capability {d['compute_capability']}, "
                  f"{d['memory_gib']} GiB, {d['multiprocessors']} SMs")
    else:
        print("  device: none (torch sees no CUDA GPU)")
    print(f"  CUDA kernels in use: {'yes' if info['cuda_available'] else 'no: ' + str(info['kernels_error'])}")
    hs = b.get("hostsim_built")
    print(f"  host build of the kernels (CPU, for testing): "
          + (f"built; CPU tensors run it: {'yes' if b.get('backend') == 'hostsim' else 'no (GPTOSS_BACKEND=hostsim)'}"
             if hs else "not built"))
    if b.get("pdl") is not None:
        unused = [p["where"] for p in info["paths"] if not p["arch"].get("pdl")]
        print(f"  programmatic dependent launch (decode-path kernels): "
              + (("on" + (f", not used on the sm_80..89 paths ({', '.join(unused)})" if unused else ""))
                 if b["pdl"] else "off: " + (b.get("pdl_off_reason") or "unknown")))
    if b.get("arch_override"):
        print(f"  paths forced to compute capability {b['arch_override'] // 10}.{b['arch_override'] % 10} "
              "(GPTOSS_ARCH_OVERRIDE / set_arch_override)")
    print("  ops:")
    for op, how in info["ops"].items():
        print(f"    {op:36s} {how}")
    for p in info["paths"]:
        a = p["arch"]
        label = ("the host build of the kernels (CPU, emulating a CUDA device)" if p["where"] == "host build"
                 else f"device {p['where']}")
        print(f"  paths on {label}: {_paths.describe(a)}")
        if a.get("error"):
            print(f"    {a['error']}")
            continue
        for op, path in p["ops"].items():
            print(f"    {op:44s} {path}")
    if info.get("paths_error"):
        print(f"  paths: {info['paths_error']}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("info", help="device, build, which ops have kernels and which path each takes")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)
