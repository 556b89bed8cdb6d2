"""What the first GPU run must show beyond test_cuda_oeb / test_cuda_saliency_momentum (issue 15).

Real-size and edge cases of the kernels: fp16 at T = 8192 (forward and backward against SDPA, and
the tensor-core backward's fp16 dS at realistic and at large gradient scales), an exact float64
reference check on slices of an 8k strength-1 prefill (odds rule), a fully padded prefill row,
kv_start beyond a key tile, the odds rule's sink group across a tile edge, a non-default stream,
the OEB op's lse fed into step_saliency_pool, the deterministic mode, and a decode step's op calls
captured in a CUDA graph and replayed with new index values.

Every test needs a GPU. STEPFLOW_FIRST_RUN_DEVICE=cpu runs the device-agnostic ones on the CPU
(to check the tests themselves; the CUDA-only ones skip).
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from conftest import tolerances

from stepflow_ext import ops, reference
from stepflow_ext.reference import QUESTION, STEP, SUMMARY

DEV = os.environ.get("STEPFLOW_FIRST_RUN_DEVICE", "cuda")
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(DEV == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device")]
cuda_only = pytest.mark.skipif(DEV != "cuda", reason="CUDA streams and graphs")
TAU_MAX, EPS = 0.15, 1e-6


def trace(lengths, pad=0):
    """seg_ids (1, pad + sum(lengths)) and kinds for a question, steps and a summary."""
    ids = [-1] * pad + [s for s, n in enumerate(lengths) for _ in range(n)]
    kinds = [QUESTION] + [STEP] * (len(lengths) - 2) + [SUMMARY]
    return torch.tensor([ids]), torch.tensor([kinds])


def qkv(b, h, hkv, tq, tk, d, dtype, seed=0, gen_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, tq, d, generator=g, dtype=torch.float64) * gen_scale
    k = torch.randn(b, hkv, tk, d, generator=g, dtype=torch.float64) * gen_scale
    v = torch.randn(b, hkv, tk, d, generator=g, dtype=torch.float64)
    return (x.to(dtype).to(DEV) for x in (q, k, v))


def lean(q, k, seg_ids, d):
    """Queries lean towards their row's last segment (the odds rule locks rows in)."""
    u = torch.randn(d, dtype=torch.float32, device=q.device)
    u = u * (2.0 * d) ** 0.5 / u.norm()
    q = (q.float() + u).to(q.dtype)
    k = k.clone()
    last = seg_ids[0] == int(seg_ids[0, -1])
    k[:, :, last.to(k.device)] = (k[:, :, last.to(k.device)].float() + u).to(k.dtype)
    return q, k


def rel_err(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ------------------------------------------------------------------------------ fp16 at 8k


def test_fp16_prefill_T8192_matches_sdpa():
    """fp16, T = 8192, 12 / 2 heads, d = 128 (tensor cores): bounds (-1, -1) is SDPA, forward and
    backward; the bridge rule is finite with finite gradients."""
    b, h, hkv, t, d = 1, 12, 2, 8192, 128
    q, k, v = qkv(b, h, hkv, t, t, d, torch.float16)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    kv_start = torch.zeros(b, dtype=torch.long, device=DEV)
    off = torch.full((b, t, 2), -1, dtype=torch.long, device=DEV)
    scale = d ** -0.5
    out, lse, _ = ops.oeb_attention(q, k, v, kv_start, off, "bridge", scale=scale)
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(h // hkv, 1), v.repeat_interleave(h // hkv, 1),
                                         is_causal=True, scale=scale)
    atol, rtol = tolerances(torch.float16)
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)
    assert bool(torch.isfinite(lse).all())
    grad = torch.randn_like(out)
    got, want = torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)
    for name, x, y in zip("qkv", got, want):
        assert bool(torch.isfinite(x).all()), f"d{name} not finite"
        assert rel_err(x, y) < 2e-2, f"d{name}: relative error {rel_err(x, y):.2e}"
    seg_ids, kinds = trace([500] + [400] * 18 + [t - 500 - 400 * 18])
    bounds = reference.oeb_bounds(seg_ids, kinds, "bridge").to(DEV)
    out1, _, stats1 = ops.oeb_attention(q, k, v, kv_start, bounds, "bridge", scale=scale)
    assert bool(torch.isfinite(out1).all()) and int(stats1[..., 4].sum()) > 0
    assert all(bool(torch.isfinite(x).all()) for x in torch.autograd.grad(out1, (q, k, v), grad))


