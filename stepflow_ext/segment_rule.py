"""The rule of design.md 2.1 for one row, one token at a time (the rule as implemented: segment.py's
module docstring).

`_Options`: the segmentation options, validated and resolved ("auto" -> per model family).
`_Row`: the per-row state machine behind segment() and StepTracker, so that offline analysis and
online generation give the same segments by construction; with O(1) snapshots (`save` / `load`)
and `clone` for the tracker's rollback and reordering. The input checks of segment() and
StepTracker (`_rows_and_mask`, `_prompt_lengths`).
"""
from __future__ import annotations

import copy
import operator

import torch

from .reference import QUESTION, STEP, SUMMARY
from .segment_result import _KIND_CODE, KIND_NAMES
from .segment_text import (WHITESPACE, _completes, _decoder, _Delimiter, _Detok, _keep, _only_whitespace, _Sentences,
                           markers_for)

STEP_RULES = ("sentence", "paragraph")


# --------------------------------------------------------------------------- options


def _id_set(name, ids):
    if isinstance(ids, torch.Tensor):
        ids = ids.flatten().tolist()
    if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
        raise ValueError(f"{name} must be a set or list of token ids, got {type(ids).__name__}")
    out = set()
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, int) or i < 0:
            raise ValueError(f"{name} must hold non-negative int token ids, got {i!r}")
        out.add(i)
    return frozenset(out)


class _Options:
    """The segmentation options of 2.1, validated and resolved ("auto" -> per model family)."""

    def __init__(self, tokenizer=None, boundary_token_ids=None, think_end_token_ids=None, step_delimiter="\n\n",
                 think_end="auto", think_start="auto", steps="auto", summary_steps=False, model=None):
        if not isinstance(step_delimiter, str) or not step_delimiter:
            raise ValueError(f"step_delimiter must be a non-empty string, got {step_delimiter!r}")
        if think_end != "auto" and (not isinstance(think_end, str) or not think_end):
            raise ValueError(f"think_end must be 'auto' or a non-empty string, got {think_end!r}")
        if think_start is not None and think_start != "auto" and (not isinstance(think_start, str) or not think_start):
            raise ValueError(f"think_start must be 'auto', None or a non-empty string, got {think_start!r}")
        if steps not in ("auto",) + STEP_RULES:
            raise ValueError(f"steps must be 'auto', 'sentence' or 'paragraph', got {steps!r}")
        if not isinstance(summary_steps, bool):
            raise ValueError(f"summary_steps must be a bool, got {summary_steps!r}")
        has_ids = boundary_token_ids is not None or think_end_token_ids is not None
        if tokenizer is not None and has_ids:
            raise ValueError("pass either tokenizer or boundary_token_ids/think_end_token_ids, not both")
        if tokenizer is None and not has_ids:
            raise ValueError("segmentation needs a tokenizer, or boundary_token_ids and think_end_token_ids")
        self.delimiter, self.summary_steps = step_delimiter, summary_steps
        self.text = tokenizer is not None
        self.delim = _Delimiter(step_delimiter)
        if self.text:
            self.decode = _decoder(tokenizer)
            auto = markers_for(tokenizer, model) if "auto" in (think_start, think_end) else None
            self.think_start = auto[0] if think_start == "auto" else think_start
            self.think_end = auto[1] if think_end == "auto" else think_end
            self.steps = "sentence" if steps == "auto" else steps
            self.boundary = self.end_ids = None
        else:
            if boundary_token_ids is None:
                raise ValueError("boundary_token_ids is required with think_end_token_ids "
                                 "(the token ids whose text contains the step delimiter)")
            if think_end_token_ids is None:
                raise ValueError("think_end_token_ids is required with boundary_token_ids; pass an empty "
                                 "set for a model without an end-of-thinking marker")
            if think_start not in ("auto", None):
                raise ValueError("think_start cannot be combined with boundary_token_ids/think_end_token_ids: "
                                 "with id sets the prompt is the question (pass a tokenizer to use markers)")
            if steps == "sentence":
                raise ValueError("steps='sentence' needs a tokenizer (it reads the text); "
                                 "boundary_token_ids/think_end_token_ids give paragraph steps")
            if think_end != "auto":
                raise ValueError("think_end (a string) cannot be combined with boundary_token_ids/"
                                 "think_end_token_ids: give the marker's ids in think_end_token_ids")
            if step_delimiter != "\n\n":
                raise ValueError("step_delimiter (a string) cannot be combined with boundary_token_ids/"
                                 "think_end_token_ids: give the delimiter's ids in boundary_token_ids")
            self.decode = None
            self.think_start, self.think_end, self.steps = None, None, "paragraph"
            self.boundary = _id_set("boundary_token_ids", boundary_token_ids)
            self.end_ids = _id_set("think_end_token_ids", think_end_token_ids)

    def describe(self) -> dict:
        """The resolved options (for reports)."""
        return dict(think_start=self.think_start, think_end=self.think_end, steps=self.steps,
                    summary_steps=self.summary_steps, step_delimiter=self.delimiter if self.text else None)


