"""Python face of the compiled ops: argument checks, fake (meta) kernels and autograd.

The C++ schemas are in csrc/ops.cpp; kernels in csrc/cpu (and csrc/cuda).

Checks and host synchronization (docs/method_kernels.md). The wrappers check everything that
does not need a tensor's contents (types, shapes, dtypes, devices, scalars) and raise ValueError
naming the argument. They never read tensor values (no .item(), .tolist(), bool(tensor), .cpu()),
so a call issues no device-to-host copy and traces cleanly under torch.compile and CUDA-graph
capture. The values (kv_start and bounds ranges, segment ids, sink logits, the decode state) are
checked by the kernels: the CPU kernels on the host, where that is free (their RuntimeError comes
back from the wrappers as ValueError with the kernel's message); the CUDA kernels on the device,
where a bad value is a device-side assert (csrc/cuda/device_checks.cuh). float64 on CUDA is the
exception: oeb_attention runs the CPU kernel on host copies there.
"""
from __future__ import annotations

import contextlib

import torch

from . import _C  # noqa: F401  (loading the library registers torch.ops.stepflow.*)

QUESTION, STEP, SUMMARY = 0, 1, 2
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
HEAD_REDUCTIONS = ("sum_abs", "abs_sum", "abs_mean")
OEB_RULES = ("bridge", "odds")
OEB_EPS = 1e-6  # the epsilon of the paper's logit shifts (design.md 2.3)


# --------------------------------------------------------------------------- kernel path switches


@contextlib.contextmanager
def kernel_paths(**values):
    """Switch CUDA kernel paths for the duration of a `with` block (docs/method_kernels.md, "Kernel
    paths and their switches"), e.g. kernel_paths(pool_split=0, oeb_ldmatrix=0) for the paths before
    issue 15's items 7 and 8. Each switch starts from its environment variable (STEPFLOW_POOL_SPLIT,
    STEPFLOW_POOL_PIPELINE, STEPFLOW_OEB_LDMATRIX, STEPFLOW_OEB_TILE_FAST, STEPFLOW_OEB_BN); the
    values are process-wide (not per thread). The CPU kernels have no such paths."""
    previous = {}
    try:
        for name, value in values.items():
            previous[name] = _C._set_kernel_path(name, int(value))
        yield dict(_C._kernel_paths())
    finally:
        for name, value in previous.items():
            _C._set_kernel_path(name, value)


# --------------------------------------------------------------------------- argument checks


def _check_tensor(name, x, ndim, dtypes=_FLOAT_DTYPES):
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{name} must have dtype in ({names}), got {x.dtype}")


def _check_device(op, ref_name, ref, **others):
    if ref.device.type == "cuda" and not _C.cuda_compiled:
        raise ValueError(f"{ref_name} is on {ref.device}, but stepflow_ext was built without CUDA "
                         "kernels (rebuild with STEPFLOW_CUDA=1 on a machine with nvcc)")
    if ref.device.type == "cuda" and not torch._C._dispatch_has_kernel_for_dispatch_key(f"stepflow::{op}", "CUDA"):
        raise ValueError(f"{ref_name} is on {ref.device}, but this build has no CUDA kernel for stepflow::{op}")
    if ref.device.type not in ("cpu", "cuda", "meta"):
        raise ValueError(f"{ref_name} is on {ref.device}: only CPU and CUDA tensors are supported")
    for name, x in others.items():
        if x is not None and x.device != ref.device:
            raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}")


