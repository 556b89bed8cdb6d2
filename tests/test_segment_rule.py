"""The rule of design.md 2.1 against an independent character-level implementation.

`char_reference` never looks at the module under test: it decodes the whole row once (the text
F), gets each token's character range from decodes of growing prefixes (the characters of F a
prefix decode already fixes: its common prefix with F), finds the markers and delimiters with
str.find on F, counts sentences with re.split on each text_t from scratch, and so places part
boundaries at character offsets. Tokens are then mapped to parts by the character rule: a token
belongs to the part containing the last character it adds (a token that adds no character, a
held-back byte of a multi-byte character, to the part containing the next character).

The paragraph rule at character level: a delimiter is a match of the regex made from
step_delimiter with "[ \t\r]*" between its consecutive newlines (the default "\n\n" is a blank
line), searched with re from the first character of the part that is not ASCII whitespace (a blank
line at the start of the thinking or the summary ends nothing); the part ends at the end of the token in which
the match completes and then extends over the ASCII whitespace that follows (the next part starts at
the first other character). Summary segments (summary_steps) split the same way.

segment() (offline), StepTracker fed token by token, and StepTracker fed in random chunks must all
equal it — seg ids, kinds, closed flags and closing positions — on the three tokenizer styles of
test_segment_tokenizers, for traces built from tricky fragments: decimals, abbreviations,
ellipses, tables, code blocks, LaTeX, numbered lists, short sentences, sentences ending inside a
token, CJK and emoji, markers split over tokens, in the prompt or generated, empty thinking, no
summary, summary steps on and off.
"""
from __future__ import annotations

import os
import random
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stepflow_ext.reference import oeb_bounds, smi_windows
from stepflow_ext.segment import StepTracker, segment
from test_segment_tokenizers import ALL, get_tokenizer

THINK = ("<think>", "</think>")
ASCII_WS = " \t\n\r\x0b\x0c"


def delimiter_regex(delimiter):
    """The delimiter as a regex: "[ \t\r]*" may stand between two consecutive newlines of it."""
    out = ""
    for i, c in enumerate(delimiter):
        out += re.escape(c)
        if c == "\n" and delimiter[i + 1:i + 2] == "\n":
            out += "[ \t\r]*"
    return re.compile(out)
HARMONY = ("<|channel|>analysis<|message|>", "<|channel|>final<|message|>")


# --------------------------------------------------------------------------- the reference


def n_sentences(text):
    """The paper's count, written out from design.md 2.1."""
    n = 0
    for piece in re.split(r"\.\s+", text):
        s = piece.strip()
        if len(s) < 15:
            continue
        if s.replace(".", "").replace(",", "").replace("-", "").replace(" ", "").isdigit():
            continue
        if s.startswith("|") and s.count("|") > 2 * s.count("\n"):
            continue
        if s.startswith("|--") or s.startswith("---"):
            if len(s) < 20:
                continue
        n += 1
    return n


def char_offsets(tok, ids):
    """(F, begins, ends): the row's decoded text and each token's character range in it.

    ends[t]: the characters of F fixed once x_t is known: the longest common prefix of F with the
    decode of ids[:t'+1], t' <= t. (The running maximum matters with byte fallback, which decodes a
    run of byte tokens as a whole: a partial character at the end turns the complete characters
    of its run into U+FFFD too, so a longer prefix can decode to fewer right characters.)
    """
    dec = lambda x: tok.decode(x, skip_special_tokens=False)  # noqa: E731
    full = dec(ids)
    ends = []
    for t in range(len(ids)):
        prefix = dec(ids[:t + 1])
        n = 0
        while n < min(len(prefix), len(full)) and prefix[n] == full[n]:
            n += 1
        ends.append(max(n, ends[-1] if ends else 0))
    assert not ends or ends[-1] == len(full)
    return full, [0] + ends[:-1], ends


