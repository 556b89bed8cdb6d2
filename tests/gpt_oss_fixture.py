"""A random tiny GPT-OSS (sliding window 8 on even layers, attention sinks far from zero, 4 experts)
and a harmony-format byte-level BPE tokenizer, for model-level tests (stepflow_ext.cli.tiny_harmony)."""
from __future__ import annotations

import functools

from stepflow_ext.cli.tiny_harmony import gpt_oss_model, harmony_tokenizer

WINDOW = 8
# A harmony prompt (the chat template's layout) and a completion the model writes: the analysis
# channel (thinking, sentences that close steps), then the final channel (summary).
PROMPTS = ["<|start|>user<|message|>What is 12 + 7?<|end|><|start|>assistant",
           "<|start|>user<|message|>Let x = 3. Then 2x + 1 = 7? Reason step by step.<|end|><|start|>assistant"]
TRACE = ("<|channel|>analysis<|message|>First, 12 + 7 means adding seven to twelve. So 12 + 7 = 19 and 3.5 is "
         "not needed. Yes. Check: 19 - 7 = 12, which matches.<|end|><|start|>assistant<|channel|>final<|message|>"
         "The answer is \\boxed{19}.")


@functools.lru_cache(maxsize=None)
def tokenizer():
    return harmony_tokenizer()


def model(seed: int = 0, sharpen: float = 1.0, **kw):
    tok = tokenizer()
    kw.setdefault("sliding_window", WINDOW)
    return gpt_oss_model(len(tok), seed=seed, sharpen=sharpen, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, **kw)
