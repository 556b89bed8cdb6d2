"""stepflow::oeb_attention on CUDA against the float64 reference and the CPU kernel (design.md 2.3).

The CUDA kernels (csrc/cuda/oeb_attention.cu) must have the CPU kernel's semantics: the same
outputs up to the dtype's tolerance, the same lse / stats (fp32), the same checks. Both rules are
tested: `bridge` (groups O, B, S from reference.oeb_bounds, the bridge made small on purpose so
rows trigger, including the regimes where the paper's eps decides: a bridge far below eps, a
bridge below fp32's range, an "other" group that leaves less than tau_B) and `odds` (sinks, X, C).
Shapes cover the paths of the kernel: tensor cores for bf16 / fp16 with head dims 64 / 128 and 96
(zero padded to 128); the scalar path for fp32, d = 192 / 256 and d = 36 (rows not 16-byte
aligned); one-warp CTAs (few rows) and four-warp CTAs, the split-KV decode path with its merge
kernel, GQA packing of query heads (28 / 4 and 12 / 2, blocks that span two heads), left padding,
rows without keys, sliding windows (smaller than a key tile, crossing the group bounds), per-head
sink logits, and gradients (q, k, v and the sink) against autograd of the float64 reference.
Every test needs a GPU; the file collects (and skips) without one.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tolerances

from stepflow_ext import ops, reference
from stepflow_ext.reference import QUESTION, STEP, SUMMARY

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
RULES = ["bridge", "odds"]
DEV = "cuda"
TAU_MAX, EPS = 0.15, 1e-6

# Logit offsets per key channel (question, thinking, summary), added through one coordinate of q
# and k: "bridge" makes the bridge small for thinking and summary queries, so rows trigger;
# "tiny" puts the bridge far below eps (the paper's eps caps the lift); "underflow" below fp32's
# range (exact only with per-group maxima); "other" gives the question (O of a summary query)
# nearly all the mass, so tau_B is clamped to 1 - p_O - eps; "flat" adds nothing.
GAPS = {"bridge": (-4.0, -3.0, 0.0), "tiny": (-25.0, -22.0, 0.0), "underflow": (-120.0, -110.0, 0.0),
        "other": (3.5, -3.0, 0.0), "flat": (0.0, 0.0, 0.0)}


# ----------------------------------------------------------------------------------- cases


def draw_segments(batch, tk, pad=True):
    """seg_ids (B, Tk) and seg_kinds (B, S): per row a question (>= 1 token), 1 to 4 steps and a
    summary (steps and summary possibly empty), left padded: row 0 full, the others at least a
    third of Tk long."""
    rows, kinds = [], []
    for b in range(batch):
        valid = tk if (b == 0 or not pad) else int(torch.randint(max(1, tk // 3), tk + 1, (1,)))
        n_steps = int(torch.randint(1, 5, (1,)))
        cuts = sorted(torch.randint(1, valid + 1, (n_steps + 1,)).tolist())  # question = [0, cuts[0]), cuts[0] >= 1
        sizes = [y - x for x, y in zip([0] + cuts, cuts + [valid])]
        rows.append([-1] * (tk - valid) + [s for s, n in enumerate(sizes) for _ in range(n)])
        kinds.append([QUESTION] + [STEP] * n_steps + [SUMMARY])
    width = max(len(k) for k in kinds)
    seg_kinds = torch.full((batch, width), STEP, dtype=torch.long)
    for b, k in enumerate(kinds):
        seg_kinds[b, :len(k)] = torch.tensor(k)
    return torch.tensor(rows, dtype=torch.long), seg_kinds


def make_case(batch, heads, kv_heads, tq, tk, dim, dtype, rule="bridge", gaps="bridge", num_sink=1, pad=True,
              empty_row=False, sink=False):
    """Random inputs (drawn on the CPU in float64, rounded to dtype, moved to the GPU) for the last
    tq queries of a tk-token segmentation: (q, k, v, kv_start, bounds, sink or None, scale).

    The keys of each channel get the logit offsets GAPS[gaps] (q[..., 0] = 4, k[..., 0] = offset /
    (4 scale)); for the odds rule the queries also lean towards the keys of their row's last
    segment, so rows are locked in (decode rows too). empty_row: the last batch row is padding
    but its last key (a summary token), so most queries of a chunk see no key at all."""
    seg_ids, seg_kinds = draw_segments(batch, tk, pad)
    if empty_row and batch > 1:
        seg_ids[-1, :-1] = -1
        seg_ids[-1, -1] = seg_kinds.shape[1] - 1
        seg_kinds[-1, -1] = SUMMARY
    bounds = reference.oeb_bounds(seg_ids, seg_kinds, rule, num_sink)[:, tk - tq:].contiguous()
    kv_start = (seg_ids < 0).sum(dim=1)
    scale = dim ** -0.5
    q = torch.randn(batch, heads, tq, dim, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, tk, dim, dtype=torch.float64)
    v = torch.randn(batch, kv_heads, tk, dim, dtype=torch.float64)
    channel = reference.channel_of_tokens(seg_ids, seg_kinds)
    offset = torch.tensor(GAPS[gaps], dtype=torch.float64)[channel.clamp(min=0)] * (channel >= 0)
    q[..., 0] = 4.0
    k[..., 0] = offset[:, None, :] / (4.0 * scale)
    if rule == "odds":
        u = torch.randn(dim, dtype=torch.float64)
        u[0] = 0.0
        u = u * (2.0 * dim) ** 0.5 / u.norm()
        q += u
        for b in range(batch):
            k[b, :, seg_ids[b] == int(seg_ids[b, -1])] += u
    s = (2.0 * torch.randn(heads, dtype=torch.float64)).float().to(DEV) if sink else None
    return (*(x.to(dtype).to(DEV) for x in (q, k, v)), kv_start.to(DEV), bounds.to(DEV), s, scale)


def ref64(q, k, v, kv_start, bounds, rule, strength, sink, window, scale):
    """reference.oeb_attention in float64, with leaves (q, k, v, sink) that require grad."""
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    s = None if sink is None else sink.detach().double().requires_grad_()
    out = reference.oeb_attention(*leaves, kv_start, bounds, rule, strength, TAU_MAX, EPS, s, window, scale)
    return out, leaves + ([] if s is None else [s])


def ref_grads(q, k, v, kv_start, bounds, rule, strength, sink, window, scale, grad_out):
    """Gradients (q, k, v[, sink]) of the float64 reference's out, by autograd.

    The reference's bridge rule takes log(tau_S + eps) on every row, and on rows with p_O = 1 (every
    row that is not intervened) that is log(0): its torch.where then backpropagates 0 * inf = NaN.
    Bounds (0, 0) instead of (-1, -1) describe the same attention (all keys in group 2, |B| = 0: no
    change; the output is bit for bit the same) without that NaN. (Its odds rule with a sink has a
    NaN sink gradient on rows without keys, exp(sink - lse) with lse = -inf: those cases are drawn
    without such rows.)"""
    safe = bounds.clone()
    safe[bounds[..., 0] < 0] = 0
    out, leaves = ref64(q, k, v, kv_start, safe, rule, strength, sink, window, scale)
    grads = torch.autograd.grad(out[0], leaves, grad_out.double())
    assert all(bool(torch.isfinite(g).all()) for g in grads), "the reference's gradient is not finite"
    return grads


def op(q, k, v, kv_start, bounds, rule, strength, sink, window, scale):
    return ops.oeb_attention(q, k, v, kv_start, bounds, rule=rule, strength=strength, tau_max=TAU_MAX, eps=EPS,
                             sink=sink, window=window, scale=scale)


def on_cpu(*xs):
    return [x.detach().cpu() if isinstance(x, torch.Tensor) else x for x in xs]


def assert_close(actual, expected, dtype, what, scale_by_max=False):
    atol, rtol = tolerances(dtype)
    if scale_by_max:  # gradients: absolute error relative to the largest entry
        atol = atol * max(1.0, float(expected.detach().abs().max()))
    torch.testing.assert_close(actual.detach().double().cpu(), expected.detach().double().cpu(), atol=atol, rtol=rtol,
                               msg=lambda m: f"{what}: {m}")


def decided(ref_stats, kv_start, bounds, rule, window, tk):
    """(B, H, Tq) bool: rows whose trigger is not within rounding of a threshold of the rule (the
    kernel reads the group masses off fp32 scores of the same inputs): `active` must agree there."""
    st = ref_stats.detach()
    p0, p1, p2 = st[..., 0], st[..., 1], st[..., 2]
    if rule == "odds":  # p_X > 0 and p_C > p_X
        return (p1 == 0) | ((p2 - p1).abs() > 1e-4 * torch.maximum(p1, p2))
    _, _, g1, g2 = reference.oeb_groups(kv_start, bounds, bounds.shape[1], tk, window)
    n1, n2 = g1.sum(-1).double()[:, None], g2.sum(-1).double()[:, None]
    tau = torch.clamp(torch.sqrt(n1 / (n1 + n2 + EPS)), max=TAU_MAX)
    margin = torch.minimum((p1 - tau).abs(), torch.minimum((1 - p0 - EPS).abs(), (p2 - EPS).abs()))
    return (n1 == 0) | (n2 == 0) | (margin > 1e-4)  # |B| = 0 or |S| = 0: never active


def check_forward(got, want, dtype, kv_start, bounds, rule, window, tk, cpu=None):
    """out, lse, stats of the kernel against the float64 reference (and the CPU kernel's, if given)."""
    out, lse, stats = got
    ref_out, ref_lse, ref_stats = (x.detach() for x in want)
    assert out.device.type == DEV and out.dtype == dtype and out.is_contiguous()
    assert lse.dtype == torch.float32 and stats.dtype == torch.float32
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape and stats.shape == (*ref_lse.shape, 5)
    assert_close(out, ref_out, dtype, "out")
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), empty) and bool((lse[empty] < 0).all())
    torch.testing.assert_close(lse[~empty].double(), ref_lse[~empty], atol=5e-5, rtol=2e-5)
    torch.testing.assert_close(stats[..., :4].double(), ref_stats[..., :4], atol=2e-5, rtol=2e-5)
    assert bool(((stats[..., 4] == 0) | (stats[..., 4] == 1)).all())
    sure = decided(ref_stats, kv_start, bounds, rule, window, tk)
    assert torch.equal(stats[..., 4][sure], ref_stats[..., 4][sure].float()), "active flags differ"
    assert bool((out[empty] == 0).all()) and bool((stats[empty] == 0).all())
    if cpu is not None:
        cpu_out, cpu_lse, cpu_stats = cpu
        assert_close(out, cpu_out, dtype, "out vs CPU kernel")
        torch.testing.assert_close(lse.cpu(), cpu_lse, atol=5e-5, rtol=2e-5)
        torch.testing.assert_close(stats[..., :4].cpu(), cpu_stats[..., :4], atol=2e-5, rtol=2e-5)


