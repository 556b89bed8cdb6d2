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

Incremental detokenization (`_Detok`): piece(t) is read from one decode per token over a bounded
window of the row's recent tokens (segment_text.py's docstring: the window, the hold-back of
incomplete UTF-8 characters, the decoders covered).

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

import torch

from .reference import QUESTION, STEP, SUMMARY  # noqa: F401  (importable from here as before)

# The machinery lives in four modules, lowest first; every name is importable from here as before.
# segment_result: the result type.
from .segment_result import _KIND_CODE, KIND_NAMES, Segmentation, _check_kinds_row, _default_closed  # noqa: F401
# segment_text: markers, tokenizer adapters, incremental detokenization, delimiter, sentence counter.
from .segment_text import (BLANK_GAP, CONTEXT, HARMONY_MARKERS, MAX_HELD, MIN_SENTENCE_CHARS,  # noqa: F401
                           THINK_MARKERS, WHITESPACE, WINDOW, _accepts, _completes, _decoder, _Delimiter, _Detok,
                           _has_token, _keep, _MAX_BACK, _only_whitespace, _Sentences, markers_for, sentence_count)
# segment_rule: options, the per-row rule, input checks.
from .segment_rule import (_NO_PREV, _ROW_SCALARS, _THINK, STEP_RULES, _id_set, _int_rows,  # noqa: F401
                           _Options, _prompt_lengths, _Row, _row_scalars, _rows_and_mask, _sentence_slots)
# segment_tracker: the online form.
from .segment_tracker import _CHUNK, KEEP_SNAPSHOTS, StepTracker, TrackerUpdate, _History  # noqa: F401


# --------------------------------------------------------------------------- markers


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


# --------------------------------------------------------------------------- offline form


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
