"""replace_attention + model.generate with the real tokenizers (issue #18, item 4).

A tiny random model per real vocabulary (tests/hf_models.py) decodes under StepFlow (the paper's
defaults, StepFlowConfig.default_for) with the tokenizer itself given to replace_attention
(a tokenizers.Tokenizer, a tiktoken.Encoding, a sentencepiece.SentencePieceProcessor). A logits
processor makes it write scripted traces, so that the online tracking meets what matters: the
family's chat template with "<think>\\n" in the prompt, a model that writes "<think>" itself, a
"</think>" that is one token or spelled in pieces, empty thinking, Chinese text, LaTeX and code
blocks with blank lines, newline runs and byte-fallback characters. Four rows per batch, left
padded, rows that end early padded by generate after their end token.

Checked: the segmentation tracked online while decoding (handle.segmentation()) equals segment()
on the same tokens, handle.segmentation(output) equals segment() on the output, each row equals the
character-level reference of test_segment_rule, and SMI acted at the tracked step starts.
"""
from __future__ import annotations

import functools

import pytest
import torch
import transformers

import hf_models
import stepflow_ext as sf
from stepflow_ext.segment import segment
from test_segment_real_tokenizers import NAMES, char_reference, real, traces

pytestmark = pytest.mark.usefixtures("one_thread")

ARCH = {"qwen2": "qwen2", "deepseek-r1": "llama", "r1-distill-qwen": "qwen2", "qwen3": "qwen3",
        "r1-distill-llama": "llama", "llama2": "llama", "mistral-v1": "mistral"}


@functools.lru_cache(maxsize=None)
def tiny(name: str):
    tk = real(name)
    # hidden 16: the (vocabulary x hidden) output layer is most of the cost of a decoding step here
    return hf_models.model(ARCH[name], layers=2, hidden=16, heads=2, kv_heads=1, vocab=tk.vocab_size)


class Script(transformers.LogitsProcessor):
    """Forces row r to write scripts[r], then `end`, then `end` again (generate pads finished rows)."""

    def __init__(self, scripts, start: int, end: int):
        self.scripts, self.start, self.end = scripts, start, end

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.start
        forced = torch.full_like(scores, float("-inf"))
        for r, script in enumerate(self.scripts):
            forced[r, script[step] if step < len(script) else self.end] = 0.0
        return forced


def split_marker(tk, marker: str) -> list:
    """`marker` spelled in pieces of the base vocabulary (never its added token)."""
    return [i for piece in ("</", "think", ">") for i in tk.encode(piece)] if marker == "</think>" else tk.encode(marker)


def rows(tk):
    """(prompt ids, generated ids) of four scripted rows for this tokenizer."""
    fx = {t["name"]: t for t in traces()}
    chinese, latex, code = fx["Chinese, as R1 writes it"], fx["LaTeX with blank lines"], fx["code blocks with blank lines"]
    odd = fx["emoji, byte-fallback characters and odd spacing"]
    end = tk.encode(tk.end()) if tk.end() else []
    out = []
    # 1. The template puts "<think>\n" in the prompt (R1, its distills, QwQ): Chinese, newline runs.
    out.append((tk.prompt_ids(chinese["question"]),
                tk.encode(chinese["thinking"] + "\n</think>" + chinese["summary"]) + end))
    # 2. The model writes "<think>" itself (Qwen3): LaTeX and a code block with blank lines.
    out.append((tk.prompt_ids(latex["question"], think_in_prompt=False),
                tk.encode("<think>\n" + latex["thinking"][-60:] + "\n\n" + code["thinking"][:70] + "\n```\n\n"
                          "So it works. Done.\n</think>" + code["summary"][:40]) + end))
    # 3. "</think>" spelled in pieces even where it is one token; byte-fallback characters, odd spacing.
    out.append((tk.prompt_ids(odd["question"]),
                tk.encode(odd["thinking"] + "\n") + split_marker(tk, "</think>") + tk.encode(odd["summary"]) + end))
    # 4. Empty thinking: "</think>" right away, then a summary with blank lines.
    out.append((tk.prompt_ids("Hello."), tk.encode("</think>\n\nHi.\n\n\nBye.") + end))
    return out


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("steps", ["sentence", "paragraph"])
def test_generate_tracks_the_rule(name, steps):
    tk, model = real(name), tiny(name)
    batch = rows(tk)
    end = (tk.encode(tk.end()) or [2])[-1]
    width = max(len(p) for p, _ in batch)
    input_ids = torch.tensor([[end] * (width - len(p)) + p for p, _ in batch])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in batch])
    scripts = [g for _, g in batch]
    new = max(map(len, scripts)) + 1
    assert width + new <= model.config.max_position_embeddings
    cfg = sf.StepFlowConfig.default_for(model)
    with sf.replace_attention(model, cfg, tokenizer=tk.tok, steps=steps, summary_steps=True) as handle:
        out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                             logits_processor=transformers.LogitsProcessorList([Script(scripts, width, end)]),
                             eos_token_id=end, pad_token_id=end)
        online = handle.segmentation()            # placed token by token while decoding
        offline = handle.segmentation(out)        # the whole output, placed offline
        counts = handle.trigger_counts()
    for r, script in enumerate(scripts):
        assert out[r, width:width + len(script)].tolist() == script
    fed = online.length
    assert fed == out.shape[1] - 1                # generate never feeds its last token
    full_mask = torch.cat([mask, torch.ones(len(batch), out.shape[1] - width, dtype=torch.long)], 1)
    opts = dict(tokenizer=tk.tok, steps=steps, summary_steps=True)
    again = segment(out[:, :fed], [len(p) for p, _ in batch], attention_mask=full_mask[:, :fed], **opts)
    assert torch.equal(online.seg_ids, again.seg_ids) and online.kinds == again.kinds
    assert online.closed == again.closed and online.closing == again.closing
    whole = segment(out, [len(p) for p, _ in batch], attention_mask=full_mask, **opts)
    assert torch.equal(offline.seg_ids, whole.seg_ids) and offline.kinds == whole.kinds
    assert torch.equal(offline.seg_ids[:, :fed], online.seg_ids)
    for r, (prompt, script) in enumerate(batch):
        ids = prompt + (script if script[-1] == end else script + [end])   # generate stops at the end token
        seg, kinds, closed, closing = char_reference(tk, ids, len(prompt), "<think>", "</think>", steps, True)
        got = offline.seg_ids[r, width - len(prompt):width - len(prompt) + len(ids)].tolist()
        assert got == seg, (name, r)
        assert offline.kinds[r][:len(kinds)] == kinds
        # several steps where the text has them (the sentence rule never splits Chinese: "。" is no ".")
        if r in ((1, 2) if steps == "sentence" else (0, 1, 2)):
            assert kinds.count("step") >= 2, (name, r, kinds)
    assert sum(counts["smi"].values()) > 0