def active_rows(stats):
    return int(stats.detach()[..., 4].sum())


def triggering_case(rule, strength, window, *args, tries=10, **kwargs):
    """make_case(*args, rule=rule, **kwargs), drawn again (up to `tries` times) until the float64
    reference's rule changes some row (a random segmentation can leave no bridge, or no context,
    inside a window or in a decode chunk): (case, reference (out, lse, stats))."""
    for _ in range(tries):
        case = make_case(*args, rule=rule, **kwargs)
        q, k, v, kv_start, bounds, s, scale = case
        want, _ = ref64(q, k, v, kv_start, bounds, rule, strength, s, window, scale)
        if active_rows(want[2]) > 0:
            return case, want
    raise AssertionError(f"no case where the {rule} rule changes a row in {tries} draws")


# --------------------------------------------------------------------------------- forward

# (batch, heads, kv_heads, tq, tk, dim, window, sink): prefill (Tq = Tk), decode and chunked.
FORWARD_CASES = [
    pytest.param(1, 28, 4, 37, 37, 64, None, False, id="prefill-gqa28/4-T37-d64"),
    pytest.param(2, 12, 2, 130, 130, 128, None, True, id="prefill-gqa12/2-T130-d128-sink"),
    pytest.param(2, 4, 2, 100, 100, 64, 16, False, id="prefill-T100-d64-window16"),
    pytest.param(2, 3, 1, 77, 77, 96, 40, True, id="prefill-T77-d96-window40-sink"),
    pytest.param(2, 2, 2, 45, 45, 192, None, True, id="prefill-T45-d192-sink"),
    pytest.param(1, 4, 2, 40, 40, 256, 7, False, id="prefill-T40-d256-window7"),
    pytest.param(2, 3, 1, 1, 1, 64, None, False, id="prefill-T1"),
    pytest.param(2, 28, 4, 1, 1100, 128, None, True, id="decode-Tk1100-gqa28/4-sink"),
    pytest.param(2, 12, 2, 1, 3000, 64, 2000, False, id="decode-Tk3000-gqa12/2-window2000"),
    pytest.param(2, 4, 2, 3, 2000, 128, 1500, True, id="decode3-Tk2000-window1500-sink"),
    pytest.param(2, 2, 1, 20, 150, 36, None, False, id="chunk20-Tk150-d36"),
]


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,heads,kv_heads,tq,tk,dim,window,sink", FORWARD_CASES)
def test_forward_matches_reference_and_cpu(seed, batch, heads, kv_heads, tq, tk, dim, window, sink, dtype, rule):
    strength = 0.7
    args = (batch, heads, kv_heads, tq, tk, dim, dtype)
    if tk > 1:  # the rule is exercised, not only plain attention
        case, want = triggering_case(rule, strength, window, *args, empty_row=(1 < tq < tk), sink=sink)
    else:
        case = make_case(*args, rule=rule, sink=sink)
        want = ref64(*case[:5], rule, strength, case[5], window, case[6])[0]
    q, k, v, kv_start, bounds, s, scale = case
    got = op(q, k, v, kv_start, bounds, rule, strength, s, window, scale)
    cpu = op(*on_cpu(q, k, v, kv_start, bounds), rule, strength, None if s is None else s.cpu(), window, scale)
    check_forward(got, want, dtype, kv_start, bounds, rule, window, tk, cpu)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("gaps", ["tiny", "underflow", "other"])
