"""The two controls of StepFlow's evaluation (docs/method.md, "Controls").

random-attn: in the OEB layers, the per-row change that OEB would apply, applied instead to random
key sets of the sizes of OEB's groups. Bridge rule (the paper's): OEB's logit shifts lambda_B and
lambda_S go to a random set of |B| keys and the other |S| keys of B u S. Odds rule: OEB's change of
log-odds between a random set of |C| keys and the other |X| keys of C u X.
random-residual: in the SMI layers, on the tokens SMI would change, a random direction of the size
of SMI's change. Value rule (the paper's): per head, a random vector of the norm of the value
injection alpha * mean(v_W). Residual rule: gamma * |h| along a random unit direction per step.

Randomness comes from a counter-based hash of integer coordinates (seed, layer, batch row,
head, query position, key position / step, dimension), not from a generator's stream, so a
value depends only on where it is used: decoding token by token draws exactly what a
teacher-forced pass draws, on any device. The hash keeps every value in [0, 2^32), so int64
products never overflow.
"""
from __future__ import annotations

import math

import torch

QUESTION, STEP = 0, 1
_M32 = 0xFFFFFFFF
_SALT_ATTN, _SALT_RESIDUAL = 0x5EED_A77, 0x5EED_4E5
# Query chunks hold at most this many (head, query, key) elements, so memory is O(chunk * T).
DEFAULT_MAX_ELEMENTS = 1 << 22


def _hash32(x):
    """An integer mixer on [0, 2^32) (xor-shift-multiply); works on Python ints and int64 tensors."""
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    return (x >> 16) ^ x


def _mix(state, value):
    """Fold a non-negative integer coordinate (< 2^32) into a hash state (both int or int64 tensors)."""
    return _hash32(state ^ _hash32((value + 0x9E3779B9) & _M32))


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= _M32:
        raise ValueError(f"control_seed must be an int in [0, 2^32), got {seed!r}")
    return seed


# --------------------------------------------------------------------------- random-attn


def random_group_keys(seed: int, layer: int, batch_row: int, heads, qpos, kpos) -> torch.Tensor:
    """Hash values in [0, 2^32), int64 (len(heads), len(qpos), len(kpos)), of the random-attn draw.

    For query position i (key coordinates) of head h, the |C_i| keys of C_i ∪ X_i with the
    smallest (hash, key position) form the group G1, the others G2: a uniformly random split,
    fixed by (seed, layer, batch row, head, query position, key position).
    """
    base = _mix(_mix(_mix(_SALT_ATTN, seed), layer), batch_row)
    per_head = _mix(torch.full_like(heads, base), heads)
    per_query = _mix(per_head[:, None], qpos[None, :])
    return _hash32(per_query[:, :, None] ^ _hash32((kpos + 0x9E3779B9) & _M32)[None, None, :])


