"""Segmentation (design.md 2.1) on real byte-level BPE tokenizers built with `tokenizers`.

Two tokenizers are trained on the same small corpus of reasoning traces:
- `tok_merged` (like Qwen2 / DeepSeek-R1): Qwen2's pre-tokenizer regex, so "\\n\\n" and ".\\n\\n"
  are single tokens, and "</think>" is an added special token;
- `tok_split`: every "\\n" is its own pre-token (so "\\n\\n" is two tokens) and "</think>" is
  not added, so it is split into several pieces ("</", "think", ">" or smaller).
The rule must give the same steps at character level with both (up to the characters of the
marker itself: pieces of a split marker stay in the step, see char_runs).
"""
from __future__ import annotations

import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

import stepflow_ext as sf
from conftest import random_seg_ids
from stepflow_ext.reference import QUESTION, STEP, SUMMARY, seg_start_from_seg_ids
from stepflow_ext.segment import MAX_HELD, WINDOW, Segmentation, StepTracker, segment

MARKER = "</think>"
PROMPT = "Question: what is two and three?\n<think>\n"
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _corpus():
    rng = random.Random(0)
    words = "so we need the sum of two and three then check it wait maybe answer is five think".split()

    def sentence():
        n = rng.randint(3, 9)
        return " ".join(rng.choice(words) for _ in range(n)).capitalize() + rng.choice([".", "?", "!", ""])

    def trace():
        steps = [" ".join(sentence() for _ in range(rng.randint(1, 3))) for _ in range(rng.randint(2, 5))]
        return f"Question: {sentence()}\n<think>\n" + "\n\n".join(steps) + f"\n{MARKER}\n\n" + sentence()

    return [trace() for _ in range(400)]


def _train(pre_tokenizer, vocab_size, special_tokens):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    return tok


@pytest.fixture(scope="module")
def tok_merged():
    tok = _train(pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), "isolated"),
                                          pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
                 500, [MARKER])
    assert [text(tok, [i]) for i in tok.encode("it.\n\nSo\n\nwe</think>").ids] == \
        ["it", ".\n\n", "So", "\n\n", "we", MARKER]
    return tok


@pytest.fixture(scope="module")
def tok_split():
    tok = _train(pre_tokenizers.Sequence([pre_tokenizers.Split("\n", "isolated"),
                                          pre_tokenizers.ByteLevel(add_prefix_space=False)]), 400, [])
    assert [text(tok, [i]) for i in tok.encode("it.\n\n").ids][-2:] == ["\n", "\n"]
    assert len(tok.encode(MARKER).ids) >= 3
    return tok


@pytest.fixture(scope="module")
def tokenizers_(tok_merged, tok_split):
    return {"merged": tok_merged, "split": tok_split}


def text(tok, ids):
    return tok.decode(ids, skip_special_tokens=False)


def ids_containing(tok, s):
    """Fast-path id set: every vocabulary token whose text contains s."""
    return {i for i in range(tok.get_vocab_size()) if s in text(tok, [i])}


def encode(tok, prompt, gen):
    p, g = tok.encode(prompt).ids, tok.encode(gen).ids
    return p, g


def run(tok, prompt, gen, **kw):
    p, g = encode(tok, prompt, gen)
    return segment([p + g], len(p), tokenizer=tok, **kw), p, g


def char_runs(tok, prompt, gen):
    """Segments of the generated text as (kind, first char, end char), from the token seg ids.

    The characters of the first marker are counted as summary: with a split marker the rule
    keeps its leading pieces in the step (design.md 2.1), with a single marker token they are
    summary. Segments left without characters are dropped.
    """
    seg, p, g = run(tok, prompt, gen)
    pieces = [text(tok, [i]) for i in g]
    assert "".join(pieces) == gen   # ASCII texts: every token decodes to whole characters
    kinds = seg.kinds[0]
    labels = [s for piece, s in zip(pieces, seg.seg_ids[0, len(p):].tolist()) for _ in piece]
    if "summary" in kinds:
        m = gen.find(MARKER)
        labels[m:m + len(MARKER)] = [kinds.index("summary")] * len(MARKER)
    runs = []
    for i, s in enumerate(labels):
        if runs and runs[-1][3] == s:
            runs[-1][2] = i + 1
        else:
            runs.append([kinds[s], i, i + 1, s])
    return [tuple(r[:3]) for r in runs]


