"""stepflow::oeb_attention (CPU) against the float64 reference of design.md 2.3.

The reference materializes A and rebalances it literally; its autograd is the oracle for the
backward (docs/method.md section 3.1). Inputs are fresh random tensors per run (`seed`).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import random_seg_ids, tolerances

from stepflow_ext import ops, reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_case(batch, heads, kv_heads, tq, tk, dim, dtype, sharp=2.0, full_pad_row=False, device="cpu"):
    """Random q, k, v (rounded to dtype) and seg_start / kv_start from a random segmentation.

    The segmentation covers all Tk keys (as a prefill would); a decode / chunked call takes
    the last Tq queries. `sharp` scales q so that many rows are locked (p_C > p_X).
    full_pad_row makes the last batch row all padding but its last key, so some queries of a
    chunk see no key at all. Drawn on the CPU (the same numbers for every device), then moved to `device`.
    """
    seg_ids, seg_kinds, _ = random_seg_ids(batch, tk)
    if full_pad_row and batch > 1:
        seg_ids[-1, :-1] = -1
        seg_ids[-1, -1] = 1
    seg_start = reference.seg_start_from_seg_ids(seg_ids, seg_kinds)[:, tk - tq:].contiguous()
    kv_start = (seg_ids < 0).sum(dim=1)
    q = sharp * torch.randn(batch, heads, tq, dim, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, tk, dim, dtype=torch.float64)
    v = torch.randn(batch, kv_heads, tk, dim, dtype=torch.float64)
    # Queries lean towards the keys of the last segment (a direction u shared by both), so
    # rows are locked in decode and chunked cases too, not only by chance.
    u = torch.randn(dim, dtype=torch.float64)
    u = u * (2.0 * dim) ** 0.5 / u.norm()
    q += u
    for b in range(batch):
        start = int(seg_start[b, -1]) if tq else -1
        if start >= 0:
            k[b, :, start:] += u
    return tuple(x.to(dtype).to(device) for x in (q, k, v)) + (seg_start.to(device), kv_start.to(device))


def ref64(q, k, v, seg_start, kv_start, strength, num_sink, scale):
    return reference.oeb_attention(q.double(), k.double(), v.double(), seg_start, kv_start, strength,
                                   num_sink, scale)


def locked_rows(stats):
    stats = stats.detach()
    return int(((stats[..., 1] > 0) & (stats[..., 0] > stats[..., 1])).sum())

def locked_case(min_locked, scale, *args, **kwargs):
    """make_case(*args, **kwargs), drawn again (up to 20 times) until more than `min_locked` rows are
    locked at this scale: a random segmentation now and then leaves little earlier context."""
    for _ in range(20):
        case = make_case(*args, **kwargs)
        q, k, v, seg_start, kv_start = case
        stats = reference.oeb_attention(q.double().cpu(), k.double().cpu(), v.double().cpu(), seg_start.cpu(),
                                        kv_start.cpu(), 0.0, 1, scale)[2]
        if locked_rows(stats) > min_locked:
            return case
    raise AssertionError(f"no case with more than {min_locked} locked rows in 20 draws")


def assert_close(actual, expected, dtype, what, scale_by_max=False):
    atol, rtol = tolerances(dtype)
    if scale_by_max:  # gradients: absolute error relative to the largest entry
        atol = atol * max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(actual.double(), expected, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


# (batch, heads, kv_heads, tq, tk, dim, num_sink, strength): prefill (Tq = Tk), decode and chunked.
FORWARD_CASES = [
    pytest.param(3, 4, 2, 37, 37, 16, 1, 0.5, id="prefill-gqa-T37"),
    pytest.param(2, 2, 2, 70, 70, 8, 4, 1.0, id="prefill-T70-sink4"),
    pytest.param(2, 3, 1, 1, 1, 8, 1, 1.0, id="prefill-T1"),
    pytest.param(3, 4, 2, 1, 45, 16, 0, 0.5, id="decode-Tk45-sink0"),
    pytest.param(2, 6, 3, 3, 67, 8, 1, 1.0, id="chunk3-Tk67"),
    pytest.param(3, 2, 1, 5, 9, 4, 4, 0.5, id="chunk5-Tk9-sink4"),
]


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("batch,heads,kv_heads,tq,tk,dim,num_sink,strength", FORWARD_CASES)
def test_forward_matches_reference(seed, batch, heads, kv_heads, tq, tk, dim, num_sink, strength, dtype):
    q, k, v, seg_start, kv_start = make_case(batch, heads, kv_heads, tq, tk, dim, dtype,
                                             full_pad_row=(tq > 1 and tq < tk))
    scale = dim ** -0.5
    out, lse, stats = ops.oeb_attention(q, k, v, seg_start, kv_start, strength, num_sink, scale)
    ref_out, ref_lse, ref_stats = ref64(q, k, v, seg_start, kv_start, strength, num_sink, scale)
    assert out.dtype == dtype and lse.dtype == torch.float32 and stats.dtype == torch.float32
    assert out.shape == q.shape and lse.shape == q.shape[:3] and stats.shape == (*q.shape[:3], 2)
    assert_close(out, ref_out, dtype, "out")
    # lse and stats come from fp32 (fp64 for fp64 input) accumulation of the rounded inputs
    # and are stored as fp32 whatever the input dtype.
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), empty) and bool((lse[empty] < 0).all())
    torch.testing.assert_close(lse[~empty].double(), ref_lse[~empty], atol=5e-5, rtol=2e-5)
    torch.testing.assert_close(stats.double(), ref_stats, atol=2e-5, rtol=2e-5)
    assert bool((out[empty] == 0).all()) and bool((stats[empty] == 0).all())


def test_forward_exercises_rebalance(seed):
    """The cases above do rebalance: many rows are locked and strength changes the output."""
    q, k, v, seg_start, kv_start = locked_case(20, 0.25, 3, 4, 2, 37, 37, 16, torch.float32)
    base, _, stats = ops.oeb_attention(q, k, v, seg_start, kv_start, 0.0, 1, 0.25)
    strong, _, _ = ops.oeb_attention(q, k, v, seg_start, kv_start, 1.0, 1, 0.25)
    assert locked_rows(stats) > 20
    assert float((strong - base).abs().max()) > 0.05


def sdpa_causal(q, k, v, kv_start, scale):
    """Plain causal attention with left padding, through torch SDPA (fp64)."""
    tq, tk = q.shape[2], k.shape[2]
    valid = torch.arange(tk)[None, :] >= kv_start[:, None]
    mask = reference.causal_valid_mask(valid, tq)[:, None]
    rep = q.shape[1] // k.shape[1]
    out = F.scaled_dot_product_attention(q.double(), k.double().repeat_interleave(rep, 1),
                                         v.double().repeat_interleave(rep, 1), attn_mask=mask, scale=scale)
    return out, mask.any(-1)


@pytest.mark.parametrize("strength,no_rebalance", [(0.0, False), (1.0, True)], ids=["strength0", "seg-1-rows"])
@pytest.mark.parametrize("tq,tk", [(41, 41), (3, 29)], ids=["prefill", "chunk"])
def test_plain_causal_attention(seed, strength, no_rebalance, tq, tk):
    """strength 0, or seg_start = -1 everywhere (even at strength 1), is plain causal attention."""
    q, k, v, seg_start, kv_start = make_case(2, 4, 2, tq, tk, 16, torch.float32)
    if no_rebalance:
        seg_start = torch.full_like(seg_start, -1)
    out, _, stats = ops.oeb_attention(q, k, v, seg_start, kv_start, strength, 1, 0.25)
    expected, has_key = sdpa_causal(q, k, v, kv_start, 0.25)
    rows = has_key.expand(-1, q.shape[1], -1)
    assert_close(out[rows], expected[rows], torch.float32, "out")
    assert bool((out[~rows] == 0).all())
    if no_rebalance:
        assert bool((stats == 0).all())


@pytest.mark.parametrize("num_sink", [0, 1, 4])
def test_one_token_step_decode(seed, num_sink):
    """Decode where the new token opens a step (C = itself) or continues one; sinks vary."""
    q, k, v, _, _ = make_case(3, 4, 2, 1, 30, 8, torch.float32)
    seg_start = torch.tensor([[29], [20], [-1]])
    kv_start = torch.tensor([0, 3, 28])
    out, _, stats = ops.oeb_attention(q, k, v, seg_start, kv_start, 0.7, num_sink, 0.35)
    ref_out, _, ref_stats = ref64(q, k, v, seg_start, kv_start, 0.7, num_sink, 0.35)
    assert_close(out, ref_out, torch.float32, "out")
    torch.testing.assert_close(stats.double(), ref_stats, atol=2e-5, rtol=2e-5)


def test_underflowing_context_mass(seed):
    """p_X far below float range: r_X is astronomically large but A' = exp(s - lse + log r) is fine.

    X's scores sit ~150 below C's, so exp underflows in fp32; at strength 1 the reference
    (float64) still moves half of the mass to X, and so must the fp32 kernel.
    """
    tk, dim = 12, 4
    q = torch.zeros(1, 1, tk, dim)
    q[..., 0] = 1.0
    k = 0.1 * torch.randn(1, 1, tk, dim)
    k[0, 0, :6, 0] = -75.0  # context (and sink) keys
    k[0, 0, 6:, 0] = 75.0   # current step
    v = torch.randn(1, 1, tk, dim)
    seg_start = torch.tensor([[-1] * 6 + [6] * 6])
    kv_start = torch.tensor([0])
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    out, _, stats = ops.oeb_attention(q, k, v, seg_start, kv_start, 1.0, 1, 1.0)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref_out, _, ref_stats = reference.oeb_attention(q64, k64, v64, seg_start, kv_start, 1.0, 1, 1.0)
    assert locked_rows(ref_stats) == 6 and float(ref_stats[..., 1].detach().max()) < 1e-40
    assert_close(out, ref_out, torch.float32, "out")
    grad = torch.randn_like(ref_out)
    got = torch.autograd.grad(out, (q, k, v), grad.float())
    want = torch.autograd.grad(ref_out, (q64, k64, v64), grad)
    for name, a, b in zip("qkv", got, want):
        assert_close(a, b, torch.float32, f"d{name}", scale_by_max=True)


def test_non_contiguous_inputs(seed):
    """HF hands q, k, v over as transposes of (B, T, H, d): results must not depend on strides."""
    q, k, v, seg_start, kv_start = make_case(2, 4, 2, 19, 19, 8, torch.float32)
    qt, kt, vt = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    assert not qt.is_contiguous()
    seg_nc = torch.stack([seg_start, seg_start], dim=-1)[..., 0]
    for got, want in zip(ops.oeb_attention(qt, kt, vt, seg_nc, kv_start, 0.5, 1, 0.3),
                         ops.oeb_attention(q, k, v, seg_start, kv_start, 0.5, 1, 0.3)):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


# ----------------------------------------------------------------------------------- backward

BACKWARD_CASES = [
    pytest.param(3, 4, 2, 37, 37, 16, 1, 0.5, id="prefill-gqa-T37"),
    pytest.param(2, 2, 1, 70, 70, 8, 4, 1.0, id="prefill-T70-sink4"),
    pytest.param(2, 4, 2, 1, 45, 8, 0, 1.0, id="decode-Tk45-sink0"),
    pytest.param(3, 2, 2, 3, 67, 8, 1, 0.3, id="chunk3-Tk67"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,heads,kv_heads,tq,tk,dim,num_sink,strength", BACKWARD_CASES)
def test_backward_matches_reference(seed, batch, heads, kv_heads, tq, tk, dim, num_sink, strength, dtype):
    scale = dim ** -0.5
    for _ in range(20):  # a draw where some row is locked, so the rebalance terms are tested
        q, k, v, seg_start, kv_start = make_case(batch, heads, kv_heads, tq, tk, dim, dtype,
                                                 full_pad_row=(tq > 1 and tq < tk))
        if locked_rows(ref64(q, k, v, seg_start, kv_start, strength, num_sink, scale)[2]) > 0:
            break
    grad_out = torch.randn(q.shape, dtype=torch.float64).to(dtype)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, _, _ = ops.oeb_attention(*leaves, seg_start, kv_start, strength, num_sink, scale)
    got = torch.autograd.grad(out, leaves, grad_out)
    leaves64 = [x.double().requires_grad_() for x in (q, k, v)]
    ref_out, _, ref_stats = reference.oeb_attention(*leaves64, seg_start, kv_start, strength, num_sink, scale)
    want = torch.autograd.grad(ref_out, leaves64, grad_out.double())
    assert locked_rows(ref_stats) > 0
    # bf16 / fp16: the kernel accumulates in fp32 but rounds dq, dk, dv to the input dtype;
    # dk, dv sum over up to Tq * H / H_kv terms, so compare relative to the largest entry.
    for name, a, b in zip("qkv", got, want):
        assert a.dtype == dtype and a.shape == b.shape
        assert_close(a, b, dtype, f"d{name}", scale_by_max=True)


def test_backward_float64_exact(seed):
    """In float64 the kernel's backward equals autograd through the reference to ~1e-12."""
    for _ in range(20):  # a random segmentation may leave no earlier context (one step after a 1-token question)
        q, k, v, seg_start, kv_start = make_case(2, 4, 2, 33, 33, 8, torch.float64, full_pad_row=True)
        ref_stats = reference.oeb_attention(q, k, v, seg_start, kv_start, 0.8, 1, 0.3)[2]
        if locked_rows(ref_stats) > 10:
            break
    assert locked_rows(ref_stats) > 10, "no case with locked rows in 20 draws"
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, _, _ = ops.oeb_attention(*leaves, seg_start, kv_start, 0.8, 1, 0.3)
    leaves64 = [x.clone().requires_grad_() for x in (q, k, v)]
    ref_out = reference.oeb_attention(*leaves64, seg_start, kv_start, 0.8, 1, 0.3)[0]
    grad_out = torch.randn_like(ref_out)
    got = torch.autograd.grad(out, leaves, grad_out)
    want = torch.autograd.grad(ref_out, leaves64, grad_out)
    for name, a, b in zip("qkv", got, want):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-9, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("tq,tk", [(6, 6), (2, 7)], ids=["prefill", "chunk"])
