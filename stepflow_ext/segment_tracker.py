"""The online form of the segmentation rule: StepTracker (design.md 2.1).

StepTracker runs the per-row state machine (`_Row`, segment_rule.py) on token ids as they come
during generation; `start()` places the prompt, `feed()` the generated tokens, each returns a
`TrackerUpdate`. It follows the KV cache: `truncate` (rollback after a crop, from per-row snapshots),
`select` (rows reordered, repeated, dropped) and `follow` (a whole sequence fed again), with the
columns fed kept per row in `_History`.
"""
from __future__ import annotations

from array import array
from typing import NamedTuple

import torch

from .segment_result import Segmentation
from .segment_rule import _Options, _Row, _rows_and_mask


# --------------------------------------------------------------------------- online form


class TrackerUpdate(NamedTuple):
    """Per fed token (B, n); masked (padding) columns hold -1."""
    seg_ids: torch.Tensor        # segment of each token
    seg_start: torch.Tensor      # position where its segment starts; -1 for question tokens
    think_start: torch.Tensor    # first token after the question, as known at that token; -1 for question tokens
    summary_start: torch.Tensor  # first summary token; -1 unless the token is summary
    prev_step: torch.Tensor      # (B, n, 2): Segmentation.smi_prev_step of each token
    kinds: list                  # per row, the kinds so far (live lists: do not modify)
    closed: list                 # per row, the closed flags so far (live lists: do not modify)


_CHUNK = 512          # history columns per frozen (shared) chunk
KEEP_SNAPSHOTS = 8    # per row: the states at the start of the last calls (rollback without a replay from 0)


class _History:
    """The columns fed to one row: token ids and seg ids (-1: padding, not placed).

    Full chunks of _CHUNK columns are frozen and shared between copies (beam search duplicates
    rows), the open tail is copied: copy() costs O(T / _CHUNK + _CHUNK), extend() O(n) amortized,
    truncate(n) O(columns dropped + _CHUNK)."""

    __slots__ = ("chunks", "ids", "segs", "base")

    def __init__(self):
        self.chunks, self.ids, self.segs, self.base = [], array("q"), array("q"), 0

    def __len__(self):
        return self.base + len(self.ids)

    def copy(self) -> "_History":
        new = _History.__new__(_History)
        new.chunks, new.base = list(self.chunks), self.base
        new.ids, new.segs = array("q", self.ids), array("q", self.segs)
        return new

    def extend(self, ids, segs):
        self.ids.extend(ids)
        self.segs.extend(segs)
        if len(self.ids) >= _CHUNK:
            self.chunks.append((self.ids, self.segs))
            self.base += len(self.ids)
            self.ids, self.segs = array("q"), array("q")

    def truncate(self, n: int):
        while n < self.base:
            ids, segs = self.chunks.pop()
            self.base -= len(ids)
            self.ids, self.segs = array("q", ids), array("q", segs)   # frozen chunks may be shared: copy
        del self.ids[n - self.base:]
        del self.segs[n - self.base:]

    def columns(self, start: int = 0, stop: int | None = None):
        """(ids, segs) of columns [start, stop) as arrays."""
        stop = len(self) if stop is None else stop
        if start >= self.base:
            return self.ids[start - self.base:stop - self.base], self.segs[start - self.base:stop - self.base]
        ids, segs = array("q"), array("q")
        for a, b in self.chunks:
            ids.extend(a)
            segs.extend(b)
        ids.extend(self.ids)
        segs.extend(self.segs)
        return ids[start:stop], segs[start:stop]


