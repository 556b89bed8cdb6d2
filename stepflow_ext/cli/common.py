"""What every command shares: errors and tables, model loading, the model and segmentation options,
the parser and running a command.

The command modules import this one; it imports none of them (nor anything else of the CLI).
"""
from __future__ import annotations

import argparse
import time

from ..console import UsageError, err, escapes, print_table  # noqa: F401  (the commands take them from here)

RAW = argparse.RawDescriptionHelpFormatter


DTYPES = {"auto": "auto", "float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


def load_model(args):
    """(tokenizer, model) from a local directory or a hub id, in eval mode on args.device."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .. import hf

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    kwargs = {"trust_remote_code": bool(args.trust_remote_code)}
    try:
        tok = AutoTokenizer.from_pretrained(args.model, **kwargs)
        model_kwargs = dict(kwargs, dtype=DTYPES[args.dtype])
        if args.attn_implementation:
            model_kwargs["attn_implementation"] = args.attn_implementation
        # transformers prefers model.safetensors and falls back to pytorch_model.bin only when it is absent.
        model = AutoModelForCausalLM.from_pretrained(args.model, **model_kwargs)
    except (OSError, ValueError, ImportError) as e:
        raise UsageError(f"cannot load model {args.model!r}: {e}") from None
    try:
        model = model.to(device).eval()
    except (RuntimeError, AssertionError) as e:
        raise UsageError(f"cannot move the model to {device!r}: {e}") from None
    try:
        hf.check_model(model)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok, model


def load_config(path, model):
    from .. import hf
    from ..config import StepFlowConfig

    try:
        cfg = StepFlowConfig.from_json(path)
        cfg.check_layers(model.num_layers if hasattr(model, "num_layers") else hf.num_layers(model))
    except OSError as e:
        raise UsageError(f"cannot read the StepFlow config {path!r}: {e}") from None
    except ValueError as e:
        raise UsageError(f"StepFlow config {path}: {e}") from None
    return cfg


def segmentation_options(args) -> dict:
    """The segmentation options of the command line (the `segmentation` group), as segment() takes them."""
    start = escapes(args.think_start)
    # --preset paper is the paper's analysis: sentence steps (the default) and the summary split at "\n\n".
    summary_steps = args.summary_steps or getattr(args, "preset", None) == "paper"
    return {"think_start": None if start.lower() == "none" else start, "think_end": escapes(args.think_end),
            "steps": args.steps, "summary_steps": summary_steps, "step_delimiter": escapes(args.step_delimiter)}


def model_options(p, model_required=True):
    g = p.add_argument_group("model")
    g.add_argument("--model", required=model_required, metavar="M",
                   help="a local directory (save_pretrained) or a Hugging Face hub id of a causal LM "
                        "(Llama, Qwen2, Qwen3, Mistral; e.g. deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    g.add_argument("--dtype", default="auto", choices=sorted(DTYPES), metavar="{auto,float32,bfloat16,float16}",
                   help="weights dtype (default: auto, the checkpoint's own; fp32/bf16/fp16 also work)")
    g.add_argument("--attn-implementation", default=None, metavar="IMPL",
                   help="the model's attention kernel: sdpa (transformers' default), eager, flash_attention_2, ...")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="allow code from the model repository to run (off by default)")
    s = p.add_argument_group("segmentation (docs/method.md section 1; the paper's rule by default)")
    s.add_argument("--think-start", default="auto", metavar="TEXT",
                   help="marker that opens the thinking: auto (default: <think> for R1-Distill / QwQ / Qwen3, "
                        "<|channel|>analysis<|message|> for GPT-OSS), a text, or none (the prompt is the question)")
    s.add_argument("--think-end", default="auto", metavar="TEXT",
                   help="marker that ends the thinking: auto (default: </think>, or <|channel|>final<|message|> "
                        "for GPT-OSS) or a text; backslash escapes allowed")
    s.add_argument("--steps", default="sentence", choices=("sentence", "paragraph"),
                   help="how the thinking splits into steps: sentence (default, the paper's: sentences of >= 15 "
                        "characters ending in '. ') or paragraph (a step ends at --step-delimiter)")
    s.add_argument("--summary-steps", action="store_true",
                   help="split the summary at --step-delimiter too (the paper's offline maps do)")
    s.add_argument("--step-delimiter", default="\\n\\n", metavar="TEXT",
                   help="the paragraph delimiter, backslash escapes allowed (default: '\\n\\n')")
    s.add_argument("--no-chat-template", action="store_true",
                   help="use questions as plain text instead of applying the tokenizer's chat template")


def engine_options(p):
    """--engine and what vLLM takes (stepflow_ext.vllm.engine; docs/vllm.md)."""
    g = p.add_argument_group("engine")
    g.add_argument("--engine", default="hf", choices=("hf", "vllm"),
                   help="hf (default): transformers' generate with replace_attention; vllm: vLLM with the StepFlow "
                        "plugin (paged KV cache, continuous batching; vLLM must be installed, docs/vllm.md)")
    g.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N", help="vLLM: GPUs per model (default 1)")
    g.add_argument("--data-parallel-size", type=int, default=1, metavar="N",
                   help="vLLM: model replicas (default 1)")
    g.add_argument("--max-model-len", type=int, default=None, metavar="N",
                   help="vLLM: longest prompt + completion (default: the model's)")


def vllm_generator(args, tok, settings, eos, config, hf_config=None):
    """The VLLMGenerator of --engine vllm (UsageError when vLLM is missing or refuses the options)."""
    from ..vllm.engine import VLLMGenerator

    for name in ("tensor_parallel_size", "data_parallel_size"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1")
    try:
        return VLLMGenerator(args.model, tok, settings, eos, config, dtype=DTYPES[args.dtype],
                             tensor_parallel_size=args.tensor_parallel_size,
                             data_parallel_size=args.data_parallel_size, max_model_len=args.max_model_len,
                             trust_remote_code=bool(args.trust_remote_code), hf_config=hf_config)
    except ValueError as e:
        raise UsageError(f"--engine vllm: {e}") from None


def served_model(args):
    """(tokenizer, config-only model) for --engine vllm: the tokenizer and Hugging Face config, no weights
    (vLLM loads those); the config-only model has .config and .generation_config for eos_ids and the
    StepFlow config's layer check."""
    from types import SimpleNamespace

    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from ..vllm.engine import num_layers

    kwargs = {"trust_remote_code": bool(args.trust_remote_code)}
    try:
        tok = AutoTokenizer.from_pretrained(args.model, **kwargs)
        config = AutoConfig.from_pretrained(args.model, **kwargs)
    except (OSError, ValueError, ImportError) as e:
        raise UsageError(f"cannot load the tokenizer or config of {args.model!r}: {e}") from None
    try:
        generation = GenerationConfig.from_pretrained(args.model)
    except OSError:
        generation = None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok, SimpleNamespace(config=config, generation_config=generation, num_layers=num_layers(config))


def exit_status(errors, what="trace") -> int:
    """0 when nothing failed; else the failures listed on stderr, and 1."""
    if not errors:
        return 0
    err(f"\n{len(errors)} {what}{'s' if len(errors) != 1 else ''} failed:")
    for e in errors:
        err(f"  {e}")
    return 1


def command_parser(commands, **kwargs) -> argparse.ArgumentParser:
    """The `stepflow` parser with the subcommands of these command modules (each one's add_parser), in order."""
    parser = argparse.ArgumentParser(prog="stepflow", formatter_class=RAW, **kwargs)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in commands:
        command.add_parser(sub)
    return parser


def dispatch(parser, argv=None) -> int:
    """Parse argv with `parser` and run the command: its exit status, 2 for a usage error, 130 when
    interrupted. The long-running commands end with the time they took."""
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    start = time.time()
    try:
        status = args.func(args)
    except UsageError as e:
        err(f"stepflow {args.command}: error: {e}")
        return 2
    except KeyboardInterrupt:
        err("interrupted")
        return 130
    if args.command in ("analyze", "compare", "generate", "eval", "sweep"):
        err(f"done in {time.time() - start:.1f} s")
    return status
