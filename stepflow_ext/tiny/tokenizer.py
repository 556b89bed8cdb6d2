"""The tokenizer of the tiny reasoner: a small byte-level BPE trained on the task text.

It splits text like Qwen2 does (digits one by one, a letter run with its leading space), so
the model sees numbers digit by digit. "\\n\\n" (the step delimiter), "<think>" and "</think>"
are added tokens: each is always one id, as in DeepSeek-R1 / Qwen3 tokenizers. The chat
template opens the thinking, so generation starts with the first step.
"""
from __future__ import annotations

from .tasks import PROMPT_FORMAT, STEP_DELIMITER, THINK_END, generate, render

# Qwen2's pre-tokenizer pattern (single digits; letters keep one leading non-letter).
SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
EOS = "<|end|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [EOS, PAD, "<|user|>", "<|assistant|>", "<|system|>"]
THINK_TOKENS = [STEP_DELIMITER, "<think>", THINK_END]   # added, not special: they stay in decoded text
# Larger than the merges the corpus can use: training stops when every pre-token of the task
# text (" Let", " x", " =", a digit, ...) is one token, so a letter or symbol is always the same id.
VOCAB_SIZE = 512

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n<think>\n{% endif %}")
assert PROMPT_FORMAT == "<|user|>\n{question}\n<|assistant|>\n<think>\n"


def build_tokenizer(corpus_size: int = 3000, seed: int = 0):
    """A transformers PreTrainedTokenizerFast trained on `corpus_size` rendered problems of
    1..12 steps (deterministic for fixed arguments)."""
    import transformers
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [render(p) for p in generate(corpus_size, range(1, 13), seed)]
    tok.train_from_iterator(corpus, trainer)
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in THINK_TOKENS])  # after training
    # unk = pad: byte-level BPE never needs an unknown token, and naming an existing one stops
    # transformers' Qwen2Tokenizer (what AutoTokenizer picks for a qwen2 model) from adding
    # "<|endoftext|>" as a new id past the model's embedding.
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD, unk_token=PAD)
    fast.chat_template = CHAT_TEMPLATE
    return fast