class StepTracker:
    """The rule of 2.1 online: feed token ids as they come, per batch row.

    tracker = StepTracker(batch_size, tokenizer=tok)          # options as for segment()
    upd = tracker.start(prompt_ids, attention_mask)           # (B, P) prompts, left padding allowed
    upd = tracker.feed(next_ids[:, None])                     # (B, n) new tokens
    tracker.truncate(n)                                       # back to the state after n columns
    tracker.select(index)                                     # rows reordered / repeated / dropped
    tracker.follow(all_ids, attention_mask)                   # a whole sequence again (no KV cache)
    Positions count every column fed so far (padding included): they are key positions of the KV
    cache. start() places the prompt tokens too (the prompt may hold the whole question, the
    thinking start, prefilled thinking or even the end of thinking). Feeding a trace in any
    chunking gives exactly segment(...) on the whole trace (tracker.segmentation()). Each token
    costs O(1) amortized (one bounded decode); nothing is replayed. A new start() begins new
    sequences, in any batch size.

    Rollback and reordering follow the KV cache (replace_attention calls them when generate crops
    rejected candidates or reorders beams). Per row the tracker keeps the columns fed (token ids and
    seg ids, in shared chunks) and, at the start of each of the last KEEP_SNAPSHOTS feeds, a
    snapshot of the row's state (_Row.save: O(1), the per-segment lists are append-only).
    truncate(n) loads the latest snapshot at or before n and places again the few tokens between it
    and n (a crop to the middle of the last call re-places at most that call's tokens); without such
    a snapshot the row is placed again from its first column. select(index) moves rows (a row used
    twice is cloned: O(segments + decode window), its history shares the frozen chunks).
    """

    def __init__(self, batch_size=None, tokenizer=None, boundary_token_ids=None, think_end_token_ids=None,
                 step_delimiter="\n\n", think_end="auto", *, think_start="auto", steps="auto", summary_steps=False,
                 model=None):
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                       or batch_size < 1):
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.batch_size = batch_size
        self.options = _Options(tokenizer, boundary_token_ids, think_end_token_ids, step_delimiter, think_end,
                                think_start, steps, summary_steps, model)
        self._rows = None

    def start(self, input_ids, attention_mask=None, prompt_lengths=None) -> TrackerUpdate:
        """Start new sequences: the (non-padding) tokens of input_ids are the prompts; places them
        and returns their TrackerUpdate (B, P). The batch size is that of input_ids.
        prompt_lengths (one int per row): prompts longer than this call (a prefill in chunks: the
        tokens fed next are prompt tokens too, up to that many in all)."""
        ids, valid, device = _rows_and_mask(input_ids, attention_mask)
        counts = [sum(ok) for ok in valid]
        if prompt_lengths is not None:
            prompt_lengths = list(prompt_lengths)
            if len(prompt_lengths) != len(ids) or not all(
                    isinstance(p, int) and not isinstance(p, bool) and p >= n for p, n in zip(prompt_lengths, counts)):
                raise ValueError(f"prompt_lengths must hold one int per row ({len(ids)}), each at least the row's "
                                 f"tokens in this call {counts}, got {prompt_lengths!r}")
            counts = prompt_lengths
        self.batch_size = len(ids)
        self._rows = [_Row(self.options, n) for n in counts]
        self._hist = [_History() for _ in ids]
        self._snaps = [[] for _ in ids]
        self._kv_start = [ok.index(True) if True in ok else len(ok) for ok in valid]
        self._length = 0
        return self._place(ids, valid, device, snapshot=False)

    def feed(self, new_ids, attention_mask=None) -> TrackerUpdate:
        """Append n tokens per row (B, n); attention_mask (B, n) marks padding columns."""
        if self._rows is None:
            raise RuntimeError("StepTracker.feed called before start()")
        ids, valid, device = _rows_and_mask(new_ids, attention_mask, name="new_ids")
        if len(ids) != self.batch_size:
            raise ValueError(f"new_ids has {len(ids)} rows, the tracker has {self.batch_size}")
        return self._place(ids, valid, device)

    def _place_row(self, b, row, ok, base, out):
        """Place row b's columns row[j] at base + j (where ok[j]); write the per-token outputs into out
        (6 lists: seg id, seg start, think start, summary start, prev step (2))."""
        state = self._rows[b]
        seg, start, think, summ, prev0, prev1 = out
        for j in range(len(row)):
            if ok[j]:
                s = seg[j] = state.place(row[j], base + j)
                start[j], think[j], summ[j], (prev0[j], prev1[j]) = state.outputs(s)
        self._hist[b].extend(row, seg)

    def _place(self, ids, valid, device, snapshot=True) -> TrackerUpdate:
        n = len(ids[0]) if ids else 0
        base = self._length
        # per field, per row, per token: seg id, seg start, think start, summary start, prev step (2)
        fields = [[[-1] * n for _ in ids] for _ in range(6)]
        for b, (row, ok) in enumerate(zip(ids, valid)):
            if self._rows[b].count == 0:      # no token yet (a prompt in chunks may start with padding only)
                self._kv_start[b] = base + ok.index(True) if True in ok else base + n
            if snapshot:
                snaps = self._snaps[b]
                snaps.append((base, self._rows[b].save()))
                if len(snaps) > KEEP_SNAPSHOTS:
                    del snaps[0]
            self._place_row(b, row, ok, base, [f[b] for f in fields])
        self._length += n
        # one tensor (and one copy to the device) per call, each field a contiguous slice of it
        table = torch.tensor(fields, dtype=torch.long).reshape(6, len(ids), n).to(device)
        return TrackerUpdate(table[0], table[1], table[2], table[3], table[4:6].permute(1, 2, 0).contiguous(),
                             self.kinds, self.closed)

    # -- following the KV cache
    def truncate(self, length: int) -> None:
        """Roll every row back to its state after its first `length` columns, as if only those had
        been fed (the KV cache was cropped to `length` tokens: assisted and prompt-lookup decoding drop
        rejected candidates). Cheap when `length` lies in one of the last KEEP_SNAPSHOTS feeds."""
        if self._rows is None:
            raise RuntimeError("StepTracker.truncate called before start()")
        if isinstance(length, bool) or not isinstance(length, int) or not 0 <= length <= self._length:
            raise ValueError(f"length must be an int in [0, {self._length}] (the columns fed), got {length!r}")
        if length == self._length:
            return
        for b, (hist, snaps) in enumerate(zip(self._hist, self._snaps)):
            while snaps and snaps[-1][0] > length:
                snaps.pop()
            if snaps:
                pos, snap = snaps[-1]
                row = self._rows[b]
                row.load(snap)
            else:
                pos, row = 0, _Row(self.options, self._rows[b].n_prompt)
                self._rows[b] = row
            ids, segs = hist.columns(pos, length)
            hist.truncate(length)
            for j, (token, s) in enumerate(zip(ids, segs)):
                if s >= 0:
                    row.place(token, pos + j)
        self._length = length

    def select(self, index) -> None:
        """Rows in a new order: row i becomes the former row index[i] (repeats allowed, rows may be
        dropped), as Cache.reorder_cache (beam search), batch_select_indices and
        batch_repeat_interleave do to the KV cache's batch dimension."""
        if self._rows is None:
            raise RuntimeError("StepTracker.select called before start()")
        if isinstance(index, torch.Tensor):
            index = index.flatten().tolist()
        index = list(index)
        b = len(self._rows)
        if not index or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < b for i in index):
            raise ValueError(f"index must be a non-empty list of row indices in [0, {b}), got {index!r}")
        seen = set()
        rows, hists = [], []
        for i in index:
            if i in seen:
                rows.append(self._rows[i].clone())
                hists.append(self._hist[i].copy())
            else:
                seen.add(i)
                rows.append(self._rows[i])
                hists.append(self._hist[i])
        self._snaps = [list(self._snaps[i]) for i in index]
        self._kv_start = [self._kv_start[i] for i in index]
        self._rows, self._hist, self.batch_size = rows, hists, len(index)

    def follow(self, input_ids, attention_mask=None) -> list:
        """A whole sequence fed again, as a forward call without KV cache does: a row whose first
        `length` columns hold exactly the tokens and padding of a tracked row, followed only by real
        tokens, continues that row (a reordered row too: beam search without cache); any other row
        starts a new sequence whose prompt is all of its tokens. Afterwards length is the width of
        input_ids. Returns, per row, the index of the tracked row it continues or None."""
        ids, valid, device = _rows_and_mask(input_ids, attention_mask)
        width = len(ids[0]) if ids else 0
        n = self.length
        parents = [None] * len(ids)
        if self._rows is not None and width >= n:
            tracked = {}
            for r, hist in enumerate(self._hist):
                cols, segs = hist.columns()
                tracked.setdefault(tuple(t if s >= 0 else -1 for t, s in zip(cols, segs)), r)
            for b, (row, ok) in enumerate(zip(ids, valid)):
                if all(ok[n:]):
                    parents[b] = tracked.get(tuple(t if v else -1 for t, v in zip(row[:n], ok[:n])))
        if all(p is None for p in parents):
            self.start(ids, valid)
            return parents
        old_rows, old_hist, old_snaps = self._rows, self._hist, self._snaps
        seen = set()
        self._rows, self._hist, self._snaps, kv = [], [], [], []
        for b, (p, ok) in enumerate(zip(parents, valid)):
            if p is None:
                self._rows.append(_Row(self.options, sum(ok)))
                self._hist.append(_History())
                self._snaps.append([])
                kv.append(ok.index(True) if True in ok else len(ok))
                continue
            first = p not in seen
            seen.add(p)
            self._rows.append(old_rows[p] if first else old_rows[p].clone())
            self._hist.append(old_hist[p] if first else old_hist[p].copy())
            self._snaps.append((list(old_snaps[p]) + [(n, self._rows[-1].save())])[-KEEP_SNAPSHOTS:])
            kv.append(self._kv_start[p])
        self._kv_start, self.batch_size = kv, len(ids)
        for b, (p, row, ok) in enumerate(zip(parents, ids, valid)):
            base = 0 if p is None else n
            m = width - base
            self._place_row(b, row[base:], ok[base:], base, [[-1] * m for _ in range(6)])
        self._length = width
        return parents

    # -- reading
    @property
    def kinds(self) -> list:
        return [row.kinds for row in self._rows] if self._rows is not None else []

    @property
    def closed(self) -> list:
        return [row.closed for row in self._rows] if self._rows is not None else []

    @property
    def length(self) -> int:
        """Columns fed so far (prompt included)."""
        return self._length if self._rows is not None else 0

    @property
    def prompt_lengths(self) -> list:
        """Per row, the number of (non-padding) prompt tokens of its sequence."""
        return [row.n_prompt for row in self._rows] if self._rows is not None else []

    @property
    def seg_ids(self) -> torch.Tensor:
        """(B, length) seg ids of everything fed so far (CPU)."""
        if self._rows is None:
            raise RuntimeError("StepTracker.seg_ids read before start()")
        rows = [list(h.columns()[1]) for h in self._hist]
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), self._length)

    @property
    def ids(self) -> torch.Tensor:
        """(B, length) the token ids fed so far (CPU; padding columns hold what was fed there)."""
        if self._rows is None:
            raise RuntimeError("StepTracker.ids read before start()")
        rows = [list(h.columns()[0]) for h in self._hist]
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), self._length)

    @property
    def segment_start(self) -> torch.Tensor:
        """(B,) position where each row's current segment starts; -1 while it is the question."""
        return torch.tensor([row.seg_pos for row in self._rows], dtype=torch.long)

    def channel_starts(self) -> torch.Tensor:
        """(B, 2) as Segmentation.channel_starts of everything fed so far (length where absent)."""
        t = self._length
        return torch.tensor([[r.think_pos if r.think_pos >= 0 else t, r.summary_pos if r.summary_pos >= 0 else t]
                             for r in self._rows], dtype=torch.long).reshape(len(self._rows), 2)

    def kv_start(self) -> torch.Tensor:
        """(B,) leading padding columns of the prompt."""
        return torch.tensor(self._kv_start, dtype=torch.long)

    def segmentation(self) -> Segmentation:
        """Everything fed so far as a Segmentation (equal to segment() on the whole trace)."""
        if self._rows is None:
            raise RuntimeError("StepTracker.segmentation called before start()")
        return Segmentation(self.seg_ids, [list(k) for k in self.kinds], [list(c) for c in self.closed],
                            [list(row.closing) for row in self._rows])
