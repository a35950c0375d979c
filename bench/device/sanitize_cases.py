#!/usr/bin/env python3
"""Call each kernel of this build once at small, awkward shapes, for compute-sanitizer.

    compute-sanitizer --tool memcheck  python3 bench/device/sanitize_cases.py
    compute-sanitizer --tool racecheck python3 bench/device/sanitize_cases.py

Ops whose kernel family is not in the build are skipped (they would run the reference). Each
call's relative error against the reference is printed for information; correctness is the GPU
tests' job. Exit status 1 if a call raised. Run with PYTORCH_NO_CUDA_MEMORY_CACHING=1 so that
every tensor is its own allocation and an out-of-bounds access is not hidden inside a pool block.
"""

from __future__ import annotations

import os
import sys
import traceback

import torch

import gptoss_kernels as gk
from gptoss_kernels import reference
from gptoss_kernels.bench.ops import family_built

# GPTOSS_SANITIZE_DEVICE=cpu runs every case on the CPU reference path (checks this script itself)
dev = torch.device(os.environ.get("GPTOSS_SANITIZE_DEVICE", "cuda"))
families = sorted(f for f in ("mxfp4", "router", "moe_decode", "moe_prefill", "attention_decode",
                              "attention_prefill", "rope", "dense") if family_built(f))
failures = 0


def rel(out, ref):
    o, r = out.float(), ref.float()
    return (torch.linalg.vector_norm(o - r) / torch.linalg.vector_norm(r).clamp_min(1e-30)).item()


def case(family: str, name: str):
    def wrap(fn):
        global failures
        if dev.type == "cuda" and not family_built(family):
            print(f"skip  {family:18s} {name}: no kernel in this build", flush=True)
            return fn
        if dev.type == "cuda" and not gk.cuda_available():
            print(f"skip  {family:18s} {name}: kernels not usable here ({gk.kernels_error()})", flush=True)
            return fn
        try:
            err = fn()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            print(f"ran   {family:18s} {name}: rel err {err:.2e}", flush=True)
        except Exception:  # noqa: BLE001
            failures += 1
            print(f"FAIL  {family:18s} {name}:", flush=True)
            traceback.print_exc()
        return fn
    return wrap


def bf(*shape, scale=1.0):
    return (torch.randn(*shape, device=dev) * scale).to(torch.bfloat16)


torch.manual_seed(0)


@case("mxfp4", "dequantize 5 rows x 96")
def _():
    blocks = torch.randint(0, 256, (5, 3, 16), dtype=torch.uint8, device=dev)
    scales = torch.randint(100, 140, (5, 3), dtype=torch.uint8, device=dev)
    return rel(gk.mxfp4_dequantize(blocks, scales), reference.mxfp4_dequantize(blocks, scales))


@case("router", "T=7 E=32 and T=300 E=128")
def _():
    errs = []
    for T, E in ((7, 32), (300, 128)):
        x, w, b = bf(T, 2880), bf(E, 2880, scale=2880 ** -0.5), bf(E, scale=0.1)
        ids, wts = gk.router_topk(x, w, b, 4)
        rids, rw = reference.router_topk(x, w, b, 4)
        errs.append(rel(wts, rw))
    return max(errs)


