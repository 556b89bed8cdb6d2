"""The evaluation controls of replace_attention: random-attn and random-residual (docs/method.md, "Controls"),
for the paper's rules (bridge OEB, value SMI) and the earlier ones (odds, residual).

Oracles: a float64 loop over query rows written from the definition (random-attn), the group
structure read back from A'/A (no hash involved), SMI's float64 reference for which tokens
change and by how much (random-residual), and teacher-forced passes for decoding.
"""
from __future__ import annotations

import math

import pytest
import torch

import stepflow_ext as sf
from stepflow_ext import controls, reference
from hf_models import model as make_model, tokenizer as make_tokenizer
from test_intervention import SHARP, batch, decode_and_prefill

SCALE = 8 ** -0.5


def _inputs(dtype=torch.float64, tq=None, rule="bridge"):
    """Random q, k, v with GQA (4 heads over 2 kv heads), two left-padded rows with steps and a summary,
    and the bounds of `rule` for the last tq queries."""
    seg = sf.Segmentation.from_lengths([[3, 4, 5, 6], [2, 3, 0, 4, 5]],
                                       kinds=[["question", "step", "step", "summary"],
                                              ["question", "step", "step", "step", "summary"]], pad="left")
    tk = seg.length
    tq = tq or tk
    q = (torch.randn(2, 4, tq, 8) * 4).to(dtype)  # sharp attention: many rows are starved / locked in
    k, v = torch.randn(2, 2, tk, 8).to(dtype), torch.randn(2, 2, tk, 8).to(dtype)
    bounds = reference.oeb_bounds(seg.seg_ids, seg.seg_kinds_tensor(), rule, 1)[:, tk - tq:]
    return q, k, v, seg.kv_start(), bounds


def materialized_random_attn(q, k, v, kv_start, bounds, rule, strength, tau_max, scale, seed, layer):
    """The definition, one query row at a time in float64; the draw ranks (hash, key) pairs itself."""
    q, k, v = q.double(), k.double(), v.double()
    b, heads, tq, _ = q.shape
    tk = k.shape[2]
    allowed, g0, g1, g2 = reference.oeb_groups(kv_start, bounds, tq, tk)
    values = reference._expand_kv(v, heads)
    scores = scale * torch.einsum("bhid,bhjd->bhij", q, reference._expand_kv(k, heads))
    out = torch.zeros_like(q)
    for row in range(b):
        qpos = torch.arange(tk - tq, tk)
        hashes = controls.random_group_keys(seed, layer, row, torch.arange(heads), qpos, torch.arange(tk))
        for h in range(heads):
            for i in range(tq):
                ok = allowed[row, i]
                if not ok.any():
                    continue
                z = scores[row, h, i].masked_fill(~ok, float("-inf"))
                a = torch.softmax(z, -1)
                grp1, grp2 = g1[row, i], g2[row, i]
                pool = sorted(j for j in range(tk) if grp1[j] or grp2[j])
                ranked = sorted(pool, key=lambda j: (int(hashes[h, i, j]), j))
                if rule == "bridge":
                    lam_b, lam_s, active = reference.bridge_shifts(a[None, None, None], grp2[None, None],
                                                                   grp1[None, None], g0[row, i][None, None], tau_max)
                    if bool(active):
                        r1, r2 = ranked[:int(grp1.sum())], ranked[int(grp1.sum()):]  # |B| random keys, the rest
                        z = z.clone()
                        z[r1] += float(lam_b)
                        z[r2] += float(lam_s)
                        a = torch.softmax(z, -1)
                else:
                    p_c, p_x = float(a[grp2].sum()), float(a[grp1].sum())
                    if p_x > 0 and p_c > p_x:
                        delta = -strength * math.log(p_c / p_x)
                        r1, r2 = ranked[:int(grp2.sum())], ranked[int(grp2.sum()):]  # |C| random keys, the rest
                        p1, p2 = float(a[r1].sum()), float(a[r2].sum())
                        if delta != 0 and p1 > 0 and p2 > 0:
                            odds = p1 / p2 * math.exp(delta)
                            mass = p1 + p2
                            a = a.clone()
                            a[r1] *= mass * odds / (1 + odds) / p1
                            a[r2] *= mass / (1 + odds) / p2
                out[row, h, i] = a @ values[row, h]
    return out


