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
    assert "6/6 report" in text and "pass@1 by chain length" in text


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