def _moe_args(T: int):
    E, H, I, k = 5, 2880, 2880, 4
    w = {"w1_blocks": torch.randint(0, 256, (E, 2 * I, H // 32, 16), dtype=torch.uint8, device=dev),
         "w1_scales": torch.randint(119, 124, (E, 2 * I, H // 32), dtype=torch.uint8, device=dev),
         "w1_bias": bf(E, 2 * I, scale=0.1),
         "w2_blocks": torch.randint(0, 256, (E, H, I // 32, 16), dtype=torch.uint8, device=dev),
         "w2_scales": torch.randint(119, 124, (E, H, I // 32), dtype=torch.uint8, device=dev),
         "w2_bias": bf(E, H, scale=0.1)}
    x = bf(T, H)
    ids = torch.rand(T, E, device=dev).topk(k, dim=1).indices.to(torch.int32).contiguous()
    tw = torch.softmax(torch.randn(T, k, device=dev), dim=1).contiguous()
    return (x, ids, tw, w["w1_blocks"], w["w1_scales"], w["w1_bias"], w["w2_blocks"], w["w2_scales"], w["w2_bias"])


def _moe(T: int):
    args = _moe_args(T)
    return rel(gk.moe_mxfp4(*args), reference.moe(*args))


case("moe_decode", "T=3 E=5")(lambda: _moe(3))


@case("moe_decode", "T=3 E=5 with the residual add + RMSNorm in the combine")
def _():
    args = _moe_args(3)
    r, nw = bf(3, args[0].shape[1]), bf(args[0].shape[1])
    y, h = gk.moe_mxfp4_add_rms_norm(*args, r, nw)
    h_ref = (reference.moe(*args).to(torch.bfloat16).float() + r.float()).to(torch.bfloat16)
    return max(rel(h, h_ref), rel(y, reference.rms_norm(h_ref, nw)))


case("moe_prefill", "T=77 E=5 (T*k above the decode regime)")(lambda: _moe(77))


def _decode_errs():
    errs = []
    for win, S, lens in ((None, 320, (1, 77, 300)), (128, 128, (1, 129, 300))):
        B = len(lens)
        q, kc, vc = bf(B, 64, 64), bf(B, S, 8, 64), bf(B, S, 8, 64)
        sl = torch.tensor(lens, dtype=torch.int32, device=dev)
        sinks = bf(64)
        out = gk.attention_decode(q, kc, vc, sl, sinks, sliding_window=win)
        errs.append(rel(out, reference.attention_decode(q, kc, vc, sl, sinks, sliding_window=win)))
    return max(errs)


case("attention_decode", "B=3 full (lengths 1, 77, 300) and sliding ring S=128")(_decode_errs)


def _prefill_errs():
    errs = []
    for win in (None, 128):
        T = 150
        q, k, v, sinks = bf(T, 64, 64), bf(T, 8, 64), bf(T, 8, 64), bf(64)
        cu = torch.tensor([0, 61, T], dtype=torch.int32, device=dev)
        out = gk.attention_prefill(q, k, v, sinks, cu_seqlens_q=cu, sliding_window=win)
        ref = reference.attention_varlen(q, k, v, sinks, cu_seqlens_q=cu, cu_seqlens_k=cu, sliding_window=win)
        errs.append(rel(out, ref))
        # 40 new tokens after 200 cached ones (cache of 256 slots; a ring of 128 when sliding)
        S, p0, n = (256 if win is None else 128), 200, 40
        kc, vc = bf(1, S, 8, 64), bf(1, S, 8, 64)
        q2, k2, v2 = bf(n, 64, 64), bf(n, 8, 64), bf(n, 8, 64)
        out = gk.attention_prefill(q2, k2, v2, sinks, k_cache=kc, v_cache=vc,
                                   cache_seqlens=torch.tensor([p0], dtype=torch.int32, device=dev), sliding_window=win)
        first = 0 if win is None else p0 - win + 1
        slots = reference.cache_slots(torch.arange(first, p0, device=dev), S)
        ref = reference.attention(q2, torch.cat((kc[0, slots], k2)), torch.cat((vc[0, slots], v2)), sinks,
                                  sliding_window=win, q_offset=p0 - first)
        errs.append(rel(out, ref))
    return max(errs)


case("attention_prefill", "T=150 in two sequences, full and sliding; a chunk after a cached prefix")(_prefill_errs)


@case("rope", "rope_qkv T=9 and cache_append into a ring")  # cache_append: the op's own path
def _():
    qkv = bf(9, (64 + 16) * 64)
    pos = torch.arange(120, 129, dtype=torch.int32, device=dev)
    q, k, v = gk.rope_qkv(qkv, pos)
    cos, sin = reference.rope_cos_sin(pos)
    rq = reference.apply_rope(qkv[:, :4096].view(9, 64, 64), cos, sin)
    kc, vc = torch.zeros(2, 128, 8, 64, dtype=torch.bfloat16, device=dev), torch.zeros(2, 128, 8, 64, dtype=torch.bfloat16, device=dev)
    gk.cache_append(k, v, kc, vc, torch.ones(9, dtype=torch.int32, device=dev), pos)
    return rel(q, rq)


@case("dense", "add+RMSNorm T=5 H=2880 in place; GEMV T=3 N=1000 K=2880; argmax 3x70000")
def _():
    x, r, w = bf(5, 2880), bf(5, 2880), bf(2880)
    h_ref = (x.float() + r.float()).to(torch.bfloat16)
    y, _ = gk.rms_norm(x, w, residual=r, residual_out=r)
    errs = [rel(y, reference.rms_norm(h_ref, w))]
    a, W, b = bf(3, 2880), bf(1000, 2880, scale=0.02), bf(1000)
    errs.append(rel(gk.linear(a, W, b), a.float() @ W.float().t() + b.float()))
    logits = torch.randn(3, 70000, device=dev)
    errs.append(float((gk.greedy_argmax(logits).long() != logits.argmax(-1)).any()))
    return max(errs)


@case("dense", "fused QKV + RoPE + cache append T=3 (one seq_id out of range) into a ring")
def _():
    x, W, b = bf(3, 2880), bf((64 + 16) * 64, 2880, scale=0.02), bf((64 + 16) * 64)
    seq = torch.tensor([0, 5, 1], dtype=torch.int32, device=dev)
    pos = torch.tensor([127, 128, 300], dtype=torch.int32, device=dev)
    kc, vc = bf(2, 128, 8, 64), bf(2, 128, 8, 64)
    k2, v2 = kc.clone(), vc.clone()
    q = gk.qkv_rope_append(x, W, b, seq, pos, kc, vc)
    want = gk.rope_and_cache_append(gk.linear(x, W, b), seq, pos, k2, v2)
    return max(rel(q, want), rel(kc, k2), rel(vc, v2))


@case("router", "residual add + RMSNorm + router in one cluster kernel, T=3 E=128, in place")
def _():
    d, x, nw = bf(3, 2880), bf(3, 2880), bf(2880)
    w, b = bf(128, 2880, scale=0.02), bf(128, scale=0.1)
    h_ref = (d.float() + x.float()).to(torch.bfloat16)
    a_ref = reference.rms_norm(h_ref, nw)
    a, h, ids, wts = gk.add_rms_norm_router_topk(d, x, nw, w, b, 4, residual_out=x)
    rid, rw = reference.router_topk(a_ref.to(torch.bfloat16), w, b, 4)
    return max(rel(h, h_ref), rel(a, a_ref), float((ids != rid).float().mean()))


# ---- the non-default kernel variants (not reached through the ops' defaults) ----

@case("attention_decode", "variant 2 (mma.sync) B=3 full and sliding ring")
def _():
    from gptoss_kernels.ops import attention as att
    saved, att.DECODE_VARIANT = att.DECODE_VARIANT, 2
    try:
        return _decode_errs()
    finally:
        att.DECODE_VARIANT = saved


@case("attention_decode", "the combine kernel (forced: DECODE_NO_CLUSTER) on the same cases, both variants")
def _():
    from gptoss_kernels.ops import attention as att
    saved = att.DECODE_VARIANT
    try:
        errs = []
        for v in (1, 2):
            att.DECODE_VARIANT = v | att.DECODE_NO_CLUSTER
            errs.append(_decode_errs())
        return max(errs)
    finally:
        att.DECODE_VARIANT = saved


@case("attention_prefill", "impl 2 (wgmma): the same cases")
def _():
    saved = os.environ.get("GPTOSS_ATTENTION_PREFILL_IMPL")
    os.environ["GPTOSS_ATTENTION_PREFILL_IMPL"] = "2"
    try:
        return _prefill_errs()
    finally:
        if saved is None:
            os.environ.pop("GPTOSS_ATTENTION_PREFILL_IMPL", None)
        else:
            os.environ["GPTOSS_ATTENTION_PREFILL_IMPL"] = saved


@case("moe_prefill", "wgmma variants T=77 E=5")
def _():
    from gptoss_kernels.ops import _moe_prefill as pre
    args = _moe_args(77)
    ref = reference.moe(*args)
    if dev.type != "cuda":
        return 0.0
    return max(rel(pre.run(*args, 1.702, 7.0, None, variant=v), ref) for v in (pre.WGMMA, pre.WGMMA_N128, pre.WGMMA_N256))


print(f"sanitize_cases: {failures} failure(s); kernel families built: {families}", flush=True)
sys.exit(1 if failures else 0)
