"""Segmentation of a reasoning trace into question, thinking steps and summary (design.md 2.1).

Three entry points share one per-sequence state machine (`_Sequence`), so that offline
analysis and online generation give the same segments by construction:

- `Segmentation`: the result, seg ids (B, T) with -1 on padding and per-row segment kinds;
  `Segmentation.from_lengths` builds one by hand.
- `segment(input_ids, prompt_lengths, tokenizer=...)`: the rule of 2.1 on whole traces.
- `StepTracker`: the same rule fed token by token (or chunk by chunk) during generation.

How "the delimiter completes in x_t" is read (text rule). Every generated token t gets
piece(t), the text it adds to the decoded generation (incremental detokenization: decode a
window of recent tokens with and without x_t and take the difference). The current segment
keeps `tail`, the last len(string) - 1 characters of its text. A string s completes in x_t
when s occurs in tail + piece(t) ending inside piece(t). Any occurrence ending inside
piece(t) starts at most len(s) - 1 characters before piece(t), so the tail is all of the
segment text that can take part: the check is exact and O(1) per token.

Why the window decode is exact: the window starts at the first generated token, or at least
CONTEXT tokens before the first token whose text has not been emitted yet (the read offset);
it is restarted there when it grows past WINDOW tokens. One decode per token suffices: the
previous decode gives the text without x_t, over the same window start. For byte-level BPE
the decoded text is the UTF-8 decoding of the concatenated bytes, and bytes before the read
offset are complete characters (or stray bytes that already decoded to U+FFFD, which no later
byte changes), so decode(window + x_t) = decode(window) + piece(t). For SentencePiece-style
decoders (Metaspace, byte fallback) the only position-dependent effect is at the window start
(a stripped leading space), which both decodes share. A token that ends inside a multi-byte
character decodes to U+FFFD: its piece is "" and its bytes are emitted with the token that
completes the character (the same hold-back as vLLM / TGI streaming). After MAX_HELD tokens
without a complete character (invalid bytes) the text is emitted as is, so the window, and
the cost per token, stay bounded: segmenting T tokens costs O(T) decodes of <= WINDOW +
MAX_HELD tokens.

Documented edge behaviour (all follow from the rule of 2.1):
- "\\n\\n\\n": the delimiter completes at the second newline; the third newline is the first
  character of the next step ("\\n\\n\\n\\n" closes that next step at once, giving a step
  made of "\\n\\n"). A token that contains text after the delimiter (e.g. one token "\\n\\n\\n")
  stays whole in the step it closes: the rule places tokens, not characters.
- A marker split over several tokens: its pieces stay in the step, the token that completes
  it starts the summary. When a step was just closed, those pieces form a step of their own.
- The marker in the first generated token (or right after the prompt): no thinking step, the
  summary is segment 1. Only the first marker switches; later markers stay in the summary.
- The prompt ends in the marker (thinking disabled): the decoded prompt text, with trailing
  whitespace stripped, ends with `think_end` -> all generated tokens form one summary.
  With id sets: trailing prompt tokens that are boundary tokens are skipped, then the last
  prompt token must be a marker token ("</think>\\n\\n" prompts of Qwen3 are caught).
- With explicit id sets, the delimiter completes in x_t iff x_t is in boundary_token_ids (and
  the marker likewise). That equals the text rule when the delimiter / marker never forms
  across tokens in the trace; a "\\n" token followed by a "\\n" token is invisible to it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .reference import QUESTION, STEP, SUMMARY

KIND_NAMES = ("question", "step", "summary")
_KIND_CODE = {name: code for code, name in enumerate(KIND_NAMES)}
assert (_KIND_CODE["question"], _KIND_CODE["step"], _KIND_CODE["summary"]) == (QUESTION, STEP, SUMMARY)

CONTEXT = 3     # emitted tokens kept before the read offset when the decode window restarts
WINDOW = 8      # the window restarts when it grows past this many tokens
MAX_HELD = 16   # tokens held back waiting for a complete UTF-8 character


# --------------------------------------------------------------------------- Segmentation


def _check_kinds_row(row, kinds):
    """Kinds must read question step* summary?; returns them as names."""
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
        if names[i - 1] == "summary":
            raise ValueError(f"kinds[{row}][{i}] is {names[i]!r} after the summary: the summary is last")
    return names


@dataclass(eq=False, repr=False)
class Segmentation:
    """Segments of a batch of traces.

    seg_ids: LongTensor (B, T), the segment of each token, -1 on padding; along each row the
        valid ids never decrease (segments are contiguous and in order).
    kinds: per row, the kind of each segment: "question" (segment 0), then "step"s, then at
        most one "summary" (last). A segment may be empty (no token carries its id).
    """

    seg_ids: torch.Tensor
    kinds: list

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

    def seg_start(self) -> torch.Tensor:
        """(B, T) int64: the position where each token's segment starts; -1 for question tokens
        and padding. This is the seg_start input of the OEB op for a prefill."""
        ids = self.seg_ids
        b, t = ids.shape
        valid = ids >= 0
        slot = ids.clamp(min=0)
        pos = torch.arange(t, device=ids.device).expand(b, t)
        first = torch.full((b, max(self.num_segments, 1)), t, dtype=torch.long, device=ids.device)
        first = first.scatter_reduce(1, slot, torch.where(valid, pos, t), reduce="amin")
        kinds = self.seg_kinds_tensor(ids.device).gather(1, slot) if self.num_segments else slot
        rebalanced = valid & (kinds != QUESTION)
        return torch.where(rebalanced, first.gather(1, slot), torch.full_like(ids, -1))

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
        return Segmentation(self.seg_ids.to(device), [list(k) for k in self.kinds])

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_lengths(cls, lengths, kinds=None, pad="right", total_length=None, device=None):
        """Build from per-row segment lengths, e.g. [[5, 7, 3, 4]] (one row: 19 tokens).

        lengths: one list of non-negative ints per row (a flat list is one row); 0 is an
            empty segment. kinds: one list per row; default: "question" then "step"s (a
            summary is never guessed: pass it). pad: "right" or "left", the side where
            rows shorter than total_length (default: the longest row) get -1.
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
        return cls(ids.to(device) if device is not None else ids, [list(k) for k in kinds])

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


