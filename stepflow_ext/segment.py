"""Segmentation of a reasoning trace into question, thinking steps and summary (design.md 2.1).

Entry points (one per-row state machine, `_Row`, behind all of them, so that offline analysis
and online generation give the same segments by construction):

- `Segmentation`: the result: seg ids (B, T) with -1 on padding, per-row segment kinds and
  per-row `closed` flags, plus the vectorized views the kernels need (`seg_start`,
  `channels`, `channel_starts`, `smi_prev_step`). `Segmentation.from_lengths` builds one by hand.
- `segment(input_ids, prompt_lengths, tokenizer=...)`: the rule of 2.1 on whole traces.
- `StepTracker`: the same rule fed token by token (or chunk by chunk) during generation;
  `start()` places the prompt, `feed()` the generated tokens, each returns a `TrackerUpdate`.
- `markers_for(tokenizer, model)`: the per-family default markers ("auto").
- `id_sets_for(tokenizer)`: the id fast path's sets derived from a tokenizer (ValueError where the
  delimiter or think_end is not one token).

Options (the same names in segment(), StepTracker and replace_attention):
  think_start="auto" | str | None, think_end="auto" | str, steps="auto" | "sentence" |
  "paragraph", summary_steps=False, step_delimiter="\\n\\n" (a blank line, below); or the id fast
  path boundary_token_ids + think_end_token_ids (then: no think_start, paragraph steps). With a
  tokenizer the text rule is always used: the fast path is exact for no real vocabulary.
  "auto" markers: harmony ("<|channel|>analysis<|message|>", "<|channel|>final<|message|>")
  when the model is GPT-OSS or the vocabulary has "<|channel|>", else "<think>", "</think>".
  steps="auto" is "sentence" (the paper's) with a tokenizer and "paragraph" with id sets.

The rule (design.md 2.1), as implemented. piece(t) is the text token t adds to the decoded text
of its row (incremental detokenization from the row's first valid token, below). A string s
"completes in x_t" when an occurrence of s in the searched text ends inside piece(t).
- Question: with think_start set, tokens 0..t_s, where t_s is the first token in which
  think_start completes, searched in the whole row text from token 0 (the prompt included). If it
  never completes, every token is question. With think_start=None: the prompt tokens.
- Thinking: the tokens after the question up to and including t_e, the token in which think_end
  completes, searched only in the text after the think_start occurrence (the characters of
  piece(t_s) after the marker included; with think_start=None: the text after the prompt).
  t_e is the last token of the thinking: it ends the last step (if a step had just closed it is a
  1-token step) and that step is closed. If think_end completes inside piece(t_s) itself, or
  (think_start=None) the prompt text ends with think_end once trailing whitespace is stripped,
  the thinking is empty ("disabled") and the tokens after the question are summary.
- Steps, rule "sentence": text_t = piece(t_s) if t_s is a generated token (else "") followed by
  the pieces of the thinking tokens up to x_t. A step closes at x_t (t < t_e) when piece(t)
  contains "." and N(text_t) exceeds the N recorded at the last closure (0 at first); that N is
  recorded. N(text) = number of pieces of re.split(r"\\.\\s+", text) that count: stripped, at least
  15 characters, not only digits once ".", ",", "-", " " are removed, not a table row (starts
  with "|", more than twice as many "|" as "\\n"), not a rule line (starts with "|--" or "---",
  shorter than 20). `_Sentences` computes N incrementally (see its docstring for the proof).
- Steps, rule "paragraph": a step closes at the token in which the delimiter completes, searched in
  the text of the step's own tokens from its first character that is not ASCII whitespace (a blank
  line at the start of the thinking, e.g. right after "<think>", ends nothing). The delimiter is
  step_delimiter where between two consecutive "\\n" any run of spaces, tabs and "\\r" may stand:
  the default "\\n\\n" is a blank line ("\\n\\n", "\\n  \\n", "\\r\\n\\r\\n", "\\n\\t\\n"). While the next
  step is pending (the token after a closing token), a token whose piece is non-empty and only
  ASCII whitespace (space, \\t, \\n, \\r, \\v, \\f) joins the closed step instead of opening the next
  one; the first other token opens it. So a run of blank lines is one boundary, whatever the
  tokenizer makes of it ("\\n\\n\\n" as one token or three <0x0A> byte tokens).
- Summary: every token after t_e: one segment, or with summary_steps=True segments split like
  paragraph steps (the same delimiter, searched from the segment's first non-whitespace character,
  whitespace-only tokens after it joining the closed segment).
- The token after a closing token starts the next segment; a closure at the last token of a trace
  opens nothing. `closed[s]` records whether segment s was closed by one of its own tokens
  (think_start for the question, a sentence end / delimiter / think_end for a step, a delimiter for
  a summary segment) and `closing[s]` which one: its last token, except after a delimiter, where
  whitespace-only tokens joined it; with think_start=None the question is closed (by its last
  token) when the first generated token arrives.
- Id sets: "completes in x_t" means x_t is in the set: boundary_token_ids for the step (and summary)
  delimiter, think_end_token_ids for the end of thinking; the prompt is the question, and the
  thinking is disabled when the last prompt token that is not a boundary token (or the first
  prompt token) is a think_end token.

Incremental detokenization (`_Detok`). piece(t) is the text that x_t fixes: the characters of
decode(window + x_t) past those already emitted, where the window holds the recent tokens of the
row. The window starts at the row's first valid token, or at least CONTEXT tokens before the first
token whose bytes are not all emitted yet (the read offset); it restarts there when it grows past
WINDOW tokens, moving its start back (at most 3 tokens) while its text starts with U+FFFD, so that
it never starts inside a UTF-8 character. This matters: byte fallback (Llama-2, Mistral) decodes
each run of byte tokens as a whole, and a run cut inside a character turns into U+FFFD — with
"\\n" itself a byte token (<0x0A>) there, a blank line after such a character would vanish.
One decode per token suffices: the previous decode gives the text without x_t, over the same
window start. Decoders covered (and tested on real vocabularies): byte-level BPE (Qwen2,
DeepSeek, Llama-3 as tokenizers or tiktoken: the UTF-8 decoding of the concatenated bytes),
SentencePiece through Hugging Face (Metaspace, byte fallback, a strip of one leading space: the
only position-dependent effect is at the window start, which both decodes share) and
SentencePiece's own decode. A token that ends inside a multi-byte character decodes to a text
ending in U+FFFD: its piece is the complete characters before that (often ""), and the rest of its
bytes are emitted with the token that completes the character (the hold-back of vLLM / TGI
streaming). After MAX_HELD tokens without a complete character (invalid bytes) the text is
emitted as is, so the window and the cost per token stay bounded: T tokens cost O(T) decodes of
<= WINDOW + MAX_HELD tokens. In the summary with summary_steps=False nothing is decoded any more.
Any tokenizer object works whose decode(ids) returns the text (a tokenizers.Tokenizer, a Hugging
Face tokenizer, a tiktoken.Encoding, a sentencepiece.SentencePieceProcessor): skip_special_tokens=
False is passed where decode takes it.

Documented edge behaviour (all follow from the rule above):
- Tokens place whole: a token whose piece holds text after the marker / delimiter / sentence end
  (".\\n\\nThe", "\\n\\n\\n", "</think>\\n\\n" as one token) stays whole in the part it closes; a
  character split over tokens can straddle a boundary (the token holding its first bytes is placed
  by the characters it completes).
- Paragraph rule: delimiter occurrences are searched in the current segment's text only, from its
  first non-whitespace character; tokens "\\n\\n\\n" then "\\n" close one step, and so do four "\\n"
  tokens (the 2nd closes, the 3rd and 4th join the closed step).
- A marker split over several tokens: its leading pieces are placed like any text (question or
  thinking; after a step closure they open a new step); the token that completes it closes.
- Only the first think_start counts; think_end is looked for only after it (an old
  "<|channel|>final<|message|>" earlier in a multi-turn prompt is not an end of thinking).
- The first think_end after think_start ends the thinking, wherever it stands: a "</think>" quoted
  inside the thinking (in code, or discussing the format) ends it there. A second thinking block
  after think_end ("<think>...</think>" again) is summary text.
- Paragraph rule: blank lines inside code blocks and LaTeX environments end steps like any other
  (the rule does not parse Markdown or LaTeX).
- The last thinking step is closed by think_end; while the thinking is still open its last step is
  open unless its last token closed it.
- A decimal point can close a step ("3." of "3.5" when "3." ends a token and the text before it
  makes a new counting piece), as in the paper's code. The sentence rule never splits text without
  ". " (Chinese "。" is not "."), as in the paper's code.
- Held-back tokens (only part of a UTF-8 character, piece "") close nothing and are placed in the
  segment open at that point (the next segment if a closure just happened).
- think_start=None: the prompt text "ends with think_end" is read after stripping trailing
  whitespace ("</think>\\n\\n" prompts of Qwen3 are caught); think_end inside the prompt elsewhere
  is not looked at.
"""
from __future__ import annotations