# --------------------------------------------------------------------------- the rule


_NO_PREV = (-1, -1)
_THINK = STEP   # phase codes reuse the kind codes: QUESTION, _THINK (thinking), SUMMARY


class _Row:
    """One row: places each token by the rule of 2.1, one token at a time, O(1) amortized."""

    def __init__(self, opts: _Options, n_prompt: int):
        self.o = opts
        self.n_prompt = n_prompt      # the first n_prompt tokens placed are the prompt
        self.count = 0                # tokens placed so far
        self.detok = _Detok(opts.decode) if opts.text else None
        self.kinds, self.closed = ["question"], [False]
        self.closing = [-1]           # per segment: position of the token that closed it (-1: none)
        self.first, self.last = [-1], [-1]   # per segment: first and last position (-1: none yet)
        self.phase = QUESTION
        self.pending = None           # kind of the segment the next token opens
        self.joinable = False         # the pending segment follows a delimiter: whitespace-only tokens join the
                                      # closed segment instead of opening it (text rule)
        self.think_pos = self.summary_pos = -1   # first token after the question / first summary token
        self.seg_pos = -1             # start of the current segment (-1 while it is the question)
        self.prev = _NO_PREV          # smi_prev_step of the token just placed
        self.tail = ""                # marker search: last len(marker) - 1 characters of the searched text
        self.dstate = ()              # delimiter search in the current segment's text: partial matches
        self.texted = False           # the current segment's text has a non-whitespace character (the
                                      # delimiter is searched from the first one on)
        self.sent = None              # _Sentences of the thinking text (sentence rule)
        self.recorded = 0             # N at the last sentence closure
        self.prompt_core = self.prompt_ws = ""   # think_start=None: end of the prompt text (rstripped, ws)
        self.prompt_last = None       # id sets: the prompt token that decides "thinking disabled"

    # -- snapshots (rollback of the tracker: StepTracker.truncate / select)
    def save(self) -> tuple:
        """The row's state as an immutable snapshot, O(1) in the length of the trace: the per-segment
        lists only grow, and only their last entry ever changes (closed / closing / last of the
        segment being placed), so the snapshot keeps their length and last entries; the decode
        window (at most WINDOW + MAX_HELD tokens) and the sentence counter are copied."""
        d, s = self.detok, self.sent
        return (_row_scalars(self), len(self.kinds), self.closed[-1], self.closing[-1], self.first[-1],
                self.last[-1], None if d is None else (tuple(d.window), d.read, d.prefix),
                None if s is None else _sentence_slots(s))

    def load(self, snap: tuple) -> None:
        """Put the row back to the state of `snap`, a save() of this row (or of the row it was cloned
        from) taken at a position at or before the current one."""
        scalars, n, closed, closing, first, last, detok, sent = snap
        for name, value in zip(_ROW_SCALARS, scalars):
            setattr(self, name, value)
        for lst in (self.kinds, self.closed, self.closing, self.first, self.last):
            del lst[n:]
        self.closed[-1], self.closing[-1], self.first[-1], self.last[-1] = closed, closing, first, last
        if detok is not None:
            d = self.detok
            d.window, d.read, d.prefix = list(detok[0]), detok[1], detok[2]
        if sent is None:
            self.sent = None
        else:
            self.sent = _Sentences.__new__(_Sentences)
            for name, value in zip(_Sentences.__slots__, sent):
                setattr(self.sent, name, value)

    def clone(self) -> "_Row":
        """An independent copy (beam search duplicates rows)."""
        new = copy.copy(self)
        new.kinds, new.closed, new.closing = list(self.kinds), list(self.closed), list(self.closing)
        new.first, new.last = list(self.first), list(self.last)
        if self.detok is not None:
            new.detok = copy.copy(self.detok)
            new.detok.window = list(self.detok.window)
        if self.sent is not None:
            new.sent = copy.copy(self.sent)
        return new

    # -- helpers
    def _open(self, kind: int, pos: int):
        self.kinds.append(KIND_NAMES[kind])
        self.closed.append(False)
        self.closing.append(-1)
        self.first.append(pos)
        self.last.append(pos)
        self.seg_pos, self.pending, self.dstate, self.joinable, self.texted = pos, None, (), False, False
        if self.think_pos < 0:
            self.think_pos = pos
        if kind == SUMMARY and self.summary_pos < 0:
            self.summary_pos = pos

    def _close(self, pos: int, joinable: bool = False):
        if not self.closed[-1]:
            self.closed[-1], self.closing[-1] = True, pos
        self.pending = _KIND_CODE[self.kinds[-1]]
        self.joinable = joinable

    def _start_thinking(self, prefix: str):
        self.phase = self.pending = _THINK
        if self.o.steps == "sentence":
            self.sent = _Sentences()
            self.sent.feed(prefix)

    def _disable_thinking(self):
        self.phase = self.pending = SUMMARY
        self.joinable = False

    def _end_prompt_question(self):
        """think_start=None: the first generated token ends the question (the prompt)."""
        o = self.o
        self.closed[0], self.closing[0] = True, self.last[0]
        self.tail = ""
        if o.text:
            disabled = self.prompt_core.endswith(o.think_end)
        else:
            disabled = self.prompt_last is not None and self.prompt_last in o.end_ids
        if disabled:
            self._disable_thinking()
        else:
            self._start_thinking("")

    def _question(self, token: int, piece, generated: bool, pos: int):
        o = self.o
        if o.think_start is None:     # the prompt is the question: keep what decides "thinking disabled"
            if not o.text:
                if self.count == 1 or token not in o.boundary:
                    self.prompt_last = token
                return
            stripped = piece.rstrip()
            if stripped:
                self.prompt_core = _keep(self.prompt_core + self.prompt_ws + stripped, len(o.think_end))
                self.prompt_ws = _keep(piece[len(stripped):], len(o.think_end))
            else:
                self.prompt_ws = _keep(self.prompt_ws + piece, len(o.think_end))
            return
        ts = o.think_start
        s = self.tail + piece
        i = s.find(ts, max(0, len(self.tail) - len(ts) + 1))
        if i < 0:
            self.tail = _keep(s, len(ts) - 1)
            return
        # think_start completes in this token: the question's last token.
        self.closed[0], self.closing[0] = True, pos
        rest = s[i + len(ts):]        # the text after the marker (inside this token's piece)
        if o.think_end in rest:
            self._disable_thinking()
        else:
            self.tail = _keep(rest, len(o.think_end) - 1)
            self._start_thinking(piece if generated else "")

    # -- the rule
    def place(self, token: int, pos: int) -> int:
        """Place the row's next token (at column `pos`); returns its segment id."""
        o = self.o
        generated = self.count >= self.n_prompt
        self.count += 1
        self.prev = _NO_PREV
        if self.phase == QUESTION and generated and o.think_start is None:
            self._end_prompt_question()
        phase = self.phase
        if phase == SUMMARY and not o.summary_steps:   # nothing is looked at any more
            if self.pending is not None:
                self._open(SUMMARY, pos)
            self.last[-1] = pos
            return len(self.kinds) - 1
        piece = self.detok.piece(token) if o.text else None
        if phase == QUESTION:
            if self.first[0] < 0:
                self.first[0] = pos
            self.last[0] = pos
            self._question(token, piece, generated, pos)
            return 0
        opened = self.pending is not None
        if opened and self.joinable and _only_whitespace(piece):
            # after a delimiter, whitespace joins the closed segment
            self.last[-1] = pos
            if phase == _THINK and self._ends_thinking(token, piece):
                self._disable_thinking()   # the closed step, which this token joined, is the last one
            return len(self.kinds) - 1
        if opened:
            self._open(self.pending, pos)
        self.last[-1] = pos
        if phase == _THINK:
            if self._ends_thinking(token, piece):   # the last token of the thinking
                self._close(pos)
                self._disable_thinking()
            elif o.steps == "sentence":
                sent = self.sent
                sent.feed(piece)
                if "." in piece:
                    n = sent.count()
                    if n > self.recorded:
                        self.recorded = n
                        self._close(pos)
            elif self._delimiter(token, piece):
                self._close(pos, joinable=o.text)
            if opened and len(self.kinds) >= 3 and self.kinds[-2] == "step" and not self.closed[-1]:
                self.prev = (self.first[-2], self.last[-2] + 1)
        elif self._delimiter(token, piece):   # a summary segment (summary_steps)
            self._close(pos, joinable=o.text)
        return len(self.kinds) - 1

    def _ends_thinking(self, token: int, piece) -> bool:
        o = self.o
        if not o.text:
            return token in o.end_ids
        ends = _completes(self.tail, piece, o.think_end)
        self.tail = _keep(self.tail + piece, len(o.think_end) - 1)
        return ends

    def _delimiter(self, token: int, piece) -> bool:
        o = self.o
        if not o.text:
            return token in o.boundary
        if not self.texted:   # a segment's delimiter search starts at its first non-whitespace character
            piece = piece.lstrip(WHITESPACE)
            if not piece:
                return False
            self.texted = True
        done, self.dstate = o.delim.scan(self.dstate, piece)
        return done

    # -- per-token outputs (after place)
    def outputs(self, seg: int):
        """(seg_start, think_start, summary_start, prev_step) of the token just placed in `seg`."""
        if seg == 0:
            return -1, -1, -1, _NO_PREV
        return self.seg_pos, self.think_pos, (self.summary_pos if self.kinds[seg] == "summary" else -1), self.prev