@pytest.mark.parametrize("rule", ["bridge", "odds"])
@pytest.mark.parametrize("dtype,tq", [(torch.float64, None), (torch.float32, None), (torch.float64, 3)])
def test_random_attn_equals_materialized_definition(rule, dtype, tq):
    torch.manual_seed(1)
    q, k, v, kv_start, bounds = _inputs(dtype, tq, rule)
    args = (kv_start, bounds, rule, 0.7, 0.15, SCALE, 5, 2)
    # max_elements forces chunks of a few query rows.
    got = controls.random_group_attention(q, k, v, *args, max_elements=4 * 22 * 3)
    expected = materialized_random_attn(q, k, v, *args)
    atol = 1e-10 if dtype == torch.float64 else 2e-5
    valid = (torch.arange(q.shape[2]) + k.shape[2] - q.shape[2] >= kv_start[:, None])[:, None, :, None]
    torch.testing.assert_close(got.double() * valid, expected * valid, atol=atol, rtol=1e-4)
    assert got.dtype == dtype
    qd, kd, vd = q.double(), k.double(), v.double()
    off = torch.full_like(bounds, -1)
    plain, _, _ = reference.oeb_attention(qd, kd, vd, kv_start, off, rule, scale=SCALE)
    changed = ((got.double() - plain).abs() > 1e-3).any(-1)
    assert int(changed.sum()) > (5 if tq is None else 1), "the control changed (almost) nothing"
    oeb, _, _ = reference.oeb_attention(qd, kd, vd, kv_start, bounds, rule, 0.7, 0.15, scale=SCALE)
    assert (got.double() - oeb).abs().max() > 1e-2  # not OEB itself


def test_random_bridge_groups_carry_the_shifts():
    """Bridge rule: read R1, R2 back from A'/A (a constant ratio per group): |R1| = |B|, their logit shifts
    differ by lambda_B - lambda_S, the keys outside B u S keep their relative weights, draws differ per head."""
    torch.manual_seed(2)
    q, k, v, kv_start, bounds = _inputs(rule="bridge")
    _, a_new = controls.random_group_attention(q, k, v, kv_start, bounds, "bridge", 0.0, 0.15, SCALE, 11, 0,
                                               return_weights=True)
    tq = tk = q.shape[2]
    allowed, g0, g1, g2 = reference.oeb_groups(kv_start, bounds, tq, tk)
    a = reference.attention_probs(q, k, SCALE, allowed)
    lam_b, lam_s, active = reference.bridge_shifts(a, g2, g1, g0, 0.15)
    checked, differs, head_draws_differ = 0, 0, 0
    for row in range(2):
        for i in range(tq):
            draws = set()
            for h in range(4):
                if not bool(active[row, h, i]):
                    torch.testing.assert_close(a_new[row, h, i], a[row, h, i], rtol=1e-12, atol=1e-15)
                    continue
                ratio = (a_new[row, h, i] / a[row, h, i].clamp_min(1e-300)).log()
                gap = float(lam_b[row, h, i] - lam_s[row, h, i])
                pool = g1[row, i] | g2[row, i]
                base = ratio[g0[row, i]]
                if base.numel():
                    assert torch.allclose(base, base[0].expand_as(base))
                # the keys of the pool shifted by lambda_B (vs lambda_S): a gap of lambda_B - lambda_S
                hi = pool & (ratio > ratio[pool].min() + abs(gap) / 2) if gap > 0 else \
                    pool & (ratio < ratio[pool].max() - abs(gap) / 2)
                if abs(gap) < 1e-3:
                    continue
                assert int(hi.sum()) == int(g1[row, i].sum())
                lo = pool & ~hi
                assert float(ratio[hi].mean() - ratio[lo].mean()) == pytest.approx(gap, abs=1e-8)
                differs += bool((hi != g1[row, i]).any())
                draws.add(tuple(hi.nonzero().flatten().tolist()))
                checked += 1
            head_draws_differ += len(draws) > 1
    assert checked > 10 and differs > 0.5 * checked and head_draws_differ > 2


def _hidden(output):
    return (output[0] if isinstance(output, tuple) else output).detach().clone()