def expected_runs(parts):
    """parts: list of (kind, text) -> (kind, start, end) char runs."""
    out, pos = [], 0
    for kind, s in parts:
        out.append((kind, pos, pos + len(s)))
        pos += len(s)
    return out


# --------------------------------------------------------------------------- the rule, text path

CASES = {
    # name: (generated text, expected parts, or None for a thinking-disabled prompt)
    "plain": ("So we add.\n\nCheck it\n\nwait</think>\n\nFive.\n\nDone",
              [("step", "So we add.\n\n"), ("step", "Check it\n\n"), ("step", "wait"),
               ("summary", "</think>\n\nFive.\n\nDone")]),
    "triple newline": ("a\n\n\nb.\n\n\n\nc",
                       [("step", "a\n\n"), ("step", "\nb.\n\n"), ("step", "\n\n"), ("step", "c")]),
    "empty thinking": ("\n\n</think>\n\nFive", [("step", "\n\n"), ("summary", "</think>\n\nFive")]),
    "marker first": ("</think>Five.\n\nx", [("summary", "</think>Five.\n\nx")]),
    "two markers": ("a.\n\n</think>b\n\n</think>c", [("step", "a.\n\n"), ("summary", "</think>b\n\n</think>c")]),
    "no marker": ("a.\n\nb", [("step", "a.\n\n"), ("step", "b")]),
    "ends with delimiter": ("a.\n\n", [("step", "a.\n\n")]),
    "marker mid-step": ("so we</think> five", [("step", "so we"), ("summary", "</think> five")]),
    "broken marker": ("a </thi nk>\n\n</think", [("step", "a </thi nk>\n\n"), ("step", "</think")]),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("which", ["merged", "split"])
def test_char_level_segments(tokenizers_, which, name):
    gen, parts = CASES[name]
    assert char_runs(tokenizers_[which], PROMPT, gen) == expected_runs(parts)


def test_split_marker_pieces_stay_in_step(tok_merged, tok_split):
    gen = "a.\n\n</think>b"
    seg, _, g = run(tok_merged, PROMPT, gen)
    assert seg.kinds == [["question", "step", "summary"]]
    seg, p, g = run(tok_split, PROMPT, gen)
    # "</", "think" open a step of their own after the delimiter; ">" opens the summary.
    assert seg.kinds == [["question", "step", "step", "summary"]]
    ids = seg.seg_ids[0, len(p):].tolist()
    gt = g.index(tok_split.token_to_id(">"))
    assert text(tok_split, [t for t, s in zip(g, ids) if s == 2]) == "</think"
    assert ids[gt:] == [3] * (len(g) - gt)


@pytest.mark.parametrize("which", ["merged", "split"])
@pytest.mark.parametrize("tail", ["</think>\n\n", "</think>", "</think>\n", "\n</think>  \n\n"])
def test_thinking_disabled_prompt(tokenizers_, which, tail):
    tok = tokenizers_[which]
    prompt = "Question: two?\n<think>\n\n" + tail
    seg, p, g = run(tok, prompt, "Five.\n\nSo\n\n</think>x")
    assert seg.kinds == [["question", "summary"]]
    assert seg.seg_ids[0].tolist() == [0] * len(p) + [1] * len(g)
    # Without generated tokens there is only the question.
    seg = segment([p], len(p), tokenizer=tok)
    assert seg.kinds == [["question"]] and seg.seg_ids.tolist() == [[0] * len(p)]


def test_thinking_disabled_prompt_long_tail(tok_split):
    # The marker far behind a long run of trailing whitespace: the prompt window grows to reach it.
    seg, p, g = run(tok_split, "Q?\n</think>" + "\n" * 40, "a.\n\nb")
    assert seg.kinds == [["question", "summary"]]
    seg, p, g = run(tok_split, "Q?\n</think>x" + "\n" * 40, "a.\n\nb")
    assert seg.kinds == [["question", "step", "step"]]


def test_no_generated_tokens_and_empty_prompt(tok_merged):
    p = tok_merged.encode(PROMPT).ids
    seg = segment([p], len(p), tokenizer=tok_merged)
    assert seg.kinds == [["question"]] and seg.num_segments == 1
    seg = segment([p], 0, tokenizer=tok_merged)   # empty question: everything is generated
    assert seg.kinds[0][0] == "question" and seg.seg_ids[0, 0] == 1


def test_unicode_pieces(tok_merged, tok_split):
    # Multi-byte characters split over byte tokens decode alone to U+FFFD; their text is emitted
    # with the token that completes them, so delimiters next to them are found.
    gen = "é\n\n🙂\n\n日本\n\n🙂</think>ü"
    for tok in (tok_merged, tok_split):
        seg, p, g = run(tok, PROMPT, gen)
        assert any("\ufffd" in text(tok, [i]) for i in g)
        assert seg.kinds == [["question", "step", "step", "step", "step", "summary"]]
        by_seg = {}
        for tid, s in zip(g, seg.seg_ids[0, len(p):].tolist()):
            by_seg.setdefault(s, []).append(tid)
        assert [text(tok, by_seg[s]) for s in sorted(by_seg)] == ["é\n\n", "🙂\n\n", "日本\n\n", "🙂", "</think>ü"] \
            if tok is tok_merged else ["é\n\n", "🙂\n\n", "日本\n\n", "🙂</think", ">ü"]


def test_invalid_bytes_do_not_stall(tok_split):
    # A stray continuation byte never completes a character: text is emitted after MAX_HELD tokens.
    byte_ids = [tok_split.token_to_id(c) for c in pre_tokenizers.ByteLevel.alphabet()]
    lone = [i for i in byte_ids if text(tok_split, [i]) == "\ufffd"][0]
    nl = tok_split.token_to_id("Ċ")
    a = tok_split.encode("a").ids
    g = [lone] * (MAX_HELD + 4) + [nl, nl] + a
    p = tok_split.encode(PROMPT).ids
    seg = segment([p + g], len(p), tokenizer=tok_split)
    assert seg.kinds == [["question", "step", "step"]] and seg.seg_ids[0, -1] == 2


def test_custom_strings(tok_split, tok_merged):
    for tok in (tok_split, tok_merged):
        seg, p, g = run(tok, "Q:", "a. b. c!! then ANSWER: five. six", step_delimiter=". ", think_end="ANSWER:")
        assert seg.kinds == [["question", "step", "step", "step", "summary"]]


def test_decode_window_is_bounded(tok_split):
    """Decode sees a bounded window of recent tokens, about once per token: O(T), not O(T^2)."""
    sizes = []

    class Counting:
        def decode(self, ids, **kw):
            sizes.append(len(ids))
            return tok_split.decode(ids, skip_special_tokens=False)

    gen = "".join(f"Step {i} so we check it.\n\n" for i in range(150)) + "So</think>five"
    p, g = encode(tok_split, PROMPT, gen)
    assert len(g) > 1500
    seg = segment([p + g], len(p), tokenizer=Counting())
    assert seg.num_steps(0) == 151 and seg.kinds[0][-1] == "summary"
    assert max(sizes) <= WINDOW + 1
    assert len(sizes) <= 1.2 * len(g) + 10
    assert torch.equal(seg.seg_ids, segment([p + g], len(p), tokenizer=tok_split).seg_ids)


def test_hf_tokenizer_wrapper(tok_merged):
    from transformers import PreTrainedTokenizerFast
    hf = PreTrainedTokenizerFast(tokenizer_object=tok_merged)
    gen = CASES["plain"][0] + " it .\n\n</think>x"
    p, g = encode(tok_merged, PROMPT, gen)
    a = segment(torch.tensor([p + g]), len(p), tokenizer=hf)
    b = segment(torch.tensor([p + g]), len(p), tokenizer=tok_merged)
    assert torch.equal(a.seg_ids, b.seg_ids) and a.kinds == b.kinds


# --------------------------------------------------------------------------- id-set fast path


def id_kwargs(tok):
    return dict(boundary_token_ids=ids_containing(tok, "\n\n"), think_end_token_ids={tok.token_to_id(MARKER)})


@pytest.mark.parametrize("name", sorted(CASES))
def test_id_sets_equal_text_rule(tok_merged, name):
    gen = CASES[name][0]
    p, g = encode(tok_merged, PROMPT, gen)
    by_text = segment([p + g], len(p), tokenizer=tok_merged)
    by_ids = segment([p + g], len(p), **id_kwargs(tok_merged))
    assert torch.equal(by_text.seg_ids, by_ids.seg_ids) and by_text.kinds == by_ids.kinds


def test_id_sets_thinking_disabled(tok_merged):
    kw = id_kwargs(tok_merged)
    for tail in ("</think>\n\n", "</think>"):
        p, g = encode(tok_merged, "Q?\n<think>\n\n" + tail, "Five.\n\nSix")
        assert segment([p + g], len(p), **kw).kinds == [["question", "summary"]]
    p, g = encode(tok_merged, PROMPT, "a.\n\nb</think>c")
    seg = segment([p + g], len(p), boundary_token_ids=kw["boundary_token_ids"], think_end_token_ids=())
    assert seg.kinds == [["question", "step", "step"]]


# --------------------------------------------------------------------------- batches and padding


def _batch(tok, gens, prompts=None, pad="left", pad_id=0):
    prompts = prompts or [PROMPT] * len(gens)
    rows = [encode(tok, p, g) for p, g in zip(prompts, gens)]
    width = max(len(p) + len(g) for p, g in rows)
    ids, mask = [], []
    for p, g in rows:
        n = width - len(p) - len(g)
        ids.append([pad_id] * n + p + g if pad == "left" else p + g + [pad_id] * n)
        mask.append([0] * n + [1] * (len(p) + len(g)) if pad == "left" else [1] * (len(p) + len(g)) + [0] * n)
    return torch.tensor(ids), torch.tensor(mask), rows


@pytest.mark.parametrize("pad", ["left", "right"])
def test_batch_with_padding(tok_split, pad):
    gens = [CASES[k][0] for k in ("plain", "empty thinking", "marker first", "triple newline")] + [""]
    prompts = [PROMPT, PROMPT, "Q?", PROMPT + "Hmm.\n\n", "Q?\n</think>\n\n"]
    ids, mask, rows = _batch(tok_split, gens, prompts, pad)
    seg = segment(ids, [len(p) for p, _ in rows], tokenizer=tok_split, attention_mask=mask)
    assert seg.seg_ids.shape == ids.shape
    assert bool(((seg.seg_ids == -1) == (mask == 0)).all())
    for row, (p, g) in enumerate(rows):
        alone = segment([p + g], len(p), tokenizer=tok_split)
        assert seg.seg_ids[row][mask[row].bool()].tolist() == alone.seg_ids[0].tolist()
        assert seg.kinds[row] == alone.kinds[0]
    n_pad = (mask == 0).sum(1)
    assert seg.kv_start().tolist() == (n_pad if pad == "left" else torch.zeros_like(n_pad)).tolist()
    assert torch.equal(seg.seg_start(), seg_start_from_seg_ids(seg.seg_ids, seg.seg_kinds_tensor()))


def test_prompt_lengths_tensor_and_padding_ids_ignored(tok_merged):
    ids, mask, rows = _batch(tok_merged, ["a.\n\nb", "c</think>d"])
    pl = torch.tensor([len(p) for p, _ in rows])
    a = segment(ids, pl, tokenizer=tok_merged, attention_mask=mask)
    nl = tok_merged.token_to_id("ĊĊ")
    b = segment(torch.where(mask.bool(), ids, nl), pl, tokenizer=tok_merged, attention_mask=mask.bool())
    assert torch.equal(a.seg_ids, b.seg_ids) and a.kinds == b.kinds


# --------------------------------------------------------------------------- Segmentation


def test_public_exports():
    assert sf.segment is segment and sf.Segmentation is Segmentation and sf.StepTracker is StepTracker
    assert {"segment", "Segmentation", "StepTracker"} <= set(sf.__all__)


def test_from_lengths_round_trip():
    seg = Segmentation.from_lengths([[5, 7, 0, 1, 4], [3, 2]], kinds=[["question", "step", "step", "step", "summary"],
                                                                      ["question", "step"]], pad="left")
    assert seg.seg_ids.shape == (2, 17)
    assert seg.lengths() == [[5, 7, 0, 1, 4], [3, 2]]
    assert seg.seg_ids[1].tolist() == [-1] * 12 + [0, 0, 0, 1, 1]
    assert seg.kv_start().tolist() == [0, 12]
    assert seg.num_segments == 5 and seg.num_steps(0) == 3
    assert seg.seg_kinds_tensor().tolist() == [[QUESTION, STEP, STEP, STEP, SUMMARY],
                                               [QUESTION, STEP, STEP, STEP, STEP]]
    assert seg.seg_start()[0].tolist() == [-1] * 5 + [5] * 7 + [12] + [13] * 4
    right = Segmentation.from_lengths([[2, 1]], total_length=5)
    assert right.seg_ids.tolist() == [[0, 0, 1, -1, -1]] and right.kinds == [["question", "step"]]
    assert Segmentation.from_lengths([2, 1]).seg_ids.tolist() == [[0, 0, 1]]
    again = Segmentation(seg.seg_ids, seg.kinds)
    assert again.lengths() == seg.lengths()
    r = repr(seg)
    assert "q5 s7 s0 s1 S4" in r and "q3 s2" in r
    assert seg.to("cpu").seg_ids.device.type == "cpu"


@pytest.mark.parametrize("pad", ["left", "right"])
def test_seg_start_matches_reference(seed, pad):
    for _ in range(5):
        seg_ids, seg_kinds, _ = random_seg_ids(4, 23, pad=pad)
        kinds = [[("question", "step", "summary")[k] for k in row[:int(ids.max()) + 1]]
                 for row, ids in zip(seg_kinds.tolist(), seg_ids)]
        seg = Segmentation(seg_ids, kinds)
        assert torch.equal(seg.seg_start(), seg_start_from_seg_ids(seg_ids, seg.seg_kinds_tensor()))
        valid = seg_ids >= 0
        assert seg.kv_start().tolist() == [int(v.nonzero()[0]) for v in valid]


BAD_SEGMENTATIONS = [
    (lambda: Segmentation([[0, 1]], [["question", "step"]]), "seg_ids"),
    (lambda: Segmentation(torch.zeros(2), [["question"]]), "seg_ids"),
    (lambda: Segmentation(torch.zeros(1, 2), [["question"]]), "seg_ids"),
    (lambda: Segmentation(torch.tensor([[0, -2]]), [["question"]]), "seg_ids"),
    (lambda: Segmentation(torch.tensor([[0, 2]]), [["question", "step"]]), "seg_ids"),
    (lambda: Segmentation(torch.tensor([[0, 1, 0]]), [["question", "step"]]), "non-decreasing"),
    (lambda: Segmentation(torch.tensor([[0, 1]]), [["question", "step"], ["question"]]), "kinds"),
    (lambda: Segmentation(torch.tensor([[0, 1]]), [["question", "thinking"]]), "kinds"),
    (lambda: Segmentation(torch.tensor([[0, 1]]), [["step", "step"]]), "kinds"),
    (lambda: Segmentation(torch.tensor([[0, 1]]), [["question", "step", "question"]]), "kinds"),
    (lambda: Segmentation(torch.tensor([[0, 1]]), [["question", "summary", "step"]]), "kinds"),
    (lambda: Segmentation(torch.tensor([[0, 1]]), [[]]), "kinds"),
    (lambda: Segmentation.from_lengths([[3, -1]]), "lengths"),
    (lambda: Segmentation.from_lengths([[3, 1.5]]), "lengths"),
    (lambda: Segmentation.from_lengths([[]]), "lengths"),
    (lambda: Segmentation.from_lengths("abc"), "lengths"),
    (lambda: Segmentation.from_lengths([[3, 1]], kinds=[["question"]]), "kinds"),
    (lambda: Segmentation.from_lengths([[3, 1]], kinds=[["question", "step"], ["question"]]), "kinds"),
    (lambda: Segmentation.from_lengths([[3, 1]], kinds=[["question", "answer"]]), "kinds"),
    (lambda: Segmentation.from_lengths([[3, 1]], pad="middle"), "pad"),
    (lambda: Segmentation.from_lengths([[3, 1]], total_length=3), "total_length"),
]


@pytest.mark.parametrize("i", range(len(BAD_SEGMENTATIONS)))
def test_bad_segmentations(i):
    make, name = BAD_SEGMENTATIONS[i]
    with pytest.raises(ValueError, match=name):
        make()


def test_bad_segment_inputs(tok_merged):
    ids = [[1, 2, 3, 4]]
    kw = id_kwargs(tok_merged)
    cases = [
        (dict(input_ids=ids, prompt_lengths=2), "tokenizer"),
        (dict(input_ids=ids, prompt_lengths=2, tokenizer=tok_merged, **kw), "not both"),
        (dict(input_ids=ids, prompt_lengths=2, boundary_token_ids={1}), "think_end_token_ids"),
        (dict(input_ids=ids, prompt_lengths=2, think_end_token_ids={1}), "boundary_token_ids"),
        (dict(input_ids=ids, prompt_lengths=2, boundary_token_ids={-1}, think_end_token_ids=()), "boundary_token_ids"),
        (dict(input_ids=ids, prompt_lengths=2, boundary_token_ids="\n\n", think_end_token_ids=()),
         "boundary_token_ids"),
        (dict(input_ids=ids, prompt_lengths=2, tokenizer=object()), "tokenizer"),
        (dict(input_ids=ids, prompt_lengths=5, tokenizer=tok_merged), "prompt_lengths"),
        (dict(input_ids=ids, prompt_lengths=-1, tokenizer=tok_merged), "prompt_lengths"),
        (dict(input_ids=ids, prompt_lengths=[1, 2], tokenizer=tok_merged), "prompt_lengths"),
        (dict(input_ids=ids, prompt_lengths=torch.tensor([1.0]), tokenizer=tok_merged), "prompt_lengths"),
        (dict(input_ids=ids, prompt_lengths=4, tokenizer=tok_merged, attention_mask=[[0, 1, 1, 1]]), "prompt_lengths"),
        (dict(input_ids=[[1, 2], [3]], prompt_lengths=1, tokenizer=tok_merged), "input_ids"),
        (dict(input_ids=torch.ones(1, 2, 2, dtype=torch.long), prompt_lengths=1, tokenizer=tok_merged), "input_ids"),
        (dict(input_ids=torch.ones(1, 3), prompt_lengths=1, tokenizer=tok_merged), "input_ids"),
        (dict(input_ids=[[1, -3]], prompt_lengths=1, tokenizer=tok_merged), "input_ids"),
        (dict(input_ids="abc", prompt_lengths=1, tokenizer=tok_merged), "input_ids"),
        (dict(input_ids=ids, prompt_lengths=1, tokenizer=tok_merged, attention_mask=[[1, 1]]), "attention_mask"),
        (dict(input_ids=ids, prompt_lengths=1, tokenizer=tok_merged, attention_mask=[[1, 2, 1, 1]]), "attention_mask"),
        (dict(input_ids=ids, prompt_lengths=1, tokenizer=tok_merged, step_delimiter=""), "step_delimiter"),
        (dict(input_ids=ids, prompt_lengths=1, tokenizer=tok_merged, think_end=None), "think_end"),
    ]
    for kwargs, name in cases:
        with pytest.raises(ValueError, match=name):
            segment(**kwargs)


# --------------------------------------------------------------------------- online tracker


def _chunks(n, mode, rng):
    if mode == "token":
        return [1] * n
    if mode == "whole":
        return [n]
    out = []
    while n > 0:
        out.append(min(n, rng.randint(1, 7)))
        n -= out[-1]
    return out


@pytest.mark.parametrize("mode", ["token", "random", "whole"])
@pytest.mark.parametrize("path", ["text", "ids"])
def test_tracker_matches_segment(tok_merged, tok_split, seed, mode, path):
    tok = tok_split if path == "text" else tok_merged
    kw = dict(tokenizer=tok) if path == "text" else id_kwargs(tok)
    gens = [CASES[k][0] for k in ("plain", "empty thinking", "marker first", "triple newline")]
    prompts = [PROMPT, PROMPT, "Q?", "Q?\n</think>\n\n"]
    rows = [encode(tok, p, g) for p, g in zip(prompts, gens)]
    width_p = max(len(p) for p, _ in rows)
    width_g = max(len(g) for _, g in rows)
    # HF-style batch: prompts left-padded; rows that finished early get masked columns.
    prompt_ids = torch.tensor([[0] * (width_p - len(p)) + p for p, _ in rows])
    prompt_mask = torch.tensor([[0] * (width_p - len(p)) + [1] * len(p) for p, _ in rows])
    gen_ids = torch.tensor([g + [0] * (width_g - len(g)) for _, g in rows])
    gen_mask = torch.tensor([[1] * len(g) + [0] * (width_g - len(g)) for _, g in rows])

    tracker = StepTracker(len(rows), **kw)
    first = tracker.start(prompt_ids, prompt_mask)
    assert first.tolist() == torch.where(prompt_mask.bool(), 0, -1).tolist()
    assert tracker.segment_start.tolist() == [-1] * len(rows)
    rng = random.Random(seed)
    col, seg_cols, start_cols = 0, [], []
    for n in _chunks(width_g, mode, rng):
        upd = tracker.feed(gen_ids[:, col:col + n], gen_mask[:, col:col + n])
        assert upd.seg_ids.shape == (len(rows), n) and upd.kinds is not None
        seg_cols.append(upd.seg_ids)
        start_cols.append(upd.seg_start)
        col += n
    full = segment(torch.cat([prompt_ids, gen_ids], 1), [len(p) for p, _ in rows],
                   attention_mask=torch.cat([prompt_mask, gen_mask], 1), **kw)
    online = tracker.segmentation()
    assert torch.equal(online.seg_ids, full.seg_ids) and online.kinds == full.kinds
    assert torch.equal(torch.cat(seg_cols, 1), full.seg_ids[:, width_p:])
    assert torch.equal(torch.cat(start_cols, 1), full.seg_start()[:, width_p:])
    assert tracker.kinds == full.kinds and tracker.length == width_p + width_g
    assert torch.equal(tracker.kv_start(), full.kv_start())
    last = [max(i for i in range(full.length) if full.seg_ids[r, i] >= 0) for r in range(len(rows))]
    assert tracker.segment_start.tolist() == [int(full.seg_start()[r, i]) for r, i in enumerate(last)]


def test_tracker_errors(tok_merged):
    tr = StepTracker(2, tokenizer=tok_merged)
    with pytest.raises(RuntimeError, match="start"):
        tr.feed(torch.zeros(2, 1, dtype=torch.long))
    tr.start(torch.zeros(3, 4, dtype=torch.long))  # new sequences may come in another batch size
    assert tr.batch_size == 3
    tr.start(torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="new_ids"):
        tr.feed(torch.zeros(3, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        tr.feed(torch.zeros(2, 2, dtype=torch.long), torch.ones(2, 3))
    with pytest.raises(ValueError, match="batch_size"):
        StepTracker(0, tokenizer=tok_merged)
    with pytest.raises(ValueError, match="tokenizer"):
        StepTracker(1)


# --------------------------------------------------------------------------- random texts

FRAGMENTS = ["a", " b", ".", "\n", "\n\n", MARKER, "</", "think", ">"]
texts = st.lists(st.sampled_from(FRAGMENTS), max_size=30).map("".join)
HYP = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@HYP
@given(gen=texts, prompt=st.sampled_from([PROMPT, "Q", "Q.\n\n", "Q</"]))
def test_random_texts_same_segments_for_both_tokenizers(tok_merged, tok_split, gen, prompt):
    assert char_runs(tok_merged, prompt, gen) == char_runs(tok_split, prompt, gen)


@HYP
@given(gen=texts)
def test_random_texts_id_sets_equal_text_rule(tok_merged, gen):
    p, g = encode(tok_merged, PROMPT, gen)
    by_text = segment([p + g], len(p), tokenizer=tok_merged)
    by_ids = segment([p + g], len(p), **id_kwargs(tok_merged))
    assert torch.equal(by_text.seg_ids, by_ids.seg_ids) and by_text.kinds == by_ids.kinds


@HYP
@given(gen=texts, cuts=st.lists(st.integers(1, 6), max_size=40))
def test_random_texts_tracker_any_chunking(tok_split, gen, cuts):
    p, g = encode(tok_split, PROMPT, gen)
    full = segment([p + g], len(p), tokenizer=tok_split)
    tr = StepTracker(1, tokenizer=tok_split)
    tr.start([p])
    col = 0
    for n in cuts + [len(g)]:
        if col >= len(g):
            break
        tr.feed([g[col:col + n]])
        col += n
    assert torch.equal(tr.seg_ids, full.seg_ids) and tr.kinds == full.kinds


# --------------------------------------------------------------------------- incremental detokenization


def _pieces(tok, ids):
    from stepflow_ext.segment import _Rule, _Sequence
    seq = _Sequence(_Rule(tok, None, None, "\n\n", MARKER), [])
    return [seq._piece(i) for i in ids]


@pytest.fixture(scope="module")
def tok_metaspace():
    """A SentencePiece-like tokenizer (Llama-2 style): decode strips the leading space of a window."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(_corpus(), trainers.BpeTrainer(vocab_size=300, show_progress=False))
    assert text(tok, tok.encode("so we").ids[1:]) == "we"   # the space of "▁we" is lost alone
    return tok


@pytest.mark.parametrize("which", ["merged", "split", "metaspace"])
def test_pieces_concatenate_to_decoded_text(tokenizers_, tok_metaspace, which):
    tok = tok_metaspace if which == "metaspace" else tokenizers_[which]
    for gen in ["So we add two and three.\n\nCheck it then" * 4, "é\n\n🙂 then 日本 wait\n\n🙂</think>ü five" * 4]:
        g = tok.encode(gen).ids
        pieces = _pieces(tok, g)
        assert "".join(pieces) == text(tok, g)
        assert not any("\ufffd" in piece for piece in pieces)


def test_metaspace_delimiter_with_space(tok_metaspace):
    # The delimiter ". " completes with the leading space of "▁then", which therefore closes the
    # step (the token completing the delimiter belongs to the step it closes).
    seg, p, g = run(tok_metaspace, "Question: two", "so we add. then check it. five", step_delimiter=". ")
    assert seg.kinds == [["question", "step", "step"]]
    assert [text(tok_metaspace, [t for t, s in zip(g, seg.seg_ids[0, len(p):].tolist()) if s == k])
            for k in (1, 2)] == ["so we add. then", "check it. five"]