def _check_scalar_range(name, value, lo, hi, hi_open=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    ok = lo <= value < hi if hi_open else lo <= value <= hi
    if not ok or value != value:
        bracket = ")" if hi_open else "]"
        raise ValueError(f"{name} must be in [{lo}, {hi}{bracket}, got {value}")
    return value


def _check_attention_shapes(q, k, v, q_name="q"):
    _check_tensor(q_name, q, 4)
    _check_tensor("k", k, 4)
    _check_tensor("v", v, 4)
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{q_name}, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    b, h, _, d = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != b:
        raise ValueError(f"k has batch {k.shape[0]} but {q_name} has batch {b}")
    if k.shape[3] != d:
        raise ValueError(f"k has head dim {k.shape[3]} but {q_name} has head dim {d}")
    h_kv = k.shape[1]
    if h_kv == 0 or h % h_kv != 0:
        raise ValueError(f"the number of query heads ({h}) must be a multiple of the kv heads ({h_kv})")
    if d == 0:
        raise ValueError("head dim must be positive")


def _check_scale(scale):
    if (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not float(scale) > 0
            or float(scale) == float("inf")):
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    return float(scale)


def _check_seg_ids(name, seg_ids, batch, length):
    """Type and shape; the values (-1 or in [0, S)) are the kernels' to check."""
    _check_tensor(name, seg_ids, 2, dtypes=(torch.int64, torch.int32))
    if tuple(seg_ids.shape) != (batch, length):
        raise ValueError(f"{name} must have shape ({batch}, {length}), got {tuple(seg_ids.shape)}")


def _kernel_errors_as_value_errors(op, fn, *args):
    """fn(*args); a TORCH_CHECK of the kernel on an argument (a RuntimeError whose message starts
    with `op`, as the CPU kernels' checks of the values do) is raised as ValueError."""
    try:
        return fn(*args)
    except RuntimeError as e:
        message = str(e).split("\n")[0]
        if message.startswith(op):
            raise ValueError(message) from e
        raise


HEAD_DIM_MAX = 256  # the CUDA kernels' limit, enforced on every device so CPU and GPU accept the same inputs


# --------------------------------------------------------------------------- shared OEB arguments


def _check_sink(sink, q):
    if sink is None:
        return None
    _check_tensor("sink", sink, 1)
    if sink.shape[0] != q.shape[1]:
        raise ValueError(f"sink must have shape (H,) = ({q.shape[1]},), one logit per query head, got {tuple(sink.shape)}")
    if sink.device != q.device:
        raise ValueError(f"sink is on {sink.device} but q is on {q.device}")
    return sink  # finite logits: the kernels check the values


def _check_window(window):
    """None (or -1) = full attention; else a sliding window of >= 1 keys. Returns the schema's int."""
    if window is None:
        return -1
    if isinstance(window, bool) or not isinstance(window, int) or not (window >= 1 or window == -1):
        raise ValueError(f"window must be None (full attention) or an int >= 1 (a sliding window), got {window!r}")
    return window


def _check_rule_args(rule, strength, tau_max, eps, prefix=""):
    """The rule's arguments; messages name them as the caller spells them (prefix "oeb_": step_saliency_pool)."""
    if rule not in OEB_RULES:
        raise ValueError(f"{prefix}rule must be one of {OEB_RULES}, got {rule!r}")
    strength = _check_scalar_range(f"{prefix}strength", strength, 0.0, 1.0)
    tau_max = _check_scalar_range(f"{prefix}tau_max", tau_max, 0.0, 1.0)
    if tau_max == 0.0:
        raise ValueError(f"{prefix}tau_max must be in (0, 1], got 0.0")
    eps = _check_scalar_range(f"{prefix}eps", eps, 0.0, 0.5, hi_open=True)
    if eps == 0.0:
        raise ValueError(f"{prefix}eps must be in (0, 0.5): it is part of the bridge rule (design.md 2.3), got 0.0")
    return strength, tau_max, eps


def _check_bounds(name, bounds, batch, tq):
    """Type and shape; the values ((-1, -1) or 0 <= a <= b <= the query's position + 1) are the
    kernels' to check."""
    _check_tensor(name, bounds, 3, dtypes=(torch.int64, torch.int32))
    if tuple(bounds.shape) != (batch, tq, 2):
        raise ValueError(f"{name} must have shape ({batch}, {tq}, 2), got {tuple(bounds.shape)}")
    return bounds.long()


# --------------------------------------------------------------------------- step_saliency_pool


def step_saliency_pool(q, k, v, grad_out, seg_ids, num_segments, scale, head_reduction="sum_abs", lse=None,
                       sink=None, window=None, oeb_bounds=None, oeb_rule="bridge", oeb_strength=0.0,
                       oeb_tau_max=0.15, oeb_eps=OEB_EPS):
    """The raw step map M[b, a, c] of design.md 2.2 for one layer, fp32 (B, S, S).

    q, grad_out: (B, H, T, d); k, v: (B, H_kv, T, d); seg_ids: (B, T) int64, -1 on padding.
    head_reduction: "sum_abs" |sum_h A dL/dA|, "abs_sum" sum_h |A dL/dA|, "abs_mean" (the paper's)
    the mean over heads of |A dL/dA|.
    lse (optional, (B, H, T) fp32): the log-sum-exp of scale * q.k over each query's valid real keys
    (no sink), as attention forward kernels return it; given, it saves one pass over the keys.
    sink (optional, (H,)): per-head attention-sink logits in the softmax denominator (GPT-OSS);
    window (optional int): the layer's sliding window (keys j > i - window).

    OEB (optional, for a layer where the Odds-Equal Bridge of design.md 2.3 is active): the
    saliency is measured on the attention A' the layer really used. oeb_bounds (B, T, 2) are the
    group bounds of oeb_attention for this prefill, with its rule and parameters; the OEB kv_start
    of a row is its first valid token. Without oeb_bounds the OEB args are unused.
    """
    _check_attention_shapes(q, k, v)
    _check_tensor("grad_out", grad_out, 4)
    if grad_out.shape != q.shape:
        raise ValueError(f"grad_out must have the shape of q {tuple(q.shape)}, got {tuple(grad_out.shape)}")
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"k has {k.shape[2]} tokens but q has {q.shape[2]}: step_saliency_pool needs Tq == Tk")
    if isinstance(num_segments, bool) or not isinstance(num_segments, int) or num_segments < 1:
        raise ValueError(f"num_segments must be a positive int, got {num_segments!r}")
    b, _, t, _ = q.shape
    _check_seg_ids("seg_ids", seg_ids, b, t)
    scale = _check_scale(scale)
    if head_reduction not in HEAD_REDUCTIONS:
        raise ValueError(f"head_reduction must be one of {HEAD_REDUCTIONS}, got {head_reduction!r}")
    if lse is not None:
        _check_tensor("lse", lse, 3, dtypes=(torch.float32,))
        if tuple(lse.shape) != tuple(q.shape[:3]):
            raise ValueError(f"lse must have shape {tuple(q.shape[:3])}, got {tuple(lse.shape)}")
    sink = _check_sink(sink, q)
    window = _check_window(window)
    oeb_strength, oeb_tau_max, oeb_eps = _check_rule_args(oeb_rule, oeb_strength, oeb_tau_max, oeb_eps, "oeb_")
    if oeb_bounds is not None:
        oeb_bounds = _check_bounds("oeb_bounds", oeb_bounds, b, t)
    _check_device("step_saliency_pool", "q", q, k=k, v=v, grad_out=grad_out, seg_ids=seg_ids, lse=lse,
                  oeb_bounds=oeb_bounds)
    # The values (seg ids in [-1, num_segments), oeb_bounds, padding only at the ends of a row with
    # oeb_bounds, finite sink logits) are checked by the kernel.
    return _kernel_errors_as_value_errors(
        "step_saliency_pool", torch.ops.stepflow.step_saliency_pool, q, k, v, grad_out, seg_ids.long(), num_segments,
        scale, head_reduction, lse, sink, window, oeb_bounds, oeb_rule, oeb_strength, oeb_tau_max, oeb_eps)


