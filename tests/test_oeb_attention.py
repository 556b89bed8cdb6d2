"""stepflow::oeb_attention (CPU) against the float64 reference of design.md 2.3.

The reference (stepflow_ext/reference.py) materializes A and applies the rule literally; its
autograd is the oracle for the backward (docs/method_oeb.md). Inputs are fresh random tensors per
run (`seed`). What is checked:
- forward (out, lse, stats) of both rules on prefill, decode and chunked shapes, GQA, head dims 1
  to 128, left padding and rows without keys, sinks (incl. large logits) and sliding windows, in
  fp64 (to ~1e-12), fp32, fp16 and bf16 (conftest.tolerances; and for fp16 / bf16 the
  flash-attention rule: error at most 2x the error of PyTorch's own computation in that dtype);
- the group geometry of bounds (empty and one-token groups, rows not intervened, windows smaller
  than, crossing and larger than the groups) against softmaxes over explicit key ranges;
- the bridge rule itself: its decision row by row, the bridge mass it ends at (design.md 2.3's
  numbers with the paper's eps), the eps clamps, and agreement with the channel-literal form
  reference.oeb_bridge_attention on reference.oeb_bounds;
- backward (dq, dk, dv and the sink gradient) against autograd through the reference, gradcheck,
  opcheck of both ops with non-contiguous inputs, and every argument check.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from conftest import random_seg_ids, tolerances

from stepflow_ext import ops, reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
RULES = ["bridge", "odds"]
EPS = ops.OEB_EPS


# ------------------------------------------------------------------------------------ cases


@dataclass
class Case:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    kv_start: torch.Tensor   # (B,) first valid key (left padding)
    bounds: torch.Tensor     # (B, Tq, 2) of the rule, from reference.oeb_bounds of the segmentation
    seg_ids: torch.Tensor    # (B, Tk) the prefill segmentation the bounds come from
    seg_kinds: torch.Tensor

    @property
    def args(self):
        return self.q, self.k, self.v, self.kv_start, self.bounds

    @property
    def channel(self):
        return reference.channel_of_tokens(self.seg_ids, self.seg_kinds)


def draw(batch, heads, kv_heads, tq, tk, dim, dtype=torch.float32, *, rule="bridge", num_sink=1, sharp=2.0,
         gap=0.0, full_pad_row=False, device="cpu"):
    """A random case: q, k, v rounded to dtype, a random segmentation of all Tk keys (question,
    steps with empty and one-token ones, maybe a summary; rows left-padded to random lengths) and
    the bounds of `rule` for the last Tq queries (decode / chunked prefill take the tail).

    q leans along a direction u (sharp rows); `gap` lowers the question keys' logits by about
    `gap`, so thinking rows put little mass on their bridge (the bridge rule triggers); for the
    odds rule the keys of the last query's step lean along u too (its rows lock). full_pad_row
    makes the last batch row padding but its last key, so some queries of a chunk see no key.
    Drawn on the CPU (the same numbers for every device), then moved to `device`.
    """
    seg_ids, seg_kinds, _ = random_seg_ids(batch, tk)
    if full_pad_row and batch > 1:
        seg_ids[-1, :-1] = -1
        seg_ids[-1, -1] = 1
    bounds = reference.oeb_bounds(seg_ids, seg_kinds, rule=rule, num_sink=num_sink)[:, tk - tq:].contiguous()
    kv_start = (seg_ids < 0).sum(dim=1)
    q = sharp * torch.randn(batch, heads, tq, dim, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, tk, dim, dtype=torch.float64)
    v = torch.randn(batch, kv_heads, tk, dim, dtype=torch.float64)
    u = torch.randn(dim, dtype=torch.float64)
    u = u * (2.0 * dim) ** 0.5 / u.norm()
    q += u
    scale = dim ** -0.5
    question = reference.channel_of_tokens(seg_ids, seg_kinds) == reference.QUESTION
    k -= question[:, None, :, None] * (gap / (scale * float(u @ u))) * u
    if rule == "odds" and tq:
        for b in range(batch):
            start = int(bounds[b, -1, 1])
            if start >= 0:
                k[b, :, start:] += u
    case = Case(*(x.to(dtype) for x in (q, k, v)), kv_start, bounds, seg_ids, seg_kinds)
    if device != "cpu":
        case = Case(*(x.to(device) for x in (case.q, case.k, case.v, case.kv_start, case.bounds)), seg_ids, seg_kinds)
    return case


def make_case(batch, heads, kv_heads, tq, tk, dim, dtype, sharp=2.0, full_pad_row=False, device="cpu", **kwargs):
    """(q, k, v, kv_start, bounds) of draw(): the op's first five arguments (used by test_cuda_oeb)."""
    return draw(batch, heads, kv_heads, tq, tk, dim, dtype, sharp=sharp, full_pad_row=full_pad_row, device=device,
                **kwargs).args


def locked_rows(stats):
    """The number of (batch, head, query) rows the rule changed (stats[..., 4])."""
    return int(stats.detach()[..., 4].sum())


def locked_case(min_locked, scale, *args, rule="bridge", **kwargs):
    """make_case(*args, **kwargs), drawn again (up to 20 times) until more than `min_locked` rows
    are changed by `rule` at this scale: a random segmentation now and then leaves no bridge."""
    for _ in range(20):
        case = make_case(*args, rule=rule, **kwargs)
        q, k, v, kv_start, bounds = case
        stats = reference.oeb_attention(q.double().cpu(), k.double().cpu(), v.double().cpu(), kv_start.cpu(),
                                        bounds.cpu(), rule, 0.0, scale=scale)[2]
        if locked_rows(stats) > min_locked:
            return case
    raise AssertionError(f"no case with more than {min_locked} changed rows in 20 draws")


def make_sink(heads, kind, dtype=torch.float64):
    """Per-head sink logits: None, "normal" (std 2) or "large" (heads alternate around +-25:
    the sink takes almost all or almost none of the row)."""
    if kind is None:
        return None
    if kind == "normal":
        return (2 * torch.randn(heads, dtype=torch.float64)).to(dtype)
    signs = torch.tensor([1.0 if h % 2 == 0 else -1.0 for h in range(heads)], dtype=torch.float64)
    return (signs * (25 + 5 * torch.rand(heads, dtype=torch.float64))).to(dtype)


def rule_kwargs(rule, strength=0.5, tau_max=0.15, eps=EPS, sink=None, window=None, scale=None):
    """Keyword arguments shared by ops.oeb_attention and reference.oeb_attention (sink only if given)."""
    kw = dict(rule=rule, strength=strength, tau_max=tau_max, eps=eps, window=window, scale=scale)
    return kw if sink is None else dict(kw, sink=sink)


def ref64(case_args, **kw):
    q, k, v, kv_start, bounds = case_args
    if kw.get("sink") is not None:
        kw = dict(kw, sink=kw["sink"].double())
    return reference.oeb_attention(q.double(), k.double(), v.double(), kv_start, bounds, **kw)


def group_counts(kv_start, bounds, tq, tk, window):
    """(n_0, n_1, n_2), each (B, Tq): the key counts of the groups, from reference.oeb_groups."""
    _, g0, g1, g2 = reference.oeb_groups(kv_start, bounds, tq, tk, window)
    return g0.sum(-1), g1.sum(-1), g2.sum(-1)


def decision_margin(stats, counts, rule, tau_max, eps):
    """(B, H, Tq): how far (in mass) each row is from a point where the rule switches on or off:
    bridge p_B = tau_B, 1 - p_O = eps, p_S = eps; odds p_C = p_X."""
    p0, p1, p2 = (stats[..., g].double() for g in range(3))
    n1, n2 = (c[:, None].double().expand_as(p0) for c in counts[1:])
    never = torch.full_like(p0, float("inf"))  # rows whose groups rule the change out
    if rule == "odds":
        return torch.where(n1 > 0, (p2 - p1).abs(), never)
    tau = torch.clamp(torch.sqrt(n1 / (n1 + n2 + eps)), max=tau_max)
    margin = torch.minimum(torch.minimum((p1 - tau).abs(), (1 - p0 - eps).abs()), (p2 - eps).abs())
    return torch.where((n1 > 0) & (n2 > 0), margin, never)


