"""Segmentation (design.md 2.1): the Segmentation class and its kernel views, the options and
their validation, readable examples of the rule, the id fast path, batches with padding, the
online tracker, and the incremental detokenizer.

The rule itself is checked against an independent character-level implementation in
test_segment_rule.py; the sentence counter in test_segment_sentences.py; the tokenizers used
here are built in test_segment_tokenizers.py.
"""
from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
from tokenizers import pre_tokenizers

import stepflow_ext as sf
from conftest import random_seg_ids
from stepflow_ext.reference import (QUESTION, STEP, SUMMARY, channel_of_tokens, oeb_bounds, seg_start_from_seg_ids,
                                    smi_windows)
from stepflow_ext.segment import (HARMONY_MARKERS, MAX_HELD, THINK_MARKERS, WINDOW, Segmentation, StepTracker,
                                  TrackerUpdate, markers_for, segment)
from test_segment_tokenizers import STYLES, get_tokenizer


def text(tok, ids):
    return tok.decode(ids, skip_special_tokens=False)


def parts(tok, ids, seg, row=0):
    """[(kind, text)] of each segment of a row."""
    out = []
    ids_row = seg.seg_ids[row].tolist()
    for s, kind in enumerate(seg.kinds[row]):
        out.append((kind, text(tok, [t for t, i in zip(ids, ids_row) if i == s])))
    return out


def run(tok, prompt, gen, **kw):
    p, g = tok.encode(prompt).ids, tok.encode(gen).ids if gen else []
    return segment([p + g], len(p), tokenizer=tok, **kw), p + g, len(p)


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
    moved = seg.to("cpu")
    assert moved.seg_ids.device.type == "cpu" and moved.closed == seg.closed


def test_closed_default_and_explicit():
    seg = Segmentation.from_lengths([[5, 7, 0, 1, 0], [3, 0]], kinds=[["question", "step", "step", "step", "summary"],
                                                                      ["question", "step"]])
    # followed by a later non-empty segment -> closed; the last non-empty one and empty ones after it: open
    assert seg.closed == [[True, True, True, False, False], [False, False]]
    assert seg.closed_tensor().tolist() == [[True, True, True, False, False], [False, False, False, False, False]]
    seg = Segmentation.from_lengths([[2, 1, 1]], closed=[True, True, True])
    assert seg.closed == [[True, True, True]]
    seg = Segmentation(seg.seg_ids, seg.kinds, torch.tensor([[1, 0, 1, 1]]))    # (B, S') tensor, S' >= S
    assert seg.closed == [[True, False, True]]


def test_several_summary_segments():
    seg = Segmentation.from_lengths([[2, 3, 2, 2]], kinds=[["question", "step", "summary", "summary"]])
    assert seg.kinds == [["question", "step", "summary", "summary"]]
    assert seg.channels()[0].tolist() == [0, 0, 1, 1, 1, 2, 2, 2, 2]
    assert seg.channel_starts().tolist() == [[2, 5]]
    assert seg.seg_start()[0].tolist() == [-1, -1, 2, 2, 2, 5, 5, 7, 7]


def _random_segmentation(rng_seed, pad):
    gen = torch.Generator().manual_seed(rng_seed)
    seg_ids, seg_kinds, _ = random_seg_ids(5, 29, pad=pad, generator=gen)
    kinds = [[("question", "step", "summary")[k] for k in row[:int(ids.max()) + 1]]
             for row, ids in zip(seg_kinds.tolist(), seg_ids)]
    closed = [[bool(torch.randint(0, 2, (1,), generator=gen)) for _ in k] for k in kinds]
    return Segmentation(seg_ids, kinds, closed if rng_seed % 3 else None)


@pytest.mark.parametrize("pad", ["left", "right"])
def test_views_equal_reference_loops(seed, pad):
    """seg_start, channels, channel_starts (-> oeb_bounds 'bridge') and smi_prev_step (-> smi_windows),
    on hand-built segmentations with empty and 1-token segments."""
    for k in range(8):
        seg = _random_segmentation(seed + k, pad)
        kinds = seg.seg_kinds_tensor()
        assert torch.equal(seg.seg_start(), seg_start_from_seg_ids(seg.seg_ids, kinds))
        assert torch.equal(seg.channels(), channel_of_tokens(seg.seg_ids, kinds))
        valid = seg.seg_ids >= 0
        assert seg.kv_start().tolist() == [int(v.nonzero()[0]) for v in valid]
        starts = seg.channel_starts()
        ch = seg.channels()
        t = seg.length
        for b in range(seg.batch_size):
            pos = [i for i in range(t) if ch[b, i] >= 1]
            assert starts[b, 0] == (pos[0] if pos else t)
            pos = [i for i in range(t) if ch[b, i] == 2]
            assert starts[b, 1] == (pos[0] if pos else t)
        kv = seg.kv_start()
        bridge = torch.where((ch == 1)[..., None], torch.stack([kv[:, None].expand(-1, t), starts[:, :1].expand(-1, t)], -1),
                             torch.where((ch == 2)[..., None], starts[:, None, :].expand(-1, t, 2), -1))
        assert torch.equal(oeb_bounds(seg.seg_ids, kinds, "bridge"), bridge)
        prev = seg.smi_prev_step()
        for w in (1, 3, 4, 100):
            want = smi_windows(seg.seg_ids, kinds, seg.closing_tensor(), w)
            got = torch.where((prev[..., :1] >= 0), torch.stack([torch.maximum(prev[..., 0], prev[..., 1] - w),
                                                                 prev[..., 1]], -1), -1)
            assert torch.equal(got, want)


