"""replace_attention: StepFlow on a Hugging Face causal LM, with online step tracking.

OEB layers run `stepflow::oeb_attention`; SMI layers with the `value` rule (the paper's) add the
step-start injection to the attention output; every other layer keeps the model's own attention
function. The `residual` SMI rule is a forward hook on its decoder layers. A forward pre-hook on
the model places each call's tokens into channels and steps (design.md 2.1, section 3): a call
that starts with an empty KV cache starts a new sequence whose tokens are the prompt; later calls
append tokens. `handle.set_segmentation(seg)` replaces tracking by a given segmentation (teacher
forcing).

Tracking follows the KV cache in every decoding mode of `generate` (docs/method_decoding.md):
- a cache that shrank (assisted / prompt-lookup decoding crop rejected candidates, `cache.crop`)
  rolls the tracker back to the cache's length (`StepTracker.truncate`) and the `residual` rule's
  decode state with it;
- `reorder_cache`, `batch_select_indices` and `batch_repeat_interleave` on the cache (beam search)
  reorder the tracker's rows (`StepTracker.select`) and the residual decode state: the cache is
  watched from the first call that hands it over;
- preallocated caches (static, `max_cache_len` keys) and their prepared 4D masks: the OEB and SMI
  layers read only the cache's valid length, the padding is read off the mask (which must be the
  causal mask of left-padded rows); a cache that dropped keys (sliding window) is refused there;
- a call without any cache re-feeds the whole sequence: a row whose ids extend a tracked row
  continues it (`StepTracker.follow`), any other row starts a new sequence; the first call of a
  `generate` always starts one, with generate's input as the prompt (assisted decoding's first call
  also holds candidate tokens, which are generated tokens).
Modes that cannot be followed raise ValueError naming the mode (self-drafting assistants, an
explicit torch.compile of the decode step, a second cache).

With control="random-attn" or "random-residual" the OEB layers (resp. the SMI layers) run the
evaluation control of stepflow_ext.controls instead (docs/method.md, "Controls"); the other
component runs as configured.
"""
from __future__ import annotations

import torch

from . import controls, hf, ops
from .config import CONTROLS, StepFlowConfig
from .intervention_state import (_LISTENERS, _MASK_CHUNK, _WATCHED, ROLLBACK_TOKENS, _cache_length,  # noqa: F401
                                 _cache_of, _Call, _Tracking, _watch, _watch_caches, kinds_tensor, oeb_bounds,
                                 padding_of, padding_of_prepared, smi_windows)
from .segment import Segmentation, StepTracker, TrackerUpdate, segment  # noqa: F401  (TrackerUpdate: as before)


def _with(generation_config, **changes):
    """A copy of a GenerationConfig with some fields changed."""
    import copy
    new = copy.deepcopy(generation_config)
    for name, value in changes.items():
        setattr(new, name, value)
    return new