@torch.library.register_fake("stepflow::step_saliency_pool")
def _(q, k, v, grad_out, seg_ids, num_segments, scale, head_reduction="sum_abs", lse=None, sink=None, window=-1,
      oeb_bounds=None, oeb_rule="bridge", oeb_strength=0.0, oeb_tau_max=0.15, oeb_eps=1e-6):
    return q.new_empty((q.shape[0], num_segments, num_segments), dtype=torch.float32)


# --------------------------------------------------------------------------- oeb_attention


def _check_oeb_args(q, k, v, kv_start, bounds, rule, strength, tau_max, eps, sink, window, scale):
    _check_attention_shapes(q, k, v)
    b, _, tq, _ = q.shape
    tk = k.shape[2]
    if tq > tk:
        raise ValueError(f"q has {tq} tokens but k only {tk}: queries must not outnumber keys")
    if q.shape[-1] > HEAD_DIM_MAX:
        raise ValueError(f"head dim must be at most {HEAD_DIM_MAX} (the CUDA kernels' limit, enforced on every "
                         f"device), got {q.shape[-1]}")
    _check_tensor("kv_start", kv_start, 1, dtypes=(torch.int64, torch.int32))
    if tuple(kv_start.shape) != (b,):
        raise ValueError(f"kv_start must have shape ({b},), got {tuple(kv_start.shape)}")
    bounds = _check_bounds("bounds", bounds, b, tq)
    strength, tau_max, eps = _check_rule_args(rule, strength, tau_max, eps)
    sink = _check_sink(sink, q)
    window = _check_window(window)
    scale = _check_scale(scale)
    _check_device("oeb_attention", "q", q, k=k, v=v, kv_start=kv_start, bounds=bounds)
    return bounds, strength, tau_max, eps, sink, window, scale