def test_gradcheck_float64(seed, tq, tk):
    q, k, v, seg_start, kv_start = make_case(2, 2, 1, tq, tk, 3, torch.float64, sharp=1.5)
    q, k, v = (x.requires_grad_() for x in (q, k, v))

    def fn(q, k, v):
        return ops.oeb_attention(q, k, v, seg_start, kv_start, 0.6, 1, 0.8)[0]

    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_only_out_is_differentiable(seed):
    q, k, v, seg_start, kv_start = make_case(1, 2, 1, 5, 5, 4, torch.float32)
    q.requires_grad_()
    out, lse, stats = ops.oeb_attention(q, k, v, seg_start, kv_start, 0.5, 1, 0.5)
    assert out.requires_grad and not lse.requires_grad and not stats.requires_grad
    (dq,) = torch.autograd.grad(out.sum() + lse.sum(), q)  # lse contributes nothing
    (dq_out,) = torch.autograd.grad(ops.oeb_attention(q, k, v, seg_start, kv_start, 0.5, 1, 0.5)[0].sum(), q)
    torch.testing.assert_close(dq, dq_out)


# ---------------------------------------------------------------------------------- opcheck


@pytest.mark.parametrize("tq,tk", [(9, 9), (2, 11)], ids=["prefill", "chunk"])
def test_opcheck_forward(seed, tq, tk):
    q, k, v, seg_start, kv_start = make_case(2, 4, 2, tq, tk, 8, torch.float32)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    torch.library.opcheck(torch.ops.stepflow.oeb_attention.default, (q, k, v, seg_start, kv_start, 0.5, 1, 0.35))


