"""The fast decode path's pieces on the CPU: the static-buffer decode step, the look-ahead token
read-back, the decode-step byte table of the profile (the sampler: tests/test_sampling.py; the
memory plan: tests/test_memory.py); and on a GPU: the CUDA-graph step against the eager
step on kernel shapes, and the 120b profile.

First GPU run: `pytest -q -s tests/test_decode_step.py -m gpu` then
`python -m gptoss_kernels.bench.e2e --profile` (the per-op table).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from gptoss_kernels import GptOss, GptOssConfig, _lib
from gptoss_kernels.bench import e2e
from gptoss_kernels.bench.shapes import ModelShape
from gptoss_kernels.model import _TokenRing

from .kernel_device import DEV, ON_GPU


def tiny(**kw) -> GptOssConfig:
    base = dict(num_hidden_layers=2, num_experts=4, experts_per_token=2, vocab_size=96, hidden_size=64,
                intermediate_size=32, head_dim=16, num_attention_heads=4, num_key_value_heads=2, sliding_window=4)
    base.update(kw)
    return GptOssConfig(**base)


@pytest.fixture(scope="module")
def m32():
    return GptOss.from_config(tiny(), device="cpu", seed=1, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# the step (CPU)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_static_step_equals_forward_logits(dtype):
    """One static-buffer decode step after a prefill gives the logits of a full forward pass at
    that position, advances pos/seqlens in place and writes the greedy token into buf.tok.
    fp32: only summation order differs (1e-5); bf16: the same ops on both paths, but the cache
    holds k/v computed in a different chunking (2e-2, bf16 rounding through 2 layers)."""
    m = GptOss.from_config(tiny(), device="cpu", seed=2, dtype=dtype)
    prompt = [3, 14, 15, 92, 65, 35, 8, 9, 7]     # 9 > window 4: the ring has wrapped
    with torch.inference_mode():
        st = m._decode_state(1, 16)
        m._prefill([prompt], st["caches"])
        b = st["buf"]
        b["tok"].fill_(11)
        b["pos"].fill_(len(prompt))
        b["seqlens"].fill_(len(prompt) + 1)
        m._decode_step(st, "greedy")
        ref = m(torch.tensor([prompt + [11]]))[0, -1]
    got = b["logits"][0]
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < (1e-5 if dtype == torch.float32 else 2e-2), rel
    assert int(b["tok"][0]) == int(got.argmax())
    assert int(b["pos"][0]) == len(prompt) + 1 and int(b["seqlens"][0]) == len(prompt) + 2
    m.release_cache()


def test_unfused_decode_step_gives_the_same_logits():
    """model.fused_decode = False (the separate projection, RoPE + append, MoE and norm ops) gives
    the fused step's logits and tokens: on the CPU both run the reference; on a GPU the fused
    kernels are bit-identical to the separate ones (tests/test_dense.py, tests/test_moe.py)."""
    m = GptOss.from_config(tiny(), device="cpu", seed=4, dtype=torch.bfloat16)
    prompt = [5, 6, 7, 8, 9, 10]
    out = {}
    with torch.inference_mode():
        for fused in (True, False):
            m.fused_decode = fused
            st = m._decode_state(2, 16)
            m._prefill([prompt, prompt[:4]], st["caches"])
            b = st["buf"]
            b["tok"].copy_(torch.tensor([11, 12]))
            b["pos"].copy_(torch.tensor([6, 4], dtype=torch.int32))
            b["seqlens"].copy_(torch.tensor([7, 5], dtype=torch.int32))
            m._decode_step(st, "greedy")
            out[fused] = (b["logits"].clone(), b["tok"].clone(), [kv[0].clone() for kv in st["caches"]])
    m.fused_decode = True
    assert torch.equal(out[True][0], out[False][0]) and torch.equal(out[True][1], out[False][1])
    assert all(torch.equal(a, b) for a, b in zip(out[True][2], out[False][2]))


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
    real = GptOss._decode_step

    def counting(self, st, mode):
        calls.append(mode)
        return real(self, st, mode)

    monkeypatch.setattr(GptOss, "_decode_step", counting)
    for n in (1, 2, 7):
        calls.clear()
        assert len(m32.generate([1, 2, 3], n)) == n
        assert len(calls) == n - 1


def test_prepare_decode_then_generate(m32):
    m32.release_cache()
    fresh = m32.generate([4, 5, 6, 7], 6)
    m32.release_cache()
    m32.prepare_decode(1, 10)
    st = m32._state
    assert st is not None and "greedy" in st["steps"]
    assert m32.generate([4, 5, 6, 7], 6) == fresh
    assert m32._state is st                    # the prepared state was used


@pytest.mark.parametrize("temperature,top_p", [(0.0, 1.0), (1.0, 0.9), (0.7, 1.0)])
def test_capture_warmup_step_leaves_the_results_unchanged(m32, monkeypatch, temperature, top_p):
    """What _capture does on CUDA, emulated on the CPU: a real warm-up step at the state's current
    positions, then tok/pos/seqlens/counter restored (the cache keeps the warm-up's writes, the
    same values the first real step writes). Tokens must equal a run without the warm-up, for a
    batch of two prompts whose sliding rings (window 4) have wrapped, in every sampling mode; and
    prepare_decode's warm-up at position 0 before the prefill must not matter either."""
    ps = [[5, 6, 7, 8, 9, 10, 11], [3, 1, 4]]
    kw = dict(temperature=temperature, top_p=top_p, seed=11)
    m32.release_cache()
    want = m32.generate(ps, 7, **kw)
    real_step_fn = GptOss._step_fn

    def step_fn_with_warmup(self, st, mode):
        if mode not in st["steps"]:
            b = st["buf"]
            saved = {n: b[n].clone() for n in ("tok", "pos", "seqlens", "counter")}
            self._decode_step(st, mode)
            for n, t in saved.items():
                b[n].copy_(t)
        return real_step_fn(self, st, mode)

    monkeypatch.setattr(GptOss, "_step_fn", step_fn_with_warmup)
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

    monkeypatch.setattr(GptOss, "_decode_step", fake)
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
    r = _TokenRing(src, depth=2)
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


