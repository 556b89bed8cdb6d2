"""Step Momentum Injection (design.md 2.4): the CPU prefill and decode ops against the reference."""
from __future__ import annotations

import random

import pytest
import torch
from conftest import random_seg_ids, tolerances

from stepflow_ext import ops
from stepflow_ext.reference import QUESTION, STEP, SUMMARY
from stepflow_ext.reference import step_momentum as ref_step_momentum

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def rows_to_tensors(rows):
    """rows: list of (segment lengths, kinds, pad side) -> seg_ids (B, T), seg_kinds (B, S)."""
    seg_rows = [[s for s, n in enumerate(lengths) for _ in range(n)] for lengths, _, _ in rows]
    length = max(len(r) for r in seg_rows)
    seg_ids = torch.full((len(rows), length), -1, dtype=torch.long)
    seg_kinds = torch.full((len(rows), max(len(k) for _, k, _ in rows)), STEP, dtype=torch.long)
    for b, ((_, kinds, pad), ids) in enumerate(zip(rows, seg_rows)):
        start = length - len(ids) if pad == "left" else 0
        seg_ids[b, start:start + len(ids)] = torch.tensor(ids, dtype=torch.long)
        seg_kinds[b, :len(kinds)] = torch.tensor(kinds)
    return seg_ids, seg_kinds


def first_step_ids(rows):
    """Per row, the id of the first non-empty step (-2 when there is none)."""
    return [min([s for s, (n, k) in enumerate(zip(lengths, kinds)) if k == STEP and n > 0], default=-2)
            for lengths, kinds, _ in rows]


Q, P, M = QUESTION, STEP, SUMMARY
# Hand-made segmentations covering the corner cases of 2.4 (padded to a common length).
SPECIAL_ROWS = [
    ([4, 3, 5, 2, 4], [Q, P, P, P, M], "left"),       # plain: question, 3 steps, summary
    ([5, 6], [Q, M], "right"),                        # thinking disabled: summary right after question
    ([3, 0, 4, 0, 1, 3], [Q, P, P, P, P, M], "left"),  # empty steps (also the first) and a 1-token step
    ([2, 1, 1, 1, 1], [Q, P, P, P, P], "right"),       # 1-token steps, no summary
    ([6], [Q], "left"),                               # question only
    ([2, 5, 3], [Q, P, M], "right"),                  # one step: summary gets m_1 = mu_1
    ([], [Q], "left"),                                # all padding
    ([1, 2, 2, 1], [Q, P, M, M], "left"),             # two summary segments
]


def special_case(dim, dtype, gen=None):
    seg_ids, seg_kinds = rows_to_tensors(SPECIAL_ROWS)
    h = torch.randn(len(SPECIAL_ROWS), seg_ids.shape[1], dim, generator=gen).to(dtype)
    return h, seg_ids, seg_kinds


def assert_close_to_ref(out, h, seg_ids, seg_kinds, beta, gamma):
    expected = ref_step_momentum(h.double(), seg_ids, seg_kinds, beta, gamma)
    atol, rtol = tolerances(h.dtype)
    torch.testing.assert_close(out.double(), expected, atol=atol, rtol=rtol)
    return expected


# --------------------------------------------------------------------------- prefill vs reference


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 41, 17), (1, 1, 5), (2, 64, 33), (3, 100, 301)])
@pytest.mark.parametrize("pad", ["left", "right"])
def test_prefill_matches_reference(seed, dtype, shape, pad):
    b, t, d = shape
    seg_ids, seg_kinds, _ = random_seg_ids(b, t, max_segments=7, pad=pad)
    h = (torch.randn(b, t, d) * 2 + 0.5).to(dtype)  # a mean offset keeps the momentum away from 0
    beta, gamma = random.uniform(0.0, 0.95), random.uniform(0.2, 1.0)
    h_before = h.clone()
    out = ops.step_momentum(h, seg_ids, seg_kinds, beta, gamma)
    assert out.dtype == dtype and out.shape == h.shape
    assert torch.equal(h, h_before), "the prefill op must not modify h"
    assert_close_to_ref(out, h, seg_ids, seg_kinds, beta, gamma)
    # tokens that get nothing (padding, question, K == 0) come back bit for bit
    same = (ref_step_momentum(h.double(), seg_ids, seg_kinds, beta, gamma) == h.double()).all(-1)
    assert torch.equal(out[same], h[same])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("beta,gamma", [(0.9, 0.05), (0.0, 0.7), (0.5, 0.0), (0.99, 2.0)])
