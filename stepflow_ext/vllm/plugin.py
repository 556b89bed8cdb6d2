"""What `register` installs in each vLLM process (docs/vllm.md).

- The attention backend: the platform's own, wrapped (backend.py). CPU: the CPU_ATTN slot is
  overridden (the CPU platform always picks it); CUDA: the CUSTOM slot, which the user selects.
- The model runner's `_model_forward` (Python on every platform, also with compiled models: vLLM
  compiles the model, not the runner): before each model step it places the tokens of every
  steered request of the batch (tracking.py) and publishes the step's placements to the attention
  layers; requests that finished are forgotten.
- The front end's `InputProcessor.process_inputs`: a steered request is checked there (config,
  supported features) and gets its prefix-cache salt, so that bad requests fail in the caller.
"""
from __future__ import annotations

import functools

from .request import EXTRA_ARGS_KEY, SEGMENTATION_KEY, cache_salt

_installed = False
STEP: list | None = None        # the current model step's Placements (None outside a step or without any)
COUNTS: dict = {}               # ("oeb" | "smi", layer) -> rows changed, in this process
EVENTS: dict = {}               # "rollback" (a step before the tracked end: preempted, recomputed),
                                # "skipped" (after it: a prefix-cache hit) -> steps, in this process


def trigger_counts(reset: bool = False) -> dict:
    """{"oeb": {layer: rows}, "smi": {layer: tokens}} changed in this process (as StepFlowHandle's);
    with VLLM_ENABLE_V1_MULTIPROCESSING=0 the worker is the caller's process."""
    out = {"oeb": {}, "smi": {}}
    for (kind, layer), n in sorted(COUNTS.items()):
        out[kind][layer] = int(n)
    if reset:
        COUNTS.clear()
    return out


def install(refuse_only: bool = False) -> None:
    global _installed
    if _installed:
        return
    _installed = True
    from vllm.v1.engine.input_processor import InputProcessor

    _patch(InputProcessor, "process_inputs", _checked_inputs(refuse_only))
    if refuse_only:
        return
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if current_platform.is_cpu():
        register_backend(AttentionBackendEnum.CPU_ATTN, "stepflow_ext.vllm.backend.StepFlowCPUBackend")
    elif current_platform.is_cuda():
        register_backend(AttentionBackendEnum.CUSTOM, "stepflow_ext.vllm.backend.StepFlowFlashBackend")
    _patch(GPUModelRunner, "_model_forward", _tracked_forward)


def _patch(cls, name, make):
    original = getattr(cls, name)
    if getattr(original, "_stepflow", False):
        return
    wrapper = functools.wraps(original)(make(original))
    wrapper._stepflow = True
    setattr(cls, name, wrapper)


# --------------------------------------------------------------------------- front end


def _num_layers(model_config) -> int:
    return int(model_config.hf_text_config.num_hidden_layers)


def _checked_inputs(refuse_only):
    def make(original):
        def process_inputs(self, request_id, prompt, params, *args, **kwargs):
            request = original(self, request_id, prompt, params, *args, **kwargs)
            sp = request.sampling_params
            extra = getattr(sp, "extra_args", None) if sp is not None else None
            if not extra or EXTRA_ARGS_KEY not in extra:
                return request
            if refuse_only:
                raise ValueError("this request asks for StepFlow (extra_args['stepflow']) but the StepFlow plugin is "
                                 "off (STEPFLOW_VLLM=0)")
            from .tracking import parse_request

            parse_request(extra[EXTRA_ARGS_KEY], extra.get(SEGMENTATION_KEY), _num_layers(self.model_config))
            if getattr(self.vllm_config, "use_v2_model_runner", False):
                raise ValueError("StepFlow under vLLM follows the V1 model runner (GPUModelRunner); this engine runs "
                                 "Model Runner V2, where the plugin would not see the batch: start it with "
                                 "VLLM_USE_V2_MODEL_RUNNER=0")
            if self.speculative_config is not None:
                raise ValueError("StepFlow under vLLM does not support speculative decoding yet (draft tokens would "
                                 "be placed into steps before they are accepted): start the engine without "
                                 "speculative_config for steered requests")
            if request.prompt_embeds is not None or request.mm_features:
                raise ValueError("StepFlow under vLLM needs token-id prompts (no prompt embeddings, no multimodal "
                                 "inputs): it places each token into channels and steps by its id")
            request.cache_salt = cache_salt(extra, request.cache_salt)
            return request
        return process_inputs
    return make


