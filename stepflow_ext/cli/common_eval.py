"""What `eval` and `sweep` share: loading the model (or spreading it with --device-map), the StepFlow
config and the data; the run's settings; torchrun setup; the generation and grading options."""
from __future__ import annotations

import copy
import importlib.util

from ..eval import distributed
from ..eval.runner import EvalSettings, file_sha256
from .common import DTYPES, UsageError, load_config, load_model, segmentation_options


def load_model_for_eval(args, device: str):
    """(tokenizer, model): cli.load_model, or accelerate's device_map when --device-map is given."""
    if not getattr(args, "device_map", None):
        local = copy.copy(args)
        local.device = device
        return load_model(local)
    if importlib.util.find_spec("accelerate") is None:
        raise UsageError("--device-map needs the `accelerate` package (pip install accelerate); "
                         "without it use --device to put the whole model on one device")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .. import hf

    kwargs = {"trust_remote_code": bool(args.trust_remote_code)}
    try:
        tok = AutoTokenizer.from_pretrained(args.model, **kwargs)
        model_kwargs = dict(kwargs, dtype=DTYPES[args.dtype], device_map=args.device_map)
        if args.attn_implementation:
            model_kwargs["attn_implementation"] = args.attn_implementation
        model = AutoModelForCausalLM.from_pretrained(args.model, **model_kwargs).eval()
        hf.check_model(model)
    except (OSError, ValueError, ImportError) as e:
        raise UsageError(f"cannot load model {args.model!r} with device_map={args.device_map!r}: {e}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok, model


def stepflow_config(spec, model):
    """--stepflow none | default | CONFIG.json -> StepFlowConfig or None."""
    from ..config import StepFlowConfig

    if spec is None or spec.lower() == "none":
        return None
    if spec.lower() == "default":
        return StepFlowConfig.default_for(model.num_layers if hasattr(model, "num_layers") else model)
    return load_config(spec, model)


def load_data(source, task, limit):
    from ..eval.data import load_items

    if limit is not None and limit < 0:
        raise UsageError("--limit must be >= 0")
    try:
        return load_items(source, task, limit)
    except ValueError as e:
        raise UsageError(f"--data {source}: {e}") from None


def grade_limits(args) -> dict:
    if args.code_time_limit <= 0:
        raise UsageError("--code-time-limit must be > 0")
    if args.code_memory_mb < 16:
        raise UsageError("--code-memory-mb must be >= 16")
    return {"time_limit": args.code_time_limit, "memory_mb": args.code_memory_mb}


def eval_settings(args, data, task, stepflow=None, control=None) -> EvalSettings:
    return EvalSettings(model=args.model, data=data, task=task, stepflow=stepflow, control=control,
                        control_seed=args.control_seed, samples=args.samples, max_new_tokens=args.max_new_tokens,
                        temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                        chat_template=not args.no_chat_template, instruction=args.instruction,
                        **segmentation_options(args), dtype=args.dtype,
                        completions_from=getattr(args, "completions_from", None), data_sha256=file_sha256(data),
                        engine=getattr(args, "engine", "hf"))


def setup(args):
    """(job, device): torch.distributed started when torchrun launched us."""
    try:
        job = distributed.from_env()
    except ValueError as e:
        raise UsageError(str(e)) from None
    if job.world > 1 and getattr(args, "device_map", None):
        raise UsageError("--device-map splits one model over the GPUs of one process; it cannot be combined "
                         "with torchrun ranks (use one or the other)")
    try:
        device = distributed.device_for(job, args.device)
    except ValueError as e:
        raise UsageError(str(e)) from None
    distributed.init(job, device)
    return job, device


def generation_options(p):
    g = p.add_argument_group("generation")
    g.add_argument("--samples", type=int, default=1, metavar="K", help="samples per item (default 1; avg@K, pass@K)")
    g.add_argument("--max-new-tokens", type=int, default=4096, metavar="N", help="default 4096")
    g.add_argument("--temperature", type=float, default=0.0,
                   help="0 (default): greedy; > 0: sampling with one random stream per item and sample")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling with --temperature > 0 (default 1)")
    g.add_argument("--seed", type=int, default=0,
                   help="sample k of item i is seeded from (seed, i, k) whatever batch or rank it is in (default 0)")
    g.add_argument("--instruction", default="default", metavar="TEXT",
                   help="what follows the question in the user message: default (the task's instruction, "
                        "e.g. 'Please reason step by step, and put your final answer within \\boxed{}.'), "
                        "none (the bare question, for models trained without one), or your own TEXT")
    g.add_argument("--batch-size", type=int, default=8, metavar="B", help="sequences per generate call, left "
                   "padded (default 8)")
    g.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N items of the data")
    g.add_argument("--device-map", default=None, metavar="MAP",
                   help="e.g. auto: spread a model too large for one GPU with accelerate (instead of --device)")
    g = p.add_argument_group("grading")
    g.add_argument("--code-time-limit", type=float, default=10.0, metavar="S",
                   help="seconds per code test run in the sandbox (default 10)")
    g.add_argument("--code-memory-mb", type=int, default=512, metavar="MB",
                   help="address-space limit of the sandboxed program (default 512)")
    g.add_argument("--grade-workers", type=int, default=4, metavar="N",
                   help="code gradings (sandbox processes) run at once (default 4)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
