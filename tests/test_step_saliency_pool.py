"""stepflow::step_saliency_pool (CPU) against the materialized float64 reference (design.md 2.2).

Tolerances. Every input is first rounded to the dtype under test and the reference sees the
very same rounded values (in float64), so the only difference is the kernel's own arithmetic:
fp32 for fp32/fp16/bf16 inputs, fp64 for fp64 inputs (output rounded to fp32; a given lse is
fp32 by the schema, so fp64 with lse is held to fp32 tolerances). A bin's rounding error
scales with the sum of the |terms| that enter it, i.e. with the abs_sum map `mag` (divided by H
for abs_mean), not with the sum_abs value (which may cancel). So each bin is checked as
    |M - M_ref| <= rtol * mag + atol * max(mag)
with tolerances(float32) for bf16/fp16 inputs too: the looser bf16/fp16 tolerances would
only hide kernel bugs, since no half-precision arithmetic happens in the kernel.
Bins without any causal pair (c after a, padding, unused segment ids) must be exactly 0.

Attention as the model has it: per-head sink logits in the softmax denominator (GPT-OSS) and
sliding windows. OEB layers (design.md 2.3): the saliency is measured on the A' the layer used,
with oeb_bounds from reference.oeb_bounds and either rule; the same check with A' in place of A on
both sides (mag is then the abs_sum map of A').
"""
from __future__ import annotations

import pytest
import torch

from conftest import random_seg_ids, tolerances
from stepflow_ext import ops
from stepflow_ext import reference as ref

op = torch.ops.stepflow.step_saliency_pool
REDUCTIONS = ("sum_abs", "abs_sum", "abs_mean")
RULES = ("bridge", "odds")


def make_inputs(b, h, h_kv, t, d, dtype=torch.float32, pad="left", seg_ids=None, extra_segments=3, sharp=2.0):
    """Random q, k, v, dO rounded to dtype; seg ids from random_seg_ids unless given."""
    if seg_ids is None:
        seg_ids, _, used = random_seg_ids(b, t, max_segments=6, pad=pad)
    else:
        used = int(seg_ids.max()) + 1
    num_segments = used + extra_segments  # ids need not fill 0..S-1
    q = (sharp * torch.randn(b, h, t, d)).to(dtype)  # peakier softmax rows
    k = torch.randn(b, h_kv, t, d).to(dtype)
    v = torch.randn(b, h_kv, t, d).to(dtype)
    dout = torch.randn(b, h, t, d).to(dtype)
    return q, k, v, dout, seg_ids, num_segments, d ** -0.5


def make_sink(heads, kind):
    """None, "normal" (std 2) or "large" (heads alternate around +-25) per-head sink logits."""
    if kind is None:
        return None
    if kind == "normal":
        return 2 * torch.randn(heads)
    return torch.tensor([25.0 if h % 2 == 0 else -25.0 for h in range(heads)]) + torch.rand(heads)


def reference_lse(q, k, seg_ids, scale, window=None):
    """Row log-sum-exp over the valid real keys (causal, window; no sink), float64 on the rounded
    inputs, handed over in fp32 (as an attention forward returns it)."""
    allowed = ref.causal_valid_mask(seg_ids >= 0, q.shape[2], window)
    scores = scale * torch.einsum("bhid,bhjd->bhij", q.double(), ref._expand_kv(k.double(), q.shape[1]))
    return torch.logsumexp(scores.masked_fill(~allowed[:, None], float("-inf")), dim=-1).float()


def reference_maps(q, k, v, dout, seg_ids, num_segments, scale, head_reduction, **extras):
    """The float64 map and its magnitude (the abs_sum map; / H for abs_mean): each bin's error scale.
    extras: sink, window and the oeb_* keywords, as the op takes them."""
    args = [x.double() for x in (q, k, v, dout)]
    if extras.get("sink") is not None:
        extras = dict(extras, sink=extras["sink"].double())
    expected = ref.step_saliency_pool(*args, seg_ids, num_segments, scale, head_reduction, **extras)
    mag = ref.step_saliency_pool(*args, seg_ids, num_segments, scale, "abs_sum", **extras)
    if head_reduction == "abs_mean":
        mag = mag / q.shape[1]
    return expected, mag