def _random_rows(q, k, v, kv_start, bounds, rule, strength, tau_max, scale, seed, layer, batch_row, qpos,
                 return_weights):
    """random-attn for the query rows `qpos` of one batch row: q (H, c, d), k, v (H_kv, Tk, d),
    bounds (c, 2) as oeb_attention takes them."""
    heads, c, d = q.shape
    kv_heads, tk, _ = k.shape
    group = heads // kv_heads
    # Head h reads kv head h // group: fold the group into the query axis instead of copying k, v.
    scores = torch.matmul(q.reshape(kv_heads, group * c, d), k.transpose(1, 2)).view(heads, c, tk) * scale
    kpos = torch.arange(tk, device=q.device)
    allowed = (kpos[None, :] <= qpos[:, None]) & (kpos[None, :] >= kv_start)
    a_, b_ = bounds[:, 0:1], bounds[:, 1:2]
    on = a_ >= 0
    g1 = allowed & on & (kpos[None, :] >= a_) & (kpos[None, :] < b_)   # bridge B / odds X
    g2 = allowed & on & (kpos[None, :] >= torch.maximum(a_, b_))      # bridge S / odds C

    scores = scores.masked_fill(~allowed, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))  # rows with no key
    probs = torch.exp(scores - row_max)
    total = probs.sum(dim=-1, keepdim=True)
    probs = probs / torch.where(total > 0, total, torch.ones_like(total))  # A, (H, c, Tk)
    p_1, p_2 = (probs * g1).sum(-1), (probs * g2).sum(-1)
    n_1 = g1.sum(-1)  # (c,)

    if rule == "bridge":
        from .reference import bridge_shifts

        g0 = allowed & ~g1 & ~g2
        lam_1, lam_2, active = bridge_shifts(probs[None], g2[None], g1[None], g0[None], tau_max)
        lam_1, lam_2, active = lam_1[0], lam_2[0], active[0]
    else:
        locked = (p_1 > 0) & (p_2 > p_1)
        # OEB's change of log-odds: log o' - log o = -lambda * log o on locked rows, else 0.
        active = locked & (strength > 0)
        delta = torch.where(locked, -strength * (torch.log(torch.where(locked, p_2, 1.0))
                                                 - torch.log(torch.where(locked, p_1, 1.0))), torch.zeros_like(p_2))
    weights = probs
    if bool(active.any()):
        pool = g1 | g2
        keys = random_group_keys(seed, layer, batch_row, torch.arange(heads, device=q.device), qpos, kpos)
        keys = (keys << 31) | kpos  # unique per row: ties in the hash are broken by key position
        keys = torch.where(pool, keys, torch.iinfo(torch.int64).max)
        # The random stand-in for group 1 (B, or X) has |group 1| keys; the rest of the pool stands in
        # for group 2 (S, or C).
        size = n_1 if rule == "bridge" else g2.sum(-1)
        threshold = keys.sort(dim=-1).values.gather(-1, (size - 1).clamp(min=0).expand(heads, c)[..., None])
        r1 = pool & (keys <= threshold) & (size > 0)[:, None]
        r2 = pool & ~r1
        if rule == "bridge":
            shift = lam_1[..., None] * r1 + lam_2[..., None] * r2
            new = torch.exp(scores - row_max + shift).masked_fill(~allowed, 0.0)
            new = new / new.sum(-1, keepdim=True).clamp_min(torch.finfo(new.dtype).tiny)
            weights = torch.where(active[..., None], new, probs)
        else:
            # odds: G1 = r1 stands in for C (|C| keys), G2 = r2 for X; move the same log-odds.
            q_1, q_2 = (probs * r1).sum(-1), (probs * r2).sum(-1)
            apply = active & (q_1 > 0) & (q_2 > 0)
            safe_1 = torch.where(apply, q_1, torch.ones_like(q_1))
            safe_2 = torch.where(apply, q_2, torch.ones_like(q_2))
            new_log_odds = torch.log(safe_1) - torch.log(safe_2) + delta
            mass = q_1 + q_2
            f_1 = torch.where(apply, mass * torch.sigmoid(new_log_odds) / safe_1, torch.ones_like(q_1))
            f_2 = torch.where(apply, mass * torch.sigmoid(-new_log_odds) / safe_2, torch.ones_like(q_2))
            weights = probs * (1 + r1 * (f_1 - 1)[..., None] + r2 * (f_2 - 1)[..., None])
    out = torch.matmul(weights.reshape(kv_heads, group * c, tk), v).view(heads, c, d)
    return out, (weights if return_weights else None)