UNSCALED = pytest.mark.xfail(strict=False, reason="a mean-over-8k-tokens loss without loss scaling: dS (and dq) "
                             "fall into fp16's subnormals, as in any kernel that keeps dS in fp16; reported, not "
                             "required (fp16 training scales the loss)")


@pytest.mark.parametrize("grad_scale", [pytest.param(1.0 / 8192, marks=UNSCALED), 8.0, 1.0, 300.0],
                         ids=["mean-loss-unscaled", "mean-loss-scaled-2^16", "unit", "large"])
def test_fp16_backward_ds_precision(grad_scale):
    """The tensor-core backward keeps dS in fp16 (|dS| <= |dP| + |c|): at a large gradient scale it
    nears fp16's range, at a small one its subnormals. The fp16 gradients against the same op in
    fp32 on the same (fp16-rounded) inputs, whose backward has no half-precision dS."""
    b, h, hkv, t, d = 1, 4, 2, 2048, 128
    q, k, v = qkv(b, h, hkv, t, t, d, torch.float16, seed=1)
    seg_ids, kinds = trace([300] + [250] * 6 + [t - 300 - 1500])
    bounds = reference.oeb_bounds(seg_ids, kinds, "bridge").to(DEV)
    kv_start = torch.zeros(b, dtype=torch.long, device=DEV)
    grad = (torch.randn(b, h, t, d, device=DEV) * grad_scale)
    results = {}
    for dtype in (torch.float16, torch.float32):
        leaves = [x.to(dtype).detach().requires_grad_() for x in (q, k, v)]
        out, _, _ = ops.oeb_attention(*leaves, kv_start, bounds, "bridge", scale=d ** -0.5)
        results[dtype] = torch.autograd.grad(out, leaves, grad.to(dtype))
    for name, x, y in zip("qkv", results[torch.float16], results[torch.float32]):
        assert bool(torch.isfinite(x).all()), f"d{name} not finite at grad scale {grad_scale}"
        err = rel_err(x, y)
        assert err < 2e-2, f"d{name}: relative error {err:.2e} at grad scale {grad_scale}"


# ----------------------------------------------------------------------- exact slices of 8k


def test_exact_reference_on_slices_of_an_8k_strength1_prefill():
    """The odds rule at strength 1 (equal odds) on an 8k bf16 prefill with GQA 12 / 2 and d = 128:
    slices of 64 queries (the first, the middle, the last) against the float64 reference over all
    their keys."""
    b, h, hkv, t, d = 1, 12, 2, 8192, 128
    seg_ids, kinds = trace([700] + [300] * 24 + [t - 700 - 7200])
    q, k, v = qkv(b, h, hkv, t, t, d, torch.bfloat16, seed=2)
    q, k = lean(q, k, seg_ids, d)
    bounds = reference.oeb_bounds(seg_ids, kinds, "odds").to(DEV)
    kv_start = torch.zeros(b, dtype=torch.long, device=DEV)
    scale = d ** -0.5
    out, lse, stats = ops.oeb_attention(q, k, v, kv_start, bounds, "odds", 1.0, scale=scale)
    assert int(stats[..., 4].sum()) > 0
    atol, rtol = tolerances(torch.bfloat16)
    for i0 in (0, 4000, t - 64):
        i1 = i0 + 64
        want, want_lse, want_stats = reference.oeb_attention(
            q[:, :, i0:i1].double(), k[:, :, :i1].double(), v[:, :, :i1].double(), kv_start, bounds[:, i0:i1],
            "odds", 1.0, TAU_MAX, EPS, None, None, scale)
        torch.testing.assert_close(out[:, :, i0:i1].double(), want, atol=atol, rtol=rtol,
                                   msg=lambda m: f"queries {i0}:{i1}: {m}")
        torch.testing.assert_close(lse[:, :, i0:i1].double(), want_lse, atol=5e-5, rtol=2e-5)
        torch.testing.assert_close(stats[:, :, i0:i1, :4].double(), want_stats[..., :4], atol=2e-5, rtol=2e-5)