def test_opcheck_backward(seed):
    q, k, v, seg_start, kv_start = make_case(2, 4, 2, 9, 9, 8, torch.float32)
    out, lse, stats = ops.oeb_attention(q, k, v, seg_start, kv_start, 0.5, 1, 0.35)
    args = (torch.randn_like(out), q, k, v, lse, stats, seg_start, kv_start, 0.5, 1, 0.35)
    torch.library.opcheck(torch.ops.stepflow.oeb_attention_backward.default, args)


# ------------------------------------------------------------------------------- bad inputs


def _good():
    q, k, v, seg_start, kv_start = make_case(2, 4, 2, 6, 6, 8, torch.float32)
    return dict(q=q, k=k, v=v, seg_start=seg_start, kv_start=kv_start, strength=0.5, num_sink=1, scale=0.3)


@pytest.mark.parametrize("change,match", [
    (dict(strength=-0.1), "strength"),
    (dict(strength=1.5), "strength"),
    (dict(seg_start=torch.tensor([[0, 0, 0, 5, 3, 3], [-1] * 6])), "seg_start"),
    (dict(seg_start=torch.full((2, 6), -2)), "seg_start"),
    (dict(kv_start=torch.tensor([-1, 0])), "kv_start"),
    (dict(kv_start=torch.tensor([0, 7])), "kv_start"),
    (dict(q=torch.randn(2, 4, 7, 8), seg_start=torch.full((2, 7), -1)), "outnumber"),
    (dict(q=torch.randn(2, 3, 6, 8)), "heads"),
    (dict(num_sink=-1), "num_sink"),
    (dict(seg_start=torch.zeros(2, 5, dtype=torch.long)), "seg_start"),
], ids=["strength<0", "strength>1", "seg_after_query", "seg<-1", "kv<0", "kv>Tk", "Tq>Tk", "heads", "num_sink",
        "seg_shape"])