def test_prefill_special_segmentations(seed, dtype, beta, gamma):
    h, seg_ids, seg_kinds = special_case(9, dtype)
    out = ops.step_momentum(h, seg_ids, seg_kinds, beta, gamma)
    expected = assert_close_to_ref(out, h, seg_ids, seg_kinds, beta, gamma)
    if gamma == 0:
        assert torch.equal(out, h)
    elif gamma >= 0.5:  # the cases do inject somewhere, by well more than the tolerance
        assert ((expected - h.double()).abs() > 10 * tolerances(dtype)[0]).any()
    # question tokens, step-1 tokens and padding are untouched (and so are rows without steps)
    kinds_tok = seg_kinds.gather(1, seg_ids.clamp(min=0))
    first_step = seg_ids == torch.tensor(first_step_ids(SPECIAL_ROWS))[:, None]
    untouched = (seg_ids < 0) | (kinds_tok == QUESTION) | first_step
    assert torch.equal(out[untouched], h[untouched])


def test_prefill_hand_computed(seed):
    """Two steps, then a summary, checked against the formula written out by hand."""
    beta, gamma = 0.7, 0.4
    seg_ids = torch.tensor([[-1, 0, 0, 1, 1, 1, 2, 2, 3, 3]])
    seg_kinds = torch.tensor([[Q, P, P, M]])
    h = torch.randn(1, 10, 6, dtype=torch.float64) + 1.0
    out = ops.step_momentum(h, seg_ids, seg_kinds, beta, gamma)
    mu1, mu2 = h[0, 3:6].mean(0), h[0, 6:8].mean(0)
    m1, m2 = mu1, beta * mu1 + (1 - beta) * mu2
    want = h[0].clone()
    for i in (6, 7):  # step 2 sees m_1 only, never its own mean
        want[i] += gamma * h[0, i].norm() / m1.norm() * m1
    for i in (8, 9):
        want[i] += gamma * h[0, i].norm() / m2.norm() * m2
    torch.testing.assert_close(out[0], want, atol=1e-12, rtol=1e-12)


def test_zero_momentum_adds_nothing(seed):
    seg_ids = torch.tensor([[0, 1, 1, 2, 2, 3]])
    seg_kinds = torch.tensor([[Q, P, P, M]])
    h = torch.randn(1, 6, 8)
    h[0, 1:3] = 0  # step 1 is all zeros -> m_1 = 0
    out = ops.step_momentum(h, seg_ids, seg_kinds, 0.0, 0.5)
    assert torch.equal(out[0, :5], h[0, :5])
    assert not torch.equal(out[0, 5], h[0, 5])  # beta 0: the summary gets m_2 = mu_2
    st = ops.new_momentum_state(1, 8)
    assert torch.equal(torch.cat([ops.step_momentum_decode_(h[:, i:i + 1], seg_ids[:, i:i + 1], seg_kinds, st,
                                                            0.0, 0.5) for i in range(6)], 1), out)


@pytest.mark.parametrize("shape", [(2, 0, 5), (2, 6, 0), (0, 4, 3)])
def test_empty_shapes(shape):
    b, t, d = shape
    h, seg_ids, seg_kinds = torch.randn(b, t, d), torch.zeros(b, t, dtype=torch.long), torch.ones(b, 1).long()
    assert torch.equal(ops.step_momentum(h, seg_ids, seg_kinds, 0.9, 0.5), h)
    state = ops.new_momentum_state(b, d)
    assert torch.equal(ops.step_momentum_decode_(h, seg_ids, seg_kinds, state, 0.9, 0.5), h)
    assert state[2].tolist() == ([[0, t, 0]] * b if t else [[-1, 0, 0]] * b)


def test_noncontiguous_inputs(seed):
    seg_ids, seg_kinds, _ = random_seg_ids(3, 30, pad="left")
    h = torch.randn(3, 12, 30).transpose(1, 2)  # (3, 30, 12), strided
    out = ops.step_momentum(h, seg_ids, seg_kinds, 0.8, 0.5)
    assert torch.equal(out, ops.step_momentum(h.contiguous(), seg_ids, seg_kinds, 0.8, 0.5))
    assert_close_to_ref(out, h, seg_ids, seg_kinds, 0.8, 0.5)


