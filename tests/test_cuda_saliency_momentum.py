"""CUDA kernels of step_saliency_pool (with and without OEB) and step_momentum (prefill and
decode) against the float64 reference on the GPU and against the CPU kernels.

Skipped without a CUDA device; run by scripts/gpu_check.sh (`pytest -m cuda`). Kept small: the
reference materializes (B, H, T, T) in float64.

Saliency: the three head reductions (sum_abs, abs_sum, abs_mean = the paper's), attention sinks
(per-head logits in the softmax denominator), sliding windows, a given lse, and OEB (A' of the
bridge or odds rule, design.md 2.3, with bounds from reference.oeb_bounds and channel offsets that
make rows trigger, including score gaps far beyond fp32's exp range). Tolerances are those of
tests/test_step_saliency_pool.py: each bin within rtol * mag + atol * max(mag) of the reference
(mag = the abs_sum map, or abs_mean's, the scale of a bin's rounding error), with
tolerances(float32) for fp32 / bf16 / fp16 inputs (the kernel computes in fp32: tensor-core
products of bf16 / fp16 values are exact, accumulation is fp32) and tolerances(float64) for fp64
inputs without an (fp32) lse. Bins without causal pairs are exactly 0.

step_momentum on the GPU sums in the CPU kernel's order with correctly rounded operations, so it
is checked bit for bit against the CPU kernel (and decode chunkings against prefill), besides
the reference at tolerances(dtype).
"""
from __future__ import annotations

import random

import pytest
import torch

from conftest import random_seg_ids, tolerances
from stepflow_ext import ops
from stepflow_ext import reference as ref
from stepflow_ext.reference import QUESTION, STEP, SUMMARY
from test_step_momentum import rows_to_tensors

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CUDA = "cuda"
sal_op = torch.ops.stepflow.step_saliency_pool
REDUCTIONS = ("sum_abs", "abs_sum", "abs_mean")
FLOATS = [torch.float32, torch.bfloat16, torch.float16]
# Logit offsets per key channel (question, thinking, summary) that make OEB rows trigger: the
# bridge (question for thinking queries, thinking for summary queries) is small.
BRIDGE_GAPS = (-4.0, -3.0, 0.0)


# =========================================================================== step_saliency_pool


def sal_inputs(b, h, h_kv, t, d, dtype=torch.float32, pad="left", seg_ids=None, kinds=None, extra_segments=2,
               gaps=None):
    """q, k, v, dO rounded to dtype (made on the CPU from the seed, then moved), seg ids, S, scale, kinds.

    gaps (needs kinds): logit offsets per key channel, added through coordinate 0 of q and k."""
    if seg_ids is None:
        seg_ids, kinds, used = random_seg_ids(b, t, max_segments=6, pad=pad)
    else:
        used = int(seg_ids.max()) + 1
    scale = d ** -0.5
    q = 2 * torch.randn(b, h, t, d)  # 2x: peakier softmax rows
    k = torch.randn(b, h_kv, t, d)
    v = torch.randn(b, h_kv, t, d)
    dout = torch.randn(b, h, t, d)
    if gaps is not None:
        channel = ref.channel_of_tokens(seg_ids, kinds)
        offset = torch.tensor(gaps)[channel.clamp(min=0)] * (channel >= 0)
        q[..., 0] = 4.0
        k[..., 0] = offset[:, None, :] / (4.0 * scale)
    return [x.to(dtype).to(CUDA) for x in (q, k, v, dout)] + [seg_ids.to(CUDA)], used + extra_segments, scale, kinds


def ref_lse(q, k, seg_ids, scale, window=None):
    """Row log-sum-exp over the causal valid keys (in the window) in float64, handed over in fp32 (as
    forward kernels give it); no sink."""
    allowed = ref.causal_valid_mask(seg_ids >= 0, q.shape[2], window)
    scores = scale * torch.einsum("bhid,bhjd->bhij", q.double(), ref._expand_kv(k.double(), q.shape[1]))
    return torch.logsumexp(scores.masked_fill(~allowed[:, None], float("-inf")), dim=-1).float()


def ref_maps(q, k, v, dout, seg_ids, s, scale, reduction, **extra):
    """The reference map and the magnitude map its tolerance scales with (abs_sum, or abs_mean)."""
    args = [x.double() for x in (q, k, v, dout)]
    extra = {key: (val.double() if key == "sink" and val is not None else val) for key, val in extra.items()}
    expected = ref.step_saliency_pool(*args, seg_ids, s, scale, reduction, **extra)
    mag = ref.step_saliency_pool(*args, seg_ids, s, scale, "abs_mean" if reduction == "abs_mean" else "abs_sum",
                                 **extra)
    return expected, mag


def assert_map_close(got, expected, mag, seg_ids, s, fp64_kernel=False, factor=1.0):
    assert got.dtype == torch.float32 and got.shape == expected.shape and got.device == expected.device
    atol, rtol = tolerances(torch.float64 if fp64_kernel else torch.float32)
    got = got.double()
    bound = factor * (rtol * mag + atol * mag.max())
    err = (got - expected).abs()
    worst = int((err - bound).argmax())
    assert bool((err <= bound).all()), (
        f"max excess at flat index {worst}: got {got.flatten()[worst].item()}, "
        f"expected {expected.flatten()[worst].item()} (mag {mag.flatten()[worst].item()})")
    empty = ref.causal_pair_counts(seg_ids, s) == 0
    assert bool((got[empty] == 0).all()), "bins without causal pairs must be exactly 0"


def check_saliency(tensors, s, scale, reduction, with_lse, compare_cpu=False, **extra):
    """The op on the GPU against the float64 reference (and the CPU kernel); extra: sink, window and
    the OEB arguments, as ops.step_saliency_pool takes them."""
    q, k, v, dout, seg_ids = tensors
    expected, mag = ref_maps(q, k, v, dout, seg_ids, s, scale, reduction, **extra)
    assert float(expected.abs().max()) > 0  # the case is not vacuous
    lse = ref_lse(q, k, seg_ids, scale, extra.get("window")) if with_lse else None
    got = ops.step_saliency_pool(q, k, v, dout, seg_ids, s, scale, reduction, lse=lse, **extra)
    torch.cuda.synchronize()
    fp64 = q.dtype == torch.float64 and lse is None
    assert_map_close(got, expected, mag, seg_ids, s, fp64)
    if compare_cpu:  # the CPU kernel on the same inputs agrees to the same tolerance
        cpu_extra = {key: (val.cpu() if isinstance(val, torch.Tensor) else val) for key, val in extra.items()}
        cpu = ops.step_saliency_pool(*(x.cpu() for x in tensors), s, scale, reduction,
                                     lse=None if lse is None else lse.cpu(), **cpu_extra)
        assert_map_close(cpu, expected.cpu(), mag.cpu(), seg_ids.cpu(), s, fp64)
        assert_map_close(got.cpu(), cpu.double(), mag.cpu(), seg_ids.cpu(), s, fp64, factor=2.0)
    return got


