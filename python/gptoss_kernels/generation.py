"""Generation: prompt ids in, new token ids out (``DecodeEngine.stream`` / ``generate``), through
a model's prefill of a chunk and its decode step.

Decode: one token per sequence per step, every op writing into static buffers (the model's
``decode_buffers`` and the sampler's ``sampling_buffers``: the bf16 residual stream updated in
place, fp32 logits, the sampled ids), the position / length / draw counter advanced on the
device, so that the whole step (layers, unembedding, greedy or seeded top-p sampling) is one
CUDA graph replayed per token with no host synchronisation; the host reads the sampled ids
through a pinned ring (``TokenRing``) ``decode_lookahead`` steps behind the device (stop
checks). On CUDA a request that does not fit the free memory raises MemoryPlanError
(memory.py) before anything is allocated.

Batches: ``prompt_ids`` may be a list of ints / LongTensor [1, T] (``generate`` returns a list of
new ids) or a list of lists / LongTensor [B, T] (returns one list per prompt). Prompts may differ
in length: they are prefilled together (chunks of at most ``prefill_chunk`` tokens packed over
sequences with cu_seqlens, each into its row of the batch cache), then all B
sequences decode together, one token each per step, each at its own position (``cache_seqlens``
per sequence). A sequence that hit a stop token stops collecting tokens; decoding ends when all
have stopped or after ``max_new_tokens``.

The model (``GptOss``) provides: ``config``, ``device``, ``dtype``, ``weights_bytes()``; the
settings ``prefill_chunk``, ``use_cuda_graph``, ``decode_lookahead``, ``cache_granularity``
(read at each call); ``new_cache(batch, S)``; ``prefill(chunks, starts, caches, finishing)``
(one chunk); ``decode_buffers(batch)`` and ``decode_step(buf, caches)`` (the layers of one step,
logits into buf["logits"]).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence

import torch

from . import _lib, memory, sampling

__all__ = ["DecodeEngine", "TokenRing", "normalize_prompts"]


def normalize_prompts(prompt_ids) -> tuple[list[list[int]], bool]:
    """-> (prompts as lists of ints, whether a single prompt was given)."""
    if isinstance(prompt_ids, torch.Tensor):
        if prompt_ids.dim() == 1:
            return [prompt_ids.tolist()], True
        if prompt_ids.dim() != 2:
            raise ValueError(f"prompt_ids tensor must be [T] or [B, T], got {tuple(prompt_ids.shape)}")
        return prompt_ids.tolist(), prompt_ids.shape[0] == 1
    prompt_ids = list(prompt_ids)
    if prompt_ids and all(isinstance(p, (list, tuple, torch.Tensor)) for p in prompt_ids):
        return [list(map(int, p)) for p in prompt_ids], False
    return [list(map(int, prompt_ids))], True


class DecodeEngine:
    """Generation for one model (see the module docstring). ``state``: the KV cache, static
    buffers and captured decode steps, reused by calls of the same batch and rounded length;
    ``graph``: the last captured decode step (a CUDA graph), or None."""

    def __init__(self, model):
        self.model = model
        self.state: dict | None = None
        self.graph = None

    def release(self) -> None:
        """Free the KV cache and the captured decode graph kept between generate calls."""
        self.state = self.graph = None

    def drop_steps(self) -> None:
        """Forget the captured decode steps (captured anew at the next call): the model's step changed."""
        if self.state is not None:
            self.state["steps"].clear()
        self.graph = None

    # ---- memory ------------------------------------------------------------------------------
    def cache_len(self, max_len: int) -> int:
        """Full-layer cache length for max_len positions, rounded up to the model's cache_granularity."""
        g = max(1, int(self.model.cache_granularity))
        return -(-max_len // g) * g

    def plan_request(self, batch: int, max_len: int, available_bytes: float | None = None) -> dict:
        """The memory plan of a generate call (batch sequences of up to max_len positions, the
        full-layer cache rounded up to cache_granularity) on the model's device.
        available_bytes: memory beside the loaded weights; None: on CUDA what is still free
        (driver-free + torch-cached + the current cache), on the CPU unlimited."""
        m = self.model
        if available_bytes is None:
            held = 0
            if self.state is not None:
                held = sum(t.numel() * t.element_size() for kv in self.state["caches"] for t in kv)
            available_bytes = memory.free_bytes(m.device, held)
        return memory.plan_request(m.config, batch, self.cache_len(max_len), available_bytes,
                                   weights_bytes=m.weights_bytes(), prefill_chunk=m.prefill_chunk,
                                   weight_dtype_bytes=torch.empty((), dtype=m.dtype).element_size())

    def check_memory(self, batch: int, max_len: int, available_bytes: float | None = None) -> dict:
        """plan_request, raising MemoryPlanError (with the largest context that would fit) when
        the request does not fit."""
        plan = self.plan_request(batch, max_len, available_bytes)
        return memory.check_request(plan, batch, max_len, self.model.device)

    # ---- the decode state and step -----------------------------------------------------------
    def decode_state(self, batch: int, max_len: int) -> dict:
        """The cache, static buffers and captured decode steps for `batch` sequences of up to
        `max_len` positions. Reused across calls with the same batch and rounded length: stale
        entries are never read (a query only sees positions of its own sequence written in this
        call). On CUDA a request that does not fit the free memory raises MemoryPlanError before
        anything is allocated."""
        m = self.model
        S = self.cache_len(max_len)
        st = self.state
        if st is not None and st["B"] == batch and st["S"] == S:
            return st
        self.state = self.graph = None   # free the old cache first
        if m.device.type == "cuda":
            self.check_memory(batch, max_len)
        buf = {**m.decode_buffers(batch), **sampling.sampling_buffers(batch, m.config.vocab_size, m.device)}
        self.state = {"B": batch, "S": S, "caches": m.new_cache(batch, S), "steps": {}, "buf": buf}
        return self.state

    def step(self, st: dict, mode: str) -> None:
        """One decode step, all in place on st's buffers (device work only: capturable): the
        model's layers (logits into buf.logits), the next token sampled into buf.tok, pos and
        seqlens advanced."""
        b = st["buf"]
        self.model.decode_step(b, st["caches"])
        sampling.sample_into(b["logits"], mode, b)
        b["pos"].add_(1)
        b["seqlens"].add_(1)

    def step_fn(self, st: dict, mode: str):
        """The decode step for a sampling mode: a CUDA graph replay on CUDA (captured once per
        state and mode), else the eager step. Both update st's buffers in place."""
        if mode in st["steps"]:
            return st["steps"][mode]
        m = self.model
        eager = lambda: self.step(st, mode)  # noqa: E731
        fn = eager
        if m.device.type == "cuda" and m.use_cuda_graph:
            if not _lib.cuda_available() or m.dtype != torch.bfloat16:
                # the reference path reads tensors on the host: not capturable
                warnings.warn(f"{type(m).__name__}: decode runs eagerly (no CUDA graph): "
                              f"{_lib.kernels_error() or 'float32 model uses the reference'}", RuntimeWarning)
            else:
                graph = self.capture(st, mode)
                if graph is not None:
                    fn = graph.replay
                    self.graph = graph
        st["steps"][mode] = fn
        return fn

    def capture(self, st: dict, mode: str):
        """Capture one decode step in a CUDA graph without changing the state: the warm-up step
        runs for real (it writes the cache slot the first real step rewrites with the same
        values), so the small state it advances is saved and restored."""
        dev = self.model.device
        b = st["buf"]
        saved = {n: b[n].clone() for n in ("tok", "pos", "seqlens", "counter")}
        try:
            s = torch.cuda.Stream(dev)
            s.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(s):   # warm-up outside the capture: lazy inits, allocator pools
                self.step(st, mode)
            torch.cuda.current_stream(dev).wait_stream(s)
            for n, t in saved.items():
                b[n].copy_(t)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.step(st, mode)
        except Exception as e:  # an op that syncs with the host (e.g. a reference fallback) cannot be captured
            warnings.warn(f"{type(self.model).__name__}: decode step not captured in a CUDA graph "
                          f"({type(e).__name__}: {e}); running it eagerly", RuntimeWarning)
            torch.cuda.synchronize(dev)
            graph = None
        for n, t in saved.items():
            b[n].copy_(t)
        return graph

    def _on_device(self):
        """The model's CUDA device made current (graph capture and replay, the token ring's events
        and the ops' current streams all follow torch's current device), or nothing on the CPU."""
        dev = self.model.device
        return torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()

    def prepare(self, batch: int, max_len: int, temperature: float = 0.0, top_p: float = 1.0) -> None:
        """Allocate the cache and capture the decode step for `batch` sequences of up to `max_len`
        positions ahead of a generate call (so that its time to first token holds no capture). The
        capture's warm-up step writes slot 0 of each cache row, which every prefill rewrites."""
        with torch.inference_mode(), self._on_device():
            st = self.decode_state(batch, max_len)
            mode = sampling.sample_mode(temperature, top_p)
            if mode not in st["steps"]:
                b = st["buf"]
                b["pos"].zero_()
                b["seqlens"].fill_(1)
                self.step_fn(st, mode)

    # ---- prefill and the generation loop -----------------------------------------------------
    def prefill(self, prompts: list[list[int]], caches) -> torch.Tensor:
        """Prefill every prompt into its row of the cache -> float32 logits [B, V] of each last token.

        Chunks of at most ``prefill_chunk`` tokens in total, packed over sequences (cu_seqlens):
        each sequence continues from where its previous chunk stopped (cache_seqlens); the
        model prefills one chunk at a time (``prefill``)."""
        B, lens = len(prompts), [len(p) for p in prompts]
        chunk = max(1, int(self.model.prefill_chunk))
        done = [0] * B
        rows: list[torch.Tensor | None] = [None] * B
        while any(done[b] < lens[b] for b in range(B)):
            take, budget = [0] * B, chunk
            for b in range(B):
                take[b] = min(lens[b] - done[b], budget)
                budget -= take[b]
            last = [b for b in range(B) if take[b] and done[b] + take[b] == lens[b]]
            pieces = [prompts[b][done[b]:done[b] + take[b]] for b in range(B)]
            lg = self.model.prefill(pieces, list(done), caches, last)
            for j, b in enumerate(last):
                rows[b] = lg[j]
            for b in range(B):
                done[b] += take[b]
        return torch.stack(rows)

    def stream(self, prompt_ids, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
               stop_token_ids: Sequence[int] | None = None, seed: int | None = None) -> Iterator[list[int | None]]:
        """Yield, per step, the new token of every sequence (None once a sequence has stopped).
        A stop token is yielded, then that sequence stops.

        Sampling (temperature > 0) is seeded by `seed` (None: drawn from torch's default CPU
        generator); the same seed gives the same draws on every device for the same logits."""
        prompts, _ = normalize_prompts(prompt_ids)
        c = self.model.config
        if max_new_tokens <= 0:
            return
        for j, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {j} is empty")
            if min(p) < 0 or max(p) >= c.vocab_size:
                raise ValueError(f"prompt {j} has token ids outside [0, {c.vocab_size})")
        B, lens = len(prompts), [len(p) for p in prompts]
        max_len = max(lens) + max_new_tokens
        if max_len > c.max_position_embeddings:
            room = c.max_position_embeddings - max(lens)
            raise ValueError(f"max_new_tokens {max_new_tokens}: the longest prompt ({max(lens)} tokens) plus "
                             f"{max_new_tokens} new tokens exceed the model's {c.max_position_embeddings} positions "
                             f"(max_position_embeddings); at most {max(room, 0)} new tokens fit")
        stops = set(stop_token_ids or ())
        mode = sampling.sample_mode(temperature, top_p)
        if seed is None:
            seed = int(torch.randint(0, 2 ** 31 - 1, ()))

        # inference_mode only around the compute: a generator must not leave it set while suspended
        with torch.inference_mode(), self._on_device():
            st = self.decode_state(B, max_len)
            b = st["buf"]
            logits = self.prefill(prompts, st["caches"])
            sampling.set_params(b, temperature, top_p, seed)
            sampling.sample_into(logits, mode, b)
            b["pos"].copy_(torch.tensor(lens, dtype=torch.int32))
            b["seqlens"].copy_(b["pos"] + 1)
            step = self.step_fn(st, mode)
            ring = TokenRing(b["tok"], max(0, int(self.model.decode_lookahead)))
            ring.push()
        queued = 0            # decode steps enqueued (token n comes out of step n)
        done = [False] * B
        for n in range(max_new_tokens):
            with torch.inference_mode(), self._on_device():
                while queued < min(n + ring.depth, max_new_tokens - 1):
                    step()
                    ring.push()
                    queued += 1
                host = ring.pop()            # waits for token n only (the steps after it keep running)
            out = []
            for j in range(B):
                if done[j]:
                    out.append(None)
                    continue
                out.append(host[j])
                if host[j] in stops:
                    done[j] = True
            yield out
            if all(done):
                return

    def generate(self, prompt_ids, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 stop_token_ids: Sequence[int] | None = None, seed: int | None = None):
        """New token ids (a stop token, if hit, is included as the last id). For a batch of
        prompts (list of lists or [B, T] with B > 1) a list of lists. See the module docstring."""
        prompts, single = normalize_prompts(prompt_ids)
        out = [[] for _ in prompts]
        for toks in self.stream(prompts, max_new_tokens, temperature, top_p, stop_token_ids, seed):
            for b, t in enumerate(toks):
                if t is not None:
                    out[b].append(t)
        return out[0] if single else out


class TokenRing:
    """Sampled ids read back without stalling the device: each push copies the token buffer into
    a slot of a pinned host ring (non-blocking, stream-ordered) and records an event; pop waits for
    the oldest slot's event only. depth + 1 slots: at most depth steps run ahead of the reader."""

    def __init__(self, src: torch.Tensor, depth: int):
        self.src, self.depth = src, depth
        self.cuda = src.is_cuda
        R = depth + 1
        self.host = torch.empty((R,) + tuple(src.shape), dtype=src.dtype, pin_memory=self.cuda)
        self.events = [torch.cuda.Event() for _ in range(R)] if self.cuda else None
        self.w = self.r = 0

    def push(self) -> None:
        s = self.w % len(self.host)
        assert self.w - self.r < len(self.host), "token ring overrun"
        self.host[s].copy_(self.src, non_blocking=self.cuda)
        if self.cuda:
            self.events[s].record()
        self.w += 1

    def pop(self) -> list[int]:
        assert self.r < self.w, "token ring underrun"
        s = self.r % len(self.host)
        if self.cuda:
            self.events[s].synchronize()
        self.r += 1
        return self.host[s].tolist()
