"""Pure-PyTorch reference of every gpt-oss op: the oracle of every kernel test, the baseline of
every benchmark, and the CPU path of the model.

Semantics follow ``shared/spec/gpt-oss.md`` (section numbers below refer to it) and are checked
against Hugging Face transformers' GptOss in ``tests/test_reference_vs_transformers.py``.
Everything here is device-agnostic (CPU or CUDA tensors) and computes in float32 internally;
outputs come back in the input activation dtype unless stated otherwise. Nothing here is fast.

Shape legend: T tokens, H hidden (2880), E experts, k experts per token (4), I expert
intermediate (2880), nq query heads (64), nkv KV heads (8), d head dim (64), B sequences,
S cache slots, G = K/32 MXFP4 blocks per row.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

__all__ = [
    "FP4_E2M1_VALUES",
    "mxfp4_dequantize",
    "mxfp4_quantize",
    "rms_norm",
    "YarnParams",
    "yarn_inv_freq",
    "rope_cos_sin",
    "apply_rope",
    "attention",
    "attention_varlen",
    "attention_decode",
    "cache_slots",
    "router_topk",
    "route_metadata",
    "swiglu",
    "moe",
    "moe_block",
]

# ----------------------------------------------------------------------------------------------
# MXFP4 (spec §3)
# ----------------------------------------------------------------------------------------------

#: Value of each E2M1 code 0..15 (spec §3.1).
FP4_E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
# Midpoints between consecutive magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6 (for round-to-nearest).
_FP4_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def mxfp4_dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """MXFP4 -> ``dtype``, exact for bf16/fp32 (spec §3.4).

    blocks: uint8 [..., G, 16]; byte j of block g holds element 32g+2j in its low nibble and
            32g+2j+1 in its high nibble.
    scales: uint8 [..., G]; E8M0, value 2^(s-127) (byte 255 is not special: 2^128).
    returns [..., 32*G]

    Each element is the exact product LUT[code] * 2^(s-127) rounded once to float32 (an overflow
    becomes inf; a zero code stays a signed zero for every scale), then converted to ``dtype``.
    Computed as one float32 multiply per element, (2 LUT[code]) * 2^(s-128): both factors are
    exact float32 numbers for every byte (2^(s-128) spans 2^-128, a subnormal, to 2^127), and the
    product of two numbers with at most two significant bits is exact unless it overflows. The two
    codes of a byte come from one 256-entry table; on the CPU the rows are decoded in chunks that
    stay in cache.
    """
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise TypeError("mxfp4_dequantize: blocks and scales must be uint8")
    if blocks.shape[-1] != 16 or blocks.shape[:-1] != scales.shape:
        raise ValueError(f"mxfp4_dequantize: blocks {tuple(blocks.shape)} must be scales.shape + (16,), "
                         f"scales {tuple(scales.shape)}")
    G = blocks.shape[-2]
    rows = scales.numel() // G if G else 0
    out = torch.empty((rows, G * 32), dtype=torch.float32, device=blocks.device)
    _mxfp4_decode_into(blocks.reshape(rows, G, 16), scales.reshape(rows, G), out)
    out = out.view(*blocks.shape[:-2], G * 32)
    return out if dtype == torch.float32 else out.to(dtype)


def _mxfp4_decode_into(blocks: torch.Tensor, scales: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """blocks uint8 [R, G, 16], scales uint8 [R, G] -> out float32 [R, 32 G] (contiguous), written
    in place (``mxfp4_dequantize``'s arithmetic; a caller decoding many matrices reuses `out`)."""
    rows, G = scales.shape
    if not out.numel():
        return out
    pairs, powers = _mxfp4_tables(blocks.device)
    b = blocks.reshape(rows, G * 16)
    step = rows if blocks.device.type != "cpu" else max(1, _MXFP4_CHUNK_ELEMENTS // (G * 32))
    for r in range(0, rows, step):
        o = out[r:r + step]
        # each byte's two values as one 8-byte word (a plain copy of the bits)
        torch.index_select(pairs, 0, b[r:r + step].reshape(-1).to(torch.int32), out=o.view(torch.int64).view(-1))
        o.view(-1, G, 32).mul_(powers[scales[r:r + step].to(torch.int32)].unsqueeze(-1))
    return out


#: elements decoded per chunk on the CPU (1 MiB of float32: the chunk's intermediates stay in cache)
_MXFP4_CHUNK_ELEMENTS = 1 << 18


@functools.lru_cache(maxsize=None)
def _mxfp4_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(pairs int64 [256]: the float32 pair (2 LUT[byte & 15], 2 LUT[byte >> 4]) of each byte,
    element order kept, as one 8-byte word; powers float32 [256]: 2^(s-128))."""
    lut2 = torch.tensor([2.0 * v for v in FP4_E2M1_VALUES], dtype=torch.float32)
    byte = torch.arange(256)
    pairs = torch.stack((lut2[byte & 15], lut2[byte >> 4]), dim=1).contiguous().view(torch.int64).reshape(256)
    powers = torch.tensor([math.ldexp(1.0, s - 128) for s in range(256)], dtype=torch.float32)
    return pairs.to(device), powers.to(device)


def mxfp4_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float tensor [..., K] (K % 32 == 0) -> (blocks uint8 [..., K/32, 16], scales uint8 [..., K/32]).

    OCP MX v1.0 rule: per 32-element block, shared exponent X = floor(log2(max|w|)) - 2 (2 = the
    largest E2M1 exponent), clamped to [-127, 127]; each element is w / 2^X rounded to the
    nearest E2M1 value (ties to the even mantissa) and saturated to +-6. An all-zero block gets
    scale byte 0. Values already on the MXFP4 grid round-trip exactly.
    """
    if w.shape[-1] % 32 != 0:
        raise ValueError(f"mxfp4_quantize: last dim {w.shape[-1]} is not a multiple of 32")
    x = w.float().reshape(*w.shape[:-1], w.shape[-1] // 32, 32)
    amax = x.abs().amax(dim=-1)
    # floor(log2(amax)) exactly, from the float's exponent (frexp: amax = m * 2^e, m in [0.5, 1))
    _, e = torch.frexp(amax)
    shared = torch.where(amax > 0, e.to(torch.int32) - 1 - 2, torch.full_like(e, -127, dtype=torch.int32))
    shared = shared.clamp(-127, 127)
    scaled = torch.ldexp(x, (-shared).unsqueeze(-1))
    mag = scaled.abs()
    mids = torch.tensor(_FP4_MIDPOINTS, dtype=torch.float32, device=w.device)
    # code = number of midpoints passed; on an exact tie pick the even code (even mantissa).
    above = (mag.unsqueeze(-1) > mids).sum(-1)
    ties = (mag.unsqueeze(-1) == mids) & (torch.arange(1, 8, device=w.device) % 2 == 0)
    code = (above + ties.sum(-1)).clamp(max=7).to(torch.uint8)
    code = code | ((scaled < 0) | ((scaled == 0) & torch.signbit(scaled))).to(torch.uint8) << 3
    code = code.reshape(*code.shape[:-1], 16, 2)
    blocks = (code[..., 0] | (code[..., 1] << 4)).to(torch.uint8)
    return blocks.contiguous(), (shared + 127).to(torch.uint8).contiguous()


# ----------------------------------------------------------------------------------------------
# Norm and RoPE (spec §1.3, §4.2)
# ----------------------------------------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """[..., H] -> [..., H] in x.dtype: x * rsqrt(mean(x^2) + eps) * weight, all in float32."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


@dataclass(frozen=True)
class YarnParams:
    """RoPE/YaRN parameters (spec §1.3); defaults are gpt-oss's."""

    head_dim: int = 64
    theta: float = 150000.0
    factor: float = 32.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    original_context: int = 4096

    @property
    def concentration(self) -> float:
        """YaRN attention temperature c, multiplied into both cos and sin (logits scale by c^2)."""
        return 0.1 * math.log(self.factor) + 1.0 if self.factor > 1.0 else 1.0


def yarn_inv_freq(p: YarnParams = YarnParams()) -> torch.Tensor:
    """float32 [head_dim/2]: NTK-by-parts inverse frequencies, unrounded ramp bounds.

    The float32 operation order is that of transformers' YaRN (so tables agree bit for bit)."""
    d = p.head_dim
    pos_freqs = p.theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    extrapolated = 1.0 / pos_freqs
    if p.factor <= 1.0:
        return extrapolated
    interpolated = 1.0 / (p.factor * pos_freqs)
    low = max(d * math.log(p.original_context / (p.beta_fast * 2 * math.pi)) / (2 * math.log(p.theta)), 0)
    high = min(d * math.log(p.original_context / (p.beta_slow * 2 * math.pi)) / (2 * math.log(p.theta)), d - 1)
    ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # weight of the original (extrapolated) frequency
    return interpolated * (1 - keep) + extrapolated * keep


def rope_cos_sin(positions: torch.Tensor, p: YarnParams = YarnParams()) -> tuple[torch.Tensor, torch.Tensor]:
    """positions int [...] -> (c*cos, c*sin) float32 [..., head_dim/2]."""
    inv = yarn_inv_freq(p).to(positions.device)
    ang = positions.to(torch.float32).unsqueeze(-1) * inv
    c = p.concentration
    return torch.cos(ang) * c, torch.sin(ang) * c


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split (NeoX) rotation. x [T, heads, d]; cos/sin [T, d/2] -> [T, heads, d] in x.dtype."""
    half = x.shape[-1] // 2
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    c, s = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Attention with sinks, sliding window, GQA (spec §4.2 steps 4-7)
# ----------------------------------------------------------------------------------------------


def _sink_softmax_attend(logits: torch.Tensor, visible: torch.Tensor, sinks: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """logits [nq, Tq, Tk] f32, visible bool [Tq, Tk] or [nq, Tq, Tk], sinks [nq], v [nq, Tk, d] f32."""
    logits = logits.masked_fill(~visible, float("-inf"))
    s = sinks.float().view(-1, 1, 1).expand(-1, logits.shape[1], 1)
    m = torch.maximum(logits.amax(-1, keepdim=True), s)
    p = torch.exp(logits - m)
    z = p.sum(-1, keepdim=True) + torch.exp(s - m)
    return (p / z) @ v


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor, *,
              sm_scale: float = 0.125, sliding_window: int | None = None, q_offset: int | None = None) -> torch.Tensor:
    """One sequence. q [Tq, nq, d]; k, v [Tk, nkv, d]; sinks [nq] -> [Tq, nq, d] in q.dtype.

    Query i sits at absolute position q_offset + i (default Tk - Tq: the queries are the last Tq
    keys, i.e. a prefill that continues a cache of Tk - Tq tokens); key j sits at position j.
    Key j is visible to a query at position p when j <= p and, with a window W, j > p - W
    (W keys including the query's own). The sink joins the softmax denominator only.
    """
    Tq, nq, d = q.shape
    Tk, nkv, _ = k.shape
    if nq % nkv != 0:
        raise ValueError(f"attention: {nq} query heads not a multiple of {nkv} KV heads")
    if q_offset is None:
        q_offset = Tk - Tq
    group = nq // nkv
    qf = q.float().transpose(0, 1)                                   # [nq, Tq, d]
    kf = k.float().repeat_interleave(group, dim=1).transpose(0, 1)   # [nq, Tk, d]
    vf = v.float().repeat_interleave(group, dim=1).transpose(0, 1)
    pos_q = torch.arange(Tq, device=q.device).unsqueeze(1) + q_offset
    pos_k = torch.arange(Tk, device=q.device).unsqueeze(0)
    visible = pos_k <= pos_q
    if sliding_window is not None:
        visible = visible & (pos_k > pos_q - sliding_window)
    out = _sink_softmax_attend((qf @ kf.transpose(1, 2)) * sm_scale, visible, sinks, vf)
    return out.transpose(0, 1).to(q.dtype)


def attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor, *,
                     cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, sm_scale: float = 0.125,
                     sliding_window: int | None = None) -> torch.Tensor:
    """Packed batch: q [sum Tq_b, nq, d], k/v [sum Tk_b, nkv, d], cu_seqlens int [B+1].

    Sequence b's queries are the last Tq_b of its Tk_b keys (Tk_b >= Tq_b; a chunked prefill).
    """
    out = torch.empty_like(q)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        qs, qe, ks, ke = cq[b], cq[b + 1], ck[b], ck[b + 1]
        if qe > qs:
            out[qs:qe] = attention(q[qs:qe], k[ks:ke], v[ks:ke], sinks, sm_scale=sm_scale,
                                   sliding_window=sliding_window)
    return out


def cache_slots(positions: torch.Tensor, cache_size: int) -> torch.Tensor:
    """KV-cache slot of each absolute position: position p lives in slot p % S.

    With S >= the longest sequence this is the identity (full layers); with S = 128 on sliding
    layers it is a ring buffer that always holds the last 128 positions.
    """
    return positions % cache_size


def attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
                     sinks: torch.Tensor, *, sliding_window: int | None = None, sm_scale: float = 0.125) -> torch.Tensor:
    """One new token per sequence against the KV cache.

    q [B, nq, d] (already rotated, at position L_b - 1); k_cache/v_cache [B, S, nkv, d] with
    position p in slot p % S (see cache_slots); cache_seqlens int [B] = L_b >= 1, the number of
    positions written including the new token. The query attends to positions
    max(0, L_b - W)..L_b - 1 (W = sliding_window, or all); requires S >= min(L_b, W).
    returns [B, nq, d] in q.dtype.
    """
    B, nq, d = q.shape
    S, nkv = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty_like(q)
    # the longest sequence the cache can serve: all of it must be there (full attention), or the
    # window's last positions (a ring of S >= W slots serves any length)
    longest = S if sliding_window is None or S < sliding_window else None
    if S < 1 and B:
        raise ValueError(f"attention_decode: k_cache {tuple(k_cache.shape)} has no slots; it must hold at "
                         f"least the new token's position")
    for b, L in enumerate(cache_seqlens.tolist()):
        W = L if sliding_window is None else min(L, sliding_window)
        if L < 1 or S < W:
            valid = f"in [1, {longest}]" if longest is not None else ">= 1"
            why = f"the cache holds {S} slot{'' if S == 1 else 's'}"
            if sliding_window is not None and S < sliding_window:
                why += f", fewer than the window of {sliding_window}"
            raise ValueError(f"attention_decode: cache_seqlens[{b}] is {L}, must be {valid} (the positions "
                             f"written including the new token; {why})")
        pos = torch.arange(L - W, L, device=q.device)
        slots = cache_slots(pos, S)
        out[b] = attention(q[b:b + 1], k_cache[b, slots], v_cache[b, slots], sinks, sm_scale=sm_scale,
                           sliding_window=None, q_offset=W - 1)[0]
    return out


# ----------------------------------------------------------------------------------------------
# Router and MoE (spec §4.3)
# ----------------------------------------------------------------------------------------------


def router_topk(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, k: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, H], weight [E, H], bias [E] -> (ids int32 [T, k], weights float32 [T, k]).

    Logits in float32; the k largest in descending order, ties to the lower expert index; a NaN
    logit ranks below every number (so ids are always valid experts); weights = softmax over the
    k selected logits (NaN if a selected logit is NaN).
    """
    logits = x.float() @ weight.float().t() + bias.float()
    key = torch.nan_to_num(logits, nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices[:, :k]
    sel = torch.gather(logits, 1, order)
    return order.to(torch.int32), torch.softmax(sel, dim=-1)


def route_metadata(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grouping of routed rows by expert, for the prefill MoE.

    topk_ids int [T, k] -> counts int32 [E], offsets int32 [E+1] (exclusive prefix sum of counts),
    permutation int32 [T*k]: the flat row indices r = t*k + j sorted by expert, stable (rows of one
    expert stay in token order). Rows of expert e are permutation[offsets[e]:offsets[e+1]].
    """
    flat = topk_ids.reshape(-1).long()
    counts = torch.bincount(flat, minlength=num_experts).to(torch.int32)
    offsets = torch.zeros(num_experts + 1, dtype=torch.int32, device=topk_ids.device)
    offsets[1:] = torch.cumsum(counts, 0)
    perm = torch.sort(flat, stable=True).indices.to(torch.int32)
    return counts, offsets, perm


def swiglu(z: torch.Tensor, alpha: float = 1.702, limit: float = 7.0) -> torch.Tensor:
    """[..., 2I] interleaved (gate = even, linear = odd) -> [..., I] float32:
    gate = min(gate, limit); lin = clamp(lin, -limit, limit); gate * sigmoid(alpha*gate) * (lin + 1)."""
    zf = z.float()
    gate = zf[..., 0::2].clamp(max=limit)
    lin = zf[..., 1::2].clamp(min=-limit, max=limit)
    return gate * torch.sigmoid(alpha * gate) * (lin + 1.0)


def moe(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
        w1_blocks: torch.Tensor, w1_scales: torch.Tensor, w1_bias: torch.Tensor,
        w2_blocks: torch.Tensor, w2_scales: torch.Tensor, w2_bias: torch.Tensor, *,
        swiglu_alpha: float = 1.702, swiglu_limit: float = 7.0) -> torch.Tensor:
    """Sum over selected experts: out[t] = sum_j w[t,j] * (W2 swiglu(W1 x[t] + b1) + b2).

    x [T, H]; topk_ids int [T, k]; topk_weights [T, k]; w1_blocks uint8 [E, 2I, H/32, 16],
    w1_scales uint8 [E, 2I, H/32], w1_bias [E, 2I] (gate/linear interleaved rows);
    w2_blocks [E, H, I/32, 16], w2_scales [E, H, I/32], w2_bias [E, H] -> [T, H] in x.dtype.
    float32 throughout (weights dequantized exactly); one expert at a time to bound memory.
    """
    T, H = x.shape
    out = torch.zeros(T, H, dtype=torch.float32, device=x.device)
    xf = x.float()
    ids = topk_ids.long()
    # one float32 buffer per matrix, reused for every expert (only the selected ones are decoded)
    w1 = torch.empty(w1_blocks.shape[1], H, dtype=torch.float32, device=x.device)           # [2I, H]
    w2 = torch.empty(H, w2_blocks.shape[2] * 32, dtype=torch.float32, device=x.device)      # [H, I]
    for e in torch.unique(ids).tolist():
        tok, slot = torch.nonzero(ids == e, as_tuple=True)
        _mxfp4_decode_into(w1_blocks[e], w1_scales[e], w1)
        z = xf[tok] @ w1.t() + w1_bias[e].float()
        act = swiglu(z, swiglu_alpha, swiglu_limit)                             # [n, I]
        _mxfp4_decode_into(w2_blocks[e], w2_scales[e], w2)
        y = act @ w2.t() + w2_bias[e].float()
        out.index_add_(0, tok, y * topk_weights[tok, slot].float().unsqueeze(1))
    return out.to(x.dtype)


def moe_block(x: torch.Tensor, norm_weight: torch.Tensor, router_weight: torch.Tensor, router_bias: torch.Tensor,
              w1_blocks: torch.Tensor, w1_scales: torch.Tensor, w1_bias: torch.Tensor,
              w2_blocks: torch.Tensor, w2_scales: torch.Tensor, w2_bias: torch.Tensor, *, k: int = 4,
              eps: float = 1e-5, swiglu_alpha: float = 1.702, swiglu_limit: float = 7.0) -> torch.Tensor:
    """The whole MoE sub-block without the residual: RMSNorm -> router top-k -> experts. [T, H] -> [T, H]."""
    u = rms_norm(x, norm_weight, eps)
    ids, w = router_topk(u, router_weight, router_bias, k)
    return moe(u, ids, w, w1_blocks, w1_scales, w1_bias, w2_blocks, w2_scales, w2_bias,
               swiglu_alpha=swiglu_alpha, swiglu_limit=swiglu_limit)