def char_reference(tok, ids, prompt_len, think_start, think_end, steps="sentence", summary_steps=False,
                   delimiter="\n\n"):
    """-> (seg ids, kinds, closed, closing) of one row by the character-level rule."""
    F, begins, ends = char_offsets(tok, ids)
    n = len(ids)
    INF = len(F) + 1
    pattern = delimiter_regex(delimiter)

    def token_at(c):
        """The token whose piece holds character offset c - 1 (an occurrence ending at c ends in it)."""
        return next(t for t in range(n) if ends[t] >= c)

    def paragraphs(pos, stop, kind):
        """Boundaries (offset, kind, closing token) of paragraph parts from pos; delimiters completing
        at or after `stop` are not looked at."""
        out = []
        while True:
            while pos < len(F) and F[pos] in ASCII_WS:    # a part's search starts at its first other character
                pos += 1
            m = pattern.search(F, pos)
            if m is None or ends[token_at(m.end())] >= stop:
                return out
            closer = token_at(m.end())
            pos = ends[closer]
            while pos < len(F) and F[pos] in ASCII_WS:    # whitespace after a delimiter stays in the part
                pos += 1
            out.append((pos, kind, closer))

    # The question.
    if think_start is not None:
        k = F.find(think_start)
        if k < 0:
            return [0] * n, ["question"], [False], [-1]
        t_s = token_at(k + len(think_start))
        q_end = ends[t_s]
        search = k + len(think_start)
        prefix = F[begins[t_s]:ends[t_s]] if t_s >= prompt_len else ""
        disabled = False
        question_closer = t_s
    else:
        t_s = prompt_len - 1
        q_end = ends[t_s] if prompt_len else 0
        search = q_end
        prefix = ""
        disabled = F[:q_end].rstrip().endswith(think_end)
        question_closer = t_s if n > prompt_len else None   # closed when a generated token comes
    # The end of the thinking.
    if disabled:
        th_end, t_e = q_end, None
    else:
        j = F.find(think_end, search)
        t_e = token_at(j + len(think_end)) if j >= 0 else None
        th_end = ends[t_e] if j >= 0 else INF
    boundaries = [(q_end, "step", question_closer)]
    # Steps.
    if th_end > q_end:
        if steps == "sentence":
            recorded = 0
            for t in range(t_s + 1, n):
                if ends[t] >= th_end:
                    break
                if "." in F[begins[t]:ends[t]]:
                    c = n_sentences(prefix + F[q_end:ends[t]])
                    if c > recorded:
                        recorded = c
                        boundaries.append((ends[t], "step", t))
        else:   # a delimiter ending in the think_end token closes nothing more: think_end closes anyway
            boundaries += paragraphs(q_end, th_end, "step")
    # The summary.
    if th_end < INF:
        boundaries.append((th_end, "summary", t_e))   # think_end closes the last step
        if summary_steps:
            boundaries += paragraphs(th_end, INF, "summary")
    # Parts: part 0 is [0, q_end), part i+1 starts at boundaries[i] and is closed by the token of boundaries[i+1].
    offsets = [b for b, _, _ in boundaries]
    part_kind = ["question"] + [kind for _, kind, _ in boundaries]
    part_closer = [c for _, _, c in boundaries] + [None]
    part_of = []
    for t in range(n):
        if think_start is None and t < prompt_len:
            part_of.append(0)
            continue
        c = ends[t] - 1 if ends[t] > begins[t] else ends[t]
        part_of.append(sum(1 for b in offsets if b <= c))
    used = sorted(set(part_of) | {0})
    renumber = {p: i for i, p in enumerate(used)}
    seg = [renumber[p] for p in part_of]
    kinds = [part_kind[p] for p in used]
    closing = [part_closer[p] if part_closer[p] is not None else -1 for p in used]
    closed = [c >= 0 or (p == 0 and question_closer is not None) for p, c in zip(used, closing)]
    return seg, kinds, closed, closing


# --------------------------------------------------------------------------- traces

FRAGMENTS = [
    "Let me compute 3.5 plus 2.25 carefully. ", "x = 3.", "5 is the value here, so we go on. ", "e.g. this works for n. ",
    "Wait... maybe not. ", "Hmm.. ok then we check the value again.\n\n", "| a | b |\n|---|---|\n| 1 | 2 |\n",
    "```python\nx = f(3.5)\nprint(x.real)\n```\n", "$\\frac{1}{2}. $ So the half is the answer here. ",
    "1. First we add the numbers.\n2. Then we check.\n", "Ok. ", "Yes.", " ", ".\n\n", "\n\n", "\n", "\n\n\n",
    "So the answer is 42.\n\nThe next step follows. The", "日本語の文章です。これは. 次に進みます. ", "🙂🎉 emoji time is here. ",
    "\u3000so\u00a0we wait. ", "3.14159. 2.5. 100. ", "---\n", "...", "12.25.\n\n", "The sum of two and three is five. ",
    "therefore the value is 5. Then", "1. 2. 3. ", ". The", ". ", "</", "think", ">", "<|channel|>", "final", "<|message|>",
    "🙂🎉🙂🎉🙂🎉 are emoji runs. ", "日本語日本語日本語\n\n", "k>\n\n", "></", ".\n\nThe",
]
SUMMARIES = ["The answer is 5.", "So 3.5 + 1.5 = 5.\n\nDone. Really.\n\nBye", "", "\n\n\\boxed{5}\n\n", "日本 🙂.\n\nok"]


