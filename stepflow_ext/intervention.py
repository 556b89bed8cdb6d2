"""replace_attention: StepFlow on a Hugging Face causal LM, with online step tracking.

OEB layers run `stepflow::oeb_attention`; SMI layers with the `value` rule (the paper's) add the
step-start injection to the attention output; every other layer keeps the model's own attention
function. The `residual` SMI rule is a forward hook on its decoder layers. A forward pre-hook on
the model places each call's tokens into channels and steps (design.md 2.1, section 3): a call
that starts with an empty KV cache starts a new sequence whose tokens are the prompt; later calls
append tokens. `handle.set_segmentation(seg)` replaces tracking by a given segmentation (teacher
forcing).

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


# --------------------------------------------------------------------------- placement
#
# From channels and steps (segment.py) to the inputs of the ops, for the tokens of one forward call.


def oeb_bounds(rule, channel, seg_start, think_start, summary_start, kv_start, positions, num_sink=1):
    """bounds (B, n, 2) of oeb_attention for n query tokens.

    channel (B, n): -1 padding, 0 question, 1 thinking, 2 summary; seg_start (B, n): start of each
    token's segment; think_start, summary_start (B, n) or (B, 1): position of the first thinking /
    summary token (-1: none); kv_start (B,); positions (n,) or (B, n): the tokens' key positions.
    bridge: a thinking query gets (kv_start, think_start) (O empty, B = the question), a summary
    query (think_start, summary_start) (O = the question, B = the thinking; an empty thinking gives
    an empty bridge). odds: (kv_start + num_sink, start of its segment), clipped to the query.
    Question and padding queries: (-1, -1).
    """
    kv = kv_start[:, None]
    if rule == "bridge":
        ts = torch.where(think_start >= 0, think_start, summary_start).expand_as(channel)
        a = torch.where(channel == 1, kv.expand_as(channel), ts)
        b = torch.where(channel == 1, ts, summary_start.expand_as(channel))
    else:
        a = torch.minimum(kv + num_sink, positions + 1).expand_as(channel)
        b = torch.maximum(a, seg_start)
    on = channel >= 1
    off = torch.full_like(a, -1)
    return torch.stack([torch.where(on, a, off), torch.where(on, b, off)], dim=-1)


def smi_windows(prev_step, window):
    """(B, n, 2): the last `window` keys [max(start, end - window), end) of the previous step of each
    SMI target (prev_step (B, n, 2) as segment.py gives it), (-1, -1) elsewhere."""
    start, end = prev_step[..., 0], prev_step[..., 1]
    on = (start >= 0) & (end > start)
    w = torch.stack([torch.maximum(start, end - window), end], dim=-1)
    return torch.where(on[..., None], w, torch.full_like(w, -1))


class _Call:
    """What the OEB layers and SMI need for one forward call (all on the model's device)."""

    def __init__(self, seg_ids, seg_kinds, kv_start, bounds, windows, functional):
        self.seg_ids, self.seg_kinds, self.kv_start = seg_ids, seg_kinds, kv_start
        self.bounds = bounds      # (B, n, 2) oeb_attention bounds of the call's tokens (config's rule)
        self.windows = windows    # (B, n, 2) SMI value windows ((-1, -1): no injection)
        self.functional = functional  # whole sequences at once (teacher forcing): differentiable ops
        self.residual_targets = None  # random-residual (residual rule): the tokens SMI would change


class StepFlowHandle:
    """Returned by replace_attention. Use `restore()` (or a `with` block) to put the model back."""

    def __init__(self, model, config: StepFlowConfig, tracker: StepTracker | None, control: str | None = None,
                 control_seed: int = 0, segmentation_options: dict | None = None):
        self.model, self.config, self.tracker = model, config, tracker
        self.control, self.control_seed = control, control_seed  # recorded for the evaluation's output
        self.segmentation_options = dict(segmentation_options or {})
        self._forced: Segmentation | None = None
        self._call: _Call | None = None
        self._smi_state: dict[int, tuple] = {}
        self._hooks = []
        self._token = None
        self._oeb = set(config.oeb_layers)
        self._smi_value = set(config.smi_layers) if config.smi_rule == "value" else set()
        self._counts: dict[tuple[str, int], torch.Tensor] = {}

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
        return segment(sequences.cpu(), self._prompt_lengths, attention_mask=mask, **self.segmentation_options)

    def trigger_counts(self, reset: bool = False) -> dict:
        """How often StepFlow acted since the last reset, per layer: {"oeb": {layer: n}, "smi": {layer: n}}.

        oeb: (batch row, head, query) rows where the OEB rule changed the attention (the bridge rule
        fired; with the odds rule, a locked row). smi: tokens that got the value injection (counted
        once per layer, not per head). Teacher-forced and decoding passes both count."""
        out = {"oeb": {}, "smi": {}}
        for (kind, layer), n in sorted(self._counts.items()):
            out[kind][layer] = int(n)
        if reset:
            self._counts.clear()
        return out

    def pool_oeb_args(self, layer: int) -> dict:
        """Keyword arguments of ops.step_saliency_pool for `layer` in the current pass: the OEB
        bounds and rule when the layer runs OEB (step_saliency then measures A'), else {}."""
        call = self._call
        if call is None or layer not in self._oeb or self.control is not None:
            return {}
        c = self.config
        return dict(oeb_bounds=call.bounds, oeb_rule=c.oeb_rule, oeb_strength=c.oeb_strength,
                    oeb_tau_max=c.oeb_tau_max, oeb_eps=ops.OEB_EPS)

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
    def _count(self, kind, layer, n):
        key = (kind, layer)
        n = n.detach().to("cpu" if n.device.type == "cpu" else n.device, torch.long)
        self._counts[key] = self._counts[key] + n if key in self._counts else n

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
            update = self.tracker.start(input_ids, mask)
            self._prompt_lengths = (update.seg_ids >= 0).sum(dim=1).tolist()
            self._smi_state = {}
        else:
            if self.tracker.length != past:
                raise ValueError(f"the KV cache holds {past} tokens but StepFlow tracked {self.tracker.length}: "
                                 "start each sequence with an empty cache")
            update = self.tracker.feed(input_ids)
        seg_kinds = kinds_tensor(self.tracker.kinds)
        channel = torch.where(update.seg_ids >= 0, seg_kinds.gather(1, update.seg_ids.clamp(min=0)),
                              torch.full_like(update.seg_ids, -1))
        positions = torch.arange(past, past + length)
        c = self.config
        bounds = oeb_bounds(c.oeb_rule, channel, update.seg_start, update.think_start, update.summary_start,
                            kv_start, positions, c.num_sink)
        windows = smi_windows(update.prev_step, c.smi_window)
        self._call = _Call(update.seg_ids.to(device), seg_kinds.to(device), kv_start.to(device), bounds.to(device),
                           windows.to(device), functional=False)

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
        seg = seg.to("cpu")
        starts = seg.channel_starts()                                 # (B, 2), T where absent
        starts = torch.where(starts >= length, torch.full_like(starts, -1), starts)
        c = self.config
        bounds = oeb_bounds(c.oeb_rule, seg.channels(), seg.seg_start(), starts[:, 0:1], starts[:, 1:2], seg_kv,
                            torch.arange(length), c.num_sink)
        windows = smi_windows(seg.smi_prev_step(), c.smi_window)
        return _Call(seg.seg_ids.to(device), seg.seg_kinds_tensor().to(device), seg_kv.to(device), bounds.to(device),
                     windows.to(device), functional=True)

    def _after_layer(self, layer_idx):
        """SMI rule `residual`: on the hidden state leaving the decoder layer."""
        def hook(module, args, output):
            call = self._call
            if call is None:
                return output
            hidden = output[0] if isinstance(output, tuple) else output
            c = self.config
            if self.control == "random-residual":
                if call.residual_targets is None:
                    call.residual_targets = controls.residual_targets(call.seg_ids, call.seg_kinds,
                                                                      all_segments_nonempty=not call.functional)
                new = controls.random_residual(hidden, call.seg_ids, call.residual_targets, c.smi_gamma,
                                               self.control_seed, layer_idx)
            elif call.functional:
                new = ops.step_momentum(hidden, call.seg_ids, call.seg_kinds, c.smi_beta, c.smi_gamma)
            else:
                state = self._smi_state.get(layer_idx)
                if state is None:
                    state = ops.new_momentum_state(hidden.shape[0], hidden.shape[-1], hidden.device)
                    self._smi_state[layer_idx] = state
                new = ops.step_momentum_decode_(hidden, call.seg_ids, call.seg_kinds, state, c.smi_beta, c.smi_gamma)
            return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new
        return hook

    def _attention(self, inner):
        handle = self

        def attention(module, query, key, value, attention_mask, **kwargs):
            call = handle._call
            layer = module.layer_idx
            oeb, smi = layer in handle._oeb, layer in handle._smi_value
            if call is None or not (oeb or smi):
                return inner(module, query, key, value, attention_mask, **kwargs)
            c = handle.config
            if oeb:
                window = kwargs.get("sliding_window")
                if window is not None and key.shape[2] > window:
                    raise ValueError(f"layer {layer} uses a sliding window of {window} tokens, which StepFlow does "
                                     "not support on this architecture yet: leave it out of oeb_layers")
                if getattr(module, "sinks", None) is not None:
                    raise ValueError(f"layer {layer} has attention sinks, which StepFlow does not support on this "
                                     "architecture yet")
                scaling = kwargs.get("scaling") or module.scaling
                if handle.control == "random-attn":
                    if torch.is_grad_enabled() and query.requires_grad:
                        raise ValueError("the random-attn control computes no gradients (its chunked rows would all "
                                         "be kept for backward; step_saliency does not model it): run the model "
                                         "under torch.no_grad() — generate() already does")
                    out = controls.random_group_attention(query, key, value, call.kv_start, call.bounds, c.oeb_rule,
                                                          c.oeb_strength, c.oeb_tau_max, scaling,
                                                          handle.control_seed, layer)
                else:
                    out, _, stats = ops.oeb_attention(query, key, value, call.kv_start, call.bounds, c.oeb_rule,
                                                      c.oeb_strength, c.oeb_tau_max, ops.OEB_EPS, scale=scaling)
                    handle._count("oeb", layer, stats[..., 4].sum())
                out, weights = out.transpose(1, 2).contiguous(), None
            else:
                out, weights = inner(module, query, key, value, attention_mask, **kwargs)
            if smi:
                if handle.control == "random-residual":
                    out = controls.random_value_injection(out, value, call.windows, c.smi_alpha, c.smi_window,
                                                          handle.control_seed, layer)
                else:
                    out = ops.smi_value(out, value, call.windows, c.smi_alpha, c.smi_window)
                handle._count("smi", layer, (call.windows[..., 0] >= 0).sum())
            return out, weights
        return attention


SEGMENTATION_OPTIONS = ("think_start", "think_end", "steps", "summary_steps", "step_delimiter", "boundary_token_ids",
                        "think_end_token_ids")


def replace_attention(model, config: StepFlowConfig | None = None, tokenizer=None, *, control=None, control_seed=0,
                      **segmentation) -> StepFlowHandle:
    """Apply StepFlow to `model` in place and return a handle (see StepFlowHandle).

    config: default StepFlowConfig.default_for(model), the paper's configuration (design.md 2.5).
    tokenizer and the segmentation options of `segment()` (think_start="auto", think_end="auto",
    steps="sentence", summary_steps=False, step_delimiter="\\n\\n", or the id fast path
    boundary_token_ids= and think_end_token_ids=) place the tokens into question, thinking steps
    and summary as they are generated (design.md 2.1).

    control: None (or "none"): StepFlow. "random-attn": the OEB layers apply OEB's per-row logit
    shifts to random key sets of the sizes of OEB's groups (no gradients; slower than OEB, for
    evaluation). "random-residual": the SMI layers add, at the tokens SMI changes, a random vector of
    the norm of SMI's change. The other component runs as configured. control_seed (int in [0, 2^32))
    fixes the random draws; decode and prefill draw the same. docs/method.md, "Controls".

    A second call on a model that already has StepFlow raises ValueError: restore the first
    handle before installing another configuration.
    """
    hf.check_model(model)
    if config is None:
        config = StepFlowConfig.default_for(model)
    if not isinstance(config, StepFlowConfig):
        raise ValueError(f"config must be a StepFlowConfig, got {type(config).__name__}")
    config.check_layers(hf.num_layers(model))
    unknown = set(segmentation) - set(SEGMENTATION_OPTIONS)
    if unknown:
        raise ValueError(f"unknown replace_attention options {sorted(unknown)}; segmentation options are "
                         f"{', '.join(SEGMENTATION_OPTIONS)}")
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
    options = dict(segmentation)
    if tokenizer is not None:
        options["tokenizer"] = tokenizer
    if tokenizer is not None or "boundary_token_ids" in options or "think_end_token_ids" in options:
        tracker = StepTracker(**options)
    handle = StepFlowHandle(model, config, tracker, control, control_seed, options)
    handle._token = hf.Installed.on(model).push(handle._attention)
    # On the base model, so that generate(), model(...) and step_saliency's direct call all pass here.
    handle._hooks.append(model.base_model.register_forward_pre_hook(handle._before_forward, with_kwargs=True))
    if config.smi_rule == "residual":
        layers = hf.decoder_layers(model)
        for idx in config.smi_layers:
            handle._hooks.append(layers[idx].register_forward_hook(handle._after_layer(idx)))
    model._stepflow_handle = handle
    return handle
