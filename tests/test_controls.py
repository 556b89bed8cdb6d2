"""The evaluation controls of replace_attention: random-attn and random-residual (docs/method.md, "Controls").

Oracles: a float64 loop over query rows written from the definition (random-attn), the group
structure read back from A'/A (no hash involved), SMI's float64 reference for which tokens
change (random-residual), and teacher-forced passes for decoding.
"""
from __future__ import annotations

import math

import pytest
import torch

import stepflow_ext as sf
from stepflow_ext import controls, reference
from hf_models import model as make_model, tokenizer as make_tokenizer
from test_hf import batch, decode_and_prefill

SCALE = 8 ** -0.5


def _inputs(dtype=torch.float64, tq=None):
    """Random q, k, v with GQA (4 heads over 2 kv heads), two left-padded rows with steps and a summary."""
    seg = sf.Segmentation.from_lengths([[3, 4, 5, 6], [2, 3, 0, 4, 5]],
                                       kinds=[["question", "step", "step", "summary"],
                                              ["question", "step", "step", "step", "summary"]], pad="left")
    tk = seg.length
    tq = tq or tk
    q = (torch.randn(2, 4, tq, 8) * 4).to(dtype)  # sharp attention: many rows are locked in
    k, v = torch.randn(2, 2, tk, 8).to(dtype), torch.randn(2, 2, tk, 8).to(dtype)
    return q, k, v, seg.seg_start()[:, tk - tq:], seg.kv_start()


def materialized_random_attn(q, k, v, seg_start, kv_start, strength, num_sink, scale, seed, layer):
    """The definition, one query row at a time in float64; the draw ranks (hash, key) pairs itself."""
    q, k, v = q.double(), k.double(), v.double()
    b, heads, tq, _ = q.shape
    tk = k.shape[2]
    allowed, sink, current, context = reference.oeb_groups(seg_start, kv_start, tq, tk, num_sink)
    probs = reference.attention_probs(q, k, scale, allowed)
    values = reference._expand_kv(v, heads)
    out = torch.zeros_like(q)
    for row in range(b):
        qpos = torch.arange(tk - tq, tk)
        hashes = controls.random_group_keys(seed, layer, row, torch.arange(heads), qpos, torch.arange(tk))
        for h in range(heads):
            for i in range(tq):
                a = probs[row, h, i].clone()
                cur, ctx = current[row, i], context[row, i]
                p_c, p_x = float(a[cur].sum()), float(a[ctx].sum())
                if p_x > 0 and p_c > p_x:
                    delta = -strength * math.log(p_c / p_x)
                    pool = sorted(j for j in range(tk) if cur[j] or ctx[j])
                    ranked = sorted(pool, key=lambda j: (int(hashes[h, i, j]), j))
                    g1, g2 = ranked[:int(cur.sum())], ranked[int(cur.sum()):]
                    p1, p2 = float(a[g1].sum()), float(a[g2].sum())
                    if delta != 0 and p1 > 0 and p2 > 0:
                        odds = p1 / p2 * math.exp(delta)
                        mass = p1 + p2
                        a[g1] *= mass * odds / (1 + odds) / p1
                        a[g2] *= mass / (1 + odds) / p2
                out[row, h, i] = a @ values[row, h]
    return out


