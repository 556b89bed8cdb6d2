"""End-to-end tests of the `stepflow` command line on a random tiny Qwen2 saved with save_pretrained.

Commands run in-process (`cli.main([...])`) for speed; one subprocess checks `python -m
stepflow_ext.cli --help`. Pictures are checked to be real pictures (size, many colours), JSON to
be strict JSON (no NaN), the aggregate of N traces to equal the mean of the single-trace runs,
and malformed input lines to be reported with file:line: field while the others still run.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import stepflow_ext as sf
from stepflow_ext import cli, plot_core, report
from stepflow_ext.traces import read_traces
from hf_models import model as make_model, tokenizer as make_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|><think>\n{% endif %}")
# Sentences of >= 15 characters: the paper's sentence rule (the default) closes a step at each.
THINKING = ["First, 12 + 7 means adding seven to twelve.", "So 12 + 7 = 19, which is the sum.",
            "Check: 19 - 7 = 12, as it should be."]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random 4-layer Qwen2 and the BPE tokenizer (with a chat template) in one directory."""
    path = tmp_path_factory.mktemp("tiny")
    model = make_model("qwen2")
    model.save_pretrained(path)
    tok = make_tokenizer()
    tok.chat_template = TEMPLATE
    try:
        tok.save_pretrained(path)
    finally:
        tok.chat_template = None  # the tokenizer object is shared with other test files
    assert (path / "model.safetensors").exists()
    return str(path)


def _strict_json(path):
    def no_constants(name):
        raise AssertionError(f"{path} holds {name}, which is not JSON")

    with open(path) as f:
        return json.load(f, parse_constant=no_constants)


def _is_picture(path, min_size=(400, 250)):
    img = Image.open(path)
    img.load()
    assert img.format == "PNG"
    assert img.size[0] >= min_size[0] and img.size[1] >= min_size[1], img.size
    pixels = np.asarray(img.convert("RGB"))[::3, ::3].astype(np.int64)
    assert pixels.std() > 10, f"{path} is (nearly) one colour"
    colours = np.unique((pixels[..., 0] << 16) | (pixels[..., 1] << 8) | pixels[..., 2])
    assert len(colours) > 50, f"{path} has too few colours"


def _trace_lines(tok):
    """Three good traces in the three formats."""
    ids_prompt = tok("Question: what is 3 + 4? <think>")["input_ids"]
    ids_rest = tok("Add three and four together.\n\nSo the sum is seven here.\n\nDone.</think> The answer is 7.")["input_ids"]
    return [
        {"id": "q1", "question": "What is 12 + 7?", "thinking": "\n\n".join(THINKING), "summary": "The answer is 19."},
        {"prompt": "Let x = 3. Then 2x + 1 = 7? <think>",
         "completion": "We compute the product.\n\nThen we subtract.\n\nFinally we divide.\n\nDone.</think> So 49."},
        {"input_ids": ids_prompt + ids_rest, "prompt_len": len(ids_prompt)},
    ]


def _write_jsonl(path, lines):
    with open(path, "w") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    return str(path)