def assert_map_close(got, expected, mag, seg_ids, num_segments, fp64_kernel):
    """fp64_kernel: the kernel ran in float64 from float64 inputs (no fp32 lse): only the fp32
    output rounding (2^-24 relative) remains, within tolerances(float64)'s rtol of 1e-7."""
    assert got.dtype == torch.float32 and got.shape == expected.shape
    atol, rtol = tolerances(torch.float64 if fp64_kernel else torch.float32)
    got = got.double()
    bound = rtol * mag + atol * mag.max()
    err = (got - expected).abs()
    worst = (err - bound).argmax()
    assert bool((err <= bound).all()), (
        f"max excess at flat index {int(worst)}: got {got.flatten()[worst].item()}, "
        f"expected {expected.flatten()[worst].item()} (mag {mag.flatten()[worst].item()})")
    empty = ref.causal_pair_counts(seg_ids, num_segments) == 0
    assert bool((got[empty] == 0).all()), "bins without causal pairs must be exactly 0"


def check(q, k, v, dout, seg_ids, num_segments, scale, head_reduction, with_lse, **extras):
    expected, mag = reference_maps(q, k, v, dout, seg_ids, num_segments, scale, head_reduction, **extras)
    lse = reference_lse(q, k, seg_ids, scale, extras.get("window")) if with_lse else None
    got = ops.step_saliency_pool(q, k, v, dout, seg_ids, num_segments, scale, head_reduction, lse=lse, **extras)
    assert_map_close(got, expected, mag, seg_ids, num_segments, q.dtype == torch.float64 and lse is None)
    assert float(expected.abs().max()) > 0  # the case is not vacuous
    return got


# (B, H, H_kv, T, d, pad): MHA, GQA, MQA; odd T; T = 1; several query blocks (block_q = 64);
# batches whose rows have different lengths, padded left or right.
SHAPES = [
    pytest.param(1, 4, 4, 37, 16, "left", id="mha-T37"),
    pytest.param(1, 6, 2, 130, 32, "left", id="gqa-T130"),
    pytest.param(3, 4, 1, 70, 8, "left", id="mqa-B3-leftpad-T70"),
    pytest.param(3, 4, 2, 71, 8, "right", id="gqa-B3-rightpad-T71"),
    pytest.param(2, 2, 1, 1, 4, "left", id="T1"),
    pytest.param(2, 6, 3, 203, 16, "right", id="gqa-B2-rightpad-T203"),
]


@pytest.mark.parametrize("with_lse", [False, True], ids=["no_lse", "lse"])
@pytest.mark.parametrize("head_reduction", REDUCTIONS)
@pytest.mark.parametrize("b,h,h_kv,t,d,pad", SHAPES)
def test_matches_reference_fp32(seed, b, h, h_kv, t, d, pad, head_reduction, with_lse):
    check(*make_inputs(b, h, h_kv, t, d, pad=pad), head_reduction, with_lse)