import copy
import operator
import os
from array import array
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .reference import QUESTION, STEP, SUMMARY

KIND_NAMES = ("question", "step", "summary")
_KIND_CODE = {name: code for code, name in enumerate(KIND_NAMES)}
assert (_KIND_CODE["question"], _KIND_CODE["step"], _KIND_CODE["summary"]) == (QUESTION, STEP, SUMMARY)

THINK_MARKERS = ("<think>", "</think>")
HARMONY_MARKERS = ("<|channel|>analysis<|message|>", "<|channel|>final<|message|>")
STEP_RULES = ("sentence", "paragraph")
MIN_SENTENCE_CHARS = 15   # the paper's min_chars

WHITESPACE = " \t\n\r\x0b\x0c"   # the paragraph rule's whitespace: ASCII only (never split over tokens)
BLANK_GAP = " \t\r"              # what may stand between two newlines of a blank line

CONTEXT = 3     # emitted tokens kept before the read offset when the decode window restarts
WINDOW = 8      # the window restarts when it grows past this many tokens
MAX_HELD = 16   # tokens held back waiting for a complete UTF-8 character
_MAX_BACK = 3   # a restarted window moves back at most this many tokens to a character start


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


# --------------------------------------------------------------------------- markers


def _has_token(tokenizer, token: str) -> bool:
    """Whether the tokenizer's vocabulary (added tokens included) has `token` as one token."""
    try:
        from tokenizers import Tokenizer
    except ImportError:  # pragma: no cover
        Tokenizer = ()
    backend = tokenizer if isinstance(tokenizer, Tokenizer) else getattr(tokenizer, "backend_tokenizer", None)
    if isinstance(backend, Tokenizer):
        return backend.token_to_id(token) is not None
    get_vocab = getattr(tokenizer, "get_vocab", None)
    if callable(get_vocab):
        return token in get_vocab()
    single = getattr(tokenizer, "encode_single_token", None)      # tiktoken.Encoding (GPT-OSS's o200k_harmony)
    if callable(single):
        try:
            single(token)
            return True
        except (KeyError, ValueError, TypeError):
            return False
    piece_to_id = getattr(tokenizer, "piece_to_id", None)         # sentencepiece.SentencePieceProcessor
    if callable(piece_to_id) and callable(getattr(tokenizer, "is_unknown", None)):
        return not tokenizer.is_unknown(piece_to_id(token))
    return False


