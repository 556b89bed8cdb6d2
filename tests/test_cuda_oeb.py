"""stepflow::oeb_attention on CUDA against the float64 reference and the CPU kernel.

The CUDA kernels (csrc/cuda/oeb_attention.cu) must have the CPU kernel's semantics: the same
outputs up to the dtype's tolerance, the same lse / stats (fp32), the same checks. Shapes cover
the paths of the kernel: tensor cores for bf16 / fp16 with head dims 64 / 128 and 96 (zero
padded to 128); the scalar path for fp32, d = 160 and d = 36 (rows not 16-byte aligned); one-warp
CTAs (few rows) and four-warp CTAs, the split-KV decode path with its merge kernel, GQA packing
of query heads, left padding, rows without keys, seg_start = -1 rows and num_sink 0 / 1 / 4.
Every test needs a GPU.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tolerances
from test_oeb_attention import locked_case, locked_rows, make_case as cpu_case

from stepflow_ext import ops, reference

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DEV = "cuda"


def make_case(*args, device=DEV, **kwargs):
    """tests/test_oeb_attention.py's case (drawn on the CPU), on the GPU."""
    return cpu_case(*args, device=device, **kwargs)


def ref64(q, k, v, seg_start, kv_start, strength, num_sink, scale):
    return reference.oeb_attention(q.double(), k.double(), v.double(), seg_start, kv_start, strength,
                                   num_sink, scale)


def on_cpu(*xs):
    return [x.cpu() if isinstance(x, torch.Tensor) else x for x in xs]


def assert_close(actual, expected, dtype, what, scale_by_max=False):
    atol, rtol = tolerances(dtype)
    if scale_by_max:  # gradients: absolute error relative to the largest entry
        atol = atol * max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), atol=atol, rtol=rtol,
                               msg=lambda m: f"{what}: {m}")


# (batch, heads, kv_heads, tq, tk, dim, num_sink, strength)
FORWARD_CASES = [
    pytest.param(2, 4, 2, 67, 67, 64, 1, 0.5, id="prefill-gqa-T67-d64"),
    pytest.param(1, 2, 1, 130, 130, 128, 4, 1.0, id="prefill-T130-d128-sink4"),
    pytest.param(2, 3, 1, 45, 45, 96, 0, 1.0, id="prefill-T45-d96-sink0"),
    pytest.param(2, 2, 2, 33, 33, 160, 1, 0.7, id="prefill-T33-d160"),
    pytest.param(2, 3, 1, 1, 1, 64, 1, 1.0, id="prefill-T1"),
    pytest.param(2, 6, 2, 1, 300, 64, 1, 0.5, id="decode-Tk300-gqa3"),
    pytest.param(3, 4, 1, 1, 1100, 128, 0, 1.0, id="decode-Tk1100-gqa4-sink0"),
    pytest.param(2, 4, 2, 3, 2000, 128, 4, 1.0, id="decode3-Tk2000-sink4"),
    pytest.param(2, 2, 1, 20, 150, 36, 1, 0.5, id="chunk20-Tk150-d36"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,heads,kv_heads,tq,tk,dim,num_sink,strength", FORWARD_CASES)
def test_forward_matches_reference_and_cpu(seed, batch, heads, kv_heads, tq, tk, dim, num_sink, strength, dtype):
    q, k, v, seg_start, kv_start = make_case(batch, heads, kv_heads, tq, tk, dim, dtype,
                                             full_pad_row=(1 < tq < tk))
    scale = dim ** -0.5
    out, lse, stats = ops.oeb_attention(q, k, v, seg_start, kv_start, strength, num_sink, scale)
    assert out.is_cuda and out.dtype == dtype and lse.dtype == torch.float32 and stats.dtype == torch.float32
    assert out.shape == q.shape and lse.shape == q.shape[:3] and stats.shape == (*q.shape[:3], 2)
    ref_out, ref_lse, ref_stats = ref64(q, k, v, seg_start, kv_start, strength, num_sink, scale)
    assert_close(out, ref_out, dtype, "out")
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), empty) and bool((lse[empty] < 0).all())
    torch.testing.assert_close(lse[~empty].double(), ref_lse[~empty], atol=5e-5, rtol=2e-5)
    torch.testing.assert_close(stats.double(), ref_stats, atol=2e-5, rtol=2e-5)
    assert bool((out[empty] == 0).all()) and bool((stats[empty] == 0).all())
    # The CPU kernel on the same (rounded) inputs.
    cpu_out, cpu_lse, cpu_stats = ops.oeb_attention(*on_cpu(q, k, v, seg_start, kv_start), strength, num_sink, scale)
    assert_close(out, cpu_out, dtype, "out vs CPU kernel")
    torch.testing.assert_close(lse.cpu(), cpu_lse, atol=5e-5, rtol=2e-5)
    torch.testing.assert_close(stats.cpu(), cpu_stats, atol=2e-5, rtol=2e-5)