def test_smi_prev_step_example():
    # q2 s3 s1(closed: a 1-token step closed at its token) s2 s0 s1 S2
    seg = Segmentation.from_lengths([[2, 3, 1, 2, 0, 1, 2]], kinds=[["question"] + ["step"] * 5 + ["summary"]],
                                    closed=[True, True, True, True, False, False, False])
    prev = seg.smi_prev_step()[0].tolist()
    targets = {i: p for i, p in enumerate(prev) if p != [-1, -1]}
    # token 5 starts step 2 but closes it at once; token 6 starts step 3 (prev = step 2 = [5, 6));
    # the step after the empty step gets nothing; the summary never.
    assert targets == {6: [5, 6]}


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
    (lambda: Segmentation(torch.tensor([[0, 1]]), [["question", "step"]], [[True]]), "closed"),
    (lambda: Segmentation(torch.tensor([[0, 1]]), [["question", "step"]], [[True, "yes"]]), "closed"),
    (lambda: Segmentation(torch.tensor([[0, 1]]), [["question", "step"]], [[True, False], [True]]), "closed"),
    (lambda: Segmentation(torch.tensor([[0, 1]]), [["question", "step"]], torch.ones(1, 1)), "closed"),
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


# --------------------------------------------------------------------------- markers


def test_markers_for():
    assert markers_for() == THINK_MARKERS == ("<think>", "</think>")
    assert HARMONY_MARKERS == ("<|channel|>analysis<|message|>", "<|channel|>final<|message|>")
    for style in STYLES:
        assert markers_for(get_tokenizer(style, "added")) == THINK_MARKERS
        assert markers_for(get_tokenizer(style, "split")) == THINK_MARKERS
        assert markers_for(get_tokenizer(style, "harmony")) == HARMONY_MARKERS
    gpt_oss = SimpleNamespace(config=SimpleNamespace(model_type="gpt_oss"))
    qwen = SimpleNamespace(config=SimpleNamespace(model_type="qwen2"))
    assert markers_for(model=gpt_oss) == HARMONY_MARKERS
    assert markers_for(get_tokenizer("qwen2", "added"), model=gpt_oss) == HARMONY_MARKERS
    assert markers_for(get_tokenizer("qwen2", "harmony"), model=qwen) == HARMONY_MARKERS
    assert markers_for(model=qwen) == THINK_MARKERS


def test_markers_for_hf_tokenizer():
    from transformers import PreTrainedTokenizerFast
    assert markers_for(PreTrainedTokenizerFast(tokenizer_object=get_tokenizer("qwen2", "harmony"))) == HARMONY_MARKERS
    assert markers_for(PreTrainedTokenizerFast(tokenizer_object=get_tokenizer("qwen2", "added"))) == THINK_MARKERS

    class VocabOnly:
        def decode(self, ids, **kw):
            return ""

        def get_vocab(self):
            return {"<|channel|>": 5}
    assert markers_for(VocabOnly()) == HARMONY_MARKERS


def test_auto_resolves_per_family():
    harmony = get_tokenizer("qwen2", "harmony")
    gen = ("<|start|>user<|message|>Q?<|end|><|start|>assistant<|channel|>analysis<|message|>We need the sum of "
           "two numbers. So it is five.<|end|><|start|>assistant<|channel|>final<|message|>5")
    ids = harmony.encode(gen).ids
    seg = segment([ids], len(ids) - 30, tokenizer=harmony)
    assert seg.kinds == [["question", "step", "step", "summary"]]
    got = parts(harmony, ids, seg)
    assert got[0][1].endswith("<|channel|>analysis<|message|>")
    assert got[1][1] == "We need the sum of two numbers."
    assert got[2][1] == " So it is five.<|end|><|start|>assistant<|channel|>final<|message|>"
    assert got[3] == ("summary", "5")
    assert seg.closed == [[True, True, True, False]]
    # the same trace with explicit markers, and with the model hint on a <think> tokenizer
    explicit = segment([ids], len(ids) - 30, tokenizer=harmony, think_start=HARMONY_MARKERS[0],
                       think_end=HARMONY_MARKERS[1])
    assert torch.equal(explicit.seg_ids, seg.seg_ids)


