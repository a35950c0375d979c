"""One source, paths chosen by the card (gptoss/arch.h): which kernel each op runs on sm_80..89
(A100, A10, RTX 3090, L4, L40S, RTX 4090) and on sm_90a (H100, H200).

- CPU: ``gptoss-kernels info`` prints the per-op paths for each forced compute capability; the
  override's parsing; bench/RESULTS.md's per-architecture table is the one ``info`` uses.
- GPU tests (on a GPU: the override forces the sm_80..89 paths on it; on the host build: the
  emulated device is an sm_80 / sm_86 / sm_89 card, or an H100 forced to sm_86): every op against
  the reference through its pre-Hopper path, the kernels that ran (host build: its launch counts;
  its "arch" checker fails any cluster launch, PDL launch, wgmma or shared memory beyond the
  architecture's), and the Hopper-only variants refused with a message when asked for by name.
  The whole GPU suite runs on those paths with GPTOSS_ARCH_OVERRIDE=80 (scripts/test.sh; on a
  lent H100/H200, bench/device/run.sh's sm_80 step).
"""

from __future__ import annotations

import importlib
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import gptoss_kernels as gk
from gptoss_kernels import _lib, _paths, cli_info, reference

from .kernel_device import DEV, ON_GPU, ON_HOSTSIM, sync

REPO = pathlib.Path(__file__).resolve().parents[1]

needs_arch = pytest.mark.skipif(_lib.arch_info() is None, reason="no kernels built (neither CUDA nor the host build)")


# ---------------------------------------------------------------------------------------------
# info, the override, the table (CPU)
# ---------------------------------------------------------------------------------------------

@needs_arch
@pytest.mark.parametrize("cc", [80, 86, 87, 89, 90])
def test_info_shows_the_paths_for_each_forced_cc(cc):
    before = _lib.set_arch_override(cc)
    try:
        info = cli_info.collect()
    finally:
        _lib.set_arch_override(before)
    assert info["paths"], info
    for p in info["paths"]:
        a = p["arch"]
        if a["error"]:
            continue
        assert a["forced_cc"] == cc
        assert a["cc"] == min(c for c in (a["device_cc"], a["code_cc"], cc) if c)
        assert p["ops"] == _paths.op_paths(a)
        hopper = a["cc"] >= 90
        assert a["clusters"] == hopper and a["wgmma"] == (hopper and a["code_cc"] == 90)
        assert p["ops"]["router_topk (T <= 64, E <= 128)"].startswith("cluster" if hopper else "split")
        assert ("in a thread-block cluster" in p["ops"]["attention_decode"]) == hopper
        assert p["ops"]["decode-path launches"].startswith("programmatic" if hopper and a["pdl"] else "ordinary")
        if a["cc"] < 90:
            assert a["max_smem_per_block"] <= (163 if cc in (80, 87) else 99) * 1024


@needs_arch
def test_info_text_with_the_override_in_the_environment():
    r = subprocess.run([sys.executable, "-m", "gptoss_kernels.cli", "info"], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "GPTOSS_ARCH_OVERRIDE": "sm_86"})
    assert r.returncode == 0, r.stderr
    assert "paths forced to compute capability 8.6" in r.stdout
    assert "sm_86 paths" in r.stdout and "split: partial logits + select" in r.stdout, r.stdout
    assert "ordinary launches (no PDL below sm_90)" in r.stdout
    r = subprocess.run([sys.executable, "-m", "gptoss_kernels.cli", "info", "--json"], capture_output=True,
                       text=True, timeout=120, env={**os.environ, "GPTOSS_ARCH_OVERRIDE": "8.9"})
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["build"]["arch_override"] == 89
    assert all(p["arch"]["cc"] <= 89 for p in info["paths"])


