"""`stepflow make-tiny-model`: a random tiny model, tokenizer and canned traces to try the commands offline."""
from __future__ import annotations

import os

import numpy as np

from ..traces import TraceWriter
from .common import RAW


TINY_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n<think>\n{% endif %}")


def tiny_traces(count: int = 4, seed: int = 0) -> list[dict]:
    """Canned {question, thinking, summary} traces: sums of 2..10 numbers, one step per addition."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        terms = [int(x) for x in rng.integers(2, 20, size=2 + (i * 5) % 11)]
        steps, total = [f"We need the sum of {', '.join(map(str, terms))}.", f"Start with {terms[0]}."], terms[0]
        for t in terms[1:]:
            total += t
            steps.append(f"Add {t}: {total - t} + {t} = {total}.")
        steps.append(f"Check: the total is {total}.")
        out.append({"id": f"sum{i}", "question": f"What is {' + '.join(map(str, terms))}? Reason step by step.",
                    "thinking": "\n\n".join(steps), "summary": f"The answer is \\boxed{{{total}}}."})
    return out


ARCHS = ("qwen2", "gpt_oss")


def make_tiny_model(directory, layers: int = 4, hidden: int = 64, seed: int = 0, arch: str = "qwen2") -> list[str]:
    """A random causal LM and a byte-level BPE tokenizer saved in `directory`, plus canned traces.

    arch "qwen2" (default): a Qwen2 model; the tokenizer has "\\n\\n", "<think>", "</think>" tokens and a
    chat template that opens the thinking. arch "gpt_oss": a GPT-OSS model (sliding-window / full layers
    in turn, attention sinks, a few experts) and a harmony-format tokenizer (stepflow_ext.cli.tiny_harmony).
    Noise, honestly: the weights are random (attention sharpened so the maps show some structure)."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    if arch == "gpt_oss":
        return _write(directory, *_gpt_oss(layers, hidden, seed))
    import torch
    import transformers
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    traces = tiny_traces()
    corpus = [t["question"] + "\n" + t["thinking"] + "\n</think>\n\n" + t["summary"] for t in traces]
    corpus += ["Question: what is 12 + 7? Answer step by step.", "First, add.\n\nThen check.\n\nDone.</think>"] * 3
    tok = Tokenizer(models.BPE())
    pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<think>", "</think>", "<|user|>", "<|assistant|>", "<|system|>"]
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus * 10, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                                pad_token="<|endoftext|>")
    fast.chat_template = TINY_TEMPLATE
    eos = fast.eos_token_id
    config = transformers.Qwen2Config(vocab_size=len(fast), hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=4096, tie_word_embeddings=False, pad_token_id=eos,
                                      eos_token_id=eos, bos_token_id=eos)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
    return _write(directory, model, fast, traces)


def _gpt_oss(layers, hidden, seed):
    from .tiny_harmony import gpt_oss_model, harmony_tokenizer

    tok = harmony_tokenizer()
    model = gpt_oss_model(len(tok), seed=seed, layers=layers, hidden=hidden, heads=4, kv_heads=2,
                          head_dim=hidden // 4, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id)
    return model, tok, tiny_traces()


def _write(directory, model, fast, traces) -> list[str]:
    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(directory)
    fast.save_pretrained(directory)
    with TraceWriter(os.path.join(directory, "traces.jsonl")) as w:
        for t in traces:
            w.write(t)
    with open(os.path.join(directory, "prompts.txt"), "w") as f:
        f.write("What is 12 + 7? Reason step by step.\nWhat is 3 + 4 + 5?\n")
    return sorted(os.listdir(directory))


def cmd_make_tiny_model(args) -> int:
    files = make_tiny_model(args.dir, layers=args.layers, arch=args.arch)
    print(f"wrote {args.dir}/: {', '.join(files)}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("make-tiny-model", formatter_class=RAW, help="a random tiny model to try the commands offline",
                       description="Write a random 4-layer causal LM and a byte-level BPE tokenizer to DIR: with\n"
                                   "--arch qwen2 (default) a Qwen2 model and a chat template that opens <think>;\n"
                                   "with --arch gpt_oss a GPT-OSS model (sliding-window and full layers in turn,\n"
                                   "attention sinks, 4 experts) and a harmony-format tokenizer (the model writes\n"
                                   "the <|channel|>analysis / final markers itself). Also DIR/traces.jsonl (canned\n"
                                   "{question, thinking, summary} traces) and DIR/prompts.txt. The weights are\n"
                                   "random: its generations are noise and rarely contain steps or a summary,\n"
                                   "which is why analyze/compare examples use the canned traces.",
                       epilog="example:\n  stepflow make-tiny-model tiny && stepflow analyze --model tiny "
                              "--traces tiny/traces.jsonl --out runs/analyze")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--layers", type=int, default=4, help="decoder layers (default 4)")
    p.add_argument("--arch", choices=ARCHS, default="qwen2",
                   help="qwen2 (default: <think> markers) or gpt_oss (harmony channels, attention sinks,\n"
                        "sliding-window layers)")
    p.set_defaults(func=cmd_make_tiny_model)