def test_bridge_regimes_forward_and_backward(seed, gaps, dtype):
    """The regimes of the bridge rule that its eps and clamps decide, forward and backward:
    tiny: bridges of mass ~e^-25 << eps (the lift is capped near tau_B p_B / eps);
    underflow: bridge scores ~120 below the others (p_B below fp32's range: per-group maxima);
    other: summary queries whose question (O) holds > 85% of the mass, so tau_B = 1 - p_O - eps.
    The case is checked to be in its regime (the reference's stats)."""
    b, h, hkv, t, d = 2, 4, 2, 90, 64
    q, k, v, kv_start, bounds, s, scale = make_case(b, h, hkv, t, t, d, dtype, "bridge", gaps, sink=True)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    s.requires_grad_()
    got = op(q, k, v, kv_start, bounds, "bridge", 0.0, s, None, scale)
    want, _ = ref64(q, k, v, kv_start, bounds, "bridge", 0.0, s, None, scale)
    st = want[2].detach()
    on = st[..., 4] > 0
    if gaps == "tiny":
        assert bool((on & (st[..., 1] < 1e-8) & (st[..., 1] > 0)).any())
    elif gaps == "underflow":
        assert bool((on & (st[..., 1] < 1e-45) & (st[..., 1] > 0)).any())  # below fp32's smallest denormal
    else:
        assert bool((on & (st[..., 0] > 0.85)).any())
    check_forward(got, want, dtype, kv_start, bounds, "bridge", None, t)
    grad = torch.randn(want[0].shape, dtype=torch.float64, device=DEV)
    got_g = torch.autograd.grad(got[0], (q, k, v, s), grad.to(dtype))
    want_g = ref_grads(q, k, v, kv_start, bounds, "bridge", 0.0, s, None, scale, grad)
    for name, a, w in zip(["q", "k", "v", "sink"], got_g, want_g):
        assert bool(torch.isfinite(a).all()), name
        assert_close(a, w, dtype, f"d{name}", scale_by_max=True)


def test_rule_changes_output(seed):
    """Both rules are active on the GPU: many rows trigger and the output moves (a case is drawn
    again, up to 10 times, when its segmentation leaves too few rows that can trigger)."""
    for rule, gaps, strength in (("bridge", "bridge", 0.0), ("odds", "flat", 1.0)):
        for _ in range(10):
            q, k, v, kv_start, bounds, _, scale = make_case(2, 4, 2, 70, 70, 64, torch.bfloat16, rule, gaps)
            out, _, stats = op(q, k, v, kv_start, bounds, rule, strength, None, None, scale)
            if active_rows(stats) > 40:
                break
        plain, _, plain_stats = op(q, k, v, kv_start, torch.full_like(bounds, -1), rule, strength, None, None, scale)
        assert active_rows(stats) > 40 and active_rows(plain_stats) == 0
        assert float((out.float() - plain.float()).abs().max()) > 0.05


def sdpa(q, k, v, kv_start, scale, window=None, sink=None):
    """Plain causal attention with left padding (and a window / sink) through the reference's masked
    softmax in float64; the rows that have keys."""
    tq, tk = q.shape[2], k.shape[2]
    valid = torch.arange(tk, device=q.device)[None, :] >= kv_start[:, None]
    allowed = reference.causal_valid_mask(valid, tq, window)
    a = reference.attention_probs(q.double(), k.double(), scale, allowed, None if sink is None else sink.double())
    out = torch.einsum("bhij,bhjd->bhid", a, reference._expand_kv(v.double(), q.shape[1]))
    return out, allowed.any(-1)[:, None].expand(-1, q.shape[1], -1)


