"""StepFlow inside vLLM: an optional plugin (docs/vllm.md).

Installed with the package, vLLM loads `register` from the `vllm.general_plugins` entry point in
every process it starts (front end, engine core, workers). It wraps the platform's attention
backend (CPU: `CPU_ATTN`; CUDA: the `CUSTOM` slot, chosen with attention_backend="CUSTOM") so that
the requests that ask for StepFlow get the Odds-Equal Bridge and Step Momentum Injection with the
paper's rules, placed by design.md 2.1 from their own tokens, while every other request of the
batch runs the platform's attention untouched. STEPFLOW_VLLM=0 in the environment turns the plugin
off (vLLM then runs stock; a request that asks for StepFlow is refused).

A request asks for StepFlow through its sampling parameters:

    from vllm import LLM, SamplingParams
    from stepflow_ext.vllm import steer
    params = SamplingParams(max_tokens=512, extra_args=steer("default"))   # or a StepFlowConfig / its dict
    llm.generate([{"prompt_token_ids": ids}], params)

The plugin derives a `cache_salt` from the config for every steered request (prefix-cache blocks
hash token ids only: a steered request must not reuse blocks computed without its edits, nor the
other way round). This module imports nothing of vLLM; only the plugin's own modules do.
"""
from __future__ import annotations

import os

from .request import EXTRA_ARGS_KEY, SEGMENTATION_KEY, SEGMENTATION_OPTIONS, cache_salt, steer  # noqa: F401

ENV_SWITCH = "STEPFLOW_VLLM"


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1") != "0"


def register() -> None:
    """The `vllm.general_plugins` entry point: wrap the attention backend, follow the model runner's
    batches, salt steered requests' prefix-cache hashes. Idempotent."""
    from .plugin import install

    install(refuse_only=not enabled())