# ---------------------------------------------------------------------- padding and tile edges


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fully_padded_prefill_row(dtype):
    """Batch row 1 is all padding (kv_start = T): zeros, lse -inf, stats 0, zero gradients; row 0
    as the reference."""
    h, hkv, t, d = 4, 2, 100, 64
    seg0, kinds = trace([20, 30, 30, 20])
    seg_ids = torch.cat([seg0, torch.full_like(seg0, -1)])
    kinds = kinds.expand(2, -1).contiguous()
    bounds = reference.oeb_bounds(seg_ids, kinds, "bridge").to(DEV)
    kv_start = torch.tensor([0, t], device=DEV)
    q, k, v = qkv(2, h, hkv, t, t, d, dtype, seed=3)
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    out, lse, stats = ops.oeb_attention(*leaves, kv_start, bounds, "bridge", scale=d ** -0.5)
    assert bool((out[1] == 0).all()) and bool(torch.isneginf(lse[1]).all()) and bool((stats[1] == 0).all())
    assert bool(torch.isfinite(out).all())
    grads = torch.autograd.grad(out, leaves, torch.randn_like(out))
    assert all(bool((g[1] == 0).all()) and bool(torch.isfinite(g).all()) for g in grads)
    want, _, _ = reference.oeb_attention(q[:1].double(), k[:1].double(), v[:1].double(), kv_start[:1], bounds[:1],
                                         "bridge", 0.5, TAU_MAX, EPS, None, None, d ** -0.5)
    atol, rtol = tolerances(dtype)
    torch.testing.assert_close(out[:1].double(), want, atol=atol, rtol=rtol)


@pytest.mark.parametrize("tq", [300, 7, 1], ids=["prefill", "chunk7", "decode"])
def test_kv_start_beyond_a_key_tile(tq):
    """kv_start = 70 and 130 (past the first 64-key tile; the split-KV plan is sized from the
    shapes, so these rows get empty splits) and 0, bf16 tensor cores, forward and backward."""
    h, hkv, tk, d = 12, 2, 300, 64
    rows = [trace([40, 60, 60, 70], pad=70), trace([30, 50, 50, 40], pad=130), trace([60, 80, 80, 80])]
    seg_ids = torch.cat([r[0] for r in rows])
    kinds = torch.cat([r[1] for r in rows])
    bounds = reference.oeb_bounds(seg_ids, kinds, "bridge")[:, tk - tq:].contiguous().to(DEV)
    kv_start = torch.tensor([70, 130, 0], device=DEV)
    q, k, v = qkv(3, h, hkv, tq, tk, d, torch.bfloat16, seed=4, gen_scale=1.5)
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    out, lse, stats = ops.oeb_attention(*leaves, kv_start, bounds, "bridge", scale=d ** -0.5)
    ref_leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    safe = bounds.clone()
    safe[bounds[..., 0] < 0] = 0  # see test_cuda_oeb.ref_grads: same attention, no NaN in autograd
    want, _, _ = reference.oeb_attention(*ref_leaves, kv_start, safe, "bridge", 0.5, TAU_MAX, EPS, None, None,
                                         d ** -0.5)
    atol, rtol = tolerances(torch.bfloat16)
    torch.testing.assert_close(out.double(), want.detach(), atol=atol, rtol=rtol)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, grad)
    ref = torch.autograd.grad(want, ref_leaves, grad.double())
    for name, x, y in zip("qkv", got, ref):
        assert rel_err(x, y) < 3e-2, f"d{name}: relative error {rel_err(x, y):.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_odds_sink_group_across_a_tile_edge(dtype):
    """The odds rule with 8 sink tokens from kv_start = 60: group 0 = [60, 68) straddles the key
    tile edge at 64 (and the 32-key tiles of d = 128); forward and backward against the reference."""
    h, hkv, t, d = 4, 2, 200, 128
    seg_ids, kinds = trace([30, 40, 40, 30], pad=60)
    bounds = reference.oeb_bounds(seg_ids, kinds, "odds", num_sink=8).to(DEV)
    assert int(bounds[0, -1, 0]) == 68
    kv_start = torch.tensor([60], device=DEV)
    q, k, v = qkv(1, h, hkv, t, t, d, dtype, seed=5)
    q, k = lean(q, k, seg_ids, d)
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    out, _, stats = ops.oeb_attention(*leaves, kv_start, bounds, "odds", 0.7, scale=d ** -0.5)
    assert int(stats[..., 4].sum()) > 0
    ref_leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    safe = bounds.clone()
    safe[bounds[..., 0] < 0] = 0
    want, _, _ = reference.oeb_attention(*ref_leaves, kv_start, safe, "odds", 0.7, TAU_MAX, EPS, None, None,
                                         d ** -0.5)
    atol, rtol = tolerances(dtype)
    torch.testing.assert_close(out.double(), want.detach(), atol=atol, rtol=rtol)
    grad = torch.randn_like(out)
    for name, x, y in zip("qkv", torch.autograd.grad(out, leaves, grad),
                          torch.autograd.grad(want, ref_leaves, grad.double())):
        assert rel_err(x, y) < (1e-4 if dtype == torch.float32 else 3e-2), f"d{name}: {rel_err(x, y):.2e}"