def make_text(rng, markers, *, with_start=True, with_end=True, empty=False):
    ts, te = markers
    question = rng.choice(["User: what is 3.5 + 1.5?\n", "Q: two and three. Think.\n", "Solve 日本 🙂 e.g. 1.5.\n"])
    thinking = "" if empty else "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 14)))
    if ts == HARMONY[0]:
        question = "<|start|>user<|message|>" + question + "<|end|><|start|>assistant"
        end = "<|end|><|start|>assistant" + te
    else:
        end = te
    text = question + (ts if with_start else "") + rng.choice(["", "\n"]) + thinking
    if with_end:
        text += end + rng.choice(SUMMARIES)
    return text


def check_row(tok, ids, prompt_len, opts, rng=None, reader=None):
    """segment() offline, StepTracker token by token and in random chunks == char_reference.

    tok is what segment() gets; reader (default tok) is what the reference decodes with: an object
    with decode(ids, skip_special_tokens=False) and token_to_id(text)."""
    reader = reader or tok
    ts = opts.get("think_start", "auto")
    te = opts.get("think_end", "auto")
    auto = HARMONY if reader.token_to_id("<|channel|>") is not None else THINK
    ts_r = auto[0] if ts == "auto" else ts
    te_r = auto[1] if te == "auto" else te
    want = char_reference(reader, ids, prompt_len, ts_r, te_r, opts.get("steps", "sentence"),
                          opts.get("summary_steps", False), opts.get("step_delimiter", "\n\n"))
    seg = segment([ids], prompt_len, tokenizer=tok, **opts)
    got = (seg.seg_ids[0].tolist(), seg.kinds[0], seg.closed[0], seg.closing[0])
    assert got == want, f"offline:\n{got}\n{want}"
    rng = rng or random.Random(0)
    for chunking in ("token", "random"):
        tr = StepTracker(tokenizer=tok, **opts)
        first = tr.start([ids[:prompt_len]]) if prompt_len else tr.start(torch.zeros(1, 0, dtype=torch.long))
        cols = [first]
        pos = prompt_len
        while pos < len(ids):
            k = 1 if chunking == "token" else rng.randint(1, 9)
            cols.append(tr.feed([ids[pos:pos + k]]))
            pos += k
        online = tr.segmentation()
        assert (online.seg_ids[0].tolist(), online.kinds[0], online.closed[0], online.closing[0]) == want, chunking
        upd_seg = torch.cat([u.seg_ids for u in cols], 1)
        assert torch.equal(upd_seg, seg.seg_ids)
        assert torch.equal(torch.cat([u.seg_start for u in cols], 1), seg.seg_start())
        assert torch.equal(torch.cat([u.prev_step for u in cols], 1), seg.smi_prev_step())
        starts = seg.channel_starts()[0]
        ch = seg.channels()[0]
        think = torch.cat([u.think_start for u in cols], 1)[0]
        summ = torch.cat([u.summary_start for u in cols], 1)[0]
        assert torch.equal(think, torch.where(ch >= 1, starts[0], -1))
        assert torch.equal(summ, torch.where(ch == 2, starts[1], -1))
    return seg


STYLE_VARIANTS = [pytest.param(s, v, id=f"{s}-{v}") for s, v in ALL]


def _markers(variant):
    return HARMONY if variant == "harmony" else THINK