def test_help_everywhere(capsys):
    out = subprocess.run([sys.executable, "-m", "stepflow_ext.cli", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for word in ("generate", "analyze", "compare", "examples"):
        assert word in out.stdout
    for command in ("generate", "analyze", "compare", "make-tiny-model"):
        with pytest.raises(SystemExit) as e:
            cli.main([command, "--help"])
        assert e.value.code == 0
        text = capsys.readouterr().out
        assert "example" in text and f"stepflow {command}" in text
    for option in ("--device", "--dtype", "--attn-implementation", "--trust-remote-code"):
        with pytest.raises(SystemExit):
            cli.main(["analyze", "--help"])
        assert option in capsys.readouterr().out
    assert cli.main([]) == 2


def test_trace_formats_and_malformed_lines(tmp_path):
    tok = make_tokenizer()
    good = _trace_lines(tok)
    lines = [good[0], "{not json", good[1], {"question": "q", "thinking": 3, "summary": "s"},
             {"input_ids": [1, 2, 3], "prompt_len": 3}, {"input_ids": [1, 2, 10_000], "prompt_len": 1}, "[1, 2]",
             {"answer": "x"}, "", good[2]]
    path = _write_jsonl(tmp_path / "t.jsonl", lines)
    traces, errors = read_traces(path, tok, vocab_size=len(tok))
    assert [t.line for t in traces] == [1, 3, 10]
    assert [t.format for t in traces] == ["question", "prompt", "input_ids"]
    got = {e.line: (e.field, e.message) for e in errors}
    assert sorted(got) == [2, 4, 5, 6, 7, 8]
    assert got[2][0] == "" and "JSON" in got[2][1]
    assert got[4][0] == "thinking" and got[5][0] == "prompt_len" and got[6][0] == "input_ids"
    assert "10000" in got[6][1] and got[8][0] == "input_ids|prompt|question"
    assert str(errors[0]).startswith(f"{path}:2: ")
    assert str(errors[1]).startswith(f"{path}:4: thinking: ")
    # {question, thinking, summary}: the R1 layout, segmented into Q, 3 sentence steps, a step of what follows
    # the last sentence end ("\n</think>": the marker's token is the thinking's last), A
    q = traces[0]
    text = tok.decode(q.input_ids[q.prompt_len:])
    assert text == "\n\n".join(THINKING) + "\n</think>\n\nThe answer is 19."
    seg = sf.segment(torch.tensor([q.input_ids]), [q.prompt_len], tokenizer=tok)
    assert seg.kinds[0] == ["question", "step", "step", "step", "step", "summary"]
    last = [t for t, s in zip(q.input_ids, seg.seg_ids[0].tolist()) if s == 4]
    assert tok.decode(last).strip() == "</think>"
    assert traces[2].input_ids == good[2]["input_ids"]


def test_generate_streams_and_reads_back(tiny, tmp_path, capsys):
    out = tmp_path / "gen.jsonl"
    status = cli.main(["generate", "--model", tiny, "--prompt", "What is 12 + 7?", "--max-new-tokens", "10",
                       "--out", str(out), "--device", "cpu", "--dtype", "float32"])
    assert status == 0
    captured = capsys.readouterr()
    record = _strict_json(out) if False else json.loads(out.read_text().strip())
    assert record["completion"] and record["completion"][:5] in captured.out       # streamed to the terminal
    assert record["prompt"].startswith("<|user|>What is 12 + 7?") and record["prompt"].endswith("<think>\n")
    assert record["stepflow"] is None and record["generation"]["max_new_tokens"] == 10
    assert sum(record["segments"]["lengths"]) == len(record["input_ids"])
    traces, errors = read_traces(out, make_tokenizer())
    assert not errors and traces[0].input_ids == record["input_ids"] and traces[0].prompt_len == record["prompt_len"]
    seg = sf.segment(torch.tensor([record["input_ids"]]), [record["prompt_len"]], tokenizer=make_tokenizer())
    assert seg.kinds[0] == record["segments"]["kinds"] and seg.lengths()[0] == record["segments"]["lengths"]


def test_generate_file_under_stepflow_then_analyze(tiny, tmp_path, capsys):
    prompts = _write_jsonl(tmp_path / "p.jsonl", [{"id": 1, "question": "What is 12 + 7?"}, '{"question": ',
                                                  {"prompt": "Let x = 3. <think>"}, {"question": ""}])
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"oeb_layers": [0, 1], "oeb_strength": 1.0, "smi_layers": [2, 3], "smi_gamma": 0.5}))
    out = tmp_path / "gen.jsonl"
    status = cli.main(["generate", "--model", tiny, "--prompts", prompts, "--stepflow", str(cfg),
                       "--max-new-tokens", "8", "--batch-size", "2", "--out", str(out)])
    err = capsys.readouterr().err
    assert status == 1
    assert f"{prompts}:2: " in err and f"{prompts}:4: question: " in err
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r.get("id") for r in records] == [1, None]
    assert records[0]["stepflow"]["oeb_strength"] == 1.0
    assert records[1]["prompt"].startswith("Let x = 3. <think>")        # "prompt": used verbatim
    # The same greedy generation under StepFlow one prompt at a time gives the same tokens.
    single = tmp_path / "one.jsonl"
    assert cli.main(["generate", "--model", tiny, "--prompt", "What is 12 + 7?", "--stepflow", str(cfg),
                     "--max-new-tokens", "8", "--out", str(single), "--no-stream"]) == 0
    assert json.loads(single.read_text())["input_ids"] == records[0]["input_ids"]
    # Traces written by generate are analyzed as they are (here: loss on all generated tokens).
    status = cli.main(["analyze", "--model", tiny, "--traces", str(out), "--target", "generated",
                       "--out", str(tmp_path / "an"), "--no-plots"])
    assert status == 0
    diag = _strict_json(tmp_path / "an" / "diagnostics.json")
    assert diag["analyzed"] == 2 and diag["failed"] == []


