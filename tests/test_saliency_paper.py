"""The paper's Step-Saliency (design.md 2.2): preset="paper", target "all", loss_reduction "mean",
head reduction "abs_mean", the block view, and the paper's per-layer numbers FB, AB, FB/AB.

Oracle: the materialized way the authors compute it, written here independently of the package
(eager attention with output_attentions, gradients retained on the attention probabilities,
|A * dL/dA| averaged over the heads, the loss the mean next-token NLL of each trace over every
token after its first, and the block mean over |a| x |c| taken with a loop over the segments).
Inputs are random token ids and random contiguous segmentations, batched with left padding.
"""
from __future__ import annotations

import types

import numpy as np
import pytest
import torch
import transformers

import stepflow_ext as sf
from stepflow_ext import hf, ops, reference
from stepflow_ext.saliency import causal_pair_counts, segment_sizes
from hf_models import ARCHITECTURES, config as make_config, model as make_model

KINDS = ["question", "step", "step", "step", "step", "summary"]


def random_batch(seed, vocab, lengths=((7, 5, 9, 4, 6, 8), (5, 0, 6, 3, 10, 4))):
    """Two rows of random ids, segmented by `lengths` (a row may have an empty step), left padded."""
    gen = torch.Generator().manual_seed(seed)
    seg = sf.Segmentation.from_lengths([list(r) for r in lengths], kinds=[KINDS, KINDS], pad="left")
    ids = torch.randint(1, vocab, seg.seg_ids.shape, generator=gen)
    valid = seg.seg_ids >= 0
    ids = torch.where(valid, ids, torch.zeros_like(ids))   # pad id 0
    return ids, valid.long(), seg


def materialized_block_maps(model, ids, mask, seg, loss_reduction="mean"):
    """(B, L, S, S) float64: the paper's step matrices, computed the materialized way."""
    original = model.config._attn_implementation
    model.set_attn_implementation("eager")
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        out = model(inputs_embeds=embeds, attention_mask=mask, output_attentions=True, use_cache=False)
        for a in out.attentions:
            a.retain_grad()
        valid = mask.bool()
        targets = valid[:, 1:] & valid[:, :-1]              # x_t predicted from a real x_{t-1}
        logp = torch.log_softmax(out.logits[:, :-1].float(), -1).gather(2, ids[:, 1:, None]).squeeze(2)
        per_row = -(logp * targets).sum(1)
        if loss_reduction == "mean":
            per_row = per_row / targets.sum(1)
        per_row.sum().backward()
        b, s = ids.shape[0], seg.num_segments
        maps = torch.zeros(b, len(out.attentions), s, s, dtype=torch.float64)
        for layer, a in enumerate(out.attentions):
            token_map = (a.detach().double() * a.grad.double()).abs().mean(dim=1)   # rule "ag", mean over heads
            for row in range(b):
                for qa in range(s):
                    rows = (seg.seg_ids[row] == qa).nonzero().flatten()
                    for kc in range(s):
                        cols = (seg.seg_ids[row] == kc).nonzero().flatten()
                        if len(rows) and len(cols):
                            maps[row, layer, qa, kc] = token_map[row][rows][:, cols].mean()
        return maps
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
        model.set_attn_implementation(original)


def assert_rel_close(got, expected, rel=1e-5):
    """Every nonzero entry of `expected` within `rel` relative; its zeros (the future) zero in `got`."""
    got, expected = got.detach().double(), expected.detach().double()
    nonzero = expected != 0
    assert int(nonzero.sum()) > expected.numel() // 3
    err = ((got - expected).abs()[nonzero] / expected.abs()[nonzero]).max()
    assert float(err) < rel, f"max relative error {float(err):.2e}"
    zeros = got[~nonzero].abs()
    largest_zero = float(zeros.max()) if zeros.numel() else 0.0
    assert largest_zero <= 1e-12 * float(expected.abs().max()), f"{largest_zero:.2e} where the oracle has 0"


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_paper_preset_equals_materialized(arch):
    model = make_model(arch, seed=11)
    ids, mask, seg = random_batch(seed=100 + ARCHITECTURES.index(arch), vocab=model.config.vocab_size)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = sf.step_saliency(model, ids, seg, preset="paper", attention_mask=mask)
    expected = materialized_block_maps(model, ids, mask, seg)
    assert_rel_close(res.normalized("block"), expected)
    assert res.meta["preset"] == "paper" and res.meta["target"] == "all"
    assert res.meta["loss_reduction"] == "mean" and res.meta["head_reduction"] == "abs_mean"
    assert res.meta["num_targets_per_row"] == [int(m.sum()) - 1 for m in mask]
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert model.config._attn_implementation == "sdpa" and not model.training