# --------------------------------------------------------------------------- readable examples of the rule


@pytest.mark.parametrize("style", STYLES)
def test_sentence_rule_example(style):
    tok = get_tokenizer(style, "added")
    prompt = "User: what is two plus three?\nAssistant: <think>\n"
    gen = ("Okay, so we add the two numbers here. Short one. That gives exactly five in total. "
           "The answer should be 5.</think>\n\nThe answer is 5.")
    ids = tok.encode(prompt + gen).ids
    seg = segment([ids], len(tok.encode(prompt).ids), tokenizer=tok)
    got = parts(tok, ids, seg)
    assert [k for k, _ in got] == ["question", "step", "step", "step", "step", "summary"]
    assert "".join(t for _, t in got) == prompt + gen
    # "Short one." (10 characters) does not count: it stays with the next sentence. The last sentence
    # closes its step at "5.", so "</think>" forms a 1-token step (closed, like every step here).
    if style != "sentencepiece":    # (there, ". Sh" is one token: the step closes after "Sh")
        # the question ends with the marker's token; "\n" after it is the first thinking character
        assert [t for _, t in got] == [prompt[:-1], "\nOkay, so we add the two numbers here.",
                                       " Short one. That gives exactly five in total.", " The answer should be 5.",
                                       "</think>", "\n\nThe answer is 5."]
    assert seg.closed == [[True, True, True, True, True, False]]


def test_decimal_point_can_close_a_step():
    """As in the paper's code: "3." ends a token and the text before it is a new counting piece."""
    tok = get_tokenizer("bytelevel", "added")      # "3" and "." are separate tokens here
    seg, ids, p = run(tok, "<think>", "We add the numbers now and get 3.5 as the sum.</think>")
    got = [t for _, t in parts(tok, ids, seg)]
    assert got[1] == "We add the numbers now and get 3."
    assert got[2] == "5 as the sum.</think>"


@pytest.mark.parametrize("style", STYLES)
def test_paragraph_rule_examples(style):
    tok = get_tokenizer(style, "split")
    cases = {
        # generated text -> [(kind, text)] after the question, think_start=None, paragraph steps
        "So we add.\n\nCheck it\n\nwait</think>\n\nFive.\n\nDone":
            [("step", "So we add.\n\n"), ("step", "Check it\n\n"), ("step", "wait</think>"),
             ("summary", "\n\nFive.\n\nDone")],
        # whitespace after a blank line joins the closed step, however the tokenizer splits it
        "a\n\n\nb.\n\n\n\nc": [("step", "a\n\n\n"), ("step", "b.\n\n\n\n"), ("step", "c")],
        # a blank line may hold spaces, tabs and "\r"
        "a\n \nb\r\n\r\nc\n\t \nd. x \n\ny\n\n \n\n\t\nz": [
            ("step", "a\n \n"), ("step", "b\r\n\r\n"), ("step", "c\n\t \n"), ("step", "d. x \n\n"),
            ("step", "y\n\n \n\n\t\n"), ("step", "z")],
        "a\nb\n c\r\nd": [("step", "a\nb\n c\r\nd")],
        # a blank line before any text of the step ends nothing
        "\n\n</think>\n\nFive": [("step", "\n\n</think>"), ("summary", "\n\nFive")],
        "\n\n\nSo.\n\n": [("step", "\n\n\nSo.\n\n")],
        "</think>Five.\n\nx": [("step", "</think>"), ("summary", "Five.\n\nx")],
        "a.\n\n</think>b\n\n</think>c": [("step", "a.\n\n"), ("step", "</think>"), ("summary", "b\n\n</think>c")],
        "a.\n\nb": [("step", "a.\n\n"), ("step", "b")],
        "a.\n\n": [("step", "a.\n\n")],
        "so we</think>five": [("step", "so we</think>"), ("summary", "five")],
    }
    for gen, want in cases.items():
        seg, ids, p = run(tok, "Question: two?\n", gen, think_start=None, steps="paragraph")
        got = parts(tok, ids, seg)
        assert got[0] == ("question", "Question: two?\n")
        # character runs: a token is whole, so compare the texts of the segments
        assert got[1:] == want, gen