def test_analyze_end_to_end(tiny, tmp_path, capsys):
    tok = make_tokenizer()
    good = _trace_lines(tok)
    no_summary = {"prompt": "Q? <think>", "completion": "Just thinking.\n\nStill thinking."}
    path = _write_jsonl(tmp_path / "traces.jsonl", [good[0], "oops", good[1], no_summary, good[2]])
    out = tmp_path / "run"
    status = cli.main(["analyze", "--model", tiny, "--traces", path, "--out", str(out), "--plots", "1"])
    captured = capsys.readouterr()
    assert status == 1                                         # two lines failed, the others ran
    assert f"{path}:2: not valid JSON" in captured.err
    assert f"{path}:4: completion: no summary" in captured.err
    assert "Shallow Lock-in" in captured.out and "mean of 3" in captured.out   # the terminal table

    diag = _strict_json(out / "diagnostics.json")
    assert diag["analyzed"] == 3 and len(diag["failed"]) == 2
    names = [t["name"] for t in diag["per_trace"]]
    assert names == ["line0001-q1", "line0003", "line0005"]
    for t in diag["per_trace"]:
        assert len(t["lock_in_index"]) == 4 and t["shallow_lock_in"] in (True, False, None)
        res = sf.StepSaliencyResult.load(out / t["file"])
        assert res.maps.shape[:2] == (1, 4) and float(res.maps.sum()) > 0
        assert res.meta["source"] == t["source"] and res.meta["model"] == tiny
        assert res.diagnose()[0]["lock_in_index"] == pytest.approx(t["lock_in_index"], nan_ok=True)
    meta = _strict_json(out / "traces" / "line0001-q1.safetensors.json")
    assert meta["kinds"] == [["question", "step", "step", "step", "step", "summary"]]
    agg = _strict_json(out / "aggregate.safetensors.json")
    assert agg["n"] == 3 and agg["labels"][0] == "Q" and agg["labels"][-1] == "A" and len(agg["labels"]) == 12

    for png in ("aggregate_heatmaps.png", "aggregate_curves.png", "traces/line0001-q1_heatmaps.png",
                "traces/line0001-q1_curves.png"):
        _is_picture(out / png)
    assert not (out / "traces" / "line0003_heatmaps.png").exists()      # --plots 1
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 6 and "src='http" not in html and "Deep Decay" in html
    assert "line0001-q1" in (out / "report.md").read_text()


def test_aggregate_is_the_mean_of_single_traces(tiny, tmp_path):
    tok = make_tokenizer()
    good = _trace_lines(tok)
    all_path = _write_jsonl(tmp_path / "all.jsonl", good)
    assert cli.main(["analyze", "--model", tiny, "--traces", all_path, "--out", str(tmp_path / "all"),
                     "--no-plots", "--bins", "4"]) == 0
    together = load_file(tmp_path / "all" / "aggregate.safetensors")["shares"].double().numpy()
    together_curves = _strict_json(tmp_path / "all" / "aggregate.safetensors.json")["curves"]
    singles, curves = [], []
    for i, line in enumerate(good):
        p = _write_jsonl(tmp_path / f"one{i}.jsonl", [line])
        assert cli.main(["analyze", "--model", tiny, "--traces", p, "--out", str(tmp_path / f"one{i}"),
                         "--no-plots", "--bins", "4"]) == 0
        singles.append(load_file(tmp_path / f"one{i}" / "aggregate.safetensors")["shares"].double().numpy())
        curves.append(_strict_json(tmp_path / f"one{i}" / "diagnostics.json")["per_trace"][0])
    stack = np.stack(singles)
    assert np.isnan(stack).any() and not np.isnan(stack).all()        # the NaN-aware mean matters
    with warnings.catch_warnings():   # cells that no trace defines stay NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        expected = np.nanmean(stack, 0)
    np.testing.assert_allclose(together, expected, rtol=1e-5, atol=1e-6)
    for name in ("lock_in_index", "summary_thinking_share", "summary_recent_share"):
        values = np.array([[np.nan if x is None else x for x in c[name]] for c in curves])
        mean = np.array([np.nan if x is None else x for x in together_curves[name]["mean"]])
        np.testing.assert_allclose(mean, np.nanmean(values, 0), rtol=1e-6)
    rows = np.nansum(together, -1)
    assert np.allclose(rows[~np.isnan(together).all(-1)], 1.0)          # resampled rows stay distributions