def test_paper_preset_on_sliding_window_layers():
    """Mistral with a window shorter than the trace: the saliency follows the window (keys j > i - w)."""
    cfg = make_config("mistral")
    cfg.sliding_window = 9
    torch.manual_seed(5)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
    model.eval()
    ids, mask, seg = random_batch(seed=3, vocab=cfg.vocab_size)
    res = sf.step_saliency(model, ids, seg, preset="paper", attention_mask=mask)
    expected = materialized_block_maps(model, ids, mask, seg)
    assert_rel_close(res.normalized("block"), expected)
    # far-apart segments never see each other inside a 9-token window: the question column of the summary
    assert float(expected[0, :, 5, 0].abs().max()) == 0.0 and float(res.maps[0, :, 5, 0].abs().max()) == 0.0


def test_loss_mean_is_sum_over_targets_per_trace():
    model = make_model("qwen2", seed=2)
    ids, mask, seg = random_batch(seed=21, vocab=model.config.vocab_size)
    mean = sf.step_saliency(model, ids, seg, target="all", loss_reduction="mean", head_reduction="abs_mean",
                            attention_mask=mask)
    total = sf.step_saliency(model, ids, seg, target="all", loss_reduction="sum", head_reduction="abs_mean",
                             attention_mask=mask)
    n = torch.tensor(mean.meta["num_targets_per_row"], dtype=torch.float32)
    assert n.tolist() == [int(m.sum()) - 1 for m in mask] and n[0] != n[1]
    torch.testing.assert_close(mean.maps * n[:, None, None, None], total.maps, rtol=1e-5, atol=1e-12)
    singles = [sf.step_saliency(model, ids[i:i + 1], sf.Segmentation(seg.seg_ids[i:i + 1], seg.kinds[i:i + 1]),
                                preset="paper", attention_mask=mask[i:i + 1]) for i in range(2)]
    assert mean.meta["loss"] == pytest.approx(sum(r.meta["loss"] for r in singles), rel=1e-5)
    assert total.meta["loss"] == pytest.approx(sum(float(k) * r.meta["loss"] for k, r in zip(n, singles)), rel=1e-5)
    # the mean is per trace: a row's maps do not depend on the rest of the batch
    for i, alone in enumerate(singles):
        torch.testing.assert_close(alone.maps[0], mean.maps[i], rtol=1e-5, atol=1e-6 * float(mean.maps[i].max()))
    # and the sum is not the mean: the two rows scale differently
    assert not torch.allclose(mean.maps, total.maps / n.mean())


def test_target_all_is_every_token_after_the_first():
    model = make_model("llama", seed=4)
    ids, mask, seg = random_batch(seed=8, vocab=model.config.vocab_size)
    everything = mask.bool().clone()
    everything[:, 0] = True                                   # padding and first tokens are dropped
    a = sf.step_saliency(model, ids, seg, target="all", attention_mask=mask)
    b = sf.step_saliency(model, ids, seg, target=everything, attention_mask=mask)
    torch.testing.assert_close(a.maps, b.maps, rtol=0, atol=0)
    assert a.meta["num_targets"] == int(mask.sum()) - 2
    first = sf.saliency.target_mask(seg, "all")
    kv = seg.kv_start()
    assert not bool(first[torch.arange(2), kv].any()) and int(first.sum()) == int(mask.sum()) - 2
    gen = sf.step_saliency(model, ids, seg, target="generated", attention_mask=mask)
    assert not torch.allclose(a.maps, gen.maps)
    # loss "sum" over "all" in the materialized way: the block view of sum_abs differs from abs_mean
    paper = sf.step_saliency(model, ids, seg, preset="paper", attention_mask=mask)
    expected = materialized_block_maps(model, ids, mask, seg, loss_reduction="sum")
    mine = sf.step_saliency(model, ids, seg, target="all", head_reduction="abs_mean", attention_mask=mask)
    assert_rel_close(mine.normalized("block"), expected)
    n = torch.tensor(paper.meta["num_targets_per_row"], dtype=torch.float64)
    assert_rel_close(paper.normalized("block").double() * n[:, None, None, None], expected)


