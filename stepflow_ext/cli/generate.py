"""`stepflow generate`: reasoning traces, optionally under StepFlow, written with their segmentation."""
from __future__ import annotations

import sys
from types import SimpleNamespace

from ..traces import TraceError, TraceWriter, apply_template, encode_prompt, eos_ids, read_prompts
from .common import (RAW, UsageError, engine_options, err, escapes, exit_status, load_config, load_model,
                     model_options, segmentation_options, served_model, vllm_generator)


def _prompt_text(item, tok, use_template):
    """(prompt text, templated?, question) for one prompt item of `stepflow generate`."""
    if "prompt" in item:
        value = item["prompt"]
        if isinstance(value, list):
            text, templated = apply_template(tok, value, True)
            return text, templated, None
        return value, False, None
    value = item["question"]
    messages = value if isinstance(value, list) else [{"role": "user", "content": value}]
    text, templated = apply_template(tok, messages, use_template)
    return text, templated, value


def cmd_generate(args) -> int:
    import torch
    from tqdm import tqdm
    from transformers import TextStreamer

    import stepflow_ext as sf

    if args.prompt is not None:
        prompts, errors = [{"question": escapes(args.prompt) if args.escapes else args.prompt, "_line": 0}], []
    else:
        try:
            prompts, errors = read_prompts(args.prompts)
        except OSError as e:
            raise UsageError(f"cannot read prompts: {e}") from None
    if args.max_new_tokens < 1:
        raise UsageError("--max-new-tokens must be >= 1")
    if args.temperature < 0:
        raise UsageError("--temperature must be >= 0 (0 is greedy decoding)")
    vllm = args.engine == "vllm"
    tok, model = served_model(args) if vllm else load_model(args)
    if args.no_chat_template is False and not getattr(tok, "chat_template", None):
        err(f"note: the tokenizer of {args.model} has no chat template; prompts are used as plain text")
    cfg = load_config(args.stepflow, model) if args.stepflow else None
    rule = segmentation_options(args)
    eos = eos_ids(model, tok)
    device = "cpu" if vllm else next(model.parameters()).device
    stream = args.prompt is not None and not args.no_stream and not vllm
    streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=False) if stream else None
    gen_kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                      pad_token_id=tok.pad_token_id)
    if args.temperature > 0:
        gen_kwargs.update(temperature=args.temperature, top_p=args.top_p)
    torch.manual_seed(args.seed)
    engine = None
    if vllm:   # the same settings as the HF engine's; vLLM samples with a per-prompt seed (args.seed + index)
        settings = SimpleNamespace(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                                   seed=args.seed, segmentation=lambda: rule)
        engine = vllm_generator(args, tok, settings, eos, cfg, model.config)
    handle = sf.replace_attention(model, cfg, tokenizer=tok, **rule) if cfg is not None and not vllm else None
    batch_size = 1 if stream else max(1, args.batch_size)
    written = 0
    try:
        with TraceWriter(args.out) as writer, tqdm(total=len(prompts), unit="prompt", disable=stream,
                                                     desc="generate", file=sys.stderr) as bar:
            for start in range(0, len(prompts), batch_size):
                items = prompts[start:start + batch_size]
                try:
                    built = [_prompt_text(item, tok, not args.no_chat_template) for item in items]
                    rows = [encode_prompt(tok, text, templated) for text, templated, _ in built]
                    width = max(map(len, rows))
                    if engine is not None:
                        asks = [SimpleNamespace(prompt_ids=r, seed=args.seed + start + i) for i, r in enumerate(rows)]
                        out = engine.token_ids(asks)
                    else:
                        ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows], device=device)
                        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
                        with torch.no_grad():
                            out = model.generate(input_ids=ids, attention_mask=mask, streamer=streamer, **gen_kwargs)
                except Exception as e:  # noqa: BLE001 - one failing batch must not stop the others
                    for item in items:
                        errors.append(TraceError(args.prompts or "--prompt", item["_line"], "",
                                                 f"generation failed: {type(e).__name__}: {e}"))
                    bar.update(len(items))
                    continue
                for row, (item, (text, _, question)) in enumerate(zip(items, built)):
                    gen = list(out[row]) if engine is not None else out[row, width:].tolist()
                    cut = next((i for i, t in enumerate(gen) if t in eos), None)
                    finish = "eos" if cut is not None else "length"
                    gen = gen[:cut + 1] if cut is not None else gen
                    full = rows[row] + gen
                    seg = sf.segment(torch.tensor([full]), [len(rows[row])], tokenizer=tok, **rule)
                    completion = tok.decode(gen, skip_special_tokens=False, clean_up_tokenization_spaces=False)
                    record = {k: v for k, v in item.items() if not k.startswith("_")}
                    if isinstance(record.get("prompt"), list):
                        record["messages"] = record.pop("prompt")
                    if question is not None:
                        record["question"] = question
                    record.update({
                        "prompt": text, "completion": completion, "text": text + completion,
                        "input_ids": full, "prompt_len": len(rows[row]),
                        "segments": {"kinds": seg.kinds[0], "lengths": seg.lengths()[0]},
                        "stepflow": cfg.to_dict() if cfg is not None else None, "model": args.model,
                        "generation": {k: v for k, v in gen_kwargs.items() if k != "pad_token_id"} | {
                            "seed": args.seed, "finish": finish, "engine": args.engine},
                    })
                    writer.write(record)
                    written += 1
                    if stream:
                        print(flush=True)
                        kinds = seg.kinds[0]
                        err(f"[{len(gen)} tokens, {kinds.count('step')} steps, "
                            f"{'a summary' if 'summary' in kinds else 'no summary'}, stopped at {finish}]")
                bar.update(len(items))
    finally:
        if handle is not None:
            handle.restore()
    err(f"wrote {written} trace{'s' if written != 1 else ''} to {args.out}")
    return exit_status(errors, "prompt")