@pytest.mark.parametrize("window", [None, 1, 24], ids=lambda w: f"window{w}")
@pytest.mark.parametrize("tq,tk", [(37, 37), (1, 700), (3, 90)], ids=["prefill", "decode", "chunk"])
def test_plain_attention_when_not_intervened(seed, tq, tk, window):
    """bounds (-1, -1) everywhere is plain causal attention (with its window and sink): stats p_0 = 1,
    p_1 = p_2 = 0, nothing active, under both rules."""
    q, k, v, kv_start, bounds, s, scale = make_case(2, 4, 2, tq, tk, 64, torch.float32, sink=True, empty_row=True)
    expected, rows = sdpa(q, k, v, kv_start, scale, window, s)
    off = torch.full_like(bounds, -1)
    for rule in RULES:
        out, _, stats = op(q, k, v, kv_start, off, rule, 1.0, s, window, scale)
        assert_close(out[rows], expected[rows], torch.float32, f"out ({rule})")
        assert bool((out[~rows] == 0).all())
        torch.testing.assert_close(stats[..., 0][rows], torch.ones_like(stats[..., 0][rows]))
        assert bool((stats[..., 1:3] == 0).all()) and bool((stats[..., 4] == 0).all())
        out0, _, _ = op(q, k, v, kv_start, off, rule, 1.0, None, window, scale)
        assert_close(out0[rows], sdpa(q, k, v, kv_start, scale, window)[0][rows], torch.float32, "out, no sink")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("window", [1, 5, 16, 63, 64, 65, 200])
def test_windows_across_tiles_and_groups(seed, window, dtype):
    """Sliding windows around the key tile sizes (32 / 64), with group bounds that the window cuts
    (late rows no longer see the question), GQA blocks that span two query heads (28 / 4 heads,
    T = 45: 7 heads x 45 rows per kv head), forward and backward."""
    b, h, hkv, t, d = 2, 28, 4, 45, 64
    q, k, v, kv_start, bounds, s, scale = make_case(b, h, hkv, t, t, d, dtype, "bridge", sink=True)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    got = op(q, k, v, kv_start, bounds, "bridge", 0.0, s, window, scale)
    want, _ = ref64(q, k, v, kv_start, bounds, "bridge", 0.0, s, window, scale)
    check_forward(got, want, dtype, kv_start, bounds, "bridge", window, t)
    grad = torch.randn(want[0].shape, dtype=torch.float64, device=DEV)
    got_g = torch.autograd.grad(got[0], (q, k, v), grad.to(dtype))
    want_g = ref_grads(q, k, v, kv_start, bounds, "bridge", 0.0, s, window, scale, grad)
    for name, a, w in zip("qkv", got_g, want_g):
        assert_close(a, w, dtype, f"d{name}", scale_by_max=True)


@pytest.mark.parametrize("num_sink", [0, 1, 4])
def test_odds_decode_one_token_step(seed, num_sink):
    """Decode under the odds rule where the new token opens a step (C = itself) or continues one,
    a row whose sinks reach past its window, and a padded row."""
    q, k, v, _, _, _, scale = make_case(3, 4, 2, 1, 300, 64, torch.float32, "odds", "flat")
    kv_start = torch.tensor([0, 3, 298], device=DEV)
    a = [min(int(kv) + num_sink, 300) for kv in kv_start]
    bounds = torch.tensor([[[a[0], 299]], [[a[1], 200]], [[-1, -1]]], device=DEV)
    for window in (None, 50):
        got = op(q, k, v, kv_start, bounds, "odds", 0.7, None, window, 0.35)
        want, _ = ref64(q, k, v, kv_start, bounds, "odds", 0.7, None, window, 0.35)
        check_forward(got, want, torch.float32, kv_start, bounds, "odds", window, 300)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_odds_underflowing_context_mass(seed, dtype):
    """Odds rule, p_X far below float range: the per-group maxima keep L_X exact; A' = exp(s - lse +
    log r) <= 1. X's scores sit ~150 below C's; at strength 1 the float64 reference still moves half
    of the mass to X, and so must the kernel (forward and backward). In bf16, dq = scale sum_j dS_j
    k_j cancels terms of size |scale k| = 75, and the tensor-core backward rounds dS to bf16 before
    that product (as flash attention does), so its dq is only good to about 2^-8 |scale k|."""
    tk, dim = 12, 4
    q = torch.zeros(1, 1, tk, dim)
    q[..., 0] = 1.0
    k = 0.1 * torch.randn(1, 1, tk, dim)
    k[0, 0, :6, 0] = -75.0  # context (and sink) keys
    k[0, 0, 6:, 0] = 75.0   # current step
    v = torch.randn(1, 1, tk, dim)
    bounds = torch.tensor([[[-1, -1]] * 6 + [[1, 6]] * 6], device=DEV)
    kv_start = torch.tensor([0], device=DEV)
    q, k, v = (x.to(dtype).to(DEV).requires_grad_() for x in (q, k, v))
    got = op(q, k, v, kv_start, bounds, "odds", 1.0, None, None, 1.0)
    want, _ = ref64(q, k, v, kv_start, bounds, "odds", 1.0, None, None, 1.0)
    assert active_rows(want[2]) == 6 and float(want[2][..., 1].detach().max()) < 1e-40
    check_forward(got, want, dtype, kv_start, bounds, "odds", None, tk)
    grad = torch.randn(want[0].shape, dtype=torch.float64, device=DEV)
    got_g = torch.autograd.grad(got[0], (q, k, v), grad.to(dtype))
    want_g = ref_grads(q, k, v, kv_start, bounds, "odds", 1.0, None, None, 1.0, grad)
    for name, a, b in zip("qkv", got_g, want_g):
        assert bool(torch.isfinite(a).all())
        if dtype == torch.bfloat16 and name == "q":
            torch.testing.assert_close(a.double(), b, atol=2 ** -7 * 75.0, rtol=0, msg=lambda m: f"dq: {m}")
        else:
            assert_close(a, b, dtype, f"d{name}", scale_by_max=True)