def test_random_residual_value_rule_norm_tokens_and_directions():
    """Value rule: where SMI adds alpha * mean_W v to a head's output, the control adds a random vector of the
    same norm (per token and head), nothing elsewhere; directions differ between heads and tokens."""
    tok = make_tokenizer()
    model = make_model("qwen2")
    ids, mask, seg = batch(tok)
    cfg = sf.StepFlowConfig(smi_layers=(2,), smi_alpha=0.5)
    seen = {}

    def spy(inner):  # the output of the attention function: inner is StepFlow's
        def attention(module, query, key, value, attention_mask, **kwargs):
            out, w = inner(module, query, key, value, attention_mask, **kwargs)
            if module.layer_idx == 2:
                seen["out"], seen["v"] = out.detach().double(), value.detach().double()
            return out, w
        return attention

    outs = {}
    for control in (None, "random-residual"):
        with torch.no_grad(), sf.replace_attention(model, cfg, control=control, control_seed=3) as handle:
            handle.set_segmentation(seg)
            installed = sf.hf.Installed.on(model)
            token = installed.push(spy)
            try:
                model(ids, attention_mask=mask)
            finally:
                installed.pop(token)
        outs[control] = seen["out"]
    plain_cfg = sf.StepFlowConfig(smi_layers=(2,), smi_alpha=0.0)  # the attention output without SMI
    with torch.no_grad(), sf.replace_attention(model, plain_cfg) as handle:
        handle.set_segmentation(seg)
        installed = sf.hf.Installed.on(model)
        token = installed.push(spy)
        try:
            model(ids, attention_mask=mask)
        finally:
            installed.pop(token)
    base = seen["out"]
    windows = reference.smi_windows(seg.seg_ids, seg.seg_kinds_tensor(), seg.closing_tensor(), cfg.smi_window)
    targets = windows[..., 0] >= 0
    assert int(targets.sum()) >= 4
    smi_change = outs[None] - base                     # (B, T, H, d)
    control_change = outs["random-residual"] - base
    norms = torch.linalg.vector_norm(control_change, dim=-1)
    torch.testing.assert_close(norms, torch.linalg.vector_norm(smi_change, dim=-1), rtol=1e-5, atol=1e-6)
    assert bool((norms[~targets] == 0).all()) and bool((norms[targets] > 0).all())
    directions = control_change[targets] / norms[targets][..., None]          # (N, H, d)
    flat = directions.reshape(-1, directions.shape[-1])
    cosines = flat @ flat.T - torch.eye(len(flat), dtype=flat.dtype)
    assert float(cosines.abs().max()) < 0.95
    cos_smi = (control_change[targets] * smi_change[targets]).sum(-1) / (norms[targets] ** 2)
    assert float(cos_smi.abs().mean()) < 0.5  # not SMI's direction


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
    cfg = sf.StepFlowConfig(smi_layers=(1, 2), smi_rule="residual", smi_gamma=0.3)
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


EARLIER = sf.StepFlowConfig(oeb_layers=(0, 1), oeb_rule="odds", oeb_strength=0.8, smi_layers=(2, 3),
                            smi_rule="residual", smi_gamma=0.3)
PAPER = sf.StepFlowConfig(oeb_layers=(0, 1), smi_layers=(2, 3), smi_alpha=0.5)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("control", ["random-attn", "random-residual"])
@pytest.mark.parametrize("cfg", [PAPER, EARLIER], ids=["paper", "earlier"])
def test_decode_equals_prefill(arch, control, cfg):
    tok = make_tokenizer()
    model = make_model(arch, sharpen=SHARP)
    decoded, prefilled, full_ids, mask, _, _ = decode_and_prefill(model, tok, cfg, control=control, control_seed=0)
    torch.testing.assert_close(decoded, prefilled, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        stock = model(full_ids, attention_mask=mask).logits[:, -decoded.shape[1]:]
    assert (decoded - stock).abs().max() > 1e-3, "the control changed nothing"


@pytest.mark.parametrize("control", ["random-attn", "random-residual"])
def test_generate_under_control_and_exact_restore(control):
    tok = make_tokenizer()
    model = make_model("qwen2", sharpen=SHARP)
    ids, mask, _ = batch(tok, with_trace=False)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id)
    stock = model.generate(**kw)
    with torch.no_grad():
        stock_logits = model(stock, attention_mask=torch.ones_like(stock)).logits
    cfg = sf.StepFlowConfig.default_for(model, smi_alpha=0.5)
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
    model = make_model("mistral", sharpen=SHARP)
    ids, mask, seg = batch(tok)
    cfg = PAPER

    def logits(seed, config=cfg):
        with torch.no_grad(), sf.replace_attention(model, config, control=control, control_seed=seed) as handle:
            handle.set_segmentation(seg)
            return model(ids, attention_mask=mask).logits[mask.bool()]

    first = logits(1)
    assert torch.equal(logits(1), first)
    assert (logits(2) - first).abs().max() > 1e-3
    # The other component runs as configured: dropping it changes the output.
    alone = sf.StepFlowConfig(oeb_layers=cfg.oeb_layers if control == "random-attn" else (),
                              smi_layers=cfg.smi_layers if control == "random-residual" else (), smi_alpha=0.5)
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