def markers_for(tokenizer=None, model=None) -> tuple:
    """(think_start, think_end) of the model family (design.md 2.1, "auto").

    GPT-OSS (harmony format): ("<|channel|>analysis<|message|>", "<|channel|>final<|message|>"),
    chosen when model.config.model_type == "gpt_oss" or the tokenizer's vocabulary has
    "<|channel|>"; every other model (DeepSeek-R1-Distill, QwQ, Qwen3, ...): ("<think>", "</think>").
    """
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) == "gpt_oss":
        return HARMONY_MARKERS
    if tokenizer is not None and _has_token(tokenizer, "<|channel|>"):
        return HARMONY_MARKERS
    return THINK_MARKERS


def _vocab_size(tokenizer) -> int:
    """The number of token ids (added tokens included) of a tokenizers.Tokenizer, a Hugging Face
    tokenizer or a sentencepiece processor."""
    get_vocab = getattr(tokenizer, "get_vocab", None)
    if callable(get_vocab):
        try:
            vocab = get_vocab(with_added_tokens=True) if _accepts(get_vocab, "with_added_tokens") else get_vocab()
        except TypeError:
            vocab = get_vocab()
        return max(vocab.values(), default=-1) + 1
    for name in ("get_piece_size", "vocab_size", "get_vocab_size", "n_vocab"):
        size = getattr(tokenizer, name, None)
        if callable(size):
            return int(size())
        if isinstance(size, int):
            return size
    raise ValueError(f"cannot read the vocabulary of {type(tokenizer).__name__}: it needs get_vocab(), "
                     "get_vocab_size(), get_piece_size() or n_vocab")