def test_summary_steps():
    tok = get_tokenizer("qwen2", "added")
    gen = "We add them.</think>\n\nFirst line.\n\nSecond line.\n\n\nThird"
    seg, ids, p = run(tok, "<think>", gen, summary_steps=True)
    got = parts(tok, ids, seg)
    assert [k for k, _ in got] == ["question", "step", "summary", "summary", "summary"]
    # the blank line right after "</think>" ends nothing; ".\n\n\n" is tokenized ".\n\n" + "\n": the third
    # newline joins the closed summary segment
    assert [t for _, t in got[2:]] == ["\n\nFirst line.\n\n", "Second line.\n\n\n", "Third"]
    assert seg.closed[0] == [True, True, True, True, False]
    seg1, _, _ = run(tok, "<think>", gen)
    assert seg1.kinds == [["question", "step", "summary"]]


def test_marker_in_prompt_or_generated():
    """R1-Distill puts "<think>\\n" in the prompt; Qwen3 generates "<think>". Same segments, except that a
    generated marker's piece starts the sentence text (here it makes the short first sentence count)."""
    tok = get_tokenizer("qwen2", "added")
    full = "Q: add 2 and 3.<think>Short one. Then we add them all. Done</think>5"
    ids = tok.encode(full).ids
    marker = next(t for t in range(len(ids)) if text(tok, ids[:t + 1]).endswith("<think>")) + 1
    in_prompt = segment([ids], marker, tokenizer=tok)
    generated = segment([ids], marker - 1, tokenizer=tok)
    assert [t for _, t in parts(tok, ids, in_prompt)] == ["Q: add 2 and 3.<think>", "Short one. Then we add them all.",
                                                          " Done</think>", "5"]
    # "<think>Short one" is 16 characters: it counts and closes at "."
    assert [t for _, t in parts(tok, ids, generated)] == ["Q: add 2 and 3.<think>", "Short one.",
                                                          " Then we add them all.", " Done</think>", "5"]


def test_markers_only_after_the_question_started():
    tok = get_tokenizer("qwen2", "harmony")
    # a multi-turn prompt with an old final channel, then the new analysis: not mislabeled as summary
    prompt = ("<|start|>assistant<|channel|>final<|message|>Old answer.<|end|><|start|>user<|message|>Next?<|end|>"
              "<|start|>assistant<|channel|>analysis<|message|>")
    seg, ids, p = run(tok, prompt, "We think about the new question now.")
    assert seg.kinds == [["question", "step"]]
    # only the first think_start counts; a second one is thinking text
    tok = get_tokenizer("qwen2", "added")
    seg, ids, p = run(tok, "Q <think>a</think> b <think>c</think> d", "")
    assert [t for _, t in parts(tok, ids, seg)] == ["Q <think>", "a</think>", " b <think>c</think> d"]


def test_prefilled_and_disabled_thinking_in_the_prompt():
    tok = get_tokenizer("qwen2", "added")
    # Qwen3 non-thinking: the prompt holds "<think>\n\n</think>\n\n": summary from there on
    seg, ids, p = run(tok, "Q?<think>\n\n</think>\n\n", "Five.")
    assert [(k, t) for k, t in parts(tok, ids, seg)] == [("question", "Q?<think>"), ("step", "\n\n</think>"),
                                                         ("summary", "\n\nFive.")]
    # prefilled thinking: its sentences count
    seg, ids, p = run(tok, "Q?<think>We already know that the value is 5. So", " we answer it</think>5")
    assert [t for _, t in parts(tok, ids, seg)] == ["Q?<think>", "We already know that the value is 5.",
                                                    " So we answer it</think>", "5"]
    # a fused "<think></think>" token ends the thinking inside the question's last token
    fused = get_tokenizer("qwen2", "fused")
    seg, ids, p = run(fused, "Q?<think></think>", "\n\nFive.")
    assert seg.kinds == [["question", "summary"]] and parts(fused, ids, seg)[1][1] == "\n\nFive."


@pytest.mark.parametrize("tail", ["</think>\n\n", "</think>", "</think>\n", "\n</think>  \n\n"])
@pytest.mark.parametrize("style", STYLES)
def test_think_start_none_disabled_prompt(style, tail):
    tok = get_tokenizer(style, "split")
    prompt = "Question: two?\n<think>\n\n" + tail
    seg, ids, p = run(tok, prompt, "Five.\n\nSo\n\n</think>x", think_start=None)
    assert seg.kinds == [["question", "summary"]]
    assert seg.seg_ids[0].tolist() == [0] * p + [1] * (len(ids) - p)
    seg = segment([ids[:p]], p, tokenizer=tok, think_start=None)     # no generated token: only the question
    assert seg.kinds == [["question"]] and seg.closed == [[False]]
    seg, ids, p = run(tok, "Q?\n</think>x" + "\n" * 40, "a.\n\nb", think_start=None, steps="paragraph")
    assert seg.kinds == [["question", "step", "step"]]


