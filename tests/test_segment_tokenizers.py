"""The tokenizers of the segmentation tests, built offline with `tokenizers`, and their properties.

Three styles, each trained on the same small corpus of reasoning-like text:
- "qwen2": byte-level BPE with Qwen2's pre-tokenizer regex (DeepSeek-R1-Distill-Qwen, QwQ, Qwen3):
  newline runs merge with the punctuation before them, so ".\\n\\n" is one token;
- "bytelevel": byte-level BPE with every "\\n" its own pre-token (GPT-2 regex otherwise), so
  "\\n\\n" is two tokens;
- "sentencepiece": Llama-2 / Mistral style: BPE over "▁"-joined text (no split at spaces, so
  ". The" is one token), byte fallback (<0x0A> for "\\n", CJK and emoji as byte tokens) and the
  decoder chain Replace("▁", " "), ByteFallback, Fuse, Strip(" ", 1, 0).
Each style comes in four variants: "added" ("<think>", "</think>" added special tokens),
"split" (no added tokens: the markers are split into several pieces), "harmony" (GPT-OSS's
"<|channel|>", "<|message|>", "<|start|>", "<|end|>", "<|return|>" added special tokens) and
"fused" (added plain tokens that straddle the markers: "<think></think>", "></", "k>\n\n",
"</think>\n\n", ".\n\nThe": one token completes think_start and holds (part of) think_end, or
ends a sentence and starts the next).

Other test modules import `get_tokenizer(style, variant)` (cached: each is trained once).
"""
from __future__ import annotations

import functools
import json
import random

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
STYLES = ("qwen2", "bytelevel", "sentencepiece")
VARIANTS = ("added", "split", "harmony", "fused")
FUSED = ["<think></think>", "></", "k>\n\n", "</think>\n\n", ".\n\nThe"]
THINK_SPECIALS = ["<think>", "</think>"]
HARMONY_SPECIALS = ["<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|return|>"]
WORDS = ("so we need the sum of two and three then check it wait maybe answer is five let compute value "
         "first next thus hence therefore analysis final assistant user").split()


def corpus(n=300, seed=0):
    rng = random.Random(seed)

    def sentence():
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))).capitalize()
        return words + rng.choice([".", ".", "?", "", ":"])

    out = []
    for _ in range(n):
        steps = [" ".join(sentence() for _ in range(rng.randint(1, 3))) for _ in range(rng.randint(2, 5))]
        out.append("Question: " + sentence() + "\n" + "\n\n".join(steps) + " x = 3.5. The value is 12.25.\n\n"
                   "| a | b |\n|---|---|\n| 1 | 2 |\n```python\nprint(f(3))\n```\n$\\frac{1}{2}$. The end.\n\n"
                   "1. First, e.g. this. 2. Then...\n<b></b>\n")
    return out


def _byte_level(qwen2: bool) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    if qwen2:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), "isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", "isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus(), trainers.BpeTrainer(vocab_size=700, show_progress=False,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def _sentencepiece() -> Tokenizer:
    """Train BPE on "▁"-joined ASCII text, then rebuild it with byte-fallback tokens <0x00>..<0xFF>."""
    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    alphabet = [chr(c) for c in range(32, 127)] + ["\u2581"]
    trained.train_from_iterator(corpus(), trainers.BpeTrainer(vocab_size=700, show_progress=False,
                                                               initial_alphabet=alphabet, limit_alphabet=len(alphabet)))
    spec = json.loads(trained.to_str())["model"]
    order = sorted((k for k in spec["vocab"] if all(c in alphabet for c in k)), key=spec["vocab"].get)
    order += [f"<0x{b:02X}>" for b in range(256)] + ["<unk>"]
    vocab = {k: i for i, k in enumerate(order)}
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["merges"]]
    merges = [m for m in merges if m[0] in vocab and m[1] in vocab and m[0] + m[1] in vocab]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = trained.pre_tokenizer
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return tok


@functools.lru_cache(maxsize=None)
def _base(style: str) -> str:
    tok = {"qwen2": lambda: _byte_level(True), "bytelevel": lambda: _byte_level(False),
           "sentencepiece": _sentencepiece}[style]()
    return tok.to_str()


@functools.lru_cache(maxsize=None)
def get_tokenizer(style: str, variant: str) -> Tokenizer:
    tok = Tokenizer.from_str(_base(style))
    if variant == "added":
        tok.add_special_tokens(THINK_SPECIALS)
    elif variant == "harmony":
        tok.add_special_tokens(HARMONY_SPECIALS)
    elif variant == "fused":
        tok.add_tokens(FUSED)
    elif variant != "split":
        raise ValueError(variant)
    return tok


def pieces(tok, text):
    return [tok.decode([i], skip_special_tokens=False) for i in tok.encode(text).ids]


ALL = [(s, v) for s in STYLES for v in VARIANTS]


@pytest.mark.parametrize("style,variant", ALL)
def test_round_trip(style, variant):
    tok = get_tokenizer(style, variant)
    for text in ["So we add. The sum is 3.5.\n\nThen | a | b |\n日本語 🙂🎉 ok", "<think>\nx</think>\n\nDone.",
                 "<|start|>assistant<|channel|>analysis<|message|>Hmm.<|end|>"]:
        assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text


@pytest.mark.parametrize("style", STYLES)
def test_marker_tokens(style):
    assert pieces(get_tokenizer(style, "added"), "a</think>b").count("</think>") == 1
    assert "</think>" not in pieces(get_tokenizer(style, "split"), "a</think>b")
    assert len(get_tokenizer(style, "split").encode("</think>").ids) >= 3
    harmony = pieces(get_tokenizer(style, "harmony"), "<|channel|>analysis<|message|>")
    assert harmony[0] == "<|channel|>" and harmony[-1] == "<|message|>"
    assert get_tokenizer(style, "harmony").token_to_id("<|channel|>") is not None
    assert get_tokenizer(style, "added").token_to_id("<|channel|>") is None


def test_style_properties():
    assert ".\n\n" in pieces(get_tokenizer("qwen2", "added"), "it.\n\nSo")
    assert pieces(get_tokenizer("bytelevel", "added"), "it.\n\nSo")[-3:-1] == ["\n", "\n"]
    sp = get_tokenizer("sentencepiece", "added")
    assert any(p.startswith(". ") and len(p) > 2 for p in pieces(sp, "we add. The end. The"))
    assert pieces(sp, "a\n\nb")[-3:-1] == ["\n", "\n"]       # <0x0A> byte-fallback tokens
    assert sp.token_to_id("<0x0A>") in sp.encode("a\n").ids
    # CJK and emoji go through byte tokens, which decode alone to U+FFFD
    assert "\ufffd" in pieces(sp, "日本🙂")
    fused = pieces(get_tokenizer("qwen2", "fused"), "Q<think></think>\n\nA.\n\nThe end")
    assert "<think></think>" in fused and ".\n\nThe" in fused
    assert "></" in pieces(get_tokenizer("bytelevel", "split"), "<think></think>")