def assert_same_decisions(stats, ref_stats, margin, tol):
    """stats[..., 4] (active) equals the reference's on every row farther than tol from a switch."""
    differ = stats[..., 4].double() != ref_stats[..., 4]
    bad = differ & (margin > tol)
    assert not bool(bad.any()), f"active differs from the reference on {int(bad.sum())} decisive rows"


def assert_close(actual, expected, dtype, what, scale_by_max=False):
    atol, rtol = tolerances(dtype)
    if scale_by_max:  # gradients: absolute error relative to the largest entry
        atol = atol * max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


# ----------------------------------------------------------------------------------- forward

# (batch, heads, kv_heads, tq, tk, dim, sink, window, num_sink, strength, tau_max): prefill (Tq = Tk,
# one and two query blocks of 64), T = 1, decode and chunked prefill; GQA ratios 1, 2, 6; head dims 1
# to 128; sinks (normal and large); windows smaller than and crossing the groups.
FORWARD_CASES = [
    pytest.param(3, 4, 2, 37, 37, 16, None, None, 1, 0.5, 0.15, id="prefill-gqa2-T37-d16"),
    pytest.param(2, 2, 2, 70, 70, 8, "normal", None, 4, 1.0, 0.5, id="prefill-mha-T70-d8-sink"),
    pytest.param(2, 3, 1, 1, 1, 8, "normal", None, 1, 1.0, 0.15, id="prefill-T1"),
    pytest.param(2, 6, 1, 23, 23, 128, None, 7, 0, 0.7, 0.15, id="prefill-gqa6-T23-d128-win7"),
    pytest.param(3, 12, 2, 1, 45, 128, "large", None, 0, 0.5, 0.15, id="decode-gqa6-Tk45-d128-bigsink"),
    pytest.param(2, 6, 3, 3, 67, 1, "normal", 20, 1, 1.0, 1.0, id="chunk3-gqa2-Tk67-d1-win20"),
    pytest.param(3, 2, 2, 5, 9, 4, None, 3, 4, 0.5, 0.15, id="chunk5-Tk9-d4-win3"),
]


@pytest.mark.parametrize("dtype", [torch.float64] + DTYPES, ids=str)
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("batch,heads,kv_heads,tq,tk,dim,sink,window,num_sink,strength,tau_max", FORWARD_CASES)
def test_forward_matches_reference(seed, batch, heads, kv_heads, tq, tk, dim, sink, window, num_sink, strength,
                                   tau_max, rule, dtype):
    case = draw(batch, heads, kv_heads, tq, tk, dim, dtype, rule=rule, num_sink=num_sink,
                full_pad_row=batch > 1 and tq > 1)
    sink = make_sink(heads, sink)
    kw = rule_kwargs(rule, strength, tau_max, sink=sink, window=window, scale=0.9 * dim ** -0.5)
    out, lse, stats = ops.oeb_attention(*case.args, **kw)
    ref_out, ref_lse, ref_stats = ref64(case.args, **kw)
    assert out.dtype == dtype and lse.dtype == torch.float32 and stats.dtype == torch.float32
    assert out.shape == case.q.shape and lse.shape == case.q.shape[:3] and stats.shape == (*case.q.shape[:3], 5)
    if dtype == torch.float64:
        torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=1e-10)
    else:
        assert_close(out, ref_out, dtype, "out")
    # lse and stats come from fp32 (fp64 for fp64 input) accumulation of the rounded inputs and are
    # stored as fp32 whatever the input dtype.
    fine = dtype == torch.float64
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), empty) and bool((lse[empty] < 0).all())
    torch.testing.assert_close(lse[~empty].double(), ref_lse[~empty], atol=1e-6 if fine else 5e-5,
                               rtol=2e-7 if fine else 2e-5)
    torch.testing.assert_close(stats.double(), ref_stats, atol=1e-7 if fine else 2e-5, rtol=2e-7 if fine else 2e-5)
    assert bool((out[empty] == 0).all()) and bool((stats[empty] == 0).all())
    margin = decision_margin(ref_stats, group_counts(case.kv_start, case.bounds, tq, tk, window), rule, tau_max, EPS)
    assert_same_decisions(stats, ref_stats, margin, 1e-12 if fine else 1e-4)
    if dtype in (torch.float16, torch.bfloat16):
        # Flash-attention's rule: at most 2x the error of PyTorch computing the same thing in dtype.
        # (Rows where PyTorch's fp16 odds ratio overflows are left out: they have no PyTorch error.)
        pt_out = reference.oeb_attention(*case.args, **dict(kw, sink=None if sink is None else sink.to(dtype)))[0]
        rows = torch.isfinite(pt_out).all(-1)
        pt_err = float((pt_out.double() - ref_out)[rows].abs().max())
        err = float((out.double() - ref_out)[rows].abs().max())
        assert err <= 2 * pt_err + 1e-6, f"kernel error {err} > 2 x PyTorch's {dtype} error {pt_err}"


def test_forward_default_scale_and_int32_indices(seed):
    """scale=None is d^-1/2; int32 kv_start / bounds are accepted by the wrapper."""
    case = draw(2, 4, 2, 19, 19, 16, torch.float64, gap=2.0)
    out, lse, stats = ops.oeb_attention(case.q, case.k, case.v, case.kv_start.int(), case.bounds.int())
    ref_out, ref_lse, ref_stats = ref64(case.args, **rule_kwargs("bridge", scale=0.25))
    torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(stats.double(), ref_stats, atol=1e-7, rtol=2e-7)


def test_forward_both_outcomes_occur(seed):
    """The random cases are not vacuous: in a bridge case many intervened rows trigger and many do
    not; rows that trigger move by far more than any tolerance, the others not at all; the odds
    rule locks rows and its strength changes the output."""
    case = draw(3, 4, 2, 60, 60, 16, torch.float64)
    ch = case.channel[:, None].expand(-1, 4, -1)
    out, _, stats = ops.oeb_attention(*case.args, rule="bridge")
    plain = ops.oeb_attention(*case.args[:4], torch.full_like(case.bounds, -1), rule="bridge")[0]
    active = stats[..., 4].bool()
    intervened = (ch == 1) | (ch == 2)
    assert not bool(active[~intervened].any())                 # question rows and padding never change
    if int(intervened.sum()) >= 40:
        assert 0 < int(active.sum()) < int(intervened.sum())   # both outcomes occur
    moved = (out - plain).abs().amax(-1)
    assert float(moved[~active].max()) < 1e-12
    if bool(active.any()):
        assert float(moved[active].max()) > 1e-2
    odds = locked_case(20, 0.25, 3, 4, 2, 37, 37, 16, torch.float32, rule="odds")
    _, _, stats = ops.oeb_attention(*odds, rule="odds", strength=0.0, scale=0.25)
    weak = ops.oeb_attention(*odds, rule="odds", strength=0.0, scale=0.25)[0]
    strong = ops.oeb_attention(*odds, rule="odds", strength=1.0, scale=0.25)[0]
    assert locked_rows(stats) > 20 and float((strong - weak).abs().max()) > 0.05


# ----------------------------------------------------------------------------- group geometry


