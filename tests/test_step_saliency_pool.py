"""stepflow::step_saliency_pool (CPU) against the materialized float64 reference (design.md 2.2).

Tolerances. Every input is first rounded to the dtype under test and the reference sees the
very same rounded values (in float64), so the only difference is the kernel's own arithmetic:
fp32 for fp32/fp16/bf16 inputs, fp64 for fp64 inputs (output rounded to fp32; a given lse is
fp32 by the schema, so fp64 with lse is held to fp32 tolerances). A bin's rounding error
scales with the sum of the |terms| that enter it, i.e. with the abs_sum map `mag`, not with
the sum_abs value (which may cancel). So each bin is checked as
    |M - M_ref| <= rtol * mag + atol * max(mag)
with tolerances(float32) for bf16/fp16 inputs too: the looser bf16/fp16 tolerances would
only hide kernel bugs, since no half-precision arithmetic happens in the kernel.
Bins without any causal pair (c after a, padding, unused segment ids) must be exactly 0.

OEB variant (oeb_seg_start / oeb_strength / oeb_num_sink): the same check with A' in place of
A on both sides (mag is the abs_sum map of A'); the factors r_C, r_X come from fp32 sums of
positive terms, so they carry fp32-level relative error only.
"""
from __future__ import annotations

import pytest
import torch

from conftest import random_seg_ids, tolerances
from stepflow_ext import ops
from stepflow_ext import reference as ref

op = torch.ops.stepflow.step_saliency_pool
REDUCTIONS = ("sum_abs", "abs_sum")


def make_inputs(b, h, h_kv, t, d, dtype=torch.float32, pad="left", seg_ids=None, extra_segments=3):
    """Random q, k, v, dO rounded to dtype; seg ids from random_seg_ids unless given."""
    if seg_ids is None:
        seg_ids, _, used = random_seg_ids(b, t, max_segments=6, pad=pad)
    else:
        used = int(seg_ids.max()) + 1
    num_segments = used + extra_segments  # ids need not fill 0..S-1
    q = (2 * torch.randn(b, h, t, d)).to(dtype)  # 2x: peakier softmax rows
    k = torch.randn(b, h_kv, t, d).to(dtype)
    v = torch.randn(b, h_kv, t, d).to(dtype)
    dout = torch.randn(b, h, t, d).to(dtype)
    return q, k, v, dout, seg_ids, num_segments, d ** -0.5


def reference_lse(q, k, seg_ids, scale):
    """Row log-sum-exp over causal valid keys, float64 on the rounded inputs, handed over in fp32."""
    allowed = ref.causal_valid_mask(seg_ids >= 0, q.shape[2])
    scores = scale * torch.einsum("bhid,bhjd->bhij", q.double(), ref._expand_kv(k.double(), q.shape[1]))
    return torch.logsumexp(scores.masked_fill(~allowed[:, None], float("-inf")), dim=-1).float()


def reference_maps(q, k, v, dout, seg_ids, num_segments, scale, head_reduction, **oeb):
    """The float64 map and its abs_sum magnitude (the error scale of each bin); oeb: the
    oeb_seg_start / oeb_strength / oeb_num_sink keywords, if any."""
    args = [x.double() for x in (q, k, v, dout)]
    expected = ref.step_saliency_pool(*args, seg_ids, num_segments, scale, head_reduction, **oeb)
    mag = ref.step_saliency_pool(*args, seg_ids, num_segments, scale, "abs_sum", **oeb)
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


def check(q, k, v, dout, seg_ids, num_segments, scale, head_reduction, with_lse, **oeb):
    expected, mag = reference_maps(q, k, v, dout, seg_ids, num_segments, scale, head_reduction, **oeb)
    lse = reference_lse(q, k, seg_ids, scale) if with_lse else None
    got = ops.step_saliency_pool(q, k, v, dout, seg_ids, num_segments, scale, head_reduction, lse=lse, **oeb)
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


