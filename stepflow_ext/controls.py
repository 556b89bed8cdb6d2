"""The two controls of StepFlow's evaluation (docs/method.md, "Controls").

random-attn: in the OEB layers, the per-row change of log-odds that OEB would apply, applied
instead between two random key groups of the sizes of OEB's groups (current step C, earlier
context X). random-residual: in the SMI layers, on the tokens SMI would change, a random unit
direction scaled to the relative norm gamma instead of SMI's momentum.

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


def _random_rows(q, k, v, start, kv_start, strength, num_sink, scale, seed, layer, batch_row, qpos,
                 return_weights):
    """random-attn for the query rows `qpos` of one batch row: q (H, c, d), k, v (H_kv, Tk, d)."""
    heads, c, d = q.shape
    kv_heads, tk, _ = k.shape
    group = heads // kv_heads
    # Head h reads kv head h // group: fold the group into the query axis instead of copying k, v.
    scores = torch.matmul(q.reshape(kv_heads, group * c, d), k.transpose(1, 2)).view(heads, c, tk) * scale
    kpos = torch.arange(tk, device=q.device)
    allowed = (kpos[None, :] <= qpos[:, None]) & (kpos[None, :] >= kv_start)
    sink = allowed & (kpos[None, :] < kv_start + num_sink)
    rebalanced = (start >= 0)[:, None]
    current = allowed & ~sink & rebalanced & (kpos[None, :] >= start[:, None])
    context = allowed & ~sink & rebalanced & (kpos[None, :] < start[:, None])

    scores = scores.masked_fill(~allowed, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))  # rows with no key
    probs = torch.exp(scores - row_max)
    total = probs.sum(dim=-1, keepdim=True)
    probs = probs / torch.where(total > 0, total, torch.ones_like(total))  # A, (H, c, Tk)

    p_c = (probs * current).sum(-1)
    p_x = (probs * context).sum(-1)
    locked = (p_x > 0) & (p_c > p_x)
    # OEB's change of log-odds: log o' - log o = -lambda * log o on locked rows, else 0.
    delta = torch.where(locked, -strength * (torch.log(torch.where(locked, p_c, 1.0))
                                             - torch.log(torch.where(locked, p_x, 1.0))), torch.zeros_like(p_c))
    weights = probs
    if strength > 0 and bool(locked.any()):
        pool = current | context
        keys = random_group_keys(seed, layer, batch_row, torch.arange(heads, device=q.device), qpos, kpos)
        keys = (keys << 31) | kpos  # unique per row: ties in the hash are broken by key position
        keys = torch.where(pool, keys, torch.iinfo(torch.int64).max)
        n_current = current.sum(-1)  # (c,)
        threshold = keys.sort(dim=-1).values.gather(-1, (n_current - 1).clamp(min=0).expand(heads, c)[..., None])
        g1 = pool & (keys <= threshold) & (n_current > 0)[:, None]
        g2 = pool & ~g1
        p_1 = (probs * g1).sum(-1)
        p_2 = (probs * g2).sum(-1)
        apply = (delta != 0) & (p_1 > 0) & (p_2 > 0)
        safe_1 = torch.where(apply, p_1, torch.ones_like(p_1))
        safe_2 = torch.where(apply, p_2, torch.ones_like(p_2))
        new_log_odds = torch.log(safe_1) - torch.log(safe_2) + delta
        mass = p_1 + p_2
        r_1 = torch.where(apply, mass * torch.sigmoid(new_log_odds) / safe_1, torch.ones_like(p_1))
        r_2 = torch.where(apply, mass * torch.sigmoid(-new_log_odds) / safe_2, torch.ones_like(p_2))
        weights = probs * (1 + g1 * (r_1 - 1)[..., None] + g2 * (r_2 - 1)[..., None])
    out = torch.matmul(weights.reshape(kv_heads, group * c, tk), v).view(heads, c, d)
    return out, (weights if return_weights else None)


def random_group_attention(q, k, v, seg_start, kv_start, strength, num_sink, scale, seed, layer, *,
                           max_elements=DEFAULT_MAX_ELEMENTS, return_weights=False):
    """The random-attn control for one layer. Returns out (B, H, Tq, d) in q's dtype (and A').

    Same conventions as ops.oeb_attention: q (B, H, Tq, d); k, v (B, H_kv, Tk, d); query i at key
    position Tk - Tq + i; seg_start (B, Tq) (-1: not rebalanced); kv_start (B,). Computed in
    PyTorch (fp32, fp64 for fp64 inputs), row by row of the batch and in chunks of query rows
    holding at most max_elements (head, query, key) scores; no gradients (evaluation only).
    return_weights=True also returns the rebalanced attention A' (B, H, Tq, Tk) for tests.
    """
    b, heads, tq, d = q.shape
    kv_heads, tk = k.shape[1], k.shape[2]
    if heads % kv_heads:
        raise ValueError(f"q has {heads} heads, not a multiple of the {kv_heads} kv heads")
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
            o, w = _random_rows(q[row, :, i0:i1].to(acc), k_row, v_row, seg_start[row, i0:i1], starts[row],
                                strength, num_sink, scale, seed, layer, row, positions[i0:i1], return_weights)
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
