"""The packaged tiny reasoner: its architecture, loading it offline, and greedy solving.

The weights live in stepflow_ext/data/tiny_reasoner/ (written by scripts/train_tiny_reasoner.py).
"""
from __future__ import annotations

import os

from .tasks import Problem, boxed_answer

PACKAGED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "tiny_reasoner")
MAX_NEW_TOKENS_PER_STEP = 24   # a step is ~16 tokens; the summary ~12


def new_model(vocab_size: int, eos_id: int, pad_id: int, layers: int = 4, hidden: int = 192,
              intermediate: int = 512, heads: int = 6, kv_heads: int = 2, seed: int = 0):
    """A freshly initialized Qwen2ForCausalLM of the tiny reasoner's shape (seeded)."""
    import torch
    import transformers

    config = transformers.Qwen2Config(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=2048,
        rope_theta=10000.0, tie_word_embeddings=True, eos_token_id=eos_id, bos_token_id=eos_id,
        pad_token_id=pad_id, use_cache=True)
    torch.manual_seed(seed)
    return transformers.Qwen2ForCausalLM(config)


def load_default(device="cpu", dtype=None, path: str | None = None):
    """(model, tokenizer) of the packaged tiny reasoner, loaded offline, in eval mode.

    dtype: a torch dtype (default: the stored one, float32)."""
    import torch
    import transformers

    path = path or PACKAGED_DIR
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"no tiny reasoner at {path!r} (config.json missing): was the package installed with its "
                         "data files, or has scripts/train_tiny_reasoner.py been run?")
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype must be a torch.dtype or None, got {dtype!r}")
    tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    kwargs = {"local_files_only": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs).to(device).eval()
    return model, tok


def generate_completions(model, tok, questions: list, max_new_tokens: int | None = None,
                         batch_size: int = 32) -> list[str]:
    """Greedy completions (text after the prompt, special tokens dropped) of `questions`
    (strings or Problems), batched with left padding and the KV cache."""
    import torch

    texts = [q.question if isinstance(q, Problem) else q for q in questions]
    if max_new_tokens is None:
        max_new_tokens = MAX_NEW_TOKENS_PER_STEP * (max(t.count("Let ") for t in texts) + 1) if texts else 0
    device = next(model.parameters()).device
    side, tok.padding_side = tok.padding_side, "left"
    out = []
    try:
        for i in range(0, len(texts), batch_size):
            prompts = [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                               tokenize=False) for t in texts[i:i + batch_size]]
            enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            with torch.no_grad():
                ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            out += tok.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tok.padding_side = side
    return out


def is_correct(completion: str, answer) -> bool:
    """Exact match of the last \\boxed{} in `completion` with the answer."""
    got = boxed_answer(completion)
    return got is not None and got == str(answer).strip()
