"""`stepflow eval`: accuracy of a model on a benchmark, optionally under StepFlow or a control.

Exit status, as for the other commands: 0 when everything ran, 1 when some data lines or samples
failed (listed at the end; the rest ran and are in the outputs), 2 for a usage error.
"""
from __future__ import annotations

from ..config import CONTROLS
from ..eval.run import evaluate, read_failures, report_failures
from ..eval.runner import CompletionsFile
from ..traces import eos_ids
from .common import RAW, UsageError, engine_options, err, model_options, served_model, vllm_generator
from .common_eval import (eval_settings, generation_options, grade_limits, load_data, load_model_for_eval, setup,
                          stepflow_config)


EVAL_OUTPUT = """\
output DIR: settings.json (what identifies the run), rows.jsonl (one row per item and sample, appended
as each is graded: item_id, sample, prompt, completion, extracted, correct, detail, tokens, time_s,
seed, sampling settings, stepflow, control, model), errors.jsonl, summary.json (counts, pass@1 /
avg@K / pass@K with a 95% bootstrap CI, per-item correctness) and a table in the terminal.
Rerunning with the same --out resumes: finished samples are skipped, a line cut off by a killed run
is redone, nothing is duplicated; a rerun with other settings is refused.
"""


def load_tokenizer(args):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(args.model, trust_remote_code=bool(args.trust_remote_code))
    except (OSError, ValueError, ImportError) as e:
        raise UsageError(f"cannot load the tokenizer of {args.model!r}: {e}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def cmd_eval(args) -> int:
    if args.batch_size < 1:
        raise UsageError("--batch-size must be >= 1")
    grade_options = grade_limits(args)
    control = None if args.control in (None, "none") else args.control
    if control is not None and (args.stepflow is None or args.stepflow.lower() == "none"):
        raise UsageError(f"--control {control} needs a StepFlow config (--stepflow CONFIG.json or --stepflow default): "
                         "it perturbs the same layers with the same strengths")
    completions = None
    if args.completions_from:
        if args.stepflow not in (None, "none") or control:
            raise UsageError("--completions-from grades given completions: --stepflow and --control do not apply")
        try:
            completions = CompletionsFile(args.completions_from)
        except (OSError, ValueError) as e:
            raise UsageError(f"--completions-from: {e}") from None
    vllm = args.engine == "vllm" and completions is None
    if vllm and control is not None:
        raise UsageError("--control is not available with --engine vllm yet: use --engine hf")
    if vllm and getattr(args, "device_map", None):
        raise UsageError("--device-map is for the HF engine; vLLM spreads a model with --tensor-parallel-size")
    items, data_errors = load_data(args.data, args.task, args.limit)
    job, device = setup(args)
    generator = None
    try:
        if vllm and job.world > 1:
            raise UsageError("--engine vllm runs in one process (vLLM starts its own workers): use "
                             "--data-parallel-size / --tensor-parallel-size instead of torchrun")
        if completions is not None:
            tok, model, config = load_tokenizer(args), None, None
        elif vllm:
            tok, model = served_model(args)
            config = stepflow_config(args.stepflow, model)
        else:
            tok, model = load_model_for_eval(args, device)
            config = stepflow_config(args.stepflow, model)
        settings = eval_settings(args, args.data, args.task, config.to_dict() if config else None, control)
        try:
            settings.check()
        except ValueError as e:
            raise UsageError(str(e)) from None
        if settings.samples > 1 and settings.temperature == 0 and job.main:
            err(f"note: --samples {settings.samples} with --temperature 0: greedy samples are all the same")
        if job.main:
            for e in data_errors:
                err(f"skipping {e}")
        if not items and job.main:
            err(f"no usable items in {args.data}")
        if vllm and items:
            generator = vllm_generator(args, tok, settings, eos_ids(model, tok), config, model.config)
        status, _ = evaluate(settings, items, data_errors, args.out, model=model, tokenizer=tok, config=config,
                             job=job, batch_size=args.batch_size, grade_options=grade_options,
                             grade_workers=args.grade_workers, device=device, completions=completions,
                             progress=not args.no_progress, generator=generator)
        if job.main:
            failures = read_failures(args.out)
            report_failures(data_errors, failures)
        if not items:
            status = 1
        return status
    finally:
        job.close()


def add_parser(sub) -> None:
    p = sub.add_parser("eval", formatter_class=RAW, help="accuracy of a model on a benchmark (optionally under "
                       "StepFlow or a control)",
                       description="Generate answers to every item of a data set (chat template + a task\n"
                                   "instruction), grade them (math: math-verify on the last \\boxed{}; mcq: the\n"
                                   "letter; code: the program against its tests in a sandboxed process) and\n"
                                   "write one row per item and sample. Under torchrun, items are sharded\n"
                                   "over the ranks and merged by rank 0.",
                       epilog="examples:\n"
                              "  stepflow eval --model tiny --data tests/fixtures/eval/gsm8k.jsonl --task math "
                              "--max-new-tokens 16 --out runs/base\n"
                              "  stepflow eval --model deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B --data math500.jsonl "
                              "--task math \\\n"
                              "      --stepflow default --samples 4 --temperature 0.6 --top-p 0.95 --out runs/sf\n"
                              "  torchrun --nproc_per_node 8 -m stepflow_ext.cli eval --model M --data gpqa.jsonl "
                              "--task mcq --out runs/gpqa\n"
                              "  stepflow eval --engine vllm --tensor-parallel-size 2 --model M --data aime.jsonl "
                              "--task math --stepflow default --out runs/sf-vllm\n\n"
                              "data: a local .jsonl (GSM8K, MATH-500, AIME, GPQA-Diamond, LiveCodeBench shapes) or\n"
                              "hf:NAME[:split] (needs the datasets package and a network). Bad lines are reported\n"
                              "as FILE:LINE: FIELD: problem; the other items still run (exit status 1).\n"
                              + EVAL_OUTPUT)
    model_options(p)
    p.add_argument("--data", required=True, metavar="SOURCE", help="a .jsonl file or hf:NAME[:split]")
    p.add_argument("--task", required=True, choices=("math", "mcq", "code"), help="how prompts are built and graded")
    p.add_argument("--out", required=True, metavar="DIR", help="run directory (created; resumed if it exists)")
    p.add_argument("--stepflow", default="none", metavar="CONFIG.json|default|none",
                   help="generate under StepFlow: a StepFlowConfig JSON, default (StepFlowConfig.default_for the "
                        "model) or none (default: none, the baseline)")
    p.add_argument("--control", default="none", choices=("none", *CONTROLS),
                   help="instead of StepFlow, a control in the same layers with the same sizes (docs/method.md, "
                        "Controls); needs --stepflow")
    p.add_argument("--control-seed", type=int, default=0, metavar="S", help="seed of the control's random "
                   "groups/directions (default 0)")
    p.add_argument("--completions-from", default=None, metavar="FILE",
                   help="grade these completions instead of generating: JSONL {item_id, sample, completion}")
    generation_options(p)
    engine_options(p)
    p.set_defaults(func=cmd_eval)
