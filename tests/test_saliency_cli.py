"""`stepflow analyze/compare` with the paper's Step-Saliency: --preset paper and its single options,
the paper's FB, AB, FB/AB in the tables, JSON, report and pictures (a random tiny Qwen2)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import stepflow_ext as sf
from stepflow_ext import cli
from hf_models import model as make_model, tokenizer as make_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|><think>\n{% endif %}")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_paper")
    make_model("qwen2", seed=7).save_pretrained(path)
    tok = make_tokenizer()
    tok.chat_template = TEMPLATE
    try:
        tok.save_pretrained(path)
    finally:
        tok.chat_template = None
    return str(path)


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    path = tmp_path_factory.mktemp("traces") / "t.jsonl"
    lines = [{"id": "a", "question": "What is 12 + 7?", "thinking": "First, 12 + 7 means adding seven.\n\nSo 19.",
              "summary": "The answer is 19."},
             {"prompt": "Let x = 3. Then 2x + 1 = 7? <think>",
              "completion": "We compute.\n\nThen we subtract.\n\nDone.</think> So 49."}]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return str(path)


def _strict_json(path):
    def no_constants(name):
        raise AssertionError(f"{path} holds {name}")

    with open(path) as f:
        return json.load(f, parse_constant=no_constants)


def _is_picture(path):
    img = Image.open(path)
    img.load()
    assert img.format == "PNG" and img.size[0] >= 800 and img.size[1] >= 300, img.size
    pixels = np.asarray(img.convert("RGB"))[::3, ::3].astype(np.int64)
    colours = np.unique((pixels[..., 0] << 16) | (pixels[..., 1] << 8) | pixels[..., 2])
    assert pixels.std() > 10 and len(colours) > 50


def test_analyze_preset_paper(tiny, traces, tmp_path, capsys):
    out = tmp_path / "paper"
    assert cli.main(["analyze", "--model", tiny, "--traces", traces, "--out", str(out), "--preset", "paper"]) == 0
    printed = capsys.readouterr().out
    assert "FB/AB" in printed and "preset paper" in printed
    diag = _strict_json(out / "diagnostics.json")
    assert diag["saliency"] == {"preset": "paper", "target": "all", "loss_reduction": "mean",
                                "head_reduction": "abs_mean"}
    for t in diag["per_trace"]:
        res = sf.StepSaliencyResult.load(out / t["file"])
        assert res.meta["preset"] == "paper" and res.meta["loss_reduction"] == "mean"
        again = res.diagnose()[0]
        for name in ("final_block_intensity", "analysis_block_intensity", "final_heat_anomaly"):
            assert t[name] == pytest.approx(again[name], rel=1e-6) and len(t[name]) == 4
        assert "block_map_layer_mean" not in t and np.asarray(again["block_map_layer_mean"]).shape == (
            len(res.kinds[0]),) * 2
        assert t["final_heat_anomaly_mean"] > 0
    agg = _strict_json(out / "aggregate.safetensors.json")
    fb = np.array([t["final_block_intensity"] for t in diag["per_trace"]])
    np.testing.assert_allclose(agg["paper_curves"]["final_block_intensity"]["mean"], fb.mean(0), rtol=1e-6)
    for png in ("aggregate_paper.png", "traces/line0001-a_paper.png", "traces/line0002_paper.png"):
        _is_picture(out / png)
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 9 and "final-block" in html
    # the preset spelled out gives the same maps; a contradicting option is a usage error
    spelled = tmp_path / "spelled"
    assert cli.main(["analyze", "--model", tiny, "--traces", traces, "--out", str(spelled), "--target", "all",
                     "--loss-reduction", "mean", "--head-reduction", "abs_mean", "--no-plots"]) == 0
    a = sf.StepSaliencyResult.load(out / "traces" / "line0002.safetensors")
    b = sf.StepSaliencyResult.load(spelled / "traces" / "line0002.safetensors")
    torch.testing.assert_close(a.maps, b.maps)
    assert cli.main(["analyze", "--model", tiny, "--traces", traces, "--out", str(tmp_path / "x"), "--preset",
                     "paper", "--loss-reduction", "sum"]) == 2
    assert "--loss-reduction sum contradicts --preset paper" in capsys.readouterr().err


def test_loss_mean_changes_blocks_not_shares(tiny, traces, tmp_path):
    runs = {}
    for reduction in ("sum", "mean"):
        out = tmp_path / reduction
        assert cli.main(["analyze", "--model", tiny, "--traces", traces, "--out", str(out), "--target", "all",
                         "--loss-reduction", reduction, "--no-plots"]) == 0
        runs[reduction] = _strict_json(out / "diagnostics.json")["per_trace"]
    for s, m in zip(runs["sum"], runs["mean"]):
        res = sf.StepSaliencyResult.load(tmp_path / "mean" / m["file"])
        n = res.meta["num_targets"]
        assert m["lock_in_index"] == pytest.approx(s["lock_in_index"], rel=1e-4, nan_ok=True)
        assert np.array(s["final_block_intensity"]) == pytest.approx(n * np.array(m["final_block_intensity"]),
                                                                     rel=1e-4)


def test_compare_reports_fb_ab_before_and_after(tiny, traces, tmp_path, capsys):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"smi_layers": [2, 3]}))
    out = tmp_path / "cmp"
    assert cli.main(["compare", "--model", tiny, "--traces", traces, "--stepflow", str(cfg), "--out", str(out),
                     "--preset", "paper", "--plots", "1"]) == 0
    assert "paper: FB/AB" in capsys.readouterr().out
    comp = _strict_json(out / "comparison.json")
    effect = comp["paper_fb_ab"]
    rows = comp["per_trace"]
    assert effect["n"] == 2 and effect["before"] == pytest.approx(np.mean([r["fb_ab_before"] for r in rows]))
    for r in rows:
        assert r["fb_ab_after"] == pytest.approx(np.mean(r["after"]["final_heat_anomaly"]))
    assert comp["saliency"]["preset"] == "paper"
    for png in ("paper.png", "line0001-a_paper.png"):
        _is_picture(out / png)