def id_sets_for(tokenizer, think_end="auto", step_delimiter="\n\n", model=None) -> dict:
    """The id fast path of a tokenizer: {"boundary_token_ids": ..., "think_end_token_ids": ...}.

    boundary_token_ids: every token whose text alone holds the step delimiter (by default a blank
    line: "\n\n", ".\n\n", "\n\n\n", "\n  \n", ...); think_end_token_ids: every token whose text
    holds think_end ("auto": per model family, markers_for). Use as
    `segment(ids, prompt_lengths, **id_sets_for(tok))` or `replace_attention(model, cfg, **id_sets_for(tok))`.

    Raises ValueError when the delimiter or think_end is not one token of the vocabulary (Llama-2 and
    Mistral spell "\n\n" as two <0x0A> byte tokens; a base Qwen2 vocabulary has no "</think>"
    token; GPT-OSS's "<|channel|>final<|message|>" is three tokens): the fast path would never see it.

    Even where it is defined, the fast path only approximates the text rule (`tokenizer=`), which
    is what segment() and replace_attention use whenever a tokenizer is given: it has no
    think_start (the prompt is the question) and no sentence steps; it misses a delimiter or marker
    that forms across tokens (".\n" then "\n", which canonical Qwen2 / DeepSeek / Llama-3 encodings
    never produce but a model may generate); and a whitespace-only token after a blank line opens
    the next step instead of joining the closed one.
    """
    opts = _Options(tokenizer, step_delimiter=step_delimiter, think_end=think_end, think_start=None,
                    steps="paragraph", model=model)
    n = _vocab_size(tokenizer)
    batch = getattr(tokenizer, "decode_batch", None)
    if callable(batch) and _accepts(batch, "skip_special_tokens"):
        texts = batch([[i] for i in range(n)], skip_special_tokens=False)
    else:
        texts = [opts.decode([i]) for i in range(n)]
    delimiter, marker = opts.delimiter, opts.think_end
    for name, s in (("step_delimiter", delimiter), ("think_end", marker)):
        if s not in texts:
            raise ValueError(f"{name} {s!r} is not one token of this tokenizer, so the id fast path cannot see "
                             f"it: pass tokenizer= instead (the text rule)")
    boundary = frozenset(i for i, t in enumerate(texts) if opts.delim.scan((), t)[0])
    end_ids = frozenset(i for i, t in enumerate(texts) if marker in t)
    return {"boundary_token_ids": boundary, "think_end_token_ids": end_ids}


# --------------------------------------------------------------------------- options