@pytest.mark.parametrize("dtype,tq", [(torch.float64, None), (torch.float32, None), (torch.float64, 3)])
def test_random_attn_equals_materialized_definition(dtype, tq):
    torch.manual_seed(1)
    q, k, v, seg_start, kv_start = _inputs(dtype, tq)
    # max_elements forces chunks of a few query rows.
    got = controls.random_group_attention(q, k, v, seg_start, kv_start, 0.7, 1, SCALE, 5, 2, max_elements=4 * 22 * 3)
    expected = materialized_random_attn(q, k, v, seg_start, kv_start, 0.7, 1, SCALE, 5, 2)
    atol = 1e-10 if dtype == torch.float64 else 2e-5
    valid = (torch.arange(q.shape[2]) + k.shape[2] - q.shape[2] >= kv_start[:, None])[:, None, :, None]
    torch.testing.assert_close(got.double() * valid, expected * valid, atol=atol, rtol=1e-4)
    assert got.dtype == dtype
    plain, _, _ = reference.oeb_attention(q.double(), k.double(), v.double(), seg_start, kv_start, 0.0, 1, SCALE)
    changed = ((got.double() - plain).abs() > 1e-3).any(-1)
    assert int(changed.sum()) > 5, "the control changed (almost) nothing: the test would not see a wrong rebalance"
    oeb, _, _ = reference.oeb_attention(q.double(), k.double(), v.double(), seg_start, kv_start, 0.7, 1, SCALE)
    assert (got.double() - oeb).abs().max() > 1e-2  # not OEB itself
    zero = controls.random_group_attention(q, k, v, seg_start, kv_start, 0.0, 1, SCALE, 5, 2)
    torch.testing.assert_close((zero.double() * valid), plain * valid, atol=atol, rtol=1e-4)


def test_random_groups_carry_oebs_log_odds_change():
    """Read G1, G2 back from A'/A (a constant ratio per group), then check the definition's properties."""
    torch.manual_seed(2)
    q, k, v, seg_start, kv_start = _inputs()
    strength, num_sink = 0.6, 1
    _, a_new = controls.random_group_attention(q, k, v, seg_start, kv_start, strength, num_sink, SCALE, 11, 0,
                                               return_weights=True)
    tq = tk = q.shape[2]
    allowed, sink, current, context = reference.oeb_groups(seg_start, kv_start, tq, tk, num_sink)
    a = reference.attention_probs(q, k, SCALE, allowed)
    checked, differs_from_c, head_draws_differ = 0, 0, 0
    for row in range(2):
        for i in range(tq):
            draws = set()
            for h in range(4):
                cur, ctx, snk = current[row, i], context[row, i], sink[row, i]
                p_c, p_x = float(a[row, h, i][cur].sum()), float(a[row, h, i][ctx].sum())
                ratio = a_new[row, h, i] / a[row, h, i].clamp_min(1e-300)
                torch.testing.assert_close(a_new[row, h, i][snk], a[row, h, i][snk], rtol=1e-12, atol=1e-15)
                if not (p_x > 0 and p_c > p_x):  # OEB leaves the row alone: so does the control
                    torch.testing.assert_close(a_new[row, h, i], a[row, h, i], rtol=1e-12, atol=1e-15)
                    continue
                if math.log(p_c / p_x) < 0.05:  # too small a change to tell the groups apart by their ratios
                    continue
                delta = -strength * math.log(p_c / p_x)
                pool = cur | ctx
                # Delta < 0: G1's share shrinks (ratio < 1), G2's grows (ratio > 1).
                g1 = pool & (ratio < 1)
                g2 = pool & (ratio > 1)
                assert int(g1.sum()) == int(cur.sum()) and int(g2.sum()) == int(ctx.sum())
                assert torch.allclose(ratio[g1], ratio[g1][0]) and torch.allclose(ratio[g2], ratio[g2][0])
                p1, p2 = float(a[row, h, i][g1].sum()), float(a[row, h, i][g2].sum())
                q1, q2 = float(a_new[row, h, i][g1].sum()), float(a_new[row, h, i][g2].sum())
                assert math.log(q1 / q2) - math.log(p1 / p2) == pytest.approx(delta, abs=1e-9)
                assert q1 + q2 == pytest.approx(p1 + p2, abs=1e-12)
                differs_from_c += bool((g1 != cur).any())
                draws.add(tuple(g1.nonzero().flatten().tolist()))
                checked += 1
            head_draws_differ += len(draws) > 1
    assert checked > 20 and differs_from_c > 0.8 * checked and head_draws_differ > 5