def test_views_block_mean_row_and_checkpointing():
    model = make_model("qwen3", seed=6)
    ids, mask, seg = random_batch(seed=31, vocab=model.config.vocab_size)
    res = sf.step_saliency(model, ids, seg, preset="paper", attention_mask=mask)
    ckpt = sf.step_saliency(model, ids, seg, preset="paper", attention_mask=mask, gradient_checkpointing=True,
                            chunk_tokens=5)
    torch.testing.assert_close(ckpt.maps, res.maps, rtol=1e-4, atol=1e-6 * float(res.maps.max()))
    blocks = reference.block_counts(seg.seg_ids, seg.num_segments)
    expected = torch.where(blocks[:, None] > 0, res.maps.double() / blocks[:, None].clamp_min(1), 0.0)
    torch.testing.assert_close(res.normalized("block").double(), expected, rtol=1e-6, atol=0)
    assert float(blocks[1, 1, 1]) == 0 and float(res.normalized("block")[1, :, 1].abs().max()) == 0  # empty step
    pairs = reference.causal_pair_counts(seg.seg_ids, seg.num_segments)
    torch.testing.assert_close(res.counts.double(), pairs)
    torch.testing.assert_close(res.sizes.double(), segment_sizes(seg.seg_ids, seg.num_segments))
    mean = torch.where(pairs[:, None] > 0, res.maps.double() / pairs[:, None].clamp_min(1), 0.0)
    torch.testing.assert_close(res.normalized("mean").double(), mean, rtol=1e-6, atol=0)
    rows = res.normalized("row")
    nonempty = res.maps.sum(-1) > 0
    torch.testing.assert_close(rows.sum(-1)[nonempty], torch.ones(int(nonempty.sum())))
    with pytest.raises(ValueError, match="how must be one of"):
        res.normalized("blocks")


def _hand_result():
    """Two traces, 3 layers: row 0 with two summary segments, row 1 without summary (padding slots)."""
    sizes = [[2, 3, 1, 2, 4], [4, 2, 5]]
    kinds = [["question", "step", "step", "summary", "summary"], ["question", "step", "step"]]
    seg_ids = torch.full((2, 12), -1, dtype=torch.long)
    for row, lens in enumerate(sizes):
        ids = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
        seg_ids[row, :len(ids)] = ids
    gen = torch.Generator().manual_seed(0)
    maps = torch.rand(2, 3, 5, 5, generator=gen) * torch.tril(torch.ones(5, 5))
    maps[1, :, 3:] = 0
    maps[1, :, :, 3:] = 0
    maps[0, 1, 1:3] = 0                               # layer 1: the steps' rows carry nothing -> AB = 0
    maps[0, 2, 1:3, 1:3] = maps[0, 2, 1:3, 1:3] / maps[0, 2, 1:3, 1:3].sum() * 5e-10   # tiny AB
    counts = causal_pair_counts(seg_ids, 5).float()
    return sf.StepSaliencyResult(maps, counts, kinds, {}), sizes, kinds, maps


