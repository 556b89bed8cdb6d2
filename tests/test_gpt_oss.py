"""GPT-OSS (attention sinks, sliding-window layers, harmony channels): the tiny fixture, Step-Saliency
and replace_attention, held against the materialized eager way and the float64 oracle."""
from __future__ import annotations

import pytest
import torch
import transformers

import stepflow_ext as sf
from stepflow_ext import cli
import gpt_oss_fixture as fx


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
