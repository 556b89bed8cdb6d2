"""Reference implementations of design.md section 2, written to be read next to the equations.

Everything here materializes the full attention matrix A (B, H, Tq, Tk) on purpose: it is
slow and memory-hungry, and it is the truth every kernel and model-level path is tested
against. Pass float64 tensors to get a high-precision oracle; the functions compute in the
dtype they are given.

Conventions shared with the ops (see stepflow_ext/ops.py):
- q, grad_out: (B, H, Tq, d); k, v: (B, H_kv, Tk, d); head h reads kv head h // (H // H_kv).
- Query i sits at key position Tk - Tq + i (bottom-right alignment; Tq == Tk for prefill).
- Segment kinds are coded QUESTION=0, STEP=1, SUMMARY=2; padding tokens have seg id -1.
"""
from __future__ import annotations

import torch

QUESTION, STEP, SUMMARY = 0, 1, 2


def _expand_kv(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, H_kv, T, d) -> (B, H, T, d): the kv head g(h) = h // (H / H_kv) for every head h."""
    return x.repeat_interleave(num_heads // x.shape[1], dim=1)


def _masked_softmax(scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim restricted to `allowed`; rows with no allowed key give 0."""
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.nan_to_num(probs, nan=0.0)


def causal_valid_mask(valid_keys: torch.Tensor, tq: int) -> torch.Tensor:
    """(B, Tq, Tk) bool: key j is allowed for query i when j <= Tk - Tq + i and j is valid."""
    b, tk = valid_keys.shape
    qpos = torch.arange(tk - tq, tk, device=valid_keys.device)
    kpos = torch.arange(tk, device=valid_keys.device)
    causal = kpos[None, :] <= qpos[:, None]
    return causal[None] & valid_keys[:, None, :]


def attention_probs(q, k, scale, allowed):
    """A[b, h, i, j] = softmax_j(scale * q_i . k_j) over the allowed keys."""
    k = _expand_kv(k, q.shape[1])
    scores = scale * torch.einsum("bhid,bhjd->bhij", q, k)
    return _masked_softmax(scores, allowed[:, None])


# --------------------------------------------------------------------------- 2.2 saliency


def token_saliency(q, k, v, grad_out, seg_ids, scale, head_reduction="sum_abs", *,
                   oeb_seg_start=None, oeb_strength=0.0, oeb_num_sink=1):
    """I[b, i, j] of design.md 2.2 for one layer, materialized (B, T, T).

    dL/dA[h, i, j] = dO[h, i] . v[g(h), j], so A * dL/dA needs no autograd through softmax.
    Rows and columns of padding tokens (seg id -1) are zero.

    With oeb_seg_start (B, T) (a layer where OEB is active, design.md 2.3), the layer's output is
    o_i = sum_j A'_ij v_j, so A' takes A's place: I_ij = |sum_h A'[h, i, j] dO[h, i] . v[g(h), j]|.
    The OEB kv_start of a row is its first valid token.
    """
    valid = seg_ids >= 0
    allowed = causal_valid_mask(valid, q.shape[2])
    a = attention_probs(q, k, scale, allowed)
    if oeb_seg_start is not None:
        t = q.shape[2]
        kv_start = torch.where(valid.any(dim=1), valid.to(torch.int8).argmax(dim=1), t)
        _, _, current, context = oeb_groups(oeb_seg_start, kv_start, t, t, oeb_num_sink)
        a, _, _ = oeb_rebalance(a, current, context, oeb_strength)
    grad_a = torch.einsum("bhid,bhjd->bhij", grad_out, _expand_kv(v, q.shape[1]))
    per_head = a * grad_a
    if head_reduction == "sum_abs":
        sal = per_head.sum(dim=1).abs()
    elif head_reduction == "abs_sum":
        sal = per_head.abs().sum(dim=1)
    else:
        raise ValueError(f"head_reduction must be 'sum_abs' or 'abs_sum', got {head_reduction!r}")
    return sal * (allowed & valid[:, :, None])


def pool_to_segments(token_map, seg_ids, num_segments):
    """M[b, a, c] = sum over i in segment a, j in segment c of token_map[b, i, j]."""
    b, t, _ = token_map.shape
    onehot = torch.zeros(b, t, num_segments, dtype=token_map.dtype, device=token_map.device)
    valid = seg_ids >= 0
    onehot[valid.nonzero(as_tuple=True) + (seg_ids[valid],)] = 1
    return torch.einsum("bia,bij,bjc->bac", onehot, token_map, onehot)


def step_saliency_pool(q, k, v, grad_out, seg_ids, num_segments, scale, head_reduction="sum_abs", *,
                       oeb_seg_start=None, oeb_strength=0.0, oeb_num_sink=1):
    """The raw step map M^l of design.md 2.2 for one layer: (B, S, S); OEB args as token_saliency."""
    sal = token_saliency(q, k, v, grad_out, seg_ids, scale, head_reduction, oeb_seg_start=oeb_seg_start,
                         oeb_strength=oeb_strength, oeb_num_sink=oeb_num_sink)
    return pool_to_segments(sal, seg_ids, num_segments)


def causal_pair_counts(seg_ids, num_segments):
    """N[b, a, c]: the number of causal pairs (i, j), j <= i, with seg(i) = a, seg(j) = c."""
    t = seg_ids.shape[1]
    valid = (seg_ids >= 0).to(torch.float64)
    ones = valid[:, :, None] * valid[:, None, :] * torch.tril(torch.ones(t, t, dtype=torch.float64,
                                                                         device=seg_ids.device))
    return pool_to_segments(ones, seg_ids, num_segments)


# --------------------------------------------------------------------------- 2.3 OEB


def oeb_groups(seg_start, kv_start, tq, tk, num_sink):
    """Boolean key groups (B, Tq, Tk) of design.md 2.3: sinks, C (current step), X (context).

    seg_start[b, i] is the key position where query i's segment starts, or -1 when the query
    is not rebalanced (question tokens, padding). kv_start[b] is the first valid key.
    """
    device = seg_start.device
    kpos = torch.arange(tk, device=device)[None, None, :]
    qpos = torch.arange(tk - tq, tk, device=device)[None, :, None]
    first = kv_start[:, None, None]
    allowed = (kpos <= qpos) & (kpos >= first)
    sink = allowed & (kpos < first + num_sink)
    start = seg_start[:, :, None]
    rebalanced = start >= 0
    current = allowed & ~sink & (kpos >= start) & rebalanced
    context = allowed & ~sink & (kpos < start) & rebalanced
    return allowed, sink, current, context


def oeb_rebalance(a, current, context, strength):
    """A' of design.md 2.3 from A (B, H, Tq, Tk) and the group masks (B, Tq, Tk)."""
    cur = current[:, None].to(a.dtype)
    ctx = context[:, None].to(a.dtype)
    p_c = (a * cur).sum(-1, keepdim=True)
    p_x = (a * ctx).sum(-1, keepdim=True)
    locked = (p_x > 0) & (p_c > p_x)
    safe_px = torch.where(locked, p_x, torch.ones_like(p_x))
    safe_pc = torch.where(locked, p_c, torch.ones_like(p_c))
    odds = safe_pc / safe_px
    new_odds = odds ** (1.0 - strength)
    mass = p_c + p_x
    new_pc = mass * new_odds / (1 + new_odds)
    new_px = mass / (1 + new_odds)
    r_c = torch.where(locked, new_pc / safe_pc, torch.ones_like(p_c))
    r_x = torch.where(locked, new_px / safe_px, torch.ones_like(p_x))
    scale_map = 1 + cur * (r_c - 1) + ctx * (r_x - 1)
    return a * scale_map, p_c.squeeze(-1), p_x.squeeze(-1)


def oeb_attention(q, k, v, seg_start, kv_start, strength, num_sink, scale):
    """OEB attention, materialized. Returns (out (B,H,Tq,d), lse (B,H,Tq), stats (B,H,Tq,2)).

    lse is the log-sum-exp of the scaled scores over the allowed keys before rebalancing
    (-inf on rows with no allowed key); stats holds (p_C, p_X), the pre-rebalance masses.
    Differentiable with autograd: this is the oracle for the op's backward too.
    """
    tq, tk = q.shape[2], k.shape[2]
    allowed, _, current, context = oeb_groups(seg_start, kv_start, tq, tk, num_sink)
    kk = _expand_kv(k, q.shape[1])
    scores = scale * torch.einsum("bhid,bhjd->bhij", q, kk)
    lse = torch.logsumexp(scores.masked_fill(~allowed[:, None], float("-inf")), dim=-1)
    a = _masked_softmax(scores, allowed[:, None])
    a_new, p_c, p_x = oeb_rebalance(a, current, context, strength)
    out = torch.einsum("bhij,bhjd->bhid", a_new, _expand_kv(v, q.shape[1]))
    return out, lse, torch.stack([p_c, p_x], dim=-1)


def seg_start_from_seg_ids(seg_ids, seg_kinds):
    """Per token, the position where its segment starts; -1 for question tokens and padding.

    This is the seg_start input of oeb_attention for a prefill (Tq == Tk).
    """
    b, t = seg_ids.shape
    out = torch.full((b, t), -1, dtype=torch.long, device=seg_ids.device)
    for row in range(b):
        first = {}
        for i in range(t):
            s = int(seg_ids[row, i])
            if s < 0:
                continue
            first.setdefault(s, i)
            if int(seg_kinds[row, s]) != QUESTION:
                out[row, i] = first[s]
    return out


# --------------------------------------------------------------------------- 2.4 SMI


def step_momentum(h, seg_ids, seg_kinds, beta, gamma):
    """SMI of design.md 2.4 on the hidden states h (B, T, D) leaving one layer.

    Steps are taken in order of segment id. A token of a step or of the summary, with K >= 1
    completed steps before its segment, gets h + gamma * |h| / |m_K| * m_K, where m is the
    momentum over those steps' mean hidden states (taken before injection). When |m_K| = 0
    nothing is added.
    """
    out = h.clone()
    b, t, _ = h.shape
    for row in range(b):
        momentum, completed = None, 0
        segs = sorted({int(s) for s in seg_ids[row].tolist() if s >= 0})
        for s in segs:
            idx = (seg_ids[row] == s).nonzero(as_tuple=True)[0]
            kind = int(seg_kinds[row, s])
            if kind != QUESTION and completed >= 1:
                x = h[row, idx]
                m_norm = momentum.norm()
                if m_norm > 0:
                    out[row, idx] = x + gamma * (x.norm(dim=-1, keepdim=True) / m_norm) * momentum
            if kind == STEP:
                mean = h[row, idx].mean(dim=0)
                momentum = mean if completed == 0 else beta * momentum + (1 - beta) * mean
                completed += 1
    return out