def oeb_attention(q, k, v, kv_start, bounds, rule="bridge", strength=0.5, tau_max=0.15, eps=OEB_EPS, sink=None,
                  window=None, scale=None):
    """Odds-Equal Bridge attention (design.md 2.3). Returns (out, lse, stats).

    q: (B, H, Tq, d); k, v: (B, H_kv, Tk, d) with Tq <= Tk, query i at key position p = Tk - Tq + i.
    kv_start: (B,) int64, the first valid key (left padding). bounds: (B, Tq, 2) int64, per query
    (a, b): its valid keys [lo, p] split into group 0 = [lo, a) (never rescaled), group 1 = [a, b),
    group 2 = [b, p]; (-1, -1): the row is not intervened (question tokens, padding).
    rule "bridge" (the paper's, default): groups O, B, S; the bridge B gets at least
    tau_B = min(sqrt(|B| / (|B| + |S| + eps)), tau_max) of the mass by the KL projection with the
    paper's eps. rule "odds" (this project's earlier OEB): groups sinks, X, C; where p_C > p_X > 0
    the odds p_C / p_X become their (1 - strength) power.
    sink: optional per-head logits (H,) in the final softmax (GPT-OSS); window: optional sliding
    window (keys j > p - window). Both rules read the group masses off the real-key softmax.
    out has q's dtype; lse (B, H, Tq) is the log-sum-exp over the valid real keys before the rule;
    stats (B, H, Tq, 5) fp32 = (p_0, p_1, p_2, p_sink, active). Differentiable in q, k, v and sink
    through `out` (docs/method.md section 3); lse and stats are diagnostics, not differentiable.
    """
    if scale is None and isinstance(q, torch.Tensor) and q.dim() == 4:
        scale = q.shape[-1] ** -0.5
    bounds, strength, tau_max, eps, sink, window, scale = _check_oeb_args(q, k, v, kv_start, bounds, rule, strength,
                                                                          tau_max, eps, sink, window, scale)
    # The values (kv_start in [0, Tk], bounds, finite sink logits) are checked by the kernel.
    return _kernel_errors_as_value_errors("oeb_attention", torch.ops.stepflow.oeb_attention, q, k, v, kv_start.long(),
                                          bounds, rule, strength, tau_max, eps, sink, window, scale)


def active_count(stats) -> int:
    """The number of (batch, head, query) rows an oeb_attention call changed (its triggers)."""
    return int(stats[..., 4].sum())


@torch.library.register_fake("stepflow::oeb_attention")
def _(q, k, v, kv_start, bounds, rule, strength, tau_max, eps, sink, window, scale):
    b, h, tq, d = q.shape
    # The kernels return contiguous tensors whatever the strides of q (HF's q after RoPE is not).
    return (q.new_empty((b, h, tq, d)), q.new_empty((b, h, tq), dtype=torch.float32),
            q.new_empty((b, h, tq, 5), dtype=torch.float32))