# ---------------------------------------------------------------------------------------------
# decode-step bytes (the profile's table)
# ---------------------------------------------------------------------------------------------

def test_decode_step_bytes_120b_batch1():
    s = ModelShape.preset("120b")
    g = e2e.decode_step_bytes(s, 1, 1024)
    ops = {r["op"]: r for r in e2e.decode_step_ops(s, 1, 1024)}
    experts = 36 * 4 * s.expert_bytes()
    assert abs(experts - 1.906e9) < 1e6
    # decode regime: the MoE carries the residual add + next norm (+ residual r/w, norm out, weight)
    assert "moe_mxfp4" not in ops
    assert abs(ops["moe_mxfp4 + residual + rms_norm"]["bytes"] * 36 - experts) < 36 * 70_000
    # batch <= 64: the QKV GEMV carries RoPE and the cache append (one op)
    assert "qkv linear + bias" not in ops and "rope + cache append" not in ops
    # and the add + norm before the MoE runs in the router's kernel
    assert "router top-k" not in ops and ops["residual + rms_norm + router top-k"]["calls"] == 36
    proj = 36 * (ops["qkv + rope + cache append"]["bytes"] + ops["out linear + bias"]["bytes"])
    assert abs(proj - 1.912e9) < 2e6
    assert abs(ops["unembedding (fp32 logits)"]["bytes"] - 1.158e9) < 2e6    # + x, fp32 logits
    assert ops["attention_decode (full)"]["bytes"] > 1024 * 2048             # the KV of 1024 positions
    assert ops["attention_decode (sliding)"]["calls"] == 18 and "residual + rms_norm" not in ops
    assert abs(g["total"] - 5.05e9) < 0.01e9
    # against the bench's component sum (which leaves activations out): within 0.2%
    other = e2e.decode_bytes_per_step(s, 1, 1024)["total"]
    assert abs(g["total"] - other) / other < 2e-3
    b64 = e2e.decode_step_bytes(s, 64, 1024)["total"]
    assert 3 * g["total"] < b64                                              # ~all experts at batch 64
    # above 64 sequences the projection and the RoPE + append are separate ops (same weights)
    big = {r["op"]: r for r in e2e.decode_step_ops(s, 65, 1024)}
    assert "qkv + rope + cache append" not in big and "moe_mxfp4 + residual + rms_norm" not in big
    assert big["moe_mxfp4"]["calls"] == 36 and big["residual + rms_norm"]["calls"] == 72
    assert big["router top-k"]["calls"] == 36 and "residual + rms_norm + router top-k" not in big
    b16 = {r["op"]: r for r in e2e.decode_step_ops(s, 16, 1024)}       # fused norm + router up to 16
    assert b16["residual + rms_norm + router top-k"]["calls"] == 36 and "residual + rms_norm" not in b16
    b32 = {r["op"]: r for r in e2e.decode_step_ops(s, 32, 1024)}
    assert b32["residual + rms_norm"]["calls"] == 36 and b32["router top-k"]["calls"] == 36
    assert big["qkv linear + bias"]["calls"] == big["rope + cache append"]["calls"] == 36


