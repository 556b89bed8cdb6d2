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


def _masked_softmax(scores: torch.Tensor, allowed: torch.Tensor, sink=None) -> torch.Tensor:
    """Softmax over the last dim restricted to `allowed`; rows with no allowed key give 0.

    sink: optional per-head logits (H,) (scores are (B, H, Tq, Tk)): one more term e^{sink_h} in
    every row's denominator (GPT-OSS attention sinks); the sink's own column is not returned.
    """
    scores = scores.masked_fill(~allowed, float("-inf"))
    if sink is not None:
        col = sink.to(scores.dtype).view(1, -1, 1, 1).expand(*scores.shape[:3], 1)
        probs = torch.softmax(torch.cat([scores, col], dim=-1), dim=-1)[..., :-1]
        return probs * allowed  # a row with no allowed key puts everything on the sink
    probs = torch.softmax(scores, dim=-1)
    return torch.nan_to_num(probs, nan=0.0)


def causal_valid_mask(valid_keys: torch.Tensor, tq: int, window=None) -> torch.Tensor:
    """(B, Tq, Tk) bool: key j is allowed for query i (at key position p = Tk - Tq + i) when
    j <= p, j is valid and, with a sliding window w, j > p - w."""
    b, tk = valid_keys.shape
    qpos = torch.arange(tk - tq, tk, device=valid_keys.device)
    kpos = torch.arange(tk, device=valid_keys.device)
    causal = kpos[None, :] <= qpos[:, None]
    if window is not None and window > 0:
        causal = causal & (kpos[None, :] > qpos[:, None] - window)
    return causal[None] & valid_keys[:, None, :]


def attention_probs(q, k, scale, allowed, sink=None):
    """A[b, h, i, j] = softmax_j(scale * q_i . k_j) over the allowed keys (and the sink, if any)."""
    k = _expand_kv(k, q.shape[1])
    scores = scale * torch.einsum("bhid,bhjd->bhij", q, k)
    return _masked_softmax(scores, allowed[:, None], sink)


# --------------------------------------------------------------------------- 2.2 saliency

HEAD_REDUCTIONS = ("sum_abs", "abs_sum", "abs_mean")


def token_saliency(q, k, v, grad_out, seg_ids, scale, head_reduction="sum_abs", *, sink=None, window=None,
                   oeb_bounds=None, oeb_rule="bridge", oeb_strength=0.0, oeb_tau_max=0.15, oeb_eps=1e-6):
    """I[b, i, j] of design.md 2.2 for one layer, materialized (B, T, T).

    dL/dA[h, i, j] = dO[h, i] . v[g(h), j], so A * dL/dA needs no autograd through softmax.
    Rows and columns of padding tokens (seg id -1) are zero. sink / window: the layer's attention
    sink logits (H,) and sliding window, as in the model's attention.

    With oeb_bounds (B, T, 2) (a layer where OEB is active, design.md 2.3) the layer's output is
    o_i = sum_j A'_ij v_j, so A' takes A's place: I_ij = |sum_h A'[h, i, j] dO[h, i] . v[g(h), j]|.
    The OEB kv_start of a row is its first valid token.
    """
    valid = seg_ids >= 0
    t = q.shape[2]
    allowed = causal_valid_mask(valid, t, window)
    if oeb_bounds is not None:
        kv_start = torch.where(valid.any(dim=1), valid.to(torch.int8).argmax(dim=1), t)
        a = oeb_probs(q, k, kv_start, oeb_bounds, oeb_rule, oeb_strength, oeb_tau_max, oeb_eps, sink, window,
                      scale)[0]
    else:
        a = attention_probs(q, k, scale, allowed, sink)
    grad_a = torch.einsum("bhid,bhjd->bhij", grad_out, _expand_kv(v, q.shape[1]))
    per_head = a * grad_a
    if head_reduction == "sum_abs":
        sal = per_head.sum(dim=1).abs()
    elif head_reduction == "abs_sum":
        sal = per_head.abs().sum(dim=1)
    elif head_reduction == "abs_mean":
        sal = per_head.abs().mean(dim=1)
    else:
        raise ValueError(f"head_reduction must be one of {HEAD_REDUCTIONS}, got {head_reduction!r}")
    return sal * (allowed & valid[:, :, None])