def test_group_geometry_against_explicit_ranges(seed):
    """stats p_0, p_1, p_2 are softmax masses over [lo, a), [a, b), [b, p] with lo = max(kv_start,
    p - window + 1), written here from the op's docstring (not from reference.oeb_groups). Bounds
    with empty and one-token groups, a before kv_start, rows not intervened; windows smaller than,
    crossing and larger than the groups."""
    tk, dim, scale = 14, 4, 0.7
    q = torch.randn(1, 1, tk, dim, dtype=torch.float64)
    k, v = (torch.randn(1, 1, tk, dim, dtype=torch.float64) for _ in range(2))
    kv = 2
    pairs = [(-1, -1), (0, 0), (kv, kv), (3, 4), (4, 4), (3, 9), (5, 13)]  # clipped to each row below
    for window in (None, 1, 2, 5, 9, 100):
        for a, c in pairs:
            bounds = torch.full((1, tk, 2), -1, dtype=torch.long)
            for i in range(tk):
                if a >= 0:
                    bounds[0, i] = torch.tensor([min(a, i + 1), min(c, i + 1)])
            _, lse, stats = ops.oeb_attention(q, k, v, torch.tensor([kv]), bounds, rule="bridge", window=window,
                                              scale=scale)
            for i in range(tk):
                lo = kv if window is None else max(kv, i - window + 1)
                keys = list(range(lo, i + 1))
                if not keys:
                    assert math.isinf(float(lse[0, 0, i])) and bool((stats[0, 0, i] == 0).all())
                    continue
                s = scale * (k[0, 0, keys] @ q[0, 0, i])
                p = torch.softmax(s, 0)
                ai, ci = (int(x) for x in bounds[0, i])
                if ai < 0:
                    want = [1.0, 0.0, 0.0]
                else:
                    want = [float(sum(p[j - lo] for j in keys if j < ai)),
                            float(sum(p[j - lo] for j in keys if ai <= j < ci)),
                            float(sum(p[j - lo] for j in keys if j >= max(ai, ci)))]
                got = stats[0, 0, i, :3].double().tolist()
                assert got == pytest.approx(want, abs=1e-7), (window, a, c, i)
                assert float(lse[0, 0, i]) == pytest.approx(float(torch.logsumexp(s, 0)), rel=1e-6)


@pytest.mark.parametrize("rule", RULES)
def test_arbitrary_bounds_float64(seed, rule):
    """Any bounds the op accepts, with windows and sinks: the op equals the reference to ~1e-12,
    forward and backward (dq, dk, dv and the sink's gradient)."""
    b, h, h_kv, tq, tk, d = 3, 4, 2, 11, 29, 8
    q = 2 * torch.randn(b, h, tq, d, dtype=torch.float64)
    k, v = (torch.randn(b, h_kv, tk, d, dtype=torch.float64) for _ in range(2))
    kv_start = torch.tensor([0, 5, 27])
    end = torch.arange(tk - tq, tk) + 2                            # a, b in [0, p + 1]
    a = (torch.rand(b, tq) * end).long()
    c = a + (torch.rand(b, tq) * (end - a)).long()
    edge = torch.randint(0, 5, (b, tq))                           # empty / one-token groups often
    a = torch.where(edge == 0, c, a)                              # B empty
    c = torch.where(edge == 1, torch.minimum(a + 1, end - 1), c)  # B of one token
    c = torch.where(edge == 2, end - 1, c)                        # S empty (b = p + 1)
    bounds = torch.stack([a, c], -1)
    bounds[torch.rand(b, tq) < 0.15] = -1                         # rows not intervened
    for window, sink in ((None, None), (4, "normal"), (9, "large"), (40, "normal")):
        sink_t = make_sink(h, sink)
        kw = rule_kwargs(rule, 0.8, 0.6, eps=1e-3, window=window, scale=0.4)
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        sink_l = None if sink_t is None else sink_t.clone().requires_grad_()
        out, _, stats = ops.oeb_attention(*leaves, kv_start, bounds, sink=sink_l, **kw)
        leaves64 = [x.clone().requires_grad_() for x in (q, k, v)]
        sink64 = None if sink_t is None else sink_t.clone().requires_grad_()
        ref_out, _, ref_stats = reference.oeb_attention(*leaves64, kv_start, bounds, sink=sink64, **kw)
        torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(stats.double(), ref_stats, atol=1e-7, rtol=2e-7)
        grad = torch.randn_like(ref_out)
        got = torch.autograd.grad(out, leaves + ([sink_l] if sink_l is not None else []), grad)
        want = torch.autograd.grad(ref_out, leaves64 + ([sink64] if sink64 is not None else []), grad)
        for name, x, y in zip(("dq", "dk", "dv"), got, want):
            torch.testing.assert_close(x, y, atol=1e-11, rtol=1e-9, msg=lambda m: f"{name} {window}: {m}")
        if sink_l is not None:
            torch.testing.assert_close(got[3], want[3], atol=1e-11 * max(1.0, float(want[3].abs().max())),
                                       rtol=1e-9)
    assert locked_rows(ref_stats) > 0


# ------------------------------------------------------------------------ not intervened


def causal_softmax_attention(q, k, v, kv_start, scale, window=None, sink=None):
    """Plain attention with left padding, a window and a sink, written with torch.softmax (fp64)."""
    tq, tk, rep = q.shape[2], k.shape[2], q.shape[1] // k.shape[1]
    valid = torch.arange(tk)[None, :] >= kv_start[:, None]
    mask = reference.causal_valid_mask(valid, tq, window)[:, None]
    s = scale * q.double() @ k.double().repeat_interleave(rep, 1).transpose(-1, -2)
    s = s.masked_fill(~mask, float("-inf"))
    if sink is not None:
        s = torch.cat([s, sink.double().view(1, -1, 1, 1).expand(*s.shape[:3], 1)], -1)
    p = torch.nan_to_num(torch.softmax(s, -1), nan=0.0)[..., :tk]
    return p @ v.double().repeat_interleave(rep, 1), mask.any(-1)


@pytest.mark.parametrize("how", ["bounds-1", "odds-strength0", "bridge-no-bridge"])
@pytest.mark.parametrize("tq,tk,window,sink", [(41, 41, None, None), (3, 29, None, "normal"), (41, 41, 6, "normal")],
                         ids=["prefill", "chunk-sink", "prefill-win6-sink"])
def test_not_intervened_is_plain_attention(seed, how, tq, tk, window, sink):
    """Bounds (-1, -1) (either rule), odds at strength 0, and bridge rows whose bridge group is
    empty are the model's own attention (torch SDPA where it applies, else a softmax with a sink)."""
    rule = "bridge" if how != "odds-strength0" else "odds"
    case = draw(2, 4, 2, tq, tk, 16, torch.float32, rule=rule)
    bounds = case.bounds
    if how == "bounds-1":
        bounds = torch.full_like(bounds, -1)
    elif how == "bridge-no-bridge":
        bounds = torch.where(bounds[..., :1] >= 0, bounds[..., 1:].expand_as(bounds), bounds)  # a = b
    sink_t = make_sink(4, sink, torch.float32)
    out, _, stats = ops.oeb_attention(case.q, case.k, case.v, case.kv_start, bounds, rule=rule, strength=0.0,
                                      sink=sink_t, window=window, scale=0.25)
    expected, has_key = causal_softmax_attention(case.q, case.k, case.v, case.kv_start, 0.25, window, sink_t)
    if sink is None and window is None:
        valid = torch.arange(tk)[None, :] >= case.kv_start[:, None]
        mask = reference.causal_valid_mask(valid, tq)[:, None]
        sdpa = F.scaled_dot_product_attention(case.q.double(), case.k.double().repeat_interleave(2, 1),
                                              case.v.double().repeat_interleave(2, 1), attn_mask=mask, scale=0.25)
        torch.testing.assert_close(expected[has_key.expand_as(expected[..., 0])],
                                   sdpa[has_key.expand_as(sdpa[..., 0])])
    rows = has_key.expand(-1, 4, -1)
    assert_close(out[rows], expected[rows], torch.float32, "out")
    assert bool((out[~rows] == 0).all())
    if how != "odds-strength0":  # (odds at strength 0 still reports its locked rows; it leaves them as they are)
        assert bool((stats[..., 4] == 0).all())


# ---------------------------------------------------------------------------- the bridge rule


def bridge_closed_form(p_o, p_b, p_s, n_b, n_s, tau_max=0.15, eps=EPS, sink_weight=0.0):
    """Design.md 2.3 in plain Python floats: the final masses (O, B, S, sink) and the decision.
    sink_weight = e^{s - lse}, the sink's weight relative to the real keys."""
    w_b = w_s = 1.0
    active = False
    if n_b > 0 and n_s > 0:
        tau = min(math.sqrt(n_b / (n_b + n_s + eps)), tau_max)
        if p_b < tau and 1 - p_o > eps and p_s > eps:
            active = True
            tau = max(min(tau, 1 - p_o - eps), eps)
            tau_s = 1 - p_o - tau
            w_b, w_s = (tau + eps) / (p_b + eps), (tau_s + eps) / (p_s + eps)
    den = p_o + p_b * w_b + p_s * w_s + sink_weight
    return (p_o / den, p_b * w_b / den, p_s * w_s / den, sink_weight / den), active