def random_group_attention(q, k, v, kv_start, bounds, rule, strength, tau_max, scale, seed, layer, *,
                           max_elements=DEFAULT_MAX_ELEMENTS, return_weights=False):
    """The random-attn control for one layer. Returns out (B, H, Tq, d) in q's dtype (and A').

    Same conventions as ops.oeb_attention: q (B, H, Tq, d); k, v (B, H_kv, Tk, d); query i at key
    position Tk - Tq + i; kv_start (B,); bounds (B, Tq, 2) ((-1, -1): not intervened); rule
    "bridge" (tau_max, the paper's eps) or "odds" (strength). Computed in PyTorch (fp32, fp64 for
    fp64 inputs), row by row of the batch and in chunks of query rows holding at most max_elements
    (head, query, key) scores; no gradients (evaluation only).
    return_weights=True also returns the attention A' (B, H, Tq, Tk) for tests.
    """
    b, heads, tq, d = q.shape
    kv_heads, tk = k.shape[1], k.shape[2]
    if heads % kv_heads:
        raise ValueError(f"q has {heads} heads, not a multiple of the {kv_heads} kv heads")
    if rule not in ("bridge", "odds"):
        raise ValueError(f"rule must be 'bridge' or 'odds', got {rule!r}")
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.empty(b, heads, tq, d, dtype=q.dtype, device=q.device)
    weights = q.new_zeros((b, heads, tq, tk), dtype=acc) if return_weights else None
    chunk = max(1, max_elements // max(1, heads * tk))
    positions = torch.arange(tk - tq, tk, device=q.device)
    starts = kv_start.tolist()
    for row in range(b):
        k_row, v_row = k[row].to(acc), v[row].to(acc)
        for i0 in range(0, tq, chunk):
            i1 = min(tq, i0 + chunk)
            o, w = _random_rows(q[row, :, i0:i1].to(acc), k_row, v_row, starts[row], bounds[row, i0:i1], rule,
                                strength, tau_max, scale, seed, layer, row, positions[i0:i1], return_weights)
            out[row, :, i0:i1] = o.to(q.dtype)
            if return_weights:
                weights[row, :, i0:i1] = w
    return (out, weights) if return_weights else out


# --------------------------------------------------------------------------- random-residual


def residual_targets(seg_ids, seg_kinds, all_segments_nonempty: bool):
    """(B, T) bool: the tokens SMI would change (design.md 2.4).

    A token changes when its segment is a step or the summary and at least one non-empty
    thinking step comes before that segment. With all_segments_nonempty (online tracking: the
    tracker opens a segment only with a token) the steps are counted from seg_kinds alone;
    otherwise (a whole teacher-forced sequence) empty steps are found from seg_ids and skipped,
    as SMI skips them. Differs from SMI only where its momentum has norm 0 (SMI then adds nothing).
    """
    b, s = seg_kinds.shape
    valid = seg_ids >= 0
    if s == 0:  # every token is padding
        return valid
    slot = torch.where(valid, seg_ids, 0)
    is_step = seg_kinds == STEP
    if not all_segments_nonempty:
        counts = torch.zeros(b, s, dtype=torch.long, device=seg_ids.device)
        counts.scatter_add_(1, slot, valid.long())
        is_step = is_step & (counts > 0)
    steps_before = torch.cumsum(is_step.long(), dim=1) - is_step.long()  # exclusive: steps with id < s
    changed_segment = (seg_kinds != QUESTION) & (steps_before >= 1)
    return valid & changed_segment.gather(1, slot)


def random_directions(seed: int, layer: int, rows, segments, dim: int, device=None) -> torch.Tensor:
    """Unit vectors (N, dim) float64, one per (batch row, segment id) pair, fixed by (seed, layer, row, segment).

    Each coordinate is a standard normal from the hash (Box-Muller on two 32-bit uniforms), so
    the direction is uniform on the sphere.
    """
    rows = torch.as_tensor(rows, dtype=torch.long, device=device)
    segments = torch.as_tensor(segments, dtype=torch.long, device=device)
    base = _mix(_mix(_mix(torch.full_like(rows, _mix(_SALT_RESIDUAL, seed)), layer), rows), segments)
    coords = torch.arange(dim, device=rows.device)
    first = _mix(base[:, None], 2 * coords[None, :]).double()
    second = _mix(base[:, None], 2 * coords[None, :] + 1).double()
    u1 = (first + 0.5) / 2.0 ** 32  # in (0, 1): log never sees 0
    u2 = (second + 0.5) / 2.0 ** 32
    gauss = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
    return gauss / torch.linalg.vector_norm(gauss, dim=-1, keepdim=True)


def random_residual(h, seg_ids, targets, gamma, seed, layer):
    """h_i + gamma * |h_i| * u(seed, layer, row, seg(i)) on the target tokens; h (B, T, D) -> h'.

    Computed in fp32 (fp64 for fp64 h); differentiable in h.
    """
    if not bool(targets.any()):
        return h
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    rows = torch.arange(h.shape[0], device=h.device)[:, None].expand_as(seg_ids)
    num_slots = int(seg_ids.max()) + 1
    pair = rows[targets] * num_slots + seg_ids[targets]
    unique, inverse = torch.unique(pair, return_inverse=True)  # one direction per (row, step)
    directions = random_directions(seed, layer, unique // num_slots, unique % num_slots, h.shape[-1],
                                   h.device).to(acc)
    x = h.to(acc)
    picked = x[targets]
    delta = torch.zeros_like(x)
    delta[targets] = gamma * torch.linalg.vector_norm(picked, dim=-1, keepdim=True) * directions[inverse]
    return (x + delta).to(h.dtype)


def random_value_injection(attn_out, value, windows, alpha, max_width, seed, layer):
    """random-residual for SMI's value rule: where ops.smi_value would add alpha * mean_W v to head h
    of a token, add a random vector of the same norm instead. attn_out (B, Tq, H, d), value
    (B, H_kv, Tk, d), windows (B, Tq, 2) as ops.smi_value takes them. One direction per (seed,
    layer, batch row, key position of the token, head), so decode and prefill draw the same."""
    from . import ops

    on = windows[..., 0] >= 0
    if not bool(on.any()):
        return attn_out
    b, tq, h, d = attn_out.shape
    zero = torch.zeros_like(attn_out)
    change = ops.smi_value(zero, value, windows, alpha, max_width)          # alpha * mean_W v, per head
    acc = torch.float64 if attn_out.dtype == torch.float64 else torch.float32
    norms = torch.linalg.vector_norm(change.to(acc), dim=-1, keepdim=True)  # (B, Tq, H, 1)
    rows, cols = on.nonzero(as_tuple=True)
    positions = value.shape[2] - tq + cols
    heads = torch.arange(h, device=attn_out.device)
    # one random unit vector per (row, position, head): fold position and head into the "segment"
    # coordinate of random_directions
    segment_code = positions[:, None] * h + heads[None, :]
    u = random_directions(seed, layer, rows[:, None].expand(-1, h).reshape(-1), segment_code.reshape(-1), d,
                          attn_out.device).to(acc).view(-1, h, d)
    out = attn_out.to(acc).clone()
    out[rows, cols] = out[rows, cols] + norms[rows, cols] * u
    return out.to(attn_out.dtype)