def _hidden(output):
    return (output[0] if isinstance(output, tuple) else output).detach().clone()


def test_random_residual_norm_tokens_and_directions():
    tok = make_tokenizer()
    model = make_model("llama")
    ids, mask, _ = batch(tok)
    t = ids.shape[1]
    real = mask.sum(1).tolist()
    # Row 1 starts with an empty step (SMI does not count it, so its next step is unchanged); row 0: question,
    # three steps, summary.
    seg = sf.Segmentation.from_lengths([[real[0] - 20, 6, 5, 4, 5], [real[1] - 12, 0, 4, 5, 3]],
                                       kinds=[["question", "step", "step", "step", "summary"],
                                              ["question", "step", "step", "step", "summary"]],
                                       pad="left", total_length=t)
    cfg = sf.StepFlowConfig(smi_layers=(1, 2), smi_gamma=0.3)
    outputs = {}
    for layer in (1, 2):
        decoder = sf.hf.decoder_layers(model)[layer]
        seen = {}
        # Forward hooks run in the order they were registered: one before the handle's, one after.
        h1 = decoder.register_forward_hook(lambda m, a, o, seen=seen: seen.__setitem__("before", _hidden(o)))
        with sf.replace_attention(model, cfg, control="random-residual", control_seed=3) as handle:
            h2 = decoder.register_forward_hook(lambda m, a, o, seen=seen: seen.__setitem__("after", _hidden(o)))
            handle.set_segmentation(seg)
            with torch.no_grad():
                model(ids, attention_mask=mask)
            assert handle.control == "random-residual" and handle.control_seed == 3
        h1.remove()
        h2.remove()
        outputs[layer] = seen
    for layer, seen in outputs.items():
        h, new = seen["before"].double(), seen["after"].double()
        smi = reference.step_momentum(h, seg.seg_ids, seg.seg_kinds_tensor(), 0.9, 0.3)
        affected = (smi - h).abs().amax(-1) > 0
        assert int(affected.sum()) == 20 - 6 + 12 - 4  # steps k >= 2 and the summary
        change = new - h
        norm = torch.linalg.vector_norm(change, dim=-1)
        torch.testing.assert_close(norm[affected], 0.3 * torch.linalg.vector_norm(h, dim=-1)[affected],
                                   rtol=1e-5, atol=1e-6)
        assert bool((norm[~affected] == 0).all())
        direction = change / norm.clamp_min(1e-30)[..., None]
        per_segment = {}
        for row in range(2):
            for s in seg.seg_ids[row].unique().tolist():
                tokens = (seg.seg_ids[row] == s) & affected[row]
                if tokens.any():
                    d = direction[row, tokens]
                    torch.testing.assert_close(d, d[:1].expand_as(d), atol=1e-5, rtol=0)
                    per_segment[(row, s)] = d[0]
        assert len(per_segment) == 5  # row 0: steps 2, 3 and the summary; row 1: step 3 and the summary
        dirs = torch.stack(list(per_segment.values()))
        cosines = dirs @ dirs.T - torch.eye(len(dirs), dtype=dirs.dtype)
        assert float(cosines.abs().max()) < 0.7  # distinct random directions in R^64
    assert (outputs[1]["after"] - outputs[1]["before"]).abs().max() > 0


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("control", ["random-attn", "random-residual"])
def test_decode_equals_prefill(arch, control):
    tok = make_tokenizer()
    model = make_model(arch)
    cfg = sf.StepFlowConfig(oeb_layers=(0, 1), oeb_strength=0.8, smi_layers=(2, 3), smi_gamma=0.3)
    decoded, prefilled, full_ids, mask, _ = decode_and_prefill(model, tok, cfg, control=control, control_seed=0)
    torch.testing.assert_close(decoded, prefilled, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        stock = model(full_ids, attention_mask=mask).logits[:, -decoded.shape[1]:]
    assert (decoded - stock).abs().max() > 1e-3, "the control changed nothing"


@pytest.mark.parametrize("control", ["random-attn", "random-residual"])
def test_generate_under_control_and_exact_restore(control):
    tok = make_tokenizer()
    model = make_model("qwen2")
    ids, mask, _ = batch(tok, with_trace=False)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id)
    stock = model.generate(**kw)
    with torch.no_grad():
        stock_logits = model(stock, attention_mask=torch.ones_like(stock)).logits
    cfg = sf.StepFlowConfig.default_for(model, oeb_strength=1.0, smi_gamma=0.5)
    with sf.replace_attention(model, cfg, tokenizer=tok, control=control, control_seed=7) as handle:
        assert handle.control == control and handle.control_seed == 7
        greedy = model.generate(**kw)
        assert greedy.shape == stock.shape
        seg = handle.segmentation(greedy)
        assert seg.seg_ids.shape == greedy.shape
        torch.manual_seed(0)
        sampled = model.generate(**{**kw, "do_sample": True, "temperature": 0.8})
        assert sampled.shape[0] == 2
    assert torch.equal(model.generate(**kw), stock)
    with torch.no_grad():
        assert torch.equal(model(stock, attention_mask=torch.ones_like(stock)).logits, stock_logits)
    assert model.config._attn_implementation == "sdpa" and not hasattr(model, "_stepflow_handle")