def oeb_kwargs(seg_ids, kinds, rule="bridge", strength=0.5, num_sink=1, tau_max=0.15):
    bounds = ref.oeb_bounds(seg_ids.cpu(), kinds, rule, num_sink).to(CUDA)
    return dict(oeb_bounds=bounds, oeb_rule=rule, oeb_strength=strength, oeb_tau_max=tau_max)


def oeb_active_rows(tensors, scale, window=None, sink=None, **oeb):
    """The number of (batch, head, query) rows the rule changes in this case (float64 reference)."""
    q, k, v, dout, seg_ids = tensors
    valid = seg_ids >= 0
    t = q.shape[2]
    kv_start = torch.where(valid.any(dim=1), valid.to(torch.int8).argmax(dim=1), t)
    stats = ref.oeb_probs(q.double(), k.double(), kv_start, oeb["oeb_bounds"], oeb["oeb_rule"], oeb["oeb_strength"],
                          oeb["oeb_tau_max"], 1e-6, None if sink is None else sink.double(), window, scale)[3]
    return int((stats[..., 4] * valid[:, None]).sum())


# (B, H, H_kv, T, d, pad): d = 64 and 128 (one tile chunk), 80 (generic: zero-padded), 16 and
# 8 (small, padded); GQA / MQA / MHA; odd T; T = 1; several query blocks and key tiles (64).
SAL_SHAPES = [
    pytest.param(1, 4, 4, 37, 64, "left", id="mha-T37-d64"),
    pytest.param(2, 6, 2, 130, 128, "left", id="gqa-B2-leftpad-T130-d128"),
    pytest.param(3, 4, 1, 71, 80, "right", id="mqa-B3-rightpad-T71-d80"),
    pytest.param(2, 6, 3, 203, 16, "right", id="gqa-B2-rightpad-T203-d16"),
    pytest.param(2, 2, 1, 1, 8, "left", id="T1"),
]


# (reduction, lse) in pairs: the lse-given path and the stats pass each meet the reductions
# across the file.
RED_LSE = [pytest.param("sum_abs", False, id="sum_abs-no_lse"), pytest.param("abs_sum", True, id="abs_sum-lse"),
           pytest.param("abs_mean", False, id="abs_mean-no_lse")]


@pytest.mark.parametrize("reduction,with_lse", RED_LSE)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("b,h,h_kv,t,d,pad", SAL_SHAPES)
def test_saliency_matches_reference(seed, b, h, h_kv, t, d, pad, dtype, reduction, with_lse):
    tensors, s, scale, _ = sal_inputs(b, h, h_kv, t, d, dtype=dtype, pad=pad)
    check_saliency(tensors, s, scale, reduction, with_lse)