def pool_to_segments(token_map, seg_ids, num_segments):
    """M[b, a, c] = sum over i in segment a, j in segment c of token_map[b, i, j]."""
    b, t, _ = token_map.shape
    onehot = torch.zeros(b, t, num_segments, dtype=token_map.dtype, device=token_map.device)
    valid = seg_ids >= 0
    onehot[valid.nonzero(as_tuple=True) + (seg_ids[valid],)] = 1
    return torch.einsum("bia,bij,bjc->bac", onehot, token_map, onehot)


def step_saliency_pool(q, k, v, grad_out, seg_ids, num_segments, scale, head_reduction="sum_abs", *, sink=None,
                       window=None, oeb_bounds=None, oeb_rule="bridge", oeb_strength=0.0, oeb_tau_max=0.15,
                       oeb_eps=1e-6):
    """The raw step map M^l of design.md 2.2 for one layer: (B, S, S); other args as token_saliency."""
    sal = token_saliency(q, k, v, grad_out, seg_ids, scale, head_reduction, sink=sink, window=window,
                         oeb_bounds=oeb_bounds, oeb_rule=oeb_rule, oeb_strength=oeb_strength,
                         oeb_tau_max=oeb_tau_max, oeb_eps=oeb_eps)
    return pool_to_segments(sal, seg_ids, num_segments)


def causal_pair_counts(seg_ids, num_segments):
    """N[b, a, c]: the number of causal pairs (i, j), j <= i, with seg(i) = a, seg(j) = c."""
    t = seg_ids.shape[1]
    valid = (seg_ids >= 0).to(torch.float64)
    ones = valid[:, :, None] * valid[:, None, :] * torch.tril(torch.ones(t, t, dtype=torch.float64,
                                                                         device=seg_ids.device))
    return pool_to_segments(ones, seg_ids, num_segments)


def block_counts(seg_ids, num_segments):
    """|a| * |c| for every pair of segments: the denominator of the paper's block view."""
    sizes = torch.stack([(seg_ids == s).sum(dim=1) for s in range(num_segments)], dim=1).to(torch.float64)
    return sizes[:, :, None] * sizes[:, None, :]


# --------------------------------------------------------------------------- 2.3 OEB

OEB_EPS = 1e-6  # the epsilon of the paper's logit shifts (part of the method, design.md 2.3)


def channel_of_tokens(seg_ids, seg_kinds):
    """(B, T) channel of each token: -1 padding, 0 question, 1 thinking (a step), 2 summary."""
    kinds = seg_kinds.gather(1, seg_ids.clamp(min=0))
    return torch.where(seg_ids >= 0, kinds, torch.full_like(seg_ids, -1))


def bridge_groups(channel, tq, window=None):
    """Design.md 2.3 word for word: for each query (B, Tq) and key (Tk), the boolean groups
    (allowed, S, B, O) of the bridge rule from the channel of every key position (B, Tk) (-1
    padding, 0 question, 1 thinking, 2 summary; query i is key position Tk - Tq + i).
    S: keys of the query's own channel; B: the question for a thinking query, the thinking for a
    summary query; O: the rest. Question and padding queries have empty groups (no change)."""
    tk = channel.shape[1]
    allowed = causal_valid_mask(channel >= 0, tq, window)
    qch = channel[:, tk - tq:, None]        # (B, Tq, 1)
    kch = channel[:, None, :]               # (B, 1, Tk)
    intervened = (qch == 1) | (qch == 2)
    same = allowed & intervened & (kch == qch)
    bridge_channel = torch.where(qch == 1, torch.zeros_like(qch), torch.ones_like(qch))
    bridge = allowed & intervened & (kch == bridge_channel)
    other = allowed & intervened & ~same & ~bridge
    return allowed, same, bridge, other