@pytest.mark.parametrize("with_lse", [False, True], ids=["no_lse", "lse"])
@pytest.mark.parametrize("head_reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_matches_reference_dtypes(seed, dtype, head_reduction, with_lse):
    check(*make_inputs(2, 6, 2, 97, 16, dtype=dtype, pad="left"), head_reduction, with_lse)


def test_abs_mean_is_abs_sum_over_heads(seed):
    """abs_mean (the paper's) = abs_sum / H, with or without lse, sinks, windows and OEB."""
    args = make_inputs(2, 6, 2, 60, 8)
    seg_ids = args[4]
    kinds = torch.tensor([[ref.QUESTION] + [ref.STEP] * 8 + [ref.SUMMARY]] * 2)
    for extras in ({}, dict(sink=make_sink(6, "normal"), window=9),
                   dict(oeb_bounds=ref.oeb_bounds(seg_ids, kinds[:, :args[5]]), oeb_rule="bridge")):
        lse = reference_lse(args[0], args[1], seg_ids, args[6], extras.get("window"))
        for given in (None, lse):
            total = ops.step_saliency_pool(*args, "abs_sum", lse=given, **extras)
            mean = ops.step_saliency_pool(*args, "abs_mean", lse=given, **extras)
            torch.testing.assert_close(mean, total / 6, atol=1e-7 * float(total.max()), rtol=1e-6)
            assert float(total.max()) > 0


# Hand-made segmentations: padding inside a row, ids out of order and not contiguous in
# position, a fully padded row, a row that is all one segment, single valid tokens.
SPECIAL_SEG_IDS = {
    "holes-unordered": [[0, 0, 2, -1, 2, 0, 5, 5, -1, -1, 1, 2, 5, 0, -1, 3, 3, 3, 1],
                        [-1, -1, 4, 4, 4, 0, 0, -1, 1, 1, 1, 1, 2, 2, 2, 2, 3, -1, -1]],
    "padded-row": [[-1] * 9, [0, 0, 1, 1, 1, 2, 3, 3, 3]],
    "one-segment": [[0] * 11, [-1] * 10 + [0]],
    "single-tokens": [[-1, 0, -1, -1, 1, -1, -1, -1], [2, -1, -1, -1, -1, -1, -1, -1]],
}


@pytest.mark.parametrize("with_lse", [False, True], ids=["no_lse", "lse"])
@pytest.mark.parametrize("head_reduction", REDUCTIONS)
@pytest.mark.parametrize("case", sorted(SPECIAL_SEG_IDS))
def test_special_segmentations(seed, case, head_reduction, with_lse):
    seg_ids = torch.tensor(SPECIAL_SEG_IDS[case], dtype=torch.long)
    check(*make_inputs(2, 4, 2, seg_ids.shape[1], 8, seg_ids=seg_ids), head_reduction, with_lse)


# ------------------------------------------------------------------------- sinks and windows


SINKS = (None, "normal", "large")
WINDOWS = (1, 6, 25, 500)


@pytest.mark.parametrize("with_lse", [False, True], ids=["no_lse", "lse"])
@pytest.mark.parametrize("sink", SINKS, ids=lambda s: f"sink-{s}")
@pytest.mark.parametrize("window", WINDOWS, ids=lambda w: f"win-{w}")
def test_sinks_and_windows(seed, sink, window, with_lse):
    """The model's own attention with a per-head sink in the denominator and a sliding window
    smaller than the segments (1, 6), crossing them (25) and larger than the sequence (500);
    the head reductions take turns."""
    q, k, v, dout, seg_ids, s, scale = make_inputs(2, 4, 2, 70, 8, pad="left")
    reduction = REDUCTIONS[(SINKS.index(sink) + WINDOWS.index(window) + int(with_lse)) % 3]
    check(q, k, v, dout, seg_ids, s, scale, reduction, with_lse, sink=make_sink(4, sink), window=window)


def test_sink_and_window_matter(seed):
    """A sink lowers every attention weight by the same per-row factor 1 / (1 + e^{s - lse}); a
    window drops the keys before it: a kernel that ignored either would fail here."""
    args = make_inputs(1, 2, 1, 40, 8, seg_ids=torch.tensor([[0] * 10 + [1] * 10 + [2] * 20]))
    plain = ops.step_saliency_pool(*args)
    sunk = ops.step_saliency_pool(*args, sink=torch.tensor([30.0, 30.0]))  # the sink takes ~all
    assert float(sunk.max()) < 1e-3 * float(plain.max())
    windowed = ops.step_saliency_pool(*args, window=5)
    assert float(windowed[0, 2, 0]) == 0.0 and float(plain[0, 2, 0]) > 0  # the summary no longer sees the question


def test_non_contiguous_inputs(seed):
    """(B, T, H, d) tensors transposed to (B, H, T, d), as the HF attention interface hands them."""
    b, h, h_kv, t, d = 2, 6, 2, 45, 16
    seg_ids, kinds, used = random_seg_ids(b, t, pad="left")
    q, dout = (torch.randn(b, t, h, d).transpose(1, 2) for _ in range(2))
    k, v = (torch.randn(b, t, h_kv, d).transpose(1, 2) for _ in range(2))
    assert not q.is_contiguous()
    bounds = ref.oeb_bounds(seg_ids, kinds)
    for reduction in REDUCTIONS:
        check(q, k, v, dout, seg_ids, used, 0.3, reduction, with_lse=True)
        check(q, k, v, dout, seg_ids, used, 0.3, reduction, with_lse=False, sink=make_sink(h, "normal"), window=7,
              oeb_bounds=bounds)


def test_lse_is_used(seed):
    """lse + log 2 halves every attention weight, hence every I_ij and the whole map."""
    q, k, v, dout, seg_ids, s, scale = make_inputs(2, 4, 2, 50, 8)
    lse = reference_lse(q, k, seg_ids, scale)
    for reduction in REDUCTIONS:
        base = ops.step_saliency_pool(q, k, v, dout, seg_ids, s, scale, reduction, lse=lse)
        halved = ops.step_saliency_pool(q, k, v, dout, seg_ids, s, scale, reduction,
                                        lse=lse + torch.log(torch.tensor(2.0)))
        torch.testing.assert_close(halved, base / 2, atol=1e-5 * float(base.abs().max()), rtol=1e-5)


def test_int32_seg_ids_and_single_thread(seed):
    """Direct op call with int32 seg ids, and a 1-thread run, give the same map."""
    q, k, v, dout, seg_ids, s, scale = make_inputs(2, 4, 2, 150, 8)
    base = op(q, k, v, dout, seg_ids, s, scale, "sum_abs", None)
    torch.testing.assert_close(op(q, k, v, dout, seg_ids.int(), s, scale, "sum_abs", None), base)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = op(q, k, v, dout, seg_ids, s, scale, "sum_abs", None)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(one, base, atol=1e-6 * float(base.abs().max()), rtol=1e-6)


@pytest.mark.parametrize("with_lse", [False, True], ids=["no_lse", "lse"])
@pytest.mark.parametrize("head_reduction", REDUCTIONS)
def test_opcheck(seed, head_reduction, with_lse):
    """Schema and fake with non-contiguous q, k, v, dO (HF's strides), a sink and a window."""
    q, k, v, dout, seg_ids, s, scale = make_inputs(2, 4, 2, 23, 8, pad="right")
    q, k, v, dout = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v, dout))
    if with_lse:
        torch.library.opcheck(op.default, (q, k, v, dout, seg_ids, s, scale, head_reduction,
                                           reference_lse(q, k, seg_ids, scale)))
    else:
        torch.library.opcheck(op.default, (q, k, v, dout, seg_ids, s, scale, head_reduction, None, torch.randn(4), 6))