def test_strength_changes_output(seed):
    """The rebalance is active on the GPU: strength 1 moves the output, many rows are locked."""
    q, k, v, seg_start, kv_start = locked_case(40, 0.125, 2, 4, 2, 70, 70, 64, torch.bfloat16, device=DEV)
    base, _, stats = ops.oeb_attention(q, k, v, seg_start, kv_start, 0.0, 1, 0.125)
    strong, _, _ = ops.oeb_attention(q, k, v, seg_start, kv_start, 1.0, 1, 0.125)
    assert locked_rows(stats) > 40
    assert float((strong.float() - base.float()).abs().max()) > 0.05


def sdpa_causal(q, k, v, kv_start, scale):
    """Plain causal attention with left padding through torch SDPA in q's dtype; rows with keys."""
    tq, tk = q.shape[2], k.shape[2]
    valid = torch.arange(tk, device=q.device)[None, :] >= kv_start[:, None]
    mask = reference.causal_valid_mask(valid, tq)[:, None]
    rep = q.shape[1] // k.shape[1]
    out = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                         attn_mask=mask, scale=scale)
    return out, mask.any(-1).expand(-1, q.shape[1], -1)


@pytest.mark.parametrize("num_sink", [0, 1, 4])
@pytest.mark.parametrize("tq,tk", [(37, 37), (1, 700), (3, 90)], ids=["prefill", "decode", "chunk"])
def test_plain_attention_when_not_rebalanced(seed, tq, tk, num_sink):
    """strength 0, and seg_start = -1 everywhere at strength 1, are plain causal attention."""
    q, k, v, seg_start, kv_start = make_case(2, 4, 2, tq, tk, 64, torch.float32)
    expected, rows = sdpa_causal(q.double(), k.double(), v.double(), kv_start, 0.125)
    for strength, seg in [(0.0, seg_start), (1.0, torch.full_like(seg_start, -1))]:
        out, _, stats = ops.oeb_attention(q, k, v, seg, kv_start, strength, num_sink, 0.125)
        assert_close(out[rows], expected[rows], torch.float32, f"out (strength {strength})")
        assert bool((out[~rows] == 0).all())
        if strength == 1.0:
            assert bool((stats == 0).all())


