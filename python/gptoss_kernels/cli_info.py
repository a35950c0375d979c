"""`gptoss-kernels info`: the device, the build, and which ops run kernels."""

from __future__ import annotations

import json
import platform

import torch

from . import _lib

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
        print(f"  programmatic dependent launch (decode-path kernels): "
              f"{'on' if b['pdl'] else 'off: ' + (b.get('pdl_off_reason') or 'unknown')}")
    print("  ops:")
    for op, how in info["ops"].items():
        print(f"    {op:36s} {how}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("info", help="device, build and which ops have kernels")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)