# --------------------------------------------------------------------------- the rule


def _decoder(tokenizer):
    """A function ids -> text that keeps special tokens (the marker may be one) and spacing."""
    try:
        from tokenizers import Tokenizer
    except ImportError:  # pragma: no cover
        Tokenizer = ()
    if isinstance(tokenizer, Tokenizer):
        return lambda ids: tokenizer.decode(ids, skip_special_tokens=False)
    if not callable(getattr(tokenizer, "decode", None)):
        raise ValueError(f"tokenizer must have a decode method (a tokenizers.Tokenizer or a Hugging Face "
                         f"tokenizer), got {type(tokenizer).__name__}")
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


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


def _completes(tail: str, piece: str, s: str) -> bool:
    """s occurs in tail + piece, and that occurrence ends inside piece (not within tail)."""
    return (tail + piece).find(s, max(0, len(tail) - len(s) + 1)) >= 0


class _Rule:
    """The options of 2.1: how to read whether the delimiter / marker completes in a token."""

    def __init__(self, tokenizer, boundary_token_ids, think_end_token_ids, step_delimiter, think_end):
        for name, s in (("step_delimiter", step_delimiter), ("think_end", think_end)):
            if not isinstance(s, str) or not s:
                raise ValueError(f"{name} must be a non-empty string, got {s!r}")
        self.delimiter, self.marker = step_delimiter, think_end
        has_ids = boundary_token_ids is not None or think_end_token_ids is not None
        if tokenizer is not None and has_ids:
            raise ValueError("pass either tokenizer or boundary_token_ids/think_end_token_ids, not both")
        if tokenizer is None and not has_ids:
            raise ValueError("segmentation needs a tokenizer, or boundary_token_ids and think_end_token_ids")
        if tokenizer is not None:
            self.decode = _decoder(tokenizer)
            self.boundary = self.think_end = None
        else:
            if boundary_token_ids is None:
                raise ValueError("boundary_token_ids is required with think_end_token_ids "
                                 "(the token ids whose text contains the step delimiter)")
            if think_end_token_ids is None:
                raise ValueError("think_end_token_ids is required with boundary_token_ids; pass an empty "
                                 "set for a model without an end-of-thinking marker")
            self.decode = None
            self.boundary = _id_set("boundary_token_ids", boundary_token_ids)
            self.think_end = _id_set("think_end_token_ids", think_end_token_ids)
        self.keep = max(len(step_delimiter), len(think_end)) - 1   # tail length that matters

    def prompt_ends_thinking(self, prompt: list) -> bool:
        if not prompt:
            return False
        if self.decode is None:
            i = len(prompt) - 1
            while i > 0 and prompt[i] in self.boundary:
                i -= 1
            return prompt[i] in self.think_end
        # Decode a growing suffix of the prompt until its text is longer than the marker plus
        # what a window start can spoil (a stripped leading space, up to 3 U+FFFD of a cut
        # character), or is the whole prompt.
        n = min(len(prompt), 8)
        while True:
            text = self.decode(prompt[-n:]).rstrip()
            if n == len(prompt) or len(text) >= len(self.marker) + 4:
                return text.endswith(self.marker)
            n = min(len(prompt), 2 * n)