# --------------------------------------------------------------------------- decode


def decode_in_chunks(h, seg_ids, seg_kinds, beta, gamma, sizes, state=None):
    state = state or ops.new_momentum_state(h.shape[0], h.shape[2])
    outs, start = [], 0
    for n in sizes:
        outs.append(ops.step_momentum_decode_(h[:, start:start + n], seg_ids[:, start:start + n], seg_kinds,
                                              state, beta, gamma))
        start += n
    assert start == h.shape[1]
    return torch.cat(outs, 1), state


def random_chunks(t):
    sizes = []
    while sum(sizes) < t:
        sizes.append(min(random.randint(1, 9), t - sum(sizes)))
    return sizes


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunking", ["token", "random", "whole"])
@pytest.mark.parametrize("pad", ["left", "right"])
def test_decode_chunking_equals_prefill(seed, dtype, chunking, pad):
    b, t, d = 4, 47, 19
    seg_ids, seg_kinds, _ = random_seg_ids(b, t, max_segments=8, pad=pad)
    h = (torch.randn(b, t, d) + 0.3).to(dtype)
    beta, gamma = random.uniform(0.0, 0.95), random.uniform(0.2, 1.0)
    sizes = {"token": [1] * t, "random": random_chunks(t), "whole": [t]}[chunking]
    h_before = h.clone()
    got, _ = decode_in_chunks(h, seg_ids, seg_kinds, beta, gamma, sizes)
    want = ops.step_momentum(h, seg_ids, seg_kinds, beta, gamma)
    assert torch.equal(h, h_before)
    if dtype == torch.float64:  # the state is fp32 between chunks
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    else:  # one code path, sums in token order: bit for bit
        assert torch.equal(got, want)
    if dtype != torch.float64:
        assert_close_to_ref(got, h, seg_ids, seg_kinds, beta, gamma)


def test_decode_special_segmentations_token_by_token(seed):
    h, seg_ids, seg_kinds = special_case(10, torch.float32)
    got, _ = decode_in_chunks(h, seg_ids, seg_kinds, 0.6, 0.8, [1] * h.shape[1])
    assert torch.equal(got, ops.step_momentum(h, seg_ids, seg_kinds, 0.6, 0.8))
    assert_close_to_ref(got, h, seg_ids, seg_kinds, 0.6, 0.8)


def expected_state(h, seg_row, kinds_row, beta):
    """(momentum, step_sum, counters) after a whole row, from the definitions (fp64)."""
    valid = [i for i, s in enumerate(seg_row.tolist()) if s >= 0]
    if not valid:
        zeros = torch.zeros(h.shape[-1], dtype=torch.float64)
        return zeros, zeros, [-1, 0, 0]
    last = int(seg_row[valid[-1]])
    momentum, completed = torch.zeros(h.shape[-1], dtype=torch.float64), 0
    for s in sorted({int(seg_row[i]) for i in valid}):
        if s == last or int(kinds_row[s]) != STEP:
            continue
        mean = h[seg_row == s].double().mean(0)
        momentum = mean if completed == 0 else beta * momentum + (1 - beta) * mean
        completed += 1
    if int(kinds_row[last]) == STEP:
        cur = h[seg_row == last].double()
        return momentum, cur.sum(0), [last, cur.shape[0], completed]
    return momentum, torch.zeros(h.shape[-1], dtype=torch.float64), [last, 0, completed]


@pytest.mark.parametrize("chunking", ["token", "whole"])
def test_decode_state_matches_hand_computed(seed, chunking):
    h, seg_ids, seg_kinds = special_case(7, torch.float32)
    extra_ids, extra_kinds, _ = random_seg_ids(3, h.shape[1], max_segments=6, pad="right")
    seg_ids = torch.cat([seg_ids, extra_ids])
    kinds = torch.full((seg_ids.shape[0], max(seg_kinds.shape[1], extra_kinds.shape[1])), STEP)
    kinds[:seg_kinds.shape[0], :seg_kinds.shape[1]] = seg_kinds
    kinds[seg_kinds.shape[0]:, :extra_kinds.shape[1]] = extra_kinds
    h = torch.randn(seg_ids.shape[0], seg_ids.shape[1], 7)
    beta = 0.75
    t = h.shape[1]
    _, (momentum, step_sum, counters) = decode_in_chunks(h, seg_ids, kinds, beta, 0.3,
                                                         [1] * t if chunking == "token" else [t])
    for b in range(h.shape[0]):
        m, s, c = expected_state(h[b], seg_ids[b], kinds[b], beta)
        assert counters[b].tolist() == c, f"row {b}"
        torch.testing.assert_close(step_sum[b].double(), s, atol=1e-5, rtol=1e-5)
        if c[2] >= 1:
            torch.testing.assert_close(momentum[b].double(), m, atol=1e-5, rtol=1e-5)