def test_resample_onto_relative_grid():
    rng = np.random.default_rng(0)
    for steps in (10, 5, 3, 23):
        kinds = ["question"] + ["step"] * steps + ["summary"]
        s = len(kinds)
        maps = np.tril(rng.random((2, s, s)))
        shares = report.row_shares(maps)
        grid = report.resample(shares, kinds, bins=10)
        assert grid.shape == (2, 12, 12)
        np.testing.assert_allclose(grid.sum(-1), 1.0)
        np.testing.assert_allclose(grid[:, 0, 0], 1.0)                  # the question draws on itself
        np.testing.assert_allclose(grid[:, -1, 0], shares[:, -1, 0])    # summary -> question untouched
        np.testing.assert_allclose(grid[:, -1, 1:-1].sum(-1), shares[:, -1, 1:-1].sum(-1))  # thinking share kept
        if steps == 10:
            np.testing.assert_allclose(grid, shares)                    # one step per bin: nothing moves
        if steps == 5:   # each step covers two bins: rows repeat, other steps' columns split in halves
            np.testing.assert_allclose(grid[:, 3, 1:3], np.repeat(shares[:, 2, 1:2], 2, 1) / 2)
            np.testing.assert_allclose(grid[:, 3, 3], shares[:, 2, 2])       # the self share stays on the diagonal
        assert np.all(np.triu(grid[:, 1:-1, 1:-1], 1) == 0)                # nothing lands in the future
    mean, low, high, n = report.mean_band([[0.2, np.nan], [0.4, 0.5], [0.6, np.nan]])
    np.testing.assert_allclose(mean, [0.4, 0.5])
    np.testing.assert_allclose(high[0] - mean[0], 4.303 * 0.2 / np.sqrt(3), rtol=1e-3)
    assert n.tolist() == [3, 1] and low[1] == high[1] == 0.5


def test_compare_end_to_end(tiny, tmp_path, capsys):
    tok = make_tokenizer()
    path = _write_jsonl(tmp_path / "traces.jsonl", _trace_lines(tok)[:2])
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"oeb_layers": [0, 1], "oeb_strength": 1.0, "smi_layers": [2, 3], "smi_gamma": 0.5}))
    out = tmp_path / "cmp"
    status = cli.main(["compare", "--model", tiny, "--traces", path, "--stepflow", str(cfg), "--out", str(out),
                       "--plots", "1"])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert "OEB: lock-in index over the OEB layers 0-1: " in captured.out
    assert "SMI: summary thinking share over the SMI layers 2-3: " in captured.out
    comp = _strict_json(out / "comparison.json")
    assert comp["compared"] == 2 and comp["shallow_layers"] == [0, 1] and comp["deep_layers"] == [2, 3]
    for key in ("oeb_lock_in", "smi_thinking_share"):
        effect = comp[key]
        assert effect["n"] == 2 and re.match(r"(not )?(lowered|raised)", effect["verdict"])
        assert effect["change"] == pytest.approx(effect["after"] - effect["before"])
    row = comp["per_trace"][0]
    assert row["lock_in_shallow_before"] == pytest.approx(np.nanmean(row["before"]["lock_in_index"][:2]))
    before = sf.StepSaliencyResult.load(out / "before" / "line0001-q1.safetensors")
    after = sf.StepSaliencyResult.load(out / "after" / "line0001-q1.safetensors")
    assert before.meta["stepflow"] is None and after.meta["stepflow"]["smi_gamma"] == 0.5
    assert not torch.allclose(before.maps, after.maps)
    # "before" is exactly what analyze measures without StepFlow.
    assert cli.main(["analyze", "--model", tiny, "--traces", path, "--out", str(tmp_path / "an"), "--no-plots"]) == 0
    plain = sf.StepSaliencyResult.load(tmp_path / "an" / "traces" / "line0001-q1.safetensors")
    torch.testing.assert_close(plain.maps, before.maps)
    for png in ("side_by_side.png", "curves.png", "heatmaps_before.png", "heatmaps_after.png", "heatmaps_diff.png",
                "line0001-q1_side_by_side.png", "line0001-q1_curves.png"):
        _is_picture(out / png)
    assert (out / "report.html").read_text().count("data:image/png;base64,") == 9