def _decoder(tokenizer):
    """A function ids -> text that keeps special tokens (a marker may be one) and spacing."""
    try:
        from tokenizers import Tokenizer
    except ImportError:  # pragma: no cover
        Tokenizer = ()
    if isinstance(tokenizer, Tokenizer):
        return lambda ids: tokenizer.decode(ids, skip_special_tokens=False)
    decode = getattr(tokenizer, "decode", None)
    if not callable(decode):
        raise ValueError(f"tokenizer must have a decode method (a tokenizers.Tokenizer, a Hugging Face tokenizer, "
                         f"or any object whose decode(ids) returns the text), got {type(tokenizer).__name__}")
    if _accepts(decode, "skip_special_tokens"):
        if _accepts(decode, "clean_up_tokenization_spaces"):
            return lambda ids: decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return lambda ids: decode(ids, skip_special_tokens=False)
    return lambda ids: decode(list(ids))   # e.g. a sentencepiece.SentencePieceProcessor


def _accepts(fn, name: str) -> bool:
    """Whether fn takes the keyword argument `name` (or **kwargs); True when its signature is unknown."""
    import inspect

    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.name == name or p.kind is p.VAR_KEYWORD for p in params)


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


def _keep(s: str, n: int) -> str:
    """The last n characters of s ("" for n <= 0)."""
    return s[max(0, len(s) - n):] if n > 0 else ""


def _completes(tail: str, piece: str, s: str) -> bool:
    """s occurs in tail + piece, and that occurrence ends inside piece (not within tail)."""
    return (tail + piece).find(s, max(0, len(tail) - len(s) + 1)) >= 0


class _Delimiter:
    """step_delimiter as a pattern: its characters in order, where between two consecutive "\n" of it
    any run of spaces, tabs and "\r" may stand. The default "\n\n" is therefore a blank line: a
    newline, optional spaces/tabs/"\r", a newline. Matched incrementally (a set of partial-match
    lengths carried from piece to piece), so an occurrence split over any number of tokens is found
    in the token where it completes."""

    __slots__ = ("chars", "gap", "n")

    def __init__(self, delimiter: str):
        self.chars, self.n = delimiter, len(delimiter)
        # gap[i]: after the (i+1)-th character (a "\n" followed by another "\n"), BLANK_GAP may repeat
        self.gap = tuple(c == "\n" and delimiter[i + 1:i + 2] == "\n" for i, c in enumerate(delimiter))

    def scan(self, states: tuple, text: str):
        """-> (completes, states): whether an occurrence ends inside `text` given the partial matches
        `states` (lengths matched so far) before it, and the partial matches after it."""
        chars, gap, n = self.chars, self.gap, self.n
        if not states and chars[0] not in text:
            return False, states
        for c in text:
            new = {1} if c == chars[0] else set()
            for i in states:
                if chars[i] == c:
                    new.add(i + 1)
                if gap[i - 1] and c in BLANK_GAP:
                    new.add(i)
            if n in new:
                return True, ()
            states = tuple(new)
        return False, states


def _only_whitespace(piece: str) -> bool:
    return bool(piece) and not piece.strip(WHITESPACE)


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


class _Detok:
    """Incremental detokenization of one row: piece(t) for each token (module docstring)."""

    __slots__ = ("decode", "window", "read", "prefix")

    def __init__(self, decode):
        self.decode = decode
        self.window, self.read, self.prefix = [], 0, ""   # window[:read] is emitted and decodes to prefix

    def piece(self, token: int) -> str:
        window = self.window
        window.append(token)
        text = self.decode(window)
        prefix = self.prefix
        if text.endswith("\ufffd") and len(window) - self.read < MAX_HELD:
            # Ends inside a multi-byte character: emit the complete characters before it (if any are
            # new); the partial one comes with the token that completes it.
            stable = text.rstrip("\ufffd")
            if len(stable) > len(prefix) and stable.startswith(prefix):
                self.prefix = stable
                return stable[len(prefix):]
            return ""
        common = len(prefix) if text.startswith(prefix) else len(os.path.commonprefix([prefix, text]))
        if len(window) > WINDOW:  # restart the window at the last CONTEXT (emitted) tokens ...
            keep = CONTEXT
            text_now = self.decode(window[-keep:])
            while text_now.startswith("\ufffd") and keep < CONTEXT + _MAX_BACK:  # ... at a character start
                keep += 1
                text_now = self.decode(window[-keep:])
            del window[:len(window) - keep]
        else:
            text_now = text
        self.prefix, self.read = text_now, len(window)
        return text[common:]