def test_decode_state_strided_and_padding_chunks(seed):
    """A state held in strided views is updated in place; all-padding chunks leave it unchanged."""
    b, t, d = 2, 24, 9
    seg_ids, seg_kinds, _ = random_seg_ids(b, t, pad="left")
    h = torch.randn(b, t, d)
    store = torch.zeros(2, b, 2 * d)
    momentum, step_sum = store[0, :, ::2], store[1, :, 1::2]  # non-contiguous views
    counters = torch.tensor([[-1, 0, 0]] * b).t().contiguous().t()
    state = (momentum, step_sum, counters)
    got, _ = decode_in_chunks(h, seg_ids, seg_kinds, 0.9, 0.5, [5, 7, 12], state=state)
    fresh_got, fresh = decode_in_chunks(h, seg_ids, seg_kinds, 0.9, 0.5, [5, 7, 12])
    assert torch.equal(got, fresh_got)
    for x, y in zip(state, fresh):
        assert torch.equal(x, y)
    snapshot = [x.clone() for x in state]
    pad_out = ops.step_momentum_decode_(h[:, :3], torch.full((b, 3), -1), seg_kinds, state, 0.9, 0.5)
    assert torch.equal(pad_out, h[:, :3])
    for x, y in zip(state, snapshot):
        assert torch.equal(x, y)


def test_decode_is_not_differentiable():
    h = torch.randn(1, 4, 5, requires_grad=True)
    seg_ids, seg_kinds = torch.tensor([[0, 1, 2, 2]]), torch.tensor([[Q, P, M]])
    out = ops.step_momentum_decode_(h, seg_ids, seg_kinds, ops.new_momentum_state(1, 5), 0.5, 0.5)
    assert torch.equal(out, ops.step_momentum(h.detach(), seg_ids, seg_kinds, 0.5, 0.5))
    with pytest.raises(RuntimeError, match="not differentiable"):
        out.sum().backward()


# --------------------------------------------------------------------------- autograd


def test_gradcheck_fp64(seed):
    seg_ids, seg_kinds = rows_to_tensors([([1, 2, 1, 0, 1, 2], [Q, P, P, P, P, M], "left"),
                                          ([1, 2, 2], [Q, P, M], "right"),
                                          ([1, 2], [Q, M], "right")])
    h = (torch.randn(3, seg_ids.shape[1], 3, dtype=torch.float64) + 0.5).requires_grad_()

    def fn(x):
        return ops.step_momentum(x, seg_ids, seg_kinds, 0.6, 0.7)

    assert torch.autograd.gradcheck(fn, (h,))
    assert torch.autograd.gradgradcheck(fn, (h,))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_grad_matches_reference_autograd(seed, dtype):
    b, t, d = 3, 40, 16
    seg_ids, seg_kinds, _ = random_seg_ids(b, t, max_segments=7, pad="left")
    h = torch.randn(b, t, d) + 0.5
    weight = torch.randn(b, t, d)
    x = h.to(dtype).detach().clone().requires_grad_()
    (ops.step_momentum(x, seg_ids, seg_kinds, 0.8, 0.6).double() * weight).sum().backward()
    xr = h.to(dtype).double().detach().requires_grad_()
    (ref_step_momentum(xr, seg_ids, seg_kinds, 0.8, 0.6) * weight).sum().backward()
    assert x.grad.dtype == dtype
    atol, rtol = tolerances(dtype)
    # gradients sum over a step's tokens: allow a few times the forward tolerance
    torch.testing.assert_close(x.grad.double(), xr.grad, atol=4 * atol, rtol=4 * rtol)
    assert (xr.grad - weight).abs().max() > 0.05  # the momentum path does contribute