def test_non_contiguous_inputs(seed):
    """(B, T, H, d) tensors transposed to (B, H, T, d), as the HF attention interface may hand them."""
    b, h, h_kv, t, d = 2, 6, 2, 45, 16
    seg_ids, _, used = random_seg_ids(b, t, pad="left")
    q, dout = (torch.randn(b, t, h, d).transpose(1, 2) for _ in range(2))
    k, v = (torch.randn(b, t, h_kv, d).transpose(1, 2) for _ in range(2))
    assert not q.is_contiguous()
    for reduction in REDUCTIONS:
        check(q, k, v, dout, seg_ids, used, 0.3, reduction, with_lse=True)
        check(q, k, v, dout, seg_ids, used, 0.3, reduction, with_lse=False)


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
    q, k, v, dout, seg_ids, s, scale = make_inputs(2, 4, 2, 23, 8, pad="right")
    lse = reference_lse(q, k, seg_ids, scale) if with_lse else None
    torch.library.opcheck(op.default, (q, k, v, dout, seg_ids, s, scale, head_reduction, lse))


# --------------------------------------------------------------------------- OEB (design.md 2.3)
# In an OEB layer the saliency is measured on the rebalanced A' (oeb_seg_start and friends).


def oeb_inputs(b, h, h_kv, t, d, dtype=torch.float32, pad="left"):
    """make_inputs plus the prefill seg_start of oeb_attention (-1 on question tokens and
    padding). With left padding some row is made to start late (kv_start > 0)."""
    while True:
        seg_ids, kinds, _ = random_seg_ids(b, t, max_segments=6, pad=pad)
        if pad != "left" or b == 1 or t == 1 or bool((seg_ids[:, 0] < 0).any()):
            break
    args = make_inputs(b, h, h_kv, t, d, dtype=dtype, seg_ids=seg_ids)
    return args, ref.seg_start_from_seg_ids(seg_ids, kinds)


def check_oeb(b, h, h_kv, t, d, pad, head_reduction, with_lse, strength, num_sink, dtype=torch.float32):
    args, seg_start = oeb_inputs(b, h, h_kv, t, d, dtype=dtype, pad=pad)
    return check(*args, head_reduction, with_lse, oeb_seg_start=seg_start, oeb_strength=strength,
                 oeb_num_sink=num_sink)


@pytest.mark.parametrize("with_lse", [False, True], ids=["no_lse", "lse"])
@pytest.mark.parametrize("head_reduction", REDUCTIONS)
@pytest.mark.parametrize("num_sink", [0, 1, 3], ids=lambda n: f"sink{n}")
@pytest.mark.parametrize("strength", [0.0, 0.5, 1.0], ids=lambda s: f"lam{s}")
def test_oeb_matches_reference_strengths(seed, strength, num_sink, head_reduction, with_lse):
    """GQA, 3 rows of different lengths padded left (kv_start > 0), several query blocks."""
    check_oeb(3, 6, 2, 83, 16, "left", head_reduction, with_lse, strength, num_sink)


@pytest.mark.parametrize("head_reduction", REDUCTIONS)
@pytest.mark.parametrize("b,h,h_kv,t,d,pad", SHAPES)
def test_oeb_matches_reference_shapes(seed, b, h, h_kv, t, d, pad, head_reduction):
    """With lse (its path needs P masked on padding for the OEB masses); without: test above."""
    check_oeb(b, h, h_kv, t, d, pad, head_reduction, True, strength=0.7, num_sink=2)