def test_fb_ab_by_hand():
    res, sizes, kinds, maps = _hand_result()
    torch.testing.assert_close(res.sizes, torch.tensor([[2., 3, 1, 2, 4], [4, 2, 5, 0, 0]]))  # from the counts
    reports = res.diagnose()
    for row in range(2):
        s = np.array(sizes[row], dtype=np.float64)
        n = len(s)
        block = maps[row, :, :n, :n].double().numpy() / np.outer(s, s)
        rep = reports[row]
        for layer in range(3):
            b = block[layer]
            # by hand: summary segments 3, 4 against themselves (the zero above the diagonal included)
            fb = (b[3, 3] + b[3, 4] + b[4, 3] + b[4, 4]) / 4 if row == 0 else 0.0
            ab = (b[1, 1] + b[1, 2] + b[2, 1] + b[2, 2]) / 4
            assert b[3, 4] == 0 if row == 0 else True
            ratio = fb / ab if ab > 1e-10 else 0.0
            assert rep["final_block_intensity"][layer] == pytest.approx(fb, rel=1e-6, abs=1e-30)
            assert rep["analysis_block_intensity"][layer] == pytest.approx(ab, rel=1e-6, abs=1e-30)
            assert rep["final_heat_anomaly"][layer] == pytest.approx(ratio, rel=1e-6, abs=1e-30)
        np.testing.assert_allclose(rep["block_map_layer_mean"], block.mean(0), rtol=1e-6)
        assert rep["final_heat_anomaly_mean"] == pytest.approx(np.mean(rep["final_heat_anomaly"]))
    r0 = reports[0]
    assert r0["analysis_block_intensity"][1] == 0 and r0["final_heat_anomaly"][1] == 0       # AB = 0
    assert 0 < r0["analysis_block_intensity"][2] < 1e-10 and r0["final_heat_anomaly"][2] == 0  # AB below the floor
    assert r0["final_heat_anomaly"][0] > 0
    assert reports[1]["final_block_intensity"] == [0.0, 0.0, 0.0]                            # no summary


def test_several_summary_segments_count_as_one_summary():
    res, _, _, maps = _hand_result()
    rep = res.diagnose(recent_window=1)[0]
    m = maps[0, 0].double()
    summary_row = m[3] + m[4]
    total = float(summary_row.sum())
    assert rep["summary_thinking_share"][0] == pytest.approx(float(summary_row[1] + summary_row[2]) / total, rel=1e-6)
    assert rep["summary_recent_share"][0] == pytest.approx(float(summary_row[2] + summary_row[3] + summary_row[4])
                                                           / total, rel=1e-6)
    assert rep["lock_in_index"][0] == pytest.approx(float(m[2, 2] / m[2].sum()), rel=1e-6)


def test_bad_arguments():
    model = make_model("mistral", seed=1)
    ids, mask, seg = random_batch(seed=2, vocab=model.config.vocab_size)
    bad = [dict(preset="Paper"), dict(preset="paper", target="summary"), dict(preset="paper", head_reduction="sum_abs"),
           dict(preset="paper", loss_reduction="sum"), dict(preset="paper", target=mask.bool()),
           dict(loss_reduction="avg"), dict(target="everything"), dict(head_reduction="abs_max"), dict(target=3)]
    names = ["preset", "target", "head_reduction", "loss_reduction", "target", "loss_reduction", "target",
             "head_reduction", "target"]
    for kwargs, name in zip(bad, names):
        with pytest.raises(ValueError, match=name):
            sf.step_saliency(model, ids, seg, attention_mask=mask, **kwargs)
    assert model.config._attn_implementation == "sdpa" and not hasattr(model, "_stepflow_installed")
    # arguments that agree with the preset are fine
    res = sf.step_saliency(model, ids, seg, attention_mask=mask, preset="paper", target="all",
                           head_reduction="abs_mean", loss_reduction="mean")
    assert res.meta["preset"] == "paper"


def test_save_load_keeps_sizes(tmp_path):
    res, _, _, _ = _hand_result()
    res.save(tmp_path / "r.safetensors")
    back = sf.StepSaliencyResult.load(tmp_path / "r.safetensors")
    assert torch.equal(back.sizes, res.sizes) and torch.equal(back.normalized("block"), res.normalized("block"))
    from safetensors.torch import save_file
    save_file({"maps": res.maps, "counts": res.counts}, str(tmp_path / "old.safetensors"))   # an older file
    (tmp_path / "old.safetensors.json").write_text((tmp_path / "r.safetensors.json").read_text())
    old = sf.StepSaliencyResult.load(tmp_path / "old.safetensors")
    assert torch.equal(old.sizes, res.sizes)