@needs_arch
@pytest.mark.parametrize("bad", ["75", "hopper"])
def test_a_bad_override_is_an_error_not_a_silent_path(bad):
    code = ("import torch, gptoss_kernels._lib as L\n"
            "dev = torch.device('cuda') if L._C is not None and torch.cuda.is_available() else torch.device('cpu')\n"
            "try:\n    L.arch_info(dev)\nexcept ValueError as e:\n    print('ERR', e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "GPTOSS_ARCH_OVERRIDE": bad})
    assert r.returncode == 0, r.stderr
    assert "ERR" in r.stdout and "GPTOSS_ARCH_OVERRIDE" in r.stdout and "not a compute capability" in r.stdout


@needs_arch
def test_set_arch_override_checks_its_argument():
    with pytest.raises(ValueError, match="cc must be 0"):
        _lib.set_arch_override(70)
    assert _lib.arch_override() == int(os.environ.get("GPTOSS_ARCH_OVERRIDE", "0").removeprefix("sm_")
                                       .replace(".", "") or 0)


def test_results_md_lists_the_paths_per_architecture():
    text = (REPO / "bench" / "RESULTS.md").read_text()
    assert _paths.table_markdown() in text, "bench/RESULTS.md: paste gptoss_kernels._paths.table_markdown()"


# ---------------------------------------------------------------------------------------------
# every op on the sm_80..89 paths (GPU: forced by the override; host build: an emulated card)
# ---------------------------------------------------------------------------------------------

# (what is emulated on the host build, cc): "device" an sm_XY card running sm_XY code; "override"
# an H100 with sm_90a code forced to sm_XY. On a GPU both are the override.
CASES = [("device", 80), ("device", 89), ("override", 86)]


@pytest.fixture(params=CASES, ids=[f"{m}-sm{cc}" for m, cc in CASES])
def pre_hopper(request):
    """Yields the compute capability the paths are then chosen for (an emulated sm_89 card under
    GPTOSS_ARCH_OVERRIDE=80 takes sm_80's)."""
    mode, cc = request.param
    hs = _lib._hostsim() if ON_HOSTSIM else None
    if hs is not None and mode == "device":
        before_dev = hs.device()
        hs.set_device(cc, cc)
        _lib.forget_arch_info()
        forced = _lib.arch_override()
        try:
            yield min(cc, forced) if forced else cc
        finally:
            hs.set_device(*before_dev)
            _lib.forget_arch_info()
        return
    before = _lib.set_arch_override(cc)
    try:
        yield cc
    finally:
        _lib.set_arch_override(before)


def _launches() -> dict:
    return dict(_lib.kernels(torch.device("cpu"))._module.stats()["kernels"]) if ON_HOSTSIM else {}


def _ran(before: dict) -> set:
    """Kernel names (without templates and arguments) launched since `before` (host build only)."""
    names = set()
    for k, n in _launches().items():
        if n > before.get(k, 0):
            names.add(k.replace("(anonymous namespace)::", "").removeprefix("void ").split("(")[0].split("<")[0]
                      .split("::")[-1])
    return names


def _expect(before: dict, want: set, never: set) -> None:
    if not ON_HOSTSIM:
        return  # on the GPU the results are the check (the host build counts the launches)
    ran = _ran(before)
    assert want <= ran, f"expected {want - ran} to run; ran {sorted(ran)}"
    assert not (never & ran), f"{never & ran} ran on the pre-Hopper paths"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float().cpu(), b.float().cpu()
    return float((a - b).norm() / b.norm())


@pytest.mark.gpu
def test_arch_info_on_the_pre_hopper_paths(pre_hopper):
    a = _lib.arch_info(torch.device(DEV))
    assert a["cc"] == pre_hopper and not a["clusters"] and not a["pdl"] and not a["wgmma"], a
    assert not _lib.clusters_available(torch.device(DEV))


@pytest.mark.gpu
def test_router_split_instead_of_cluster(pre_hopper):
    T, H, E, k = 3, 256, 128, 4
    x = torch.randn(T, H).bfloat16().to(DEV)
    w = (torch.randn(E, H) / 16).bfloat16().to(DEV)
    b = torch.randn(E).bfloat16().to(DEV)
    before = _launches()
    ids, wts = gk.router_topk(x, w, b, k)
    sync()
    _expect(before, {"router_partial_kernel", "router_select_kernel"}, {"router_cluster_kernel"})
    rid, rw = reference.router_topk(x.cpu(), w.cpu(), b.cpu(), k)
    assert torch.equal(ids.cpu().sort(-1).values, rid.sort(-1).values)
    assert torch.allclose(wts.cpu().sort(-1).values, rw.sort(-1).values, atol=1e-5)
    with pytest.raises(ValueError, match="needs thread-block clusters"):
        gk.router_topk(x, w, b, k, path="cluster")


@pytest.mark.gpu
def test_add_rms_norm_router_topk_two_ops(pre_hopper):
    T, H, E, k = 2, 256, 32, 4
    g = torch.Generator().manual_seed(3)
    delta, res = (torch.randn(T, H, generator=g).bfloat16().to(DEV) for _ in range(2))
    nw = (1 + torch.randn(H, generator=g) / 8).bfloat16().to(DEV)
    w = (torch.randn(E, H, generator=g) / 16).bfloat16().to(DEV)
    b = torch.randn(E, generator=g).bfloat16().to(DEV)
    before = _launches()
    a, h, ids, wts = gk.add_rms_norm_router_topk(delta, res, nw, w, b, k)
    sync()
    _expect(before, {"rms_norm_kernel", "router_partial_kernel", "router_select_kernel"}, {"router_cluster_kernel"})
    h_ref = (delta.float() + res.float()).bfloat16()
    assert torch.equal(h.cpu(), h_ref.cpu())
    a_ref = reference.rms_norm(h_ref.cpu(), nw.cpu())
    assert _rel(a, a_ref) < 1e-2
    rid, _ = reference.router_topk(a.cpu(), w.cpu(), b.cpu(), k)
    assert torch.equal(ids.cpu().sort(-1).values, rid.sort(-1).values)
    # the C function itself (what other engines call): the norm kernel, then the fused router
    K = _lib.kernels(torch.device(DEV))
    a2, h2 = torch.empty_like(a), torch.empty_like(h)
    ids2, wts2 = torch.empty_like(ids), torch.empty_like(wts)
    before = _launches()
    with _lib.device_guard(torch.device(DEV)):
        K.add_rms_norm_router_topk_bf16(delta, res, h2, nw, False, 1e-5, a2, w, b, ids2, wts2, T, H, E, k,
                                        _lib.stream_handle(torch.device(DEV)))
    sync()
    _expect(before, {"rms_norm_kernel", "router_fused_kernel"}, {"router_cluster_kernel"})
    assert torch.equal(a2.cpu(), a.cpu()) and torch.equal(h2.cpu(), h.cpu()) and torch.equal(ids2.cpu(), ids.cpu())


@pytest.mark.gpu
def test_attention_decode_combine_instead_of_cluster_merge(pre_hopper):
    B, S, nkv = 1, 320, 1 if not ON_GPU else 8     # 5 splits: merged in a cluster on sm_90
    assert gk.ops.attention.MAX_CLUSTER_SPLITS >= 5
    g = torch.Generator().manual_seed(5)
    q = torch.randn(B, 8 * nkv, 64, generator=g).bfloat16().to(DEV)
    kc, vc = (torch.randn(B, S, nkv, 64, generator=g).bfloat16().to(DEV) for _ in range(2))
    sinks = torch.randn(8 * nkv, generator=g).bfloat16().to(DEV)
    lens = torch.tensor([S], dtype=torch.int32).to(DEV)
    before = _launches()
    out = gk.attention_decode(q, kc, vc, lens, sinks, sliding_window=None)
    sync()
    _expect(before, {"attention_decode_kernel", "attention_decode_combine_kernel"}, set())
    ref = reference.attention_decode(q.cpu(), kc.cpu(), vc.cpu(), lens.cpu(), sinks.cpu(), sliding_window=None)
    assert _rel(out, ref) < 1e-2


@pytest.mark.gpu
def test_attention_prefill_mma_sync_and_wgmma_refused(pre_hopper):
    T, nkv = (40, 1) if not ON_GPU else (300, 8)
    g = torch.Generator().manual_seed(6)
    q = torch.randn(T, 8 * nkv, 64, generator=g).bfloat16().to(DEV)
    k, v = (torch.randn(T, nkv, 64, generator=g).bfloat16().to(DEV) for _ in range(2))
    sinks = torch.randn(8 * nkv, generator=g).bfloat16().to(DEV)
    cu = torch.tensor([0, T], dtype=torch.int32).to(DEV)
    before = _launches()
    out = gk.attention_prefill(q, k, v, sinks, cu_seqlens_q=cu, sliding_window=None)
    sync()
    _expect(before, {"attention_prefill_kernel"}, set())
    ref = reference.attention(q.cpu(), k.cpu(), v.cpu(), sinks.cpu())
    assert _rel(out, ref) < 1e-2
    AP = importlib.import_module("gptoss_kernels.ops.attention_prefill")
    with pytest.raises(ValueError, match="wgmma kernel needs sm_90a"):
        AP._attention_prefill_cuda(q, k, v, sinks, cu, None, None, None, None, 0.125, torch.empty_like(q),
                                   torch.device(DEV), 2)


def _moe_weights(E, H, I, g):  # noqa: E741
    w1 = torch.randn(E, 2 * I, H, generator=g) / H ** 0.5
    w2 = torch.randn(E, H, I, generator=g) / I ** 0.5
    b1, b2 = torch.randn(E, 2 * I, generator=g) / 4, torch.randn(E, H, generator=g) / 4
    w1b, w1s = reference.mxfp4_quantize(w1)
    w2b, w2s = reference.mxfp4_quantize(w2)
    return [t.to(DEV) for t in (w1b, w1s, b1.bfloat16(), w2b, w2s, b2.bfloat16())]


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 80])
def test_moe_decode_and_prefill_regimes(pre_hopper, T):
    """T = 1: the decode GEMVs (mma.sync), launched without PDL; T = 80 (320 routed rows): the
    prefill grouped GEMMs (mma.sync); the wgmma variants refused by name."""
    E, H, I, k = 8, 128, 64, 4  # noqa: E741
    g = torch.Generator().manual_seed(7)
    ws = _moe_weights(E, H, I, g)
    x = torch.randn(T, H, generator=g).bfloat16().to(DEV)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).int().to(DEV)
    wt = torch.softmax(torch.randn(T, k, generator=g), -1).to(DEV)
    before = _launches()
    out = gk.moe_mxfp4(x, ids, wt, *ws)
    sync()
    want = {"moe_decode_gemv_kernel"} if T == 1 else {"grouped_gemm_mma_kernel", "combine_kernel"}
    _expect(before, want, {"grouped_gemm_wgmma_kernel"})
    ref = reference.moe(x.cpu(), ids.cpu(), wt.cpu(), *[t.cpu() for t in ws])
    assert _rel(out, ref) < 1e-2
    if T > 1:
        from gptoss_kernels.ops import _moe_prefill as P
        with pytest.raises(ValueError, match="wgmma variants need sm_90a"):
            P.run(x, ids, wt, *ws, 1.702, 7.0, torch.empty_like(x), variant=P.WGMMA)


