"""MXFP4: the reference against the spec (§3), the kernels' host-built decode math against the
reference, the dequantize op's argument checks, and (GPU) the dequantization kernel."""

from __future__ import annotations

import pytest
import torch

from .kernel_device import DEV, sync

import gptoss_kernels as gk
from gptoss_kernels import reference as R

SPEC_VALUES = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def _block(byte_values, scale):
    blocks = torch.zeros(1, 1, 16, dtype=torch.uint8)
    blocks[0, 0, : len(byte_values)] = torch.tensor(byte_values, dtype=torch.uint8)
    return blocks, torch.tensor([[scale]], dtype=torch.uint8)


@pytest.mark.parametrize("code", range(16))
def test_every_code_low_and_high_nibble(code):
    b, s = _block([code | (code << 4)], 127)
    out = R.mxfp4_dequantize(b, s, torch.float32)[0]
    assert out[0].item() == SPEC_VALUES[code] and out[1].item() == SPEC_VALUES[code]
    assert torch.signbit(out[0]).item() == (code >= 8)


@pytest.mark.parametrize("scale,factor", [(0, 2.0 ** -127), (1, 2.0 ** -126), (127, 1.0), (254, 2.0 ** 127)])
def test_scale_bytes(scale, factor):
    b, s = _block(list(range(16)), scale)
    out = R.mxfp4_dequantize(b, s, torch.float32)[0]
    # exact product, rounded once to float32 (scale 254 overflows to inf for |code| >= 2, as ldexp does)
    want = (torch.tensor([SPEC_VALUES[c] for c in range(16)], dtype=torch.float64) * factor).float()
    # low nibble of byte j is element 2j: byte j = j -> low nibble j, high nibble 0
    assert torch.equal(out[0:32:2], want)
    assert torch.all(out[1:32:2] == 0)
    # bf16 holds these exactly (subnormals included)
    assert torch.equal(R.mxfp4_dequantize(b, s, torch.bfloat16)[0].double(), out.double())


def test_spec_worked_example():
    # spec §3.4: byte 0x2F with scale byte 128 -> element 2j = LUT[0xF]*2 = -12, 2j+1 = LUT[0x2]*2 = +2
    b, s = _block([0, 0, 0, 0x2F], 128)
    out = R.mxfp4_dequantize(b, s, torch.float32)[0]
    assert out[6].item() == -12.0 and out[7].item() == 2.0


def test_nibble_order_is_not_gguf_split():
    b, s = _block([0x10], 127)  # low nibble 0 (element 0), high nibble 1 (element 1 = +0.5)
    out = R.mxfp4_dequantize(b, s, torch.float32)[0]
    assert out[1].item() == 0.5 and out[16].item() == 0.0


def test_quantize_roundtrip_exact_on_grid():
    # values already on an MXFP4 grid (one 2^x scale per 32 elements, max |code| = 6) round-trip exactly
    codes = torch.randint(0, 16, (5, 3, 32))
    codes[..., 0] = 7  # make 6 (largest) present in each block so the OCP exponent is the one used
    lut = torch.tensor(SPEC_VALUES)
    exps = torch.randint(-20, 20, (5, 3, 1))
    w = torch.ldexp(lut[codes], exps).reshape(5, 96)
    blocks, scales = R.mxfp4_quantize(w)
    assert torch.equal(R.mxfp4_dequantize(blocks, scales, torch.float32), w)
    b2, s2 = R.mxfp4_quantize(R.mxfp4_dequantize(blocks, scales, torch.float32))
    assert torch.equal(b2, blocks) and torch.equal(s2, scales)


def test_quantize_ocp_rule_and_error_bound():
    w = torch.randn(64, 256) * torch.logspace(-3, 3, 64).unsqueeze(1)
    blocks, scales = R.mxfp4_quantize(w)
    # shared exponent = floor(log2(amax)) - 2
    amax = w.reshape(64, 8, 32).abs().amax(-1)
    assert torch.equal(scales.int() - 127, torch.floor(torch.log2(amax)).int() - 2)
    deq = R.mxfp4_dequantize(blocks, scales, torch.float32).reshape(64, 8, 32)
    err = (deq - w.reshape(64, 8, 32)).abs()
    # round-to-nearest on E2M1 with scale 2^X: error <= 2^X (half the coarsest step 2) except saturation at 6*2^X
    bound = torch.ldexp(torch.ones_like(amax), scales.int() - 127).unsqueeze(-1)
    over = w.reshape(64, 8, 32).abs() > 6 * bound
    assert torch.all(err[~over] <= bound.expand_as(err)[~over])


