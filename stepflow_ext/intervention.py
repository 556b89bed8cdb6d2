"""replace_attention: StepFlow on a Hugging Face causal LM, with online step tracking.

OEB layers run `stepflow::oeb_attention`; all other layers keep the model's own attention
function. SMI is a forward hook on the chosen decoder layers. A forward pre-hook on the model
places each call's tokens into segments (design.md 2.1, section 3): a call that starts with an
empty KV cache starts a new sequence whose tokens are the prompt; later calls append tokens.
`handle.set_segmentation(seg)` replaces tracking by a given segmentation (teacher forcing).

With control="random-attn" or "random-residual" the OEB layers (resp. the SMI layers) run the
evaluation control of stepflow_ext.controls instead (docs/method.md, "Controls"); the other
component runs as configured.
"""
from __future__ import annotations

import torch

from . import controls, hf, ops
from .config import CONTROLS, StepFlowConfig
from .segment import Segmentation, StepTracker, segment


def _cache_length(kwargs) -> int:
    cache = kwargs.get("past_key_values", kwargs.get("cache"))
    if cache is None:
        return 0
    if isinstance(cache, (tuple, list)):
        return int(cache[0][0].shape[-2]) if len(cache) else 0
    return int(cache.get_seq_length())


def padding_of(attention_mask, batch, length):
    """(kv_start (B,), left_padded: bool) from a 2D HF attention mask; ValueError on holes."""
    if attention_mask is None:
        return torch.zeros(batch, dtype=torch.long), False
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        raise ValueError("attention_mask must be a 2D (batch, length) tensor of 0/1 under StepFlow")
    if tuple(attention_mask.shape) != (batch, length):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected ({batch}, {length})")
    mask = attention_mask.to("cpu", torch.bool)
    # A valid mask is 0..0 1..1 0..0 per row: one contiguous run of real tokens.
    changes = (mask[:, 1:] != mask[:, :-1]).sum(dim=1) + mask[:, 0].logical_not().long()
    if bool((changes > 2).any()) or bool((mask.sum(1) == 0).any()):
        raise ValueError("attention_mask must mark one contiguous run of tokens per row (left or right padding)")
    kv_start = mask.long().argmax(dim=1)
    return kv_start, bool((kv_start > 0).any())


def kinds_tensor(kinds: list[list[str]]) -> torch.Tensor:
    """(B, S) int64 kind codes (0 question, 1 step, 2 summary; unused slots 1) from per-row kind lists."""
    codes = {"question": 0, "step": 1, "summary": 2}
    out = torch.ones(len(kinds), max(len(k) for k in kinds), dtype=torch.long)
    for row, row_kinds in enumerate(kinds):
        out[row, :len(row_kinds)] = torch.tensor([codes[k] for k in row_kinds], dtype=torch.long)
    return out


class _Call:
    """What the OEB layers and SMI hooks need for one forward call."""

    def __init__(self, seg_ids, seg_kinds, seg_start, kv_start, functional):
        self.seg_ids, self.seg_kinds = seg_ids, seg_kinds
        self.seg_start, self.kv_start = seg_start, kv_start
        self.functional = functional  # whole sequences at once (teacher forcing): differentiable ops
        self.residual_targets = None  # random-residual: the tokens SMI would change (computed once per call)


