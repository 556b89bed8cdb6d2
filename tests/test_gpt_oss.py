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