class _Sentences:
    """N(text) of the sentence rule for a text that only grows, O(1) amortized per character.

    N(text) counts the pieces of re.split(r"\\.\\s+", text) that count (2.1). Why pieces before the
    last separator are final. re.split scans left to right; at each position it matches "." followed
    by at least one whitespace character, taking the whole whitespace run (greedy), and resumes
    after the match; else it moves one character on. Whether a match starts at position i depends
    only on text[i] and text[i+1]; where it ends depends on the whitespace run after it. Appending
    characters therefore changes nothing before the start of the last match (every decision there
    reads characters that already exist), keeps the last match's start, and can only extend its
    whitespace run when the text ends inside it. So text = (final pieces and separators) + tail,
    where tail is the text after the last match: appending c either extends the last separator (c
    whitespace, tail empty right after a match), or scans on inside the tail exactly as re.split
    would on tail alone (the regex has no look-behind). This class runs that scan one character at a
    time: `sep` (the text ends inside a separator), `dot` (the text ends with "." not yet known to
    start a separator: it belongs to the tail until a whitespace character follows), the count of
    counting final pieces, and for the tail the few running numbers that decide whether it counts
    (strip() and re's \\s are the same set of characters, str.isspace). Tested against re.split.
    """

    __slots__ = ("final", "sep", "dot", "started", "size", "ws", "ws_nl", "ws_bad", "bad", "digits", "pipes",
                 "newlines", "head")

    def __init__(self):
        self.final = 0        # counting pieces before the last separator
        self.sep = False
        self.dot = False
        self._new_piece()

    def _new_piece(self):
        self.started = False  # the piece has a non-whitespace character
        self.size = 0         # length of the stripped piece
        self.ws = 0           # whitespace characters after its last non-whitespace one ...
        self.ws_nl = 0        # ... of which "\n"
        self.ws_bad = 0       # ... of which not " "
        self.bad = 0          # characters of the stripped piece that are no digit and not . , - or " "
        self.digits = 0       # digits (str.isdigit) of the stripped piece
        self.pipes = 0        # "|" of the stripped piece
        self.newlines = 0     # "\n" of the stripped piece
        self.head = ""        # its first 3 characters from the first non-whitespace one

    def _add(self, c: str):
        if c.isspace():
            if self.started:
                self.ws += 1
                self.ws_nl += c == "\n"
                self.ws_bad += c != " "
                if len(self.head) < 3:
                    self.head += c
            return
        if self.started:
            self.size += self.ws + 1
            self.bad += self.ws_bad
            self.newlines += self.ws_nl
            self.ws = self.ws_nl = self.ws_bad = 0
        else:
            self.started, self.size = True, 1
        if len(self.head) < 3:
            self.head += c
        if c.isdigit():
            self.digits += 1
        elif c not in ".,-":
            self.bad += 1
            self.pipes += c == "|"

    def feed(self, text: str):
        for c in text:
            if self.sep:
                if c.isspace():
                    continue          # the separator's whitespace run goes on
                self.sep = False
            if self.dot:
                self.dot = False
                if c.isspace():       # "." + whitespace: a separator; the piece ends before the "."
                    self.final += self._counts(False)
                    self._new_piece()
                    self.sep = True
                    continue
                self._add(".")
            if c == ".":
                self.dot = True
            else:
                self._add(c)

    def count(self) -> int:
        """N of the text fed so far."""
        return self.final if self.sep else self.final + self._counts(self.dot)

    def _counts(self, dot: bool) -> int:
        """1 if the current piece (plus a "." when dot) counts, else 0."""
        size, bad, newlines, head = self.size, self.bad, self.newlines, self.head
        if dot:
            if self.started:
                size, bad, newlines = size + self.ws + 1, bad + self.ws_bad, newlines + self.ws_nl
            else:
                size = 1
            if len(head) < 3:
                head += "."
        if size < MIN_SENTENCE_CHARS:
            return 0
        if self.digits and not bad:                                   # only digits once . , - " " go
            return 0
        if head.startswith("|") and self.pipes > 2 * newlines:       # a table row
            return 0
        if (head.startswith("|--") or head.startswith("---")) and size < 20:   # a rule line
            return 0
        return 1