_ROW_SCALARS = ("n_prompt", "count", "phase", "pending", "joinable", "think_pos", "summary_pos", "seg_pos", "prev",
                "tail", "dstate", "texted", "recorded", "prompt_core", "prompt_ws", "prompt_last")
_row_scalars = operator.attrgetter(*_ROW_SCALARS)
_sentence_slots = operator.attrgetter(*_Sentences.__slots__)


# --------------------------------------------------------------------------- inputs


def _int_rows(name, x):
    """A (B, T) integer tensor or list of equal-length lists (a flat list is one row) -> lists."""
    if isinstance(x, torch.Tensor):
        if x.dtype.is_floating_point or x.dtype.is_complex:
            raise ValueError(f"{name} must hold integers, got {x.dtype}")
        if x.dim() == 1:
            x = x[None]
        if x.dim() != 2:
            raise ValueError(f"{name} must have shape (B, T), got {tuple(x.shape)}")
        return x.tolist(), x.device
    if not isinstance(x, (list, tuple)):
        raise ValueError(f"{name} must be a LongTensor (B, T) or a list of lists, got {type(x).__name__}")
    rows = [x] if x and all(isinstance(v, int) for v in x) else x
    for row in rows:
        if not isinstance(row, (list, tuple)) or not all(isinstance(v, int) for v in row):
            raise ValueError(f"{name} must be a (B, T) tensor or a list of lists of ints")
    if len({len(row) for row in rows}) > 1:
        raise ValueError(f"{name} rows must have equal length; pad them and pass attention_mask")
    return [list(row) for row in rows], torch.device("cpu")


