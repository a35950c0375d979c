"""Generation (gptoss_kernels.generation) on the CPU: the decode engine's loop against full
recomputation (windows, prefill chunks, batches, look-aheads), seeded sampling, the steps it runs,
prepare_decode and the capture's warm-up step, the look-ahead bookkeeping against a fake step,
and the token ring."""

from __future__ import annotations

import pytest
import torch

from gptoss_kernels import GptOss, GptOssConfig
from gptoss_kernels.generation import DecodeEngine, TokenRing, normalize_prompts


def tiny(**kw) -> GptOssConfig:
    base = dict(num_hidden_layers=2, num_experts=4, experts_per_token=2, vocab_size=96, hidden_size=64,
                intermediate_size=32, head_dim=16, num_attention_heads=4, num_key_value_heads=2, sliding_window=4)
    base.update(kw)
    return GptOssConfig(**base)


@pytest.fixture(scope="module")
def m32():
    return GptOss.from_config(tiny(), device="cpu", seed=1, dtype=torch.float32)


def test_normalize_prompts():
    assert normalize_prompts([1, 2, 3]) == ([[1, 2, 3]], True)
    assert normalize_prompts(torch.tensor([[1, 2]])) == ([[1, 2]], True)
    assert normalize_prompts(torch.tensor([4, 5])) == ([[4, 5]], True)
    assert normalize_prompts([[1, 2], (3,)]) == ([[1, 2], [3]], False)
    assert normalize_prompts(torch.tensor([[1, 2], [3, 4]])) == ([[1, 2], [3, 4]], False)
    with pytest.raises(ValueError, match=r"\[T\] or \[B, T\]"):
        normalize_prompts(torch.zeros(1, 1, 1, dtype=torch.long))


def test_the_model_delegates_to_its_engine(m32):
    """generate / stream / prepare_decode / release_cache on the model are the engine's; the
    model's settings are read at each call; fused_decode drops the captured steps."""
    assert isinstance(m32.engine, DecodeEngine) and m32.engine.model is m32
    m32.release_cache()
    assert m32.engine.state is None
    assert m32.generate([1, 2, 3], 3) == m32.engine.generate([1, 2, 3], 3)
    assert [t for t, in m32.stream([1, 2, 3], 3)] == m32.generate([1, 2, 3], 3)
    st = m32.engine.state
    assert st is not None and st["S"] == 256 and "greedy" in st["steps"]
    m32.fused_decode = False
    assert st["steps"] == {} and m32.engine.graph is None
    m32.fused_decode = True
    m32.release_cache()
    assert m32.engine.state is None


def test_sampling_seeded_and_lookahead_independent(m32):
    prompt = [5, 6, 7, 8, 9]
    base = m32.generate(prompt, 10, temperature=1.0, top_p=0.95, seed=3)
    assert base == m32.generate(prompt, 10, temperature=1.0, top_p=0.95, seed=3)
    assert base != m32.generate(prompt, 10, temperature=1.0, top_p=0.95, seed=4)
    greedy = m32.generate(prompt, 10)
    saved = m32.decode_lookahead
    try:
        for la in (0, 1, 5):
            m32.decode_lookahead = la
            assert m32.generate(prompt, 10, temperature=1.0, top_p=0.95, seed=3) == base
            assert m32.generate(prompt, 10) == greedy
            stop = greedy[3]
            assert m32.generate(prompt, 10, stop_token_ids=[stop]) == greedy[:greedy.index(stop) + 1]
    finally:
        m32.decode_lookahead = saved


def test_stream_runs_exactly_the_needed_steps(m32, monkeypatch):
    """max_new_tokens tokens need max_new_tokens - 1 decode steps whatever the look-ahead."""
    calls = []
    real = DecodeEngine.step

    def counting(self, st, mode):
        calls.append(mode)
        return real(self, st, mode)

    monkeypatch.setattr(DecodeEngine, "step", counting)
    for n in (1, 2, 7):
        calls.clear()
        assert len(m32.generate([1, 2, 3], n)) == n
        assert len(calls) == n - 1


def test_prepare_decode_then_generate(m32):
    m32.release_cache()
    fresh = m32.generate([4, 5, 6, 7], 6)
    m32.release_cache()
    m32.prepare_decode(1, 10)
    st = m32.engine.state
    assert st is not None and "greedy" in st["steps"]
    assert m32.generate([4, 5, 6, 7], 6) == fresh
    assert m32.engine.state is st                    # the prepared state was used


@pytest.mark.parametrize("temperature,top_p", [(0.0, 1.0), (1.0, 0.9), (0.7, 1.0)])
def test_capture_warmup_step_leaves_the_results_unchanged(m32, monkeypatch, temperature, top_p):
    """What DecodeEngine.capture does on CUDA, emulated on the CPU: a real warm-up step at the state's current
    positions, then tok/pos/seqlens/counter restored (the cache keeps the warm-up's writes, the
    same values the first real step writes). Tokens must equal a run without the warm-up, for a
    batch of two prompts whose sliding rings (window 4) have wrapped, in every sampling mode; and
    prepare_decode's warm-up at position 0 before the prefill must not matter either."""
    ps = [[5, 6, 7, 8, 9, 10, 11], [3, 1, 4]]
    kw = dict(temperature=temperature, top_p=top_p, seed=11)
    m32.release_cache()
    want = m32.generate(ps, 7, **kw)
    real_step_fn = DecodeEngine.step_fn

    def step_fn_with_warmup(self, st, mode):
        if mode not in st["steps"]:
            b = st["buf"]
            saved = {n: b[n].clone() for n in ("tok", "pos", "seqlens", "counter")}
            self.step(st, mode)
            for n, t in saved.items():
                b[n].copy_(t)
        return real_step_fn(self, st, mode)

    monkeypatch.setattr(DecodeEngine, "step_fn", step_fn_with_warmup)
    m32.release_cache()
    assert m32.generate(ps, 7, **kw) == want
    m32.release_cache()
    m32.prepare_decode(2, 7 + 7, temperature=temperature, top_p=top_p)
    assert m32.generate(ps, 7, **kw) == want
    m32.release_cache()