class StepFlowHandle(_Tracking):
    """Returned by replace_attention. Use `restore()` (or a `with` block) to put the model back."""

    def __init__(self, model, config: StepFlowConfig, tracker: StepTracker | None, control: str | None = None,
                 control_seed: int = 0, segmentation_options: dict | None = None):
        self.model, self.config, self.tracker = model, config, tracker
        self.control, self.control_seed = control, control_seed  # recorded for the evaluation's output
        self.segmentation_options = dict(segmentation_options or {})
        self._forced: Segmentation | None = None
        self._call: _Call | None = None
        self._smi_state: dict[int, tuple] = {}
        self._smi_undo: dict[int, tuple] = {}   # residual rule: what rolling the decode state back needs
        self._cache = None                       # weakref to the KV cache the tracked sequence lives in
        self._generate_prompt = None             # inside generate(): the prompt's columns
        self._generate_first = False             # the next forward call is generate's first
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
                             "holding the tracked tokens and any that follow (beam search returns its best beams, "
                             "not the tracked rows: segment them with stepflow_ext.segment(sequences, "
                             "prompt_lengths, **handle.segmentation_options))")
        valid = self.tracker.seg_ids >= 0
        if not torch.equal(sequences[:, :self.tracker.length].cpu()[valid], self.tracker.ids[valid]):
            raise ValueError("sequences do not start with the tracked tokens")
        kv_start = self.tracker.kv_start()
        mask = (torch.arange(sequences.shape[1])[None, :] >= kv_start[:, None]).long()
        return segment(sequences.cpu(), self.tracker.prompt_lengths, attention_mask=mask,
                       **self.segmentation_options)

    def reset(self) -> None:
        """Forget the tracked sequence: the next forward call starts a new one whatever its ids."""
        if self.tracker is not None:
            self.tracker._rows = None
        self._smi_state, self._smi_undo, self._cache = {}, {}, None

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
        if getattr(self.model, "__dict__", {}).get("generate") is getattr(self, "_generate_wrapper", None):
            del self.model.generate
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
                new = self._residual_decode(layer_idx, hidden, call)
            return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new
        return hook

    def _residual_decode(self, layer, hidden, call):
        """The residual rule's decode op on the call's tokens, keeping what a rollback needs: the state
        before the call's last ROLLBACK_TOKENS tokens and their hidden states (the op on them is
        replayed from that state up to the cropped length: the same arithmetic, bit for bit)."""
        c = self.config
        state = self._smi_state.get(layer)
        if state is None:
            state = ops.new_momentum_state(hidden.shape[0], hidden.shape[-1], hidden.device)
            self._smi_state[layer] = state
        n = hidden.shape[1]
        split = max(0, n - ROLLBACK_TOKENS)
        parts = []
        if split:
            parts.append(ops.step_momentum_decode_(hidden[:, :split], call.seg_ids[:, :split], call.seg_kinds, state,
                                                   c.smi_beta, c.smi_gamma))
        snap = tuple(t.clone() for t in state)
        tail, seg_tail = hidden[:, split:].detach(), call.seg_ids[:, split:]
        parts.append(ops.step_momentum_decode_(tail, seg_tail, call.seg_kinds, state, c.smi_beta, c.smi_gamma))
        self._smi_undo[layer] = (call.past + split, snap, tail.clone() if split else tail, seg_tail, call.seg_kinds)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    # -- generate() and the cache
    def _cache_event(self, cache, name, arg):
        """Cache.reorder_cache / batch_select_indices / batch_repeat_interleave ran on `cache`."""
        if self._cache is None or self._cache() is not cache or not self.active:
            return
        if name == "batch_repeat_interleave":
            index = torch.arange(self.tracker.batch_size).repeat_interleave(int(arg))
        else:
            index = arg if isinstance(arg, torch.Tensor) else torch.as_tensor(arg)
            if index.dtype == torch.bool:
                index = index.nonzero().flatten()
        self._reorder(index)

    def _generate(self, original, args, kwargs):
        if not self.active:
            return original(*args, **kwargs)
        args, kwargs = self._check_generate(args, kwargs)
        prompt = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
        mask = kwargs.get("attention_mask")
        mask = mask.to("cpu", torch.bool) if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        self._generate_prompt = (int(prompt.shape[-1]), mask) if isinstance(prompt, torch.Tensor) else None
        self._generate_first = True
        try:
            return original(*args, **kwargs)
        finally:
            self._generate_prompt, self._generate_first = None, False

    def _check_generate(self, args, kwargs):
        """Refuse the generate modes StepFlow cannot follow; turn generate's automatic torch.compile off."""
        given = kwargs.get("generation_config", args[1] if len(args) > 1 else None)
        config = given if given is not None else getattr(self.model, "generation_config", None)

        def option(name):
            return kwargs[name] if name in kwargs else getattr(config, name, None)

        assistant = kwargs.get("assistant_model", args[6] if len(args) > 6 else None)
        if option("assistant_early_exit") is not None:
            raise ValueError("assistant_early_exit drafts with the model's own first layers, which StepFlow does not "
                             "support (the draft calls would be tracked as the sequence): use a separate "
                             "assistant_model or prompt_lookup_num_tokens")
        if option("use_mtp"):
            raise ValueError("use_mtp drafts with the model's own multi-token-prediction layers, which StepFlow does "
                             "not support: use a separate assistant_model or prompt_lookup_num_tokens")
        if option("speculation_type") is not None:
            raise ValueError(f"speculation_type={option('speculation_type')!r} is not supported under StepFlow: use "
                             "assistant_model (a separate model) or prompt_lookup_num_tokens")
        if assistant is not None and (assistant is self.model or getattr(assistant, "base_model", None)
                                      is self.model.base_model):
            raise ValueError("assistant_model is the model StepFlow runs on: its draft calls would be tracked as the "
                             "sequence; use a separate assistant model or prompt_lookup_num_tokens")
        if option("compile_config") is not None:
            raise ValueError("generate(compile_config=...) compiles the decode step with torch.compile, which "
                             "StepFlow does not support (its step tracking runs in Python at every forward call): "
                             "leave compile_config out (StepFlow turns generate's automatic compilation off) or "
                             "call handle.restore() first")
        if not option("disable_compile"):   # else generate compiles the decode step when the cache is static
            if "disable_compile" in kwargs or given is None:
                kwargs = dict(kwargs, disable_compile=True)
            elif "generation_config" in kwargs:
                kwargs = dict(kwargs, generation_config=_with(given, disable_compile=True))
            else:
                args = (args[0], _with(given, disable_compile=True)) + tuple(args[2:])
        return args, kwargs

    def _attention(self, inner):
        handle = self

        def attention(module, query, key, value, attention_mask, **kwargs):
            call = handle._call
            layer = module.layer_idx
            oeb, smi = layer in handle._oeb, layer in handle._smi_value
            if call is None or not (oeb or smi):
                return inner(module, query, key, value, attention_mask, **kwargs)
            c = handle.config
            window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
            window = int(window) if window is not None else None
            sink = getattr(module, "sinks", None)
            k_all, v_all, kv_start, bounds, windows = _layer_view(layer, key, value, call, window)
            if oeb:
                if handle.control == "random-attn" and (sink is not None or window is not None):
                    raise ValueError(f"control 'random-attn' does not support layer {layer}'s "
                                     f"{'attention sinks' if sink is not None else 'sliding window'} (GPT-OSS, "
                                     "Mistral with sliding_window): leave the layer out of oeb_layers")
                scaling = kwargs.get("scaling") or module.scaling
                if handle.control == "random-attn":
                    if torch.is_grad_enabled() and query.requires_grad:
                        raise ValueError("the random-attn control computes no gradients (its chunked rows would all "
                                         "be kept for backward; step_saliency does not model it): run the model "
                                         "under torch.no_grad() — generate() already does")
                    out = controls.random_group_attention(query, k_all, v_all, kv_start, bounds, c.oeb_rule,
                                                          c.oeb_strength, c.oeb_tau_max, scaling,
                                                          handle.control_seed, layer)
                else:
                    out, _, stats = ops.oeb_attention(query, k_all, v_all, kv_start, bounds, c.oeb_rule,
                                                      c.oeb_strength, c.oeb_tau_max, ops.OEB_EPS, sink=sink,
                                                      window=window, scale=scaling)
                    handle._count("oeb", layer, stats[..., 4].sum())
                out, weights = out.transpose(1, 2).contiguous(), None
            else:
                out, weights = inner(module, query, key, value, attention_mask, **kwargs)
            if smi:
                if handle.control == "random-residual":
                    out = controls.random_value_injection(out, v_all, windows, c.smi_alpha, c.smi_window,
                                                          handle.control_seed, layer)
                else:
                    out = ops.smi_value(out, v_all, windows, c.smi_alpha, c.smi_window)
                handle._count("smi", layer, (call.windows[..., 0] >= 0).sum())
            return out, weights
        return attention


