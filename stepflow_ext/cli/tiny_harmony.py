"""A random tiny GPT-OSS model and a harmony-format tokenizer (`stepflow make-tiny-model --arch gpt_oss`).

The tokenizer is a byte-level BPE with the harmony special tokens (`<|start|>`, `<|end|>`,
`<|message|>`, `<|channel|>`, `<|return|>`, ...) as added tokens; "analysis" and "final" are
ordinary text, as in GPT-OSS's own vocabulary, so the channel markers
`<|channel|>analysis<|message|>` and `<|channel|>final<|message|>` span several tokens. The chat
template ends the prompt with `<|start|>assistant`: the model itself writes the channel markers.

The model is a random GptOssForCausalLM: layers alternate sliding-window / full attention (a small
window, so that it binds on short sequences), a few experts, and attention-sink logits drawn
far from zero (the stock init puts them near 0, where they hardly matter).
"""
from __future__ import annotations

HARMONY_SPECIALS = ("<|endoftext|>", "<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|return|>",
                    "<|call|>", "<|constrain|>")
HARMONY_TEMPLATE = ("{% for m in messages %}<|start|>{{ m['role'] }}<|message|>{{ m['content'] }}<|end|>"
                    "{% endfor %}{% if add_generation_prompt %}<|start|>assistant{% endif %}")
HARMONY_CORPUS = [
    "<|start|>user<|message|>What is 12 + 7? Reason step by step.<|end|><|start|>assistant",
    "<|channel|>analysis<|message|>First, 12 + 7 means adding seven to twelve. So 12 + 7 = 19. "
    "Check: 19 - 7 = 12, which matches.<|end|><|start|>assistant<|channel|>final<|message|>"
    "The answer is \\boxed{19}.<|return|>",
    "<|channel|>analysis<|message|>We compute the product. Then we subtract the rest. Finally we divide it."
    "<|end|><|start|>assistant<|channel|>final<|message|>So the result is 49.<|return|>",
    "<|start|>system<|message|>You are a helpful assistant. Reasoning: medium<|end|>",
] * 20
# Qwen2's pre-tokenizer split (digits one by one, a letter run with its leading space).
PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def harmony_tokenizer(vocab_size: int = 400):
    """A PreTrainedTokenizerFast in the harmony format (see the module docstring)."""
    import transformers
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(PATTERN), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(HARMONY_SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(HARMONY_CORPUS, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|return|>",
                                                pad_token="<|endoftext|>")
    fast.chat_template = HARMONY_TEMPLATE
    return fast


def gpt_oss_config(vocab_size: int, layers: int = 4, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                   head_dim: int = 16, sliding_window: int = 8, experts: int = 4, pad_id: int = 0, eos_id: int = 0):
    """A tiny GptOssConfig: layers alternate sliding_attention (window `sliding_window`) / full_attention."""
    import transformers

    return transformers.GptOssConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, sliding_window=sliding_window,
        num_local_experts=experts, num_experts_per_tok=2, max_position_embeddings=4096, tie_word_embeddings=False,
        layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
        pad_token_id=pad_id, eos_token_id=eos_id, bos_token_id=pad_id)


def gpt_oss_model(vocab_size: int, seed: int = 0, sharpen: float = 1.0, dtype=None, **config):
    """A random GptOssForCausalLM (eager attention: GPT-OSS has no SDPA path; eager experts, which run in
    float64 too) with sink logits drawn from
    N(1, 1) per head, and the query scale multiplied by 4 * sharpen (peaky attention, as in the other
    tiny models: sharpen > 1 lets the Odds-Equal Bridge find starved bridges)."""
    import torch
    import transformers

    cfg = gpt_oss_config(vocab_size, **config)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager",
                                                          experts_implementation="eager", dtype=dtype or torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            attn.q_proj.weight.mul_(4.0 * sharpen)
            attn.q_proj.bias.mul_(4.0 * sharpen)
            if sharpen != 1.0:
                attn.k_proj.weight.mul_(sharpen)
                attn.k_proj.bias.mul_(sharpen)
            attn.sinks.copy_(torch.randn(attn.sinks.shape) + 1.0)
    return model.eval()
