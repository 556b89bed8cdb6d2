"""Shared test helpers: fresh random inputs (seed printed on failure) and tolerances."""
from __future__ import annotations

import os
import random

import pytest
import torch

from stepflow_ext.reference import QUESTION, STEP, SUMMARY

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def seed(request):
    """A fresh seed per test (STEPFLOW_TEST_SEED pins it); shown in the report when a test fails."""
    value = int(os.environ.get("STEPFLOW_TEST_SEED", random.randrange(2**31)))
    torch.manual_seed(value)
    random.seed(value)
    request.node.user_properties.append(("seed", value))
    return value


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for key, value in item.user_properties:
            if key == "seed":
                report.sections.append(("seed", f"rerun with STEPFLOW_TEST_SEED={value}"))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared machine: one intra-op thread is faster than fighting for cores
    (modules opt in with pytestmark = pytest.mark.usefixtures("one_thread"))."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tolerances(dtype):
    """(atol, rtol) for comparing a kernel in `dtype` against a float64 reference."""
    return {torch.float64: (1e-9, 1e-7), torch.float32: (2e-5, 2e-4),
            torch.float16: (2e-3, 2e-2), torch.bfloat16: (1.5e-2, 5e-2)}[dtype]


def random_segment_lengths(total, max_segments, allow_empty=True, generator=None):
    """Split `total` tokens into a question, steps and maybe a summary, with empty and 1-token steps."""
    if total <= 0:
        return [], []
    question = int(torch.randint(1, max(2, total // 3 + 1), (1,), generator=generator))
    question = min(question, total)
    lengths, kinds = [question], [QUESTION]
    rest = total - question
    n_steps = int(torch.randint(1, max_segments, (1,), generator=generator)) if max_segments > 1 else 1
    with_summary = bool(torch.randint(0, 2, (1,), generator=generator))
    parts = n_steps + int(with_summary)
    cuts = sorted(torch.randint(0, rest + 1, (parts - 1,), generator=generator).tolist())
    sizes = [b - a for a, b in zip([0] + cuts, cuts + [rest])]
    if not allow_empty:
        sizes = [s for s in sizes if s > 0] or [rest]
    for i, size in enumerate(sizes):
        lengths.append(size)
        kinds.append(SUMMARY if (with_summary and i == len(sizes) - 1 and len(sizes) > 1) else STEP)
    return lengths, kinds


def random_seg_ids(batch, length, max_segments=6, pad="left", generator=None):
    """seg_ids (B, T) with -1 padding on the given side, plus seg_kinds (B, S) and S.

    Rows get different valid lengths (one row always full), segments include empty and
    one-token steps; seg_kinds pads unused segment slots with STEP.
    """
    seg_rows, kind_rows = [], []
    for row in range(batch):
        valid = length if row == 0 else int(torch.randint(1, length + 1, (1,), generator=generator))
        lengths, kinds = random_segment_lengths(valid, max_segments, generator=generator)
        ids = [s for s, n in enumerate(lengths) for _ in range(n)]
        padding = [-1] * (length - valid)
        seg_rows.append(padding + ids if pad == "left" else ids + padding)
        kind_rows.append(kinds)
    num_segments = max(len(k) for k in kind_rows)
    seg_kinds = torch.full((batch, num_segments), STEP, dtype=torch.long)
    for row, kinds in enumerate(kind_rows):
        seg_kinds[row, :len(kinds)] = torch.tensor(kinds)
    return torch.tensor(seg_rows, dtype=torch.long), seg_kinds, num_segments
