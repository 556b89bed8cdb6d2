"""Plumbing into Hugging Face causal LMs through the attention interface.

A model's attention modules call `ALL_ATTENTION_FUNCTIONS[config._attn_implementation]`.
We register one function, `stepflow:<original>`, that hands each call to the *controller*
installed on that attention module (Step-Saliency capture, the StepFlow intervention, or a
chain of both) together with the model's original function, so layers that StepFlow does not
touch run exactly the model's own kernel. The mask function of `stepflow:<original>` is the
original's, so those layers get the mask format they expect.
"""
from __future__ import annotations

import contextvars
import sys
from typing import Callable

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

PREFIX = "stepflow:"
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral", "gpt_oss")


# True while step_saliency drives a model whose every attention call runs the project's fused kernel
# (`fused_attention`): the 4D mask transformers would build for eager attention, (B, 1, T, T) per
# layer type, is then the one T x T tensor left, and nobody reads it.
SKIP_MASK = contextvars.ContextVar("stepflow_skip_mask", default=False)


def _dispatch(module, query, key, value, attention_mask, **kwargs):
    controller = module._stepflow_controller
    return controller(module, query, key, value, attention_mask, **kwargs)


def text_config(model):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def check_model(model) -> None:
    """ValueError unless `model` is a causal LM whose attention we know how to drive."""
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise ValueError(f"model must be a Hugging Face PreTrainedModel, got {type(model).__name__}")
    model_type = getattr(text_config(model), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"unsupported architecture {model_type!r}: supported are {', '.join(SUPPORTED_MODEL_TYPES)} "
                         "(DeepSeek-R1-Distill and QwQ are qwen2/llama)")
    if model.get_output_embeddings() is None:
        raise ValueError("model has no output embeddings (lm_head): pass a *ForCausalLM model")
    if not attention_modules(model):
        raise ValueError("found no attention modules with a layer_idx in model")


def attention_modules(model) -> list[torch.nn.Module]:
    """The self-attention modules in layer order (those carrying a layer_idx and q/k/v projections)."""
    found = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "q_proj") and hasattr(m, "o_proj")]
    return sorted(found, key=lambda m: m.layer_idx)


def decoder_layers(model) -> list[torch.nn.Module]:
    """The decoder layers in order: the modules whose self_attn is one of the attention modules."""
    attn = {id(m) for m in attention_modules(model)}
    layers = [m for m in model.modules() if id(getattr(m, "self_attn", None)) in attn]
    return sorted(layers, key=lambda m: m.self_attn.layer_idx)


def num_layers(model) -> int:
    return len(attention_modules(model))


def _original_function(model, name: str) -> Callable:
    if name.startswith(PREFIX):
        name = name[len(PREFIX):]
    if name == "eager" or name is None:
        module_of_model = sys.modules[type(attention_modules(model)[0]).__module__]
        return module_of_model.eager_attention_forward
    if name not in ALL_ATTENTION_FUNCTIONS:
        raise ValueError(f"unsupported attention implementation {name!r}")
    return ALL_ATTENTION_FUNCTIONS[name]


def _with_mask_skip(mask_function: Callable) -> Callable:
    def mask(*args, **kwargs):
        return None if SKIP_MASK.get() else mask_function(*args, **kwargs)
    return mask


def _with_fused(eager: Callable) -> Callable:
    """The model's eager attention, or the module's `_stepflow_fused` function while one is set
    (step_saliency on GPT-OSS, whose transformers implementation has no SDPA path)."""
    def original(module, query, key, value, attention_mask, **kwargs):
        fused = getattr(module, "_stepflow_fused", None)
        if fused is None:
            return eager(module, query, key, value, attention_mask, **kwargs)
        return fused(module, query, key, value, **kwargs)
    return original


def _set_implementation(model, name: str) -> None:
    for config in {id(c): c for c in (model.config, text_config(model))}.values():
        config._attn_implementation = name


class Installed:
    """The stepflow attention function installed on a model, with one controller per module.

    `push(make)` installs a controller built by `make(inner)` on every attention module, where
    `inner(module, q, k, v, mask, **kw)` is what ran before (the original function or the
    previous controller); `pop(token)` takes it off again. The model's implementation is put
    back when the last controller is removed.
    """

    def __init__(self, model):
        self.model = model
        self.original_name = getattr(text_config(model), "_attn_implementation", None) or "eager"
        if self.original_name.startswith(PREFIX):
            raise RuntimeError("model already has stepflow attention installed")
        self.original = _original_function(model, self.original_name)
        # Eager attention can hand over to the fused kernel (step_saliency does, on GPT-OSS).
        self.fusable = self.original_name == "eager"
        if self.fusable:
            self.original = _with_fused(self.original)
        self.name = PREFIX + self.original_name
        AttentionInterface.register(self.name, _dispatch)
        mask_name = "eager" if self.original_name not in ALL_MASK_ATTENTION_FUNCTIONS else self.original_name
        ALL_MASK_ATTENTION_FUNCTIONS.register(self.name, _with_mask_skip(ALL_MASK_ATTENTION_FUNCTIONS[mask_name]))
        self.stack: list[object] = []

    @classmethod
    def on(cls, model) -> "Installed":
        existing = getattr(model, "_stepflow_installed", None)
        if existing is None:
            existing = cls(model)
            model._stepflow_installed = existing
        return existing

    def push(self, make) -> object:
        token = object()
        for module in attention_modules(self.model):
            inner = getattr(module, "_stepflow_controller", None) or self.original
            module._stepflow_inner_stack = getattr(module, "_stepflow_inner_stack", []) + [inner]
            module._stepflow_controller = make(inner)
        self.stack.append(token)
        _set_implementation(self.model, self.name)
        return token

    def pop(self, token) -> None:
        if not self.stack or self.stack[-1] is not token:
            raise RuntimeError("stepflow controllers must be removed in the reverse order of installation")
        self.stack.pop()
        for module in attention_modules(self.model):
            inner = module._stepflow_inner_stack.pop()
            if inner is self.original:
                del module._stepflow_controller
                del module._stepflow_inner_stack
            else:
                module._stepflow_controller = inner
        if not self.stack:
            _set_implementation(self.model, self.original_name)
            del self.model._stepflow_installed