@torch.library.register_fake("stepflow::oeb_attention_backward")
def _(grad_out, q, k, v, lse, stats, kv_start, bounds, rule, strength, tau_max, eps, sink, window, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _oeb_setup_context(ctx, inputs, output):
    q, k, v, kv_start, bounds, rule, strength, tau_max, eps, sink, window, scale = inputs
    out, lse, stats = output
    # Gradients flow from `out` only: lse and stats are diagnostics (the pre-rule normalizer, the
    # group masses, the sink's weight, the trigger flag) and are marked non-differentiable.
    ctx.mark_non_differentiable(lse, stats)
    ctx.save_for_backward(q, k, v, out, lse, stats, kv_start, bounds, sink)
    ctx.args = (rule, strength, tau_max, eps, window, scale)


def _oeb_backward(ctx, grad_out, grad_lse, grad_stats):
    q, k, v, out, lse, stats, kv_start, bounds, sink = ctx.saved_tensors
    rule, strength, tau_max, eps, window, scale = ctx.args
    if grad_out is None:
        return (None,) * 12
    need = ctx.needs_input_grad
    dq = dk = dv = dsink = None
    backward = torch.ops.stepflow.oeb_attention_backward
    if sink is not None and need[9] and q.dtype == torch.float64 and q.shape[-1] < HEAD_DIM_MAX:
        # float64: the sink's gradient as exact as dq. Shifting every logit of a row and the sink by
        # the same c changes nothing, so dL/d sink = -sum_j dS_ij; a zero feature of q against a unit
        # feature of k (the logits unchanged) reads that sum off dq: dq'[..., d] = scale sum_j dS_ij.
        def pad(x, value):
            return torch.cat([x, x.new_full((*x.shape[:-1], 1), value)], dim=-1)

        dq1, dk1, dv1 = backward(pad(grad_out, 0.0), pad(q, 0.0), pad(k, 1.0), pad(v, 0.0), lse, stats, kv_start,
                                 bounds, rule, strength, tau_max, eps, sink, window, scale)
        dsink = (-dq1[..., -1].sum(dim=(0, 2)) / scale).to(sink.dtype)
        dq, dk, dv = dq1[..., :-1], dk1[..., :-1], dv1[..., :-1]
    else:
        if any(need[:3]):
            dq, dk, dv = backward(grad_out.contiguous(), q, k, v, lse, stats, kv_start, bounds, rule, strength,
                                  tau_max, eps, sink, window, scale)
        if sink is not None and need[9]:
            # d out_i / d sink_h = -p_sink,i out_i (the sink only adds to the denominator of A'); p_sink
            # comes from the fp32 stats, which is within the precision of fp32 and lower inputs.
            row = (grad_out.float() * out.float()).sum(-1) * stats[..., 3]
            dsink = (-row.sum(dim=(0, 2))).to(sink.dtype)
    return (dq if need[0] else None, dk if need[1] else None, dv if need[2] else None,
            None, None, None, None, None, None, dsink, None, None)


torch.library.register_autograd("stepflow::oeb_attention", _oeb_backward, setup_context=_oeb_setup_context)


# --------------------------------------------------------------------------- step_momentum
#
# Segments are taken in the order tokens arrive: along the valid (seg id >= 0) tokens of a row
# the segment ids must never decrease (a decode chunk must also not go back before the state's
# current segment). The kernels check it with the other values (seg ids in [-1, S), kinds in
# {0, 1, 2}, the state counters): on the CPU as RuntimeError (ValueError from the wrappers), on
# CUDA as a device-side assert.


def _check_smi_args(h, seg_ids, seg_kinds, beta, gamma):
    """Types, shapes, devices and scalars (no tensor values: those are the kernels' to check)."""
    _check_tensor("h", h, 3)
    b, t, _ = h.shape
    _check_tensor("seg_kinds", seg_kinds, 2, dtypes=(torch.int64, torch.int32))
    if seg_kinds.shape[0] != b:
        raise ValueError(f"seg_kinds has batch {seg_kinds.shape[0]} but h has batch {b}")
    _check_seg_ids("seg_ids", seg_ids, b, t)
    beta = _check_scalar_range("beta", beta, 0.0, 1.0, hi_open=True)
    gamma = float(gamma) if isinstance(gamma, (int, float)) and not isinstance(gamma, bool) else gamma
    if not isinstance(gamma, float) or not gamma >= 0 or gamma == float("inf"):
        raise ValueError(f"gamma must be a finite number >= 0, got {gamma!r}")
    _check_device("step_momentum", "h", h, seg_ids=seg_ids, seg_kinds=seg_kinds)
    return beta, gamma


def step_momentum(h, seg_ids, seg_kinds, beta=0.9, gamma=0.05):
    """Step Momentum Injection (design.md 2.4) over whole sequences: h (B, T, D) -> h'.

    seg_ids (B, T) int64 (-1 on padding, left unchanged); seg_kinds (B, S) int64 codes 0/1/2
    for question/step/summary. Along the valid tokens of a row the seg ids must not decrease.
    Computes in fp32 (fp64 for fp64 h). Differentiable in h (the backward differentiates
    `_step_momentum_torch`, the same function in PyTorch ops; double backward works too).
    """
    beta, gamma = _check_smi_args(h, seg_ids, seg_kinds, beta, gamma)
    return _kernel_errors_as_value_errors("step_momentum", torch.ops.stepflow.step_momentum, h, seg_ids.long(),
                                          seg_kinds.long(), beta, gamma)


@torch.library.register_fake("stepflow::step_momentum")
def _(h, seg_ids, seg_kinds, beta, gamma):
    return h.new_empty(h.shape)  # contiguous, as the kernels return it whatever the strides of h


def _step_momentum_torch(h, seg_ids, seg_kinds, beta, gamma):
    """The step_momentum op's function in differentiable PyTorch ops (its backward runs this).

    Vectorized: segment sums by scatter_add, the momentum recurrence as a loop over the S
    segment slots (O(S * B * D)), per-token gathers; no data-dependent control flow, so it
    traces under fake tensors. Seg ids must be non-decreasing (the op checks), which makes
    segment-id order the arrival order.
    """
    b, t, d = h.shape
    s = seg_kinds.shape[1]
    if s == 0:  # every token is padding
        return h.clone()
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    x = h.to(acc)
    valid = seg_ids >= 0
    rows = torch.arange(b, device=h.device)[:, None]
    slot = (rows * (s + 1) + torch.where(valid, seg_ids, s)).reshape(-1)  # padding sums into spare slot s
    sums = x.new_zeros(b * (s + 1), d).index_add(0, slot, x.reshape(b * t, d)).view(b, s + 1, d)[:, :s]
    counts = x.new_zeros(b * (s + 1)).index_add(0, slot, valid.reshape(-1).to(acc)).view(b, s + 1)[:, :s]
    means = sums / counts.clamp(min=1)[:, :, None]
    folds = (seg_kinds == STEP) & (counts > 0)  # empty steps do not count
    m = x.new_zeros(b, d)
    k = torch.zeros(b, dtype=torch.long, device=h.device)
    m_before, k_before = [], []
    for j in range(s):  # m_before[:, j]: the momentum over the steps completed before segment j
        m_before.append(m)
        k_before.append(k)
        new = torch.where((k == 0)[:, None], means[:, j], beta * m + (1 - beta) * means[:, j])
        m = torch.where(folds[:, j, None], new, m)
        k = k + folds[:, j].long()
    m_seg, k_seg = torch.stack(m_before, 1), torch.stack(k_before, 1)
    norm_seg = torch.linalg.vector_norm(m_seg, dim=-1)
    inject_seg = (seg_kinds != QUESTION) & (k_seg >= 1) & (norm_seg > 0)
    safe_norm = torch.where(inject_seg, norm_seg, torch.ones_like(norm_seg))
    gidx = torch.where(valid, seg_ids, 0)
    m_tok = m_seg.reshape(b * s, d).index_select(0, (rows * s + gidx).reshape(-1)).view(b, t, d)
    inject = inject_seg.gather(1, gidx) & valid
    coef = gamma * torch.linalg.vector_norm(x, dim=-1) / safe_norm.gather(1, gidx)
    coef = torch.where(inject, coef, torch.zeros_like(coef))  # (B, T): no (B, T, D) select
    return (x + coef[:, :, None] * m_tok).to(h.dtype)


def _step_momentum_setup_context(ctx, inputs, output):
    h, seg_ids, seg_kinds, beta, gamma = inputs
    ctx.save_for_backward(h, seg_ids, seg_kinds)
    ctx.beta, ctx.gamma = beta, gamma


def _step_momentum_backward(ctx, grad):
    h, seg_ids, seg_kinds = ctx.saved_tensors
    # Recompute the forward in PyTorch ops and differentiate it: O(T * D) memory and time.
    # Under create_graph (grad mode on here) stay on h's graph, so double backward works.
    create_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        x = h if create_graph and h.requires_grad else h.detach().requires_grad_(True)
        y = _step_momentum_torch(x, seg_ids, seg_kinds, ctx.beta, ctx.gamma)
        (grad_h,) = torch.autograd.grad(y, x, grad, create_graph=create_graph)
    return grad_h, None, None, None, None


torch.library.register_autograd("stepflow::step_momentum", _step_momentum_backward,
                                setup_context=_step_momentum_setup_context)


def new_momentum_state(batch, hidden, device="cpu"):
    """A fresh per-layer SMI state: (momentum (B, D) fp32, step_sum (B, D) fp32, counters (B, 3) int64).

    counters[b] = (current segment id or -1, tokens summed in the current step, completed steps K);
    step_sum is the fp32 sum of the current step's hidden states so far (zero when the current
    segment is not a step); momentum is m_K (meaningless while K == 0).
    """
    counters = torch.zeros(batch, 3, dtype=torch.long, device=device)
    counters[:, 0] = -1  # no current segment yet
    return (torch.zeros(batch, hidden, dtype=torch.float32, device=device),
            torch.zeros(batch, hidden, dtype=torch.float32, device=device), counters)


def step_momentum_decode_(h, seg_ids, seg_kinds, state, beta=0.9, gamma=0.05):
    """SMI for a chunk of new tokens (any length: one token of generation, a whole prompt),
    continuing `state` (new_momentum_state) in place; returns the new h (B, T, D).

    seg_ids (B, T) are the chunk's segment ids (-1 padding: skipped, state untouched), seg_kinds
    (B, S) the kinds of every segment so far. When a token of a new segment arrives, the current
    segment, if it is a step, is folded into the momentum first. Feeding a sequence in chunks
    gives the result of step_momentum on the whole of it (bit for bit for fp32/fp16/bf16; fp64 h
    rounds through the fp32 state between chunks). Not differentiable: call it without grad
    (generation); teacher-forced passes that need gradients use step_momentum.
    """
    # Per-token calls are hot: the kernel validates the contents of seg_ids, seg_kinds and the
    # counters before it writes anything (on the CPU its errors come back as ValueError here; on
    # CUDA a bad value is a device-side assert, and the state is left as it was).
    beta, gamma = _check_smi_args(h, seg_ids, seg_kinds, beta, gamma)
    if not isinstance(state, (tuple, list)) or len(state) != 3:
        raise ValueError("state must be the (momentum, step_sum, counters) tuple of new_momentum_state")
    momentum, step_sum, counters = state
    b, _, d = h.shape
    for name, x, shape, dtype in (("momentum", momentum, (b, d), torch.float32),
                                  ("step_sum", step_sum, (b, d), torch.float32),
                                  ("counters", counters, (b, 3), torch.int64)):
        if not isinstance(x, torch.Tensor) or tuple(x.shape) != shape or x.dtype != dtype:
            got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"state {name} must be a {dtype} tensor of shape {shape}, got {got}")
        _check_device("step_momentum_decode_", "h", h, **{name: x})

    def call(x):
        return _kernel_errors_as_value_errors("step_momentum", torch.ops.stepflow.step_momentum_decode_, x,
                                              seg_ids.long(), seg_kinds.long(), momentum, step_sum, counters, beta,
                                              gamma)

    if torch.is_grad_enabled() and h.requires_grad:
        return _DecodeNotDifferentiable.apply(h, call)  # a forward works; a backward raises
    return call(h)