def bridge_shifts(a, same, bridge, other, tau_max=0.15, eps=OEB_EPS):
    """The logit shifts of the bridge rule (design.md 2.3), literally, per (B, H, Tq) row.

    a: A (B, H, Tq, Tk), the softmax over the valid real keys (no sink); same, bridge, other:
    (B, Tq, Tk) groups. Returns (lam_B, lam_S, active), each (B, H, Tq); lam are 0 where not active.
    """
    s, b, o = (m[:, None].to(a.dtype) for m in (same, bridge, other))
    p_s, p_b, p_o = (a * s).sum(-1), (a * b).sum(-1), (a * o).sum(-1)
    n_b, n_s = b.sum(-1), s.sum(-1)
    tau = torch.clamp(torch.sqrt(n_b / (n_b + n_s + eps)), max=tau_max)
    available = 1.0 - p_o
    active = (n_b > 0) & (n_s > 0) & (p_b < tau) & (available > eps) & (p_s > eps)
    tau = torch.clamp(torch.minimum(tau, available - eps), min=eps)
    tau_s = available - tau
    # Rows that are not active take tau = p (lam = 0) inside the logs, not only outside them: an
    # unused branch such as log(tau_S + eps) = log 0 (a row whose O holds all the mass, p_O = 1)
    # would otherwise make torch.where's backward 0 * inf = nan.
    tau, tau_s = torch.where(active, tau, p_b), torch.where(active, tau_s, p_s)
    lam_b = torch.where(active, torch.log((tau + eps) / (p_b + eps)), torch.zeros_like(tau))
    lam_s = torch.where(active, torch.log((tau_s + eps) / (p_s + eps)), torch.zeros_like(tau))
    return lam_b, lam_s, active


def oeb_bridge_attention(q, k, v, channel, tau_max=0.15, eps=OEB_EPS, sink=None, window=None, scale=None):
    """OEB with the bridge rule written from design.md 2.3 without key-range bookkeeping: groups
    from channels (bridge_groups), z' = z + lam_B [j in B] + lam_S [j in S], A' = the model's
    softmax of z' (with its sink). Returns (out (B, H, Tq, d), A' (B, H, Tq, Tk), active (B, H, Tq))."""
    tq, h = q.shape[2], q.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    allowed, same, bridge, other = bridge_groups(channel, tq, window)
    z = scale * torch.einsum("bhid,bhjd->bhij", q, _expand_kv(k, h))
    a = _masked_softmax(z, allowed[:, None])  # p_g are read off the real keys only
    lam_b, lam_s, active = bridge_shifts(a, same, bridge, other, tau_max, eps)
    z2 = z + lam_b[..., None] * bridge[:, None] + lam_s[..., None] * same[:, None]
    a2 = _masked_softmax(z2, allowed[:, None], sink)
    return torch.einsum("bhij,bhjd->bhid", a2, _expand_kv(v, h)), a2, active


def oeb_groups(kv_start, bounds, tq, tk, window=None):
    """Boolean key groups (B, Tq, Tk) from the op's inputs: (allowed, g0, g1, g2).

    Query i sits at key position p = Tk - Tq + i; its valid keys are [lo, p] with lo = kv_start
    (and > p - window with a sliding window). bounds[b, i] = (a, c): g0 = [lo, a), g1 = [a, c),
    g2 = [c, p] (clipped to the valid keys); (-1, -1) = not intervened: every key in g0.
    """
    device = bounds.device
    kpos = torch.arange(tk, device=device)[None, None, :]
    qpos = torch.arange(tk - tq, tk, device=device)[None, :, None]
    allowed = (kpos <= qpos) & (kpos >= kv_start[:, None, None])
    if window is not None and window > 0:
        allowed = allowed & (kpos > qpos - window)
    a, c = bounds[..., 0:1], bounds[..., 1:2]
    intervened = a >= 0
    g1 = allowed & intervened & (kpos >= a) & (kpos < c)
    g2 = allowed & intervened & (kpos >= torch.maximum(a, c))
    g0 = allowed & ~g1 & ~g2
    return allowed, g0, g1, g2


