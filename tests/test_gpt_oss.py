"""GPT-OSS (attention sinks, sliding-window layers, harmony channels): the tiny fixture, Step-Saliency
and replace_attention, held against the materialized eager way and the float64 oracle."""
from __future__ import annotations

import pytest
import torch
import transformers

import stepflow_ext as sf
from stepflow_ext import cli
import gpt_oss_fixture as fx
from hf_models import left_padded_batch


def test_fixture_has_sinks_windows_and_harmony_tokens(tmp_path):
    tok, model = fx.tokenizer(), fx.model()
    assert model.config.model_type == "gpt_oss"
    assert model.config.layer_types[:2] == ["sliding_attention", "full_attention"]
    for layer in model.model.layers:
        assert layer.self_attn.sinks.abs().min() > 1e-3   # the sinks matter
    ids = tok(fx.PROMPTS[1] + fx.TRACE)["input_ids"]
    assert len(ids) > 4 * fx.WINDOW                       # the windows bind
    for special in ("<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|return|>"):
        assert len(tok(special)["input_ids"]) == 1, special
    assert tok.decode(ids) == fx.PROMPTS[1] + fx.TRACE
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert text == "<|start|>user<|message|>hi<|end|><|start|>assistant"
    files = cli.make_tiny_model(str(tmp_path / "m"), arch="gpt_oss")
    assert "config.json" in files and "tokenizer.json" in files
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"))
    assert loaded.config.model_type == "gpt_oss" and loaded.model.layers[0].self_attn.sinks.abs().min() > 1e-3
    with pytest.raises(ValueError, match="arch"):
        cli.make_tiny_model(str(tmp_path / "x"), arch="llama")


def _saliency_batch(model):
    from test_saliency_paper import random_batch

    # rows of 39 and 28 tokens: with a window of 8 the sliding layers never see far segments
    return random_batch(seed=7, vocab=model.config.vocab_size)


def test_step_saliency_equals_materialized_with_sinks_and_windows():
    """preset='paper' on GptOssForCausalLM: the kernel (sinks in the denominator, sliding windows, no
    T x T) gives the step matrices of eager attention with output_attentions and retained gradients."""
    from test_saliency_paper import assert_rel_close, materialized_block_maps

    model = fx.model(seed=3)
    ids, mask, seg = _saliency_batch(model)
    res = sf.step_saliency(model, ids, seg, preset="paper", attention_mask=mask)
    expected = materialized_block_maps(model, ids, mask, seg)
    got = res.normalized("block")
    err = float(((got.double() - expected).abs()[expected != 0] / expected.abs()[expected != 0]).max())
    print(f"\n  gpt_oss step saliency vs materialized eager: max relative error {err:.2e}")
    assert_rel_close(got, expected)
    # the windows bind: on sliding layers (0, 2) the summary (segment 5) never sees the question (0)
    assert float(expected[0, [0, 2], 5, 0].abs().max()) == 0.0 and float(res.maps[0, [0, 2], 5, 0].abs().max()) == 0
    assert float(expected[0, [1, 3], 5, 0].abs().min()) > 0          # the full layers do
    # the sinks matter: without them the maps differ
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.fill_(-1e4)
    no_sink = sf.step_saliency(model, ids, seg, preset="paper", attention_mask=mask).normalized("block")
    assert float((no_sink - got).abs().max()) > 1e-3 * float(got.abs().max())