class _DecodeNotDifferentiable(torch.autograd.Function):
    """Runs the decode op on a graph-carrying h; backpropagating through it raises instead of
    silently giving zero gradients (torch's fallback for ops without an autograd kernel)."""

    @staticmethod
    def forward(ctx, h, call):
        return call(h)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("step_momentum_decode_ is not differentiable; use step_momentum (the prefill op) "
                           "on the whole sequence to get gradients")


@torch.library.register_fake("stepflow::step_momentum_decode_")
def _(h, seg_ids, seg_kinds, momentum, step_sum, counters, beta, gamma):
    return h.new_empty(h.shape)  # contiguous, as the kernels return it


# --------------------------------------------------------------------------- smi_value
#
# SMI rule `value` (design.md 2.4) is a gather-mean-add on a few rows of the attention output, so it
# is plain PyTorch (differentiable, any device): for the rows it targets, each head h gets
# alpha * mean_{j in W} v[g(h), j], W the window [start, end) of at most `window` keys.


def smi_value(attn_out, value, windows, alpha, max_width):
    """attn_out (B, Tq, H, d) (each head's output before o_proj, as HF attention functions return it);
    value (B, H_kv, Tk, d) (the layer's values, the KV cache included); windows (B, Tq, 2) int64 key
    ranges [start, end) per query, at most max_width keys wide, (-1, -1) where nothing is added.
    Returns the new attn_out.

    Accumulates in fp32 (fp64 for fp64 values). Rows without a window are untouched bit for bit."""
    _check_tensor("attn_out", attn_out, 4)
    _check_tensor("value", value, 4)
    b, tq, h, d = attn_out.shape
    if value.shape[0] != b or value.shape[3] != d or value.shape[1] == 0 or h % value.shape[1]:
        raise ValueError(f"value {tuple(value.shape)} does not fit attn_out {tuple(attn_out.shape)}: "
                         "expected (B, H_kv, Tk, d) with H a multiple of H_kv")
    _check_tensor("windows", windows, 3, dtypes=(torch.int64, torch.int32))
    if tuple(windows.shape) != (b, tq, 2):
        raise ValueError(f"windows must have shape ({b}, {tq}, 2), got {tuple(windows.shape)}")
    alpha = float(alpha)
    if isinstance(max_width, bool) or not isinstance(max_width, int) or max_width < 1:
        raise ValueError(f"max_width must be a positive int, got {max_width!r}")
    on = windows[..., 0] >= 0
    # The windows' values, checked without reading them on the host: torch._assert_async raises at
    # once on the CPU and is a device-side assert on CUDA (no sync; capturable in a CUDA graph).
    span = windows[..., 1] - windows[..., 0]
    ok = ~on | ((span >= 1) & (span <= max_width) & (windows[..., 1] <= value.shape[2]))
    message = (f"smi_value: windows must be (-1, -1) or 1 to {max_width} keys [start, end) inside the "
               f"{value.shape[2]} keys of value")
    _kernel_errors_as_value_errors("smi_value", torch._assert_async, ok.all(), message)
    if tq > 16:
        # Prefill: only a few rows (one per step) get a window; gather those alone.
        rows, cols = on.nonzero(as_tuple=True)
        if rows.numel() == 0:
            return attn_out
        starts, ends = windows[rows, cols, 0], windows[rows, cols, 1]
        idx = starts[:, None] + torch.arange(max_width, device=value.device)[None]
        ok = idx < ends[:, None]                                               # (N, w)
        vals = value[rows[:, None], :, idx.clamp(max=value.shape[2] - 1)]      # (N, w, H_kv, d)
        acc = torch.float64 if value.dtype == torch.float64 else torch.float32
        mean = (vals.to(acc) * ok[..., None, None]).sum(1) / ok.sum(1).clamp(min=1)[:, None, None]
        add = (alpha * mean).repeat_interleave(h // value.shape[1], dim=1)     # (N, H, d)
        out = attn_out.clone()
        out[rows, cols] = (attn_out[rows, cols].to(acc) + add).to(attn_out.dtype)
        return out
    # Decode (a few rows): dense, no host synchronization.
    max_w = max_width
    starts, ends = windows[..., 0].clamp(min=0), windows[..., 1].clamp(min=0)
    idx = starts[..., None] + torch.arange(max_w, device=value.device)                  # (B, Tq, w)
    ok = (idx < ends[..., None]) & on[..., None]
    flat = idx.clamp(max=value.shape[2] - 1).reshape(b, 1, tq * max_w, 1).expand(-1, value.shape[1], -1, d)
    vals = value.gather(2, flat).view(b, value.shape[1], tq, max_w, d)                  # (B, H_kv, Tq, w, d)
    acc = torch.float64 if value.dtype == torch.float64 else torch.float32
    mean = (vals.to(acc) * ok[:, None, :, :, None]).sum(3) / ok.sum(-1).clamp(min=1)[:, None, :, None]
    add = (alpha * mean).repeat_interleave(h // value.shape[1], dim=1).transpose(1, 2)  # (B, Tq, H, d)
    return torch.where(on[..., None, None], (attn_out.to(acc) + add).to(attn_out.dtype), attn_out)
