"""The float64 oracle of StepFlow at the model level (design.md 2.3 and 2.4).

`reference_logits(model, ids, mask, seg, cfg)` runs a float64 copy of the model whose every
attention layer is written from stepflow_ext.reference with materialized attention (with the
layer's attention-sink logits and sliding window, if it has them: GPT-OSS, Mistral): OEB layers
run reference.oeb_attention with the bounds of reference.oeb_bounds (a loop over tokens), value
SMI layers add reference.smi_value over the windows of reference.smi_windows (a loop over
segments), residual SMI layers apply reference.step_momentum to the decoder layer's output. None of
the project's placement code (intervention.py) or kernels is used, so the comparison tests them.
"""
from __future__ import annotations

import copy
import itertools

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

from stepflow_ext import hf, reference

_names = itertools.count()


def reference_logits(model, ids, mask, seg, cfg, dtype=torch.float64):
    ref = copy.deepcopy(model).to(dtype)
    seg_ids, kinds, closing = seg.seg_ids, seg.seg_kinds_tensor(), seg.closing_tensor()
    bounds = reference.oeb_bounds(seg_ids, kinds, cfg.oeb_rule, cfg.num_sink)
    windows = reference.smi_windows(seg_ids, kinds, closing, cfg.smi_window)
    valid = seg_ids >= 0
    kv_start = torch.where(valid.any(1), valid.to(torch.int8).argmax(1), seg_ids.shape[1])

    def attention(module, q, k, v, attention_mask, scaling=None, **kwargs):
        layer = module.layer_idx
        scaling = scaling or module.scaling
        sink = getattr(module, "sinks", None)           # GPT-OSS: per-head sink logits
        window = kwargs.get("sliding_window")            # a sliding-window layer: keys j > i - window
        if layer in cfg.oeb_layers:
            out, _, _ = reference.oeb_attention(q, k, v, kv_start, bounds, cfg.oeb_rule, cfg.oeb_strength,
                                                cfg.oeb_tau_max, reference.OEB_EPS, sink=sink, window=window,
                                                scale=scaling)
        else:
            a = reference.attention_probs(q, k, scaling, reference.causal_valid_mask(valid, q.shape[2], window), sink)
            out = torch.einsum("bhij,bhjd->bhid", a, reference._expand_kv(v, q.shape[1]))
        if layer in cfg.smi_layers and cfg.smi_rule == "value":
            out = reference.smi_value(out, v, windows, cfg.smi_alpha)
        return out.transpose(1, 2).contiguous(), None

    name = f"stepflow_reference_{next(_names)}"
    AttentionInterface.register(name, attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    for config in {id(c): c for c in (ref.config, hf.text_config(ref))}.values():
        config._attn_implementation = name
    hooks = []
    if cfg.smi_rule == "residual":
        def residual(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            new = reference.step_momentum(hidden, seg_ids, kinds, cfg.smi_beta, cfg.smi_gamma)
            return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new
        layers = hf.decoder_layers(ref)
        hooks = [layers[i].register_forward_hook(residual) for i in cfg.smi_layers]
    try:
        with torch.no_grad():
            return ref(ids, attention_mask=mask).logits
    finally:
        for h in hooks:
            h.remove()