@pytest.mark.parametrize("control", ["random-attn", "random-residual"])
def test_seed_changes_the_draw(control):
    tok = make_tokenizer()
    model = make_model("mistral")
    ids, mask, seg = batch(tok)
    cfg = sf.StepFlowConfig(oeb_layers=(0, 1), oeb_strength=0.8, smi_layers=(2, 3), smi_gamma=0.3)

    def logits(seed, config=cfg):
        with torch.no_grad(), sf.replace_attention(model, config, control=control, control_seed=seed) as handle:
            handle.set_segmentation(seg)
            return model(ids, attention_mask=mask).logits[mask.bool()]

    first = logits(1)
    assert torch.equal(logits(1), first)
    assert (logits(2) - first).abs().max() > 1e-3
    # The other component runs as configured: dropping it changes the output.
    alone = sf.StepFlowConfig(oeb_layers=cfg.oeb_layers if control == "random-attn" else (),
                              smi_layers=cfg.smi_layers if control == "random-residual" else (),
                              oeb_strength=0.8, smi_gamma=0.3)
    assert (logits(1, alone) - first).abs().max() > 1e-3


def test_control_errors():
    tok = make_tokenizer()
    model = make_model("llama")
    ids, mask, seg = batch(tok)
    with pytest.raises(ValueError, match="random-atn"):
        sf.replace_attention(model, sf.StepFlowConfig(oeb_layers=[0]), control="random-atn")
    with pytest.raises(ValueError, match="oeb_layers"):
        sf.replace_attention(model, sf.StepFlowConfig(smi_layers=[3]), control="random-attn")
    with pytest.raises(ValueError, match="smi_layers"):
        sf.replace_attention(model, sf.StepFlowConfig(oeb_layers=[0]), control="random-residual")
    for bad in (-1, 2 ** 32, 1.5, True, "0"):
        with pytest.raises(ValueError, match="control_seed"):
            sf.replace_attention(model, sf.StepFlowConfig(oeb_layers=[0]), control="random-attn", control_seed=bad)
    assert not hasattr(model, "_stepflow_handle")  # nothing was installed by the failed calls
    with sf.replace_attention(model, sf.StepFlowConfig(oeb_layers=[0]), control="none") as handle:
        assert handle.control is None
    with sf.replace_attention(model, sf.StepFlowConfig(oeb_layers=[0]), control="random-attn") as handle:
        handle.set_segmentation(seg)
        with pytest.raises(ValueError, match="no_grad"):
            model(ids, attention_mask=mask)
        with torch.no_grad():
            model(ids, attention_mask=mask)