@pytest.mark.parametrize("with_lse", [False, True], ids=["no_lse", "lse"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_saliency_fp64_and_big_head_dim(seed, reduction, with_lse):
    """fp64 (FMA tiles in double, 32-wide chunks) and d = 256 (two 128-wide chunks, bf16)."""
    tensors, s, scale, _ = sal_inputs(2, 4, 2, 97, 40, dtype=torch.float64)
    check_saliency(tensors, s, scale, reduction, with_lse)
    tensors, s, scale, _ = sal_inputs(1, 4, 2, 70, 256, dtype=torch.bfloat16)
    check_saliency(tensors, s, scale, reduction, with_lse)


@pytest.mark.parametrize("dtype", FLOATS + [torch.float64], ids=str)
def test_saliency_matches_cpu_kernel(seed, dtype):
    tensors, s, scale, _ = sal_inputs(2, 6, 2, 150, 64, dtype=dtype)
    for reduction in REDUCTIONS:
        check_saliency(tensors, s, scale, reduction, with_lse=False, compare_cpu=True)


def test_saliency_abs_mean_is_abs_sum_over_heads(seed):
    """abs_mean (the paper's head reduction) is abs_sum / H, with and without OEB."""
    for h, h_kv in ((28, 4), (12, 2)):
        tensors, s, scale, kinds = sal_inputs(2, h, h_kv, 90, 64, dtype=torch.bfloat16, gaps=BRIDGE_GAPS)
        for extra in ({}, oeb_kwargs(tensors[4], kinds)):
            mean = ops.step_saliency_pool(*tensors, s, scale, "abs_mean", **extra)
            total = ops.step_saliency_pool(*tensors, s, scale, "abs_sum", **extra)
            torch.testing.assert_close(mean * h, total, atol=1e-6 * float(total.abs().max()), rtol=1e-5)


@pytest.mark.parametrize("dtype", FLOATS + [torch.float64], ids=str)
@pytest.mark.parametrize("window", [None, 1, 16, 64, 100], ids=lambda w: f"window{w}")
def test_saliency_sink_and_window(seed, window, dtype):
    """Attention sinks (A = exp(s - lse) / (1 + exp(sink - lse))) and sliding windows (keys j > i - w),
    alone and together, with and without a given lse, against the reference and the CPU kernel."""
    tensors, s, scale, _ = sal_inputs(2, 6, 2, 150, 64, dtype=dtype, pad="left")
    sink = (2 * torch.randn(6)).to(CUDA)
    for reduction, with_lse, extra in (("sum_abs", False, dict(sink=sink, window=window)),
                                       ("abs_sum", True, dict(sink=sink.to(torch.bfloat16), window=window)),
                                       ("abs_mean", True, dict(window=window))):
        check_saliency(tensors, s, scale, reduction, with_lse, compare_cpu=True, **extra)


# Padding inside rows, ids out of order / not contiguous, a fully padded row, one segment,
# single valid tokens (as in tests/test_step_saliency_pool.py).
SPECIAL_SEG_IDS = {
    "holes-unordered": [[0, 0, 2, -1, 2, 0, 5, 5, -1, -1, 1, 2, 5, 0, -1, 3, 3, 3, 1],
                        [-1, -1, 4, 4, 4, 0, 0, -1, 1, 1, 1, 1, 2, 2, 2, 2, 3, -1, -1]],
    "padded-row": [[-1] * 9, [0, 0, 1, 1, 1, 2, 3, 3, 3]],
    "one-segment": [[0] * 11, [-1] * 10 + [0]],
    "single-tokens": [[-1, 0, -1, -1, 1, -1, -1, -1], [2, -1, -1, -1, -1, -1, -1, -1]],
}


@pytest.mark.parametrize("with_lse", [False, True], ids=["no_lse", "lse"])
@pytest.mark.parametrize("case", sorted(SPECIAL_SEG_IDS))
def test_saliency_special_segmentations(seed, case, with_lse):
    seg_ids = torch.tensor(SPECIAL_SEG_IDS[case], dtype=torch.long)
    tensors, s, scale, _ = sal_inputs(2, 4, 2, seg_ids.shape[1], 16, seg_ids=seg_ids)
    sink = torch.randn(4, device=CUDA)
    for reduction in REDUCTIONS:
        check_saliency(tensors, s, scale, reduction, with_lse)
        check_saliency(tensors, s, scale, reduction, with_lse, sink=sink, window=3)


def test_saliency_many_segments_per_tile(seed):
    """Every token its own segment with padding holes: up to 64 x 64 distinct bins per tile
    (the per-lane fallback of the binning), plus a tile of alternating ids (runs of length 1)."""
    t = 140
    seg_ids = torch.arange(t).repeat(2, 1)
    seg_ids[0, ::7] = -1
    seg_ids[1] = torch.arange(t) % 3  # ids repeat: runs of one token, the same bin many times
    tensors, s, scale, _ = sal_inputs(2, 4, 2, t, 32, seg_ids=seg_ids, extra_segments=0)
    for reduction in REDUCTIONS:
        check_saliency(tensors, s, scale, reduction, with_lse=False)


def test_saliency_non_contiguous_and_unaligned(seed):
    """(B, T, H, d) views transposed to (B, H, T, d), and storage offsets that break 16-byte
    alignment (the scalar load path), give the contiguous result."""
    b, h, h_kv, t, d = 2, 6, 2, 77, 64
    seg_ids, _, used = random_seg_ids(b, t, pad="left")
    seg_ids = seg_ids.to(CUDA)
    q, dout = ((2 * torch.randn(b, t, h, d, device=CUDA)).to(torch.bfloat16).transpose(1, 2) for _ in range(2))
    k, v = (torch.randn(b, t, h_kv, d, device=CUDA).to(torch.bfloat16).transpose(1, 2) for _ in range(2))
    base = sal_op(q.contiguous(), k.contiguous(), v.contiguous(), dout.contiguous(), seg_ids, used, 0.2)
    strided = sal_op(q, k, v, dout, seg_ids, used, 0.2)
    torch.testing.assert_close(strided, base, atol=1e-6 * float(base.abs().max()), rtol=1e-6)

    def shifted(x):  # same values, data pointer 2 bytes past a 16-byte boundary
        flat = torch.empty(x.numel() + 1, dtype=x.dtype, device=CUDA)
        y = flat[1:].view(x.shape)
        y.copy_(x)
        return y

    unaligned = sal_op(shifted(q), shifted(k), shifted(v), shifted(dout), seg_ids, used, 0.2)
    torch.testing.assert_close(unaligned, base, atol=1e-6 * float(base.abs().max()), rtol=1e-6)
    expected, mag = ref_maps(q, k, v, dout, seg_ids, used, 0.2, "sum_abs")
    assert_map_close(base, expected, mag, seg_ids, used)


def test_saliency_lse_is_used(seed):
    """lse + log 2 halves every attention weight, hence the whole map."""
    (q, k, v, dout, seg_ids), s, scale, _ = sal_inputs(2, 4, 2, 90, 64, dtype=torch.float16)
    lse = ref_lse(q, k, seg_ids, scale)
    for reduction in REDUCTIONS:
        base = sal_op(q, k, v, dout, seg_ids, s, scale, reduction, lse)
        halved = sal_op(q, k, v, dout, seg_ids, s, scale, reduction, lse + torch.log(torch.tensor(2.0)))
        torch.testing.assert_close(halved, base / 2, atol=1e-5 * float(base.abs().max()), rtol=1e-5)


def test_saliency_int32_seg_ids(seed):
    (q, k, v, dout, seg_ids), s, scale, _ = sal_inputs(2, 4, 2, 100, 64)
    torch.testing.assert_close(sal_op(q, k, v, dout, seg_ids.int(), s, scale), sal_op(q, k, v, dout, seg_ids, s, scale))


# --------------------------------------------------------------------------- saliency with OEB


@pytest.mark.parametrize("reduction,with_lse", [pytest.param("sum_abs", True, id="sum_abs-lse"),
                                                pytest.param("abs_sum", False, id="abs_sum-no_lse"),
                                                pytest.param("abs_mean", False, id="abs_mean-no_lse")])
@pytest.mark.parametrize("rule,strength,num_sink,tau_max", [("bridge", 0.0, 1, 0.15), ("bridge", 0.0, 1, 0.5),
                                                            ("odds", 0.5, 1, 0.15), ("odds", 1.0, 0, 0.15),
                                                            ("odds", 0.3, 5, 0.15)], ids=lambda x: str(x))
def test_oeb_matches_reference(seed, rule, strength, num_sink, tau_max, reduction, with_lse):
    """GQA, rows of different lengths padded left (kv_start > 0), several query blocks, d = 64."""
    while True:
        seg_ids, kinds, _ = random_seg_ids(3, 150, max_segments=6, pad="left")
        if bool((seg_ids[:, 0] < 0).any()):
            break
    tensors, s, scale, _ = sal_inputs(3, 6, 2, 150, 64, dtype=torch.bfloat16, seg_ids=seg_ids, kinds=kinds,
                                      gaps=BRIDGE_GAPS if rule == "bridge" else None)
    oeb = oeb_kwargs(seg_ids, kinds, rule, strength, num_sink, tau_max)
    if rule == "bridge":
        assert oeb_active_rows(tensors, scale, **oeb) > 0
    check_saliency(tensors, s, scale, reduction, with_lse, **oeb)


@pytest.mark.parametrize("dtype", FLOATS + [torch.float64], ids=str)
@pytest.mark.parametrize("b,h,h_kv,t,d,pad", SAL_SHAPES)
def test_oeb_shapes_dtypes(seed, b, h, h_kv, t, d, pad, dtype):
    tensors, s, scale, kinds = sal_inputs(b, h, h_kv, t, d, dtype=dtype, pad=pad, gaps=BRIDGE_GAPS)
    oeb = oeb_kwargs(tensors[4], kinds, "bridge")
    check_saliency(tensors, s, scale, "sum_abs", with_lse=False, **oeb)
    check_saliency(tensors, s, scale, "abs_sum", with_lse=True, compare_cpu=(t > 1), **oeb)
    odds = oeb_kwargs(tensors[4], kinds, "odds", 0.7, 2)
    check_saliency(tensors, s, scale, "abs_mean", with_lse=False, compare_cpu=(t > 1), **odds)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("window", [None, 1, 16, 64, 100], ids=lambda w: f"window{w}")
def test_oeb_with_sink_and_window(seed, window, dtype):
    """OEB (bridge) with a sink in the final softmax and sliding windows that cut the groups (late
    rows no longer see the question), 28 / 4 heads, against the reference and the CPU kernel."""
    tensors, s, scale, kinds = sal_inputs(2, 28, 4, 130, 64, dtype=dtype, pad="left", gaps=BRIDGE_GAPS)
    sink = (2 * torch.randn(28)).to(CUDA)
    oeb = oeb_kwargs(tensors[4], kinds, "bridge")
    if window != 1:  # a 1-key window leaves no bridge: the rule never fires
        assert oeb_active_rows(tensors, scale, window, sink, **oeb) > 0
    for reduction, with_lse in (("sum_abs", False), ("abs_mean", True)):
        check_saliency(tensors, s, scale, reduction, with_lse, compare_cpu=True, sink=sink, window=window, **oeb)


def test_oeb_arbitrary_bounds(seed):
    """Any bounds in {(-1, -1)} u {0 <= a <= b <= i + 1}: before kv_start, empty groups, a = b, on
    padding queries (never binned), with both rules, a sink and a window."""
    seg_ids, kinds, _ = random_seg_ids(3, 60, max_segments=6, pad="right")
    b, t = seg_ids.shape
    i = torch.arange(t)
    a = (torch.rand(b, t) * (i + 2)).long()             # uniform in [0, i + 1]
    c = a + (torch.rand(b, t) * (i + 2 - a)).long()     # uniform in [a, i + 1]
    off = torch.rand(b, t) < 0.2
    bounds = torch.stack([torch.where(off, -1, a), torch.where(off, -1, c)], dim=-1).to(CUDA)
    tensors, s, scale, _ = sal_inputs(b, 4, 2, t, 16, seg_ids=seg_ids, kinds=kinds)
    sink = torch.randn(4, device=CUDA)
    for rule, reduction, with_lse in (("bridge", "sum_abs", False), ("odds", "abs_sum", True),
                                      ("bridge", "abs_mean", True)):
        extra = dict(oeb_bounds=bounds, oeb_rule=rule, oeb_strength=0.8)
        check_saliency(tensors, s, scale, reduction, with_lse, compare_cpu=True, **extra)
        check_saliency(tensors, s, scale, reduction, with_lse, sink=sink, window=9, **extra)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("with_lse", [False, True], ids=["no_lse", "lse"])
@pytest.mark.parametrize("rule", ["bridge", "odds"])
def test_oeb_large_score_gaps(seed, rule, with_lse, dtype):
    """Score gaps far beyond fp32 exp's range (~87): whole groups underflow in exp(s - lse) while
    the rule lifts them (bridge: to the cap of its eps, odds at strength 1: to half the mass);
    per-group maxima and log-domain shifts must resolve them like the float64 reference."""
    seg_ids, kinds, _ = random_seg_ids(2, 100, max_segments=6, pad="left")
    gaps = (-120.0, -110.0, 0.0) if rule == "bridge" else None
    (q, k, v, dout, seg_ids), s, scale, _ = sal_inputs(2, 4, 2, 100, 64, dtype=dtype, seg_ids=seg_ids, kinds=kinds,
                                                       gaps=gaps)
    if rule == "odds":
        q = (40 * q.float()).to(dtype)  # scores of std ~80
    oeb = oeb_kwargs(seg_ids, kinds, rule, 1.0)
    valid = seg_ids >= 0
    kv_start = torch.where(valid.any(1), valid.int().argmax(1), 100)
    stats = ref.oeb_probs(q.double(), k.double(), kv_start, oeb["oeb_bounds"], rule, 1.0, 0.15, 1e-6, None, None,
                          scale)[3]
    on = stats[..., 4] > 0
    assert bool((on & (stats[..., 1] > 0) & (stats[..., 1] < 1e-30)).any())  # the case is not vacuous
    for reduction in REDUCTIONS:
        check_saliency([q, k, v, dout, seg_ids], s, scale, reduction, with_lse, **oeb)


def test_oeb_changes_the_map(seed):
    """The bridge rule moves the map far beyond the tolerance, and follows the reference."""
    seg_ids, kinds, _ = random_seg_ids(2, 120, max_segments=6, pad="left")
    tensors, s, scale, _ = sal_inputs(2, 6, 2, 120, 64, seg_ids=seg_ids, kinds=kinds, gaps=BRIDGE_GAPS)
    oeb = oeb_kwargs(seg_ids, kinds, "bridge")
    plain = ops.step_saliency_pool(*tensors, s, scale)
    bridged = check_saliency(tensors, s, scale, "sum_abs", with_lse=False, **oeb)
    _, mag = ref_maps(*tensors, s, scale, "sum_abs", **oeb)
    assert float((bridged.double() - plain.double()).abs().max()) > 0.05 * float(mag.max())


def test_oeb_bad_args_direct():
    (q, k, v, dout, seg_ids), s, scale, _ = sal_inputs(1, 2, 1, 10, 8, seg_ids=torch.zeros(1, 10, dtype=torch.long))
    i = torch.arange(10, device=CUDA)
    good = torch.stack([i, i + 1], dim=-1)[None]  # S = the query itself
    args = (q, k, v, dout, seg_ids, s, scale, "sum_abs", None, None, -1)
    sal_op(*args, good, "bridge", 0.5, 0.15, 1e-6)
    # (bad bound values and padding inside a row are device-side asserts: test_cuda_device_asserts.py)
    with pytest.raises(RuntimeError, match="oeb_bounds must have shape"):
        sal_op(*args, good[:, :5], "bridge", 0.5, 0.15, 1e-6)
    with pytest.raises(RuntimeError, match="oeb_bounds must be int64"):
        sal_op(*args, good.int(), "bridge", 0.5, 0.15, 1e-6)
    with pytest.raises(RuntimeError, match="rule"):
        sal_op(*args, good, "lift", 0.5, 0.15, 1e-6)
    with pytest.raises(RuntimeError, match="strength"):
        sal_op(*args, good, "odds", 1.5, 0.15, 1e-6)
    with pytest.raises(RuntimeError, match="tau_max"):
        sal_op(*args, good, "bridge", 0.5, 0.0, 1e-6)
    with pytest.raises(RuntimeError, match="eps"):
        sal_op(*args, good, "bridge", 0.5, 0.15, 0.0)


# --------------------------------------------------------------------------- saliency: opcheck, errors, large T


@pytest.mark.parametrize("with_lse,with_oeb", [(False, False), (True, True)], ids=["plain", "lse-oeb"])
def test_saliency_opcheck(seed, with_lse, with_oeb):
    seg_ids, kinds, _ = random_seg_ids(2, 23, pad="right")
    (q, k, v, dout, seg_ids), s, scale, _ = sal_inputs(2, 4, 2, 23, 64, dtype=torch.bfloat16, seg_ids=seg_ids,
                                                       kinds=kinds, gaps=BRIDGE_GAPS)
    lse = ref_lse(q, k, seg_ids, scale, 7) if with_lse else None
    sink = torch.randn(4, device=CUDA) if with_oeb else None
    extra = tuple(oeb_kwargs(seg_ids, kinds).values()) if with_oeb else ()
    torch.library.opcheck(sal_op.default, (q, k, v, dout, seg_ids, s, scale, "abs_mean", lse, sink, 7, *extra))


@pytest.mark.parametrize("change,match", [
    (lambda a: a.update(k=a["k"].cpu()), "must be on"),
    (lambda a: a.update(q=a["q"][0]), "must be 4-D"),
    (lambda a: a.update(k=a["k"].float()), "share one dtype"),
    (lambda a: a.update(k=a["k"][:, :, :9], v=a["v"][:, :, :9]), "Tq == Tk"),
    (lambda a: a.update(lse=a["lse"].double()), "lse must be float32"),
    (lambda a: a.update(lse=a["lse"].cpu()), "lse must be on"),
    (lambda a: a.update(head_reduction="max"), "head_reduction"),
    (lambda a: a.update(sink=torch.zeros(3, device=CUDA)), "sink"),
    (lambda a: a.update(sink=torch.zeros(4)), "sink must be on"),
    (lambda a: a.update(window=0), "window"),
    (lambda a: a.update(window=-2), "window"),
])
def test_saliency_bad_inputs_direct(change, match):
    """What the host checks (seg id values and non-finite sinks: device-side asserts, test_cuda_device_asserts.py)."""
    (q, k, v, dout, seg_ids), s, scale, _ = sal_inputs(1, 4, 2, 10, 8, dtype=torch.float16,
                                                       seg_ids=torch.zeros(1, 10, dtype=torch.long))
    args = dict(q=q, k=k, v=v, grad_out=dout, seg_ids=seg_ids, num_segments=s, scale=scale,
                head_reduction="sum_abs", lse=torch.zeros(1, 4, 10, device=CUDA), sink=None, window=-1)
    sal_op(*args.values())
    change(args)
    with pytest.raises(RuntimeError, match=match):
        sal_op(*args.values())


def test_saliency_large_t_smoke(seed):
    """T = 8192, Qwen-like GQA head shapes, bf16: no error, finite, non-negative, causal (a
    segment never draws on a later one), and the bins partition the token map: the total of a
    fine segmentation equals the single bin of a one-segment run (every reduction, with OEB's
    bridge rule, a sink and a window; OEB's groups come from oeb_bounds, not from seg_ids)."""
    b, h, h_kv, t, d = 1, 6, 2, 8192, 128
    lengths = [700] + [300] * 24 + [292]
    seg_ids = torch.cat([torch.full((n,), s) for s, n in enumerate(lengths)])[None]
    kinds = torch.tensor([[QUESTION] + [STEP] * 24 + [SUMMARY]])
    (q, k, v, dout, seg_ids), _, scale, _ = sal_inputs(b, h, h_kv, t, d, torch.bfloat16, seg_ids=seg_ids,
                                                       kinds=kinds, gaps=BRIDGE_GAPS)
    oeb = oeb_kwargs(seg_ids, kinds)
    sink = torch.randn(h, device=CUDA)
    for reduction in REDUCTIONS:
        for extra in ({}, oeb, dict(oeb, sink=sink, window=2048)):
            fine = ops.step_saliency_pool(q, k, v, dout, seg_ids, len(lengths), scale, reduction, **extra)
            one = ops.step_saliency_pool(q, k, v, dout, torch.zeros_like(seg_ids), 1, scale, reduction, **extra)
            torch.cuda.synchronize()
            assert bool(torch.isfinite(fine).all()) and bool((fine >= 0).all())
            assert bool((fine[0].triu(1) == 0).all())
            assert float(fine.sum()) > 0
            torch.testing.assert_close(fine.double().sum(), one.double().sum(), rtol=1e-4, atol=0)


def test_saliency_longer_t_matches_cpu(seed):
    """T = 1024 with Qwen2-1.5B head shapes (12 / 2 heads, d = 128), fp32: the CUDA kernel
    agrees with the CPU kernel (too long for the materialized reference), also with OEB, a sink and
    a window."""
    (q, k, v, dout, seg_ids), s, scale, kinds = sal_inputs(1, 12, 2, 1024, 128, gaps=BRIDGE_GAPS)
    cpu_args = [x.cpu() for x in (q, k, v, dout, seg_ids)]
    sink = torch.randn(12)
    oeb = oeb_kwargs(seg_ids, kinds)
    for extra in ({}, dict(oeb, sink=sink, window=300)):
        cpu_extra = {key: (val.cpu() if isinstance(val, torch.Tensor) else val) for key, val in extra.items()}
        gpu_extra = {key: (val.to(CUDA) if isinstance(val, torch.Tensor) else val) for key, val in extra.items()}
        mag = ops.step_saliency_pool(*cpu_args, s, scale, "abs_sum", **cpu_extra)
        atol, rtol = tolerances(torch.float32)
        bound = 2 * (rtol * mag + atol * mag.max())
        for reduction in REDUCTIONS:
            got = ops.step_saliency_pool(q, k, v, dout, seg_ids, s, scale, reduction, **gpu_extra).cpu()
            cpu = ops.step_saliency_pool(*cpu_args, s, scale, reduction, **cpu_extra)
            assert bool(((got - cpu).abs() <= bound).all()), reduction


# ------------------------------------------- kernel paths of issue 15 item 7 (split, pipeline)

# The main kernel's paths (docs/method_kernels.md, "Kernel paths and their switches"): "old" is the
# grid of one CTA per query block with synchronous tile loads; pool_split = n > 0 gives n key tiles
# per CTA (1: every tile its own CTA), -1 the auto plan; pool_pipeline the cp.async double buffer
# (bf16 / fp16 with one head-dim chunk of 16-byte rows; other cases take the synchronous loop).
POOL_PATHS = {
    "old": dict(pool_split=0, pool_pipeline=0),
    "split-auto": dict(pool_split=-1, pool_pipeline=0),
    "split1": dict(pool_split=1, pool_pipeline=0),
    "split3-pipe": dict(pool_split=3, pool_pipeline=1),
    "pipe": dict(pool_split=0, pool_pipeline=1),
    "new": dict(pool_split=-1, pool_pipeline=1),
}

# (b, h, h_kv, t, d, pad, window): odd lengths, padding on both sides, GQA / MQA, head dims of one
# chunk (64, 80, 128) and of two (256), windows smaller and larger than a tile.
POOL_PATH_SHAPES = [
    pytest.param(2, 6, 2, 333, 64, "left", None, id="gqa-B2-leftpad-T333-d64"),
    pytest.param(1, 4, 1, 517, 128, "right", 100, id="mqa-rightpad-T517-d128-window100"),
    pytest.param(3, 4, 2, 200, 80, "left", 7, id="gqa-B3-T200-d80-window7"),
    pytest.param(1, 2, 2, 150, 256, "right", None, id="T150-d256-two-chunks"),
]


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("b,h,h_kv,t,d,pad,window", POOL_PATH_SHAPES)
def test_saliency_paths_match_reference_and_each_other(seed, b, h, h_kv, t, d, pad, window, dtype):
    """Every path of the main kernel against the float64 reference (with a sink, and with OEB), and
    the new paths against the old one within twice the tolerance; the split paths differ from the
    old one only in the order of the fp64 atomics (the last bits)."""
    tensors, s, scale, kinds = sal_inputs(b, h, h_kv, t, d, dtype=dtype, pad=pad, gaps=BRIDGE_GAPS)
    q, k, v, dout, seg_ids = tensors
    sink = torch.randn(h, device=CUDA)
    for extra in (dict(window=window, sink=sink), dict(oeb_kwargs(seg_ids, kinds), window=window)):
        for reduction in ("sum_abs", "abs_mean"):
            expected, mag = ref_maps(q, k, v, dout, seg_ids, s, scale, reduction, **extra)
            assert float(expected.abs().max()) > 0
            got = {}
            for name, paths in POOL_PATHS.items():
                with ops.kernel_paths(**paths):
                    got[name] = ops.step_saliency_pool(q, k, v, dout, seg_ids, s, scale, reduction, **extra)
                torch.cuda.synchronize()
                assert_map_close(got[name], expected, mag, seg_ids, s)
            for name in POOL_PATHS:
                assert_map_close(got[name], got["old"].double(), mag, seg_ids, s, factor=2.0)


@pytest.mark.parametrize("window", [None, 1000], ids=lambda w: f"window{w}")
def test_saliency_paths_T8192_B1(seed, window):
    """The case of item 7: T = 8192, B = 1 (128 query blocks; the auto plan cuts the causal band
    into many CTAs), GQA 4 / 2, d = 64, bf16, several segments per tile near the ends: every path
    against the float64 reference."""
    b, h, h_kv, t, d = 1, 4, 2, 8192, 64
    lengths = [333] + [97] * 8 + [1000] * 6 + [1] * 5 + [882] + [5, 3, 1]
    lengths[-1] += t - sum(lengths)
    seg_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    seg_ids[0, :29] = -1   # left padding: the first block starts inside a tile
    tensors, s, scale, _ = sal_inputs(b, h, h_kv, t, d, torch.bfloat16, seg_ids=seg_ids)
    q, k, v, dout, seg_ids = tensors
    expected, mag = ref_maps(q, k, v, dout, seg_ids, s, scale, "abs_mean", window=window)
    for name, paths in POOL_PATHS.items():
        with ops.kernel_paths(**paths):
            got = ops.step_saliency_pool(q, k, v, dout, seg_ids, s, scale, "abs_mean", window=window)
        torch.cuda.synchronize()
        assert_map_close(got, expected, mag, seg_ids, s)
    del expected, mag
    torch.cuda.empty_cache()


def test_saliency_deterministic_mode_takes_no_split(seed):
    """Under torch.use_deterministic_algorithms(True) the op runs the CPU kernel on host copies
    whatever the kernel paths say (the split and pipelined paths sum with atomics in a varying
    order): repeatable bit for bit and equal to the CPU kernel."""
    tensors, s, scale, _ = sal_inputs(1, 4, 2, 300, 64, torch.bfloat16)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        cpu = ops.step_saliency_pool(*(x.cpu() for x in tensors), s, scale, "abs_sum")
        with ops.kernel_paths(pool_split=1, pool_pipeline=1):
            runs = [ops.step_saliency_pool(*tensors, s, scale, "abs_sum") for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(previous)
    assert runs[0].device.type == "cuda" and torch.equal(runs[0], runs[1]) and torch.equal(runs[0].cpu(), cpu)


# =========================================================================== step_momentum

Q, P, M = QUESTION, STEP, SUMMARY
SMI_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]

# Hand-made segmentations (as in tests/test_step_momentum.py): (lengths, kinds, pad side).
SPECIAL_ROWS = [
    ([4, 3, 5, 2, 4], [Q, P, P, P, M], "left"),
    ([5, 6], [Q, M], "right"),
    ([3, 0, 4, 0, 1, 3], [Q, P, P, P, P, M], "left"),
    ([2, 1, 1, 1, 1], [Q, P, P, P, P], "right"),
    ([6], [Q], "left"),
    ([2, 5, 3], [Q, P, M], "right"),
    ([], [Q], "left"),
    ([1, 2, 2, 1], [Q, P, M, M], "left"),
]


def smi_case(b, t, d, dtype, pad="left", max_segments=8):
    seg_ids, seg_kinds, _ = random_seg_ids(b, t, max_segments=max_segments, pad=pad)
    h = (torch.randn(b, t, d) * 2 + 0.5).to(dtype)  # a mean offset keeps the momentum away from 0
    return h, seg_ids, seg_kinds


def to_cuda(*xs):
    return [x.to(CUDA) for x in xs]


def decode_chunks(h, seg_ids, seg_kinds, beta, gamma, sizes, state=None):
    state = state or ops.new_momentum_state(h.shape[0], h.shape[2], device=h.device)
    outs, start = [], 0
    for n in sizes:
        outs.append(ops.step_momentum_decode_(h[:, start:start + n], seg_ids[:, start:start + n], seg_kinds, state,
                                              beta, gamma))
        start += n
    assert start == h.shape[1]
    return torch.cat(outs, 1), state


def random_chunks(t, big=False):
    sizes = []
    while sum(sizes) < t:
        n = random.randint(65, 100) if big and random.random() < 0.3 else random.randint(1, 9)
        sizes.append(min(n, t - sum(sizes)))
    return sizes


# T <= 64 runs the fused kernel, T > 64 the plan / sums / fold / norms / apply kernels.
@pytest.mark.parametrize("dtype", SMI_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 41, 17), (1, 1, 5), (2, 150, 96), (3, 300, 1536)],
                         ids=lambda s: "x".join(map(str, s)))