def test_usage_errors(tiny, tmp_path, capsys):
    path = _write_jsonl(tmp_path / "t.jsonl", _trace_lines(make_tokenizer())[:1])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"oeb_layers": [9]}))
    assert cli.main(["compare", "--model", tiny, "--traces", path, "--stepflow", str(bad), "--out",
                     str(tmp_path / "x")]) == 2
    assert "oeb_layers [9] out of range" in capsys.readouterr().err
    bad.write_text("{\"oeb_strength\": 2}")
    assert cli.main(["analyze", "--model", tiny, "--traces", path, "--stepflow", str(bad), "--out",
                     str(tmp_path / "x")]) == 2
    assert "oeb_strength" in capsys.readouterr().err
    assert cli.main(["analyze", "--model", tiny, "--traces", str(tmp_path / "missing.jsonl"), "--out",
                     str(tmp_path / "x")]) == 2
    assert "cannot read traces" in capsys.readouterr().err
    assert cli.main(["analyze", "--model", str(tmp_path / "nomodel"), "--traces", path, "--out",
                     str(tmp_path / "x")]) == 2
    assert "cannot load model" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["analyze", "--traces", path, "--out", "x"])   # --model is required
    assert e.value.code == 2


def test_pictures_for_28_layers_and_52_steps(tmp_path):
    """The layout for a real model size: 28 panels of 54 x 54 segments, thinned labels."""
    from stepflow_ext import plot

    rng = np.random.default_rng(0)
    kinds = ["question"] + ["step"] * 52 + ["summary"]
    s = len(kinds)
    maps = torch.tensor(np.tril(rng.lognormal(0, 1, (1, 28, s, s))), dtype=torch.float32)
    res = sf.StepSaliencyResult(maps, torch.ones(1, s, s), [kinds], {"target": "summary"})
    labels = plot.segment_labels(kinds)
    ticks = plot.pick_ticks(labels)
    assert [labels[i] for i in ticks] == ["Q", "S10", "S20", "S30", "S40", "A"]
    assert plot.pick_ticks(report.grid_labels(10)) == list(range(12))
    short = plot.segment_labels(kinds[:14] + ["summary"])
    assert [short[i] for i in plot.pick_ticks(short)] == ["Q", "S2", "S4", "S6", "S8", "S10", "S12", "A"]
    assert plot_core._grid_shape(28) == (4, 7)
    path = plot.plot_heatmaps(tmp_path / "h.png", plot.result_shares(res), labels, title="28 layers")
    _is_picture(path, min_size=(1500, 900))
    res.plot(tmp_path / "r.png")
    _is_picture(tmp_path / "r.png", min_size=(1500, 1200))


def test_readme_commands_run_as_written(tmp_path, monkeypatch, capsys):
    """The shell block of the README's "Command line" section, `stepflow` run in-process."""
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text.split("## Command line", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    commands = [c.strip() for c in block.replace("\\\n", " ").splitlines() if c.strip() and not c.startswith("#")]
    assert any(c.startswith("stepflow compare") for c in commands)
    monkeypatch.chdir(tmp_path)
    for command in commands:
        command = command.split(" #")[0]
        if command.startswith("stepflow "):
            assert cli.main(shlex.split(command)[1:]) == 0, command
        else:
            subprocess.run(command, shell=True, check=True, cwd=tmp_path)
    assert (tmp_path / "runs" / "compare" / "report.html").exists()