def test_profile_bytes_only_on_cpu():
    prof = e2e.profile_decode_step("120b", 1, 1024, device="cpu")
    assert prof["mode"] == "bytes-only"
    text = e2e.format_profile(prof)
    assert "no GPU" in text and "moe_mxfp4" in text and "5.050 GB" in text


def test_profile_summary_and_table_gpu_format():
    """The GPU branch's arithmetic and table on made-up timings: every op at 2 TB/s, copy
    3 TB/s -> the sum of ops is at 2/3 of the bound; a 2-layer step measured at exactly its ops'
    sum scales to the 36-layer sum."""
    rows = e2e.decode_step_ops(ModelShape.preset("120b"), 1, 1024)
    for r in rows:
        r["us"] = r["bytes"] / 2e9 * 1e3     # bytes / (2e12 B/s) in us
        r["gbps"], r["pct_copy"] = 2000.0, 200 / 3
    two = sum(r["us"] for r in rows if r["op"] in ("embedding", "rms_norm (first)", "unembedding (fp32 logits)",
                                                   "sample (argmax)"))
    two += sum(r["us"] * 2 for r in rows       # batch 1: the fused ops, once per layer
               if r["op"] in ("qkv + rope + cache append", "out linear + bias", "residual + rms_norm + router top-k",
                              "moe_mxfp4 + residual + rms_norm"))
    assert len([r for r in rows if r["calls"] == 36]) == 4
    two += sum(r["us"] for r in rows if r["op"].startswith("attention_decode"))
    s = e2e.profile_summary(rows, "120b", 1, 2, 3000.0, two, True)
    assert abs(s["pct_of_bound"] - 200 / 3) < 1e-6
    assert abs(s["step2_sum_ops_us"] - two) < 1e-6
    assert abs(s["est_graph_step_us"] - s["sum_us"]) / s["sum_us"] < 2e-3    # rms_norm (first) x 18: tiny
    assert abs(s["bound_tok_s"] - 3e12 / 5.0503e9) < 1.0
    s["device_name"], s["config"], s["batch"], s["context"] = "fake", "gpt-oss-120b", 1, 1024
    s["bytes_per_step"] = s["bytes_per_token"] = sum(r["bytes"] * r["calls"] for r in rows)
    text = e2e.format_profile({"mode": "gpu", "rows": rows, "summary": s})
    assert "67% of the bound" in text and "CUDA graph" in text and "2000" in text
    assert "PDL" not in text and "without the fused" not in text
    s.update(pdl=True, step2_pdl_off_us=1.25 * two, step2_unfused_us=1.5 * two)
    text = e2e.format_profile({"mode": "gpu", "rows": rows, "summary": s})
    assert "PDL off (ordinary launches)" in text and "1.25x" in text and "1.50x the fused step" in text
    s["pdl"] = False
    assert "PDL is OFF in this run" in e2e.format_profile({"mode": "gpu", "rows": rows, "summary": s})


