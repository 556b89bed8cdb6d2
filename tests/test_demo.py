"""`stepflow demo` end to end on a random tiny model and the eval fixtures (the embedded model's own run
is in test_tiny.py)."""
from __future__ import annotations

import json
import os

import pytest

from stepflow_ext import cli, demo

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "eval")


def test_stratified_takes_k_per_chain_length():
    records = [{"id": i, "steps": 2 + i % 3} for i in range(12)]
    picked = demo.stratified(records, per_group=2, limit=100)
    assert [r["id"] for r in picked] == [0, 1, 2, 3, 4, 5]
    assert demo.stratified([{"id": i} for i in range(9)], per_group=2, limit=4) == [{"id": i} for i in range(4)]


def test_demo_on_a_random_model(tmp_path, capsys):
    model_dir = tmp_path / "tiny"
    cli.make_tiny_model(str(model_dir))
    out = tmp_path / "demo"
    status = cli.main(["demo", "--model", str(model_dir), "--data", os.path.join(FIXTURES, "math500.jsonl"),
                       "--dev", os.path.join(FIXTURES, "gsm8k.jsonl"), "--max-new-tokens", "8",
                       "--grid", "oeb_strength=0.5,1.0", "--n-boot", "200", "--device", "cpu", "--out", str(out)])
    assert status == 0
    paired = json.loads((out / "paired.json").read_text())
    names = [r["name"] for r in paired["runs"]]
    assert names == ["baseline", "default", "chosen", "random-attn", "random-residual"]
    n_test = sum(1 for line in open(os.path.join(FIXTURES, "math500.jsonl")) if line.strip())
    assert paired["items_in_common"] == n_test
    assert all(r["accuracy"]["n_items"] == n_test for r in paired["runs"])
    chosen = json.loads((out / "chosen_config.json").read_text())
    assert chosen["oeb_strength"] in (0.5, 1.0)
    html = (out / "report.html").read_text()
    assert "Paired" in html or "paired" in html
    assert "says nothing, by itself, about large reasoning models" in html
    text = capsys.readouterr().out
    assert "6/6 report" in text and "by chain length" in text


def test_groups_of_an_item():
    assert demo._groups_of({"steps": 8, "split_kind": "longer"}) == ["all longer", "8 steps (longer)"]
    assert demo._groups_of({"steps": 3}) == ["3 steps"]
    assert demo._groups_of({}) == ["all"]


def test_demo_on_the_embedded_model(tmp_path, capsys):
    """The default pipeline, shrunk (one item per chain length): the embedded model reaches summaries, so
    the Step-Saliency stage runs and the report embeds its pictures."""
    out = tmp_path / "demo"
    status = cli.main(["demo", "--per-length", "1", "--grid", "oeb_strength=1.0", "--traces", "3",
                       "--n-boot", "200", "--device", "cpu", "--out", str(out)])
    assert status == 0
    paired = json.loads((out / "paired.json").read_text())
    assert paired["items_in_common"] == 10  # 2-6 and 8-12 steps, one each
    baseline = paired["runs"][0]["accuracy"]["pass@1"]
    assert baseline >= 0.3, "the shipped model should solve its short chains"
    for png in ("analyze/aggregate_heatmaps.png", "analyze/aggregate_curves.png", "compare/side_by_side.png"):
        assert (out / png).stat().st_size > 10_000, png
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 4
    md = (out / "report.md").read_text()
    assert "| all longer | 5 |" in md and "| all in-distribution | 5 |" in md


def test_demo_refuses_test_data_without_dev(tmp_path, capsys):
    model_dir = tmp_path / "tiny"
    cli.make_tiny_model(str(model_dir))
    status = cli.main(["demo", "--model", str(model_dir), "--data", os.path.join(FIXTURES, "math500.jsonl"),
                       "--out", str(tmp_path / "d")])
    assert status == 2
    assert "--dev" in capsys.readouterr().err
    assert cli.main(["demo", "--model", str(model_dir), "--out", str(tmp_path / "d")]) == 2
    with pytest.raises(SystemExit):
        cli.main(["demo", "--task", "poetry"])