@pytest.mark.parametrize("trial", range(6))
def test_stream_lookahead_bookkeeping(m32, monkeypatch, trial):
    """The look-ahead read-back against a fake step (token = f(position, row)): for random
    batches, lengths, look-aheads and stop sets, each sequence gets exactly its tokens up to and
    including its first stop token, never more than max_new_tokens, one yield per step until all
    stopped, and no more than max_new_tokens - 1 steps (at most decode_lookahead past the last read)."""
    import random

    rng = random.Random(trial)
    V = m32.config.vocab_size
    steps = []

    def fake(self, st, mode):
        b = st["buf"]
        b["tok"].copy_((b["pos"].long() * 7 + b["seq_ids"].long() * 13 + 5) % V)
        b["pos"].add_(1)
        b["seqlens"].add_(1)
        steps.append(1)

    monkeypatch.setattr(DecodeEngine, "step", fake)
    saved = m32.decode_lookahead
    try:
        for _ in range(8):
            steps.clear()
            B = rng.randint(1, 3)
            ps = [[rng.randrange(V) for _ in range(rng.randint(1, 6))] for _ in range(B)]
            M = rng.randint(1, 9)
            m32.decode_lookahead = rng.randint(0, 4)
            first = m32.generate(ps, 1)
            full = [[first[j][0]] + [(7 * (len(ps[j]) + n) + 13 * j + 5) % V for n in range(M - 1)] for j in range(B)]
            stops = {rng.randrange(V) for _ in range(rng.randint(0, 3))} | {full[0][rng.randrange(M)]}
            steps.clear()
            yields = list(m32.stream(ps, M, stop_token_ids=sorted(stops)))
            want = []
            for j in range(B):
                cut = next((n + 1 for n, t in enumerate(full[j]) if t in stops), M)
                want.append(full[j][:cut])
            assert len(yields) == max(len(w) for w in want) <= M
            for j in range(B):
                got = [y[j] for y in yields if y[j] is not None]
                assert got == want[j]
                assert all(y[j] is None for y in yields[len(want[j]):])
            assert len(steps) <= min(M - 1, len(yields) - 1 + m32.decode_lookahead)
    finally:
        m32.decode_lookahead = saved


def test_generate_equals_full_recompute_windows_chunks_batches():
    """The static-buffer decode (graph disabled on the CPU) against full recomputation for many
    (window, prompt lengths, prefill chunk, batch, look-ahead) combinations: rings that wrap in
    prefill (chunks longer and shorter than the window) and in decode, several prompts packed per
    chunk, and the cache reused between calls of one rounded length (stale entries never read).
    fp32 so that argmax ties cannot flip."""
    import random

    rng = random.Random(0)
    for W in (3, 5):
        m = GptOss.from_config(tiny(sliding_window=W), device="cpu", seed=W, dtype=torch.float32)
        m.cache_granularity = 16
        for _ in range(5):
            ps = [[rng.randrange(96) for _ in range(rng.randint(1, 11))] for _ in range(rng.randint(1, 3))]
            n = rng.randint(1, 6)
            m.prefill_chunk = rng.randint(1, 8)
            m.decode_lookahead = rng.randint(0, 2)
            want = []
            for p in ps:
                ids, out = list(p), []
                with torch.inference_mode():
                    for _ in range(n):
                        out.append(int(m(torch.tensor([ids]))[0, -1].argmax()))
                        ids.append(out[-1])
                want.append(out)
            assert m.generate(ps, n) == want, (W, ps, n, m.prefill_chunk)


def test_token_ring_cpu():
    src = torch.zeros(2, dtype=torch.int64)
    r = TokenRing(src, depth=2)
    for v in range(3):
        src.fill_(v)
        r.push()
    with pytest.raises(AssertionError, match="overrun"):
        r.push()
    assert [r.pop(), r.pop()] == [[0, 0], [1, 1]]
    src.fill_(5)
    r.push()
    assert [r.pop(), r.pop()] == [[2, 2], [5, 5]]
    with pytest.raises(AssertionError, match="underrun"):
        r.pop()


def test_generation_past_the_models_context_is_refused(m32):
    """Positions past max_position_embeddings: a ValueError naming max_new_tokens and what fits,
    before anything is allocated (not a warning and a generation past the RoPE's range)."""
    import dataclasses

    m = GptOss(dataclasses.replace(m32.config, max_position_embeddings=40), m32.weights, m32.layers,
               dtype=torch.float32)
    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert len(m.generate(prompt, 30)) == 30                 # 10 + 30 = 40 positions: the whole context
    m.release_cache()
    with pytest.raises(ValueError, match=r"max_new_tokens 31: .*10 tokens.* 40 positions .*at most 30 new tokens"):
        m.generate(prompt, 31)
    assert m.engine.state is None
    with pytest.raises(ValueError, match="at most 0 new tokens"):
        m.generate([[1] * 41, [2]], 1)