def test_torch_formulation_matches_reference(seed):
    seg_ids, seg_kinds, _ = random_seg_ids(4, 33, max_segments=7, pad="right")
    h = torch.randn(4, 33, 11, dtype=torch.float64)
    torch.testing.assert_close(ops._step_momentum_torch(h, seg_ids, seg_kinds, 0.3, 0.9),
                               ref_step_momentum(h, seg_ids, seg_kinds, 0.3, 0.9), atol=1e-12, rtol=1e-12)


# --------------------------------------------------------------------------- opcheck


def test_opcheck_prefill(seed):
    seg_ids, seg_kinds, _ = random_seg_ids(3, 21, pad="left")
    # with requires_grad, opcheck also traces the backward (about 10 s: torch.compile warm-up)
    h = torch.randn(3, 21, 6, requires_grad=True)
    torch.library.opcheck(torch.ops.stepflow.step_momentum.default, (h, seg_ids, seg_kinds, 0.9, 0.5))
    for dtype in (torch.bfloat16, torch.float64):
        torch.library.opcheck(torch.ops.stepflow.step_momentum.default,
                              (torch.randn(3, 21, 6, dtype=dtype), seg_ids, seg_kinds, 0.0, 0.05))


def test_opcheck_decode(seed):
    seg_ids, seg_kinds, _ = random_seg_ids(3, 21, pad="right")
    h = torch.randn(3, 21, 6)
    state = ops.new_momentum_state(3, 6)
    ops.step_momentum_decode_(h[:, :10], seg_ids[:, :10], seg_kinds, state, 0.9, 0.5)  # a state mid-sequence
    # opcheck runs the op several times on copies of the arguments, each from this state
    torch.library.opcheck(torch.ops.stepflow.step_momentum_decode_.default,
                          (h[:, 10:], seg_ids[:, 10:], seg_kinds, *state, 0.9, 0.5))


def test_opcheck_non_contiguous(seed):
    """The fakes say what the kernels return: a contiguous h' whatever the strides of h (a
    transposed h, a strided decode chunk and strided state views)."""
    seg_ids, seg_kinds, _ = random_seg_ids(3, 21, pad="left")
    h = torch.randn(3, 6, 21).transpose(1, 2)
    assert not h.is_contiguous()
    torch.library.opcheck(torch.ops.stepflow.step_momentum.default, (h, seg_ids, seg_kinds, 0.9, 0.5))
    assert ops.step_momentum(h, seg_ids, seg_kinds, 0.9, 0.5).is_contiguous()
    store = torch.zeros(2, 3, 12)
    counters = torch.tensor([[-1, 0, 0]] * 3).t().contiguous().t()
    state = (store[0, :, ::2], store[1, :, 1::2], counters)  # non-contiguous views
    ops.step_momentum_decode_(h[:, :10], seg_ids[:, :10], seg_kinds, state, 0.9, 0.5)
    torch.library.opcheck(torch.ops.stepflow.step_momentum_decode_.default,
                          (h[:, 10:], seg_ids[:, 10:], seg_kinds, *state, 0.9, 0.5))


# --------------------------------------------------------------------------- bad inputs


def _inputs():
    seg_ids = torch.tensor([[0, 0, 1, 1, 2]])
    seg_kinds = torch.tensor([[Q, P, M]])
    return torch.randn(1, 5, 4), seg_ids, seg_kinds


@pytest.mark.parametrize("change,match", [
    (dict(beta=1.0), "beta"), (dict(beta=-0.1), "beta"), (dict(gamma=-1.0), "gamma"),
    (dict(gamma=float("inf")), "gamma"), (dict(seg_ids=torch.tensor([[0, 0, 1, 1, 3]])), "seg_ids"),
    (dict(seg_ids=torch.tensor([[0, 1, 1, 0, 2]])), "must not decrease"),
    (dict(seg_ids=torch.tensor([[0, 2, -1, 1, 2]])), "must not decrease"),
    (dict(seg_kinds=torch.tensor([[Q, P, 3]])), "seg_kinds"),
    (dict(h=torch.randn(5, 4)), "h"), (dict(h=torch.randn(1, 5, 4).long()), "h"),
    (dict(seg_ids=torch.zeros(1, 4, dtype=torch.long)), "seg_ids"),
])
def test_bad_inputs_wrapper(change, match):
    h, seg_ids, seg_kinds = _inputs()
    args = dict(h=h, seg_ids=seg_ids, seg_kinds=seg_kinds, beta=0.9, gamma=0.05) | change
    with pytest.raises(ValueError, match=match):
        ops.step_momentum(**args)
    if "h" not in change:
        with pytest.raises(ValueError, match=match):
            ops.step_momentum_decode_(state=ops.new_momentum_state(1, 4), **args)


