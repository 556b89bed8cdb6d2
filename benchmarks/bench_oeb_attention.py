"""CPU oeb_attention against plain causal SDPA and the materialized reference: time and peak memory.

Qwen2-1.5B attention shapes (H = 12, H_kv = 2, d = 128), B = 1, fp32, T = 512, 1024, 2048. The
trace is segmented as a reasoning model's: a question (the first 10%), thinking steps of 40-80
tokens, a summary (the last 10%); bounds from reference.oeb_bounds for the rule. Ids:
    test_oeb_forward[reference-T2048]    stepflow_ext.reference.oeb_attention, bridge (materializes A)
    test_oeb_forward[sdpa-T2048]         torch SDPA, causal, enable_gqa: what a user runs without OEB
    test_oeb_forward[kernel-T2048]       the op, rule "bridge" (the paper's; tau_max 0.15, eps 1e-6)
    test_oeb_forward[kernel_odds-T2048]  the op, rule "odds" (strength 0.5, one sink)
    test_oeb_fwd_bwd[...]                the same, forward + backward (dq, dk, dv) of a random dO
extra_info: peak_mib (extra peak RSS of one call, benchmarks.peak_memory), active (the fraction of
rows the rule changed) and, for the kernels, time_vs_sdpa = kernel min / SDPA min (target <= 1.4
for the bridge forward at T = 2048), mem_vs_sdpa, speedup_vs_ref = reference min / kernel min,
mem_ratio_vs_ref. Times are the min over rounds: other processes on a shared machine only ever add
time. A summary table is printed last.

    python -m pytest benchmarks/bench_oeb_attention.py --benchmark-columns=min,mean,median
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
TAU_MAX, STRENGTH, NUM_SINK = 0.15, 0.5, 1
LENGTHS = (512, 1024, 2048)
IMPLS = ("reference", "sdpa", "kernel", "kernel_odds")
_results: dict[tuple[str, str, int], dict] = {}
_libc = ctypes.CDLL(ctypes.util.find_library("c"))


def peak_mib(fn):
    """peak_memory_mib after handing freed heap pages back to the OS (malloc_trim), so strips
    that reuse already-resident small blocks still count."""
    _libc.malloc_trim(0)
    return peak_memory_mib(fn)


def segmentation(t, generator):
    """seg_ids (1, t) and kinds: a question (10%), steps of 40-80 tokens, a summary (the last 10%)."""
    question, summary = t // 10, t // 10
    lengths, kinds = [question], [ref.QUESTION]
    start = question
    while start < t - summary:
        n = min(int(torch.randint(40, 81, (1,), generator=generator)), t - summary - start)
        lengths.append(n)
        kinds.append(ref.STEP)
        start += n
    lengths.append(summary)
    kinds.append(ref.SUMMARY)
    seg_ids = torch.tensor([[s for s, n in enumerate(lengths) for _ in range(n)]])
    return seg_ids, torch.tensor([kinds])


@functools.lru_cache(maxsize=1)
def inputs(t):
    """q, k, v, dO, kv_start and the bounds of each rule for length t (one length cached at a time)."""
    g = torch.Generator().manual_seed(t)
    q, dout = (torch.randn(B, H, t, D, generator=g) for _ in range(2))
    k, v = (torch.randn(B, H_KV, t, D, generator=g) for _ in range(2))
    seg_ids, kinds = segmentation(t, g)
    bounds = {rule: ref.oeb_bounds(seg_ids, kinds, rule=rule, num_sink=NUM_SINK) for rule in ("bridge", "odds")}
    kv_start = torch.zeros(B, dtype=torch.long)
    return q, k, v, dout, kv_start, bounds


def forward_fn(impl, q, k, v, kv_start, bounds):
    if impl == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=SCALE, enable_gqa=True)
    rule = "odds" if impl == "kernel_odds" else "bridge"
    fn = ref.oeb_attention if impl == "reference" else ops.oeb_attention
    return fn(q, k, v, kv_start, bounds[rule], rule=rule, strength=STRENGTH, tau_max=TAU_MAX, scale=SCALE)[0]


def call(mode, impl, t):
    q, k, v, dout, kv_start, bounds = inputs(t)
    if mode == "forward":
        return lambda: forward_fn(impl, q, k, v, kv_start, bounds)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]

    def fwd_bwd():
        out = forward_fn(impl, *leaves, kv_start, bounds)
        return torch.autograd.grad(out, leaves, dout)

    return fwd_bwd


def active_fraction(impl, t):
    if impl == "sdpa":
        return None
    q, k, v, _, kv_start, bounds = inputs(t)
    rule = "odds" if impl == "kernel_odds" else "bridge"
    stats = ops.oeb_attention(q, k, v, kv_start, bounds[rule], rule=rule, strength=STRENGTH, tau_max=TAU_MAX,
                              scale=SCALE)[2]
    return float(stats[..., 4].mean())


def measure(mode, impl, t, benchmark=None):
    fn = call(mode, impl, t)
    if benchmark is None:  # a baseline whose own benchmark did not run (e.g. -k kernel): one call
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        stats = {"min_s": elapsed, "median_s": elapsed}
    else:
        slow = impl == "reference" and t >= 1024  # seconds per call: few rounds
        benchmark.pedantic(fn, rounds=2 if slow else 7, warmup_rounds=0 if slow else 1)
        stats = {"min_s": benchmark.stats.stats.min, "median_s": benchmark.stats.stats.median}
    _results[(mode, impl, t)] = {**stats, "peak_mib": peak_mib(fn), "active": active_fraction(impl, t)}
    return _results[(mode, impl, t)]


def baseline(mode, impl, t):
    return _results.get((mode, impl, t)) or measure(mode, impl, t)


@pytest.fixture(scope="module", autouse=True)
def summary_table(request):
    yield
    if not _results:
        return
    lines = ["", f"oeb_attention, CPU ({torch.get_num_threads()} threads), H={H} H_kv={H_KV} d={D} B={B} fp32; "
             f"bridge tau_max {TAU_MAX}, odds strength {STRENGTH} "
             "(ms, extra peak MiB; ratios of each kernel against SDPA and the reference)",
             f"{'mode':>8} {'T':>5} {'impl':>11} {'min ms':>9} {'med ms':>9} {'MiB':>8} {'active':>7} "
             f"{'kern/sdpa':>9} {'kMiB/sdpa':>9} {'ref/kern':>9} {'refMiB/k':>9}"]
    order = lambda x: (x[0][0] != "forward", x[0][2], IMPLS.index(x[0][1]))
    for (mode, impl, t), r in sorted(_results.items(), key=order):
        fmt = lambda key: f"{r[key]:.2f}" if r.get(key) is not None else "-"
        lines.append(f"{mode:>8} {t:>5} {impl:>11} {r['min_s'] * 1e3:>9.1f} {r['median_s'] * 1e3:>9.1f} "
                     f"{r['peak_mib']:>8.1f} {fmt('active'):>7} {fmt('time_vs_sdpa'):>9} {fmt('mem_vs_sdpa'):>9} "
                     f"{fmt('speedup_vs_ref'):>9} {fmt('mem_ratio_vs_ref'):>9}")
    with request.config.pluginmanager.getplugin("capturemanager").global_and_fixture_disabled():
        print("\n".join(lines), flush=True)


def run_case(benchmark, mode, impl, t):
    result = measure(mode, impl, t, benchmark)
    if impl.startswith("kernel"):
        r, s = baseline(mode, "reference", t), baseline(mode, "sdpa", t)
        result["time_vs_sdpa"] = result["min_s"] / s["min_s"]
        result["mem_vs_sdpa"] = result["peak_mib"] / s["peak_mib"] if s["peak_mib"] > 0 else None
        result["speedup_vs_ref"] = r["min_s"] / result["min_s"]
        result["mem_ratio_vs_ref"] = r["peak_mib"] / result["peak_mib"] if result["peak_mib"] > 0 else None
    benchmark.extra_info.update({"T": t, "impl": impl, "mode": mode, **result})


CASES = [pytest.param(impl, t, id=f"{impl}-T{t}") for t in LENGTHS for impl in IMPLS]


@pytest.mark.parametrize("impl,t", CASES)
def test_oeb_forward(benchmark, impl, t):
    run_case(benchmark, "forward", impl, t)


@pytest.mark.parametrize("impl,t", CASES)
def test_oeb_fwd_bwd(benchmark, impl, t):
    run_case(benchmark, "fwd_bwd", impl, t)