@pytest.mark.parametrize("num_sink", [0, 1, 4])
def test_one_token_step_decode(seed, num_sink):
    """Decode where the new token opens a step (C = itself) or continues one; padding; sinks."""
    q, k, v, _, _ = make_case(3, 4, 2, 1, 300, 64, torch.float32)
    seg_start = torch.tensor([[299], [200], [-1]], device=DEV)
    kv_start = torch.tensor([0, 3, 298], device=DEV)
    out, _, stats = ops.oeb_attention(q, k, v, seg_start, kv_start, 0.7, num_sink, 0.35)
    ref_out, _, ref_stats = ref64(q, k, v, seg_start, kv_start, 0.7, num_sink, 0.35)
    assert_close(out, ref_out, torch.float32, "out")
    torch.testing.assert_close(stats.double(), ref_stats, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_underflowing_context_mass(seed, dtype):
    """p_X far below float range: the per-group maxima keep L_X exact; A' = exp(s - lse + log r) <= 1.

    X's scores sit ~150 below C's; at strength 1 the float64 reference still moves half of the
    mass to X, and so must the kernel (forward and backward). Same geometry as the CPU test.
    In bf16, dq = scale sum_j dS_j k_j cancels terms of size |scale k| = 75, and the tensor-core
    backward rounds dS to bf16 before that product (as flash attention does), so its dq is only
    good to about 2^-8 |scale k|; fp32 (scalar path) is held to the usual tolerance.
    """
    tk, dim = 12, 4
    q = torch.zeros(1, 1, tk, dim)
    q[..., 0] = 1.0
    k = 0.1 * torch.randn(1, 1, tk, dim)
    k[0, 0, :6, 0] = -75.0  # context (and sink) keys
    k[0, 0, 6:, 0] = 75.0   # current step
    v = torch.randn(1, 1, tk, dim)
    seg_start = torch.tensor([[-1] * 6 + [6] * 6], device=DEV)
    kv_start = torch.tensor([0], device=DEV)
    q, k, v = (x.to(dtype).to(DEV).requires_grad_() for x in (q, k, v))
    out, lse, stats = ops.oeb_attention(q, k, v, seg_start, kv_start, 1.0, 1, 1.0)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref_out, ref_lse, ref_stats = reference.oeb_attention(q64, k64, v64, seg_start, kv_start, 1.0, 1, 1.0)
    assert locked_rows(ref_stats) == 6 and float(ref_stats[..., 1].detach().max()) < 1e-40
    assert_close(out, ref_out, dtype, "out")
    torch.testing.assert_close(lse.double(), ref_lse.detach(), atol=5e-5, rtol=2e-5)
    torch.testing.assert_close(stats.double(), ref_stats.detach(), atol=2e-5, rtol=2e-5)
    grad = torch.randn_like(ref_out)
    got = torch.autograd.grad(out, (q, k, v), grad.to(dtype))
    want = torch.autograd.grad(ref_out, (q64, k64, v64), grad)
    for name, a, b in zip("qkv", got, want):
        assert bool(torch.isfinite(a).all())
        if dtype == torch.bfloat16 and name == "q":
            torch.testing.assert_close(a.double(), b, atol=2 ** -7 * 75.0, rtol=0, msg=lambda m: f"dq: {m}")
        else:
            assert_close(a, b, dtype, f"d{name}", scale_by_max=True)


def test_non_contiguous_and_float64(seed):
    """Strides do not matter; float64 runs the CPU kernel and returns CUDA tensors."""
    q, k, v, seg_start, kv_start = make_case(2, 4, 2, 19, 19, 64, torch.float32)
    qt, kt, vt = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    assert not qt.is_contiguous()
    for got, want in zip(ops.oeb_attention(qt, kt, vt, seg_start, kv_start, 0.5, 1, 0.3),
                         ops.oeb_attention(q, k, v, seg_start, kv_start, 0.5, 1, 0.3)):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    out, lse, stats = ops.oeb_attention(q.double(), k.double(), v.double(), seg_start, kv_start, 0.5, 1, 0.3)
    ref_out, ref_lse, ref_stats = ref64(q, k, v, seg_start, kv_start, 0.5, 1, 0.3)
    assert out.is_cuda and out.dtype == torch.float64
    torch.testing.assert_close(out, ref_out, atol=1e-9, rtol=1e-7)


def test_unaligned_rows_take_the_scalar_path(seed):
    """Inputs whose rows are not 16-byte aligned (a storage offset) run the scalar kernels and
    agree with the tensor-core result on aligned copies (forward and backward)."""
    q, k, v, seg_start, kv_start = make_case(2, 4, 2, 40, 40, 64, torch.bfloat16)

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
        leaves = [x.clone().requires_grad_() if x.data_ptr() % 16 == 0 else x.detach().requires_grad_() for x in args]
        out, lse, stats = ops.oeb_attention(*leaves, seg_start, kv_start, 0.8, 1, 0.125)
        results.append((out, lse, stats, *torch.autograd.grad(out, leaves, grad)))
    for name, a, b in zip(["out", "lse", "stats", "dq", "dk", "dv"], *results):
        assert_close(a, b, torch.bfloat16, f"{name} unaligned vs aligned", scale_by_max=True)


# ----------------------------------------------------------------------------------- backward

BACKWARD_CASES = [
    pytest.param(2, 4, 2, 67, 67, 64, 1, 0.5, id="prefill-gqa-T67-d64"),
    pytest.param(1, 2, 1, 100, 100, 128, 4, 1.0, id="prefill-T100-d128-sink4"),
    pytest.param(2, 2, 1, 40, 40, 96, 0, 1.0, id="prefill-T40-d96-sink0"),
    pytest.param(1, 2, 2, 30, 30, 160, 1, 0.6, id="prefill-T30-d160"),
    pytest.param(2, 4, 2, 1, 300, 64, 1, 1.0, id="decode-Tk300"),
    pytest.param(3, 2, 2, 3, 200, 64, 1, 0.3, id="chunk3-Tk200"),
    pytest.param(2, 2, 1, 20, 90, 36, 4, 0.8, id="chunk20-Tk90-d36"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,heads,kv_heads,tq,tk,dim,num_sink,strength", BACKWARD_CASES)
def test_backward_matches_reference_and_cpu(seed, batch, heads, kv_heads, tq, tk, dim, num_sink, strength, dtype):
    scale = dim ** -0.5
    for _ in range(20):  # a draw where some row is locked, so the rebalance terms are tested
        q, k, v, seg_start, kv_start = make_case(batch, heads, kv_heads, tq, tk, dim, dtype,
                                                 full_pad_row=(1 < tq < tk))
        if locked_rows(ref64(q, k, v, seg_start, kv_start, strength, num_sink, scale)[2]) > 0:
            break
    grad_out = torch.randn(q.shape, dtype=torch.float64, device=DEV).to(dtype)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, _, _ = ops.oeb_attention(*leaves, seg_start, kv_start, strength, num_sink, scale)
    got = torch.autograd.grad(out, leaves, grad_out)
    leaves64 = [x.double().requires_grad_() for x in (q, k, v)]
    ref_out, _, ref_stats = reference.oeb_attention(*leaves64, seg_start, kv_start, strength, num_sink, scale)
    want = torch.autograd.grad(ref_out, leaves64, grad_out.double())
    assert locked_rows(ref_stats) > 0
    cpu_leaves = [x.cpu().requires_grad_() for x in (q, k, v)]
    cpu_out, _, _ = ops.oeb_attention(*cpu_leaves, seg_start.cpu(), kv_start.cpu(), strength, num_sink, scale)
    cpu_got = torch.autograd.grad(cpu_out, cpu_leaves, grad_out.cpu())
    for name, a, b, c in zip("qkv", got, want, cpu_got):
        assert a.is_cuda and a.dtype == dtype and a.shape == b.shape
        assert_close(a, b, dtype, f"d{name}", scale_by_max=True)
        assert_close(a, c, dtype, f"d{name} vs CPU kernel", scale_by_max=True)


def test_backward_direct_call_ignores_lse_values(seed):
    """Like the CPU kernel, the backward recomputes the group masses: lse / stats are shape-checked only."""
    q, k, v, seg_start, kv_start = make_case(2, 4, 2, 21, 21, 64, torch.float32)
    out, lse, stats = torch.ops.stepflow.oeb_attention(q, k, v, seg_start, kv_start, 0.5, 1, 0.3)
    g = torch.randn_like(out)
    a = torch.ops.stepflow.oeb_attention_backward(g, q, k, v, lse, stats, seg_start, kv_start, 0.5, 1, 0.3)
    b = torch.ops.stepflow.oeb_attention_backward(g, q, k, v, torch.zeros_like(lse), torch.zeros_like(stats),
                                                  seg_start, kv_start, 0.5, 1, 0.3)
    for name, x, y in zip("qkv", a, b):  # dq sums with atomics: equal up to the order of the adds
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-6, msg=lambda m: f"d{name}: {m}")


# ---------------------------------------------------------------------------------- opcheck


@pytest.mark.parametrize("tq,tk", [(9, 9), (2, 300)], ids=["prefill", "decode-split"])
def test_opcheck_forward(seed, tq, tk):
    q, k, v, seg_start, kv_start = make_case(2, 4, 2, tq, tk, 64, torch.float32)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    torch.library.opcheck(torch.ops.stepflow.oeb_attention.default, (q, k, v, seg_start, kv_start, 0.5, 1, 0.35))


def test_opcheck_backward(seed):
    q, k, v, seg_start, kv_start = make_case(2, 4, 2, 9, 9, 64, torch.bfloat16)
    out, lse, stats = ops.oeb_attention(q, k, v, seg_start, kv_start, 0.5, 1, 0.35)
    args = (torch.randn_like(out), q, k, v, lse, stats, seg_start, kv_start, 0.5, 1, 0.35)
    torch.library.opcheck(torch.ops.stepflow.oeb_attention_backward.default, args)


# ------------------------------------------------------------------------------- bad inputs


def _good():
    q, k, v, seg_start, kv_start = make_case(2, 4, 2, 6, 6, 64, torch.float32)
    return dict(q=q, k=k, v=v, seg_start=seg_start, kv_start=kv_start, strength=0.5, num_sink=1, scale=0.3)


# Changes are built lazily: collecting this file must not touch CUDA on a machine without a GPU.
@pytest.mark.parametrize("change,match", [
    (lambda: dict(strength=2.0), "strength"),
    (lambda: dict(seg_start=torch.tensor([[0, 0, 0, 5, 3, 3], [-1] * 6], device=DEV)), "seg_start"),
    (lambda: dict(kv_start=torch.tensor([-1, 0], device=DEV)), "kv_start"),
    (lambda: dict(kv_start=torch.tensor([0, 7], device=DEV)), "kv_start"),
    (lambda: dict(seg_start=torch.full((2, 6), -1, dtype=torch.int32, device=DEV)), "seg_start"),
    (lambda: dict(q=torch.randn(2, 3, 6, 64, device=DEV)), "heads"),
    (lambda: dict(q=torch.randn(2, 4, 7, 64, device=DEV), seg_start=torch.full((2, 7), -1, device=DEV)), "tokens"),
    (lambda: dict(kv_start=torch.tensor([0, 0])), "device"),
    (lambda: dict(q=torch.randn(2, 4, 6, 300, device=DEV), k=torch.randn(2, 2, 6, 300, device=DEV),
                  v=torch.randn(2, 2, 6, 300, device=DEV)), "head dim"),
], ids=["strength", "seg_after_query", "kv<0", "kv>Tk", "seg_int32", "heads", "Tq>Tk", "kv_on_cpu", "d>256"])
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


# --------------------------------------------------------------------------------- large smoke


def test_prefill_T8192_matches_sdpa(seed):
    """T = 8192, d = 128, bf16: finite; at strength 0 equal to SDPA (forward and backward) within
    bf16 tolerance; at strength 1 finite with many rows rebalanced.

    A 64-token question then steps of 512 tokens; each step has its own direction shared by its
    queries and keys, so queries prefer their own step and most rows are locked.
    """
    b, h, hkv, t, d = 1, 4, 2, 8192, 128
    seg_ids = torch.tensor([[0] * 64 + [1 + (i - 64) // 512 for i in range(64, t)]])
    seg_kinds = torch.full((1, int(seg_ids.max()) + 1), reference.STEP)
    seg_kinds[0, 0] = reference.QUESTION
    seg_start = reference.seg_start_from_seg_ids(seg_ids, seg_kinds).to(DEV)
    kv_start = torch.zeros(b, dtype=torch.long, device=DEV)
    dirs = torch.randn(int(seg_ids.max()) + 1, d, device=DEV)
    dirs = dirs * (0.5 * d) ** 0.5 / dirs.norm(dim=-1, keepdim=True)
    bias = dirs[seg_ids[0].to(DEV)]  # (t, d)
    q = (torch.randn(b, h, t, d, device=DEV) + bias).to(torch.bfloat16).requires_grad_()
    k = (torch.randn(b, hkv, t, d, device=DEV) + bias).to(torch.bfloat16).requires_grad_()
    v = torch.randn(b, hkv, t, d, device=DEV, dtype=torch.bfloat16).requires_grad_()
    scale = d ** -0.5
    out, lse, stats = ops.oeb_attention(q, k, v, seg_start, kv_start, 0.0, 1, scale)
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(h // hkv, 1), v.repeat_interleave(h // hkv, 1),
                                         is_causal=True, scale=scale)
    assert bool(torch.isfinite(out).all()) and bool(torch.isfinite(lse).all())
    assert_close(out, ref, torch.bfloat16, "out vs SDPA")
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for name, a, w in zip("qkv", got, want):
        assert bool(torch.isfinite(a).all())
        assert_close(a, w, torch.bfloat16, f"d{name} vs SDPA", scale_by_max=True)
    out1, _, stats1 = ops.oeb_attention(q, k, v, seg_start, kv_start, 1.0, 1, scale)
    assert bool(torch.isfinite(out1).all()) and locked_rows(stats1) > 4 * t // 2
    torch.testing.assert_close(stats1, stats)  # stats are taken before rebalancing
    assert float((out1.float() - out.float()).abs().max()) > 0.05
    got1 = torch.autograd.grad(out1, (q, k, v), grad)
    assert all(bool(torch.isfinite(a).all()) for a in got1)


def test_decode_KV32768(seed):
    """One new token against a 32k cache (split-KV path): matches SDPA at strength 0 and the
    float64 reference at strength 1 (cheap at Tq = 1); left padding on one row."""
    b, h, hkv, tk, d = 2, 12, 2, 32768, 128
    q = torch.randn(b, h, 1, d, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(b, hkv, tk, d, device=DEV, dtype=torch.bfloat16)
    v = torch.randn(b, hkv, tk, d, device=DEV, dtype=torch.bfloat16)
    kv_start = torch.tensor([0, 5000], device=DEV)
    seg_start = torch.tensor([[tk - 300], [tk - 1]], device=DEV)
    u = torch.randn(d, device=DEV)
    u = (u * (0.5 * d) ** 0.5 / u.norm()).to(torch.bfloat16)
    q[0] += u  # row 0 leans towards its current step: locked
    k[0, :, tk - 300:] += u
    scale = d ** -0.5
    out0, _, _ = ops.oeb_attention(q, k, v, seg_start, kv_start, 0.0, 1, scale)
    expected, _ = sdpa_causal(q, k, v, kv_start, scale)
    assert bool(torch.isfinite(out0).all())
    assert_close(out0, expected, torch.bfloat16, "decode out vs SDPA")
    out1, lse1, stats1 = ops.oeb_attention(q, k, v, seg_start, kv_start, 1.0, 4, scale)
    ref_out, ref_lse, ref_stats = ref64(q, k, v, seg_start, kv_start, 1.0, 4, scale)
    assert locked_rows(ref_stats) > 0
    assert_close(out1, ref_out, torch.bfloat16, "decode out vs reference")
    torch.testing.assert_close(lse1.double(), ref_lse, atol=5e-5, rtol=2e-5)
    torch.testing.assert_close(stats1.double(), ref_stats, atol=2e-5, rtol=2e-5)