# --------------------------------------------------------------------------- under StepFlow (OEB layers)


class _OEBHandle:
    """A stand-in for StepFlowHandle with the pooling contract: OEB (bridge rule) in `layers`
    through ops.oeb_attention, and pool_oeb_args(layer) describing it."""

    def __init__(self, model, seg, layers, tau_max):
        self.config = types.SimpleNamespace(oeb_layers=tuple(layers), to_dict=lambda: {"oeb_layers": list(layers)})
        self.layers, self.tau_max, self._forced = set(layers), tau_max, None
        self.bounds = reference.oeb_bounds(seg.seg_ids, seg.seg_kinds_tensor(), "bridge")
        self.kv_start = seg.kv_start()
        self.calls = []
        self.token = hf.Installed.on(model).push(self._attention)
        self.model = model
        model._stepflow_handle = self

    def set_segmentation(self, seg):
        self._forced = seg

    def pool_oeb_args(self, layer):
        self.calls.append(layer)
        if layer not in self.layers:
            return {}
        return dict(oeb_bounds=self.bounds, oeb_rule="bridge", oeb_tau_max=self.tau_max, oeb_eps=ops.OEB_EPS)

    def _attention(self, inner):
        def attention(module, query, key, value, attention_mask, **kwargs):
            if module.layer_idx not in self.layers:
                return inner(module, query, key, value, attention_mask, **kwargs)
            out, _, stats = ops.oeb_attention(query, key, value, self.kv_start, self.bounds, "bridge",
                                              tau_max=self.tau_max, scale=kwargs.get("scaling") or module.scaling)
            self.active = ops.active_count(stats)
            return out.transpose(1, 2).contiguous(), None
        return attention

    def restore(self):
        hf.Installed.on(self.model).pop(self.token)
        del self.model._stepflow_handle


def rows_of(ids, seg):
    """Each row of the batch alone, without its padding: (ids (1, n), Segmentation)."""
    for row in range(ids.shape[0]):
        keep = seg.seg_ids[row] >= 0
        yield ids[row:row + 1, keep], sf.Segmentation(seg.seg_ids[row:row + 1, keep], [seg.kinds[row]])


def materialized_oeb(model, ids, seg, args_of):
    """The paper's step matrices of a model whose layers attend with A' where `args_of(ids, seg)`
    (one unpadded row) gives pool-style OEB arguments for a layer: eager attention whose OEB
    layers return the reference A' as their weights. Rows one by one (the reference A' of a
    padded query row has no valid key, and its NaN gradients would leak through 0 * NaN)."""
    module = __import__(type(model.model.layers[0].self_attn).__module__, fromlist=["eager_attention_forward"])
    plain_eager = module.eager_attention_forward
    out, logits = [], []
    for row_ids, row_seg in rows_of(ids, seg):
        args = args_of(row_ids, row_seg)
        kv_start = torch.zeros(1, dtype=torch.long)

        def oeb_eager(mod, query, key, value, attention_mask, scaling=None, **kwargs):
            a = args.get(mod.layer_idx) or {}
            if not a:
                return plain_eager(mod, query, key, value, attention_mask, scaling=scaling, **kwargs)
            # Rows that are not intervened, (-1, -1), as (0, 0): every key in the own group, no bridge,
            # so no change either; reference.bridge_shifts' unselected log(0) branch would give NaN
            # gradients on (-1, -1) rows (0 * inf through torch.where).
            bounds = a["oeb_bounds"].clamp_min(0)
            a2 = reference.oeb_probs(query, key, kv_start, bounds, a.get("oeb_rule", "bridge"),
                                     a.get("oeb_strength", 0.0), a.get("oeb_tau_max", 0.15),
                                     a.get("oeb_eps", ops.OEB_EPS), a.get("sink"), a.get("window"), scaling)[0]
            o = torch.einsum("bhij,bhjd->bhid", a2, reference._expand_kv(value, query.shape[1]))
            return o.transpose(1, 2).contiguous(), a2

        module.eager_attention_forward = oeb_eager
        try:
            out.append(materialized_block_maps(model, row_ids, torch.ones_like(row_ids), row_seg))
            model.set_attn_implementation("eager")
            with torch.no_grad():
                logits.append(model(row_ids).logits[0])
        finally:
            module.eager_attention_forward = plain_eager
            model.set_attn_implementation("sdpa")
    return torch.cat(out), logits


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_oeb_layers_pool_the_rebalanced_attention(arch):
    """In OEB layers the saliency is that of A' (materialized: eager attention whose OEB layers
    return the reference A' as their weights), through the handle's pool_oeb_args."""
    model = make_model(arch, seed=9)
    ids, mask, seg = random_batch(seed=17, vocab=model.config.vocab_size)
    oeb_layers, tau_max = (0, 2), 0.6
    handle = _OEBHandle(model, seg, oeb_layers, tau_max)
    try:
        got = sf.step_saliency(model, ids, seg, preset="paper", attention_mask=mask)
    finally:
        handle.restore()
    assert handle.active > 0 and sorted(set(handle.calls)) == list(range(model.config.num_hidden_layers))

    def args_of(row_ids, row_seg):
        bounds = reference.oeb_bounds(row_seg.seg_ids, row_seg.seg_kinds_tensor(), "bridge")
        return {layer: dict(oeb_bounds=bounds, oeb_rule="bridge", oeb_tau_max=tau_max) for layer in oeb_layers}

    expected, _ = materialized_oeb(model, ids, seg, args_of)
    assert_rel_close(got.normalized("block"), expected, rel=1e-4)
    plain = sf.step_saliency(model, ids, seg, preset="paper", attention_mask=mask)
    change = (plain.maps[:, 0] - got.maps[:, 0]).abs().max() / plain.maps[:, 0].abs().max()
    assert float(change) > 1e-3


