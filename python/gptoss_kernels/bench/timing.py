"""Timing: CUDA events after warm-up, the median of many runs, L2 kept cold by rotating input
sets, CUDA graphs for microsecond kernels; and the card's two ceilings measured in the same run.

On a machine without a GPU the same functions time with the host clock (reference mode).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch

# Below this time per call a kernel is "microsecond": replaying a CUDA graph of the calls removes
# the launch gaps that would otherwise dominate.
GRAPH_BELOW_US = 200.0
GRAPH_MIN_CALLS = 16


@dataclass
class Timing:
    median_us: float
    min_us: float
    max_us: float
    runs: int              # timed samples (each sample = one pass over the input sets)
    calls_per_run: int     # calls per sample (= number of rotated input sets)
    method: str            # "cuda-events", "cuda-graph", "host-clock"
    note: str | None = None
    samples_us: list[float] = field(default_factory=list, repr=False)

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("samples_us")
        d["spread_pct"] = 100.0 * (self.max_us - self.min_us) / self.median_us if self.median_us else None
        return d


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sets_for_cold_l2(bytes_per_set: int, device: torch.device, *, max_sets: int = 16,
                     memory_cap: int | None = None) -> int:
    """How many input sets to rotate so that one pass over them overflows L2 about 3 times.

    memory_cap: bytes the sets may take together (defaults to a quarter of free memory)."""
    if device.type != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20) or 50 * 2**20
    if memory_cap is None:
        free, _ = torch.cuda.mem_get_info(device)
        memory_cap = free // 4
    want = math.ceil(3 * l2 / max(bytes_per_set, 1))
    fit = max(1, memory_cap // max(bytes_per_set, 1))
    return int(max(1, min(want, fit, max_sets)))


@dataclass
class Pass:
    """One timed unit of work: a pass over the rotated input sets, as `bench` and the
    pytest-benchmark suite (bench/suite/) time it."""
    run: Callable[[], None]   # one pass: a CUDA graph replay, or the calls launched eagerly
    calls: int                # op calls in one pass (a graph repeats the rotation to >= GRAPH_MIN_CALLS)
    method: str               # "cuda-graph" or "cuda-events" ("host-clock" off the GPU)
    note: str | None          # why a graph was not used, when capture failed
    est_us: float             # time per call from one timed pass (events on CUDA, host clock elsewhere)


def prepare_pass(calls: Sequence[Callable[[], object]], device: torch.device, *, warmup: int = 2,
                 use_graph: bool | None = None) -> Pass:
    """Warm `calls` up (one closure per rotated input set) and build the pass to time.

    CUDA: with use_graph None, a CUDA graph of the rotation (repeated to at least
    GRAPH_MIN_CALLS calls) is captured when a call takes under GRAPH_BELOW_US; it falls back to
    eager launches, with a note, if the calls cannot be captured (e.g. they synchronise with the
    host). Elsewhere: eager calls, estimated with the host clock."""
    calls = list(calls)
    n = len(calls)
    if n == 0:
        raise ValueError("bench: no calls")

    def eager():
        for c in calls:
            c()

    for _ in range(warmup):
        eager()
    if device.type != "cuda":
        t = time.perf_counter()
        eager()
        return Pass(eager, n, "host-clock", None, (time.perf_counter() - t) * 1e6 / n)
    _sync(device)
    # estimate with one eager pass
    t0 = torch.cuda.Event(enable_timing=True)
    t1 = torch.cuda.Event(enable_timing=True)
    t0.record()
    eager()
    t1.record()
    _sync(device)
    est_us = t0.elapsed_time(t1) * 1e3 / n

    note = None
    graph = None
    if use_graph is None:
        use_graph = est_us < GRAPH_BELOW_US
    if use_graph:
        # one graph replays the rotation several times: at least GRAPH_MIN_CALLS calls per sample
        reps = max(1, math.ceil(GRAPH_MIN_CALLS / n))
        graph, note = _capture(calls * reps, device)
        if graph is not None:
            n *= reps
    if graph is None:
        return Pass(eager, n, "cuda-events", note, est_us)
    # re-estimate: the graph removes launch gaps
    graph.replay()
    t0.record()
    graph.replay()
    t1.record()
    _sync(device)
    return Pass(graph.replay, n, "cuda-graph", note, t0.elapsed_time(t1) * 1e3 / n)


def bench(calls: Sequence[Callable[[], object]], device: torch.device, *, target_ms: float = 300.0,
          min_runs: int = 5, max_runs: int = 2000, warmup: int = 2, use_graph: bool | None = None) -> Timing:
    """Time `calls` (one closure per rotated input set); returns the time per call.

    CUDA: each sample is one pass over all calls (`prepare_pass`: a CUDA graph for microsecond
    calls) between two events; samples are repeated until about `target_ms`, back to back; the
    median is reported.
    Host: the same with time.perf_counter.
    """
    n = len(calls)
    if n == 0:
        raise ValueError("bench: no calls")
    if device.type != "cuda":
        return _bench_host(calls, target_ms=target_ms, min_runs=min_runs, max_runs=max_runs, warmup=warmup)

    p = prepare_pass(calls, device, warmup=warmup, use_graph=use_graph)
    runs = int(min(max_runs, max(min_runs, target_ms * 1e3 / max(p.est_us * p.calls, 1e-3))))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(runs)]
    for a, b in events:
        a.record()
        p.run()
        b.record()
    _sync(device)
    samples = [a.elapsed_time(b) * 1e3 / p.calls for a, b in events]
    return Timing(statistics.median(samples), min(samples), max(samples), runs, p.calls, p.method, p.note, samples)


def _capture(calls, device):
    """Capture one pass over `calls` in a CUDA graph; (graph, None) or (None, why not)."""
    try:
        s = torch.cuda.Stream(device)
        s.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(s):  # warm the side stream (allocator pools, lazy init)
            for c in calls:
                c()
        torch.cuda.current_stream(device).wait_stream(s)
        _sync(device)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for c in calls:
                c()
        _sync(device)
        return g, None
    except Exception as e:  # noqa: BLE001 - any capture failure: time eagerly instead
        try:
            _sync(device)
        except Exception:  # noqa: BLE001
            pass
        return None, f"CUDA graph capture failed ({type(e).__name__}: {str(e).splitlines()[0][:120]}); timed eager launches"


def _bench_host(calls, *, target_ms, min_runs, max_runs, warmup):
    n = len(calls)
    for _ in range(warmup):
        for c in calls:
            c()
    t = time.perf_counter()
    for c in calls:
        c()
    est = (time.perf_counter() - t) / n
    runs = int(min(max_runs, max(min_runs, target_ms * 1e-3 / max(est * n, 1e-9))))
    samples = []
    for _ in range(runs):
        t = time.perf_counter()
        for c in calls:
            c()
        samples.append((time.perf_counter() - t) * 1e6 / n)
    return Timing(statistics.median(samples), min(samples), max(samples), runs, n, "host-clock", None, samples)


# ---------------------------------------------------------------------------------------------
# The card's ceilings, measured in the same run
# ---------------------------------------------------------------------------------------------


@dataclass
class Limits:
    copy_gbps: float          # device-to-device copy, bytes read + bytes written per second / 1e9
    copy_bytes: int           # size of the copied tensor
    matmul_tflops: float      # dense matmul of random data
    matmul_shape: tuple[int, int, int]
    matmul_dtype: str
    device: str

    def to_json(self) -> dict:
        d = asdict(self)
        d["matmul_shape"] = list(self.matmul_shape)
        return d


def measure_limits(device: torch.device, *, quick: bool = False) -> Limits:
    """A large copy (GB/s, read + write counted) and a large matmul (TFLOP/s) on random data."""
    if device.type == "cuda":
        nbytes = (256 if quick else 2048) * 2**20
        m = 4096 if quick else 8192
        dtype = torch.bfloat16
    else:
        nbytes = (16 if quick else 128) * 2**20
        m = 256 if quick else 1024
        dtype = torch.float32  # bf16 matmul on a CPU is an emulation, not its limit
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = bench([lambda: dst.copy_(src)], device, target_ms=100 if quick else 300, use_graph=False)
    copy_gbps = 2 * nbytes / (t.median_us * 1e-6) / 1e9
    del src, dst
    a = torch.randn(m, m, device=device, dtype=dtype)
    b = torch.randn(m, m, device=device, dtype=dtype)
    c = torch.empty(m, m, device=device, dtype=dtype)
    t = bench([lambda: torch.matmul(a, b, out=c)], device, target_ms=100 if quick else 300, use_graph=False)
    tflops = 2 * m ** 3 / (t.median_us * 1e-6) / 1e12
    del a, b, c
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return Limits(copy_gbps, nbytes, tflops, (m, m, m), str(dtype).replace("torch.", ""), str(device))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float32 (NaN if out has a NaN)."""
    o, r = out.float(), ref.float()
    den = torch.linalg.vector_norm(r).item()
    num = torch.linalg.vector_norm(o - r).item()
    return num / den if den > 0 else num


def refuse_hostsim_timing() -> None:
    """The benchmarks never time the host build of the kernels (gptoss_kernels._hostsim: the
    kernels emulated thread by thread on the CPU, for testing): with GPTOSS_BACKEND=hostsim, CPU
    runs time the PyTorch reference, as without it, and say so."""
    import sys

    from .. import _lib

    if _lib.backend() == "hostsim":
        print("gptoss-kernels bench: GPTOSS_BACKEND=hostsim is ignored: the host build of the kernels is for "
              "testing, not timing (CPU runs time the PyTorch reference)", file=sys.stderr)
        _lib.set_backend("reference")