def sentence_count(text: str) -> int:
    """N(text) of the sentence rule, by re.split (the definition; `_Sentences` is its incremental form)."""
    import re

    n = 0
    for piece in re.split(r"\.\s+", text):
        piece = piece.strip()
        if len(piece) < MIN_SENTENCE_CHARS:
            continue
        if piece.replace(".", "").replace(",", "").replace("-", "").replace(" ", "").isdigit():
            continue
        if piece.startswith("|") and piece.count("|") > piece.count("\n") * 2:
            continue
        if piece.startswith(("|--", "---")) and len(piece) < 20:
            continue
        n += 1
    return n


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


def segment(input_ids, prompt_lengths, tokenizer=None, boundary_token_ids=None, think_end_token_ids=None,
            step_delimiter="\n\n", think_end="auto", attention_mask=None, *, think_start="auto", steps="auto",
            summary_steps=False, model=None) -> Segmentation:
    """Segment traces by the rule of design.md 2.1 (module docstring: the rule as implemented).

    input_ids: LongTensor (B, T) or list of equal-length lists (a flat list is one row).
    prompt_lengths: int or one int per row: the number of non-padding prompt tokens. The
        prompt of a row is its first prompt_lengths valid tokens (with left padding it starts
        after the padding); the rest of the valid tokens are generated. With think_start=None
        the prompt is the question; with a think_start marker it only decides whether the
        marker's token was generated (its piece then starts the sentence text).
    tokenizer (general case: the rule reads the decoded text) or boundary_token_ids and
        think_end_token_ids (fast path: single tokens that contain the delimiter / marker;
        pass think_end_token_ids=() for a model without marker). Exactly one of the two.
    think_start: "auto" (per model family, markers_for), a string, or None (the prompt is the
        question). think_end: "auto" or a string. steps: "auto" ("sentence" with a tokenizer,
        "paragraph" with id sets), "sentence" or "paragraph". summary_steps: split the summary at
        step_delimiter. model: optional hint for "auto" (model.config.model_type).
    attention_mask: optional (B, T) 0/1 in Hugging Face style (left or right padding);
        masked tokens get seg id -1 and are skipped by the rule.
    Returns a Segmentation on the device of input_ids (closed flags included).
    """
    opts = _Options(tokenizer, boundary_token_ids, think_end_token_ids, step_delimiter, think_end, think_start,
                    steps, summary_steps, model)
    ids, valid, device = _rows_and_mask(input_ids, attention_mask)
    prompts = _prompt_lengths(prompt_lengths, [sum(ok) for ok in valid])
    seg_rows, kinds, closed, closing = [], [], [], []
    for row, ok, p in zip(ids, valid, prompts):
        state = _Row(opts, p)
        out = [-1] * len(row)
        for i, (token, v) in enumerate(zip(row, ok)):
            if v:
                out[i] = state.place(token, i)
        seg_rows.append(out)
        kinds.append(state.kinds)
        closed.append(state.closed)
        closing.append(state.closing)
    seg_ids = torch.tensor(seg_rows, dtype=torch.long).reshape(len(ids), len(ids[0]) if ids else 0)
    return Segmentation(seg_ids.to(device), kinds, closed, closing)


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