def test_non_contiguous_and_float64(seed):
    """Strides do not matter (out is contiguous); float64 runs the CPU kernel and returns CUDA tensors,
    forward and backward."""
    q, k, v, kv_start, bounds, s, scale = make_case(2, 4, 2, 19, 19, 64, torch.float32, sink=True)
    qt, kt, vt = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    assert not qt.is_contiguous()
    for got, want in zip(op(qt, kt, vt, kv_start, bounds, "bridge", 0.5, s, 9, scale),
                         op(q, k, v, kv_start, bounds, "bridge", 0.5, s, 9, scale)):
        assert got.is_contiguous()
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
    got = op(q64, k64, v64, kv_start, bounds, "bridge", 0.5, s, 9, scale)
    want, _ = ref64(q, k, v, kv_start, bounds, "bridge", 0.5, s, 9, scale)
    assert got[0].device.type == DEV and got[0].dtype == torch.float64
    torch.testing.assert_close(got[0], want[0].detach(), atol=1e-9, rtol=1e-7)
    grad = torch.randn(want[0].shape, dtype=torch.float64, device=DEV)
    want_g = ref_grads(q, k, v, kv_start, bounds, "bridge", 0.5, s, 9, scale, grad)
    for a, b in zip(torch.autograd.grad(got[0], (q64, k64, v64), grad), want_g[:3]):
        assert a.device.type == DEV
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-7)


def test_unaligned_rows_take_the_scalar_path(seed):
    """Inputs whose rows are not 16-byte aligned (a storage offset) run the scalar kernels and agree
    with the tensor-core result on aligned copies (forward and backward, bridge with a sink)."""
    q, k, v, kv_start, bounds, s, scale = make_case(2, 4, 2, 40, 40, 64, torch.bfloat16, sink=True)

    def shifted(x):  # same values, data pointer 2 bytes past a 16-byte boundary
        flat = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)
        y = flat[1:].view(x.shape)
        y.copy_(x)
        return y

    qs, ks, vs = (shifted(x) for x in (q, k, v))
    assert qs.data_ptr() % 16 != 0 and qs.is_contiguous()
    grad = torch.randn_like(q)
    results = []
    for args in ((q, k, v), (qs, ks, vs)):
        leaves = [x.detach().requires_grad_() for x in args]
        out, lse, stats = op(*leaves, kv_start, bounds, "bridge", 0.0, s, None, scale)
        results.append((out, lse, stats, *torch.autograd.grad(out, leaves, grad)))
    for name, a, b in zip(["out", "lse", "stats", "dq", "dk", "dv"], *results):
        assert_close(a, b, torch.bfloat16, f"{name} unaligned vs aligned", scale_by_max=True)


# ----------------------------------------------------------------------------------- backward

# (batch, heads, kv_heads, tq, tk, dim, window, sink)
BACKWARD_CASES = [
    pytest.param(2, 4, 2, 67, 67, 64, None, True, id="prefill-gqa-T67-d64-sink"),
    pytest.param(1, 12, 2, 100, 100, 128, 30, False, id="prefill-gqa12/2-T100-d128-window30"),
    pytest.param(2, 2, 1, 40, 40, 96, None, True, id="prefill-T40-d96-sink"),
    pytest.param(1, 2, 2, 30, 30, 192, 11, True, id="prefill-T30-d192-window11-sink"),
    pytest.param(1, 2, 1, 24, 24, 256, None, False, id="prefill-T24-d256"),
    pytest.param(2, 4, 2, 1, 300, 64, None, True, id="decode-Tk300-sink"),
    pytest.param(3, 2, 2, 3, 200, 64, 120, False, id="chunk3-Tk200-window120"),
    pytest.param(2, 2, 1, 20, 90, 36, None, True, id="chunk20-Tk90-d36-sink"),
]


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,heads,kv_heads,tq,tk,dim,window,sink", BACKWARD_CASES)
def test_backward_matches_reference_and_cpu(seed, batch, heads, kv_heads, tq, tk, dim, window, sink, dtype, rule):
    pad = not (rule == "odds" and sink)  # see ref_grads: rows without keys only where the reference can take them
    strength = 0.6
    (q, k, v, kv_start, bounds, s, scale), want_out = triggering_case(
        rule, strength, window, batch, heads, kv_heads, tq, tk, dim, dtype, pad=pad,
        empty_row=pad and (1 < tq < tk), sink=sink)
    grad_out = torch.randn(q.shape, dtype=torch.float64, device=DEV).to(dtype)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)] + ([] if s is None else [s.clone().requires_grad_()])
    out, _, _ = op(*leaves[:3], kv_start, bounds, rule, strength, leaves[3] if sink else None, window, scale)
    got = torch.autograd.grad(out, leaves, grad_out)
    assert active_rows(want_out[2]) > 0  # the rule's terms are in the gradient
    want = ref_grads(q, k, v, kv_start, bounds, rule, strength, s, window, scale, grad_out)
    cpu_leaves = [x.detach().cpu().requires_grad_() for x in leaves]
    cpu_out, _, _ = op(*cpu_leaves[:3], kv_start.cpu(), bounds.cpu(), rule, strength,
                       cpu_leaves[3] if sink else None, window, scale)
    cpu_got = torch.autograd.grad(cpu_out, cpu_leaves, grad_out.cpu())
    for name, x, a, b, c in zip(["q", "k", "v", "sink"], leaves, got, want, cpu_got):
        assert a.device.type == DEV and a.dtype == x.dtype and a.shape == b.shape
        assert_close(a, b, dtype, f"d{name}", scale_by_max=True)
        assert_close(a, c, dtype, f"d{name} vs CPU kernel", scale_by_max=True)