@pytest.fixture
def deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


def test_deterministic_mode_repeats_bit_for_bit(seed, deterministic):
    """Under torch.use_deterministic_algorithms(True) the workers take their tasks in a fixed order
    (otherwise they pull them as they come, and the fp64 partial maps they sum vary): with several
    threads and many tasks, every run gives the same map bit for bit, close to the default mode's."""
    q, k, v, dout, seg_ids, s, scale = make_inputs(2, 4, 2, 300, 16, pad="left")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        runs = [op(q, k, v, dout, seg_ids, s, scale, "abs_mean") for _ in range(3)]
        torch.use_deterministic_algorithms(False)
        default = op(q, k, v, dout, seg_ids, s, scale, "abs_mean")
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(runs[0], r) for r in runs[1:])
    torch.testing.assert_close(runs[0], default, atol=1e-6 * float(default.abs().max()), rtol=1e-6)


# --------------------------------------------------------------------------- OEB (design.md 2.3)
# In an OEB layer the saliency is measured on A' (oeb_bounds and the rule's parameters).


def oeb_inputs(b, h, h_kv, t, d, rule="bridge", num_sink=1, dtype=torch.float32, pad="left", sharp=2.0):
    """make_inputs plus the prefill bounds of oeb_attention for `rule` (reference.oeb_bounds). With
    left padding some row is made to start late (its OEB kv_start > 0)."""
    while True:
        seg_ids, kinds, _ = random_seg_ids(b, t, max_segments=6, pad=pad)
        if pad != "left" or b == 1 or t == 1 or bool((seg_ids[:, 0] < 0).any()):
            break
    args = make_inputs(b, h, h_kv, t, d, dtype=dtype, seg_ids=seg_ids, sharp=sharp)
    return args, ref.oeb_bounds(seg_ids, kinds, rule=rule, num_sink=num_sink)


def oeb_extras(rule, bounds, strength=0.5, tau_max=0.15, eps=ops.OEB_EPS, **more):
    return dict(oeb_bounds=bounds, oeb_rule=rule, oeb_strength=strength, oeb_tau_max=tau_max, oeb_eps=eps, **more)


# (rule, strength, tau_max, eps, num_sink)
RULE_SETTINGS = [
    pytest.param("bridge", 0.0, 0.15, ops.OEB_EPS, 1, id="bridge-tau0.15"),
    pytest.param("bridge", 0.0, 0.6, 1e-2, 1, id="bridge-tau0.6-eps1e-2"),
    pytest.param("odds", 0.5, 0.15, ops.OEB_EPS, 0, id="odds-lam0.5-sink0"),
    pytest.param("odds", 1.0, 0.15, ops.OEB_EPS, 3, id="odds-lam1-sink3"),
]