def one_row(masses, counts, d=None, jitter=0.5, dtype=torch.float64):
    """One query (scale 1) over keys O | B | S with group masses `masses` (summing to 1) spread
    unevenly over `counts` keys: logits log(p_g / n_g) + noise renormalized per group, so the row's
    lse is 0. v = the identity (d = T), so out is the row A' itself. Returns (args, A)."""
    n_total = sum(counts)
    d = d or n_total
    logits = []
    for m, n in zip(masses, counts):
        if n:
            noise = jitter * torch.randn(n, dtype=torch.float64)
            logits.append(math.log(m) - torch.logsumexp(noise, 0) + noise if m > 0 else torch.full((n,), -800.0,
                                                                                               dtype=torch.float64))
    s = torch.cat(logits)
    q = torch.zeros(1, 1, 1, d, dtype=torch.float64)
    q[..., 0] = 1.0
    k = torch.zeros(1, 1, n_total, d, dtype=torch.float64)
    k[0, 0, :, 0] = s
    k[0, 0, :, 1:] = torch.randn(n_total, d - 1, dtype=torch.float64)  # orthogonal to q: no effect
    v = torch.eye(n_total, d, dtype=torch.float64)[None, None]
    bounds = torch.tensor([[[counts[0], counts[0] + counts[1]]]])
    args = tuple(x.to(dtype) for x in (q, k, v)) + (torch.tensor([0]), bounds)
    return args, torch.softmax(s, 0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("p_b,expected", [(1e-2, None), (1e-3, None), (1e-5, 0.138), (1e-7, 0.016), (1e-9, None)])
def test_bridge_final_mass(seed, p_b, expected, dtype):
    """A thinking row (O empty) with tau_B = tau_max = 0.15: the bridge ends at tau_B while p_B >> eps,
    and, with the paper's eps, at 0.138 for p_B = 1e-5 and 0.016 for p_B = 1e-7 (design.md 2.3).
    The shape inside each group is kept: A'_j / A_j is one factor per group."""
    counts = (0, 10, 30)                      # sqrt(10 / 40) = 0.5 > tau_max
    (args, a) = one_row((0.0, p_b, 1 - p_b), counts, dtype=dtype)
    out, lse, stats = ops.oeb_attention(*args, rule="bridge", scale=1.0)
    (p_o2, p_b2, p_s2, _), active = bridge_closed_form(0.0, p_b, 1 - p_b, 10, 30)
    assert active and float(stats[0, 0, 0, 4]) == 1.0
    row = out[0, 0, 0].double()
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    assert float(row[10:].sum()) == pytest.approx(p_s2, rel=tol, abs=tol)
    assert float(row[:10].sum()) == pytest.approx(p_b2, rel=tol if dtype == torch.float64 else 1e-4, abs=tol)
    if expected is not None:
        assert round(p_b2, 3) == expected and float(row[:10].sum()) == pytest.approx(expected, abs=5e-4)
    if p_b >= 1e-3:                            # eps is negligible: the KL projection onto p'_B = tau_B
        assert p_b2 == pytest.approx(0.15, rel=2e-3)
    ratio = row / a
    for lo, hi in ((0, 10), (10, 40)):
        assert float(ratio[lo:hi].max() - ratio[lo:hi].min()) <= 1e-9 * float(ratio[lo:hi].max()) + (
            0 if dtype == torch.float64 else 1e-4 * float(ratio[lo:hi].max()))
    ref_out = ref64(args, **rule_kwargs("bridge", scale=1.0))[0]
    torch.testing.assert_close(out.double(), ref_out, atol=1e-12 if dtype == torch.float64 else 1e-6, rtol=1e-5)


# (masses O, B, S; counts; eps; what happens)
CLAMP_CASES = [
    pytest.param((0.2, 0.01, 0.79), (5, 8, 20), EPS, "tau_max", id="plain-tau_max"),
    pytest.param((0.1, 0.02, 0.88), (5, 1, 60), EPS, "tau_count", id="tau-from-counts"),     # sqrt(1/61) < 0.15
    pytest.param((0.9, 0.05, 0.05), (4, 5, 6), EPS, "clamp_avail", id="tauB>1-pO-eps"),
    pytest.param((0.985, 1e-4, 0.0149), (4, 5, 6), 1e-2, "clamp_eps", id="tauB<eps-eps1e-2"),
    pytest.param((1 - 1.6e-6, 1e-7, 1.5e-6), (4, 5, 6), EPS, "clamp_eps", id="tauB<eps-paper-eps"),
    pytest.param((1 - 5e-7, 2e-7, 3e-7), (4, 5, 6), EPS, "off", id="off-1-pO<=eps"),
    pytest.param((0.9, 0.1 - 5e-7, 5e-7), (4, 5, 6), EPS, "off", id="off-pS<=eps"),
    pytest.param((0.1, 0.3, 0.6), (4, 5, 6), EPS, "off", id="off-pB>=tauB"),
    pytest.param((0.3, 0.0, 0.7), (4, 0, 6), EPS, "off", id="off-B-empty"),
    pytest.param((0.3, 0.7, 0.0), (4, 6, 0), EPS, "off", id="off-S-empty"),
]


@pytest.mark.parametrize("with_sink", [False, True], ids=["nosink", "sink"])
@pytest.mark.parametrize("masses,counts,eps,what", CLAMP_CASES)
def test_bridge_cases_and_clamps(seed, masses, counts, eps, what, with_sink):
    """Hand-built rows in each regime of design.md 2.3 (tau_B from tau_max or the counts, the clamp
    tau_B <- 1 - p_O - eps, the floor tau_B <- eps, and the rows left alone): the final masses are the
    closed form, the decision is right, and the backward equals autograd through the reference
    (the clamps decide d tau_B / d p_O)."""
    (args, a) = one_row(masses, counts)
    sink = torch.tensor([0.4], dtype=torch.float64) if with_sink else None  # row lse 0: sink weight e^0.4
    kw = rule_kwargs("bridge", eps=eps, sink=sink, scale=1.0)
    out, lse, stats = ops.oeb_attention(*args, **kw)
    p = [float(x) for x in (a[:counts[0]].sum(), a[counts[0]:counts[0] + counts[1]].sum(), a[sum(counts[:2]):].sum())]
    want, active = bridge_closed_form(*p, counts[1], counts[2], eps=eps, sink_weight=math.exp(0.4) if with_sink else 0)
    assert active == (what != "off") and float(stats[0, 0, 0, 4]) == float(active)
    row = out[0, 0, 0]
    edges = (0, counts[0], counts[0] + counts[1], sum(counts))
    got = [float(row[edges[g]:edges[g + 1]].sum()) for g in range(3)]
    assert got == pytest.approx(list(want[:3]), rel=1e-10, abs=1e-15)
    assert float(stats[0, 0, 0, 3]) == pytest.approx(want[3], rel=1e-6)
    if what == "clamp_avail":
        assert want[2] < 1e-5        # S gives up all but eps of its mass: the paper's behaviour
    # Backward through this regime.
    q, k, v, kv, bounds = args
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    leaves64 = [x.clone().requires_grad_() for x in (q, k, v)]
    grad = torch.randn(out.shape, dtype=torch.float64)
    got_g = torch.autograd.grad(ops.oeb_attention(*leaves, kv, bounds, **kw)[0], leaves, grad)
    want_g = torch.autograd.grad(reference.oeb_attention(*leaves64, kv, bounds, **kw)[0], leaves64, grad)
    for name, x, y in zip(("dq", "dk", "dv"), got_g, want_g):
        torch.testing.assert_close(x, y, atol=1e-12 * max(1.0, float(y.abs().max())), rtol=1e-9,
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_bridge_triggers_on_low_question_mass(seed, dtype):
    """Thinking rows whose question mass is low trigger; where they do the bridge ends at the closed
    form (about tau_B when p_B >> eps), where they don't nothing moves; decisions match the reference
    row by row. v carries channel indicators, so out reads the final mass of each channel."""
    case = draw(3, 4, 2, 64, 64, 16, dtype, gap=4.0)
    ch = case.channel
    v = torch.zeros_like(case.v)
    for c in range(3):
        v[..., c] = (ch == c)[:, None, :].to(dtype)
    out, _, stats = ops.oeb_attention(case.q, case.k, v, case.kv_start, case.bounds)
    ref_out, _, ref_stats = ref64((case.q, case.k, v, case.kv_start, case.bounds), **rule_kwargs("bridge"))
    counts = group_counts(case.kv_start, case.bounds, 64, 64, None)
    margin = decision_margin(ref_stats, counts, "bridge", 0.15, EPS)
    assert_same_decisions(stats, ref_stats, margin, 1e-12 if dtype == torch.float64 else 1e-4)
    thinking = (ch == 1)[:, None].expand(-1, 4, -1)
    assert float(stats[..., 4][thinking].mean()) > 0.5    # the gap makes most thinking rows trigger
    # Final bridge mass: the question for thinking rows, the thinking for summary rows.
    for c, bridge in ((1, 0), (2, 1)):
        rows = (ch == c)[:, None].expand(-1, 4, -1)
        n_b, n_s = counts[1][:, None].expand(-1, 4, -1)[rows], counts[2][:, None].expand(-1, 4, -1)[rows]
        st = ref_stats[rows]
        final = out[..., bridge][rows].double()
        for r in range(st.shape[0]):
            want, active = bridge_closed_form(*st[r, :3].tolist(), int(n_b[r]), int(n_s[r]))
            assert float(final[r]) == pytest.approx(want[1], abs=1e-10 if dtype == torch.float64 else 3e-5)
            if active and st[r, 1] > 1e-3 and st[r, 2] > 1e-3:
                tau = min(math.sqrt(int(n_b[r]) / (int(n_b[r]) + int(n_s[r]) + EPS)), 0.15,
                          1 - float(st[r, 0]) - EPS)
                assert float(final[r]) == pytest.approx(tau, rel=1e-2)
            if not active:
                assert float(final[r]) == pytest.approx(float(st[r, 1]), abs=1e-10 if dtype == torch.float64 else 3e-5)


# (batch, heads, kv_heads, tq, tk, dim, window, sink)
LITERAL_CASES = [
    pytest.param(3, 4, 2, 41, 41, 8, None, None, id="prefill-T41"),
    pytest.param(2, 6, 1, 33, 33, 16, 9, "normal", id="prefill-gqa6-win9-sink"),
    pytest.param(3, 4, 2, 1, 50, 8, None, "large", id="decode-Tk50-bigsink"),
    pytest.param(2, 4, 4, 7, 33, 4, 12, None, id="chunk7-Tk33-win12"),
]


@pytest.mark.parametrize("batch,heads,kv_heads,tq,tk,dim,window,sink", LITERAL_CASES)
def test_matches_channel_literal_form(seed, batch, heads, kv_heads, tq, tk, dim, window, sink):
    """The op on reference.oeb_bounds equals reference.oeb_bridge_attention, which writes the rule
    from the channels of the keys (S, B, O as sets) without bounds: out to ~1e-12 and every decision."""
    case = draw(batch, heads, kv_heads, tq, tk, dim, torch.float64, gap=1.0, full_pad_row=True)
    sink_t = make_sink(heads, sink)
    out, _, stats = ops.oeb_attention(*case.args, rule="bridge", sink=sink_t, window=window, scale=0.3)
    lit_out, _, lit_active = reference.oeb_bridge_attention(case.q, case.k, case.v, case.channel, sink=sink_t,
                                                            window=window, scale=0.3)
    torch.testing.assert_close(out, lit_out, atol=1e-12, rtol=1e-10)
    assert torch.equal(stats[..., 4].bool(), lit_active)


@pytest.mark.parametrize("rule", RULES)
def test_one_token_groups_decode(seed, rule):
    """Decode rows whose groups are single tokens: the new token alone in group 2 (it opens a step /
    is the first token of its channel), a one-token group 1, a one-token window; sinks vary."""
    case = draw(4, 4, 2, 1, 30, 8, torch.float32)
    bounds = torch.tensor([[[0, 29]], [[20, 21]], [[-1, -1]], [[28, 29]]])
    kv_start = torch.tensor([0, 3, 28, 5])
    for window, sink in ((None, None), (1, "normal"), (2, "large")):
        sink_t = make_sink(4, sink)
        kw = rule_kwargs(rule, 0.7, 0.5, sink=sink_t, window=window, scale=0.35)
        out, _, stats = ops.oeb_attention(case.q, case.k, case.v, kv_start, bounds, **kw)
        ref_out, _, ref_stats = ref64((case.q, case.k, case.v, kv_start, bounds), **kw)
        assert_close(out, ref_out, torch.float32, "out")
        torch.testing.assert_close(stats.double(), ref_stats, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("rule", RULES)
def test_underflowing_group_mass(seed, rule):
    """A group's mass far below float range (its scores ~150 below the rest): fp32 exp underflows,
    yet the kernel, which keeps each group's log-mass exact, gives the float64 answer.
    odds at strength 1 moves half of the mass onto the underflowed context X; the bridge rule
    triggers on the underflowed question B (and, with eps, lifts it by only (tau_B + eps) / eps)."""
    tk, dim = 12, 4
    q = torch.zeros(1, 1, tk, dim)
    q[..., 0] = 1.0
    k = 0.1 * torch.randn(1, 1, tk, dim)
    k[0, 0, :6, 0] = -75.0  # sink + context (odds) / the question (bridge)
    k[0, 0, 6:, 0] = 75.0   # the current step / the thinking
    v = torch.randn(1, 1, tk, dim)
    bounds = torch.tensor([[[-1, -1]] * 6 + [[1, 6]] * 6]) if rule == "odds" else torch.tensor(
        [[[-1, -1]] * 6 + [[0, 6]] * 6])
    kv_start = torch.tensor([0])
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    kw = rule_kwargs(rule, strength=1.0, scale=1.0)
    out, _, stats = ops.oeb_attention(q, k, v, kv_start, bounds, **kw)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref_out, _, ref_stats = reference.oeb_attention(q64, k64, v64, kv_start, bounds, **kw)
    assert locked_rows(ref_stats) == 6 and locked_rows(stats) == 6
    assert float(ref_stats[..., 1].detach().max()) < 1e-40
    assert_close(out, ref_out, torch.float32, "out")
    if rule == "odds":  # the rule is not vacuous: the output moved far from the plain one
        plain = ops.oeb_attention(q, k, v, kv_start, torch.full_like(bounds, -1), **kw)[0]
        assert float((out - plain).detach().abs().max()) > 0.1
    grad = torch.randn_like(ref_out)
    got = torch.autograd.grad(out, (q, k, v), grad.float())
    want = torch.autograd.grad(ref_out, (q64, k64, v64), grad)
    for name, a, b in zip("qkv", got, want):
        assert_close(a, b, torch.float32, f"d{name}", scale_by_max=True)


@pytest.mark.parametrize("rule", RULES)
def test_fp32_weights_to_a_few_ulp(seed, rule):
    """fp32 kernels compute exp themselves (a vectorized polynomial, fused with the max shift and the
    group sums). Scores spread over 95 nats below each group's max, q . k exact (q = e_0), v = the
    identity, so out is the row A' itself: every weight within 10 fp32 ulp (6e-7; measured <= 3) of the
    float64 reference (under e^-87 of its group's max it may be 0). Backward pass 2 forms
    A'_j = exp(z_j - (lse - log r_g)), whose fp32 subtraction costs |z_j - lse| ulp: dv_j = A'_j dO is
    held to 1e-6 where A'_j is within e^-7 of the largest weight, and to 1e-7 of the largest elsewhere."""
    t = 200
    s = -95 * torch.rand(t, dtype=torch.float64)
    s[[0, 60, 130, 199]] = 0.0                      # each group's max (and the query's own key)
    q = torch.zeros(1, 1, 1, t)
    q[..., 0] = 1.0
    k = torch.zeros(1, 1, t, t)
    k[0, 0, :, 0] = s.float()
    v = torch.eye(t)[None, None]
    bounds = torch.tensor([[[60, 130]]])
    kw = rule_kwargs(rule, strength=0.7, tau_max=0.5, scale=1.0)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, _, stats = ops.oeb_attention(*leaves, torch.tensor([0]), bounds, **kw)
    leaves64 = [x.double().requires_grad_() for x in (q, k, v)]
    ref_out, _, ref_stats = reference.oeb_attention(*leaves64, torch.tensor([0]), bounds, **kw)
    tiny = ref_out.detach() < 1e-36
    torch.testing.assert_close(out.detach().double()[~tiny], ref_out.detach()[~tiny], atol=0, rtol=6e-7)
    assert bool((out.detach()[tiny] < 1e-36).all())
    grad = torch.rand(1, 1, 1, t, dtype=torch.float64) + 0.5
    dv = torch.autograd.grad(out, leaves[2], grad.float())[0]
    dv64 = torch.autograd.grad(ref_out, leaves64[2], grad)[0]
    big = dv64.abs() > math.exp(-7) * float(dv64.abs().max())
    torch.testing.assert_close(dv.double()[big], dv64[big], atol=0, rtol=1e-6)
    torch.testing.assert_close(dv.double(), dv64, atol=1e-7 * float(dv64.abs().max()), rtol=1e-6)


def test_non_contiguous_inputs(seed):
    """HF hands q, k, v over as transposes of (B, T, H, d): results and gradients must not depend
    on strides (bit for bit)."""
    case = draw(2, 4, 2, 19, 19, 8, torch.float32, gap=2.0)
    qt, kt, vt = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (case.q, case.k, case.v))
    assert not qt.is_contiguous()
    bounds_nc = torch.stack([case.bounds[..., 0], case.bounds[..., 1]]).permute(1, 2, 0)
    assert not bounds_nc.is_contiguous()
    sink = torch.randn(4)
    kw = rule_kwargs("bridge", sink=sink, window=7, scale=0.3)
    for got, want in zip(ops.oeb_attention(qt, kt, vt, case.kv_start, bounds_nc, **kw),
                         ops.oeb_attention(case.q, case.k, case.v, case.kv_start, case.bounds, **kw)):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    grad = torch.randn(2, 19, 4, 8).transpose(1, 2)
    leaves_nc = [x.detach().requires_grad_() for x in (qt, kt, vt)]
    leaves = [x.detach().clone().requires_grad_() for x in (case.q, case.k, case.v)]
    g_nc = torch.autograd.grad(ops.oeb_attention(*leaves_nc, case.kv_start, bounds_nc, **kw)[0], leaves_nc, grad)
    g = torch.autograd.grad(ops.oeb_attention(*leaves, case.kv_start, case.bounds, **kw)[0], leaves,
                            grad.contiguous())
    for x, y in zip(g_nc, g):
        torch.testing.assert_close(x, y, atol=0, rtol=0)


# ---------------------------------------------------------------------------------- backward

# (batch, heads, kv_heads, tq, tk, dim, sink, window)
BACKWARD_CASES = [
    pytest.param(3, 4, 2, 37, 37, 16, "normal", None, id="prefill-gqa2-T37-sink"),
    pytest.param(2, 2, 1, 70, 70, 8, None, 20, id="prefill-T70-win20"),
    pytest.param(2, 6, 1, 1, 45, 32, "large", None, id="decode-gqa6-Tk45-bigsink"),
    pytest.param(3, 2, 2, 3, 67, 8, "normal", 16, id="chunk3-Tk67-win16-sink"),
]


def grads(fn, inputs, grad_out):
    leaves = [x.clone().requires_grad_() if x is not None else None for x in inputs]
    out = fn(*leaves)
    got = torch.autograd.grad(out, [x for x in leaves if x is not None], grad_out)
    return out, got


def draw_active(kw, *args, **kwargs):
    """draw(...) again (up to 20 times) until the reference with kw changes some row of the queries."""
    for _ in range(20):
        case = draw(*args, rule=kw["rule"], gap=2.0, **kwargs)
        stats = ref64(case.args, **kw)[2]
        if locked_rows(stats) > 0:
            return case
    raise AssertionError("no draw with a row the rule changes")


@pytest.mark.parametrize("dtype", [torch.float64] + DTYPES, ids=str)
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("batch,heads,kv_heads,tq,tk,dim,sink,window", BACKWARD_CASES)
def test_backward_matches_reference(seed, batch, heads, kv_heads, tq, tk, dim, sink, window, rule, dtype):
    """dq, dk, dv and d sink of the op against autograd through the float64 reference on the same
    (rounded) inputs; fp64 to ~1e-11. (The sink is an fp32 tensor here, so its gradient is held to
    fp32; test_sink_gradient_float64 holds an fp64 sink to 1e-10.)"""
    kw = rule_kwargs(rule, strength=0.7, window=window, scale=dim ** -0.5)
    case = draw_active(kw, batch, heads, kv_heads, tq, tk, dim, dtype, full_pad_row=tq > 1)
    sink_t = make_sink(heads, sink, torch.float32)
    grad_out = torch.randn(case.q.shape, dtype=torch.float64).to(dtype)
    q, k, v, kv_start, bounds = case.args
    inputs = [q, k, v, sink_t]
    _, got = grads(lambda q, k, v, s: ops.oeb_attention(q, k, v, kv_start, bounds, sink=s, **kw)[0], inputs, grad_out)
    inputs64 = [x.double() if x is not None else None for x in inputs]
    _, want = grads(lambda q, k, v, s: reference.oeb_attention(q, k, v, kv_start, bounds, sink=s, **kw)[0],
                    inputs64, grad_out.double())
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        assert a.dtype == dtype and a.shape == b.shape
        if dtype == torch.float64:
            torch.testing.assert_close(a, b, atol=1e-11 * max(1.0, float(b.abs().max())), rtol=1e-9,
                                       msg=lambda m: f"{name}: {m}")
        else:
            # the kernel accumulates in fp32 but rounds dq, dk, dv to dtype; dk, dv sum over up to
            # Tq * H / H_kv terms, so compare relative to the largest entry.
            assert_close(a, b, dtype, name, scale_by_max=True)
    if sink_t is not None:
        assert got[3].dtype == sink_t.dtype
        assert_close(got[3], want[3], torch.float32 if dtype == torch.float64 else dtype, "dsink", scale_by_max=True)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("tq,tk,window", [(6, 6, 3), (2, 7, None)], ids=["prefill-win3", "chunk"])
def test_gradcheck_float64(seed, rule, tq, tk, window):
    """torch.autograd.gradcheck in float64 (q, k, v and the sink), on draws where the rule changes
    some row and every intervened row is at least 1e-3 away from the rule's switching points."""
    for _ in range(50):
        case = draw(2, 2, 1, tq, tk, 3, torch.float64, rule=rule, sharp=1.5, gap=1.5)
        sink = torch.randn(2, dtype=torch.float64)
        kw = rule_kwargs(rule, strength=0.6, tau_max=0.4, eps=1e-3, window=window, scale=0.8)
        stats = ref64(case.args, sink=sink, **kw)[2]
        margin = decision_margin(stats, group_counts(case.kv_start, case.bounds, tq, tk, window), rule, 0.4, 1e-3)
        intervened = (case.bounds[..., 0] >= 0)[:, None].expand_as(margin)
        if locked_rows(stats) > 0 and float(margin[intervened].min()) > 1e-3:
            break
    else:
        raise AssertionError("no draw with active rows away from the switching points in 50 tries")
    q, k, v = (x.clone().requires_grad_() for x in (case.q, case.k, case.v))
    sink.requires_grad_()

    def fn(q, k, v, sink):
        return ops.oeb_attention(q, k, v, case.kv_start, case.bounds, sink=sink, **kw)[0]

    # (the chunk case in fast mode: random projections of the Jacobian, a fraction of the time)
    assert torch.autograd.gradcheck(fn, (q, k, v, sink), eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=tq < tk)


@pytest.mark.parametrize("rule", RULES)
def test_reference_backward_is_finite(seed, rule):
    """The oracle itself: autograd through reference.oeb_attention must be finite where the op's
    gradient is, on rows whose rule is off because one group holds all the mass (a question row
    with a single key: p_O = 1 exactly, so the bridge's unused log(tau_S + eps) is log 0) and on
    rows without any key (with a sink: exp(sink - lse) at lse = -inf in the odds branch)."""
    q = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    k, v = (torch.randn(2, 1, 4, 4, dtype=torch.float64) for _ in range(2))
    kv_start = torch.tensor([0, 2])                                    # rows 0, 1 of batch 1: no key
    bounds = torch.tensor([[[-1, -1], [0, 1], [0, 1], [0, 2]]] * 2)   # query 0: one key, not intervened
    sink = torch.randn(2, dtype=torch.float64)
    inputs = [q, k, v, sink]
    kw = rule_kwargs(rule, strength=0.7, tau_max=0.5)
    _, want = grads(lambda q, k, v, s: reference.oeb_attention(q, k, v, kv_start, bounds, sink=s, **kw)[0], inputs,
                    torch.ones(q.shape, dtype=torch.float64))
    _, got = grads(lambda q, k, v, s: ops.oeb_attention(q, k, v, kv_start, bounds, sink=s, **kw)[0], inputs,
                   torch.ones(q.shape, dtype=torch.float64))
    for name, x, y in zip(("dq", "dk", "dv", "dsink"), got, want):
        assert bool(torch.isfinite(y).all()), f"reference {name} is not finite"
        torch.testing.assert_close(x, y, atol=1e-12, rtol=1e-9)


@pytest.mark.parametrize("rule", RULES)
def test_sink_gradient_float64(seed, rule):
    """In float64 the sink's gradient is as exact as dq, dk, dv (~1e-12 relative), not limited by the
    fp32 stats; with and without gradients for q, k, v."""
    case = draw(2, 4, 2, 23, 23, 8, torch.float64, rule=rule, gap=2.0, full_pad_row=True)
    kw = rule_kwargs(rule, strength=0.7, window=9, scale=0.4)
    sink = torch.randn(4, dtype=torch.float64)
    grad_out = torch.randn(case.q.shape, dtype=torch.float64)
    for with_qkv in (True, False):
        inputs = [x.clone().requires_grad_(with_qkv) for x in (case.q, case.k, case.v)]
        inputs.append(sink.clone().requires_grad_())
        out = ops.oeb_attention(*inputs[:3], case.kv_start, case.bounds, sink=inputs[3], **kw)[0]
        got = torch.autograd.grad(out, [x for x in inputs if x.requires_grad], grad_out)
        inputs64 = [x.clone().requires_grad_(x.requires_grad) for x in inputs]
        ref_out = reference.oeb_attention(*inputs64[:3], case.kv_start, case.bounds, sink=inputs64[3], **kw)[0]
        want = torch.autograd.grad(ref_out, [x for x in inputs64 if x.requires_grad], grad_out)
        for name, a, b in zip(("dq", "dk", "dv", "dsink") if with_qkv else ("dsink",), got, want):
            torch.testing.assert_close(a, b, atol=1e-12 * max(1.0, float(b.abs().max())), rtol=1e-10,
                                       msg=lambda m: f"{name}: {m}")
    # the float64 backward path (it pads the head dim) under the fake kernels and autograd too
    leaves = [transposed(x).requires_grad_() for x in (case.q, case.k, case.v)]
    torch.library.opcheck(torch.ops.stepflow.oeb_attention.default,
                          (*leaves, case.kv_start, case.bounds, rule, 0.7, 0.15, EPS, sink.requires_grad_(), 9, 0.4))


def test_only_out_is_differentiable(seed):
    case = draw(1, 2, 1, 5, 5, 4, torch.float32)
    q = case.q.requires_grad_()
    out, lse, stats = ops.oeb_attention(q, case.k, case.v, case.kv_start, case.bounds)
    assert out.requires_grad and not lse.requires_grad and not stats.requires_grad
    (dq,) = torch.autograd.grad(out.sum() + lse.sum(), q)  # lse contributes nothing
    (dq_out,) = torch.autograd.grad(ops.oeb_attention(q, case.k, case.v, case.kv_start, case.bounds)[0].sum(), q)
    torch.testing.assert_close(dq, dq_out)


# ---------------------------------------------------------------------------------- opcheck


def transposed(x):
    """The same values with HF's strides after RoPE: a (B, T, H, d) buffer seen as (B, H, T, d)."""
    return x.transpose(1, 2).contiguous().transpose(1, 2)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("tq,tk,window", [(9, 9, None), (2, 11, 4)], ids=["prefill", "chunk-win4"])
def test_opcheck_forward(seed, rule, tq, tk, window):
    """Schema, fake (strides of the outputs included), autograd registration and the dispatcher's
    checks, with non-contiguous q, k, v (as HF passes them), a sink and a window."""
    case = draw(2, 4, 2, tq, tk, 8, torch.float32, rule=rule, gap=2.0)
    q, k, v = (transposed(x).requires_grad_() for x in (case.q, case.k, case.v))
    assert not q.is_contiguous()
    sink = torch.randn(4, requires_grad=True) if window is None else None  # one with, one without
    torch.library.opcheck(torch.ops.stepflow.oeb_attention.default,
                          (q, k, v, case.kv_start, case.bounds, rule, 0.5, 0.15, EPS, sink, window or -1, 0.35))


@pytest.mark.parametrize("rule", RULES)
def test_opcheck_backward(seed, rule):
    case = draw(2, 4, 2, 9, 9, 8, torch.float32, rule=rule, gap=2.0)
    q, k, v = (transposed(x) for x in (case.q, case.k, case.v))
    sink = torch.randn(4)
    out, lse, stats = ops.oeb_attention(q, k, v, case.kv_start, case.bounds, rule=rule, sink=sink, window=5,
                                        scale=0.35)
    args = (transposed(torch.randn_like(out)), q, k, v, lse, stats, case.kv_start, case.bounds, rule, 0.5, 0.15, EPS,
            sink, 5, 0.35)
    torch.library.opcheck(torch.ops.stepflow.oeb_attention_backward.default, args)


# ------------------------------------------------------------------------------- bad inputs


def good_args():
    """Arguments of ops.oeb_attention that are fine; bad_cases() spoils one at a time."""
    case = draw(2, 4, 2, 6, 6, 8, torch.float32)
    bounds = torch.tensor([[[-1, -1], [-1, -1], [0, 2], [0, 2], [2, 4], [2, 4]]] * 2)
    return dict(q=case.q, k=case.k, v=case.v, kv_start=torch.tensor([0, 1]), bounds=bounds, rule="bridge",
                strength=0.5, tau_max=0.15, eps=EPS, sink=torch.zeros(4), window=None, scale=0.3)


def _set(key, value):
    return lambda a: a.update({key: value(a) if callable(value) else value})


def _bound(row, i, pair):
    return lambda a: a["bounds"].__setitem__((row, i), torch.tensor(pair))


def bad_cases():
    """(id, change to good_args, text the ValueError must contain)."""
    meta = torch.device("meta")
    return [
        ("q-not-tensor", _set("q", lambda a: a["q"].tolist()), "q must be a torch.Tensor"),
        ("q-3d", _set("q", lambda a: a["q"][0]), "q must have 4 dimensions"),
        ("q-int", _set("q", lambda a: a["q"].long()), "q must have dtype"),
        ("qkv-int", lambda a: a.update(q=a["q"].long(), k=a["k"].long(), v=a["v"].long()), "q must have dtype"),
        ("k-dtype", _set("k", lambda a: a["k"].double()), "share one dtype"),
        ("kv-shape", _set("v", lambda a: a["v"][:, :, :5]), "k and v must have the same shape"),
        ("k-batch", lambda a: a.update(k=a["k"][:1], v=a["v"][:1]), "k has batch"),
        ("k-head-dim", lambda a: a.update(k=a["k"][..., :4], v=a["v"][..., :4]), "head dim"),
        ("heads", _set("q", torch.randn(2, 3, 6, 8)), "multiple of the kv heads"),
        ("Tq>Tk", lambda a: a.update(q=torch.randn(2, 4, 7, 8), bounds=torch.full((2, 7, 2), -1)), "outnumber"),
        ("head-dim>256", lambda a: a.update(q=torch.randn(2, 4, 6, 257), k=torch.randn(2, 2, 6, 257),
                                            v=torch.randn(2, 2, 6, 257)), "head dim must be at most 256"),
        ("kv_start-shape", _set("kv_start", torch.tensor([0])), "kv_start must have shape"),
        ("kv_start-dtype", _set("kv_start", torch.tensor([0.0, 1.0])), "kv_start must have dtype"),
        ("kv_start<0", _set("kv_start", torch.tensor([-1, 0])), r"kv_start\[0\] = -1 is outside \[0, 6\]"),
        ("kv_start>Tk", _set("kv_start", torch.tensor([0, 7])), r"kv_start\[1\] = 7 is outside \[0, 6\]"),
        ("bounds-shape", _set("bounds", lambda a: a["bounds"][:, :5]), "bounds must have shape"),
        ("bounds-dtype", _set("bounds", lambda a: a["bounds"].float()), "bounds must have dtype"),
        ("bounds-a>b", _bound(0, 3, (3, 2)), r"bounds\[0, 3\]"),
        ("bounds-b>p+1", _bound(1, 2, (0, 4)), r"bounds\[1, 2\]"),
        ("bounds-half-off", _bound(0, 4, (-1, 2)), r"bounds\[0, 4\]"),
        ("bounds<-1", _bound(1, 0, (-2, -2)), r"bounds\[1, 0\]"),
        ("rule", _set("rule", "kl"), "rule must be one of"),
        ("rule-none", _set("rule", None), "rule must be one of"),
        ("strength<0", _set("strength", -0.1), "strength must be in"),
        ("strength>1", _set("strength", 1.5), "strength must be in"),
        ("strength-nan", _set("strength", float("nan")), "strength must be in"),
        ("tau_max-0", _set("tau_max", 0.0), "tau_max must be in"),
        ("tau_max>1", _set("tau_max", 1.5), "tau_max must be in"),
        ("tau_max-nan", _set("tau_max", float("nan")), "tau_max must be in"),
        ("eps-0", _set("eps", 0.0), "eps must be in"),
        ("eps-neg", _set("eps", -1e-6), "eps must be in"),
        ("eps-0.5", _set("eps", 0.5), "eps must be in"),
        ("eps-str", _set("eps", "1e-6"), "eps must be a number"),
        ("sink-shape", _set("sink", torch.zeros(3)), "sink must have shape"),
        ("sink-2d", _set("sink", torch.zeros(1, 4)), "sink must have 1 dimensions"),
        ("sink-int", _set("sink", torch.zeros(4, dtype=torch.long)), "sink must have dtype"),
        ("sink-nan", _set("sink", torch.tensor([0.0, float("nan"), 0.0, 0.0])), r"sink\[1\] = nan is not finite"),
        ("sink-inf", _set("sink", torch.tensor([0.0, 0.0, float("inf"), 0.0])), r"sink\[2\] = inf is not finite"),
        ("window-0", _set("window", 0), "window must be"),
        ("window-neg", _set("window", -2), "window must be"),
        ("window-float", _set("window", 1.5), "window must be"),
        ("window-bool", _set("window", True), "window must be"),
        ("scale-0", _set("scale", 0.0), "scale must be a positive"),
        ("scale-neg", _set("scale", -1.0), "scale must be a positive"),
        ("scale-str", _set("scale", "0.3"), "scale must be a positive"),
        ("scale-inf", _set("scale", float("inf")), "scale must be a positive"),
        ("scale-nan", _set("scale", float("nan")), "scale must be a positive"),
        ("bounds-device", _set("bounds", lambda a: a["bounds"].to(meta)), "bounds is on meta"),
        ("kv_start-device", _set("kv_start", lambda a: a["kv_start"].to(meta)), "kv_start is on meta"),
        ("sink-device", _set("sink", lambda a: a["sink"].to(meta)), "sink is on meta"),
        ("k-device", lambda a: a.update(k=a["k"].to(meta), v=a["v"].to(meta)), "k is on meta"),
    ]


@pytest.mark.parametrize("case", bad_cases(), ids=lambda c: c[0])
def test_bad_input_value_error(case):
    _, change, text = case
    args = good_args()
    ops.oeb_attention(**args)  # the unchanged arguments are fine
    change(args)
    with pytest.raises(ValueError, match=text):
        ops.oeb_attention(**args)


def direct(args):
    """good_args() in the schema's order, as torch.ops.stepflow.oeb_attention takes them."""
    window = -1 if args["window"] is None else args["window"]
    return (args["q"], args["k"], args["v"], args["kv_start"], args["bounds"], args["rule"], args["strength"],
            args["tau_max"], args["eps"], args["sink"], window, args["scale"])


# The same mistakes straight into torch.ops: the kernel's TORCH_CHECKs (RuntimeError).
DIRECT_BAD = {
    "q-3d": "must be 4-d", "q-int": "share one dtype", "qkv-int": "q must be float32", "k-dtype": "share one dtype",
    "kv-shape": "k and v must have the same shape", "k-batch": "k has batch", "k-head-dim": "head dim",
    "heads": "multiple of kv heads", "Tq>Tk": "tokens but k only", "head-dim>256": "head dim must be at most 256", "kv_start-shape": "kv_start must be int64 of shape",
    "kv_start<0": r"kv_start\[0\] = -1", "kv_start>Tk": r"kv_start\[1\] = 7", "bounds-shape": "bounds must be int64",
    "bounds-a>b": r"bounds\[0, 3\] = \(3, 2\)", "bounds-b>p+1": r"bounds\[1, 2\] = \(0, 4\)",
    "bounds-half-off": r"bounds\[0, 4\]", "bounds<-1": r"bounds\[1, 0\]", "rule": "rule must be 'bridge' or 'odds'",
    "strength<0": "strength must be in", "strength>1": "strength must be in", "tau_max-0": "tau_max must be in",
    "tau_max>1": "tau_max must be in", "eps-0": "eps must be in", "eps-neg": "eps must be in",
    "eps-0.5": "eps must be in", "sink-shape": "sink must have shape", "sink-2d": "sink must have shape",
    "sink-int": "sink must be a float tensor", "sink-nan": r"sink\[1\] = nan is not finite",
    "sink-inf": r"sink\[2\] = inf is not finite", "window-0": "window must be", "window-neg": "window must be",
    "scale-0": "scale must be a positive", "scale-neg": "scale must be a positive",
    "scale-inf": "scale must be a positive", "scale-nan": "scale must be a positive",
}
# (A tensor on another device: with meta tensors the dispatcher picks the fake kernel; the device
# checks of the kernels are exercised by the CUDA tests.)


@pytest.mark.parametrize("case", [c for c in bad_cases() if c[0] in DIRECT_BAD], ids=lambda c: c[0])
def test_bad_input_runtime_error(case):
    name, change, _ = case
    args = good_args()
    change(args)
    with pytest.raises(RuntimeError, match=DIRECT_BAD[name]):
        torch.ops.stepflow.oeb_attention(*direct(args))


def test_direct_int32_indices_runtime_error():
    args = good_args()
    for key, text in (("bounds", "bounds must be int64"), ("kv_start", "kv_start must be int64")):
        bad = dict(args, **{key: args[key].int()})
        with pytest.raises(RuntimeError, match=text):
            torch.ops.stepflow.oeb_attention(*direct(bad))


def test_backward_bad_input_runtime_error():
    args = direct(good_args())
    out, lse, stats = torch.ops.stepflow.oeb_attention(*args)
    q, k, v, rest = args[0], args[1], args[2], args[3:]
    bwd = torch.ops.stepflow.oeb_attention_backward
    for bad, text in (((out, q, k, v, lse[:, :1], stats), "lse must be float32 of shape"),
                      ((out, q, k, v, lse.double(), stats), "lse must be float32"),
                      ((out, q, k, v, lse, stats[..., :2]), "stats must be float32 of shape"),
                      ((out[:, :, :2], q, k, v, lse, stats), "grad_out must be a CPU tensor of q's shape"),
                      ((out.double(), q, k, v, lse, stats), "grad_out must be a CPU tensor of q's shape")):
        with pytest.raises(RuntimeError, match=text):
            bwd(*bad, *rest)
    with pytest.raises(RuntimeError, match="rule must be"):
        bwd(out, q, k, v, lse, stats, *rest[:2], "kl", *rest[3:])