def test_backward_direct_call_ignores_lse_values(seed):
    """Like the CPU kernel, the backward recomputes the group masses: lse / stats are shape-checked only."""
    q, k, v, kv_start, bounds, s, scale = make_case(2, 4, 2, 21, 21, 64, torch.float32, sink=True)
    args = (kv_start, bounds, "bridge", 0.5, TAU_MAX, EPS, s, 8, scale)
    out, lse, stats = torch.ops.stepflow.oeb_attention(q, k, v, *args)
    g = torch.randn_like(out)
    a = torch.ops.stepflow.oeb_attention_backward(g, q, k, v, lse, stats, *args)
    b = torch.ops.stepflow.oeb_attention_backward(g, q, k, v, torch.zeros_like(lse), torch.zeros_like(stats), *args)
    for name, x, y in zip("qkv", a, b):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-6, msg=lambda m: f"d{name}: {m}")


# --------------------------------------------- kernel paths of issue 15 item 8 (tensor cores)

# The tensor-core row kernel's paths (docs/method_kernels.md, "Kernel paths and their switches"):
# "old" = scalar 16-bit V loads, per-element slot masks on every tile, 32 keys per tile at d = 128.
OEB_PATHS = {
    "old": dict(oeb_ldmatrix=0, oeb_tile_fast=0, oeb_bn=0),
    "ldmatrix": dict(oeb_ldmatrix=1, oeb_tile_fast=0, oeb_bn=0),
    "tile-fast": dict(oeb_ldmatrix=0, oeb_tile_fast=1, oeb_bn=0),
    "new": dict(oeb_ldmatrix=1, oeb_tile_fast=1, oeb_bn=0),
    "bn64": dict(oeb_ldmatrix=1, oeb_tile_fast=1, oeb_bn=64),
}
# How far two paths' outputs may differ: a few units in the last place of the dtype (they round
# the same fp32 values, up to the compiler's contraction choices in the one-slot tile step).
PATH_ULPS = {torch.bfloat16: 2.0 ** -6, torch.float16: 2.0 ** -9}

# (batch, heads, kv_heads, tq, tk, dim, window, sink): long segments (tiles inside one group for
# whole warps), odd lengths, padding, GQA packing, windows, the split-KV decode path; d = 256 runs
# the scalar path (every switch leaves it alone: the paths must agree exactly there).
OEB_PATH_CASES = [
    pytest.param(2, 8, 2, 333, 333, 64, None, False, id="prefill-gqa8/2-T333-d64"),
    pytest.param(2, 8, 2, 333, 333, 128, None, True, id="prefill-gqa8/2-T333-d128-sink"),
    pytest.param(1, 6, 1, 517, 517, 128, 100, False, id="prefill-mqa-T517-d128-window100"),
    pytest.param(2, 4, 2, 250, 250, 96, 70, True, id="prefill-T250-d96-window70-sink"),
    pytest.param(2, 4, 2, 97, 97, 256, None, False, id="prefill-T97-d256-scalar"),
    pytest.param(2, 12, 2, 1, 3001, 128, None, True, id="decode-Tk3001-d128-sink"),
    pytest.param(2, 4, 2, 5, 1500, 64, 600, False, id="chunk5-Tk1500-d64-window600"),
]


def assert_paths_agree(a, b, dtype, what, exact=False):
    out_a, lse_a, st_a = a
    out_b, lse_b, st_b = b
    if exact:
        assert torch.equal(out_a, out_b) and torch.equal(lse_a, lse_b) and torch.equal(st_a, st_b), what
        return
    tol = PATH_ULPS[dtype]
    torch.testing.assert_close(out_a.float(), out_b.float(), atol=tol, rtol=tol, msg=lambda m: f"{what}: out: {m}")
    torch.testing.assert_close(lse_a, lse_b, atol=1e-5, rtol=1e-6, msg=lambda m: f"{what}: lse: {m}")
    torch.testing.assert_close(st_a[..., :4], st_b[..., :4], atol=1e-5, rtol=1e-5, msg=lambda m: f"{what}: stats: {m}")


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("batch,heads,kv_heads,tq,tk,dim,window,sink", OEB_PATH_CASES)
def test_forward_paths_match_reference_and_each_other(seed, batch, heads, kv_heads, tq, tk, dim, window, sink,
                                                      dtype, rule):
    """Every path of the row kernel against the float64 reference, and against the old path. Prints
    which paths equal the old one bit for bit (ldmatrix only moves the same bits into the same mma:
    expected equal)."""
    strength = 0.7
    case, want = triggering_case(rule, strength, window, batch, heads, kv_heads, tq, tk, dim, dtype,
                                 empty_row=(1 < tq < tk), sink=sink)
    q, k, v, kv_start, bounds, s, scale = case
    got = {}
    for name, paths in OEB_PATHS.items():
        with ops.kernel_paths(**paths):
            got[name] = op(q, k, v, kv_start, bounds, rule, strength, s, window, scale)
        check_forward(got[name], want, dtype, kv_start, bounds, rule, window, tk)
    same = [name for name in OEB_PATHS if all(torch.equal(x, y) for x, y in zip(got[name], got["old"]))]
    print(f"\n  oeb paths equal to 'old' bit for bit: {same}")
    for name in OEB_PATHS:
        assert_paths_agree(got[name], got["old"], dtype, f"{name} vs old", exact=dim > 128)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("dim", [64, 128])
def test_backward_paths_match_reference(seed, dim, dtype):
    """The backward's first pass runs the same row kernel (rows mode): its gradients on every path
    against the float64 reference and the old path."""
    rule, strength, window = "bridge", 0.6, 50
    (q, k, v, kv_start, bounds, s, scale), _ = triggering_case(rule, strength, window, 2, 4, 2, 200, 200, dim, dtype,
                                                               sink=True)
    grad_out = torch.randn(q.shape, dtype=torch.float64, device=DEV).to(dtype)
    want = ref_grads(q, k, v, kv_start, bounds, rule, strength, s, window, scale, grad_out)
    got = {}
    for name, paths in OEB_PATHS.items():
        leaves = [x.clone().requires_grad_() for x in (q, k, v, s)]
        with ops.kernel_paths(**paths):
            out, _, _ = op(*leaves[:3], kv_start, bounds, rule, strength, leaves[3], window, scale)
            got[name] = torch.autograd.grad(out, leaves, grad_out)
        for gname, a, b in zip(["q", "k", "v", "sink"], got[name], want):
            assert_close(a, b, dtype, f"{name}: d{gname}", scale_by_max=True)
    for name in OEB_PATHS:
        for gname, a, b in zip(["q", "k", "v", "sink"], got[name], got["old"]):
            assert_close(a, b, dtype, f"{name} vs old: d{gname}", scale_by_max=True)