class _Sequence:
    """One row: places each generated token by the rule of 2.1, one token at a time."""

    def __init__(self, rule: _Rule, prompt: list):
        self.rule = rule
        self.kinds = ["question"]
        self.start_pos = -1          # position of the current segment's first token (-1: question)
        # The next token starts a step, or the summary when thinking is disabled. Before it, the
        # current segment acts as an empty step, so a marker in the first token opens the summary.
        disabled = rule.prompt_ends_thinking(prompt)
        self.kind = SUMMARY if disabled else STEP
        self.pending = SUMMARY if disabled else STEP
        self.tail = ""
        self.window, self.read, self.prefix = [], 0, ""   # recent generated ids; window[:read] is
        # emitted and decodes to prefix

    def _piece(self, token: int) -> str:
        """Text that token adds to the decoded generation (incremental detokenization)."""
        window = self.window
        window.append(token)
        text = self.rule.decode(window)
        if text.endswith("\ufffd") and len(window) - self.read < MAX_HELD:
            return ""  # ends inside a multi-byte character: emit it with the token completing it
        prefix = self.prefix    # decode(window[:read]), kept from the previous call
        common = len(prefix) if text.startswith(prefix) else len(os.path.commonprefix([prefix, text]))
        if len(window) > WINDOW:  # restart the window at the last CONTEXT (emitted) tokens
            del window[:len(window) - CONTEXT]
            text_now = self.rule.decode(window)
        else:
            text_now = text
        self.prefix, self.read = text_now, len(window)
        return text[common:]

    def _start(self, kind: int, position: int):
        self.kinds.append(KIND_NAMES[kind])
        self.kind, self.pending, self.tail, self.start_pos = kind, None, "", position

    def place(self, token: int, position: int) -> int:
        """Place token (the next generated one, at `position`); returns its segment id."""
        rule = self.rule
        if self.kind == SUMMARY:   # nothing is looked at any more
            if self.pending is not None:
                self._start(SUMMARY, position)
            return len(self.kinds) - 1
        if rule.decode is None:
            marker, piece = token in rule.think_end, None
        else:
            piece = self._piece(token)
            marker = _completes(self.tail, piece, rule.marker)
        if marker:
            self._start(SUMMARY, position)
            return len(self.kinds) - 1
        if self.pending is not None:
            self._start(self.pending, position)
        if rule.decode is None:
            delimiter = token in rule.boundary
        else:
            delimiter = _completes(self.tail, piece, rule.delimiter)
            if rule.keep:
                self.tail = (self.tail + piece)[-rule.keep:]
        if delimiter:
            self.pending = STEP
        return len(self.kinds) - 1


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


def segment(input_ids, prompt_lengths, tokenizer=None, boundary_token_ids=None, think_end_token_ids=None,
            step_delimiter="\n\n", think_end="</think>", attention_mask=None) -> Segmentation:
    """Segment traces by the rule of design.md 2.1.

    input_ids: LongTensor (B, T) or list of equal-length lists (a flat list is one row).
    prompt_lengths: int or one int per row: the number of non-padding prompt tokens. The
        prompt of a row is its first prompt_lengths valid tokens (with left padding it starts
        after the padding); the rest of the valid tokens are generated.
    tokenizer (general case: the rule reads the decoded text) or boundary_token_ids and
        think_end_token_ids (fast path: single tokens that contain the delimiter / marker;
        pass think_end_token_ids=() for a model without marker). Exactly one of the two.
    attention_mask: optional (B, T) 0/1 in Hugging Face style (left or right padding);
        masked tokens get seg id -1 and are skipped by the rule.
    Returns a Segmentation on the device of input_ids.
    """
    rule = _Rule(tokenizer, boundary_token_ids, think_end_token_ids, step_delimiter, think_end)
    ids, valid, device = _rows_and_mask(input_ids, attention_mask)
    prompts = _prompt_lengths(prompt_lengths, [sum(ok) for ok in valid])
    seg_rows, kinds = [], []
    for row, ok, p in zip(ids, valid, prompts):
        positions = [i for i, v in enumerate(ok) if v]
        tokens = [row[i] for i in positions]
        seq = _Sequence(rule, tokens[:p])
        out = [-1] * len(row)
        for i in positions[:p]:
            out[i] = 0
        for i in positions[p:]:
            out[i] = seq.place(row[i], i)
        seg_rows.append(out)
        kinds.append(seq.kinds)
    seg_ids = torch.tensor(seg_rows, dtype=torch.long).reshape(len(ids), len(ids[0]) if ids else 0)
    return Segmentation(seg_ids.to(device), kinds)


