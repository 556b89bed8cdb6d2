"""Per-request step tracking inside a vLLM worker (imports nothing of vLLM).

vLLM batches requests token-wise: each model step holds, per request, the tokens at positions
past..past+n-1 of its own sequence (a prefill chunk, a decode token, a recomputed prefix after a
preemption). `SteeredRequest` keeps one StepTracker per request (design.md 2.1) and turns each step's
tokens into what the OEB and SMI layers need: oeb_attention bounds and SMI value windows in the
request's key positions, exactly as replace_attention does in HF (intervention_state.oeb_bounds /
smi_windows on the tracker's update).

It follows the cache: a step that starts before the tracked length (a preempted request recomputed,
or resumed at a prefix-cache hit) rolls the tracker back (StepTracker.truncate); a step that starts
after it (a prefix-cache hit: those keys were computed for another request with the same salt) first
places the tokens it skipped, read from the request's own token ids.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch

from ..config import StepFlowConfig
from ..intervention_state import kinds_tensor, oeb_bounds, smi_windows
from ..segment import StepTracker, TrackerUpdate


def parse_request(payload, segmentation, num_layers: int) -> StepFlowConfig:
    """The StepFlowConfig of a request's extra_args payload ("default", a dict or JSON text), checked
    against the served model and against what the plugin supports."""
    if payload == "default":
        config = StepFlowConfig.default_for(num_layers)
    elif isinstance(payload, dict):
        config = StepFlowConfig.from_dict(payload)
    elif isinstance(payload, str):
        config = StepFlowConfig.from_json(payload)
    else:
        raise ValueError(f"extra_args['stepflow'] must be 'default', a StepFlowConfig dict or JSON text, got "
                         f"{type(payload).__name__}")
    config.check_layers(num_layers)
    if config.smi_layers and config.smi_rule != "value":
        raise ValueError("under vLLM StepFlow supports the paper's SMI rule 'value' only (the 'residual' rule "
                         "edits the decoder layer's hidden state, outside the attention op); use smi_rule='value' "
                         "or the HF engine")
    if segmentation is not None and not isinstance(segmentation, dict):
        raise ValueError(f"extra_args['stepflow_segmentation'] must be a dict, got {type(segmentation).__name__}")
    return config


@dataclass
class Placement:
    """One request's tokens in one model step, and what its OEB / SMI layers apply to them."""

    row: int                 # the request's row in the batch (query_start_loc index)
    start: int               # its tokens are the batch's tokens start..stop-1
    stop: int
    past: int                # keys in the cache before the step: its tokens sit at positions past..past+n-1
    config: StepFlowConfig
    bounds: torch.Tensor     # (1, n, 2) int64 oeb_attention bounds ((-1, -1): not intervened)
    windows: torch.Tensor    # (1, n, 2) int64 SMI value windows ((-1, -1): no injection)
    first_oeb: int           # first of the n tokens with OEB bounds (n if none: a question chunk)
    any_smi: bool


class SteeredRequest:
    """One request under StepFlow: its config, segmentation options and tracker."""

    def __init__(self, config: StepFlowConfig, num_prompt: int, tokenizer, hf_config, segmentation=None):
        self.config, self.num_prompt = config, int(num_prompt)
        self.options = dict(segmentation or {}, tokenizer=tokenizer, model=SimpleNamespace(config=hf_config))
        self.tracker: StepTracker | None = None

    @property
    def length(self) -> int:
        return self.tracker.length if self.tracker is not None else 0

    def place(self, row, start, stop, past, new_ids, token_ids) -> Placement:
        """Place the step's tokens new_ids (positions past..) and return their Placement.
        token_ids(lo, hi): the request's token ids at positions lo..hi-1 (for tokens the step skips)."""
        if past < self.length:      # recomputed after a preemption, or resumed before the tracked end
            if past == 0:
                self.tracker = None
            else:
                self.tracker.truncate(past)
        if self.length < past:      # keys computed earlier for another request (prefix cache) or not seen
            self._feed(list(token_ids(self.length, past)), self.length)
        update = self._feed(list(new_ids), past)
        c = self.config
        seg_kinds = kinds_tensor(self.tracker.kinds)
        seg = update.seg_ids
        channel = torch.where(seg >= 0, seg_kinds.gather(1, seg.clamp(min=0)), torch.full_like(seg, -1))
        n = len(new_ids)
        positions = torch.arange(past, past + n)
        bounds = oeb_bounds(c.oeb_rule, channel, update.seg_start, update.think_start, update.summary_start,
                            torch.zeros(1, dtype=torch.long), positions, c.num_sink)
        windows = smi_windows(update.prev_step, c.smi_window)
        on = (bounds[0, :, 0] >= 0).nonzero()
        first = int(on[0, 0]) if on.numel() else n
        return Placement(row, start, stop, past, c, bounds, windows, first, bool((windows[0, :, 0] >= 0).any()))

    def _feed(self, ids: list, pos: int) -> TrackerUpdate:
        """Feed ids at positions pos.. (pos == tracked length); the first feed starts the sequence, with
        the request's prompt length (its prompt may come in chunks, or with generated tokens after it
        when a preempted request is recomputed)."""
        p = self.num_prompt
        if self.tracker is None:
            assert pos == 0
            self.tracker = StepTracker(**self.options)
            head = ids[:p]
            row = torch.tensor([head], dtype=torch.long)
            if len(head) < p:
                return self.tracker.start(row, prompt_lengths=[p])
            first = self.tracker.start(row)
            if len(ids) == len(head):
                return first
            rest = self.tracker.feed(torch.tensor([ids[p:]], dtype=torch.long))
            return TrackerUpdate(*(torch.cat([a, b], dim=1) for a, b in zip(first[:5], rest[:5])), rest.kinds,
                                 rest.closed)
        return self.tracker.feed(torch.tensor([ids], dtype=torch.long).reshape(1, len(ids)))
