"""Small random Hugging Face models and a real byte-level BPE tokenizer for model-level tests."""
from __future__ import annotations

import functools

import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

CORPUS = [
    "Question: what is 12 + 7? Answer step by step.",
    "<think>First, 12 + 7 means adding seven to twelve.\n\nSo 12 + 7 = 19.\n\nCheck: 19 - 7 = 12.</think>",
    "The answer is \\boxed{19}.",
    "Let x = 3. Then 2x + 1 = 7.\n\nNext, square it: 49.\n\nDone.</think> So the result is 49.",
    "We compute the product.\n\nThen we subtract.\n\nFinally we divide.\n\n",
    "so x is 4\n\nthen y is 5\n\nhence z\n\n",
] * 20

# Qwen2's pre-tokenizer split: runs of newlines stay together (and after punctuation), so "\n\n"
# and ".\n\n" can become single tokens.
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")

ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral")


@functools.lru_cache(maxsize=None)
def tokenizer():
    """Byte-level BPE like Qwen2/DeepSeek: "\\n\\n" merges, "<think>" and "</think>" are added tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<think>", "</think>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                                pad_token="<|endoftext|>")
    return fast


def config(arch: str, layers: int = 4, hidden: int = 64, heads: int = 4, kv_heads: int = 2, vocab: int | None = None):
    vocab = vocab or len(tokenizer())
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
                  tie_word_embeddings=False, pad_token_id=0, eos_token_id=0, bos_token_id=0)
    if arch == "llama":
        return transformers.LlamaConfig(**common)
    if arch == "qwen2":
        return transformers.Qwen2Config(**common)
    if arch == "qwen3":
        return transformers.Qwen3Config(head_dim=hidden // heads, **common)
    if arch == "mistral":
        return transformers.MistralConfig(sliding_window=None, **common)
    raise ValueError(arch)


def model(arch: str, attn: str = "sdpa", dtype=torch.float32, seed: int = 0, sharpen: float = 1.0, **kw):
    """A random model; sharpen > 1 multiplies the query/key scale of every layer (so that attention is
    peaky enough for the Odds-Equal Bridge to find a starved bridge, as it does in real models)."""
    torch.manual_seed(seed)
    cfg = config(arch, **kw)
    cfg._attn_implementation = attn
    m = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=dtype)
    # Random init of tiny models gives near-uniform attention; sharpen it so the tests see structure.
    with torch.no_grad():
        for layer in m.model.layers:
            attn = layer.self_attn
            attn.q_proj.weight.mul_(4.0)
            if sharpen != 1.0:
                attn.q_proj.weight.mul_(sharpen)
                attn.k_proj.weight.mul_(sharpen)
                for norm in (getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)):  # Qwen3
                    if norm is not None:
                        norm.weight.mul_(sharpen ** 0.5)  # q.k grows by sharpen, as for the others
    return m.eval()


def left_padded_batch(tok, prompts, trace="", **segment_kwargs):
    """The prompts (each + `trace`), left padded to one width: (ids, mask, segmentation), the
    segmentation from stepflow_ext.segment with each prompt's length as its question."""
    import stepflow_ext as sf

    rows = [tok(p + trace)["input_ids"] for p in prompts]
    prompt_lens = [len(tok(p)["input_ids"]) for p in prompts]
    width = max(map(len, rows))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask, sf.segment(ids, prompt_lens, tokenizer=tok, attention_mask=mask, **segment_kwargs)