class StepFlowHandle:
    """Returned by replace_attention. Use `restore()` (or a `with` block) to put the model back."""

    def __init__(self, model, config: StepFlowConfig, tracker: StepTracker | None, control: str | None = None,
                 control_seed: int = 0):
        self.model, self.config, self.tracker = model, config, tracker
        self.control, self.control_seed = control, control_seed  # recorded for the evaluation's output
        self._forced: Segmentation | None = None
        self._call: _Call | None = None
        self._smi_state: dict[int, tuple] = {}
        self._hooks = []
        self._token = None
        self._oeb = set(config.oeb_layers)

    # -- public ------------------------------------------------------------------------------
    def set_segmentation(self, segmentation: Segmentation | None) -> None:
        """Use `segmentation` for the following full (teacher-forced) passes; None resumes tracking."""
        if segmentation is not None and not isinstance(segmentation, Segmentation):
            raise ValueError(f"segmentation must be a stepflow_ext.Segmentation or None, got {type(segmentation).__name__}")
        self._forced = segmentation

    def segmentation(self, sequences: torch.Tensor | None = None) -> Segmentation:
        """The segmentation of the current sequence.

        Without arguments: the tokens the model has seen so far. `generate` never feeds its last
        token back, so pass its output (`sequences`, B x L) to get the segmentation of all of it:
        the same rule placed offline, which by construction agrees with the online placement.
        """
        if self.tracker is None or self.tracker.length == 0:
            raise ValueError("nothing tracked yet: replace_attention needs a tokenizer (or id sets) and a forward call")
        if sequences is None:
            return self.tracker.segmentation()
        if not isinstance(sequences, torch.Tensor) or sequences.dim() != 2 or sequences.dtype != torch.long \
                or sequences.shape[0] != self.tracker.batch_size or sequences.shape[1] < self.tracker.length:
            raise ValueError(f"sequences must be a LongTensor ({self.tracker.batch_size}, >= {self.tracker.length}) "
                             "holding the tracked tokens and any that follow")
        kv_start = self.tracker.kv_start()
        mask = (torch.arange(sequences.shape[1])[None, :] >= kv_start[:, None]).long()
        return segment(sequences.cpu(), self._prompt_lengths, attention_mask=mask, **self._rule_options)

    def restore(self) -> None:
        """Put the model back to stock: its own attention everywhere, no hooks."""
        if self._token is None:
            return
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        hf.Installed.on(self.model).pop(self._token)
        self._token = None
        if getattr(self.model, "_stepflow_handle", None) is self:
            del self.model._stepflow_handle

    @property
    def active(self) -> bool:
        return self._token is not None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.restore()

    # -- per call ------------------------------------------------------------------------------
    def _before_forward(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        if input_ids is None and embeds is None:
            raise ValueError("StepFlow needs input_ids or inputs_embeds")
        batch, length = (input_ids.shape if input_ids is not None else embeds.shape[:2])
        past = _cache_length(kwargs)
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() != 2:
            raise ValueError("StepFlow needs a 2D attention_mask (batch, length), not a prepared 4D mask")
        kv_start, left_padded = padding_of(mask, batch, past + length)
        device = (input_ids if input_ids is not None else embeds).device
        if self._forced is not None:
            self._call = self._forced_call(self._forced, batch, past, length, kv_start, device)
            return
        if self.tracker is None:
            raise ValueError("StepFlow cannot place tokens into steps: pass tokenizer= (or boundary_token_ids= and "
                             "think_end_token_ids=) to replace_attention, or call handle.set_segmentation(seg)")
        if input_ids is None:
            raise ValueError("online step tracking needs input_ids; with inputs_embeds call "
                             "handle.set_segmentation(seg) first")
        if past == 0:
            if mask is not None and not left_padded and bool((mask[:, -1] == 0).any()):
                raise ValueError("online tracking needs left padding (the prompt's last token must be real)")
            seg_ids = self.tracker.start(input_ids, mask)
            self._prompt_lengths = (seg_ids >= 0).sum(dim=1).tolist()
            seg_start = torch.full_like(seg_ids, -1)
            self._smi_state = {}
        else:
            if self.tracker.length != past:
                raise ValueError(f"the KV cache holds {past} tokens but StepFlow tracked {self.tracker.length}: "
                                 "start each sequence with an empty cache")
            seg_ids, seg_start, _ = self.tracker.feed(input_ids)
        self._call = _Call(seg_ids.to(device), kinds_tensor(self.tracker.kinds).to(device), seg_start.to(device),
                           kv_start.to(device), functional=False)

    def _forced_call(self, seg, batch, past, length, kv_start, device):
        if past != 0:
            raise ValueError("set_segmentation is for full teacher-forced passes with an empty cache; "
                             "call handle.set_segmentation(None) before generating")
        if tuple(seg.seg_ids.shape) != (batch, length):
            raise ValueError(f"the segmentation covers {tuple(seg.seg_ids.shape)} tokens but the input is "
                             f"({batch}, {length})")
        seg_kv = seg.kv_start()
        if bool((seg_kv != kv_start).any()) and bool((kv_start > 0).any()):
            raise ValueError("the segmentation's padding (-1 seg ids) does not match attention_mask")
        return _Call(seg.seg_ids.to(device), seg.seg_kinds_tensor().to(device), seg.seg_start().to(device),
                     seg_kv.to(device), functional=True)

    def _after_layer(self, layer_idx):
        def hook(module, args, output):
            call = self._call
            if call is None:
                return output
            hidden = output[0] if isinstance(output, tuple) else output
            if self.control == "random-residual":
                if call.residual_targets is None:
                    call.residual_targets = controls.residual_targets(call.seg_ids, call.seg_kinds,
                                                                      all_segments_nonempty=not call.functional)
                new = controls.random_residual(hidden, call.seg_ids, call.residual_targets, self.config.smi_gamma,
                                               self.control_seed, layer_idx)
            elif call.functional:
                new = ops.step_momentum(hidden, call.seg_ids, call.seg_kinds, self.config.smi_beta,
                                        self.config.smi_gamma)
            else:
                state = self._smi_state.get(layer_idx)
                if state is None:
                    state = ops.new_momentum_state(hidden.shape[0], hidden.shape[-1], hidden.device)
                    self._smi_state[layer_idx] = state
                new = ops.step_momentum_decode_(hidden, call.seg_ids, call.seg_kinds, state, self.config.smi_beta,
                                                self.config.smi_gamma)
            return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new
        return hook

    def _attention(self, inner):
        handle = self

        def attention(module, query, key, value, attention_mask, **kwargs):
            call = handle._call
            if module.layer_idx not in handle._oeb or call is None:
                return inner(module, query, key, value, attention_mask, **kwargs)
            window = kwargs.get("sliding_window")
            if window is not None and key.shape[2] > window:
                raise ValueError(f"layer {module.layer_idx} uses a sliding window of {window} tokens, which the "
                                 "Odds-Equal Bridge does not support: leave it out of oeb_layers")
            scaling = kwargs.get("scaling") or module.scaling
            if handle.control == "random-attn":
                if torch.is_grad_enabled() and query.requires_grad:
                    raise ValueError("the random-attn control computes no gradients (its chunked rows would all be "
                                     "kept for backward; step_saliency does not model it): run the model under "
                                     "torch.no_grad() — generate() already does")
                out = controls.random_group_attention(query, key, value, call.seg_start, call.kv_start,
                                                      handle.config.oeb_strength, handle.config.num_sink, scaling,
                                                      handle.control_seed, module.layer_idx)
                return out.transpose(1, 2).contiguous(), None
            out, _, _ = ops.oeb_attention(query, key, value, call.seg_start, call.kv_start,
                                          handle.config.oeb_strength, handle.config.num_sink, scaling)
            return out.transpose(1, 2).contiguous(), None
        return attention


def replace_attention(model, config: StepFlowConfig | None = None, tokenizer=None, boundary_token_ids=None,
                      think_end_token_ids=None, step_delimiter="\n\n", think_end="</think>", control=None,
                      control_seed=0) -> StepFlowHandle:
    """Apply StepFlow to `model` in place and return a handle (see StepFlowHandle).

    control: None (or "none"): StepFlow. "random-attn": the OEB layers rebalance random key
    groups of the sizes of OEB's groups by OEB's per-row change of log-odds (no gradients; slower
    than OEB, for evaluation). "random-residual": the SMI layers add gamma * |h| times a random
    unit direction per step on the tokens SMI would change. The other component runs as
    configured. control_seed (int in [0, 2^32)) fixes the random draws; decode and prefill draw
    the same. docs/method.md, "Controls", has the definitions.

    A second call on a model that already has StepFlow raises ValueError: restore the first
    handle before installing another configuration.
    """
    hf.check_model(model)
    if config is None:
        config = StepFlowConfig.default_for(model)
    if not isinstance(config, StepFlowConfig):
        raise ValueError(f"config must be a StepFlowConfig, got {type(config).__name__}")
    config.check_layers(hf.num_layers(model))
    if control == "none":
        control = None
    if control is not None and control not in CONTROLS:
        raise ValueError(f"unknown control {control!r}: use None, 'random-attn' or 'random-residual'")
    if control == "random-attn" and not config.oeb_layers:
        raise ValueError("control 'random-attn' replaces OEB in config.oeb_layers, which is empty: it would do nothing")
    if control == "random-residual" and not config.smi_layers:
        raise ValueError("control 'random-residual' replaces SMI in config.smi_layers, which is empty: "
                         "it would do nothing")
    control_seed = controls.check_seed(control_seed)
    if getattr(model, "_stepflow_handle", None) is not None:
        raise ValueError("StepFlow is already applied to this model: call handle.restore() before replacing it")
    tracker = None
    if tokenizer is not None or boundary_token_ids is not None or think_end_token_ids is not None:
        tracker = StepTracker(tokenizer=tokenizer, boundary_token_ids=boundary_token_ids,
                              think_end_token_ids=think_end_token_ids, step_delimiter=step_delimiter,
                              think_end=think_end)
    handle = StepFlowHandle(model, config, tracker, control, control_seed)
    handle._rule_options = dict(tokenizer=tokenizer, boundary_token_ids=boundary_token_ids,
                                think_end_token_ids=think_end_token_ids, step_delimiter=step_delimiter,
                                think_end=think_end)
    handle._token = hf.Installed.on(model).push(handle._attention)
    # On the base model, so that generate(), model(...) and step_saliency's direct call all pass here.
    handle._hooks.append(model.base_model.register_forward_pre_hook(handle._before_forward, with_kwargs=True))
    layers = hf.decoder_layers(model)
    for idx in config.smi_layers:
        handle._hooks.append(layers[idx].register_forward_hook(handle._after_layer(idx)))
    model._stepflow_handle = handle
    return handle