def odds_rebalance(a, current, context, strength):
    """A' of the `odds` rule from A (B, H, Tq, Tk) and the group masks C, X (B, Tq, Tk): where
    p_X > 0 and p_C > p_X, the odds o = p_C / p_X become o^(1 - strength) with p_C + p_X kept.
    Returns (A', locked (B, H, Tq))."""
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
    return a * scale_map, locked.squeeze(-1)


def oeb_probs(q, k, kv_start, bounds, rule="bridge", strength=0.5, tau_max=0.15, eps=OEB_EPS, sink=None,
              window=None, scale=None):
    """A' (B, H, Tq, Tk) of the oeb_attention op, materialized, and (A, lse, stats) of the op.

    The rule acts on A, the softmax over the valid real keys; then z' = z + log r_g goes through
    the model's softmax with its sink (design.md 2.3). bridge: g0 = O, g1 = B, g2 = S; odds:
    g0 = the sinks, g1 = X, g2 = C.
    """
    tq, tk, h = q.shape[2], k.shape[2], q.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    allowed, g0, g1, g2 = oeb_groups(kv_start, bounds, tq, tk, window)
    z = scale * torch.einsum("bhid,bhjd->bhij", q, _expand_kv(k, h))
    lse = torch.logsumexp(z.masked_fill(~allowed[:, None], float("-inf")), dim=-1)
    a = _masked_softmax(z, allowed[:, None])
    if rule == "bridge":
        lam_b, lam_s, active = bridge_shifts(a, g2, g1, g0, tau_max, eps)
        shift = lam_b[..., None] * g1[:, None] + lam_s[..., None] * g2[:, None]
        a2 = _masked_softmax(z + shift, allowed[:, None], sink)
    elif rule == "odds":
        # odds keeps sum_j A'_j = 1, so z + log r_g through the softmax with a sink is A' / (1 + sigma)
        a2, active = odds_rebalance(a, g2, g1, strength)
        if sink is not None:
            # rows without a key (lse = -inf) have no sink weight; exp is taken at a finite
            # stand-in there so that its unused gradient is not inf * 0 = nan
            has_key = torch.isfinite(lse)
            sigma = torch.exp(sink.to(a.dtype).view(1, -1, 1) - torch.where(has_key, lse, torch.zeros_like(lse)))
            a2 = a2 / (1 + torch.where(has_key, sigma, torch.zeros_like(sigma)))[..., None]
    else:
        raise ValueError(f"rule must be 'bridge' or 'odds', got {rule!r}")
    masses = [(a * g[:, None].to(a.dtype)).sum(-1) for g in (g0, g1, g2)]
    if sink is not None:
        p_sink = torch.where(allowed[:, None].any(-1), 1 - a2.sum(-1), torch.zeros_like(masses[0]))
    else:
        p_sink = torch.zeros_like(masses[0])
    stats = torch.stack(masses + [p_sink, active.to(a.dtype)], dim=-1)
    return a2, a, lse, stats


def oeb_attention(q, k, v, kv_start, bounds, rule="bridge", strength=0.5, tau_max=0.15, eps=OEB_EPS, sink=None,
                  window=None, scale=None):
    """OEB attention, materialized: the oracle of the oeb_attention op (forward and, by autograd,
    backward). Returns (out (B, H, Tq, d), lse (B, H, Tq), stats (B, H, Tq, 5)).

    lse: log-sum-exp of the scaled scores over the valid real keys before the rule (-inf on rows
    with no key). stats: (p_0, p_1, p_2) the group masses under that softmax, p_sink the sink's
    weight in A' (0 without sink), active (1.0 where the rule changed the row).
    """
    a2, _, lse, stats = oeb_probs(q, k, kv_start, bounds, rule, strength, tau_max, eps, sink, window, scale)
    out = torch.einsum("bhij,bhjd->bhid", a2, _expand_kv(v, q.shape[1]))
    return out, lse, stats


def seg_start_from_seg_ids(seg_ids, seg_kinds):
    """Per token, the position where its segment starts; -1 for question tokens and padding."""
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