@pytest.mark.gpu
def test_dense_ops_without_pdl(pre_hopper):
    """The decode path's GEMV, norm and argmax launch the ordinary way (the host build's arch
    checker reports a launch with the PDL attribute on these paths)."""
    T, K, N = 2, 128, 96
    g = torch.Generator().manual_seed(8)
    x = torch.randn(T, K, generator=g).bfloat16().to(DEV)
    w = (torch.randn(N, K, generator=g) / 8).bfloat16().to(DEV)
    before = _launches()
    y = gk.linear(x, w)
    n = gk.rms_norm(x, torch.ones(K).bfloat16().to(DEV))
    am = gk.greedy_argmax(y.float())
    sync()
    _expect(before, {"linear_gemv_kernel", "rms_norm_kernel"}, set())
    assert _rel(y, x.float().cpu() @ w.float().cpu().T) < 1e-2
    assert _rel(n, reference.rms_norm(x.cpu(), torch.ones(K).bfloat16())) < 1e-2
    assert torch.equal(am.cpu(), y.float().cpu().argmax(-1))


@pytest.mark.gpu
@pytest.mark.slow
def test_generation_on_the_pre_hopper_paths(pre_hopper, request):
    """The model end to end (prefill, decode steps with the fused decode ops, which take the two-op
    router and the combine kernel here) against the float32 reference, teacher forced."""
    if request.node.callspec.params["pre_hopper"][0] != "override":
        pytest.skip("one case is enough for the model (the ops above cover each architecture)")
    from gptoss_kernels import GptOss

    from .test_decode_step import _kernel_cfg, _prompt_len, _teacher_forced_check
    cfg = _kernel_cfg()
    m = GptOss.from_config(cfg, device=DEV, seed=0)
    ref_model = m.to("cpu")
    prompt = torch.randint(0, cfg.vocab_size, (_prompt_len(300),), generator=torch.Generator().manual_seed(1)).tolist()
    m.prefill_chunk = 64 if ON_GPU else 16
    before = _launches()
    out = m.generate(prompt, 8)
    _expect(before, {"router_partial_kernel", "moe_decode_gemv_kernel"}, {"router_cluster_kernel"})
    _teacher_forced_check(m, ref_model, prompt, out, min_separated=3)