# ------------------------------------------------------------------------ lse into saliency


def test_oeb_lse_feeds_step_saliency_pool():
    """The lse of oeb_attention (over the valid real keys, before the rule) is the lse
    step_saliency_pool takes: the map with it equals the map without it (left padding, GQA)."""
    h, hkv, t, d = 6, 2, 150, 64
    rows = [trace([30, 40, 50, 30]), trace([20, 40, 40, 20], pad=30)]
    seg_ids = torch.cat([r[0] for r in rows]).to(DEV)
    kinds = torch.cat([r[1] for r in rows])
    q, k, v = qkv(2, h, hkv, t, t, d, torch.bfloat16, seed=6)
    dout = torch.randn(2, h, t, d, device=DEV, dtype=torch.bfloat16)
    kv_start = (seg_ids < 0).sum(1)
    off = torch.full((2, t, 2), -1, dtype=torch.long, device=DEV)
    _, lse, _ = ops.oeb_attention(q, k, v, kv_start, off, "bridge", scale=d ** -0.5)
    s = kinds.shape[1]
    without = ops.step_saliency_pool(q, k, v, dout, seg_ids, s, d ** -0.5, "abs_mean")
    with_lse = ops.step_saliency_pool(q, k, v, dout, seg_ids, s, d ** -0.5, "abs_mean", lse=lse)
    torch.testing.assert_close(with_lse, without, atol=1e-5 * float(without.abs().max()), rtol=1e-3)


# ------------------------------------------------------------------------------ streams


@cuda_only
def test_non_default_stream():
    """Every op (and its device-side checks) runs on the current stream: the results on a side
    stream equal those on the default stream bit for bit."""
    h, hkv, t, d = 4, 2, 96, 64
    seg_ids, kinds = trace([20, 30, 30, 16])
    seg_ids, kinds = seg_ids.to(DEV), kinds.to(DEV)
    bounds = reference.oeb_bounds(seg_ids.cpu(), kinds.cpu(), "bridge").to(DEV)
    kv_start = torch.zeros(1, dtype=torch.long, device=DEV)
    q, k, v = qkv(1, h, hkv, t, t, d, torch.bfloat16, seed=7)
    dout = torch.randn_like(q)
    hidden = torch.randn(1, t, 32, device=DEV)

    def run():
        out, lse, stats = ops.oeb_attention(q, k, v, kv_start, bounds, "bridge", scale=d ** -0.5)
        sal = ops.step_saliency_pool(q, k, v, dout, seg_ids, kinds.shape[1], d ** -0.5, "abs_mean",
                                     oeb_bounds=bounds)
        state = ops.new_momentum_state(1, 32, DEV)
        mom = ops.step_momentum_decode_(hidden, seg_ids, kinds, state, 0.9, 0.05)
        return out, lse, stats, sal, mom, *state

    want = run()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = run()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    for i, (x, y) in enumerate(zip(got, want)):
        assert torch.equal(x, y), f"output {i} differs on a side stream"


# ---------------------------------------------------------------------- deterministic mode


@pytest.fixture
def deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