@pytest.mark.parametrize("with_lse", [False, True], ids=["no_lse", "lse"])
@pytest.mark.parametrize("rule,strength,tau_max,eps,num_sink", RULE_SETTINGS)
def test_oeb_matches_reference_rules(seed, rule, strength, tau_max, eps, num_sink, with_lse):
    """GQA, 3 rows of different lengths padded left (kv_start > 0), several query blocks; each
    setting with every head reduction."""
    args, bounds = oeb_inputs(3, 4, 2, 71, 16, rule=rule, num_sink=num_sink)
    for head_reduction in REDUCTIONS:
        check(*args, head_reduction, with_lse, **oeb_extras(rule, bounds, strength, tau_max, eps))


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("b,h,h_kv,t,d,pad", [p for p in SHAPES if p.id != "gqa-T130"])
def test_oeb_matches_reference_shapes(seed, b, h, h_kv, t, d, pad, rule):
    """Every shape with OEB, sinks and a window crossing the segments; lse given on odd batch sizes."""
    args, bounds = oeb_inputs(b, h, h_kv, t, d, rule=rule, pad=pad)
    check(*args, REDUCTIONS[t % 3], b % 2 == 1, **oeb_extras(rule, bounds, 0.7, sink=make_sink(h, "normal"),
                                                              window=max(2, t // 3)))


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_oeb_matches_reference_dtypes(seed, dtype, rule):
    """With lse for bridge, without for odds (fp64 without lse: the fp64 kernel's own precision)."""
    args, bounds = oeb_inputs(2, 4, 2, 70, 16, rule=rule, dtype=dtype)
    with_lse = rule == "bridge"
    check(*args, "abs_mean" if with_lse else "sum_abs", with_lse, **oeb_extras(rule, bounds, 1.0))


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("pad", ["left", "right", "none"])
def test_oeb_arbitrary_bounds(seed, rule, pad):
    """Any bounds the op accepts: (-1, -1), a before the row's first valid token, empty and
    one-token groups, b = i + 1; on padding queries too; with sinks and windows."""
    b, t = 2, 31
    seg_ids = torch.zeros(b, t, dtype=torch.long)
    seg_ids[:, 10:] = 1
    seg_ids[:, 20:] = 2
    if pad == "left":
        seg_ids[1, :7] = -1
    elif pad == "right":
        seg_ids[1, 25:] = -1
    end = torch.arange(t) + 2
    a = (torch.rand(b, t) * end).long()
    c = a + (torch.rand(b, t) * (end - a)).long()
    edge = torch.randint(0, 4, (b, t))
    a = torch.where(edge == 0, c, a)
    c = torch.where(edge == 1, torch.minimum(a + 1, end - 1), c)
    bounds = torch.stack([a, c], -1)
    bounds[torch.rand(b, t) < 0.2] = -1
    args = make_inputs(b, 4, 2, t, 8, seg_ids=seg_ids)
    for reduction, extras in (("sum_abs", {}), ("abs_sum", dict(sink=make_sink(4, "normal"), window=5)),
                              ("abs_mean", dict(window=12))):
        for with_lse in (False, True):
            check(*args, reduction, with_lse, **oeb_extras(rule, bounds, 0.8, 0.5, 1e-3, **extras))


@pytest.mark.parametrize("with_lse", [False, True], ids=["no_lse", "lse"])
@pytest.mark.parametrize("rule", RULES)
def test_oeb_large_score_gaps(seed, rule, with_lse):
    """Score gaps far beyond fp32 exp's range (~87): whole groups underflow to 0 in the fp32 strip
    while the rule needs their mass (odds at strength 1 lifts an underflowed X to half the mass;
    the bridge triggers on an underflowed B and lifts it by (tau_B + eps) / (p_B + eps)). The
    kernel recomputes those rows exactly; the float64 reference resolves them."""
    args, bounds = oeb_inputs(2, 4, 2, 100, 16, rule=rule, sharp=80.0)  # scores of std ~80
    q, k, v, dout, seg_ids, s, scale = args
    valid = seg_ids >= 0
    kv_start = torch.where(valid.any(1), valid.int().argmax(1), seg_ids.shape[1])
    stats = ref.oeb_attention(q.double(), k.double(), v.double(), kv_start, bounds, rule, 1.0, scale=scale)[2]
    tiny = (stats[..., 1] > 0) & (stats[..., 1] < 1e-30) & (stats[..., 4] > 0)
    assert bool(tiny.any())  # the case is not vacuous: a changed row whose group 1 underflows fp32
    check(*args, REDUCTIONS[RULES.index(rule) + int(with_lse)], with_lse, **oeb_extras(rule, bounds, 1.0))


def oeb_vs_plain(rule, strength, with_lse=False, head_reduction="sum_abs", **more):
    args, bounds = oeb_inputs(2, 6, 2, 120, 16, rule=rule)
    q, k, v, dout, seg_ids, s, scale = args
    lse = reference_lse(q, k, seg_ids, scale) if with_lse else None
    plain = ops.step_saliency_pool(*args, head_reduction, lse=lse)
    bridged = ops.step_saliency_pool(*args, head_reduction, lse=lse, **oeb_extras(rule, bounds, strength, **more))
    return plain, bridged


@pytest.mark.parametrize("with_lse", [False, True], ids=["no_lse", "lse"])
@pytest.mark.parametrize("head_reduction", REDUCTIONS)
def test_oeb_identity_settings_are_plain(seed, head_reduction, with_lse):
    """odds at strength 0 and a bridge that can never trigger (tau_max = 1e-12) are the identity;
    the oeb_* parameters are unused without oeb_bounds."""
    for rule, strength, tau_max in (("odds", 0.0, 0.15), ("bridge", 0.0, 1e-12)):
        plain, bridged = oeb_vs_plain(rule, strength, with_lse, head_reduction, tau_max=tau_max)
        torch.testing.assert_close(bridged, plain, atol=1e-6 * float(plain.abs().max()), rtol=1e-6)
    args = make_inputs(1, 2, 1, 20, 4)
    torch.testing.assert_close(ops.step_saliency_pool(*args, head_reduction, oeb_rule="odds", oeb_strength=1.0),
                               ops.step_saliency_pool(*args, head_reduction), atol=0, rtol=0)


@pytest.mark.parametrize("rule", RULES)
def test_oeb_changes_the_map(seed, rule):
    """The rule moves saliency a lot (far beyond the tolerance), and the op follows the reference
    there: a kernel that ignored the OEB args would fail here. Fixed layout: a question, three
    steps of 30 tokens and a summary; for the bridge the question's keys score low (rows trigger)."""
    lengths, kinds = [16, 30, 30, 30, 14], [ref.QUESTION, ref.STEP, ref.STEP, ref.STEP, ref.SUMMARY]
    seg_ids = torch.tensor([[s for s, n in enumerate(lengths) for _ in range(n)]])
    bounds = ref.oeb_bounds(seg_ids, torch.tensor([kinds]), rule=rule)
    args = list(make_inputs(1, 6, 2, seg_ids.shape[1], 16, seg_ids=seg_ids))
    if rule == "bridge":  # every query gets q_0 = 10; the question's keys lose 4 nats of score
        args[0], args[1] = args[0].clone(), args[1].clone()
        args[0][..., 0] = 10.0
        args[1][:, :, :16, 0] -= 4.0 / (10.0 * args[6])
    extras = oeb_extras(rule, bounds, 1.0, 0.3)
    plain = ops.step_saliency_pool(*args)
    moved_map = ops.step_saliency_pool(*args, **extras)
    expected, mag = reference_maps(*args, "sum_abs", **extras)
    assert_map_close(moved_map, expected, mag, seg_ids, args[5], fp64_kernel=False)
    atol, rtol = tolerances(torch.float32)
    bound = rtol * mag + atol * mag.max()
    moved = (moved_map.double() - plain.double()).abs()
    assert float(moved.max()) > 0.02 * float(mag[:, 1:].max())  # 2% of the largest rebalanced bin ...
    assert float((moved - 100 * bound).max()) > 0                # ... and 100x the tolerance somewhere


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("sink,window", [(None, None), ("normal", 17)], ids=["plain", "sink-win17"])
def test_oeb_consistent_with_oeb_attention(seed, rule, sink, window):
    """Independent of reference.token_saliency: with v, dO > 0 every term A'_ij dO_i.v_j is
    positive, so sum_abs and abs_sum equal the plain sum (abs_mean is it / H), and a row of the map
    sums to sum_{i in a} sum_h dO_i . o_i with o the output of the oeb_attention op (fp64) on the
    same bounds (its kv_start: each row's first valid token)."""
    args, bounds = oeb_inputs(2, 6, 2, 90, 16, rule=rule)
    q, k, v, dout, seg_ids, s, scale = args
    v, dout = v.abs(), dout.abs()
    sink_t = make_sink(6, sink)
    valid = seg_ids >= 0
    kv_start = torch.where(valid.any(1), valid.int().argmax(1), seg_ids.shape[1])
    out, _, stats = ops.oeb_attention(q.double(), k.double(), v.double(), kv_start, bounds, rule=rule, strength=0.7,
                                      sink=sink_t, window=window, scale=scale)
    changed_rows = int(stats[..., 4].sum())
    per_query = (dout.double() * out).sum(dim=(1, 3)) * valid  # (B, T)
    expected = torch.zeros(2, s, dtype=torch.float64)
    expected.index_put_((torch.arange(2)[:, None].expand_as(seg_ids)[valid], seg_ids[valid]), per_query[valid],
                        accumulate=True)
    for reduction, div in (("sum_abs", 1), ("abs_sum", 1), ("abs_mean", 6)):
        got = ops.step_saliency_pool(q, k, v, dout, seg_ids, s, scale, reduction, sink=sink_t, window=window,
                                     **oeb_extras(rule, bounds, 0.7))
        torch.testing.assert_close(got.double().sum(-1) * div, expected, rtol=1e-5, atol=1e-6 * float(expected.max()))
    assert changed_rows > 0


@pytest.mark.parametrize("with_lse", [False, True], ids=["no_lse", "lse"])
@pytest.mark.parametrize("rule", RULES)
def test_opcheck_oeb(seed, rule, with_lse):
    args, bounds = oeb_inputs(2, 4, 2, 23, 8, rule=rule, pad="left")
    q, k, v, dout, seg_ids, s, scale = args
    q, k, v, dout = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v, dout))
    lse = reference_lse(q, k, seg_ids, scale, 9) if with_lse else None
    torch.library.opcheck(op.default, (q, k, v, dout, seg_ids, s, scale, "abs_mean", lse, torch.randn(4), 9, bounds,
                                       rule, 0.5, 0.3, 1e-4))


# --------------------------------------------------------------------------- bad inputs


def good_args():
    q, k, v, dout, seg_ids, s, scale = make_inputs(1, 4, 2, 10, 8, seg_ids=torch.tensor([[0, 0, 1, 1, 1, 1, 2, 2,
                                                                                           2, 2]]))
    return dict(q=q, k=k, v=v, grad_out=dout, seg_ids=seg_ids, num_segments=s, scale=scale, head_reduction="sum_abs",
                lse=torch.zeros(1, 4, 10), sink=torch.zeros(4), window=4,
                oeb_bounds=torch.tensor([[[-1, -1], [-1, -1], [0, 2], [0, 2], [0, 2], [0, 2], [2, 6], [2, 6],
                                          [2, 6], [2, 6]]]),
                oeb_rule="bridge", oeb_strength=0.5, oeb_tau_max=0.15, oeb_eps=1e-6)


def _set(key, value):
    return lambda a: a.update({key: value(a) if callable(value) else value})


def _bound(i, pair):
    return lambda a: a["oeb_bounds"].__setitem__((0, i), torch.tensor(pair))


def bad_cases():
    """(id, change to good_args, text the ValueError must contain)."""
    return [
        ("q-3d", _set("q", lambda a: a["q"][0]), "q must have 4 dimensions"),
        ("k-dtype", _set("k", lambda a: a["k"].double()), "share one dtype"),
        ("q-int", _set("q", lambda a: a["q"].long()), "q must have dtype"),
        ("grad_out-shape", _set("grad_out", lambda a: a["grad_out"][:, :2]), "grad_out"),
        ("grad_out-dtype", _set("grad_out", lambda a: a["grad_out"].long()), "grad_out must have dtype"),
        ("kv-heads", lambda a: a.update(k=a["k"][:, :1].expand(1, 3, 10, 8), v=a["v"][:, :1].expand(1, 3, 10, 8)),
         "multiple of the kv heads"),
        ("tq-tk", lambda a: a.update(k=a["k"][:, :, :9], v=a["v"][:, :, :9]), "Tq == Tk"),
        ("seg-too-big", lambda a: a["seg_ids"].fill_(a["num_segments"]), "num_segments"),
        ("seg-below-minus-1", lambda a: a["seg_ids"].fill_(-2), "seg_ids must be >= -1"),
        ("seg-float", _set("seg_ids", lambda a: a["seg_ids"].float()), "seg_ids must have dtype"),
        ("seg-shape", _set("seg_ids", lambda a: a["seg_ids"][:, :9]), "seg_ids must have shape"),
        ("num_segments-0", _set("num_segments", 0), "num_segments"),
        ("num_segments-float", _set("num_segments", 3.0), "num_segments"),
        ("scale-0", _set("scale", 0.0), "scale"),
        ("scale-inf", _set("scale", float("inf")), "scale"),
        ("head_reduction", _set("head_reduction", "max"), "head_reduction"),
        ("lse-shape", _set("lse", lambda a: a["lse"][:, :2]), "lse must have shape"),
        ("lse-dtype", _set("lse", lambda a: a["lse"].double()), "lse must have dtype"),
        ("sink-shape", _set("sink", torch.zeros(3)), "sink must have shape"),
        ("sink-int", _set("sink", torch.zeros(4, dtype=torch.long)), "sink must have dtype"),
        ("sink-nan", _set("sink", torch.tensor([0.0, float("nan"), 0.0, 0.0])), r"sink\[1\] = nan is not finite"),
        ("window-0", _set("window", 0), "window must be"),
        ("window-neg", _set("window", -3), "window must be"),
        ("oeb-shape", _set("oeb_bounds", lambda a: a["oeb_bounds"][:, :9]), "oeb_bounds must have shape"),
        ("oeb-dtype", _set("oeb_bounds", lambda a: a["oeb_bounds"].float()), "oeb_bounds must have dtype"),
        ("oeb-a>b", _bound(3, (3, 2)), r"oeb_bounds\[0, 3\]"),
        ("oeb-after-query", _bound(2, (0, 4)), r"oeb_bounds\[0, 2\]"),
        ("oeb-half-off", _bound(4, (-1, 2)), r"oeb_bounds\[0, 4\]"),
        ("oeb-below-minus-1", _bound(0, (-2, -2)), r"oeb_bounds\[0, 0\]"),
        ("oeb_rule", _set("oeb_rule", "kl"), "oeb_rule must be one of"),
        ("oeb_strength-big", _set("oeb_strength", 1.5), "oeb_strength must be in"),
        ("oeb_strength-nan", _set("oeb_strength", float("nan")), "oeb_strength must be in"),
        ("oeb_tau_max-0", _set("oeb_tau_max", 0.0), "oeb_tau_max must be in"),
        ("oeb_tau_max-big", _set("oeb_tau_max", 2.0), "oeb_tau_max must be in"),
        ("oeb_eps-0", _set("oeb_eps", 0.0), "oeb_eps must be in"),
        ("oeb_eps-big", _set("oeb_eps", 0.7), "oeb_eps must be in"),
        ("oeb-padding-inside", lambda a: a["seg_ids"].__setitem__((0, 5), -1),
         r"with oeb_bounds, padding \(seg id -1\) must be at the ends of a row, but batch row 0"),
    ]


@pytest.mark.parametrize("case", bad_cases(), ids=lambda c: c[0])
def test_bad_inputs_wrapper_value_error(case):
    _, change, text = case
    args = good_args()
    ops.step_saliency_pool(**args)  # the unchanged arguments are fine
    change(args)
    with pytest.raises(ValueError, match=text):
        ops.step_saliency_pool(**args)


def direct(args):
    """good_args() in the schema's order, for torch.ops.stepflow.step_saliency_pool."""
    return tuple(args.values())


# The same mistakes straight into torch.ops: the kernel's TORCH_CHECKs (RuntimeError).
DIRECT_BAD = {
    "q-3d": "must be 4-D", "k-dtype": "share one dtype", "q-int": "q must be float32",
    "grad_out-shape": "grad_out must have the shape of q", "grad_out-dtype": "share one dtype",
    "kv-heads": "multiple of the kv heads", "tq-tk": "Tq == Tk", "seg-too-big": "num_segments",
    "seg-below-minus-1": "must be >= -1", "seg-float": "seg_ids must be int64", "seg-shape": "seg_ids must have shape",
    "num_segments-0": "num_segments", "scale-0": "scale", "scale-inf": "scale", "head_reduction": "head_reduction",
    "lse-shape": "lse must have shape", "lse-dtype": "lse must be float32", "sink-shape": "sink must have shape",
    "sink-int": "sink must be a float tensor", "sink-nan": r"sink\[1\] = nan is not finite",
    "window-0": "window must be", "window-neg": "window must be",
    "oeb-shape": "oeb_bounds must have shape", "oeb-dtype": "oeb_bounds must be int64",
    "oeb-a>b": r"oeb_bounds\[0, 3\] = \(3, 2\)", "oeb-after-query": r"oeb_bounds\[0, 2\] = \(0, 4\)",
    "oeb-half-off": r"oeb_bounds\[0, 4\]", "oeb-below-minus-1": r"oeb_bounds\[0, 0\]",
    "oeb_rule": "rule must be 'bridge' or 'odds'", "oeb_strength-big": "strength must be in",
    "oeb_strength-nan": "strength must be in", "oeb_tau_max-0": "tau_max must be in",
    "oeb_tau_max-big": "tau_max must be in", "oeb_eps-0": "eps must be in", "oeb_eps-big": "eps must be in",
    "oeb-padding-inside": r"padding \(seg id -1\) must be at the ends of a row",
}


@pytest.mark.parametrize("case", [c for c in bad_cases() if c[0] in DIRECT_BAD], ids=lambda c: c[0])
def test_bad_inputs_direct_runtime_error(case):
    name, change, _ = case
    args = good_args()
    change(args)
    with pytest.raises(RuntimeError, match=DIRECT_BAD[name]):
        op(*direct(args))