def test_bad_input_value_error(change, match):
    args = _good()
    args.update(change)
    with pytest.raises(ValueError, match=match):
        ops.oeb_attention(**args)


@pytest.mark.parametrize("change,match", [
    (dict(strength=2.0), "strength"),
    (dict(seg_start=torch.tensor([[0, 0, 0, 5, 3, 3], [-1] * 6])), "seg_start"),
    (dict(kv_start=torch.tensor([-1, 0])), "kv_start"),
    (dict(seg_start=torch.full((2, 6), -1, dtype=torch.int32)), "seg_start"),
    (dict(q=torch.randn(2, 3, 6, 8)), "heads"),
    (dict(q=torch.randn(2, 4, 7, 8), seg_start=torch.full((2, 7), -1)), "tokens"),
    (dict(k=torch.randn(2, 2, 6, 4)), "shape"),
], ids=["strength", "seg_after_query", "kv<0", "seg_int32", "heads", "Tq>Tk", "kv_shape"])
def test_bad_input_runtime_error(change, match):
    args = _good()
    args.update(change)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.stepflow.oeb_attention(*args.values())


def test_backward_bad_input_runtime_error():
    args = _good()
    out, lse, stats = torch.ops.stepflow.oeb_attention(*args.values())
    rest = list(args.values())
    with pytest.raises(RuntimeError, match="lse"):
        torch.ops.stepflow.oeb_attention_backward(out, *rest[:3], lse[:, :1], stats, *rest[3:])
    with pytest.raises(RuntimeError, match="grad_out"):
        torch.ops.stepflow.oeb_attention_backward(out[:, :, :2], *rest[:3], lse, stats, *rest[3:])
