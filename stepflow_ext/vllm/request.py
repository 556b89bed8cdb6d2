"""What a vLLM request carries to ask for StepFlow (SamplingParams.extra_args), and its prefix-cache salt."""
from __future__ import annotations

import hashlib
import json

EXTRA_ARGS_KEY = "stepflow"
SEGMENTATION_KEY = "stepflow_segmentation"
# segment() options a request may set (design.md 2.1); the tokenizer is the engine's own.
SEGMENTATION_OPTIONS = ("think_start", "think_end", "steps", "summary_steps", "step_delimiter")


def steer(config="default", **segmentation) -> dict:
    """`SamplingParams.extra_args` that ask for StepFlow: config is "default" (the paper's
    configuration for the served model, StepFlowConfig.default_for), a StepFlowConfig, its dict or
    its JSON text; segmentation: options of segment() (think_start, think_end, steps,
    summary_steps, step_delimiter). Checked here, so that a bad config fails in the caller."""
    from ..config import StepFlowConfig

    if isinstance(config, StepFlowConfig):
        payload = config.to_dict()
    elif config == "default":
        payload = "default"
    elif isinstance(config, dict):
        payload = StepFlowConfig.from_dict(config).to_dict()
    elif isinstance(config, str):
        payload = StepFlowConfig.from_json(config).to_dict()
    else:
        raise ValueError(f"config must be 'default', a StepFlowConfig, a dict or JSON text, got {type(config).__name__}")
    unknown = set(segmentation) - set(SEGMENTATION_OPTIONS)
    if unknown:
        raise ValueError(f"unknown segmentation options {sorted(unknown)}; known: {', '.join(SEGMENTATION_OPTIONS)}")
    out = {EXTRA_ARGS_KEY: payload}
    if segmentation:
        out[SEGMENTATION_KEY] = dict(segmentation)
    return out


def cache_salt(extra_args: dict | None, salt: str | None = None) -> str | None:
    """The prefix-cache salt of a request: its own salt, joined by a hash of its StepFlow request
    (config and segmentation) when it asks for StepFlow; None for an unsteered request without one."""
    if not extra_args or EXTRA_ARGS_KEY not in extra_args:
        return salt
    canon = json.dumps({k: extra_args.get(k) for k in (EXTRA_ARGS_KEY, SEGMENTATION_KEY)}, sort_keys=True)
    digest = hashlib.sha256(canon.encode()).hexdigest()[:16]
    return f"{salt}|stepflow:{digest}" if salt else f"stepflow:{digest}"