def test_unicode_pieces():
    """Characters split over byte tokens are placed with the token that completes them."""
    for style in STYLES:
        tok = get_tokenizer(style, "split")
        gen = "é\n\n🙂\n\n日本\n\n🙂</think>ü"
        seg, ids, p = run(tok, "<think>", gen, steps="paragraph")
        assert any("\ufffd" in text(tok, [i]) for i in ids)
        got = [t for _, t in parts(tok, ids, seg)]
        assert got == ["<think>", "é\n\n", "🙂\n\n", "日本\n\n", "🙂</think>", "ü"]


def test_invalid_bytes_do_not_stall():
    tok = get_tokenizer("bytelevel", "split")
    byte_ids = [tok.token_to_id(c) for c in pre_tokenizers.ByteLevel.alphabet()]
    lone = [i for i in byte_ids if text(tok, [i]) == "\ufffd"][0]
    nl = tok.token_to_id("Ċ")
    a = tok.encode("a").ids
    p = tok.encode("Q?").ids
    g = [lone] * (MAX_HELD + 4) + [nl, nl] + a
    seg = segment([p + g], len(p), tokenizer=tok, think_start=None, steps="paragraph")
    assert seg.kinds == [["question", "step", "step"]] and seg.seg_ids[0, -1] == 2


def test_custom_strings():
    for style in STYLES:
        tok = get_tokenizer(style, "split")
        seg, ids, p = run(tok, "Q:", "a. b. c!! then ANSWER: five. six", think_start=None, steps="paragraph",
                          step_delimiter=". ", think_end="ANSWER:")
        assert seg.kinds == [["question", "step", "step", "step", "summary"]]


def test_hf_tokenizer_wrapper():
    from transformers import PreTrainedTokenizerFast
    for style in STYLES:
        tok = get_tokenizer(style, "added")
        hf = PreTrainedTokenizerFast(tokenizer_object=tok)
        ids = tok.encode("Q <think>So we add 3.5 and 2 now. It is 5.5 overall. </think>\n\nx. y\n\nz").ids
        for kw in (dict(), dict(steps="paragraph", summary_steps=True), dict(think_start=None)):
            a = segment(torch.tensor([ids]), 3, tokenizer=hf, **kw)
            b = segment(torch.tensor([ids]), 3, tokenizer=tok, **kw)
            assert torch.equal(a.seg_ids, b.seg_ids) and a.kinds == b.kinds and a.closed == b.closed


# --------------------------------------------------------------------------- options and validation


def test_bad_segment_inputs():
    tok = get_tokenizer("qwen2", "added")
    ids = [[1, 2, 3, 4]]
    idk = dict(boundary_token_ids={1}, think_end_token_ids={2})
    cases = [
        (dict(input_ids=ids, prompt_lengths=2), "tokenizer"),
        (dict(input_ids=ids, prompt_lengths=2, tokenizer=tok, **idk), "not both"),
        (dict(input_ids=ids, prompt_lengths=2, boundary_token_ids={1}), "think_end_token_ids"),
        (dict(input_ids=ids, prompt_lengths=2, think_end_token_ids={1}), "boundary_token_ids"),
        (dict(input_ids=ids, prompt_lengths=2, boundary_token_ids={-1}, think_end_token_ids=()), "boundary_token_ids"),
        (dict(input_ids=ids, prompt_lengths=2, boundary_token_ids="\n\n", think_end_token_ids=()),
         "boundary_token_ids"),
        (dict(input_ids=ids, prompt_lengths=2, think_start="<think>", **idk), "think_start"),
        (dict(input_ids=ids, prompt_lengths=2, steps="sentence", **idk), "steps"),
        (dict(input_ids=ids, prompt_lengths=2, think_end="</think>", **idk), "think_end"),
        (dict(input_ids=ids, prompt_lengths=2, step_delimiter=". ", **idk), "step_delimiter"),
        (dict(input_ids=ids, prompt_lengths=2, tokenizer=object()), "tokenizer"),
        (dict(input_ids=ids, prompt_lengths=5, tokenizer=tok), "prompt_lengths"),
        (dict(input_ids=ids, prompt_lengths=-1, tokenizer=tok), "prompt_lengths"),
        (dict(input_ids=ids, prompt_lengths=[1, 2], tokenizer=tok), "prompt_lengths"),
        (dict(input_ids=ids, prompt_lengths=torch.tensor([1.0]), tokenizer=tok), "prompt_lengths"),
        (dict(input_ids=ids, prompt_lengths=4, tokenizer=tok, attention_mask=[[0, 1, 1, 1]]), "prompt_lengths"),
        (dict(input_ids=[[1, 2], [3]], prompt_lengths=1, tokenizer=tok), "input_ids"),
        (dict(input_ids=torch.ones(1, 2, 2, dtype=torch.long), prompt_lengths=1, tokenizer=tok), "input_ids"),
        (dict(input_ids=torch.ones(1, 3), prompt_lengths=1, tokenizer=tok), "input_ids"),
        (dict(input_ids=[[1, -3]], prompt_lengths=1, tokenizer=tok), "input_ids"),
        (dict(input_ids="abc", prompt_lengths=1, tokenizer=tok), "input_ids"),
        (dict(input_ids=ids, prompt_lengths=1, tokenizer=tok, attention_mask=[[1, 1]]), "attention_mask"),
        (dict(input_ids=ids, prompt_lengths=1, tokenizer=tok, attention_mask=[[1, 2, 1, 1]]), "attention_mask"),
        (dict(input_ids=ids, prompt_lengths=1, tokenizer=tok, step_delimiter=""), "step_delimiter"),
        (dict(input_ids=ids, prompt_lengths=1, tokenizer=tok, think_end=None), "think_end"),
        (dict(input_ids=ids, prompt_lengths=1, tokenizer=tok, think_end=""), "think_end"),
        (dict(input_ids=ids, prompt_lengths=1, tokenizer=tok, think_start=""), "think_start"),
        (dict(input_ids=ids, prompt_lengths=1, tokenizer=tok, think_start=3), "think_start"),
        (dict(input_ids=ids, prompt_lengths=1, tokenizer=tok, steps="sentences"), "steps"),
        (dict(input_ids=ids, prompt_lengths=1, tokenizer=tok, summary_steps="yes"), "summary_steps"),
    ]
    for kwargs, name in cases:
        with pytest.raises(ValueError, match=name):
            segment(**kwargs)