# --------------------------------------------------------------------------- worker


class _RunnerState:
    """What the plugin keeps per model runner (request ids are unique within an engine only; a process
    may run several engines one after the other): the steered requests' trackers and the worker's
    tokenizer and model config."""

    def __init__(self, runner):
        from transformers import AutoTokenizer

        mc = runner.model_config
        self.tokenizer = AutoTokenizer.from_pretrained(mc.tokenizer, revision=mc.tokenizer_revision,
                                                       trust_remote_code=mc.trust_remote_code)
        self.hf_config, self.num_layers = mc.hf_text_config, _num_layers(mc)
        self.requests: dict = {}    # request id -> SteeredRequest


def _runner_state(runner) -> _RunnerState:
    state = runner.__dict__.get("_stepflow")
    if state is None:
        state = runner._stepflow = _RunnerState(runner)
    return state


def _tracked_forward(original):
    def _model_forward(self, input_ids=None, positions=None, *args, **kwargs):
        global STEP
        placements = plan_step(self, input_ids)
        STEP = placements or None
        try:
            return original(self, input_ids, positions, *args, **kwargs)
        finally:
            STEP = None
    return _model_forward


def plan_step(runner, input_ids) -> list:
    """The Placements of the steered requests in the runner's current batch."""
    from .tracking import SteeredRequest, parse_request

    batch, requests = runner.input_batch, runner.requests
    known = runner.__dict__.get("_stepflow")
    if known is not None:
        for rid in [r for r in known.requests if r not in requests]:   # finished or aborted
            del known.requests[rid]
    num_reqs = batch.num_reqs
    steered = []
    for row, rid in enumerate(batch.req_ids[:num_reqs]):
        state = requests.get(rid)
        sp = getattr(state, "sampling_params", None)
        extra = getattr(sp, "extra_args", None) if sp is not None else None
        if extra and EXTRA_ARGS_KEY in extra:
            steered.append((row, rid, state, extra))
    if not steered:
        return []
    if input_ids is None:
        raise ValueError("StepFlow under vLLM needs token ids (this step runs on prompt embeddings)")
    if runner.speculative_config is not None:
        raise ValueError("StepFlow under vLLM does not support speculative decoding yet")
    info = _runner_state(runner)
    qsl = runner.query_start_loc.np[:num_reqs + 1]
    stop = int(qsl[num_reqs])
    ids = input_ids[:stop].to("cpu").tolist()   # a copy from the device on GPUs (one per step with steered rows)
    out = []
    for row, rid, state, extra in steered:
        tracked = info.requests.get(rid)
        if tracked is None:
            config = parse_request(extra[EXTRA_ARGS_KEY], extra.get(SEGMENTATION_KEY), info.num_layers)
            tracked = info.requests[rid] = SteeredRequest(config, state.num_prompt_tokens, info.tokenizer,
                                                          info.hf_config, extra.get(SEGMENTATION_KEY))
        a, b = int(qsl[row]), int(qsl[row + 1])
        past = int(batch.num_computed_tokens_cpu[row])

        def token_ids(lo, hi, state=state):
            return [state.get_token_id(i) for i in range(lo, hi)]

        if past != tracked.length:
            key = "rollback" if past < tracked.length else "skipped"
            EVENTS[key] = EVENTS.get(key, 0) + 1
        out.append(tracked.place(row, a, b, past, ids[a:b], token_ids))
    return out