@pytest.mark.parametrize("which,value", [
    ("momentum", torch.zeros(1, 5)), ("momentum", torch.zeros(1, 4, dtype=torch.float64)),
    ("step_sum", torch.zeros(2, 4)), ("counters", torch.zeros(1, 3, dtype=torch.int32)),
    ("counters", torch.zeros(1, 2, dtype=torch.long)),
])
def test_bad_state(which, value):
    h, seg_ids, seg_kinds = _inputs()
    state = dict(zip(("momentum", "step_sum", "counters"), ops.new_momentum_state(1, 4)))
    state[which] = value
    with pytest.raises(ValueError, match=f"state {which}"):
        ops.step_momentum_decode_(h, seg_ids, seg_kinds, tuple(state.values()))
    with pytest.raises(RuntimeError, match=f"state {which}"):
        torch.ops.stepflow.step_momentum_decode_(h, seg_ids, seg_kinds, *state.values(), 0.9, 0.05)


def test_decode_going_back_before_state_raises():
    h, seg_ids, seg_kinds = _inputs()
    state = ops.new_momentum_state(1, 4)
    ops.step_momentum_decode_(h[:, :3], seg_ids[:, :3], seg_kinds, state)  # now in segment 1
    snapshot = [x.clone() for x in state]
    with pytest.raises(ValueError, match="must not decrease"):
        ops.step_momentum_decode_(h[:, :1], seg_ids[:, :1], seg_kinds, state)
    for x, y in zip(state, snapshot):  # a rejected chunk leaves the state as it was
        assert torch.equal(x, y)
    with pytest.raises(RuntimeError, match="must not decrease"):
        torch.ops.stepflow.step_momentum_decode_(h[:, :1], seg_ids[:, :1], seg_kinds, *state, 0.9, 0.05)
    bad = (state[0], state[1], torch.tensor([[1, 3, -2]]))
    with pytest.raises(RuntimeError, match="not a valid"):
        torch.ops.stepflow.step_momentum_decode_(h[:, 3:], seg_ids[:, 3:], seg_kinds, *bad, 0.9, 0.05)
    # the state says segment 1 is a step in progress, but these kinds call it a summary
    with pytest.raises(RuntimeError, match="not a step"):
        torch.ops.stepflow.step_momentum_decode_(h[:, 3:4], seg_ids[:, 3:4], torch.tensor([[Q, M, M]]), *state,
                                                 0.9, 0.05)


@pytest.mark.parametrize("args,match", [
    (lambda h, s, k: (h[0], s, k, 0.9, 0.05), "3-D"),
    (lambda h, s, k: (h.long(), s, k, 0.9, 0.05), "float32"),
    (lambda h, s, k: (h, s.int(), k, 0.9, 0.05), "int64"),
    (lambda h, s, k: (h, s[:, :4], k, 0.9, 0.05), r"\(B, T\)"),
    (lambda h, s, k: (h, s + 1, k, 0.9, 0.05), "only 3 segments"),
    (lambda h, s, k: (h, s - 2, k, 0.9, 0.05), ">= -1"),
    (lambda h, s, k: (h, s.flip(1), k, 0.9, 0.05), "must not decrease"),
    (lambda h, s, k: (h, s, k + 1, 0.9, 0.05), "seg_kinds must hold"),
    (lambda h, s, k: (h, s, k, 1.0, 0.05), "beta"),
    (lambda h, s, k: (h, s, k, 0.9, -0.5), "gamma"),
    (lambda h, s, k: (h, s, k, 0.9, float("nan")), "gamma"),
])
def test_bad_inputs_direct(args, match):
    h, seg_ids, seg_kinds = _inputs()
    with pytest.raises(RuntimeError, match=match):
        torch.ops.stepflow.step_momentum(*args(h, seg_ids, seg_kinds))
    h2, s2, k2, beta, gamma = args(h, seg_ids, seg_kinds)
    if h2.dim() == 3:
        with pytest.raises(RuntimeError, match=match):
            torch.ops.stepflow.step_momentum_decode_(h2, s2, k2, *ops.new_momentum_state(1, h2.shape[-1]),
                                                     beta, gamma)