def test_prefill_T8192_paths_agree(seed):
    """T = 8192, d = 128, bf16, the bridge rule on a question / steps / summary trace: the paths
    (BN = 64 included) agree with the old one, and with bounds (-1, -1) with SDPA."""
    b, h, hkv, t, d = 1, 4, 2, 8192, 128
    bounds, kv_start, q, k, v = long_bridge_inputs(b, h, hkv, t, d)
    scale = d ** -0.5
    off = torch.full_like(bounds, -1)
    sdpa_out = F.scaled_dot_product_attention(q, k.repeat_interleave(h // hkv, 1), v.repeat_interleave(h // hkv, 1),
                                              is_causal=True, scale=scale)
    base = {}
    for name, paths in OEB_PATHS.items():
        with ops.kernel_paths(**paths):
            plain = op(q, k, v, kv_start, off, "bridge", 0.0, None, None, scale)
            bridged = op(q, k, v, kv_start, bounds, "bridge", 0.0, None, None, scale)
        assert_close(plain[0], sdpa_out, torch.bfloat16, f"{name}: out vs SDPA")
        assert active_rows(bridged[2]) > h * t // 4
        if not base:
            base = {"plain": plain, "bridged": bridged}
        assert_paths_agree(plain, base["plain"], torch.bfloat16, f"{name} vs old (plain)")
        assert_paths_agree(bridged, base["bridged"], torch.bfloat16, f"{name} vs old (bridge)")


# ---------------------------------------------------------------------------------- opcheck


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("tq,tk", [(9, 9), (2, 300)], ids=["prefill", "decode-split"])
def test_opcheck_forward(seed, tq, tk, rule):
    q, k, v, kv_start, bounds, s, scale = make_case(2, 4, 2, tq, tk, 64, torch.float32, rule, sink=True)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    torch.library.opcheck(torch.ops.stepflow.oeb_attention.default,
                          (q, k, v, kv_start, bounds, rule, 0.5, TAU_MAX, EPS, s, 50, scale))


def test_opcheck_backward(seed):
    q, k, v, kv_start, bounds, s, scale = make_case(2, 4, 2, 9, 9, 64, torch.bfloat16, sink=True)
    args = (kv_start, bounds, "bridge", 0.5, TAU_MAX, EPS, s, -1, scale)
    out, lse, stats = torch.ops.stepflow.oeb_attention(q, k, v, *args)
    torch.library.opcheck(torch.ops.stepflow.oeb_attention_backward.default,
                          (torch.randn_like(out), q, k, v, lse, stats, *args))


# ------------------------------------------------------------------------------- bad inputs


def _good():
    q, k, v, kv_start, bounds, _, scale = make_case(2, 4, 2, 6, 6, 64, torch.float32)
    return dict(q=q, k=k, v=v, kv_start=kv_start, bounds=bounds, rule="bridge", strength=0.5, tau_max=TAU_MAX,
                eps=EPS, sink=None, window=-1, scale=scale)


# Changes are built lazily: collecting this file must not touch CUDA on a machine without a GPU.
# Only what the host checks without reading device memory: bad index values (bounds, kv_start) and
# non-finite sink logits are device-side asserts, tested in a subprocess (test_cuda_device_asserts.py).
@pytest.mark.parametrize("change,match", [
    (lambda: dict(rule="lift"), "rule"),
    (lambda: dict(strength=2.0), "strength"),
    (lambda: dict(tau_max=0.0), "tau_max"),
    (lambda: dict(eps=0.0), "eps"),
    (lambda: dict(bounds=torch.full((2, 6, 2), -1, dtype=torch.int32, device=DEV)), "bounds"),
    (lambda: dict(kv_start=torch.tensor([0, 0])), "kv_start must be on"),
    (lambda: dict(sink=torch.zeros(3, device=DEV)), "sink"),
    (lambda: dict(sink=torch.zeros(4)), "sink must be on"),
    (lambda: dict(window=0), "window"),
    (lambda: dict(q=torch.randn(2, 3, 6, 64, device=DEV)), "heads"),
    (lambda: dict(q=torch.randn(2, 4, 7, 64, device=DEV), bounds=torch.full((2, 7, 2), -1, device=DEV)), "tokens"),
    (lambda: dict(q=torch.randn(2, 4, 6, 300, device=DEV), k=torch.randn(2, 2, 6, 300, device=DEV),
                  v=torch.randn(2, 2, 6, 300, device=DEV)), "head dim"),
], ids=["rule", "strength", "tau_max", "eps", "bounds_int32", "kv_on_cpu", "sink_shape", "sink_on_cpu", "window0",
        "heads", "Tq>Tk", "d>256"])
def test_bad_input_runtime_error(change, match):
    args = _good()
    args.update(change())
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
    with pytest.raises(RuntimeError, match="stats"):
        torch.ops.stepflow.oeb_attention_backward(out, *rest[:3], lse, stats.cpu(), *rest[3:])
    with pytest.raises(RuntimeError, match="stats"):
        torch.ops.stepflow.oeb_attention_backward(out, *rest[:3], lse, stats[..., :2], *rest[3:])


# --------------------------------------------------------------------------------- large smoke


def long_trace(t, question=256, step=512, summary=700):
    """One row: a question, steps of `step` tokens, a summary of `summary` tokens; seg ids and kinds."""
    n_steps = (t - question - summary) // step
    ids = [0] * question + [1 + (i // step) for i in range(n_steps * step)]
    ids += [n_steps + 1] * (t - len(ids))
    kinds = torch.tensor([[QUESTION] + [STEP] * n_steps + [SUMMARY]])
    return torch.tensor([ids]), kinds


def long_bridge_inputs(b, h, hkv, t, d, requires_grad=False):
    """bf16 inputs on a long_trace(t) row: bridge bounds, kv_start 0, and q, k whose first channel adds
    a logit of -4 on question keys, -3 on thinking keys and 0 on summary keys (q[..., 0] * k[..., 0] *
    d^-0.5), so that thinking rows give the question little mass and the bridge fires."""
    seg_ids, kinds = long_trace(t)
    bounds = reference.oeb_bounds(seg_ids, kinds, "bridge").to(DEV)
    kv_start = torch.zeros(b, dtype=torch.long, device=DEV)
    q = torch.randn(b, h, t, d, device=DEV)
    k = torch.randn(b, hkv, t, d, device=DEV)
    channel = reference.channel_of_tokens(seg_ids, kinds).to(DEV)
    q[..., 0] = 4.0
    k[..., 0] = torch.tensor([-4.0, -3.0, 0.0], device=DEV)[channel] / (4.0 * d ** -0.5)
    q, k = q.to(torch.bfloat16), k.to(torch.bfloat16)
    v = torch.randn(b, hkv, t, d, device=DEV, dtype=torch.bfloat16)
    if requires_grad:
        q, k, v = (x.requires_grad_() for x in (q, k, v))
    return bounds, kv_start, q, k, v


def test_prefill_T8192_matches_sdpa_and_bridges(seed):
    """T = 8192, d = 128, bf16: bounds (-1, -1) is SDPA (forward and backward) within bf16
    tolerance, with and without a 1024-key window; the bridge rule on a question / steps / summary
    trace is finite, fires on many rows and moves the output, and its gradients are finite."""
    b, h, hkv, t, d = 1, 4, 2, 8192, 128
    bounds, kv_start, q, k, v = long_bridge_inputs(b, h, hkv, t, d, requires_grad=True)
    scale = d ** -0.5
    off = torch.full_like(bounds, -1)
    kr, vr = k.repeat_interleave(h // hkv, 1), v.repeat_interleave(h // hkv, 1)
    grad = torch.randn(b, h, t, d, device=DEV, dtype=torch.bfloat16)
    for window in (None, 1024):
        out, lse, _ = op(q, k, v, kv_start, off, "bridge", 0.0, None, window, scale)
        mask = reference.causal_valid_mask(torch.ones(b, t, dtype=torch.bool, device=DEV), t, window)[:, None]
        ref = F.scaled_dot_product_attention(q, kr, vr, attn_mask=mask, scale=scale)
        assert bool(torch.isfinite(out).all()) and bool(torch.isfinite(lse).all())
        assert_close(out, ref, torch.bfloat16, f"out vs SDPA (window {window})")
        got = torch.autograd.grad(out, (q, k, v), grad)
        want = torch.autograd.grad(ref, (q, k, v), grad)
        for name, a, w in zip("qkv", got, want):
            assert bool(torch.isfinite(a).all())
            assert_close(a, w, torch.bfloat16, f"d{name} vs SDPA (window {window})", scale_by_max=True)
    plain, _, _ = op(q, k, v, kv_start, off, "bridge", 0.0, None, None, scale)
    out1, _, stats1 = op(q, k, v, kv_start, bounds, "bridge", 0.0, None, None, scale)
    assert bool(torch.isfinite(out1).all()) and active_rows(stats1) > h * t // 4
    assert float((out1.float() - plain.float()).abs().max()) > 0.05
    got1 = torch.autograd.grad(out1, (q, k, v), grad)
    assert all(bool(torch.isfinite(a).all()) for a in got1)


@pytest.mark.parametrize("rule", RULES)
def test_decode_KV32768(seed, rule):
    """One new token against a 32k cache (split-KV path, 12 / 2 heads): bounds (-1, -1) matches plain
    attention, the rule (summary row with a long question, thinking row, padded row) matches the
    float64 reference with a sink, with and without a window (cheap at Tq = 1)."""
    b, h, hkv, tk, d = 3, 12, 2, 32768, 128
    q = torch.randn(b, h, 1, d, device=DEV)
    k = torch.randn(b, hkv, tk, d, device=DEV)
    v = torch.randn(b, hkv, tk, d, device=DEV, dtype=torch.bfloat16)
    kv_start = torch.tensor([0, 5000, 20000], device=DEV)
    if rule == "bridge":  # row 0: summary query (O = question [0, 3000), B = thinking); row 1: thinking query
        bounds = torch.tensor([[[3000, 30000]], [[5000, 9000]], [[20000, 32000]]], device=DEV)
        q[..., 0] = 4.0
        k[0, :, 3000:30000, 0] -= 5.0 / (4.0 * d ** -0.5)  # a weak bridge: the summary row triggers
        k[1, :, 5000:9000, 0] -= 5.0 / (4.0 * d ** -0.5)
    else:
        bounds = torch.tensor([[[1, tk - 300]], [[5001, tk - 1]], [[-1, -1]]], device=DEV)
        u = torch.randn(d, device=DEV)
        u = u * (0.5 * d) ** 0.5 / u.norm()
        q[0] += u
        k[0, :, tk - 300:] += u
    q, k = q.to(torch.bfloat16), k.to(torch.bfloat16)
    s = torch.randn(h, device=DEV, dtype=torch.bfloat16)
    scale = d ** -0.5
    plain, _, _ = op(q, k, v, kv_start, torch.full_like(bounds, -1), rule, 0.0, None, None, scale)
    expected, rows = sdpa(q, k, v, kv_start, scale)
    assert bool(torch.isfinite(plain).all())
    assert_close(plain[rows], expected[rows], torch.bfloat16, "decode out vs plain attention")
    for window in (None, 4096):
        got = op(q, k, v, kv_start, bounds, rule, 0.8, s, window, scale)
        want, _ = ref64(q, k, v, kv_start, bounds, rule, 0.8, s, window, scale)
        assert active_rows(want[2]) > 0
        check_forward(got, want, torch.bfloat16, kv_start, bounds, rule, window, tk)