def test_quantize_ties_to_even():
    # scale 2^0 when amax in [4, 8): 0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4
    w = torch.zeros(32)
    w[:8] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 4.0])
    b, s = R.mxfp4_quantize(w)
    assert s.item() == 127
    out = R.mxfp4_dequantize(b, s, torch.float32)[:8].tolist()
    assert out == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 4.0]


# ---- the kernels' decode math, built for the host ----

def _ldexp_decode(blocks, scales, dtype):
    """The earlier reference decode (int64 codes, a float LUT, ldexp on every element): the oracle
    of the table-and-multiply decode, which must give the same bits."""
    lut = torch.tensor(R.FP4_E2M1_VALUES, dtype=torch.float32)
    codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).reshape(*blocks.shape[:-1], 32)
    vals = torch.ldexp(lut[codes.long()], (scales.to(torch.int32) - 127).unsqueeze(-1))
    return vals.reshape(*blocks.shape[:-2], blocks.shape[-2] * 32).to(dtype)


def _same_bits(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    ints = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[a.dtype]
    return torch.equal(a.view(ints), b.view(ints))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_decode_same_bits_as_ldexp_decode(dtype, monkeypatch):
    # every byte value under every scale byte (0: subnormal results, 254/255: overflow to inf, and
    # 2^128 times a zero code stays a signed zero), then random blocks decoded in chunks with a
    # remainder (the CPU path decodes rows in cache-sized chunks)
    every = torch.arange(256, dtype=torch.uint8).reshape(16, 16).expand(256, 16, 16).contiguous()
    scales = torch.arange(256, dtype=torch.uint8).unsqueeze(1).expand(256, 16).contiguous()
    assert _same_bits(R.mxfp4_dequantize(every, scales, dtype), _ldexp_decode(every, scales, dtype))
    g = torch.Generator().manual_seed(11)
    blocks = torch.randint(0, 256, (3, 37, 5, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(0, 256, (3, 37, 5), dtype=torch.uint8, generator=g)
    scales[0, :4] = torch.tensor([0, 1, 254, 255], dtype=torch.uint8).unsqueeze(1)
    monkeypatch.setattr(R, "_MXFP4_CHUNK_ELEMENTS", 7 * 5 * 32)   # 7 rows per chunk: 111 rows = 15 chunks + 6
    assert _same_bits(R.mxfp4_dequantize(blocks, scales, dtype), _ldexp_decode(blocks, scales, dtype))
    assert R.mxfp4_dequantize(blocks[:0], scales[:0], dtype).shape == (0, 37, 160)


def test_moe_reference_same_bits_with_the_ldexp_decode(monkeypatch):
    """reference.moe decodes each selected expert into reused buffers: the output is the one the
    ldexp decode gives, bit for bit."""
    g = torch.Generator().manual_seed(5)
    E, H, I, T, k = 6, 64, 96, 7, 3
    w1b = torch.randint(0, 256, (E, 2 * I, H // 32, 16), dtype=torch.uint8, generator=g)
    w1s = torch.randint(117, 125, (E, 2 * I, H // 32), dtype=torch.uint8, generator=g)
    w2b = torch.randint(0, 256, (E, H, I // 32, 16), dtype=torch.uint8, generator=g)
    w2s = torch.randint(117, 125, (E, H, I // 32), dtype=torch.uint8, generator=g)
    b1 = torch.randn(E, 2 * I, generator=g).bfloat16()
    b2 = torch.randn(E, H, generator=g).bfloat16()
    x = torch.randn(T, H, generator=g).bfloat16()
    ids = torch.rand(T, E, generator=g).topk(k, dim=1).indices.int()
    w = torch.softmax(torch.randn(T, k, generator=g), 1)
    fast = R.moe(x, ids, w, w1b, w1s, b1, w2b, w2s, b2)
    monkeypatch.setattr(R, "_mxfp4_decode_into",
                        lambda b, s, out: out.copy_(_ldexp_decode(b, s, torch.float32).view_as(out)))
    assert _same_bits(fast, R.moe(x, ids, w, w1b, w1s, b1, w2b, w2s, b2))


needs_C = pytest.mark.skipif(not gk.kernels_built(), reason=f"kernels not built: {gk.kernels_error()}")


@needs_C
def test_host_decode_matches_reference_random():
    from gptoss_kernels import _C

    blocks = torch.randint(0, 256, (33, 7, 16), dtype=torch.uint8)
    scales = torch.randint(0, 255, (33, 7), dtype=torch.uint8)  # 255 (OCP NaN) excluded
    host = torch.from_numpy(_C.host.mxfp4_dequantize(blocks.numpy(), scales.numpy()))
    ref = R.mxfp4_dequantize(blocks, scales, torch.float32)
    assert torch.equal(host, ref)


@needs_C
def test_host_fp4_lut():
    from gptoss_kernels import _C

    assert [_C.host.fp4_e2m1_to_float(c) for c in range(16)] == SPEC_VALUES


@needs_C
def test_host_swiglu_matches_reference():
    from gptoss_kernels import _C

    z = torch.randn(9, 128) * 8
    z[0, 0], z[1, 1], z[2, 2], z[3, 3] = float("nan"), float("nan"), float("inf"), float("-inf")
    host = torch.from_numpy(_C.host.swiglu_clamped(z.numpy(), 1.702, 7.0))
    ref = R.swiglu(z)
    assert torch.equal(torch.isnan(host), torch.isnan(ref)) and torch.isnan(host[:2, 0]).all()  # NaN propagates
    ok = ~torch.isnan(ref)
    assert (host[ok] - ref[ok]).abs().max().item() < 1e-5


# ---- the op's argument checks ----

def _args(rows=4, groups=3):
    return (torch.randint(0, 256, (rows, groups, 16), dtype=torch.uint8),
            torch.randint(100, 140, (rows, groups), dtype=torch.uint8))


def test_op_cpu_equals_reference():
    b, s = _args()
    assert torch.equal(gk.mxfp4_dequantize(b, s), R.mxfp4_dequantize(b, s))


def test_op_wrong_dtype():
    b, s = _args()
    with pytest.raises(TypeError, match="blocks must have dtype uint8"):
        gk.mxfp4_dequantize(b.int(), s)
    with pytest.raises(TypeError, match="scales must have dtype uint8"):
        gk.mxfp4_dequantize(b, s.float())


def test_op_wrong_shape():
    b, s = _args()
    with pytest.raises(ValueError, match=r"blocks must have shape \[\.\.\., G, 16\]"):
        gk.mxfp4_dequantize(b[..., :8].contiguous(), s)
    with pytest.raises(ValueError, match="scales must have shape"):
        gk.mxfp4_dequantize(b, s[:, :2])


def test_op_non_contiguous():
    b, s = _args(rows=4, groups=4)
    with pytest.raises(ValueError, match="blocks must be contiguous"):
        gk.mxfp4_dequantize(b.transpose(0, 1), s.t())


def test_op_mixed_devices_and_out():
    b, s = _args()
    with pytest.raises(ValueError, match="scales is on meta"):
        gk.mxfp4_dequantize(b, s.to("meta"))
    with pytest.raises(TypeError, match="out must have dtype bfloat16"):
        gk.mxfp4_dequantize(b, s, out=torch.empty(4, 96))
    with pytest.raises(ValueError, match="out must have shape"):
        gk.mxfp4_dequantize(b, s, out=torch.empty(4, 95, dtype=torch.bfloat16))


@needs_C
def test_binding_rejects_bad_sizes_before_touching_cuda():
    from gptoss_kernels import _C

    with pytest.raises(ValueError, match="multiple of 32"):
        _C.mxfp4_dequantize_bf16(16, 16, 16, 1, 33, 0)
    with pytest.raises(ValueError, match="16-byte aligned"):
        _C.mxfp4_dequantize_bf16(17, 16, 16, 1, 32, 0)
    with pytest.raises(ValueError, match="null pointer"):
        _C.mxfp4_dequantize_bf16(0, 16, 16, 1, 32, 0)


@needs_C
def test_binding_without_gpu_raises_clear_error():
    from gptoss_kernels import _C

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="no usable NVIDIA GPU"):
        _C.mxfp4_dequantize_bf16(16, 16, 16, 1, 32, 0)


# ---- GPU ----

@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 1), (5760, 90), (3, 2880 // 32), (0, 4), (2, 3, 7)])
def test_dequantize_kernel_matches_reference(shape):
    blocks = torch.randint(0, 256, (*shape, 16), dtype=torch.uint8, device=DEV)
    scales = torch.randint(0, 255, shape, dtype=torch.uint8, device=DEV)
    out = torch.full((*shape[:-1], shape[-1] * 32), float("nan"), dtype=torch.bfloat16, device=DEV)
    gk.mxfp4_dequantize(blocks, scales, out=out)
    sync()
    ref = R.mxfp4_dequantize(blocks.cpu(), scales.cpu(), torch.bfloat16)
    assert torch.equal(out.cpu().view(torch.int16), ref.view(torch.int16))  # bit-exact, poison overwritten