# ---------------------------------------------------------------------------------------------
# a device without code in this build (host build: an emulated sm_86 card, code for none)
# ---------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not ON_HOSTSIM, reason="emulating a device without code is the host build's switch")
def test_no_code_for_the_device_is_a_clear_error():
    hs = _lib._hostsim()
    before = hs.device()
    hs.set_device(86, 0)
    _lib.forget_arch_info()
    try:
        a = _lib.arch_info(torch.device("cpu"))
        assert a["code_cc"] == 0 and "compute capability 8.6" in a["error"] and "GPTOSS_CUDA_ARCHS=\"86;" in a["error"]
        x = torch.randn(3, 256).bfloat16()
        w, b = torch.randn(32, 256).bfloat16(), torch.randn(32).bfloat16()
        with pytest.raises(ValueError, match="holds no code for CUDA device 0"):
            gk.router_topk(x, w, b, 4)   # a launcher that chooses a path: the message up front
        blocks = torch.randint(0, 255, (4, 2, 16), dtype=torch.uint8)
        scales = torch.full((4, 2), 127, dtype=torch.uint8)
        with pytest.raises(RuntimeError, match="cudaErrorNoKernelImageForDevice.*compute capability 8.6"):
            gk.mxfp4_dequantize(blocks, scales)  # a plain launch: the launch error, with the same advice
    finally:
        hs.set_device(*before)
        _lib.forget_arch_info()