def _rows_and_mask(input_ids, attention_mask, name="input_ids"):
    """-> (ids: list of B lists of T ints, valid: list of B lists of T bools, device of input_ids)."""
    if isinstance(input_ids, torch.Tensor) and input_ids.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer token ids, got {input_ids.dtype}")
    ids, device = _int_rows(name, input_ids)
    if attention_mask is None:
        valid = [[True] * len(row) for row in ids]
    else:
        mask, _ = _int_rows("attention_mask", attention_mask)
        if len(mask) != len(ids) or any(len(m) != len(r) for m, r in zip(mask, ids)):
            shape = (len(ids), len(ids[0]) if ids else 0)
            raise ValueError(f"attention_mask must have the shape of {name} {shape}")
        if any(v not in (0, 1) for m in mask for v in m):
            raise ValueError("attention_mask must hold 0/1 (or bool) values")
        valid = [[bool(v) for v in m] for m in mask]
    for row, ok in zip(ids, valid):
        if any(t < 0 for t, v in zip(row, ok) if v):
            raise ValueError(f"{name} has negative token ids at unmasked positions")
    return ids, valid, device


def _prompt_lengths(prompt_lengths, counts):
    b = len(counts)
    if isinstance(prompt_lengths, torch.Tensor):
        if prompt_lengths.dtype.is_floating_point or prompt_lengths.dtype == torch.bool:
            raise ValueError(f"prompt_lengths must be integers, got {prompt_lengths.dtype}")
        prompt_lengths = prompt_lengths.tolist() if prompt_lengths.dim() else int(prompt_lengths)
    if isinstance(prompt_lengths, int) and not isinstance(prompt_lengths, bool):
        prompt_lengths = [prompt_lengths] * b
    if not isinstance(prompt_lengths, (list, tuple)) or len(prompt_lengths) != b:
        raise ValueError(f"prompt_lengths must be an int or one int per row ({b})")
    for row, (p, n) in enumerate(zip(prompt_lengths, counts)):
        if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p <= n:
            raise ValueError(f"prompt_lengths[{row}] must be an int in [0, {n}] (the row's non-padding "
                             f"tokens), got {p!r}")
    return list(prompt_lengths)