def oeb_bounds(seg_ids, seg_kinds, rule="bridge", num_sink=1):
    """bounds (B, T, 2) of oeb_attention for a prefill (Tq = Tk = T), by a loop over tokens.

    bridge: a thinking query gets (first valid key, start of the thinking): O = [], B = the
    question, S = the thinking up to it; a summary query (start of the thinking, start of the
    summary): O = the question, B = the thinking, S = the summary up to it.
    odds: a non-question query gets (first valid key + num_sink, start of its segment): the sinks,
    X = the context before its segment, C = its segment up to it.
    Question and padding queries: (-1, -1).
    """
    b, t = seg_ids.shape
    out = torch.full((b, t, 2), -1, dtype=torch.long, device=seg_ids.device)
    channel = channel_of_tokens(seg_ids, seg_kinds)
    starts = seg_start_from_seg_ids(seg_ids, seg_kinds)
    for row in range(b):
        ch = channel[row].tolist()
        valid = [i for i in range(t) if ch[i] >= 0]
        if not valid:
            continue
        kv = valid[0]
        think = next((i for i in valid if ch[i] >= 1), t)     # first token after the question
        summ = next((i for i in valid if ch[i] == 2), t)
        for i in valid:
            if ch[i] <= 0:
                continue
            if rule == "bridge":
                out[row, i] = torch.tensor([kv, think] if ch[i] == 1 else [think, summ])
            else:
                a = min(kv + num_sink, i + 1)
                out[row, i] = torch.tensor([a, max(a, int(starts[row, i]))])
    return out


# --------------------------------------------------------------------------- 2.4 SMI


def smi_windows(seg_ids, seg_kinds, closed, window=4):
    """(B, T, 2) int64: for each token, the key range [start, end) of the values SMI's `value` rule
    adds to it (design.md 2.4), (-1, -1) for tokens that get nothing. By a loop over segments.

    A token gets W when it starts a thinking step k >= 2 (the second or later segment of kind step)
    and is not a one-token step that closed at that token (closed (B, S) bool: the segment was
    closed by its own last token: a sentence end, a delimiter or the end-of-thinking marker); W is
    the last min(window, |step k-1|) tokens of step k-1 (nothing when that step is empty).
    """
    b, t = seg_ids.shape
    out = torch.full((b, t, 2), -1, dtype=torch.long, device=seg_ids.device)
    for row in range(b):
        ids = seg_ids[row].tolist()
        steps = [s for s in range(seg_kinds.shape[1]) if int(seg_kinds[row, s]) == STEP]
        positions = {s: [i for i in range(t) if ids[i] == s] for s in steps}
        for prev, cur in zip(steps, steps[1:]):
            here, before = positions[cur], positions[prev]
            if not here or not before:
                continue
            if len(here) == 1 and bool(closed[row, cur]):
                continue
            w = before[-min(window, len(before)):]
            out[row, here[0]] = torch.tensor([w[0], w[-1] + 1])
    return out


def smi_value(attn_out, v, windows, alpha):
    """SMI rule `value` (design.md 2.4) on one layer's attention output.

    attn_out: (B, H, Tq, d), each head's output before the output projection; v: (B, H_kv, Tk, d)
    the layer's values; windows: (B, Tq, 2) key ranges [start, end) per query ((-1, -1): none),
    query i at key position Tk - Tq + i. Returns attn_out + alpha * mean_{j in W} v[g(h), j].
    """
    out = attn_out.clone()
    h = attn_out.shape[1]
    vv = _expand_kv(v, h)
    for row in range(attn_out.shape[0]):
        for i in range(attn_out.shape[2]):
            start, end = (int(x) for x in windows[row, i])
            if start < 0 or end <= start:
                continue
            out[row, :, i] = attn_out[row, :, i] + alpha * vv[row, :, start:end].mean(dim=1)
    return out


def step_momentum_residual(h, seg_ids, seg_kinds, beta, gamma):
    """Alias of step_momentum: SMI rule `residual`."""
    return step_momentum(h, seg_ids, seg_kinds, beta, gamma)




def step_momentum(h, seg_ids, seg_kinds, beta, gamma):
    """SMI rule `residual` (design.md 2.4, this project's earlier SMI) on the hidden states h (B, T, D) leaving one layer.

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