# --------------------------------------------------------------------------- online form


class TrackerUpdate(NamedTuple):
    seg_ids: torch.Tensor    # (B, n) segment of each fed token, -1 where masked
    seg_start: torch.Tensor  # (B, n) position where its segment starts, -1 where masked
    kinds: list              # per row, the kinds so far (live lists: do not modify)


class StepTracker:
    """The rule of 2.1 online: feed generated token ids as they come, per batch row.

    tracker = StepTracker(batch_size, tokenizer=tok)
    tracker.start(prompt_ids, attention_mask)    # (B, P) prompt, left padding allowed
    upd = tracker.feed(next_ids[:, None])        # (B, n) new tokens -> seg ids, seg starts
    Positions count every column fed so far (padding included): they are key positions of the
    KV cache. Feeding a trace in any chunking gives exactly segment(...) on the whole trace.
    """

    def __init__(self, batch_size=None, tokenizer=None, boundary_token_ids=None, think_end_token_ids=None,
                 step_delimiter="\n\n", think_end="</think>"):
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                       or batch_size < 1):
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.batch_size = batch_size
        self.rule = _Rule(tokenizer, boundary_token_ids, think_end_token_ids, step_delimiter, think_end)
        self._rows = None

    def start(self, input_ids, attention_mask=None) -> torch.Tensor:
        """Start new sequences: the (non-padding) tokens of input_ids are the prompts. Returns
        their seg ids (B, T): 0, and -1 on padding. The batch size is that of input_ids: new sequences
        replace the old ones, so one tracker serves generate calls of any batch size in turn."""
        ids, valid, device = _rows_and_mask(input_ids, attention_mask)
        self.batch_size = len(ids)
        self._rows = [_Sequence(self.rule, [t for t, v in zip(row, ok) if v]) for row, ok in zip(ids, valid)]
        self._seg = [[0 if v else -1 for v in ok] for ok in valid]
        self._kv_start = [ok.index(True) if True in ok else len(ok) for ok in valid]
        self._length = len(ids[0]) if ids else 0
        return torch.tensor(self._seg, dtype=torch.long, device=device).reshape(len(ids), self._length)

    def feed(self, new_ids, attention_mask=None) -> TrackerUpdate:
        """Append n tokens per row (B, n); attention_mask (B, n) marks padding columns."""
        if self._rows is None:
            raise RuntimeError("StepTracker.feed called before start()")
        ids, valid, device = _rows_and_mask(new_ids, attention_mask, name="new_ids")
        if len(ids) != self.batch_size:
            raise ValueError(f"new_ids has {len(ids)} rows, the tracker has {self.batch_size}")
        n = len(ids[0])
        segs, starts = [], []
        for seq, history, row, ok in zip(self._rows, self._seg, ids, valid):
            seg, start = [-1] * n, [-1] * n
            for j in range(n):
                if ok[j]:
                    seg[j] = seq.place(row[j], self._length + j)
                    start[j] = seq.start_pos
            history.extend(seg)
            segs.append(seg)
            starts.append(start)
        self._length += n
        shape = (len(ids), n)
        return TrackerUpdate(torch.tensor(segs, dtype=torch.long, device=device).reshape(shape),
                             torch.tensor(starts, dtype=torch.long, device=device).reshape(shape), self.kinds)

    @property
    def kinds(self) -> list:
        return [row.kinds for row in self._rows] if self._rows is not None else []

    @property
    def length(self) -> int:
        """Columns fed so far (prompt included)."""
        return self._length if self._rows is not None else 0

    @property
    def seg_ids(self) -> torch.Tensor:
        """(B, length) seg ids of everything fed so far (CPU)."""
        if self._rows is None:
            raise RuntimeError("StepTracker.seg_ids read before start()")
        return torch.tensor(self._seg, dtype=torch.long).reshape(len(self._seg), self._length)

    @property
    def segment_start(self) -> torch.Tensor:
        """(B,) position where each row's current segment starts; -1 while it is the question."""
        return torch.tensor([row.start_pos for row in self._rows], dtype=torch.long)

    def kv_start(self) -> torch.Tensor:
        """(B,) leading padding columns of the prompt."""
        return torch.tensor(self._kv_start, dtype=torch.long)

    def segmentation(self) -> Segmentation:
        """Everything fed so far as a Segmentation (equal to segment() on the whole trace)."""
        return Segmentation(self.seg_ids, [list(k) for k in self.kinds])