def _layer_view(layer, key, value, call, window):
    """The keys and values the layer's OEB / SMI read, and the call's kv_start, OEB bounds and SMI
    windows in the coordinates of those keys. A cache holds every key of the sequence, or (a
    sliding-window layer's cache: GPT-OSS, Mistral) only the last ones: those keys then stand at
    positions offset.. of the sequence, and every key a query can see inside the window must be there."""
    valid = call.valid_length
    if key.shape[2] >= valid:
        if key.shape[2] > valid:    # a preallocated (static) cache: its valid part
            key, value = key[:, :, :valid], value[:, :, :valid]
        return key, value, call.kv_start, call.bounds, call.windows
    offset = valid - key.shape[2]
    if window is None or offset > max(0, call.past - window + 1):
        raise ValueError(f"layer {layer}'s KV cache holds {key.shape[2]} of the sequence's {valid} keys"
                         + ("" if window is None else f", fewer than its sliding window of {window} needs")
                         + ": StepFlow's OEB and SMI layers need every key the layer attends to; use a cache that "
                         "keeps them or leave the layer out of the config")
    kv_start = (call.kv_start - offset).clamp_min(0)
    bounds = torch.where(call.bounds >= 0, (call.bounds - offset).clamp_min(0), call.bounds)
    windows = call.windows
    on = windows[..., 0] >= 0
    if bool((on & (windows[..., 0] < offset)).any()):
        raise ValueError(f"layer {layer} is a sliding-window layer whose cache no longer holds the previous step's "
                         f"last tokens that SMI injects (smi_window too large for the window of {window}): leave it "
                         "out of smi_layers")
    windows = torch.where(on[..., None], windows - offset, windows)
    return key, value, kv_start, bounds, windows


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
        options["model"] = model  # "auto" markers per model family (segment.markers_for)
    if tokenizer is not None or "boundary_token_ids" in options or "think_end_token_ids" in options:
        tracker = StepTracker(**options)
    handle = StepFlowHandle(model, config, tracker, control, control_seed, options)
    handle._token = hf.Installed.on(model).push(handle._attention)
    # On the base model, so that generate(), model(...) and step_saliency's direct call all pass here.
    handle._hooks.append(model.base_model.register_forward_pre_hook(handle._before_forward, with_kwargs=True))
    handle._hooks.append(model.base_model.register_forward_hook(handle._after_forward, with_kwargs=True))
    _watch_caches()
    original_generate = model.generate

    def generate(*args, **kwargs):
        return handle._generate(original_generate, args, kwargs)

    generate.__doc__ = original_generate.__doc__
    handle._generate_wrapper = generate
    model.generate = generate
    if config.smi_rule == "residual":
        layers = hf.decoder_layers(model)
        for idx in config.smi_layers:
            handle._hooks.append(layers[idx].register_forward_hook(handle._after_layer(idx)))
    model._stepflow_handle = handle
    return handle