@pytest.mark.parametrize("style,variant", STYLE_VARIANTS)
@pytest.mark.parametrize("steps", ["sentence", "paragraph"])
def test_generated_traces_equal_char_reference(style, variant, steps, seed):
    """Random traces of tricky fragments; the marker in the prompt, generated, or split by the prompt end."""
    tok = get_tokenizer(style, variant)
    rng = random.Random(seed)
    for trial in range(int(os.environ.get("SEG_TRIALS", 12))):
        text = make_text(rng, _markers(variant), with_start=trial % 7 != 6, with_end=trial % 5 != 4,
                         empty=trial % 6 == 5)
        ids = tok.encode(text).ids
        prompt_len = rng.choice([0, rng.randint(0, len(ids)), len(ids)] + [_marker_token(tok, ids, _markers(variant)[0])] * 3)
        opts = dict(steps=steps, summary_steps=rng.random() < 0.5)
        check_row(tok, ids, prompt_len, opts, rng)


def _marker_token(tok, ids, marker):
    """The number of tokens up to and including the one in which marker completes (or all)."""
    text = tok.decode(ids, skip_special_tokens=False)
    k = text.find(marker)
    if k < 0:
        return len(ids)
    for t in range(len(ids)):
        if len(tok.decode(ids[:t + 1], skip_special_tokens=False)) >= k + len(marker):
            return t + 1
    return len(ids)


@pytest.mark.parametrize("style,variant", STYLE_VARIANTS)
def test_think_start_none_equals_char_reference(style, variant, seed):
    """think_start=None: the prompt is the question (and a prompt ending with think_end disables thinking)."""
    tok = get_tokenizer(style, variant)
    rng = random.Random(seed)
    te = _markers(variant)[1]
    for trial in range(int(os.environ.get("SEG_TRIALS", 12))):
        question = rng.choice(["Q: 3.5 + 1.5?\n<think>\n", "Q?\n<think>\n\n" + te + "\n\n", "Q?" + te + "x\n",
                               "Q?\n" + te + "  \n\n", ""])
        body = "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(0, 10)))
        rest = body + (te + rng.choice(SUMMARIES) if rng.random() < 0.7 else "")
        p = tok.encode(question).ids if question else []
        g = tok.encode(rest).ids if rest else []
        opts = dict(think_start=None, steps=rng.choice(["sentence", "paragraph"]), summary_steps=rng.random() < 0.5)
        check_row(tok, p + g, len(p), opts, rng)


# --------------------------------------------------------------------------- named cases


