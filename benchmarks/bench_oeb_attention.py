"""CPU oeb_attention against the materialized reference and plain causal SDPA: time and peak memory.

Qwen2-1.5B attention shapes (H = 12, H_kv = 2, d = 128), B = 1, fp32, strength 0.5, one sink,
T = 512, 1024, 2048, segmented as a question (first 10%) then steps of 40-80 tokens. Ids:
    test_oeb_forward[reference-T2048]   stepflow_ext.reference.oeb_attention (materializes A)
    test_oeb_forward[sdpa-T2048]        torch SDPA, causal, enable_gqa: what a user runs without OEB
    test_oeb_forward[kernel-T2048]      the op
    test_oeb_fwd_bwd[...]               the same, forward + backward (dq, dk, dv) of a random dO
extra_info: peak_mib (extra peak RSS of one call, benchmarks.peak_memory) and, for the kernel,
speedup_vs_ref = reference min / kernel min, mem_ratio_vs_ref = reference peak / kernel peak,
time_vs_sdpa = kernel min / SDPA min, mem_vs_sdpa = kernel peak / SDPA peak (min over rounds:
other processes on a shared machine only ever add time). A summary table is printed last.

    python -m pytest benchmarks/bench_oeb_attention.py --benchmark-columns=min,median
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import time

import pytest
import torch
import torch.nn.functional as F

from benchmarks.peak_memory import peak_memory_mib
from stepflow_ext import ops
from stepflow_ext import reference as ref

B, H, H_KV, D = 1, 12, 2, 128
SCALE = D ** -0.5
STRENGTH, NUM_SINK = 0.5, 1
LENGTHS = (512, 1024, 2048)
IMPLS = ("reference", "sdpa", "kernel")
_results: dict[tuple[str, str, int], dict] = {}
_libc = ctypes.CDLL(ctypes.util.find_library("c"))


def peak_mib(fn):
    """peak_memory_mib after handing freed heap pages back to the OS (malloc_trim), so strips
    that reuse already-resident small blocks still count."""
    _libc.malloc_trim(0)
    return peak_memory_mib(fn)


@functools.lru_cache(maxsize=1)
def inputs(t):
    """q, k, v, dO, seg_start, kv_start for length t (one length cached at a time)."""
    g = torch.Generator().manual_seed(t)
    q, dout = (torch.randn(B, H, t, D, generator=g) for _ in range(2))
    k, v = (torch.randn(B, H_KV, t, D, generator=g) for _ in range(2))
    seg_start = torch.full((B, t), -1, dtype=torch.long)  # question tokens: not rebalanced
    start = t // 10
    while start < t:
        length = int(torch.randint(40, 81, (1,), generator=g))
        seg_start[:, start:start + length] = start
        start += length
    kv_start = torch.zeros(B, dtype=torch.long)
    return q, k, v, dout, seg_start, kv_start


def forward_fn(impl, q, k, v, seg_start, kv_start):
    if impl == "reference":
        return ref.oeb_attention(q, k, v, seg_start, kv_start, STRENGTH, NUM_SINK, SCALE)[0]
    if impl == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=SCALE, enable_gqa=True)
    return ops.oeb_attention(q, k, v, seg_start, kv_start, STRENGTH, NUM_SINK, SCALE)[0]


def call(mode, impl, t):
    q, k, v, dout, seg_start, kv_start = inputs(t)
    if mode == "forward":
        return lambda: forward_fn(impl, q, k, v, seg_start, kv_start)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]

    def fwd_bwd():
        out = forward_fn(impl, *leaves, seg_start, kv_start)
        return torch.autograd.grad(out, leaves, dout)

    return fwd_bwd


def measure(mode, impl, t, benchmark=None):
    fn = call(mode, impl, t)
    if benchmark is None:  # a baseline whose own benchmark did not run (e.g. -k kernel): one call
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        stats = {"min_s": elapsed, "median_s": elapsed}
    else:
        slow = impl == "reference" and t >= 1024  # seconds per call: few rounds
        benchmark.pedantic(fn, rounds=2 if slow else 5, warmup_rounds=0 if slow else 1)
        stats = {"min_s": benchmark.stats.stats.min, "median_s": benchmark.stats.stats.median}
    _results[(mode, impl, t)] = {**stats, "peak_mib": peak_mib(fn)}
    return _results[(mode, impl, t)]


def baseline(mode, impl, t):
    return _results.get((mode, impl, t)) or measure(mode, impl, t)


@pytest.fixture(scope="module", autouse=True)
def summary_table(request):
    yield
    if not _results:
        return
    lines = ["", f"oeb_attention, CPU, H={H} H_kv={H_KV} d={D} B={B} fp32, strength {STRENGTH} "
             "(ms, extra peak MiB; ratios of the kernel against the reference and SDPA)",
             f"{'mode':>8} {'T':>5} {'impl':>9} {'min ms':>9} {'med ms':>9} {'MiB':>8} "
             f"{'ref/kern':>9} {'refMiB/k':>9} {'kern/sdpa':>9} {'kMiB/sdpa':>9}"]
    order = lambda x: (x[0][0] != "forward", x[0][2], IMPLS.index(x[0][1]))
    for (mode, impl, t), r in sorted(_results.items(), key=order):
        fmt = lambda key: f"{r[key]:.2f}" if r.get(key) is not None else "-"
        lines.append(f"{mode:>8} {t:>5} {impl:>9} {r['min_s'] * 1e3:>9.1f} {r['median_s'] * 1e3:>9.1f} "
                     f"{r['peak_mib']:>8.1f} {fmt('speedup_vs_ref'):>9} {fmt('mem_ratio_vs_ref'):>9} "
                     f"{fmt('time_vs_sdpa'):>9} {fmt('mem_vs_sdpa'):>9}")
    with request.config.pluginmanager.getplugin("capturemanager").global_and_fixture_disabled():
        print("\n".join(lines), flush=True)


def run_case(benchmark, mode, impl, t):
    result = measure(mode, impl, t, benchmark)
    if impl == "kernel":
        r, s = baseline(mode, "reference", t), baseline(mode, "sdpa", t)
        result["speedup_vs_ref"] = r["min_s"] / result["min_s"]
        result["mem_ratio_vs_ref"] = r["peak_mib"] / result["peak_mib"] if result["peak_mib"] > 0 else None
        result["time_vs_sdpa"] = result["min_s"] / s["min_s"]
        result["mem_vs_sdpa"] = result["peak_mib"] / s["peak_mib"] if s["peak_mib"] > 0 else None
    benchmark.extra_info.update({"T": t, "impl": impl, "mode": mode, **result})


CASES = [pytest.param(impl, t, id=f"{impl}-T{t}") for t in LENGTHS for impl in IMPLS]


@pytest.mark.parametrize("impl,t", CASES)
def test_oeb_forward(benchmark, impl, t):
    run_case(benchmark, "forward", impl, t)


@pytest.mark.parametrize("impl,t", CASES)
def test_oeb_fwd_bwd(benchmark, impl, t):
    run_case(benchmark, "fwd_bwd", impl, t)
