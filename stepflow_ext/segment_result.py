"""Segmentation: the result of segment() and of StepTracker (design.md 2.1).

seg ids (B, T) with -1 on padding, per-row segment kinds (KIND_NAMES: "question", "step",
"summary") and per-row `closed` / `closing`, plus the vectorized views the kernels need
(`seg_start`, `channels`, `channel_starts`, `smi_prev_step`). `Segmentation.from_lengths` builds one
by hand. The rule that produces it is described in segment.py's module docstring.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .reference import QUESTION, STEP, SUMMARY

KIND_NAMES = ("question", "step", "summary")
_KIND_CODE = {name: code for code, name in enumerate(KIND_NAMES)}
assert (_KIND_CODE["question"], _KIND_CODE["step"], _KIND_CODE["summary"]) == (QUESTION, STEP, SUMMARY)


# --------------------------------------------------------------------------- Segmentation


def _check_kinds_row(row, kinds):
    """Kinds must read question step* summary*; returns them as names."""
    if not isinstance(kinds, (list, tuple)) or len(kinds) == 0:
        raise ValueError(f"kinds[{row}] must be a non-empty list of segment kinds, got {kinds!r}")
    names = []
    for k in kinds:
        if isinstance(k, int) and not isinstance(k, bool) and 0 <= k < 3:
            k = KIND_NAMES[k]
        if k not in _KIND_CODE:
            raise ValueError(f"kinds[{row}] has unknown kind {k!r}; use one of {KIND_NAMES}")
        names.append(k)
    if names[0] != "question":
        raise ValueError(f"kinds[{row}] must start with 'question', got {names[0]!r}")
    for i in range(1, len(names)):
        if names[i] == "question":
            raise ValueError(f"kinds[{row}][{i}] is 'question': only segment 0 is the question")
        if names[i - 1] == "summary" and names[i] != "summary":
            raise ValueError(f"kinds[{row}][{i}] is {names[i]!r} after a summary: summary segments come last")
    return names


def _default_closed(sizes):
    """Closed flags of a hand-built row: a segment followed by a later non-empty one is closed."""
    last = max((s for s, n in enumerate(sizes) if n > 0), default=-1)
    return [s < last for s in range(len(sizes))]


@dataclass(eq=False, repr=False)
class Segmentation:
    """Segments of a batch of traces.

    seg_ids: LongTensor (B, T), the segment of each token, -1 on padding; along each row the
        valid ids never decrease (segments are contiguous and in order).
    kinds: per row, the kind of each segment: "question" (segment 0), then "step"s, then
        "summary" segments (one, or several with summary_steps). A segment may be empty.
    closed: per row, per segment, whether the segment was closed by one of its own tokens (a
        sentence end, a delimiter, the think_end marker; think_start for the question). Lists of
        bools or a (B, S) bool tensor. Default (None): a segment followed by a later non-empty
        segment is closed, the last non-empty one (and any empty ones after it) is open.
    closing: per row, per segment, the position of the token that closed it, -1 when it is open
        or was closed without a token of its own (the prompt question with think_start=None).
        It is the segment's last token except under the paragraph rule, where whitespace-only
        tokens after a delimiter join the closed segment. Lists of ints or a (B, S) int tensor.
        Default (None): the last token of each closed non-empty segment.
    """

    seg_ids: torch.Tensor
    kinds: list
    closed: list | None = None
    closing: list | None = None

    def __post_init__(self):
        ids = self.seg_ids
        if not isinstance(ids, torch.Tensor):
            raise ValueError(f"seg_ids must be a torch.Tensor, got {type(ids).__name__}")
        if ids.dim() != 2:
            raise ValueError(f"seg_ids must have shape (B, T), got {tuple(ids.shape)}")
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise ValueError(f"seg_ids must be an integer tensor, got {ids.dtype}")
        self.seg_ids = ids = ids.long()
        if not isinstance(self.kinds, (list, tuple)) or len(self.kinds) != ids.shape[0]:
            got = len(self.kinds) if isinstance(self.kinds, (list, tuple)) else type(self.kinds).__name__
            raise ValueError(f"kinds must be a list with one list per row ({ids.shape[0]}), got {got}")
        self.kinds = [_check_kinds_row(r, k) for r, k in enumerate(self.kinds)]
        if ids.numel():
            counts = torch.tensor([len(k) for k in self.kinds], device=ids.device)
            if bool((ids < -1).any()):
                raise ValueError("seg_ids must be >= -1 (-1 marks padding)")
            if bool((ids >= counts[:, None]).any()):
                raise ValueError("seg_ids has ids >= the number of segments given in kinds for that row")
            valid = ids >= 0
            running = torch.where(valid, ids, -1).cummax(dim=1).values
            if bool((running != ids)[valid].any()):
                raise ValueError("seg_ids must be non-decreasing along each row (ignoring -1 padding)")
        self.closed = self._check_closed(self.closed)
        self.closing = self._check_closing(self.closing)

    def _check_closed(self, closed):
        if closed is None:
            return [_default_closed(sizes) for sizes in self.lengths()]
        if isinstance(closed, torch.Tensor):
            if closed.dim() != 2 or closed.shape[0] != self.batch_size or closed.shape[1] < self.num_segments:
                raise ValueError(f"closed must be a (B, S) tensor with B = {self.batch_size} and S >= "
                                 f"{self.num_segments}, got {tuple(closed.shape)}")
            closed = [row[:len(k)] for row, k in zip(closed.bool().tolist(), self.kinds)]
        if not isinstance(closed, (list, tuple)) or len(closed) != self.batch_size:
            raise ValueError(f"closed must be a list with one list of bools per row ({self.batch_size})")
        out = []
        for r, (flags, kinds) in enumerate(zip(closed, self.kinds)):
            if not isinstance(flags, (list, tuple)) or len(flags) != len(kinds) or \
                    not all(isinstance(f, bool) or f in (0, 1) for f in flags):
                raise ValueError(f"closed[{r}] must hold one bool per segment ({len(kinds)}), got {flags!r}")
            out.append([bool(f) for f in flags])
        return out

    def _check_closing(self, closing):
        first, end, _ = self._table()
        first, end = first.tolist(), end.tolist()
        if closing is None:
            return [[end[r][s] - 1 if flag and end[r][s] > 0 else -1 for s, flag in enumerate(flags)]
                    for r, flags in enumerate(self.closed)]
        if isinstance(closing, torch.Tensor):
            if closing.dim() != 2 or closing.shape[0] != self.batch_size or closing.shape[1] < self.num_segments \
                    or closing.dtype.is_floating_point or closing.dtype == torch.bool:
                raise ValueError(f"closing must be a (B, S) integer tensor with B = {self.batch_size} and S >= "
                                 f"{self.num_segments}, got {tuple(closing.shape)} {closing.dtype}")
            closing = [row[:len(k)] for row, k in zip(closing.tolist(), self.kinds)]
        if not isinstance(closing, (list, tuple)) or len(closing) != self.batch_size:
            raise ValueError(f"closing must be a list with one list of ints per row ({self.batch_size})")
        out = []
        for r, (pos, kinds, flags) in enumerate(zip(closing, self.kinds, self.closed)):
            if not isinstance(pos, (list, tuple)) or len(pos) != len(kinds) or \
                    not all(isinstance(p, int) and not isinstance(p, bool) for p in pos):
                raise ValueError(f"closing[{r}] must hold one int per segment ({len(kinds)}), got {pos!r}")
            for s, p in enumerate(pos):
                if p != -1 and not (flags[s] and first[r][s] <= p < end[r][s] and self.seg_ids[r, p] == s):
                    raise ValueError(f"closing[{r}][{s}] = {p} must be -1 or the position of a token of "
                                     f"segment {s}, which must then be closed")
            out.append(list(pos))
        return out

    # ------------------------------------------------------------------ shape and views
    @property
    def batch_size(self) -> int:
        return self.seg_ids.shape[0]

    @property
    def length(self) -> int:
        return self.seg_ids.shape[1]

    @property
    def num_segments(self) -> int:
        """S, the largest number of segments of a row (the size of the step maps)."""
        return max((len(k) for k in self.kinds), default=0)

    def num_steps(self, row: int) -> int:
        return self.kinds[row].count("step")

    def seg_kinds_tensor(self, device=None) -> torch.Tensor:
        """(B, S) int64 kind codes QUESTION=0, STEP=1, SUMMARY=2; unused slots hold STEP."""
        out = torch.full((self.batch_size, self.num_segments), STEP, dtype=torch.long)
        for row, kinds in enumerate(self.kinds):
            out[row, :len(kinds)] = torch.tensor([_KIND_CODE[k] for k in kinds], dtype=torch.long)
        return out.to(device if device is not None else self.seg_ids.device)

    def closed_tensor(self, device=None) -> torch.Tensor:
        """(B, S) bool: `closed` as a tensor; unused slots are False."""
        out = torch.zeros((self.batch_size, self.num_segments), dtype=torch.bool)
        for row, flags in enumerate(self.closed):
            out[row, :len(flags)] = torch.tensor(flags, dtype=torch.bool)
        return out.to(device if device is not None else self.seg_ids.device)

    def closing_tensor(self, device=None) -> torch.Tensor:
        """(B, S) int64: `closing` as a tensor; unused slots are -1."""
        out = torch.full((self.batch_size, self.num_segments), -1, dtype=torch.long)
        for row, pos in enumerate(self.closing):
            out[row, :len(pos)] = torch.tensor(pos, dtype=torch.long)
        return out.to(device if device is not None else self.seg_ids.device)

    def _table(self):
        """Per row and segment: first position (T if empty), last position + 1 (-1 if empty), size."""
        ids = self.seg_ids
        b, t = ids.shape
        s = max(self.num_segments, 1)
        valid = ids >= 0
        slot = ids.clamp(min=0)
        pos = torch.arange(t, device=ids.device).expand(b, t)
        first = torch.full((b, s), t, dtype=torch.long, device=ids.device)
        first = first.scatter_reduce(1, slot, torch.where(valid, pos, t), reduce="amin")
        end = torch.full((b, s), -1, dtype=torch.long, device=ids.device)
        end = end.scatter_reduce(1, slot, torch.where(valid, pos + 1, -1), reduce="amax")
        size = torch.zeros((b, s), dtype=torch.long, device=ids.device).scatter_add(1, slot, valid.long())
        return first, end, size

    def seg_start(self) -> torch.Tensor:
        """(B, T) int64: the position where each token's segment starts; -1 for question tokens and
        padding. This is the seg_start input of the OEB `odds` rule for a prefill."""
        ids = self.seg_ids
        if not self.num_segments:
            return torch.full_like(ids, -1)
        first, _, _ = self._table()
        slot = ids.clamp(min=0)
        kinds = self.seg_kinds_tensor(ids.device).gather(1, slot)
        rebalanced = (ids >= 0) & (kinds != QUESTION)
        return torch.where(rebalanced, first.gather(1, slot), torch.full_like(ids, -1))

    def channels(self) -> torch.Tensor:
        """(B, T) int64 channel of each token: -1 padding, 0 question, 1 thinking (a step), 2 summary."""
        ids = self.seg_ids
        if not self.num_segments:
            return torch.full_like(ids, -1)
        kinds = self.seg_kinds_tensor(ids.device).gather(1, ids.clamp(min=0))
        return torch.where(ids >= 0, kinds, torch.full_like(ids, -1))

    def channel_starts(self) -> torch.Tensor:
        """(B, 2) int64: per row, the first token after the question (the first thinking token, or
        the first summary token when the thinking is empty) and the first summary token; T where
        absent. The bridge OEB bounds follow: a thinking query gets (kv_start, [:, 0]), a summary
        query ([:, 0], [:, 1])."""
        ch = self.channels()
        t = self.length
        pos = torch.arange(t, device=ch.device).expand_as(ch)
        big = torch.full_like(ch, t)
        think = torch.where(ch >= 1, pos, big).amin(dim=1) if t else torch.zeros(ch.shape[0], dtype=torch.long)
        summ = torch.where(ch == 2, pos, big).amin(dim=1) if t else torch.zeros(ch.shape[0], dtype=torch.long)
        return torch.stack([think, summ], dim=1)

    def smi_prev_step(self) -> torch.Tensor:
        """(B, T, 2) int64: for each token that SMI's `value` rule targets (it starts thinking step
        k >= 2, step k-1 is not empty, and it does not close its own step: `closing` is not its
        position), the key range [start, end) of the whole step k-1; (-1, -1) elsewhere. The SMI
        window of width w is [max(start, end - w), end)."""
        ids = self.seg_ids
        b, t = ids.shape
        out = torch.full((b, t, 2), -1, dtype=torch.long, device=ids.device)
        if not self.num_segments or not t:
            return out
        first, end, size = self._table()
        kinds = self.seg_kinds_tensor(ids.device)
        closing = self.closing_tensor(ids.device)
        nseg = torch.tensor([len(k) for k in self.kinds], device=ids.device)
        s = torch.arange(kinds.shape[1], device=ids.device)
        real = s[None, :] < nseg[:, None]
        step = real & (kinds == STEP)
        prev_step = torch.zeros_like(step)
        prev_step[:, 1:] = step[:, :-1]
        prev_size = torch.zeros_like(size)
        prev_size[:, 1:] = size[:, :-1]
        target = step & prev_step & (size > 0) & (prev_size > 0) & (closing != first[:, :kinds.shape[1]])
        prev_first = torch.zeros_like(first)
        prev_first[:, 1:] = first[:, :-1]
        prev_end = torch.zeros_like(end)
        prev_end[:, 1:] = end[:, :-1]
        slot = ids.clamp(min=0)
        pos = torch.arange(t, device=ids.device).expand(b, t)
        hit = (ids >= 0) & target.gather(1, slot) & (first.gather(1, slot) == pos)
        out[..., 0] = torch.where(hit, prev_first.gather(1, slot), -1)
        out[..., 1] = torch.where(hit, prev_end.gather(1, slot), -1)
        return out

    def kv_start(self) -> torch.Tensor:
        """(B,) int64: the number of leading padding tokens (T for a row without valid token)."""
        valid = self.seg_ids >= 0
        if self.length == 0:
            return torch.zeros(self.batch_size, dtype=torch.long, device=self.seg_ids.device)
        first = valid.to(torch.int8).argmax(dim=1)
        return torch.where(valid.any(dim=1), first, torch.full_like(first, self.length))

    def lengths(self) -> list:
        """Per row, the number of tokens of each segment (the inverse of from_lengths)."""
        out = []
        for row, kinds in enumerate(self.kinds):
            ids = self.seg_ids[row]
            out.append(torch.bincount(ids[ids >= 0].cpu(), minlength=len(kinds)).tolist())
        return out

    def to(self, device) -> "Segmentation":
        return Segmentation(self.seg_ids.to(device), [list(k) for k in self.kinds], [list(c) for c in self.closed],
                            [list(c) for c in self.closing])

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_lengths(cls, lengths, kinds=None, pad="right", total_length=None, device=None, closed=None):
        """Build from per-row segment lengths, e.g. [[5, 7, 3, 4]] (one row: 19 tokens).

        lengths: one list of non-negative ints per row (a flat list is one row); 0 is an
            empty segment. kinds: one list per row; default: "question" then "step"s (a
            summary is never guessed: pass it). pad: "right" or "left", the side where
            rows shorter than total_length (default: the longest row) get -1. closed: as for
            Segmentation (default: every segment but the last non-empty one is closed).
        """
        if isinstance(lengths, torch.Tensor):
            lengths = lengths.tolist()
        if not isinstance(lengths, (list, tuple)):
            raise ValueError(f"lengths must be a list of lists of ints, got {type(lengths).__name__}")
        if lengths and all(isinstance(x, int) and not isinstance(x, bool) for x in lengths):
            lengths = [lengths]
        rows = []
        for r, row in enumerate(lengths):
            if not isinstance(row, (list, tuple)) or len(row) == 0:
                raise ValueError(f"lengths[{r}] must be a non-empty list of ints, got {row!r}")
            for n in row:
                if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                    raise ValueError(f"lengths[{r}] must hold non-negative ints, got {n!r}")
            rows.append(list(row))
        if kinds is None:
            kinds = [["question"] + ["step"] * (len(row) - 1) for row in rows]
        elif isinstance(kinds, (list, tuple)) and kinds and all(isinstance(k, (str, int)) for k in kinds):
            kinds = [list(kinds)]
        if not isinstance(kinds, (list, tuple)) or len(kinds) != len(rows):
            raise ValueError(f"kinds must have one list per row of lengths ({len(rows)} rows)")
        for r, (row, k) in enumerate(zip(rows, kinds)):
            if not isinstance(k, (list, tuple)) or len(k) != len(row):
                raise ValueError(f"kinds[{r}] must have one kind per segment ({len(row)}), got {k!r}")
        if pad not in ("right", "left"):
            raise ValueError(f"pad must be 'right' or 'left', got {pad!r}")
        longest = max((sum(row) for row in rows), default=0)
        if total_length is None:
            total_length = longest
        if isinstance(total_length, bool) or not isinstance(total_length, int) or total_length < longest:
            raise ValueError(f"total_length must be an int >= the longest row ({longest}), got {total_length!r}")
        ids = torch.full((len(rows), total_length), -1, dtype=torch.long)
        for r, row in enumerate(rows):
            tokens = torch.repeat_interleave(torch.arange(len(row)), torch.tensor(row, dtype=torch.long))
            offset = 0 if pad == "right" else total_length - len(tokens)
            ids[r, offset:offset + len(tokens)] = tokens
        if closed is not None and isinstance(closed, (list, tuple)) and closed and \
                all(isinstance(c, (bool, int)) for c in closed):
            closed = [list(closed)]
        return cls(ids.to(device) if device is not None else ids, [list(k) for k in kinds], closed)

    def __repr__(self):
        short = {"question": "q", "step": "s", "summary": "S"}
        rows = []
        for kinds, lens in zip(self.kinds, self.lengths()):
            parts = [f"{short[k]}{n}" for k, n in zip(kinds, lens)]
            if len(parts) > 12:
                parts = parts[:6] + [f"...({len(parts) - 11} more)"] + parts[-5:]
            rows.append(" ".join(parts))
        body = "; ".join(rows) if len(rows) <= 8 else "; ".join(rows[:8]) + f"; ... ({len(rows) - 8} more rows)"
        return (f"Segmentation(B={self.batch_size}, T={self.length}, S={self.num_segments}, "
                f"segments=[{body}])  # q=question s=step S=summary, number = tokens")