def test_step_saliency_builds_no_t_by_t_tensor():
    """On GPT-OSS (eager attention in transformers) step_saliency attends through the project's kernel
    and skips the 4D mask: no tensor with two trailing dims of length T is made, forward or backward,
    and the model's eager attention is never called. The same model without the fused path (plain
    eager forward) does make them, so the check can fail."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from stepflow_ext import hf

    class SquareShapes(TorchDispatchMode):
        def __init__(self, t):
            super().__init__()
            self.t, self.seen = t, []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for x in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[-1] == x.shape[-2] == self.t:
                    self.seen.append((str(func), tuple(x.shape)))
            return out

    model = fx.model(seed=5)
    ids, mask, seg = _saliency_batch(model)
    t = ids.shape[1]
    assert hf.text_config(model)._attn_implementation == "eager"
    with SquareShapes(t) as spy:
        sf.step_saliency(model, ids, seg, preset="paper", attention_mask=mask)
    assert spy.seen == [], spy.seen[:5]
    assert hf.text_config(model)._attn_implementation == "eager"       # restored
    with SquareShapes(t) as spy, torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert spy.seen, "the eager forward made no T x T tensor: this test could not fail"


def test_step_saliency_per_layer_equals_reference():
    """Each layer's raw map (default loss and heads) equals reference.step_saliency_pool on the layer's
    own q, k, v, output gradient, sink logits and window (float64 model)."""
    from stepflow_ext import hf, reference

    model = fx.model(seed=4).double()
    ids, mask, seg = _saliency_batch(model)
    seen = {}

    def spy(inner):
        def attention(module, query, key, value, attention_mask, **kwargs):
            out, w = inner(module, query, key, value, attention_mask, **kwargs)
            if out.requires_grad:
                entry = seen.setdefault(module.layer_idx, {})
                entry.update(q=query.detach(), k=key.detach(), v=value.detach(), scale=module.scaling,
                             sink=module.sinks.detach(), window=kwargs.get("sliding_window"))
                out.register_hook(lambda g, e=entry: e.__setitem__("do", g.transpose(1, 2)))
            return out, w
        return attention

    installed = hf.Installed.on(model)
    token = installed.push(spy)
    try:
        res = sf.step_saliency(model, ids, seg, target="generated", attention_mask=mask)
    finally:
        installed.pop(token)
    assert [seen[i]["window"] for i in range(4)] == [fx.WINDOW, None, fx.WINDOW, None]
    worst = 0.0
    for layer in range(4):
        e = seen[layer]
        expected = reference.step_saliency_pool(e["q"], e["k"], e["v"], e["do"], seg.seg_ids, seg.num_segments,
                                                e["scale"], "sum_abs", sink=e["sink"], window=e["window"])
        got = res.maps[:, layer].double()
        worst = max(worst, float((got - expected).abs().max() / expected.abs().max()))
    print(f"\n  gpt_oss per-layer maps vs reference.step_saliency_pool: max error {worst:.2e} (of the largest entry)")
    assert worst < 1e-5


# --------------------------------------------------------------------------- replace_attention

SHARP = 3.0   # peaky attention: the bridge rule fires on this random model (as on real ones)


def batch(tok, with_trace=True):
    """The two harmony prompts (+ the trace the model writes), left padded, and their segmentation."""
    return left_padded_batch(tok, fx.PROMPTS, fx.TRACE if with_trace else "")


def paper_config(model, parts="both"):
    cfg = sf.StepFlowConfig.default_for(model, smi_alpha=0.5)   # alpha large enough to see in logits
    keep = dict(oeb_layers=cfg.oeb_layers if parts != "smi" else (),
                smi_layers=cfg.smi_layers if parts != "oeb" else ())
    return sf.StepFlowConfig.from_dict(cfg.to_dict() | keep)


def test_oracle_without_intervention_is_the_stock_model():
    """The oracle's attention (reference, with sinks and windows) is GPT-OSS's own: a check of the oracle."""
    from stepflow_oracle import reference_logits

    tok, model = fx.tokenizer(), fx.model(sharpen=SHARP)
    ids, mask, seg = batch(tok)
    cfg = sf.StepFlowConfig(oeb_layers=(), smi_layers=())
    expected = reference_logits(model, ids, mask, seg, cfg)
    stock = model(ids, attention_mask=mask).logits
    valid = mask.bool()
    torch.testing.assert_close(stock[valid].double(), expected[valid], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("layers", ["default", "both_kinds"])
def test_teacher_forced_equals_oracle(layers, capsys):
    """default_for(model) (OEB on sliding layer 0, SMI on full layer 3), and OEB on a sliding and a full
    layer with SMI on a sliding one: the teacher-forced pass equals the float64 oracle; sinks matter."""
    from stepflow_oracle import reference_logits

    tok, model = fx.tokenizer(), fx.model(sharpen=SHARP)
    ids, mask, seg = batch(tok)
    assert seg.kinds[0] == ["question", "step", "step", "step", "step", "summary"], seg.kinds
    cfg = paper_config(model)
    if layers == "both_kinds":
        cfg = sf.StepFlowConfig.from_dict(cfg.to_dict() | dict(oeb_layers=(0, 1), smi_layers=(2,)))
    with torch.no_grad(), sf.replace_attention(model, cfg, tokenizer=tok) as handle:
        handle.set_segmentation(seg)
        got = model(ids, attention_mask=mask).logits
        counts = handle.trigger_counts()
    stock = model(ids, attention_mask=mask).logits
    expected = reference_logits(model, ids, mask, seg, cfg)
    valid = mask.bool()
    err = float((got[valid].double() - expected[valid]).abs().max())
    with capsys.disabled():
        print(f"\n  gpt_oss teacher-forced ({layers}: {cfg.describe()}) vs float64 oracle: max error {err:.2e}; "
              f"triggers {counts}")
    torch.testing.assert_close(got[valid].double(), expected[valid], atol=1e-4, rtol=1e-4)
    assert (got[valid] - stock[valid]).abs().max() > 1e-3, "the intervention changed nothing"
    assert all(counts["oeb"].get(i, 0) > 0 for i in cfg.oeb_layers), counts
    assert sum(counts["smi"].values()) > 0


def decode_and_prefill(model, tok, cfg):
    """Decode the trace token by token (online harmony tracking), then one teacher-forced pass of the
    same tokens with the tracked segmentation."""
    trace = tok(fx.TRACE)["input_ids"]
    prompt_ids, prompt_mask, _ = batch(tok, with_trace=False)
    with torch.no_grad(), sf.replace_attention(model, cfg, tokenizer=tok) as handle:
        out = model(prompt_ids, attention_mask=prompt_mask, use_cache=True)
        cache, m, step_logits = out.past_key_values, prompt_mask, [out.logits[:, -1]]
        for t in trace:
            nxt = torch.full((2, 1), t)
            m = torch.cat([m, torch.ones_like(nxt)], 1)
            out = model(nxt, attention_mask=m, cache=cache, use_cache=True)
            cache = out.past_key_values
            step_logits.append(out.logits[:, -1])
        counts = handle.trigger_counts(reset=True)
        seg = handle.segmentation()
        full_ids = torch.cat([prompt_ids, torch.tensor([trace] * 2)], 1)
        handle.set_segmentation(seg)
        full = model(full_ids, attention_mask=m).logits
    # the sliding layers' cache really dropped keys
    assert cache.layers[0].keys.shape[2] < fx.WINDOW < full_ids.shape[1]
    p = prompt_ids.shape[1]
    return torch.stack(step_logits, 1), full[:, p - 1:], full_ids, m, seg, counts


@pytest.mark.parametrize("layers", ["default", "both_kinds"])
def test_decode_equals_prefill_and_oracle(layers, capsys):
    """Under default_for(model) (and OEB on layers 0-1, SMI on sliding layer 2): decoding token by token
    (sliding-window caches that drop keys, channels tracked online from the generated harmony markers)
    gives the logits of one teacher-forced pass, and both equal the float64 oracle; the bridge rule fires."""
    from stepflow_oracle import reference_logits

    tok, model = fx.tokenizer(), fx.model(sharpen=SHARP)
    cfg = sf.StepFlowConfig.default_for(model)
    if layers == "both_kinds":
        cfg = sf.StepFlowConfig.from_dict(cfg.to_dict() | dict(oeb_layers=(0, 1), smi_layers=(2,)))
    decoded, prefilled, full_ids, mask, seg, counts = decode_and_prefill(model, tok, cfg)
    assert seg.kinds[0] == ["question", "step", "step", "step", "step", "summary"], seg.kinds
    _, _, forced = batch(tok)
    assert torch.equal(seg.seg_ids, forced.seg_ids)
    expected = reference_logits(model, full_ids, mask, seg, cfg)[:, -decoded.shape[1]:]
    e1 = float((decoded - prefilled).abs().max())
    e2 = float((decoded.double() - expected).abs().max())
    oeb, smi = sum(counts["oeb"].values()), sum(counts["smi"].values())
    with capsys.disabled():
        print(f"\n  gpt_oss ({cfg.describe()}) decode vs prefill {e1:.2e}, vs float64 oracle {e2:.2e}; "
              f"decoding {decoded.shape[1] - 1} tokens x 2 rows: the bridge rule fired on {oeb} (layer, head, "
              f"token) rows, SMI at {smi} step starts")
    torch.testing.assert_close(decoded, prefilled, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(decoded.double(), expected, atol=1e-4, rtol=1e-4)
    assert oeb > 0 and smi > 0


@pytest.mark.parametrize("cache", [None, "static"])
def test_generate_tracks_harmony_channels_and_equals_prefill(cache):
    """generate() under default_for(model), with the trace's analysis marker as the start of the
    completion: the channels are tracked from the generated markers, and the logits of every generated
    token equal a teacher-forced pass of the sequence."""
    tok, model = fx.tokenizer(), fx.model(sharpen=SHARP)
    ids, mask, _ = batch(tok, with_trace=False)
    opening = tok("<|channel|>analysis<|message|>First, 12 + 7 means adding seven to twelve. So")["input_ids"]
    ids = torch.cat([ids, torch.tensor([opening] * 2)], 1)
    mask = torch.cat([mask, torch.ones(2, len(opening), dtype=mask.dtype)], 1)
    new = 10
    cfg = sf.StepFlowConfig.default_for(model)
    with torch.no_grad(), sf.replace_attention(model, cfg, tokenizer=tok) as handle:
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                             cache_implementation=cache, pad_token_id=tok.pad_token_id, eos_token_id=None,
                             output_logits=True, return_dict_in_generate=True)
        seg = handle.segmentation(out.sequences)
        assert seg.kinds[0][:2] == ["question", "step"], seg.kinds   # the prompt's analysis marker opened it
        full_mask = torch.cat([mask, torch.ones(2, new, dtype=mask.dtype)], 1)
        handle.set_segmentation(seg)
        full = model(out.sequences, attention_mask=full_mask).logits
    decoded = torch.stack(out.logits, 1)
    torch.testing.assert_close(decoded, full[:, ids.shape[1] - 1:-1], atol=1e-4, rtol=1e-4)


def test_unsupported_gpt_oss_features_raise():
    tok, model = fx.tokenizer(), fx.model()
    ids, mask, _ = batch(tok)
    cfg = sf.StepFlowConfig.default_for(model)
    with torch.no_grad(), sf.replace_attention(model, cfg, tokenizer=tok, control="random-attn"):
        with pytest.raises(ValueError, match="random-attn.*(sinks|sliding)"):
            model(ids, attention_mask=mask)

    # a window shorter than SMI's: the sliding cache no longer holds the previous step's last tokens
    small = fx.model(sliding_window=3)
    cfg = sf.StepFlowConfig(oeb_layers=(), smi_layers=(2,), smi_window=4)
    trace = tok(fx.TRACE)["input_ids"]
    with torch.no_grad(), sf.replace_attention(small, cfg, tokenizer=tok):
        prompt_ids, prompt_mask, _ = batch(tok, with_trace=False)
        out = small(prompt_ids, attention_mask=prompt_mask, use_cache=True)
        cache, m = out.past_key_values, prompt_mask
        with pytest.raises(ValueError, match="smi_layers"):
            for t in trace:
                nxt = torch.full((2, 1), t)
                m = torch.cat([m, torch.ones_like(nxt)], 1)
                cache = small(nxt, attention_mask=m, cache=cache, use_cache=True).past_key_values


def test_saliency_under_replace_attention_equals_materialized(capsys):
    """step_saliency on GPT-OSS under default_for(model): in the OEB layer (sliding, with sinks) the
    maps are those of A'; materialized: eager attention whose OEB layer returns the reference A' (with
    the sinks and the window) as its weights and whose SMI layer adds reference.smi_value."""
    import sys

    from stepflow_ext import ops, reference
    from test_saliency_paper import assert_rel_close, materialized_block_maps

    tok, model = fx.tokenizer(), fx.model(sharpen=SHARP)
    ids = torch.tensor([tok(fx.PROMPTS[1] + fx.TRACE)["input_ids"]])
    seg = sf.segment(ids, [len(tok(fx.PROMPTS[1])["input_ids"])], tokenizer=tok)
    cfg = sf.StepFlowConfig.default_for(model, smi_alpha=0.5)
    mask = torch.ones_like(ids)
    with sf.replace_attention(model, cfg, tokenizer=tok) as handle:
        got = sf.step_saliency(model, ids, seg, preset="paper", attention_mask=mask)
        fired = handle.trigger_counts()["oeb"]
    plain = sf.step_saliency(model, ids, seg, preset="paper", attention_mask=mask)

    kinds, kv_start = seg.seg_kinds_tensor(), torch.zeros(1, dtype=torch.long)
    bounds = reference.oeb_bounds(seg.seg_ids, kinds, "bridge").clamp_min(0)   # (-1, -1) rows: no change
    windows = reference.smi_windows(seg.seg_ids, kinds, seg.closing_tensor(), cfg.smi_window)
    module = sys.modules[type(model.model.layers[0].self_attn).__module__]
    plain_eager = module.eager_attention_forward

    def eager(mod, query, key, value, attention_mask, scaling=None, **kwargs):
        if mod.layer_idx in cfg.oeb_layers:
            a = reference.oeb_probs(query, key, kv_start, bounds, "bridge", 0.0, cfg.oeb_tau_max, ops.OEB_EPS,
                                    mod.sinks, kwargs.get("sliding_window"), scaling)[0]
            out = torch.einsum("bhij,bhjd->bhid", a, reference._expand_kv(value, query.shape[1]))
        else:
            out, a = plain_eager(mod, query, key, value, attention_mask, scaling=scaling, **kwargs)
            out = out.transpose(1, 2)
        if mod.layer_idx in cfg.smi_layers:
            out = reference.smi_value(out, value, windows, cfg.smi_alpha)
        return out.transpose(1, 2).contiguous(), a

    module.eager_attention_forward = eager
    try:
        expected = materialized_block_maps(model, ids, mask, seg)
    finally:
        module.eager_attention_forward = plain_eager
    block = got.normalized("block")
    err = float(((block.double() - expected).abs()[expected != 0] / expected.abs()[expected != 0]).max())
    change = float((plain.maps[:, 0] - got.maps[:, 0]).abs().max() / plain.maps[:, 0].abs().max())
    with capsys.disabled():
        print(f"\n  gpt_oss saliency under StepFlow vs materialized A': max relative error {err:.2e}; "
              f"OEB fired {fired}, layer 0 maps changed by {change:.2e} (relative)")
    assert sum(fired.values()) > 0 and change > 1e-3
    assert_rel_close(block, expected, rel=1e-4)


@pytest.mark.parametrize("arch", ["gpt_oss", "llama"])
def test_step_saliency_reuses_the_fused_lse(arch, monkeypatch):
    """Where step_saliency attends through the fused kernel (eager models: GPT-OSS with sinks and
    sliding windows, an eager Llama with GQA), every layer's pooling gets that kernel's lse instead of
    recomputing q K^T for the row statistics, and the maps equal those of the recomputing path
    (saliency.REUSE_FUSED_LSE = False, what STEPFLOW_SALIENCY_LSE=0 sets) to fp32 rounding. The
    pooling reads a given lse (shifting it by log 2 halves a map without sinks), so a passed lse is
    not recomputed; an SDPA model (no fused path) passes none."""
    import math

    from hf_models import model as hf_model
    from stepflow_ext import hf, ops, saliency
    from test_saliency_paper import assert_rel_close

    model = fx.model(seed=3) if arch == "gpt_oss" else hf_model("llama", attn="eager", seed=2)
    ids, mask, seg = _saliency_batch(model)
    pool = ops.step_saliency_pool
    calls = []

    def spy(q, k, v, grad_out, seg_ids, num_segments, scale, head_reduction="sum_abs", lse=None, **extra):
        calls.append(lse)
        got = pool(q, k, v, grad_out, seg_ids, num_segments, scale, head_reduction, lse=lse, **extra)
        if lse is not None and "sink" not in extra:
            shifted = pool(q, k, v, grad_out, seg_ids, num_segments, scale, head_reduction, lse=lse + math.log(2.0),
                           **extra)
            torch.testing.assert_close(shifted, got / 2, rtol=1e-5, atol=1e-12)
        return got

    monkeypatch.setattr(ops, "step_saliency_pool", spy)
    for preset in ("paper", None):
        calls.clear()
        monkeypatch.setattr(saliency, "REUSE_FUSED_LSE", True)
        reused = sf.step_saliency(model, ids, seg, preset=preset, attention_mask=mask)
        layers = hf.num_layers(model)
        assert len(calls) == layers and all(x is not None for x in calls), "a layer's pooling recomputed its lse"
        assert all(x.dtype == torch.float32 and tuple(x.shape) == (ids.shape[0], model.config.num_attention_heads,
                                                                   ids.shape[1]) for x in calls)
        calls.clear()
        monkeypatch.setattr(saliency, "REUSE_FUSED_LSE", False)
        recomputed = sf.step_saliency(model, ids, seg, preset=preset, attention_mask=mask)
        assert len(calls) == layers and all(x is None for x in calls)
        assert_rel_close(reused.maps, recomputed.maps, rel=1e-4)
        assert_rel_close(reused.normalized("block"), recomputed.normalized("block"), rel=1e-4)
    # an SDPA model has no fused attention: nothing to reuse
    if arch == "llama":
        calls.clear()
        monkeypatch.setattr(saliency, "REUSE_FUSED_LSE", True)
        sf.step_saliency(hf_model("llama", attn="sdpa", seed=2), ids, seg, preset="paper", attention_mask=mask)
        assert calls and all(x is None for x in calls)