def test_profile_op_calls_run_on_cpu():
    """The profile's closures (the step's op calls on the static buffers) run on a tiny bf16
    model on the CPU: their arguments satisfy the ops' checks, and every op of the byte table
    has a closure."""
    m = GptOss.from_config(tiny(), device="cpu", seed=0)
    st = m._decode_state(1, 40)
    b = st["buf"]
    b["tok"].fill_(3)
    b["pos"].fill_(20)
    b["seqlens"].fill_(21)
    with torch.inference_mode():
        calls = e2e._op_calls(m, st, {"sliding": 0, "full": 1})
        assert {r["op"] for r in e2e.decode_step_ops(ModelShape.of(m.config), 1, 21)} <= set(calls)
        assert {r["op"] for r in e2e.decode_step_ops(ModelShape.of(m.config), 65, 21)} <= set(calls)
        for r in e2e.decode_step_ops(ModelShape.of(m.config), 1, 21):   # in the step's order
            calls[r["op"]]()
    assert torch.isfinite(b["logits"]).all() and 0 <= int(b["tok"]) < 96


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------

def _kernel_cfg(**kw) -> GptOssConfig:
    # shapes the kernels cover: head_dim 64, 64/8 heads, H = I = 2880; few experts and layers.
    # On the host build (every thread emulated) H = I = 256, 8/1 heads, window 16 (so the short
    # prompts below still wrap the ring) and vocab 512: the same kernels and paths, 1/100 the work.
    base = dict(num_hidden_layers=2, num_experts=8, experts_per_token=4, vocab_size=1024,
                num_attention_heads=64, num_key_value_heads=8, head_dim=64, sliding_window=128)
    if not ON_GPU:
        base.update(hidden_size=256, intermediate_size=256, num_attention_heads=8, num_key_value_heads=1,
                    sliding_window=16, vocab_size=512)
    base.update(kw)
    return GptOssConfig(**base)