def test_smi_prefill_matches_reference_and_cpu(seed, dtype, shape):
    b, t, d = shape
    pad = random.choice(["left", "right"])
    h, seg_ids, seg_kinds = smi_case(b, t, d, dtype, pad)
    beta, gamma = random.uniform(0.0, 0.95), random.uniform(0.2, 1.0)
    hc, sc, kc = to_cuda(h, seg_ids, seg_kinds)
    h_before = hc.clone()
    got = ops.step_momentum(hc, sc, kc, beta, gamma)
    assert got.dtype == dtype and got.shape == h.shape and got.is_cuda
    assert torch.equal(hc, h_before), "the prefill op must not modify h"
    expected = ref.step_momentum(hc.double(), sc, kc, beta, gamma)
    atol, rtol = tolerances(dtype)
    torch.testing.assert_close(got.double(), expected, atol=atol, rtol=rtol)
    cpu = ops.step_momentum(h, seg_ids, seg_kinds, beta, gamma)
    # the same arithmetic in the same order: the CPU result to fp32 rounding (bit for bit: next test)
    torch.testing.assert_close(got.cpu().double(), cpu.double(), atol=4 * atol, rtol=4 * rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("t", [47, 200])
def test_smi_prefill_bitwise_equals_cpu_kernel(seed, dtype, t):
    """The file header's claim: operation for operation the CPU kernel's rounding, so equal bits
    (no denormals in these inputs). A failure here, with the previous test passing, means some
    operation rounds differently on the GPU (an FMA contraction, an approximate division)."""
    h, seg_ids, seg_kinds = smi_case(3, t, 70, dtype, "left")
    got = ops.step_momentum(*to_cuda(h, seg_ids, seg_kinds), 0.85, 0.6).cpu()
    cpu = ops.step_momentum(h, seg_ids, seg_kinds, 0.85, 0.6)
    assert torch.equal(got, cpu), f"max |diff| {float((got.double() - cpu.double()).abs().max())}"
    sizes = random_chunks(t, big=True)  # the decode state too, after the same chunks
    _, state = decode_chunks(*to_cuda(h, seg_ids, seg_kinds), 0.85, 0.6, sizes)
    _, cpu_state = decode_chunks(h, seg_ids, seg_kinds, 0.85, 0.6, sizes)
    for x, y in zip(state, cpu_state):
        assert torch.equal(x.cpu(), y)


@pytest.mark.parametrize("dtype", SMI_DTYPES, ids=str)
@pytest.mark.parametrize("beta,gamma", [(0.9, 0.05), (0.0, 0.7), (0.5, 0.0), (0.99, 2.0)])
def test_smi_special_segmentations(seed, dtype, beta, gamma):
    seg_ids, seg_kinds = rows_to_tensors(SPECIAL_ROWS)
    h = torch.randn(len(SPECIAL_ROWS), seg_ids.shape[1], 9).to(dtype)
    hc, sc, kc = to_cuda(h, seg_ids, seg_kinds)
    got = ops.step_momentum(hc, sc, kc, beta, gamma)
    expected = ref.step_momentum(hc.double(), sc, kc, beta, gamma)
    atol, rtol = tolerances(dtype)
    torch.testing.assert_close(got.double(), expected, atol=atol, rtol=rtol)
    if gamma == 0:
        assert torch.equal(got, hc)
    elif gamma >= 0.5:
        assert ((expected - hc.double()).abs() > 10 * atol).any()


@pytest.mark.parametrize("dtype", SMI_DTYPES, ids=str)
@pytest.mark.parametrize("chunking", ["token", "random", "random-big", "whole"])
def test_smi_decode_chunking_equals_prefill(seed, dtype, chunking):
    """Decode in any chunking (fused kernel for chunks <= 64 tokens, the multi-kernel path for
    longer ones) gives the prefill bit for bit; and the state equals the CPU decode state."""
    b, t, d = 3, 180, 33
    h, seg_ids, seg_kinds = smi_case(b, t, d, dtype, random.choice(["left", "right"]))
    beta, gamma = random.uniform(0.0, 0.95), random.uniform(0.2, 1.0)
    hc, sc, kc = to_cuda(h, seg_ids, seg_kinds)
    sizes = {"token": [1] * t, "random": random_chunks(t), "random-big": random_chunks(t, big=True),
             "whole": [t]}[chunking]
    got, state = decode_chunks(hc, sc, kc, beta, gamma, sizes)
    want = ops.step_momentum(hc, sc, kc, beta, gamma)
    if dtype == torch.float64:  # the state is fp32 between chunks
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    else:
        assert torch.equal(got, want)
    cpu_got, cpu_state = decode_chunks(h, seg_ids, seg_kinds, beta, gamma, sizes)
    atol, rtol = tolerances(dtype)
    torch.testing.assert_close(got.cpu().double(), cpu_got.double(), atol=4 * atol, rtol=4 * rtol)
    assert torch.equal(state[2].cpu(), cpu_state[2])
    for x, y in zip(state[:2], cpu_state[:2]):
        torch.testing.assert_close(x.cpu(), y, atol=1e-5, rtol=1e-5)


def test_smi_decode_special_rows_token_by_token(seed):
    seg_ids, seg_kinds = rows_to_tensors(SPECIAL_ROWS)
    h = torch.randn(len(SPECIAL_ROWS), seg_ids.shape[1], 10)
    hc, sc, kc = to_cuda(h, seg_ids, seg_kinds)
    got, state = decode_chunks(hc, sc, kc, 0.6, 0.8, [1] * h.shape[1])
    assert torch.equal(got, ops.step_momentum(hc, sc, kc, 0.6, 0.8))
    _, cpu_state = decode_chunks(h, seg_ids, seg_kinds, 0.6, 0.8, [1] * h.shape[1])
    assert torch.equal(state[2].cpu(), cpu_state[2])
    for x, y in zip(state[:2], cpu_state[:2]):
        torch.testing.assert_close(x.cpu(), y, atol=1e-5, rtol=1e-5)


def test_smi_decode_strided_state_and_padding_chunks(seed):
    b, t, d = 2, 24, 9
    seg_ids, seg_kinds, _ = random_seg_ids(b, t, pad="left")
    h = torch.randn(b, t, d)
    hc, sc, kc = to_cuda(h, seg_ids, seg_kinds)
    store = torch.zeros(2, b, 2 * d, device=CUDA)
    counters = torch.tensor([[-1, 0, 0]] * b, device=CUDA).t().contiguous().t()
    state = (store[0, :, ::2], store[1, :, 1::2], counters)  # non-contiguous views
    got, _ = decode_chunks(hc, sc, kc, 0.9, 0.5, [5, 7, 12], state=state)
    fresh_got, fresh = decode_chunks(hc, sc, kc, 0.9, 0.5, [5, 7, 12])
    assert torch.equal(got, fresh_got)
    for x, y in zip(state, fresh):
        assert torch.equal(x, y)
    snapshot = [x.clone() for x in state]
    pad_out = ops.step_momentum_decode_(hc[:, :3], torch.full((b, 3), -1, device=CUDA), kc, state, 0.9, 0.5)
    assert torch.equal(pad_out, hc[:, :3])
    for x, y in zip(state, snapshot):
        assert torch.equal(x, y)


@pytest.mark.parametrize("shape", [(2, 0, 5), (2, 6, 0), (0, 4, 3), (2, 100, 0)])
def test_smi_empty_shapes(shape):
    b, t, d = shape
    h = torch.randn(b, t, d, device=CUDA)
    seg_ids, seg_kinds = torch.zeros(b, t, dtype=torch.long, device=CUDA), torch.ones(b, 1, dtype=torch.long, device=CUDA)
    assert torch.equal(ops.step_momentum(h, seg_ids, seg_kinds, 0.9, 0.5), h)
    state = ops.new_momentum_state(b, d, device=CUDA)
    assert torch.equal(ops.step_momentum_decode_(h, seg_ids, seg_kinds, state, 0.9, 0.5), h)
    assert state[2].tolist() == ([[0, t, 0]] * b if t else [[-1, 0, 0]] * b)


def test_smi_opcheck(seed):
    seg_ids, seg_kinds, _ = random_seg_ids(3, 90, pad="left")
    sc, kc = to_cuda(seg_ids, seg_kinds)
    h = torch.randn(3, 90, 6, device=CUDA, dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.stepflow.step_momentum.default, (h, sc, kc, 0.9, 0.5))
    h = torch.randn(3, 90, 6, device=CUDA)
    state = ops.new_momentum_state(3, 6, device=CUDA)
    ops.step_momentum_decode_(h[:, :40], sc[:, :40], kc, state, 0.9, 0.5)  # a state mid-sequence
    torch.library.opcheck(torch.ops.stepflow.step_momentum_decode_.default,
                          (h[:, 40:], sc[:, 40:], kc, *state, 0.9, 0.5))


@pytest.mark.parametrize("t", [5, 100], ids=["fused", "multi-kernel"])
@pytest.mark.parametrize("args,match", [
    (lambda h, s, k: (h.long(), s, k), "float32"),
    (lambda h, s, k: (h, s.int(), k), "int64"),
    (lambda h, s, k: (h, s.cpu(), k), "seg_ids must be on"),
])
def test_smi_bad_inputs_direct(t, args, match):
    """What the host checks (data errors found on the device are device-side asserts:
    test_cuda_device_asserts.py)."""
    seg_ids = torch.tensor([[0] * (t - 4) + [1, 1, 2, 2]], device=CUDA)
    seg_kinds = torch.tensor([[Q, P, M]], device=CUDA)
    h = torch.randn(1, t, 4, device=CUDA)
    h2, s2, k2 = args(h, seg_ids, seg_kinds)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.stepflow.step_momentum(h2, s2, k2, 0.9, 0.05)
    if h2.dtype.is_floating_point:
        state = ops.new_momentum_state(1, 4, device=CUDA)
        with pytest.raises(RuntimeError, match=match):
            torch.ops.stepflow.step_momentum_decode_(h2, s2, k2, *state, 0.9, 0.05)
        assert state[2].tolist() == [[-1, 0, 0]] and not state[0].any() and not state[1].any()


def test_smi_large_t_smoke(seed):
    """T = 8192, D = 1536, bf16, B = 2 with 40 steps and one long step: finite, equals the CPU
    kernel bit for bit, and a token-by-token decode of the last 64 tokens continues it exactly."""
    t, d = 8192, 1536
    lengths = [[500] + [150] * 40 + [1692], [300, 7000, 892]]
    kinds = torch.tensor([[Q] + [P] * 40 + [M], [Q, P, M] + [P] * 39])
    seg_ids = torch.stack([torch.cat([torch.full((n,), s) for s, n in enumerate(row)]) for row in lengths])
    h = (torch.randn(2, t, d) + 0.2).to(torch.bfloat16)
    hc, sc, kc = to_cuda(h, seg_ids, kinds)
    got = ops.step_momentum(hc, sc, kc, 0.9, 0.05)
    assert bool(torch.isfinite(got.float()).all())
    cpu = ops.step_momentum(h, seg_ids, kinds, 0.9, 0.05)
    torch.testing.assert_close(got.cpu().double(), cpu.double(), atol=0.03, rtol=0.02)
    state = ops.new_momentum_state(2, d, device=CUDA)
    head = ops.step_momentum_decode_(hc[:, :t - 64], sc[:, :t - 64], kc, state, 0.9, 0.05)
    tail = [ops.step_momentum_decode_(hc[:, i:i + 1], sc[:, i:i + 1], kc, state, 0.9, 0.05) for i in range(t - 64, t)]
    assert torch.equal(torch.cat([head] + tail, 1), got)
