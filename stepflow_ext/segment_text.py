"""The text side of the segmentation rule (design.md 2.1; the rule itself: segment.py's docstring).

The per-family markers (`markers_for`), the tokenizer adapters (`_decoder`), the incremental
detokenizer of a row (`_Detok`), the step delimiter as an incremental pattern (`_Delimiter`) and the
incremental sentence counter of the `sentence` rule (`_Sentences`, with `sentence_count`, its
definition by re.split).

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
"""
from __future__ import annotations

import os

THINK_MARKERS = ("<think>", "</think>")
HARMONY_MARKERS = ("<|channel|>analysis<|message|>", "<|channel|>final<|message|>")
MIN_SENTENCE_CHARS = 15   # the paper's min_chars

WHITESPACE = " \t\n\r\x0b\x0c"   # the paragraph rule's whitespace: ASCII only (never split over tokens)
BLANK_GAP = " \t\r"              # what may stand between two newlines of a blank line

CONTEXT = 3     # emitted tokens kept before the read offset when the decode window restarts
WINDOW = 8      # the window restarts when it grows past this many tokens
MAX_HELD = 16   # tokens held back waiting for a complete UTF-8 character
_MAX_BACK = 3   # a restarted window moves back at most this many tokens to a character start


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


# --------------------------------------------------------------------------- tokenizers and text


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


# --------------------------------------------------------------------------- incremental detokenization and sentences


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