@pytest.mark.parametrize("style,variant", STYLE_VARIANTS)
@pytest.mark.parametrize("case", [
    "<think>\nShort one. This sentence is long enough. x = 3.5 and more. The end.\n\n</think>\n\nAnswer.",
    "<think>e.g. this is not a break. Wait... maybe. So the value is 12.25.\n\nThe next one. The</think>",
    "<think>| a | b |\n|---|---|\n| 1 | 2 |\nNow the table is done. ---\nSo.</think>x",
    "<think>```python\nx = f(3.5)\nprint(x.real)\n```\nThe code runs fine. $\\frac{1}{2}. $ Then done.</think>",
    "<think>1. First we add the numbers.\n2. Then we check the sum.\n3. Done.</think>\n\nok\n\nbye",
    "<think>日本語の文章ですよね. 次に進みますよね. 🙂🎉 emoji time is here. </think>日本🙂",
    "<think></think>\n\nThe answer is 5.", "<think>\n\n</think>\n\nThe answer.", "<think>", "no marker. at all here ok.",
    "Q<think></think>\n\nThe answer.\n\nok", "Q<think></think>",
    "Q<think>\n\nfirst part here.\n\nThe second part here.</think>\n\nEnd", "<think>🙂🎉🙂🎉🙂🎉🙂 emoji. 🙂🎉.</think>🙂🎉",
    "<think>So the answer is 42.\n\nThe next step follows. The", "<think>3.14159. 2.5. 100. 12.5. More words here. ",
    "Q <think>a</think> b <think>c</think> d", "Q </think> <think>long enough sentence here. another long one. ",
    "<|channel|>analysis<|message|>We need to compute. This is long enough. Ok.<|end|><|start|>assistant"
    "<|channel|>final<|message|>Five.\n\nDone",
    "<|channel|>analysis<|message|>Short.<|end|><|start|>assistant<|channel|>final<|message|>",
])
def test_named_cases(style, variant, case):
    tok = get_tokenizer(style, variant)
    ids = tok.encode(case).ids
    marker = _marker_token(tok, ids, _markers(variant)[0])
    for i, prompt_len in enumerate(sorted({0, len(ids) // 2, len(ids), marker, max(0, marker - 1)})):
        for steps in ("sentence", "paragraph"):
            check_row(tok, ids, prompt_len, dict(steps=steps, summary_steps=i % 2 == 1))
    other = THINK if variant == "harmony" else HARMONY   # the other family's markers, set by hand
    check_row(tok, ids, marker, dict(think_start=other[0], think_end=other[1], summary_steps=True))
    check_row(tok, ids, marker, dict(think_start=None, steps="paragraph"))


# --------------------------------------------------------------------------- random texts

ATOMS = ["a", "bb", " ", ".", ". ", "\n", "\n\n", ".\n\n", "3.5", "e.g.", "|", "---", "日", "🙂", "\u3000", "1",
         "long enough words ", "<think>", "</think>", "</", "think", ">", "<|channel|>", "analysis", "final",
         "<|message|>"]
HYP = settings(max_examples=int(os.environ.get("SEG_EXAMPLES", 60)), deadline=None,
               suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@HYP
@given(atoms=st.lists(st.sampled_from(ATOMS), max_size=40), style_variant=st.sampled_from(ALL),
       cut=st.floats(0, 1), steps=st.sampled_from(["sentence", "paragraph"]), summary_steps=st.booleans(),
       mode=st.sampled_from(["auto", "none", "think", "harmony"]), chunk_seed=st.integers(0, 1000))
def test_random_texts_equal_char_reference(atoms, style_variant, cut, steps, summary_steps, mode, chunk_seed):
    tok = get_tokenizer(*style_variant)
    ids = tok.encode("".join(atoms)).ids
    opts = dict(steps=steps, summary_steps=summary_steps)
    if mode == "none":
        opts["think_start"] = None
    elif mode != "auto":
        opts["think_start"], opts["think_end"] = THINK if mode == "think" else HARMONY
    check_row(tok, ids, int(cut * len(ids)), opts, random.Random(chunk_seed))


# --------------------------------------------------------------------------- consumers of the segmentation


@pytest.mark.parametrize("style,variant", STYLE_VARIANTS)
def test_kernel_views_equal_reference_loops(style, variant, seed):
    """channel_starts -> reference.oeb_bounds('bridge'); smi_prev_step -> reference.smi_windows."""
    tok = get_tokenizer(style, variant)
    rng = random.Random(seed)
    rows, prompts = [], []
    for trial in range(6):
        ids = tok.encode(make_text(rng, _markers(variant), with_end=trial % 3 != 2, empty=trial == 4)).ids
        rows.append(ids)
        prompts.append(rng.randint(0, len(ids)))
    width = max(map(len, rows)) + 3
    pad = [rng.choice(["left", "right"]) for _ in rows]
    batch = [[0] * (width - len(r)) + r if p == "left" else r + [0] * (width - len(r)) for r, p in zip(rows, pad)]
    mask = [[0] * (width - len(r)) + [1] * len(r) if p == "left" else [1] * len(r) + [0] * (width - len(r))
            for r, p in zip(rows, pad)]
    seg = segment(batch, prompts, tokenizer=tok, attention_mask=mask, summary_steps=True)
    kinds = seg.seg_kinds_tensor()
    bounds = oeb_bounds(seg.seg_ids, kinds, "bridge")
    starts = seg.channel_starts()
    ch = seg.channels()
    kv = seg.kv_start()
    want = torch.full_like(bounds, -1)
    for b in range(len(rows)):
        for i in range(width):
            if ch[b, i] == 1:
                want[b, i] = torch.tensor([kv[b], starts[b, 0]])
            elif ch[b, i] == 2:
                want[b, i] = starts[b]
    assert torch.equal(bounds, want)
    prev = seg.smi_prev_step()
    for w in (1, 2, 4, 9):
        windows = smi_windows(seg.seg_ids, kinds, seg.closing_tensor(), w)
        hit = prev[..., 0] >= 0
        expect = torch.where(hit[..., None], torch.stack([torch.maximum(prev[..., 0], prev[..., 1] - w),
                                                          prev[..., 1]], -1), torch.full_like(prev, -1))
        assert torch.equal(windows, expect)