def add_parser(sub) -> None:
    p = sub.add_parser("generate", formatter_class=RAW, help="generate reasoning traces (optionally under StepFlow)",
                       description="Generate reasoning traces and write them, with their segmentation, as JSONL.\n"
                                   "The tokenizer's chat template is applied to each prompt. A single --prompt\n"
                                   "streams its tokens to the terminal; a --prompts file shows a progress bar.",
                       epilog="examples:\n"
                              "  stepflow generate --model deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B \\\n"
                              "      --prompt 'What is 12 + 7? Reason step by step.' --max-new-tokens 1024 --out gen.jsonl\n"
                              "  stepflow generate --model tiny --prompts tiny/prompts.txt --stepflow stepflow.json "
                              "--out gen.jsonl\n\n"
                              "prompt files: .jsonl/.json with {\"question\": ...} (chat template applied) or\n"
                              "{\"prompt\": TEXT} (verbatim) per line, other fields kept; any other file: one\n"
                              "question per line (\\n for a newline).\n"
                              "output lines: question, prompt, completion, text, input_ids, prompt_len,\n"
                              "segments {kinds, lengths}, stepflow (config or null), model, generation;\n"
                              "`stepflow analyze` reads them back exactly (input_ids + prompt_len).")
    model_options(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", metavar="TEXT", help="one question (its tokens stream to the terminal)")
    src.add_argument("--prompts", metavar="FILE", help="a file of prompts (see below)")
    p.add_argument("--out", required=True, metavar="FILE", help="output JSONL file")
    p.add_argument("--stepflow", metavar="CONFIG.json", help="generate under StepFlow with this StepFlowConfig")
    p.add_argument("--max-new-tokens", type=int, default=1024, metavar="N", help="default 1024")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; > 0: sampling")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling with --temperature > 0 (default 1)")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling (default 0)")
    p.add_argument("--batch-size", type=int, default=1, metavar="N", help="prompts per generate call (left padded)")
    p.add_argument("--no-stream", action="store_true", help="do not stream the tokens of a single --prompt")
    p.add_argument("--escapes", action="store_true", help="read backslash escapes (\\n) in --prompt")
    engine_options(p)
    p.set_defaults(func=cmd_generate)