def _prompt_len(n: int) -> int:
    """A prompt length relative to the window: the GPU's n (window 128), scaled on the host build."""
    return n if ON_GPU else max(3, n * 16 // 128 + 2)


@pytest.mark.gpu
@pytest.mark.cuda_only
def test_graph_decode_equals_eager_decode():
    """The captured step and the eager step run the same kernels on the same buffers: greedy
    tokens must be identical (the kernels are deterministic), for batch 1 and 2, through a ring
    wrap (prompt 200 > window 128), with sampling too (same seed)."""
    cfg = _kernel_cfg(num_hidden_layers=3)
    m = GptOss.from_config(cfg, device="cuda", seed=0)
    g = torch.Generator().manual_seed(0)
    p1 = torch.randint(0, cfg.vocab_size, (200,), generator=g).tolist()
    p2 = torch.randint(0, cfg.vocab_size, (90,), generator=g).tolist()
    out = {}
    for graph in (True, False):
        m.use_cuda_graph = graph
        m.release_cache()
        out[graph] = (m.generate(p1, 24), m.generate([p1, p2], 12),
                      m.generate(p1, 12, temperature=1.0, top_p=0.9, seed=1))
        if graph:
            assert m._graph is not None, "the decode step was not captured"
    assert out[True] == out[False]


def _pdl_case_tokens() -> list:
    """Greedy tokens of the captured decode on a fixed 3-layer model (for the PDL on/off check)."""
    cfg = _kernel_cfg(num_hidden_layers=3)
    m = GptOss.from_config(cfg, device=DEV, seed=3)
    n = _prompt_len(150)
    p = torch.randint(0, cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(3)).tolist()
    return m.generate([p, p[:n // 2]], 16 if ON_GPU else 6)


@pytest.mark.gpu
def test_gpu_pdl_off_gives_same_tokens(tmp_path):
    """GPTOSS_PDL=0 (every kernel launched the ordinary way, read once per process) in a fresh
    process: the same greedy tokens as the default programmatic dependent launches (PDL changes
    when a kernel may start, never what it computes)."""
    import json
    import os
    import pathlib
    import subprocess
    import sys

    repo = pathlib.Path(__file__).resolve().parents[1]
    dst = tmp_path / "tokens.json"
    code = (f"import sys, json; sys.path.insert(0, {str(repo)!r}); "
            "from gptoss_kernels import _lib; from tests.kernel_device import ON_HOSTSIM; "
            "ON_HOSTSIM and _lib.set_backend('hostsim'); "
            "from tests.test_decode_step import _pdl_case_tokens; "
            f"json.dump(_pdl_case_tokens(), open({str(dst)!r}, 'w'))")
    subprocess.run([sys.executable, "-c", code], env={**os.environ, "GPTOSS_PDL": "0"}, check=True, timeout=600)
    K = _lib.kernels(torch.device(DEV))  # the CUDA library, or the host build (its own PDL switch)
    assert K.pdl_enabled(), "PDL is off in this process: the comparison would be off against off"
    assert _pdl_case_tokens() == json.loads(dst.read_text())
    assert K.pdl_enabled(), "PDL turned itself off (the runtime refused the launch attribute)"


@pytest.mark.gpu
def test_gpu_unfused_decode_gives_same_tokens():
    """The captured decode with the fused ops and with the separate ones: the same greedy tokens
    (the fused kernels compute the same bits)."""
    cfg = _kernel_cfg(num_hidden_layers=3)
    m = GptOss.from_config(cfg, device=DEV, seed=8)
    n = _prompt_len(140)
    p = torch.randint(0, cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(8)).tolist()
    out = {}
    for fused in (True, False):
        m.fused_decode = fused
        m.release_cache()
        out[fused] = m.generate([p, p[:n // 3]], 16 if ON_GPU else 6)
    m.fused_decode = True
    assert out[True] == out[False]


@pytest.mark.gpu
def test_graph_decode_matches_cpu_reference():
    """Greedy tokens of the captured decode against the CPU fp32-math reference, teacher forced
    (_teacher_forced_check: logits within 5e-2, the reference's argmax wherever it is separated)."""
    cfg = _kernel_cfg()
    gpu = GptOss.from_config(cfg, device=DEV, seed=0)
    cpu = gpu.to("cpu")
    prompt = torch.randint(0, cfg.vocab_size, (_prompt_len(150),), generator=torch.Generator().manual_seed(1)).tolist()
    out = gpu.generate(prompt, 12)
    assert gpu._graph is not None or not ON_GPU
    _teacher_forced_check(gpu, cpu, prompt, out, min_separated=3)


@pytest.mark.gpu
def test_graph_decode_chunked_packed_prefill_matches_cpu_reference():
    """Three prompts (150, 40, 7 tokens) prefilled packed in chunks of 64 tokens in total: chunks
    that span sequences, sequences with no tokens in a chunk (empty cu_seqlens segments), a
    sliding ring (window 128) written from several chunks, then decoded together by the captured
    step. Each sequence's greedy tokens must be near-argmax of the CPU reference's logits for
    that sequence alone (slack 5% of the logit std, as above)."""
    cfg = _kernel_cfg()
    gpu = GptOss.from_config(cfg, device=DEV, seed=0)
    cpu = gpu.to("cpu")
    g = torch.Generator().manual_seed(4)
    # host build: window 16, prompts (30, 9, 3) in chunks of 12 (the same chunk/segment cases)
    ps = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist()
          for n in ((150, 40, 7) if ON_GPU else (30, 9, 3))]
    gpu.prefill_chunk = 64 if ON_GPU else 12
    outs = gpu.generate(ps, 6)
    assert gpu._graph is not None or not ON_GPU
    for p, out in zip(ps, outs):
        assert len(out) == 6
        _teacher_forced_check(gpu, cpu, p, out, min_separated=1)


@pytest.mark.gpu
@pytest.mark.cuda_only
@pytest.mark.parametrize("mode", ["greedy", "sample", "top_p"])
def test_decode_step_has_no_host_sync(mode):
    """The eager decode step (what the graph captures) under torch's sync debug mode "error":
    any torch-level host synchronisation (.item(), nonzero, a pageable copy) raises."""
    m = GptOss.from_config(_kernel_cfg(), device="cuda", seed=0)
    m.prepare_decode(2, 300)              # buffers + cache, eager warm-up inside the capture
    st = m._state
    b = st["buf"]
    with torch.inference_mode():         # the buffers are inference tensors (made under inference_mode)
        b["pos"].copy_(torch.tensor([5, 9], dtype=torch.int32))
        b["seqlens"].copy_(b["pos"] + 1)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            m._decode_step(st, mode)
            m._decode_step(st, mode)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert b["pos"].tolist() == [7, 11] and b["tok"].min() >= 0 and b["tok"].max() < 1024


@pytest.mark.gpu
@pytest.mark.cuda_only
def test_prefill_host_syncs_do_not_scale_with_layers():
    """Host synchronisations of a chunked prefill (sync debug mode "warn", counted) are per chunk,
    not per layer: a 4-layer model makes as many as a 2-layer one."""
    import warnings

    def count(layers: int) -> int:
        m = GptOss.from_config(_kernel_cfg(num_hidden_layers=layers), device="cuda", seed=0)
        m.prefill_chunk = 64
        st = m._decode_state(1, 300)
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                with torch.inference_mode():
                    m._prefill([list(range(200))], st["caches"])
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(x.message) for x in w)

    two, four = count(2), count(4)
    print(f"prefill host syncs: 2 layers {two}, 4 layers {four}")
    assert four == two


@pytest.mark.gpu
@pytest.mark.cuda_only
def test_profile_runs_on_gpu(capsys):
    prof = e2e.profile_decode_step("120b", 1, 1024, reps=5)
    with capsys.disabled():
        print("\n" + e2e.format_profile(prof))
    assert prof["mode"] == "gpu"
    assert all(r["us"] > 0 and math.isfinite(r["us"]) for r in prof["rows"])
    assert prof["summary"]["step2_graph"]


def test_dataclass_replace_keeps_config_valid():
    # the profile's 2-layer model of the real shapes (built on the GPU only)
    cfg = GptOssConfig.gpt_oss_120b()
    two = dataclasses.replace(cfg, num_hidden_layers=2, layer_types=cfg.layer_types[:2])
    assert two.is_sliding(0) and not two.is_sliding(1) and two.hidden_size == 2880


@pytest.mark.gpu
def test_generation_through_the_kernels_equals_the_reference():
    """The model's generation end to end through the kernels (chunked prefill over several chunks,
    then decode steps: norm, QKV + RoPE + cache append, attention over a wrapped sliding ring and a
    full layer, router, MoE, unembedding, argmax) against the float32 reference, teacher forced on
    the generated tokens (_teacher_forced_check), with at least 3 of 8 steps well separated."""
    cfg = _kernel_cfg()
    m = GptOss.from_config(cfg, device=DEV, seed=0)
    ref_model = m.to("cpu")
    prompt = torch.randint(0, cfg.vocab_size, (_prompt_len(300),), generator=torch.Generator().manual_seed(1)).tolist()
    m.prefill_chunk = 64 if ON_GPU else 16
    out = m.generate(prompt, 8)
    _teacher_forced_check(m, ref_model, prompt, out, min_separated=3)


def _teacher_forced_check(model, ref_model, prompt: list, out: list, *, min_separated: int) -> None:
    """Teacher forcing on the generated tokens: both models read prompt + out[:-1].
      - the kernels' logits (a forward pass through them) are within 5e-2 norm-relative error of
        the fp32 reference's (bf16 activations between ~10 ops a layer, each within 1e-2);
      - wherever the reference's top two logits are more than 0.25 std apart (more than the largest
        elementwise deviation seen between the two paths, 0.19 std, on such random models), the
        generated token is the reference's argmax; a near-tie may go either way, a bug may not;
      - at least `min_separated` steps are that separated (the test states its precondition
        instead of passing vacuously)."""
    x = torch.tensor([prompt + out[:-1]])
    with torch.inference_mode():
        got = model(x.to(model.device))[0, len(prompt) - 1:].float().cpu()
        with _lib.use_backend("reference"):
            ref = ref_model(x)[0, len(prompt) - 1:].float()
    rel = float((got - ref).norm() / ref.norm())
    assert rel < 5e-2, rel
    top2 = ref.topk(2, dim=-1).values
    separated = (top2[:, 0] - top2[:, 1]) > 0.25 * float(ref.std())
    assert int(separated.sum()) >= min_separated, f"choose another seed: {int(separated.sum())} separated steps"
    want = ref.argmax(-1)
    assert [t for t, ok in zip(out, separated) if ok] == [int(w) for w, ok in zip(want, separated) if ok], (out, want)
