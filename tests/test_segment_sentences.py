"""The incremental sentence counter of the `sentence` rule (segment._Sentences) against re.split.

N(text) = the number of pieces of re.split(r"\\.\\s+", text) that count (design.md 2.1). The rule
needs N(text_t) after every token of a growing text; _Sentences keeps a running count and only
re-evaluates the trailing piece. These tests check, on random texts with runs of dots and
whitespace (unicode spaces included), digits, table pipes and rule lines, fed in random chunks,
that its count after every chunk equals the brute force re.split count, and the facts its proof
rests on.
"""
from __future__ import annotations

import random
import re
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stepflow_ext.segment import MIN_SENTENCE_CHARS, _Sentences, sentence_count


def brute(text):
    """N(text), written out from design.md 2.1 (independently of the module)."""
    n = 0
    for piece in re.split(r"\.\s+", text):
        s = piece.strip()
        if len(s) < 15:
            continue
        if s.replace(".", "").replace(",", "").replace("-", "").replace(" ", "").isdigit():
            continue
        if s.startswith("|") and s.count("|") > 2 * s.count("\n"):
            continue
        if s.startswith(("|--", "---")) and len(s) < 20:
            continue
        n += 1
    return n


def counts_while_feeding(text, cuts):
    """(incremental count, brute count) after each chunk of text cut at `cuts`."""
    counter = _Sentences()
    out, pos = [], 0
    for end in sorted(set(cuts)) + [len(text)]:
        if end <= pos:
            continue
        counter.feed(text[pos:end])
        pos = end
        out.append((counter.count(), brute(text[:pos])))
    return out


ALPHABET = [".", "..", "...", " ", "  ", "\n", "\n\n", "\t", "\u3000", "\u00a0", "\x1c", "\u2028", "a", "bc",
            "word ", "1", "23", "3.5", ",", "-", "|", "|--", "---", "| a | b |", "日", "🙂", "١", "²", "e.g.",
            "x" * 14, "y" * 19, "- , - , "]


@settings(max_examples=400, deadline=None)
@given(parts=st.lists(st.sampled_from(ALPHABET), max_size=40), data=st.data())
def test_incremental_count_equals_re_split(parts, data):
    text = "".join(parts)
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=12))
    for got, want in counts_while_feeding(text, cuts):
        assert got == want


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=60),
       data=st.data())
def test_incremental_count_any_unicode(text, data):
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=8))
    for got, want in counts_while_feeding(text, cuts):
        assert got == want


def test_character_by_character_on_random_texts():
    rng = random.Random(1234)
    for _ in range(300):
        text = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 60)))
        counter = _Sentences()
        for i, c in enumerate(text):
            counter.feed(c)
            assert counter.count() == brute(text[:i + 1])


def test_module_definition_equals_brute():
    rng = random.Random(7)
    for _ in range(500):
        text = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 40)))
        assert sentence_count(text) == brute(text)


@pytest.mark.parametrize("text,n", [
    ("", 0), ("Short one. ", 0), ("This sentence is long enough.", 1), ("This sentence is long enough. ", 1),
    ("a" * 14 + ".", 1),                   # 15 characters with the dot: the trailing piece keeps its "."
    ("a" * 14 + ". ", 0),                  # ... but a separator takes the dot: 14 characters
    ("a" * 15 + ". b", 1), ("3.5 + 2.25 = 5.75. ", 1), ("3.5 2.25 5.75 - 1, 2. ", 0), ("12,345.678 - 9.5 - 1 ", 0), ("12,345.678 - 9.5 x", 1),
    ("| a | b | c | d | e |", 0),          # a table row: 6 "|", no newline
    ("| a | b |\n| c | d |\n| e | f |", 0),  # 9 "|" > 2 * 2 newlines
    ("| a |\n| b |\n| c |\n| d |\n| e |", 0),  # 10 "|" > 2 * 4 newlines: a row
    ("| a\n| b\n| c\n| d\n| e is long", 1),     # 5 "|" <= 2 * 4 newlines: counts
    ("|---|---|---|---|", 0), ("---------------- x", 0), ("------------------- x", 1),   # rule lines (< 20)
    ("|-- a table rule line", 0),           # 21 characters: no rule line, but a row (1 "|" > 0 newlines)
    ("- , - , - , - , - , -. ", 1),         # nothing left once . , - " " go: "".isdigit() is False, it counts
    ("e.g. this is fine. ", 0),             # "e.g" + "this is fine": the abbreviation splits, both short
    ("e.g. this is a fine sentence. ", 1), ("Wait... maybe not at all. ", 1), ("Ok.\u3000Next sentence is long enough", 1),
    ("1. First we add the numbers.\n2. Then we check.\n", 1),
    ("\u00a0" * 3 + "padded sentence text here" + "\u3000" * 2, 1),
])
def test_examples(text, n):
    assert brute(text) == sentence_count(text)
    counter = _Sentences()
    counter.feed(text)
    assert counter.count() == brute(text)
    assert brute(text) == n


def test_boundaries_of_the_filters():
    """Lengths 14/15 (min), 19/20 (rule line), "|" = 2 * newlines (table row), at every feeding cut."""
    texts = ["x" * (MIN_SENTENCE_CHARS - 1), "x" * MIN_SENTENCE_CHARS, "---" + "x" * 16, "---" + "x" * 17,
             "|--" + "y" * 16, "|--" + "y" * 17, "|a|\n|b|\nccccccccccc", "|a|\n|b\nccccccccccccc",
             "|" + "\n" * 3 + "|" * 5 + "zzzzzzzzzz", " \t" + "1 2 3, 4-5.6" * 2, "  1 2 3, 4-5.6 7 8 9 a"]
    for text in texts:
        for sep in ("", ". ", ".\n\n", ".", "  "):
            whole = "lead sentence long enough. " + text + sep
            for cut in range(len(whole) + 1):
                for got, want in counts_while_feeding(whole, [cut]):
                    assert got == want, (whole, cut)


def test_whitespace_of_strip_and_regex_agree():
    """The proof uses that re's \\s and str.strip() / str.isspace() are the same set of characters."""
    space = re.compile(r"\s")
    for cp in range(sys.maxunicode + 1):
        c = chr(cp)
        assert bool(space.match(c)) == c.isspace() == (c.strip() == "")


@settings(max_examples=300, deadline=None)
@given(a=st.lists(st.sampled_from(ALPHABET), max_size=25).map("".join),
       b=st.lists(st.sampled_from(ALPHABET), max_size=25).map("".join))
def test_pieces_before_the_last_separator_are_final(a, b):
    """re.split(a + b) starts with re.split(a)[:-1]: appending text never changes the final pieces."""
    before = re.split(r"\.\s+", a)
    after = re.split(r"\.\s+", a + b)
    assert after[:len(before) - 1] == before[:-1]


def test_linear_time():
    """One long sentence without separators: the counter is not quadratic (re-splitting would be)."""
    import time
    counter = _Sentences()
    chunk = "so we add the numbers and check them again, "
    start = time.perf_counter()
    for _ in range(4000):
        counter.feed(chunk)
        counter.count()
    assert time.perf_counter() - start < 5.0
    assert counter.count() == 1