# --------------------------------------------------------------------------- id-set fast path


def ids_containing(tok, s):
    """Fast-path id set: every vocabulary token whose text contains s."""
    return {i for i in range(tok.get_vocab_size()) if s in text(tok, [i])}


def test_id_sets_equal_text_rule():
    """Where "\\n\\n" and "</think>" never form across tokens (Qwen2 style, added marker) and no
    whitespace-only token follows a delimiter (the text rule joins it to the closed step; the id sets
    cannot tell), the id sets give the text rule's paragraph segmentation with think_start=None."""
    tok = get_tokenizer("qwen2", "added")
    kw = dict(boundary_token_ids=ids_containing(tok, "\n\n"), think_end_token_ids={tok.token_to_id("</think>")})
    rng = random.Random(3)
    frags = ["So we add.", "\n\n", " it", ".\n\n", "</think>", "Five", " 3.5", "\n"]
    for _ in range(200):
        gen = "".join(rng.choice(frags) for _ in range(rng.randint(0, 12)))
        seg_ids = tok.encode("Q?\n<think>\n" + gen).ids
        p = len(tok.encode("Q?\n<think>\n").ids)
        # skip texts where "\n" tokens pair up into a delimiter the id sets cannot see
        if any(text(tok, [a]).endswith("\n") and text(tok, [b]).startswith("\n")
               for a, b in zip(seg_ids, seg_ids[1:])):
            continue
        # ... and texts where a whitespace-only token follows a delimiter
        if any(a in kw["boundary_token_ids"] and not text(tok, [b]).strip() for a, b in zip(seg_ids, seg_ids[1:])):
            continue
        for summary_steps in (False, True):
            by_text = segment([seg_ids], p, tokenizer=tok, think_start=None, steps="paragraph",
                              summary_steps=summary_steps)
            by_ids = segment([seg_ids], p, summary_steps=summary_steps, **kw)
            assert torch.equal(by_text.seg_ids, by_ids.seg_ids) and by_text.kinds == by_ids.kinds
            assert by_text.closed == by_ids.closed


def test_id_sets_thinking_disabled():
    tok = get_tokenizer("qwen2", "added")
    kw = dict(boundary_token_ids=ids_containing(tok, "\n\n"), think_end_token_ids={tok.token_to_id("</think>")})
    for tail in ("</think>\n\n", "</think>"):
        p, g = tok.encode("Q?\n<think>\n\n" + tail).ids, tok.encode("Five.\n\nSix").ids
        assert segment([p + g], len(p), **kw).kinds == [["question", "summary"]]
    p, g = tok.encode("Q?\n<think>\n").ids, tok.encode("a.\n\nb</think>c").ids
    seg = segment([p + g], len(p), boundary_token_ids=kw["boundary_token_ids"], think_end_token_ids=())
    assert seg.kinds == [["question", "step", "step"]]


# --------------------------------------------------------------------------- batches and padding


