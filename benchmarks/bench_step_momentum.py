"""Step Momentum Injection on CPU: the prefill op vs the reference, and the decode op per token.

Qwen2-1.5B hidden size (D = 1536), B = 1, fp32. The segmentation looks like a reasoning trace:
a question of T/8 tokens, 64-token steps, a summary of T/8 tokens. The reference (a Python loop
over segments) runs up to T = 2048. extra_info holds the peak memory of one call (MiB) and,
for the kernel, the reference / kernel time ratio measured in the same test.

    python -m pytest benchmarks/bench_step_momentum.py --benchmark-columns=min,mean,median
"""
from __future__ import annotations

import time

import pytest
import torch

from benchmarks.peak_memory import peak_memory_mib
from stepflow_ext import ops, reference
from stepflow_ext.reference import QUESTION, STEP, SUMMARY

D = 1536
BETA, GAMMA = 0.9, 0.05
STEP_TOKENS = 64


def trace_segmentation(t):
    """seg_ids (1, T), seg_kinds (1, S): question T/8, steps of 64 tokens, summary T/8."""
    question = summary = t // 8
    lengths, kinds = [question], [QUESTION]
    rest = t - question - summary
    while rest > 0:
        lengths.append(min(STEP_TOKENS, rest))
        kinds.append(STEP)
        rest -= lengths[-1]
    lengths.append(summary)
    kinds.append(SUMMARY)
    seg_ids = torch.cat([torch.full((n,), s, dtype=torch.long) for s, n in enumerate(lengths)])[None]
    return seg_ids, torch.tensor([kinds])


def inputs(t):
    torch.manual_seed(0)
    seg_ids, seg_kinds = trace_segmentation(t)
    return torch.randn(1, t, D) + 0.1, seg_ids, seg_kinds


def kernel(h, seg_ids, seg_kinds):
    return torch.ops.stepflow.step_momentum(h, seg_ids, seg_kinds, BETA, GAMMA)


def ref(h, seg_ids, seg_kinds):
    return reference.step_momentum(h, seg_ids, seg_kinds, BETA, GAMMA)


def best_time(fn, *args, repeat=5):
    fn(*args)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return min(times)


@pytest.mark.parametrize("t", [512, 1024, 2048, 32768], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_step_momentum_prefill(benchmark, impl, t):
    if impl == "reference" and t > 2048:
        pytest.skip("the reference runs up to T = 2048")
    args = inputs(t)
    fn = kernel if impl == "kernel" else ref
    benchmark.extra_info["peak_mib"] = round(peak_memory_mib(fn, *args), 1)
    benchmark.extra_info["threads"] = torch.get_num_threads()
    if impl == "kernel":
        if t <= 2048:
            ref_time, kernel_time = best_time(ref, *args), best_time(kernel, *args)
            benchmark.extra_info["reference_over_kernel"] = round(ref_time / kernel_time, 1)
            benchmark.extra_info["ref_peak_mib"] = round(peak_memory_mib(ref, *args), 1)
    out = benchmark(fn, *args)
    if impl == "kernel":  # h read once, out written once
        benchmark.extra_info["gbytes_per_s"] = round(2 * out.numel() * 4 / benchmark.stats.stats.min / 1e9, 2)


@pytest.mark.parametrize("t", [2048], ids=lambda t: f"T{t}")
def test_step_momentum_backward(benchmark, t):
    """Forward + backward through the op (the backward recomputes in PyTorch ops)."""
    h, seg_ids, seg_kinds = inputs(t)
    h.requires_grad_()
    grad = torch.randn_like(h)

    def step():
        out = ops.step_momentum(h, seg_ids, seg_kinds, BETA, GAMMA)
        (g,) = torch.autograd.grad(out, h, grad)
        return g

    benchmark.extra_info["peak_mib"] = round(peak_memory_mib(step), 1)
    benchmark(step)


@pytest.mark.parametrize("path", ["op", "wrapper"])
def test_step_momentum_decode_token(benchmark, path):
    """One generated token (B = 1) inside a step, after a 1024-token prompt: us per token."""
    prompt = 1024
    h, seg_ids, seg_kinds = inputs(prompt)
    state = ops.new_momentum_state(1, D)
    ops.step_momentum_decode_(h, seg_ids, seg_kinds, state, BETA, GAMMA)  # prefill through the state
    # the next tokens join a new step (and stay in it): the fold happened on the first one
    kinds = torch.cat([seg_kinds, torch.tensor([[STEP]])], 1)
    token_seg = torch.tensor([[kinds.shape[1] - 1]])
    token = torch.randn(1, 1, D)
    if path == "op":
        momentum, step_sum, counters = state

        def step():
            return torch.ops.stepflow.step_momentum_decode_(token, token_seg, kinds, momentum, step_sum, counters,
                                                            BETA, GAMMA)
    else:
        def step():
            return ops.step_momentum_decode_(token, token_seg, kinds, state, BETA, GAMMA)

    with torch.no_grad():
        benchmark(step)
    benchmark.extra_info["us_per_token"] = round(benchmark.stats.stats.min * 1e6, 1)