def test_handle_without_pool_oeb_args_is_refused_on_oeb_layers():
    model = make_model("qwen2", seed=1)
    ids, mask, seg = random_batch(seed=5, vocab=model.config.vocab_size)
    handle = _OEBHandle(model, seg, (1,), 0.5)
    handle.pool_oeb_args = None
    try:
        with pytest.raises(RuntimeError, match="pool_oeb_args"):
            sf.step_saliency(model, ids, seg, preset="paper", attention_mask=mask)
    finally:
        handle.restore()


@pytest.mark.skipif(not hasattr(sf.StepFlowHandle, "pool_oeb_args"),
                    reason="this StepFlowHandle has no pool_oeb_args() yet (the intervention is being rewritten)")
@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_saliency_under_replace_attention_pools_a_prime(arch):
    """With the real handle: the OEB layers' maps are those of the intervened attention A' (the
    oracle takes the handle's own pool_oeb_args per row, and must reproduce its logits)."""
    model = make_model(arch, seed=13)
    ids, mask, seg = random_batch(seed=23, vocab=model.config.vocab_size)
    cfg = sf.StepFlowConfig(oeb_layers=(0, 2), smi_layers=())
    layers = model.config.num_hidden_layers
    with sf.replace_attention(model, cfg) as handle:
        got = sf.step_saliency(model, ids, seg, preset="paper", attention_mask=mask)
        steered = []

        def args_of(row_ids, row_seg):
            seen = {}
            original = handle.pool_oeb_args

            def spy(layer):
                seen[layer] = original(layer)
                return seen[layer]

            handle.pool_oeb_args = spy
            try:
                sf.step_saliency(model, row_ids, row_seg, preset="paper")
            finally:
                del handle.pool_oeb_args
            handle.set_segmentation(row_seg)
            with torch.no_grad():
                steered.append(model(row_ids).logits[0])
            handle.set_segmentation(None)
            assert sorted(seen) == list(range(layers)) and seen[1] == {} and seen[0]
            return seen

        rows = [args_of(r, s) for r, s in rows_of(ids, seg)]
    it = iter(rows)
    expected, logits = materialized_oeb(model, ids, seg, lambda *_: next(it))
    for mine, theirs in zip(logits, steered):   # the oracle is the intervention
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)
    assert_rel_close(got.normalized("block"), expected, rel=1e-4)