def _batch(tok, rows, pad):
    width = max(map(len, rows))
    ids = [[0] * (width - len(r)) + r if pad == "left" else r + [0] * (width - len(r)) for r in rows]
    mask = [[0] * (width - len(r)) + [1] * len(r) if pad == "left" else [1] * len(r) + [0] * (width - len(r))
            for r in rows]
    return torch.tensor(ids), torch.tensor(mask)


@pytest.mark.parametrize("pad", ["left", "right"])
@pytest.mark.parametrize("style", STYLES)
def test_batch_with_padding(style, pad):
    tok = get_tokenizer(style, "added")
    texts = ["Q? <think>We add them all together now. Then we check it.</think>\n\nFive.", "Q?", "<think>",
             "Q <think>x</think>y", "Q <think>\n\nLong enough sentence here. More"]
    rows = [tok.encode(t).ids for t in texts]
    prompts = [min(3, len(r)) for r in rows]
    ids, mask = _batch(tok, rows, pad)
    for kw in (dict(), dict(steps="paragraph", summary_steps=True), dict(think_start=None)):
        seg = segment(ids, prompts, tokenizer=tok, attention_mask=mask, **kw)
        assert seg.seg_ids.shape == ids.shape
        assert bool(((seg.seg_ids == -1) == (mask == 0)).all())
        for row, (r, p) in enumerate(zip(rows, prompts)):
            alone = segment([r], p, tokenizer=tok, **kw)
            assert seg.seg_ids[row][mask[row].bool()].tolist() == alone.seg_ids[0].tolist()
            assert seg.kinds[row] == alone.kinds[0] and seg.closed[row] == alone.closed[0]
        n_pad = (mask == 0).sum(1)
        assert seg.kv_start().tolist() == (n_pad if pad == "left" else torch.zeros_like(n_pad)).tolist()
        # padding ids never matter
        other = segment(torch.where(mask.bool(), ids, 7), prompts, tokenizer=tok, attention_mask=mask.bool(), **kw)
        assert torch.equal(other.seg_ids, seg.seg_ids)


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
@pytest.mark.parametrize("path", ["text", "paragraph", "ids"])
def test_tracker_matches_segment(seed, mode, path):
    """An HF-style batch: left-padded prompts, rows that finish early get masked columns."""
    tok = get_tokenizer("qwen2", "added" if path == "ids" else "split")
    if path == "ids":
        kw = dict(boundary_token_ids=ids_containing(tok, "\n\n"), think_end_token_ids={tok.token_to_id("</think>")})
    else:
        kw = dict(tokenizer=tok, steps="sentence" if path == "text" else "paragraph", summary_steps=True)
    pairs = [("Q?\n<think>\n", "So we add them.\n\nCheck it again now. OK\n\nwait</think>\n\nFive.\n\nDone"),
             ("Q?\n<think>\n", "\n\n</think>\n\nFive"), ("Q?", "<think>Now we think hard about it.</think>x"),
             ("Q?\n<think>\n\n</think>\n\n", "Five.\n\nSix")]
    rows = [(tok.encode(p).ids, tok.encode(g).ids) for p, g in pairs]
    width_p = max(len(p) for p, _ in rows)
    width_g = max(len(g) for _, g in rows)
    prompt_ids = torch.tensor([[0] * (width_p - len(p)) + p for p, _ in rows])
    prompt_mask = torch.tensor([[0] * (width_p - len(p)) + [1] * len(p) for p, _ in rows])
    gen_ids = torch.tensor([g + [0] * (width_g - len(g)) for _, g in rows])
    gen_mask = torch.tensor([[1] * len(g) + [0] * (width_g - len(g)) for _, g in rows])
    full = segment(torch.cat([prompt_ids, gen_ids], 1), [len(p) for p, _ in rows],
                   attention_mask=torch.cat([prompt_mask, gen_mask], 1), **kw)

    tracker = StepTracker(len(rows), **kw)
    first = tracker.start(prompt_ids, prompt_mask)
    assert isinstance(first, TrackerUpdate) and first.seg_ids.shape == prompt_ids.shape
    rng = random.Random(seed)
    col, updates = 0, [first]
    for n in _chunks(width_g, mode, rng):
        upd = tracker.feed(gen_ids[:, col:col + n], gen_mask[:, col:col + n])
        assert upd.seg_ids.shape == (len(rows), n) and upd.prev_step.shape == (len(rows), n, 2)
        updates.append(upd)
        col += n
    online = tracker.segmentation()
    assert torch.equal(online.seg_ids, full.seg_ids) and online.kinds == full.kinds and online.closed == full.closed
    cat = lambda name: torch.cat([getattr(u, name) for u in updates], 1)  # noqa: E731
    assert torch.equal(cat("seg_ids"), full.seg_ids)
    assert torch.equal(cat("seg_start"), full.seg_start())
    assert torch.equal(cat("prev_step"), full.smi_prev_step())
    ch, starts = full.channels(), full.channel_starts()
    assert torch.equal(cat("think_start"), torch.where(ch >= 1, starts[:, :1], -1))
    assert torch.equal(cat("summary_start"), torch.where(ch == 2, starts[:, 1:], -1))
    assert torch.equal(tracker.channel_starts(), starts)
    assert tracker.kinds == full.kinds and tracker.closed == full.closed
    assert tracker.length == width_p + width_g
    assert torch.equal(tracker.kv_start(), full.kv_start())
    last = [max(i for i in range(full.length) if full.seg_ids[r, i] >= 0) for r in range(len(rows))]
    assert tracker.segment_start.tolist() == [int(full.seg_start()[r, i]) for r, i in enumerate(last)]