@pytest.mark.gpu
@pytest.mark.skipif(not ON_HOSTSIM, reason="the host build's arch checker")
def test_host_build_reports_hopper_features_on_the_pre_hopper_paths():
    """The checker behind the tests above: on an emulated sm_86 card a launch with the PDL
    attribute, a thread-block-cluster launch and wgmma are "arch" findings (probe kernels that
    use them directly, as no launcher does there)."""
    hs = _lib._hostsim()
    before = hs.device()
    buf = torch.zeros(64)
    forced = _lib.set_arch_override(0)  # (GPTOSS_ARCH_OVERRIDE would lower the paths further)
    try:
        hs.set_device(86, 86)
        _lib.forget_arch_info()
        for which, rc_ok, what in ((9, True, "PDL attribute"), (10, False, "thread-block-cluster launch")):
            hs.begin_call([_lib.tensor_extent(buf)])
            rc = hs.probe.checker(which, buf.data_ptr(), buf.numel())
            reports = hs.end_call()
            assert (rc == 0) == rc_ok, rc
            assert any(r.startswith("arch:") and what in r and "sm_86" in r for r in reports), reports
        img = torch.zeros(64 * 16 * 2, dtype=torch.bfloat16)
        d = torch.zeros(128 * 32)
        hs.begin_call([_lib.tensor_extent(img), _lib.tensor_extent(d)])
        hs.probe.wgmma(img.data_ptr(), img.numel() * 2, 0, 0, 64, 0, 0, d.data_ptr())
        reports = hs.end_call()
        assert any(r.startswith("arch:") and "wgmma" in r for r in reports), reports
        hs.set_device(90, 90)   # the same launches on an H100 are clean
        hs.begin_call([_lib.tensor_extent(buf)])
        rc = hs.probe.checker(10, buf.data_ptr(), buf.numel())
        assert rc == 0 and not hs.end_call()
    finally:
        hs.set_device(*before)
        _lib.set_arch_override(forced)
