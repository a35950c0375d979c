"""RoPE with YaRN (spec §1.3) and the KV-cache writers: the kernels' host-built math (rope.cuh via
_C.host) against the reference and a float64 computation, the ops' argument checks, and (GPU, else
the host build of the kernels: tests/kernel_device.py) rope_qkv, the fused rope_and_cache_append and
cache_append against the reference.

Tolerances: the kernels' angle t * inv_freq_j is the same fp32 product as the reference's (the op
passes the reference's inverse-frequency table), cos/sin differ by < 1e-6 absolute, the rotation
is fp32; outputs are bf16, so the error is bf16 output rounding, 2^-9 relative per element
(~4e-3 on a norm at worst): rel-norm 1e-2 as DEVELOPERS.md prescribes; v is copied bit-exactly."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import gptoss_kernels as gk
from gptoss_kernels import _lib
from gptoss_kernels import reference as R

from .kernel_device import DEV, sync

T_QKV = (64 + 2 * 8) * 64


def _C():
    if not gk.kernels_built():
        pytest.skip(f"kernels not built: {gk.kernels_error()}")
    C = _lib.C()
    if not hasattr(C.host, "rope_cos_sin"):
        pytest.skip("this build predates the attention bindings (rebuild the package)")
    return C


def _inv_freq_f64(p: R.YarnParams) -> np.ndarray:
    """Spec §1.3 steps 1-4 entirely in float64."""
    d = p.head_dim
    j = np.arange(d // 2, dtype=np.float64)
    freq = p.theta ** (2 * j / d)
    if p.factor <= 1:
        return 1 / freq
    # the correction range clamped to [0, d - 1] (transformers' YaRN)
    low = max((d / 2) * math.log(p.original_context / (p.beta_fast * 2 * math.pi)) / math.log(p.theta), 0)
    high = min((d / 2) * math.log(p.original_context / (p.beta_slow * 2 * math.pi)) / math.log(p.theta), d - 1)
    ramp = np.clip((j - low) / (high - low), 0, 1)
    m = 1 - ramp
    return m / freq + (1 - m) / (p.factor * freq)


PARAMS = [R.YarnParams(), R.YarnParams(factor=1.0), R.YarnParams(theta=10000.0, factor=8.0, original_context=2048),
          R.YarnParams(head_dim=128),
          # a short original context: the correction range's low end is negative, clamped to 0
          R.YarnParams(theta=10000.0, factor=4.0, original_context=64)]


# ---- host math (rope.cuh) ----

@pytest.mark.parametrize("p", PARAMS, ids=lambda p: f"d{p.head_dim}-th{p.theta:g}-f{p.factor:g}")
def test_host_inv_freq_matches_reference_and_float64(p):
    C = _C()
    host = torch.from_numpy(C.host.yarn_inv_freq(p.head_dim, p.theta, p.factor, p.beta_fast, p.beta_slow,
                                                 p.original_context))
    ref = R.yarn_inv_freq(p)
    # both are the spec's fp32 recipe; powf implementations may differ by an ulp or two
    assert torch.allclose(host, ref, rtol=3e-7, atol=0), (host - ref).abs().max()
    f64 = torch.from_numpy(_inv_freq_f64(p))
    assert ((host.double() - f64).abs() / f64).max().item() < 1e-6


def test_host_inv_freq_spec_facts():
    C = _C()
    inv = C.host.yarn_inv_freq().astype(np.float64)
    f = 150000.0 ** (np.arange(32) * 2 / 64)
    assert np.allclose(inv[:9], 1 / f[:9], rtol=1e-6)          # pairs 0-8 keep the original frequency
    assert np.allclose(inv[18:], 1 / (32 * f[18:]), rtol=1e-6)  # pairs 18-31 are divided by 32
    m = (inv[9:18] - 1 / (32 * f[9:18])) / (1 / f[9:18] - 1 / (32 * f[9:18]))
    assert np.allclose(m, [0.9025, 0.7950, 0.6876, 0.5801, 0.4726, 0.3652, 0.2577, 0.1502, 0.0428], atol=1e-4)


def test_host_concentration():
    C = _C()
    assert C.host.yarn_concentration(32.0) == pytest.approx(1.3465736, abs=1e-7)
    assert C.host.yarn_concentration(32.0) == np.float32(R.YarnParams().concentration)
    assert C.host.yarn_concentration(1.0) == 1.0


def test_c_abi_yarn_inv_freq_equals_host_math():
    C = _C()
    inv, conc = C.yarn_inv_freq()
    assert np.array_equal(np.asarray(inv, dtype=np.float32), C.host.yarn_inv_freq())
    assert conc == C.host.yarn_concentration(32.0)
    with pytest.raises(ValueError, match="head_dim"):
        C.yarn_inv_freq(head_dim=63)


POSITIONS = [0, 1, 2, 3, 127, 128, 4095, 4096, 8191, 32767, 65535, 100000, 105615, 105616, 131071, 131072,
             1 << 20]


def test_host_cos_sin_matches_reference_at_large_positions():
    C = _C()
    p = R.YarnParams()
    inv = R.yarn_inv_freq(p)
    pos = torch.tensor(POSITIONS + torch.randint(0, 131073, (200,)).tolist(), dtype=torch.int32)
    c, s = C.host.rope_cos_sin(pos.numpy(), inv.numpy(), np.float32(p.concentration))
    rc, rs = R.rope_cos_sin(pos, p)
    # same fp32 angle as the reference; both evaluate cos/sin of it accurately
    assert np.abs(c - rc.numpy()).max() < 2e-6 and np.abs(s - rs.numpy()).max() < 2e-6
    # against float64 cos/sin of the same fp32 angle
    ang = (pos.float().unsqueeze(-1) * inv).double().numpy()
    assert np.abs(c - np.cos(ang) * p.concentration).max() < 1e-6
    assert np.abs(s - np.sin(ang) * p.concentration).max() < 1e-6


def test_host_cos_sin_negative_and_quadrants():
    C = _C()
    inv = np.ones(1, dtype=np.float32)
    pos = np.arange(-20, 21, dtype=np.int32)
    c, s = C.host.rope_cos_sin(pos, inv, 1.0)
    assert np.abs(c[:, 0] - np.cos(pos)).max() < 1e-6 and np.abs(s[:, 0] - np.sin(pos)).max() < 1e-6


# ---- ops on the CPU and argument checks ----

def _qkv(T, device="cpu"):
    return (torch.randn(T, T_QKV, device=device) * 2).to(torch.bfloat16)


def test_rope_and_cache_append_cpu_equals_rope_then_append():
    T, B, S = 5, 3, 16
    qkv = _qkv(T)
    seq = torch.tensor([0, 2, 1, 2, 0], dtype=torch.int32)
    pos = torch.tensor([3, 17, 0, 18, 4], dtype=torch.int32)
    kc, vc = torch.zeros(B, S, 8, 64, dtype=torch.bfloat16), torch.zeros(B, S, 8, 64, dtype=torch.bfloat16)
    q = gk.rope_and_cache_append(qkv, seq, pos, kc, vc)
    rq, rk, rv = gk.rope_qkv(qkv, pos)
    kc2, vc2 = torch.zeros_like(kc), torch.zeros_like(vc)
    gk.cache_append(rk, rv, kc2, vc2, seq, pos)
    assert torch.equal(q, rq) and torch.equal(kc, kc2) and torch.equal(vc, vc2)
    assert torch.equal(kc[2, 1], rk[1]) and torch.equal(vc[2, 2], rv[3])  # slot = position % S


def test_rope_and_cache_append_q_out():
    qkv = _qkv(2)
    kc, vc = torch.zeros(1, 4, 8, 64, dtype=torch.bfloat16), torch.zeros(1, 4, 8, 64, dtype=torch.bfloat16)
    q_out = torch.full((2, 64, 64), float("nan"), dtype=torch.bfloat16)
    q = gk.rope_and_cache_append(qkv, torch.zeros(2, dtype=torch.int32), torch.arange(2, dtype=torch.int32), kc, vc,
                                 q_out=q_out)
    assert q is q_out and not torch.isnan(q).any()


def test_rope_and_cache_append_argument_checks():
    qkv = _qkv(2)
    kc = torch.zeros(1, 4, 8, 64, dtype=torch.bfloat16)
    z = torch.zeros(2, dtype=torch.int32)
    with pytest.raises(TypeError, match="qkv must have dtype bfloat16"):
        gk.rope_and_cache_append(qkv.float(), z, z, kc, kc.clone())
    with pytest.raises(ValueError, match="seq_ids must have shape"):
        gk.rope_and_cache_append(qkv, z[:1], z, kc, kc.clone())
    with pytest.raises(TypeError, match="positions must have dtype"):
        gk.rope_and_cache_append(qkv, z, z.float(), kc, kc.clone())
    with pytest.raises(ValueError, match="k_cache must have shape"):
        gk.rope_and_cache_append(qkv, z, z, torch.zeros(1, 4, 4, 64, dtype=torch.bfloat16), kc)
    with pytest.raises(ValueError, match="v_cache must have shape"):
        gk.rope_and_cache_append(qkv, z, z, kc, torch.zeros(1, 5, 8, 64, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="q_out must have shape"):
        gk.rope_and_cache_append(qkv, z, z, kc, kc.clone(), q_out=torch.empty(2, 64, 32, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="at least one slot"):
        e = torch.zeros(1, 0, 8, 64, dtype=torch.bfloat16)
        gk.rope_and_cache_append(qkv, z, z, e, e.clone())
    with pytest.raises(ValueError, match="is on meta"):
        gk.rope_and_cache_append(qkv, z, z, kc.to("meta"), kc.to("meta"))


def test_rope_qkv_and_cache_append_argument_checks():
    with pytest.raises(ValueError, match="qkv must have shape"):
        gk.rope_qkv(torch.zeros(2, 5000, dtype=torch.bfloat16), torch.zeros(2, dtype=torch.int32))
    k = torch.zeros(2, 8, 64, dtype=torch.bfloat16)
    kc = torch.zeros(1, 4, 8, 64, dtype=torch.bfloat16)
    z = torch.zeros(2, dtype=torch.int32)
    with pytest.raises(ValueError, match="v must have shape"):
        gk.cache_append(k, k[:1], kc, kc.clone(), z, z)
    with pytest.raises(ValueError, match="at least one slot"):
        e = torch.zeros(1, 0, 8, 64, dtype=torch.bfloat16)
        gk.cache_append(k, k, e, e.clone(), z, z)


def test_bindings_reject_bad_arguments_before_touching_cuda():
    C = _C()
    inv, conc = C.yarn_inv_freq()
    with pytest.raises(ValueError, match="head_dim must be 64"):
        C.rope_qkv_bf16(16, 16, 16, 16, 16, 1, 64, 8, 32, inv[:16], conc, 0)
    with pytest.raises(ValueError, match="inv_freq must hold"):
        C.rope_qkv_bf16(16, 16, 16, 16, 16, 1, 64, 8, 64, inv[:5], conc, 0)
    with pytest.raises(ValueError, match="16-byte aligned"):
        C.rope_cache_append_bf16(17, 16, 16, 16, 16, 16, 1, 64, 8, 64, 1, 4, inv, conc, 0)
    with pytest.raises(ValueError, match="null pointer"):
        C.cache_append_bf16(0, 16, 16, 16, 16, 16, 1, 8, 64, 1, 4, 0)
    # nothing to do: no CUDA call at all
    C.rope_qkv_bf16(0, 0, 0, 0, 0, 0, 64, 8, 64, inv, conc, 0)
    C.cache_append_bf16(0, 0, 0, 0, 0, 0, 0, 8, 64, 1, 4, 0)


# ---- GPU ----

def _reference():
    """The ops on CPU tensors run the PyTorch reference inside this block (on the host build the
    GPU tests run with the hostsim backend, where CPU tensors would run the kernels)."""
    return _lib.use_backend("reference")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


GPU_POSITIONS = [0, 1, 2, 127, 128, 4095, 4096, 8193, 65535, 105616, 131071, 131072]


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 7, 64, 300])
def test_rope_qkv_kernel_matches_reference(T):
    qkv = _qkv(T, DEV)
    pos = torch.tensor((GPU_POSITIONS * 30)[:T], dtype=torch.int32, device=DEV)
    if T > len(GPU_POSITIONS):
        pos[len(GPU_POSITIONS):] = torch.randint(0, 131073, (T - len(GPU_POSITIONS),), device=DEV, dtype=torch.int32)
    q, k, v = gk.rope_qkv(qkv, pos)
    sync()
    with _reference():
        rq, rk, rv = gk.rope_qkv(qkv.cpu(), pos.cpu())
    for got, want in ((q, rq), (k, rk)):
        assert not torch.isnan(got).any()
        assert _rel(got.cpu(), want) < 1e-2
        # the same fp32 angle: almost every element is the identical bf16 value
        assert (got.cpu() != want).float().mean().item() < 0.02
    assert torch.equal(v.cpu(), rv)


@pytest.mark.gpu
def test_rope_qkv_kernel_int64_positions_and_other_yarn():
    qkv = _qkv(33, DEV)
    pos = torch.randint(0, 200000, (33,), device=DEV)
    p = R.YarnParams(theta=10000.0, factor=8.0, original_context=2048)
    q, k, _ = gk.rope_qkv(qkv, pos, rope=p)
    sync()
    with _reference():
        rq, rk, _ = gk.rope_qkv(qkv.cpu(), pos.cpu(), rope=p)
    assert _rel(q.cpu(), rq) < 1e-2 and _rel(k.cpu(), rk) < 1e-2


def _poisoned_cache(B, S):
    return (torch.full((B, S, 8, 64), float("nan"), dtype=torch.bfloat16, device=DEV),
            torch.full((B, S, 8, 64), float("nan"), dtype=torch.bfloat16, device=DEV))


@pytest.mark.gpu
@pytest.mark.parametrize("S", [128, 9000])
def test_fused_rope_cache_append_matches_reference(S):
    B, T = 4, 37
    qkv = _qkv(T, DEV)
    seq = torch.randint(0, B, (T,), dtype=torch.int32, device=DEV)
    # distinct (seq, slot) pairs so the expected cache is well defined
    pos = torch.randperm(S, device=DEV)[:T].to(torch.int32) + (S if S == 128 else 0) * 700
    kc, vc = _poisoned_cache(B, S)
    q_out = torch.full((T, 64, 64), float("nan"), dtype=torch.bfloat16, device=DEV)
    q = gk.rope_and_cache_append(qkv, seq, pos, kc, vc, q_out=q_out)
    sync()
    ekc, evc = torch.full((B, S, 8, 64), float("nan"), dtype=torch.bfloat16), torch.full((B, S, 8, 64), float("nan"), dtype=torch.bfloat16)
    with _reference():
        rq, rk, rv = gk.rope_qkv(qkv.cpu(), pos.cpu())
        gk.cache_append(rk, rv, ekc, evc, seq.cpu(), pos.cpu())
    assert q is q_out and _rel(q.cpu(), rq) < 1e-2
    written = ~torch.isnan(ekc[..., 0, 0])
    assert torch.equal(~torch.isnan(kc.cpu()[..., 0, 0]), written)  # exactly the appended slots, nothing else
    assert _rel(kc.cpu()[written], ekc[written]) < 1e-2
    assert torch.equal(vc.cpu()[written], evc[written])


@pytest.mark.gpu
def test_fused_rope_cache_append_skips_out_of_range_seq_ids():
    kc, vc = _poisoned_cache(2, 8)
    qkv = _qkv(3, DEV)
    seq = torch.tensor([0, 5, -1], dtype=torch.int32, device=DEV)
    pos = torch.tensor([1, 2, 3], dtype=torch.int32, device=DEV)
    q = gk.rope_and_cache_append(qkv, seq, pos, kc, vc)
    sync()
    assert not torch.isnan(q).any()
    assert (~torch.isnan(kc[..., 0, 0])).sum().item() == 1 and not torch.isnan(kc[0, 1]).any()


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 1000])
def test_cache_append_kernel_bit_exact(T):
    B, S = 3, 640
    k = torch.randn(T, 8, 64, device=DEV).to(torch.bfloat16)
    v = torch.randn(T, 8, 64, device=DEV).to(torch.bfloat16)
    flat = torch.randperm(B * S, device=DEV)[:T]  # distinct (sequence, slot) pairs
    seq = (flat // S).to(torch.int32)
    pos = (flat % S + S * torch.randint(0, 3, (T,), device=DEV))  # int64 positions, wrapped by % S
    kc, vc = _poisoned_cache(B, S)
    gk.cache_append(k, v, kc, vc, seq, pos)
    ekc, evc = _poisoned_cache(B, S)
    slots = R.cache_slots(pos.long(), S)
    ekc[seq.long(), slots] = k
    evc[seq.long(), slots] = v
    sync()
    assert torch.equal(kc.view(torch.int16), ekc.view(torch.int16)) and torch.equal(vc.view(torch.int16), evc.view(torch.int16))


@pytest.mark.gpu
@pytest.mark.cuda_only  # CUDA graph capture and replay
def test_fused_rope_cache_append_cuda_graph_replay():
    B, S, T = 2, 64, 2
    qkv = _qkv(T, "cuda")
    seq = torch.tensor([0, 1], dtype=torch.int32, device="cuda")
    pos = torch.tensor([5, 9], dtype=torch.int32, device="cuda")
    kc, vc = _poisoned_cache(B, S)
    q_out = torch.empty(T, 64, 64, dtype=torch.bfloat16, device="cuda")
    gk.rope_and_cache_append(qkv, seq, pos, kc, vc, q_out=q_out)  # warm-up outside capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        gk.rope_and_cache_append(qkv, seq, pos, kc, vc, q_out=q_out)
    qkv.copy_(_qkv(T, "cuda"))
    pos.copy_(torch.tensor([40, 63], dtype=torch.int32))
    g.replay()
    torch.cuda.synchronize()
    kc2, vc2 = _poisoned_cache(B, S)
    q2 = gk.rope_and_cache_append(qkv, seq, pos, kc2, vc2)
    torch.cuda.synchronize()
    assert torch.equal(q_out, q2)
    assert torch.equal(kc[0, 40], kc2[0, 40]) and torch.equal(vc[1, 63], vc2[1, 63])