def test_tracker_think_start_known_at_each_token():
    """think_start of a token is the first thinking position as known then (no look-ahead)."""
    tok = get_tokenizer("qwen2", "added")
    ids = tok.encode("Q<think>So we need to add these two. Then</think>ok").ids
    tr = StepTracker(tokenizer=tok)
    upd = tr.start([ids[:1]])
    assert upd.think_start.tolist() == [[-1]]
    outs = [tr.feed([[t]]) for t in ids[1:]]
    marker = next(i for i, t in enumerate(ids) if text(tok, [t]) == "<think>")
    think = [int(u.think_start[0, 0]) for u in outs]
    assert think[:marker] == [-1] * marker                  # question tokens (the marker included)
    assert set(think[marker:]) == {marker + 1}
    summ = [int(u.summary_start[0, 0]) for u in outs]
    end = next(i for i, t in enumerate(ids) if text(tok, [t]) == "</think>")
    assert summ == [-1] * end + [end + 1] * (len(ids) - end - 1)


def test_tracker_errors():
    tok = get_tokenizer("qwen2", "added")
    tr = StepTracker(2, tokenizer=tok)
    with pytest.raises(RuntimeError, match="start"):
        tr.feed(torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(RuntimeError, match="start"):
        tr.segmentation()
    tr.start(torch.zeros(3, 4, dtype=torch.long))  # new sequences may come in another batch size
    assert tr.batch_size == 3
    tr.start(torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="new_ids"):
        tr.feed(torch.zeros(3, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        tr.feed(torch.zeros(2, 2, dtype=torch.long), torch.ones(2, 3))
    with pytest.raises(ValueError, match="batch_size"):
        StepTracker(0, tokenizer=tok)
    with pytest.raises(ValueError, match="tokenizer"):
        StepTracker(1)
    with pytest.raises(ValueError, match="steps"):
        StepTracker(1, tokenizer=tok, steps="lines")


# --------------------------------------------------------------------------- incremental detokenization


def _pieces(tok, ids):
    from stepflow_ext.segment import _decoder, _Detok
    detok = _Detok(_decoder(tok))
    return [detok.piece(i) for i in ids]


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("variant", ["added", "split", "harmony"])
def test_pieces_concatenate_to_decoded_text(style, variant):
    tok = get_tokenizer(style, variant)
    for gen in ["So we add two and three.\n\nCheck it then" * 4, "é\n\n🙂 then 日本 wait\n\n🙂</think>ü five" * 4,
                "🙂🎉🙂🎉🙂🎉🙂🎉🙂🎉🙂🎉" * 3, "\u3000日本語日本語日本語日本語\n\n🙂" * 3,
                "<|start|>assistant<|channel|>analysis<|message|>Hi.<|end|>" * 2]:
        g = tok.encode(gen).ids
        pieces = _pieces(tok, g)
        assert "".join(pieces) == text(tok, g)
        assert not any("\ufffd" in piece for piece in pieces)


def test_decode_window_is_bounded():
    """Decode sees a bounded window of recent tokens, about once per token: O(T), not O(T^2)."""
    tok = get_tokenizer("bytelevel", "split")
    sizes = []

    class Counting:
        def decode(self, ids, **kw):
            sizes.append(len(ids))
            return tok.decode(ids, skip_special_tokens=False)

    gen = "<think>" + "".join(f"Step {i} so we check it carefully.\n\n" for i in range(150)) + "So</think>five"
    ids = tok.encode("Q?" + gen).ids
    seg = segment([ids], 2, tokenizer=Counting())
    assert seg.num_steps(0) == 151 and seg.kinds[0][-1] == "summary"
    assert max(sizes) <= WINDOW + 1
    assert len(sizes) <= 1.2 * len(ids) + 10
    assert torch.equal(seg.seg_ids, segment([ids], 2, tokenizer=tok).seg_ids)