@pytest.mark.parametrize("with_lse", [False, True], ids=["no_lse", "lse"])
@pytest.mark.parametrize("head_reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_oeb_matches_reference_dtypes(seed, dtype, head_reduction, with_lse):
    check_oeb(2, 6, 2, 97, 16, "left", head_reduction, with_lse, strength=1.0, num_sink=1, dtype=dtype)


@pytest.mark.parametrize("with_lse", [False, True], ids=["no_lse", "lse"])
@pytest.mark.parametrize("case", sorted(SPECIAL_SEG_IDS))
def test_oeb_arbitrary_seg_start(seed, case, with_lse):
    """Any seg_start in {-1} u [0, i] is valid: before kv_start, inside the sinks, on padding
    queries, with padding inside the row (P must be 0 on those keys in the OEB masses)."""
    seg_ids = torch.tensor(SPECIAL_SEG_IDS[case], dtype=torch.long)
    b, t = seg_ids.shape
    seg_start = (torch.rand(b, t) * (torch.arange(t) + 2)).long() - 1  # uniform in [-1, i]
    args = make_inputs(b, 4, 2, t, 8, seg_ids=seg_ids)
    for reduction in REDUCTIONS:
        check(*args, reduction, with_lse, oeb_seg_start=seg_start, oeb_strength=0.8, oeb_num_sink=2)


@pytest.mark.parametrize("with_lse", [False, True], ids=["no_lse", "lse"])
@pytest.mark.parametrize("strength", [0.5, 1.0], ids=lambda s: f"lam{s}")
def test_oeb_large_score_gaps(seed, strength, with_lse):
    """Score gaps far beyond fp32 exp's range (~87): whole groups underflow to 0 in the fp32
    strip while the rebalance lifts them (to half the mass at lambda = 1). The kernel must
    recompute those rows exactly; the float64 reference resolves them."""
    args, seg_start = oeb_inputs(2, 4, 2, 100, 16)
    q, k, v, dout, seg_ids, s, scale = args
    q = 40 * q  # scores of std ~80
    a = ref.attention_probs(q.double(), k.double(), scale, ref.causal_valid_mask(seg_ids >= 0, q.shape[2]))
    valid = seg_ids >= 0
    kv_start = torch.where(valid.any(1), valid.int().argmax(1), seg_ids.shape[1])
    _, _, current, context = ref.oeb_groups(seg_start, kv_start, 100, 100, 1)
    p_c, p_x = (a * current[:, None]).sum(-1), (a * context[:, None]).sum(-1)
    assert bool(((p_x > 0) & (p_x < 1e-30) & (p_c > p_x)).any())  # the case is not vacuous
    for reduction in REDUCTIONS:
        check(q, k, v, dout, seg_ids, s, scale, reduction, with_lse, oeb_seg_start=seg_start,
              oeb_strength=strength, oeb_num_sink=1)


def oeb_vs_plain(strength, num_sink=1, with_lse=False, head_reduction="sum_abs"):
    args, seg_start = oeb_inputs(2, 6, 2, 120, 16)
    q, k, v, dout, seg_ids, s, scale = args
    lse = reference_lse(q, k, seg_ids, scale) if with_lse else None
    plain = ops.step_saliency_pool(*args, head_reduction, lse=lse)
    bridged = ops.step_saliency_pool(*args, head_reduction, lse=lse, oeb_seg_start=seg_start,
                                     oeb_strength=strength, oeb_num_sink=num_sink)
    return plain, bridged, args, seg_start


@pytest.mark.parametrize("with_lse", [False, True], ids=["no_lse", "lse"])
@pytest.mark.parametrize("head_reduction", REDUCTIONS)
def test_oeb_strength_zero_is_plain(seed, head_reduction, with_lse):
    """lambda = 0 is the identity: r = 1 up to rounding of o^1 in float64."""
    plain, bridged, _, _ = oeb_vs_plain(0.0, num_sink=3, with_lse=with_lse, head_reduction=head_reduction)
    torch.testing.assert_close(bridged, plain, atol=1e-6 * float(plain.abs().max()), rtol=1e-6)


def test_oeb_changes_the_map(seed):
    """At lambda = 1 the rebalance moves saliency a lot (far beyond the tolerance), and the op
    follows the reference there: a kernel that ignored the OEB args would fail here.
    Fixed layout: a question, three steps of 30 tokens and a summary (rows 1.. are rebalanced)."""
    lengths, kinds = [16, 30, 30, 30, 14], [ref.QUESTION, ref.STEP, ref.STEP, ref.STEP, ref.SUMMARY]
    seg_ids = torch.tensor([[s for s, n in enumerate(lengths) for _ in range(n)]])
    seg_start = ref.seg_start_from_seg_ids(seg_ids, torch.tensor([kinds]))
    args = make_inputs(1, 6, 2, seg_ids.shape[1], 16, seg_ids=seg_ids)
    plain = ops.step_saliency_pool(*args)
    bridged = ops.step_saliency_pool(*args, oeb_seg_start=seg_start, oeb_strength=1.0, oeb_num_sink=1)
    expected, mag = reference_maps(*args, "sum_abs", oeb_seg_start=seg_start, oeb_strength=1.0, oeb_num_sink=1)
    assert_map_close(bridged, expected, mag, seg_ids, args[5], fp64_kernel=False)
    atol, rtol = tolerances(torch.float32)
    bound = rtol * mag + atol * mag.max()
    moved = (bridged.double() - plain.double()).abs()
    assert float(moved.max()) > 0.02 * float(mag[:, 1:].max())  # 2% of the largest rebalanced bin ...
    assert float((moved - 100 * bound).max()) > 0                # ... and 100x the tolerance somewhere


@pytest.mark.parametrize("strength", [0.5, 1.0], ids=lambda s: f"lam{s}")
def test_oeb_consistent_with_oeb_attention(seed, strength):
    """Independent of reference.token_saliency: with v, dO > 0 every term A'_ij dO_i.v_j is
    positive, so both reductions equal the plain sum, and a row of the map sums to
    sum_{i in a} sum_h dO_i . o_i with o = reference.oeb_attention's output (o_i = sum_j A'_ij v_j)."""
    args, seg_start = oeb_inputs(2, 6, 2, 90, 16)
    q, k, v, dout, seg_ids, s, scale = args
    v, dout = v.abs(), dout.abs()
    valid = seg_ids >= 0
    kv_start = torch.where(valid.any(1), valid.int().argmax(1), seg_ids.shape[1])
    out, _, _ = ref.oeb_attention(q.double(), k.double(), v.double(), seg_start, kv_start, strength, 2, scale)
    per_query = (dout.double() * out).sum(dim=(1, 3)) * valid  # (B, T)
    expected = torch.zeros(2, s, dtype=torch.float64)
    expected.index_put_((torch.arange(2)[:, None].expand_as(seg_ids)[valid], seg_ids[valid]), per_query[valid],
                        accumulate=True)
    for reduction in REDUCTIONS:
        got = ops.step_saliency_pool(q, k, v, dout, seg_ids, s, scale, reduction, oeb_seg_start=seg_start,
                                     oeb_strength=strength, oeb_num_sink=2)
        torch.testing.assert_close(got.double().sum(-1), expected, rtol=1e-5, atol=1e-6 * float(expected.max()))


@pytest.mark.parametrize("with_lse", [False, True], ids=["no_lse", "lse"])
@pytest.mark.parametrize("head_reduction", REDUCTIONS)
def test_opcheck_oeb(seed, head_reduction, with_lse):
    args, seg_start = oeb_inputs(2, 4, 2, 23, 8, pad="left")
    q, k, v, dout, seg_ids, s, scale = args
    lse = reference_lse(q, k, seg_ids, scale) if with_lse else None
    torch.library.opcheck(op.default, (*args, head_reduction, lse, seg_start, 0.5, 1))


# --------------------------------------------------------------------------- bad inputs


def good_args():
    q, k, v, dout, seg_ids, s, scale = make_inputs(1, 4, 2, 10, 8, seg_ids=torch.zeros(1, 10, dtype=torch.long))
    return dict(q=q, k=k, v=v, grad_out=dout, seg_ids=seg_ids, num_segments=s, scale=scale,
                head_reduction="sum_abs", lse=torch.zeros(1, 4, 10),
                oeb_seg_start=torch.tensor([[-1, -1, 2, 2, 2, 5, 5, -1, 8, 8]]), oeb_strength=0.5, oeb_num_sink=1)


def bad_cases():
    """(id, change to good_args, text the ValueError must contain)."""
    return [
        ("q-3d", lambda a: a.update(q=a["q"][0]), "q must have 4 dimensions"),
        ("k-dtype", lambda a: a.update(k=a["k"].double()), "share one dtype"),
        ("q-int", lambda a: a.update(q=a["q"].long()), "q must have dtype"),
        ("grad_out-shape", lambda a: a.update(grad_out=a["grad_out"][:, :2]), "grad_out"),
        ("kv-heads", lambda a: a.update(k=a["k"][:, :1].expand(1, 3, 10, 8), v=a["v"][:, :1].expand(1, 3, 10, 8)),
         "multiple of the kv heads"),
        ("tq-tk", lambda a: a.update(k=a["k"][:, :, :9], v=a["v"][:, :, :9]), "Tq == Tk"),
        ("seg-too-big", lambda a: a["seg_ids"].fill_(a["num_segments"]), "num_segments"),
        ("seg-below-minus-1", lambda a: a["seg_ids"].fill_(-2), "seg_ids must be >= -1"),
        ("seg-float", lambda a: a.update(seg_ids=a["seg_ids"].float()), "seg_ids must have dtype"),
        ("seg-shape", lambda a: a.update(seg_ids=a["seg_ids"][:, :9]), "seg_ids must have shape"),
        ("num_segments-0", lambda a: a.update(num_segments=0), "num_segments"),
        ("scale-0", lambda a: a.update(scale=0.0), "scale"),
        ("head_reduction", lambda a: a.update(head_reduction="max"), "head_reduction"),
        ("lse-shape", lambda a: a.update(lse=a["lse"][:, :2]), "lse must have shape"),
        ("lse-dtype", lambda a: a.update(lse=a["lse"].double()), "lse must have dtype"),
        ("oeb-shape", lambda a: a.update(oeb_seg_start=a["oeb_seg_start"][:, :9]), "oeb_seg_start must have shape"),
        ("oeb-dtype", lambda a: a.update(oeb_seg_start=a["oeb_seg_start"].float()), "oeb_seg_start must"),
        ("oeb-after-query", lambda a: a["oeb_seg_start"].__setitem__((0, 3), 4), "oeb_seg_start must be -1"),
        ("oeb-below-minus-1", lambda a: a["oeb_seg_start"].__setitem__((0, 0), -2), "oeb_seg_start must be -1"),
        ("oeb_strength-big", lambda a: a.update(oeb_strength=1.5), "oeb_strength must be in"),
        ("oeb_strength-neg", lambda a: a.update(oeb_strength=-0.1), "oeb_strength must be in"),
        ("oeb_strength-nan", lambda a: a.update(oeb_strength=float("nan")), "oeb_strength must be in"),
        ("oeb_num_sink-neg", lambda a: a.update(oeb_num_sink=-1), "oeb_num_sink must be"),
    ]


@pytest.mark.parametrize("case", bad_cases(), ids=lambda c: c[0])
def test_bad_inputs_wrapper_value_error(case):
    _, change, text = case
    args = good_args()
    ops.step_saliency_pool(**args)  # the unchanged arguments are fine
    change(args)
    with pytest.raises(ValueError, match=text):
        ops.step_saliency_pool(**args)


# The same mistakes straight into torch.ops: the kernel's TORCH_CHECKs (RuntimeError).
DIRECT_BAD = {
    "q-3d": "must be 4-D", "k-dtype": "share one dtype", "q-int": "q must be float32",
    "grad_out-shape": "grad_out must have the shape of q", "kv-heads": "multiple of the kv heads",
    "tq-tk": "Tq == Tk", "seg-too-big": "num_segments", "seg-below-minus-1": "must be >= -1",
    "seg-float": "seg_ids must be int64", "seg-shape": "seg_ids must have shape", "num_segments-0": "num_segments",
    "scale-0": "scale", "head_reduction": "head_reduction", "lse-shape": "lse must have shape",
    "lse-dtype": "lse must be float32",
    "oeb-shape": "oeb_seg_start must have shape", "oeb-dtype": "oeb_seg_start must be int64",
    "oeb-after-query": "got 4 for query 3", "oeb-below-minus-1": "got -2 for query 0",
    "oeb_strength-big": "oeb_strength must be in", "oeb_strength-neg": "oeb_strength must be in",
    "oeb_strength-nan": "oeb_strength must be in", "oeb_num_sink-neg": "oeb_num_sink must be >= 0",
}


@pytest.mark.parametrize("case", bad_cases(), ids=lambda c: c[0])
def test_bad_inputs_direct_runtime_error(case):
    name, change, _ = case
    args = good_args()
    change(args)
    with pytest.raises(RuntimeError, match=DIRECT_BAD[name]):
        op(*args.values())
