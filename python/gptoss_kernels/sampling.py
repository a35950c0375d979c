"""Sampling one token per sequence on the device, without host synchronisation (so that a CUDA
graph can capture it with the decode step): greedy (argmax), sampling from softmax(logits /
temperature), and top-p (nucleus) sampling.

Modes (``sample_mode``): "greedy" (temperature <= 0), "sample", "top_p" (top_p < 1). The random
draws use the exponential trick, argmax(p / E) with E ~ Exp(1) drawn per (seed, draw counter,
row, vocab id) by a counter-based hash (``noise``): device-only integer ops, so a replayed graph
draws fresh noise at each step (the counter advances on the device) and a seed gives the same
tokens on every device for the same logits.

The state lives in a dict of device tensors (``sampling_buffers``, part of the decode step's
static buffers): "tok" (out), "temperature", "top_p", "seed", "counter", "vidx", "rowoff".
"""

from __future__ import annotations

import torch

from . import ops

__all__ = ["sample_mode", "sampling_buffers", "set_params", "noise", "sample_into", "argmax"]


def sample_mode(temperature: float, top_p: float) -> str:
    return "greedy" if temperature <= 0.0 else ("top_p" if top_p < 1.0 else "sample")


def sampling_buffers(batch: int, vocab_size: int, device) -> dict:
    """The sampler's device state for ``batch`` rows of ``vocab_size`` logits (the captured graph
    reads these scalars at replay); "tok", the sampled ids, is the decode step's."""
    B, V = batch, vocab_size
    return {
        "temperature": torch.ones(1, dtype=torch.float32, device=device),
        "top_p": torch.ones(1, dtype=torch.float32, device=device),
        "seed": torch.zeros(1, dtype=torch.int64, device=device),
        "counter": torch.zeros(1, dtype=torch.int64, device=device),
        "vidx": torch.arange(V, dtype=torch.int64, device=device),
        "rowoff": (torch.arange(B, dtype=torch.int64, device=device) * V).unsqueeze(1),
    }


def set_params(b: dict, temperature: float, top_p: float, seed: int) -> None:
    """A new request's sampling parameters into the state b; the draw counter restarts."""
    b["temperature"].fill_(max(float(temperature), 1e-6))
    b["top_p"].fill_(float(top_p))
    b["seed"].fill_(int(seed) & 0x7FFFFFFF)
    b["counter"].zero_()


def noise(b: dict, B: int) -> torch.Tensor:
    """Exp(1) noise float32 [B, V] from a counter-based hash of (seed, counter, row, vocab id):
    device-only integer ops, so a captured graph draws fresh noise at each replay (the counter
    advances on the device) and a seed gives the same tokens on every device. All products stay
    below 2^63 (32-bit values times 31-bit constants)."""
    M = 0xFFFFFFFF
    x = b["rowoff"][:B] + b["vidx"]
    h = (x + b["seed"] * 0x9E3779B + b["counter"] * 0x632BE5AB) & M
    for c in (0x7FEB352D, 0x68E31DA5, 0x2C1B3C6D):
        h = ((h ^ (h >> 16)) * c) & M
    h = h ^ (h >> 16)
    u = ((h >> 8).to(torch.float32) + 0.5) * (2.0 ** -24)    # (0, 1)
    return -torch.log(u)


def sample_into(logits: torch.Tensor, mode: str, b: dict) -> None:
    """Sample one token per row of logits float32 [B, V] into b["tok"] on the device, no host
    sync. greedy: argmax. sample/top_p: softmax(logits / temperature) (then the smallest
    prefix of the sorted probabilities reaching top_p) sampled with the exponential trick,
    argmax(p / Exp(1)); the draw counter advances."""
    tok = b["tok"]
    if mode == "greedy":
        argmax(logits, tok)
        return
    probs = torch.softmax(logits / b["temperature"], dim=-1)
    e = noise(b, logits.shape[0])
    if mode == "top_p":
        # stable: tied probabilities keep vocab order on every device (the noise is drawn per rank)
        p_sorted, idx = torch.sort(probs, dim=-1, descending=True, stable=True)
        # keep token i iff the mass before it is below top_p: the smallest prefix reaching top_p
        # (the first token is always kept for top_p > 0)
        drop = (torch.cumsum(p_sorted, -1) - p_sorted) >= b["top_p"]
        j = (p_sorted.masked_fill(drop, 0.0) / e).argmax(-1, keepdim=True)
        tok.copy_(idx.gather(-1, j).squeeze(-1))
    else:
        argmax(probs / e, tok)
    b["counter"].add_(1)


def argmax(x: torch.Tensor, out: torch.Tensor) -> None:
    """out int64 [B] = argmax over the last dim of float32 x [B, V] (torch.argmax's order): the
    package's two-pass device reduction when this version has it, else torch."""
    fn = getattr(ops, "greedy_argmax", None)
    if fn is not None and x.dtype == torch.float32:
        fn(x, out=out)
    else:
        torch.argmax(x, dim=-1, out=out)
