"""CPU step_saliency_pool against the materialized reference (design.md 7): time and peak memory.

Qwen2-1.5B attention shapes (H = 12, H_kv = 2, d = 128), B = 1, fp32, T = 512, 1024, 2048, a
question, ~20 steps and a summary; the paper's head reduction (abs_mean). Ids read as a table:
    test_saliency[reference-T2048]       stepflow_ext.reference.step_saliency_pool (materializes A)
    test_saliency[kernel-T2048]          the op, computing the row log-sum-exp itself
    test_saliency[kernel_lse-T2048]      the op, given lse (as an attention forward returns it)
    test_saliency[reference_oeb-T2048]   the reference in an OEB layer (bridge bounds: A' in place of A)
    test_saliency[kernel_oeb-T2048]      the op in that OEB layer
extra_info: peak_mib (extra peak RSS of one call, benchmarks.peak_memory) and, for the kernels,
speedup = reference min / kernel min time (the matching reference: plain or OEB; target >= 3 at
T = 2048; the best of the rounds, since other processes on a shared machine only ever add time)
and mem_ratio = reference peak / kernel peak (target >= 10). A summary table is printed after
the module.

    python -m pytest benchmarks/bench_step_saliency_pool.py --benchmark-columns=min,mean,median
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import time

import pytest
import torch

from benchmarks.peak_memory import peak_memory_mib
from stepflow_ext import ops
from stepflow_ext import reference as ref

B, H, H_KV, D = 1, 12, 2, 128
SCALE = D ** -0.5
REDUCTION = "abs_mean"
LENGTHS = (512, 1024, 2048)
IMPLS = ("reference", "kernel", "kernel_lse", "reference_oeb", "kernel_oeb")
_results: dict[tuple[str, int], dict] = {}
_libc = ctypes.CDLL(ctypes.util.find_library("c"))


def peak_mib(fn):
    """peak_memory_mib after handing freed heap pages back to the OS (malloc_trim): otherwise
    blocks below glibc's mmap threshold reuse pages that are already resident and the kernel's
    few MiB of strips read as 0."""
    _libc.malloc_trim(0)
    return peak_memory_mib(fn)


@functools.lru_cache(maxsize=1)
def inputs(t):
    """q, k, v, dO, seg_ids, S, the true lse and the bridge bounds for length t (one length cached)."""
    g = torch.Generator().manual_seed(t)
    q, dout = (torch.randn(B, H, t, D, generator=g) for _ in range(2))
    k, v = (torch.randn(B, H_KV, t, D, generator=g) for _ in range(2))
    # question = first quarter, 20 steps of random lengths, summary = last tenth
    question, summary = t // 4, t // 10
    cuts = torch.sort(torch.randint(question + 1, t - summary, (19,), generator=g)).values
    seg_ids = torch.zeros(B, t, dtype=torch.long)
    for c in cuts.tolist() + [t - summary]:
        seg_ids[:, c:] += 1
    num_segments = 21 + 1
    kinds = torch.tensor([[ref.QUESTION] + [ref.STEP] * 20 + [ref.SUMMARY]])
    bounds = ref.oeb_bounds(seg_ids, kinds, rule="bridge")
    lse = torch.empty(B, H, t)
    for h in range(H):  # one head at a time keeps the set-up small
        scores = SCALE * q[:, h] @ k[:, h // (H // H_KV)].transpose(-1, -2)
        lse[:, h] = torch.logsumexp(scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf")), -1)
    return q, k, v, dout, seg_ids, num_segments, lse, bounds


def call(impl, t):
    q, k, v, dout, seg_ids, s, lse, bounds = inputs(t)
    oeb = dict(oeb_bounds=bounds, oeb_rule="bridge") if impl.endswith("_oeb") else {}
    if impl.startswith("reference"):
        return lambda: ref.step_saliency_pool(q, k, v, dout, seg_ids, s, SCALE, REDUCTION, **oeb)
    lse_arg = lse if impl == "kernel_lse" else None
    return lambda: ops.step_saliency_pool(q, k, v, dout, seg_ids, s, SCALE, REDUCTION, lse=lse_arg, **oeb)


def measure_reference(impl, t):
    """Reference numbers for the ratios when its own benchmark did not run (e.g. -k kernel)."""
    if (impl, t) not in _results:
        fn = call(impl, t)
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        _results[(impl, t)] = {"min_s": elapsed, "median_s": elapsed, "peak_mib": peak_mib(fn)}
    return _results[(impl, t)]


@pytest.fixture(scope="module", autouse=True)
def summary_table(request):
    yield
    if not _results:
        return
    lines = ["", f"step_saliency_pool, CPU ({torch.get_num_threads()} threads), H={H} H_kv={H_KV} d={D} B={B} fp32, "
             f"{REDUCTION} (ms, extra peak MiB, ratios vs the matching reference)",
             f"{'T':>6} {'impl':>13} {'min ms':>9} {'med ms':>9} {'MiB':>9} {'speedup':>8} {'mem_ratio':>9}"]
    for (impl, t), r in sorted(_results.items(), key=lambda x: (x[0][1], IMPLS.index(x[0][0]))):
        ratio = lambda key: f"{r[key]:.1f}" if r.get(key) is not None else "-"
        lines.append(f"{t:>6} {impl:>13} {r['min_s'] * 1e3:>9.1f} {r['median_s'] * 1e3:>9.1f} {r['peak_mib']:>9.1f} "
                     f"{ratio('speedup'):>8} {ratio('mem_ratio'):>9}")
    # module teardown runs under output capture: lift it to show the table
    with request.config.pluginmanager.getplugin("capturemanager").global_and_fixture_disabled():
        print("\n".join(lines), flush=True)


CASES = [pytest.param(impl, t, id=f"{impl}-T{t}") for t in LENGTHS for impl in IMPLS]


@pytest.mark.parametrize("impl,t", CASES)
def test_saliency(benchmark, impl, t):
    fn = call(impl, t)
    if impl.startswith("reference"):  # seconds per call at T = 2048: few rounds
        benchmark.pedantic(fn, rounds=2 if t >= 2048 else 3, warmup_rounds=0)
    else:
        benchmark.pedantic(fn, rounds=5, warmup_rounds=1)
    stats = benchmark.stats.stats
    result = {"min_s": stats.min, "median_s": stats.median, "peak_mib": peak_mib(fn)}
    if not impl.startswith("reference"):
        base = measure_reference("reference_oeb" if impl == "kernel_oeb" else "reference", t)
        result["speedup"] = base["min_s"] / result["min_s"]
        result["mem_ratio"] = base["peak_mib"] / result["peak_mib"] if result["peak_mib"] > 0 else None
    _results[(impl, t)] = result
    benchmark.extra_info.update({"T": t, "impl": impl, **result})