def test_deterministic_backward_and_saliency(deterministic):
    """Under torch.use_deterministic_algorithms(True): the OEB backward takes its scalar path (no
    dQ atomics) and repeats bit for bit, close to the default tensor-core result; step_saliency_pool
    runs the CPU kernel (deterministic) and equals it bit for bit, run after run."""
    h, hkv, t, d = 12, 2, 257, 64
    seg_ids, kinds = trace([40, 60, 80, 77])
    bounds = reference.oeb_bounds(seg_ids, kinds, "bridge").to(DEV)
    kv_start = torch.zeros(1, dtype=torch.long, device=DEV)
    q, k, v = qkv(1, h, hkv, t, t, d, torch.bfloat16, seed=8)
    grad = torch.randn_like(q)

    def grads():
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        out, _, _ = ops.oeb_attention(*leaves, kv_start, bounds, "bridge", scale=d ** -0.5)
        return torch.autograd.grad(out, leaves, grad)

    first, second = grads(), grads()
    for x, y in zip(first, second):
        assert torch.equal(x, y)
    torch.use_deterministic_algorithms(False)
    default = grads()
    torch.use_deterministic_algorithms(True)
    for name, x, y in zip("qkv", first, default):
        assert rel_err(x, y) < 2e-2, f"d{name}: deterministic vs default {rel_err(x, y):.2e}"
    seg = seg_ids.to(DEV)
    args = (q, k, v, grad, seg, kinds.shape[1], d ** -0.5, "abs_mean")
    sal1 = ops.step_saliency_pool(*args, oeb_bounds=bounds)
    sal2 = ops.step_saliency_pool(*args, oeb_bounds=bounds)
    cpu = ops.step_saliency_pool(*(x.cpu() if isinstance(x, torch.Tensor) else x for x in args),
                                 oeb_bounds=bounds.cpu())
    assert sal1.device.type == DEV and torch.equal(sal1, sal2) and torch.equal(sal1.cpu(), cpu)


# ----------------------------------------------------------------------------- CUDA graphs


@cuda_only
def test_decode_step_ops_capture_in_a_cuda_graph():
    """A decode step's op calls (oeb_attention on a 2k cache with the split-KV path, smi_value,
    step_momentum_decode_) captured in a CUDA graph: capture issues no synchronization (the
    capture would fail), and replays with new kv_start / bounds / windows / seg ids / state equal
    eager calls on the same values."""
    b, h, hkv, tk, d, hidden = 2, 12, 2, 2048, 128, 64
    q, k, v = qkv(b, h, hkv, 1, tk, d, torch.bfloat16, seed=9)
    x = torch.randn(b, 1, hidden, device=DEV)
    kinds = torch.tensor([[0, 1, 1, 2], [0, 1, 2, 2]], device=DEV)
    static = dict(kv_start=torch.tensor([0, 100], device=DEV), bounds=torch.tensor([[[0, 300]], [[100, 900]]],
                                                                                   device=DEV),
                  windows=torch.tensor([[[200, 204]], [[-1, -1]]], device=DEV), seg=torch.tensor([[1], [2]],
                                                                                                 device=DEV))
    state = ops.new_momentum_state(b, hidden, DEV)

    def step(s, st):
        out, lse, stats = ops.oeb_attention(q, k, v, s["kv_start"], s["bounds"], "bridge", scale=d ** -0.5)
        out = ops.smi_value(out.transpose(1, 2), v, s["windows"], 0.06, 4)
        y = ops.step_momentum_decode_(x, s["seg"], kinds, st, 0.9, 0.05)
        return out, lse, stats, y

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (kernel attributes, allocator) off the capture
        for _ in range(2):
            step(static, ops.new_momentum_state(b, hidden, DEV))
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step(static, state)
    new_values = [  # the seg ids of a row never decrease from one step to the next
        dict(kv_start=[0, 100], bounds=[[[0, 300]], [[100, 900]]], windows=[[[200, 204]], [[-1, -1]]], seg=[[1], [1]]),
        dict(kv_start=[5, 0], bounds=[[[5, 1500]], [[-1, -1]]], windows=[[[-1, -1]], [[10, 12]]], seg=[[1], [2]]),
        dict(kv_start=[1000, 2047], bounds=[[[1200, 2000]], [[2047, 2048]]], windows=[[[1500, 1504]], [[2040, 2041]]],
             seg=[[2], [3]]),
    ]
    eager_state = [t.clone() for t in state]
    for values in new_values:
        for key, val in values.items():
            static[key].copy_(torch.tensor(val, device=DEV))
        graph.replay()
        want = step({key: t.clone() for key, t in static.items()}, eager_state)
        torch.cuda.synchronize()
        for i, (got, exp) in enumerate(zip(outs, want)):
            assert torch.equal(got, exp), f"replay output {i} differs from eager for {values}"
        for got, exp in zip(state, eager_state):
            assert torch.equal(got, exp)
