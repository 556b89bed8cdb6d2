"""`stepflow eval`, `compare-runs` and `sweep` end to end on a random tiny model and the fixture data sets.

The model is random, so its answers are wrong: grading end to end is checked with --completions-from
(known completions, some right). Commands run in-process (cli.main) with few new tokens.
"""
from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

import stepflow_ext as sf
from stepflow_ext import cli
from stepflow_ext.eval import prompts, runner, sweep
from stepflow_ext.eval.data import EvalItem, load_items

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "eval")
GSM8K = os.path.join(FIXTURES, "gsm8k.jsonl")
GPQA = os.path.join(FIXTURES, "gpqa.jsonl")
CODE = os.path.join(FIXTURES, "code.jsonl")
BAD = os.path.join(FIXTURES, "bad.jsonl")
CONTRACT_FIELDS = {"item_id", "sample", "task", "prompt", "completion", "extracted", "correct", "detail", "tokens",
                   "time_s", "seed", "temperature", "top_p", "max_new_tokens", "stepflow", "control", "model"}
UNTIMED = ("time_s", "grade_s")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_eval")
    cli.make_tiny_model(str(path))
    return str(path)


def run(*argv) -> int:
    return cli.main([str(a) for a in argv])


def eval_args(tiny, data, task, out, *extra):
    return ["eval", "--model", tiny, "--device", "cpu", "--data", data, "--task", task, "--max-new-tokens", 8,
            "--no-progress", "--out", out, *extra]


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def untimed(rows):
    return [{k: v for k, v in r.items() if k not in UNTIMED} for r in rows]


def summary_of(out):
    with open(os.path.join(out, "summary.json")) as f:
        return json.load(f)


# --------------------------------------------------------------------------- eval runs


def test_eval_none_stepflow_controls_then_compare_runs(tiny, tmp_path, monkeypatch, capsys):
    installed = []
    real = sf.replace_attention

    def spy(model, config=None, **kwargs):
        installed.append((config, kwargs.get("control"), kwargs.get("control_seed")))
        return real(model, config, **kwargs)

    monkeypatch.setattr(sf, "replace_attention", spy)
    config = tmp_path / "sf.json"
    config.write_text(json.dumps({"oeb_layers": [0, 1], "oeb_tau_max": 0.3, "smi_layers": [3], "smi_alpha": 0.1}))
    runs = {"base": [], "default": ["--stepflow", "default"], "file": ["--stepflow", config],
            "rattn": ["--stepflow", config, "--control", "random-attn", "--control-seed", 3],
            "rres": ["--stepflow", config, "--control", "random-residual"]}
    for name, extra in runs.items():
        installed.clear()
        # 5 items in batches of 2: the last batch is smaller (StepFlow is reinstalled per batch).
        assert run(*eval_args(tiny, GSM8K, "math", tmp_path / name, "--batch-size", 2, *extra)) == 0
        rows = read_jsonl(tmp_path / name / "rows.jsonl")
        assert [(r["item_id"], r["sample"]) for r in rows] == [(i.id, 0) for i in load_items(GSM8K, "math")[0]]
        assert all(CONTRACT_FIELDS <= set(r) for r in rows)
        assert all(r["task"] == "math" and r["model"] == tiny and 1 <= r["tokens"] <= 8 for r in rows)
        assert all("Please reason step by step, and put your final answer within \\boxed{}." in r["prompt"]
                   for r in rows)
        summary = summary_of(tmp_path / name)
        assert summary["counts"]["items_complete"] == 5 and summary["counts"]["rows"] == 5
        assert set(summary["per_item"]) == {r["item_id"] for r in rows}
        assert summary["accuracy"]["n_items"] == 5
        if name == "base":
            assert installed == [] and all(r["stepflow"] is None and r["control"] is None for r in rows)
            continue
        assert len(installed) == 3, "StepFlow installed once per batch (batches of 2, 2, 1)"
        cfg, control, seed = installed[0]
        assert all(r["stepflow"] == cfg.to_dict() for r in rows)
        if name == "default":
            assert cfg == sf.StepFlowConfig.default_for(4)
        else:
            assert cfg.oeb_layers == (0, 1) and cfg.oeb_tau_max == 0.3 and cfg.smi_alpha == 0.1
            assert (cfg.oeb_rule, cfg.smi_rule) == ("bridge", "value")
        assert control == {"rattn": "random-attn", "rres": "random-residual"}.get(name)
        assert all(r["control"] == control for r in rows)
        if control:
            # each batch draws from its own seed, hashed from --control-seed and its (item, sample) pairs
            seeds = [s for _, _, s in installed]
            assert len(set(seeds)) == 3 and [r["control_batch_seed"] for r in rows] == [seeds[0]] * 2 + [
                seeds[1]] * 2 + [seeds[2]]
            assert all(r["control_seed"] == summary["settings"]["control_seed"] for r in rows)
        if name == "rattn":
            assert summary["settings"]["control_seed"] == 3

    capsys.readouterr()
    dirs = [tmp_path / n for n in runs]
    assert run("compare-runs", *dirs, "--out", tmp_path / "paired.md", "--n-boot", 200) == 0
    out = capsys.readouterr().out
    assert "Paired comparison on 5 common items" in out
    for name in runs:
        assert name in out
    assert "control random-attn (seed 3) sized as StepFlow OEB bridge τ≤0.3 @0-1; SMI value α=0.1 w=4 @3" in out
    md = (tmp_path / "paired.md").read_text()
    assert md.count("\n| ") == 1 + len(runs)
    assert run("compare-runs", *dirs, "--out", tmp_path / "paired.json", "--n-boot", 200) == 0
    report = json.loads((tmp_path / "paired.json").read_text())
    assert report["items_in_common"] == 5 and [r["name"] for r in report["runs"]] == list(runs)
    assert "vs_baseline" not in report["runs"][0]
    assert all({"paired_bootstrap", "mcnemar"} <= set(r["vs_baseline"]) for r in report["runs"][1:])


def test_control_needs_stepflow_and_bad_options(tiny, tmp_path, capsys):
    assert run(*eval_args(tiny, GSM8K, "math", tmp_path / "x", "--control", "random-attn")) == 2
    assert "needs a StepFlow config" in capsys.readouterr().err
    assert run(*eval_args(tiny, GSM8K, "math", tmp_path / "x", "--stepflow", "none", "--control",
                          "random-residual")) == 2
    assert run(*eval_args(tiny, GSM8K, "math", tmp_path / "x", "--top-p", 0)) == 2
    assert "--top-p" in capsys.readouterr().err
    assert run(*eval_args(tiny, GSM8K, "math", tmp_path / "x", "--batch-size", 0)) == 2
    missing = tmp_path / "nope.json"
    assert run(*eval_args(tiny, GSM8K, "math", tmp_path / "x", "--stepflow", missing)) == 2
    assert "nope.json" in capsys.readouterr().err
    assert not (tmp_path / "x" / "rows.jsonl").exists()


def test_unknown_task_is_refused(tiny, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        run(*eval_args(tiny, GSM8K, "poetry", tmp_path / "x"))
    assert exc.value.code == 2
    assert "invalid choice: 'poetry'" in capsys.readouterr().err


def test_bad_data_lines_reported_and_the_rest_run(tiny, tmp_path, capsys):
    out = tmp_path / "bad"
    assert run(*eval_args(tiny, BAD, "math", out)) == 1
    err = capsys.readouterr().err
    _, errors = load_items(BAD, "math")
    assert errors, "the fixture has bad lines"
    for e in errors:
        assert str(e) in err
    rows = read_jsonl(out / "rows.jsonl")
    good, _ = load_items(BAD, "math")
    assert sorted(r["item_id"] for r in rows) == sorted(i.id for i in good) and len(rows) >= 2
    logged = read_jsonl(out / "errors.jsonl")
    assert sorted(e["line"] for e in logged if e["kind"] == "data") == sorted(e.line for e in errors)
    summary = summary_of(out)
    assert summary["counts"]["data_errors"] == len(errors) and summary["counts"]["items_complete"] == len(good)


# --------------------------------------------------------------------------- grading end to end


def _completions(path, answers):
    with open(path, "w") as f:
        for (item_id, sample), text in answers.items():
            f.write(json.dumps({"item_id": item_id, "sample": sample, "completion": text}) + "\n")


def test_completions_from_grades_math_and_mcq_and_pairs_them(tiny, tmp_path, capsys):
    items, _ = load_items(GSM8K, "math")
    assert len(items) >= 4
    right = {i.id: f"Adding up.\n\n</think>\n\nSo the answer is \\boxed{{{i.answer}}}." for i in items}
    wrong = {i.id: "I think it is \\boxed{-12345}." for i in items}
    ids = [i.id for i in items]
    # run a: items 0, 1 right; run b: items 1, 2, 3 right  -> b01 = 2 (items 2, 3), b10 = 1 (item 0)
    a_right, b_right = {ids[0], ids[1]}, {ids[1], ids[2], ids[3]}
    _completions(tmp_path / "a.jsonl", {(i, 0): right[i] if i in a_right else wrong[i] for i in ids})
    _completions(tmp_path / "b.jsonl", {(i, 0): right[i] if i in b_right else wrong[i] for i in ids})
    for name in "ab":
        assert run(*eval_args(tiny, GSM8K, "math", tmp_path / name, "--completions-from",
                              tmp_path / f"{name}.jsonl")) == 0
    rows = {r["item_id"]: r for r in read_jsonl(tmp_path / "b" / "rows.jsonl")}
    assert {i for i, r in rows.items() if r["correct"]} == b_right
    assert rows[ids[2]]["extracted"] is not None and rows[ids[0]]["correct"] is False
    assert summary_of(tmp_path / "b")["accuracy"]["pass@1"] == pytest.approx(len(b_right) / len(ids))
    capsys.readouterr()
    assert run("compare-runs", tmp_path / "a", tmp_path / "b", "--out", tmp_path / "ab.json", "--n-boot", 500) == 0
    report = json.loads((tmp_path / "ab.json").read_text())
    vs = report["runs"][1]["vs_baseline"]
    assert vs["mcnemar"]["b01"] == 2 and vs["mcnemar"]["b10"] == 1
    assert vs["paired_bootstrap"]["diff"] == pytest.approx((len(b_right) - len(a_right)) / len(ids))
    assert report["runs"][0]["accuracy"]["pass@1"] == pytest.approx(len(a_right) / len(ids))

    # mcq: the correct letter in \boxed{} for the first two items, a wrong one for the others
    mcq, _ = load_items(GPQA, "mcq")
    answers = {}
    for n, item in enumerate(mcq):
        letter = item.answer if n < 2 else next(c for c in "ABCD" if c != item.answer)
        answers[(item.id, 0)] = f"The answer is \\boxed{{{letter}}}."
    _completions(tmp_path / "mcq.jsonl", answers)
    assert run(*eval_args(tiny, GPQA, "mcq", tmp_path / "mcq", "--completions-from", tmp_path / "mcq.jsonl")) == 0
    rows = read_jsonl(tmp_path / "mcq" / "rows.jsonl")
    assert [r["correct"] for r in rows] == [n < 2 for n in range(len(mcq))]
    assert all("A) " in r["prompt"] and "\\boxed{A}" in r["prompt"] for r in rows)


def test_completions_from_code_runs_the_sandbox(tiny, tmp_path):
    items, _ = load_items(CODE, "code")
    first = items[0]
    assert first.tests and all("input" in t for t in first.tests), "c1 is a stdin/stdout problem"
    program = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
    _completions(tmp_path / "code.jsonl", {(first.id, 0): program, **{(i.id, 0): "```python\nprint(0)\n```"
                                                                       for i in items[1:]}})
    out = tmp_path / "code"
    assert run(*eval_args(tiny, CODE, "code", out, "--completions-from", tmp_path / "code.jsonl",
                          "--code-time-limit", 5, "--grade-workers", 2)) == 0
    rows = {r["item_id"]: r for r in read_jsonl(out / "rows.jsonl")}
    assert rows[first.id]["correct"] is True
    assert not any(r["correct"] for i, r in rows.items() if i != first.id)


def test_completions_from_missing_item_is_a_reported_failure(tiny, tmp_path, capsys):
    items, _ = load_items(GSM8K, "math")
    _completions(tmp_path / "some.jsonl", {(items[0].id, 0): "\\boxed{1}"})
    assert run(*eval_args(tiny, GSM8K, "math", tmp_path / "o", "--completions-from", tmp_path / "some.jsonl",
                          "--batch-size", 1)) == 1
    err = capsys.readouterr().err
    assert f"item {items[1].id} sample 0: generation failed" in err
    assert len(read_jsonl(tmp_path / "o" / "rows.jsonl")) == 1
    assert summary_of(tmp_path / "o")["counts"]["failed_samples"] == len(items) - 1


# --------------------------------------------------------------------------- resume


def test_resume_after_a_killed_run_never_duplicates(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    args = eval_args(tiny, GSM8K, "math", out, "--samples", 2, "--temperature", 0.9, "--top-p", 0.95,
                     "--batch-size", 3, "--seed", 7)
    assert run(*args) == 0
    full = read_jsonl(out / "rows.jsonl")
    assert len(full) == 10 and len({(r["item_id"], r["sample"]) for r in full}) == 10
    assert len({r["seed"] for r in full}) == 10
    # A killed run: three whole rows, the fourth cut mid-line, the rest never written.
    lines = (out / "rows.jsonl").read_text().splitlines(keepends=True)
    (out / "rows.jsonl").write_text("".join(lines[:3]) + lines[3][: len(lines[3]) // 2])
    (out / "summary.json").unlink()
    capsys.readouterr()
    assert run(*args) == 0
    err = capsys.readouterr().err
    assert "truncated last line dropped" in err and "3 samples already" in err
    again = read_jsonl(out / "rows.jsonl")
    assert [(r["item_id"], r["sample"]) for r in again] == [(r["item_id"], r["sample"]) for r in full]
    # per-(item, sample) seeds: the redone samples are the same although they were batched differently
    assert untimed(again) == untimed(full)
    assert summary_of(out)["counts"]["rows"] == 10
    # a third run has nothing to do and changes nothing
    assert run(*args) == 0
    assert untimed(read_jsonl(out / "rows.jsonl")) == untimed(full)
    # a duplicated row (e.g. two runs appending at once) is dropped, the first kept
    with open(out / "rows.jsonl", "a") as f:
        f.write(json.dumps(full[0] | {"completion": "dup"}) + "\n")
    assert run(*args) == 0
    assert untimed(read_jsonl(out / "rows.jsonl")) == untimed(full)


def test_resume_refuses_other_settings(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(*eval_args(tiny, GSM8K, "math", out, "--limit", 2)) == 0
    before = (out / "rows.jsonl").read_text()
    capsys.readouterr()
    assert run(*eval_args(tiny, GSM8K, "math", out, "--limit", 2, "--temperature", 0.5)) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "temperature: 0.0 there, 0.5 now" in err
    assert run(*eval_args(tiny, GSM8K, "math", out, "--stepflow", "default")) == 2
    assert "stepflow: None there" in capsys.readouterr().err
    assert run(*eval_args(tiny, GPQA, "mcq", out)) == 2
    assert (out / "rows.jsonl").read_text() == before
    # a larger --limit (or another batch size) extends the same run
    assert run(*eval_args(tiny, GSM8K, "math", out, "--limit", 3, "--batch-size", 2)) == 0
    rows = read_jsonl(out / "rows.jsonl")
    assert len(rows) == 3 and rows[:2] == read_jsonl_text(before)
    # rows without settings.json are not a run to resume
    (out / "settings.json").unlink()
    assert run(*eval_args(tiny, GSM8K, "math", out)) == 2
    assert "no settings.json" in capsys.readouterr().err


def read_jsonl_text(text):
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_device_map_without_accelerate_is_a_clear_error(tiny, tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else real(name, *a))
    assert run(*eval_args(tiny, GSM8K, "math", tmp_path / "x", "--device-map", "auto")) == 2
    assert "--device-map needs the `accelerate` package" in capsys.readouterr().err


# --------------------------------------------------------------------------- sampling and prompts


def test_per_row_sampler_streams_are_per_row():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    first = runner.per_row_sampler([11, 22, 33], 1.0, 1.0)
    # the same (seed, logits) in another batch position, next to other rows, draws the same tokens
    swapped = runner.per_row_sampler([33, 11], 1.0, 1.0)
    for _ in range(20):
        a = first(None, logits).argmax(-1)
        b = swapped(None, logits[[2, 0]]).argmax(-1)
        assert a[2] == b[0] and a[0] == b[1]
    # the output is one 0 per row and -inf elsewhere, which greedy decoding picks
    out = runner.per_row_sampler([1], 1.0, 1.0)(None, logits[:1])
    assert int((out == 0).sum()) == 1 and int(torch.isinf(out).sum()) == 49


def test_per_row_sampler_distribution_and_top_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(4000, 4).clone()
    picks = runner.per_row_sampler(range(4000), 1.0, 1.0)(None, logits).argmax(-1)
    freq = torch.bincount(picks, minlength=4).float() / 4000
    assert torch.allclose(freq, probs, atol=0.03)
    # top_p 0.75: the nucleus is {0, 1} (0.5 < 0.75 <= 0.8), renormalized to 5/8, 3/8
    picks = runner.per_row_sampler(range(4000), 1.0, 0.75)(None, logits).argmax(-1)
    freq = torch.bincount(picks, minlength=4).float() / 4000
    assert freq[2:].sum() == 0 and abs(freq[0] - 0.625) < 0.03
    # a tiny top_p is greedy
    assert bool((runner.per_row_sampler(range(50), 1.0, 1e-6)(None, logits[:50]).argmax(-1) == 0).all())


def test_sample_seed_is_stable_and_distinct():
    assert runner.sample_seed(0, "a", 0) == runner.sample_seed(0, "a", 0)
    seeds = {runner.sample_seed(s, i, k) for s in (0, 1) for i in ("a", "b") for k in (0, 1)}
    assert len(seeds) == 8


def test_prompts_per_task():
    tok = type("Tok", (), {"chat_template": None})()
    math_item = EvalItem("m1", "math", "What is 2 + 2?", "4")
    text, templated = prompts.build_prompt(tok, math_item)
    assert not templated and text.startswith("What is 2 + 2?") and text.endswith(prompts.MATH_INSTRUCTION)
    mcq = EvalItem("q1", "mcq", "Pick one.", "B", choices=["red", "green", "blue"])
    text = prompts.user_message(mcq)
    assert "A) red\nB) green\nC) blue" in text and "\\boxed{A}" in text
    stdio = EvalItem("c1", "code", "Sum.", tests=[{"input": "1 2\n", "output": "3\n"}])
    assert "standard input" in prompts.user_message(stdio) and "```python" in prompts.user_message(stdio)
    func = EvalItem("c2", "code", "Add.", tests=[{"assert": "assert add(1, 2) == 3"}], meta={"entry_point": "add"})
    text = prompts.user_message(func)
    assert "function `add`" in text and "assert add(1, 2) == 3" in text and "standard input" not in text
    with pytest.raises(ValueError, match="choices"):
        prompts.user_message(EvalItem("q2", "mcq", "Pick.", "A", choices=[]))
    # --instruction: none gives the bare question (mcq keeps its choices); a text replaces the task's own.
    assert prompts.user_message(math_item, "none") == "What is 2 + 2?"
    assert prompts.user_message(mcq, "none") == "Pick one.\n\nA) red\nB) green\nC) blue"
    assert prompts.user_message(math_item, "Answer in \\boxed{}.") == "What is 2 + 2?\n\nAnswer in \\boxed{}."
    with pytest.raises(ValueError, match="unknown task"):
        prompts.user_message(EvalItem("x", "poetry", "Q?", None), "none")


# --------------------------------------------------------------------------- sweep


def _split(tmp_path, ids_dev, ids_test):
    items = [json.loads(line) for line in open(GSM8K) if line.strip()]
    for name, ids in (("dev", ids_dev), ("test", ids_test)):
        with open(tmp_path / f"{name}.jsonl", "w") as f:
            for n, item_id in enumerate(ids):
                f.write(json.dumps(items[n % len(items)] | {"id": item_id}) + "\n")
    return tmp_path / "dev.jsonl", tmp_path / "test.jsonl"


def test_sweep_chooses_on_dev_and_reports_on_test(tiny, tmp_path, capsys):
    dev, test = _split(tmp_path, ["d1", "d2", "d3"], ["t1", "t2"])
    out = tmp_path / "sweep"
    assert run("sweep", "--model", tiny, "--device", "cpu", "--dev", dev, "--test", test, "--task", "math",
               "--grid", "oeb_tau_max=0.3,0.15;oeb_layers=0-1", "--max-new-tokens", 6, "--batch-size", 2,
               "--no-progress", "--n-boot", 200, "--with-controls", "--out", out) == 0
    chosen = json.loads((out / "chosen.json").read_text())
    # a random model scores 0 everywhere: a tie, so the smaller perturbation (τ_max 0.15) is chosen
    assert chosen["name"] == "tau0.15_oeb0-1" and chosen["tied"] == ["tau0.3_oeb0-1", "tau0.15_oeb0-1"]
    assert chosen["config"]["oeb_tau_max"] == 0.15 and chosen["config"]["oeb_layers"] == [0, 1]
    assert sorted(os.listdir(out / "dev")) == ["baseline", "tau0.15_oeb0-1", "tau0.3_oeb0-1"]
    assert sorted(os.listdir(out / "test")) == ["baseline", "chosen", "random-attn", "random-residual"]
    for name in ("tau0.15_oeb0-1", "tau0.3_oeb0-1"):
        assert {r["item_id"] for r in read_jsonl(out / "dev" / name / "rows.jsonl")} == {"d1", "d2", "d3"}
    test_rows = read_jsonl(out / "test" / "chosen" / "rows.jsonl")
    assert {r["item_id"] for r in test_rows} == {"t1", "t2"} and test_rows[0]["stepflow"] == chosen["config"]
    report = json.loads((out / "report.json").read_text())
    assert [r["name"] for r in report["runs"]] == ["baseline", "chosen", "random-attn", "random-residual"]
    assert report["items_in_common"] == 2 and report["chosen"]["name"] == chosen["name"]
    control_rows = read_jsonl(out / "test" / "random-attn" / "rows.jsonl")
    assert all(r["control"] == "random-attn" and r["stepflow"] == chosen["config"] for r in control_rows)
    assert "chosen on dev: tau0.15_oeb0-1" in capsys.readouterr().out
    assert (out / "report.md").exists()


def test_sweep_refuses_to_tune_on_test(tiny, tmp_path, capsys):
    dev, test = _split(tmp_path, ["d1", "d2"], ["t1", "d2"])
    common = ["--model", tiny, "--device", "cpu", "--task", "math", "--grid", "smi_alpha=0.02", "--out",
              tmp_path / "s"]
    assert run("sweep", "--dev", dev, "--test", dev, *common) == 2
    assert "the same file" in capsys.readouterr().err
    assert run("sweep", "--dev", dev, "--test", test, *common) == 2
    assert "share 1 item id(s) (e.g. d2)" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
    # and there is no option to choose on the test split
    with pytest.raises(SystemExit):
        run("sweep", "--dev", dev, "--test", test, "--select-on", "test", *common)


def test_sweep_grid_and_choice_rule():
    grid = sweep.parse_grid("oeb_tau_max=0.1,0.3;smi_alpha=0.06;oeb_layers=0-2,0+3;smi_layers=none,5;"
                            "oeb_rule=bridge,odds;smi_window=2")
    assert grid == {"oeb_tau_max": [0.1, 0.3], "smi_alpha": [0.06], "oeb_layers": [(0, 1, 2), (0, 3)],
                    "smi_layers": [(), (5,)], "oeb_rule": ["bridge", "odds"], "smi_window": [2]}
    for bad in ("", "lam=0.5", "oeb_tau_max=x", "oeb_layers=2-1", "oeb_strength", "smi_alpha=0.1;smi_alpha=0.2",
                "oeb_rule=pasta", "smi_window=1.5"):
        with pytest.raises(ValueError):
            sweep.parse_grid(bad)
    config = sf.StepFlowConfig

    def cand(i, tau, layers, alpha=0.06, smi=(3,), **kw):
        return sweep.Candidate(f"c{i}", i, {}, config(oeb_layers=layers, oeb_tau_max=tau, smi_layers=smi,
                                                      smi_alpha=alpha, **kw))

    def summ(p):
        return {"accuracy": {"pass@1": p, "ci95": [p, p]}}

    results = [(cand(0, 0.3, (0, 1)), summ(0.5)), (cand(1, 0.15, (0, 1)), summ(0.6)), (cand(2, 0.2, (0,)), summ(0.6))]
    chosen = sweep.choose(results, summ(0.4))
    assert chosen["name"] == "c2" and chosen["tied"] == ["c1", "c2"] and chosen["dev_baseline_pass@1"] == 0.4
    results = [(cand(0, 0.15, (0,), alpha=0.1), summ(0.6)), (cand(1, 0.15, (0,), alpha=0.05), summ(0.6))]
    assert sweep.choose(results)["name"] == "c1"
    assert sweep.choose([(cand(0, 1.0, (0,)), summ(0.7)), (cand(1, 0.01, (0,)), summ(0.6))])["name"] == "c0"
    # the earlier rules are sized by their own strengths (λ, γ)
    odds = [(cand(0, 0.15, (0,), oeb_rule="odds", oeb_strength=1.0), summ(0.6)),
            (cand(1, 0.15, (0,), oeb_rule="odds", oeb_strength=0.25), summ(0.6))]
    assert sweep.choose(odds)["name"] == "c1"
    with pytest.raises(ValueError):
        sweep.choose([(cand(0, 1.0, (0,)), None)])


def test_compare_runs_needs_finished_runs(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    assert run("compare-runs", tmp_path / "a", tmp_path / "a") == 2
    assert "no summary.json" in capsys.readouterr().err
    assert run("compare-runs", tmp_path / "a") == 2


@pytest.mark.slow
def test_resume_after_sigkill_of_a_real_run(tiny, tmp_path):
    """Kill `stepflow eval` (SIGKILL, no cleanup) once some rows are written; the rerun completes the run."""
    import signal
    import subprocess
    import sys
    import time

    data = tmp_path / "many.jsonl"
    records = [json.loads(line) for line in open(GSM8K) if line.strip()]
    with open(data, "w") as f:
        for n in range(12):
            f.write(json.dumps(records[n % len(records)] | {"id": f"q{n}"}) + "\n")
    out = tmp_path / "run"
    args = [str(a) for a in eval_args(tiny, data, "math", out, "--batch-size", 1, "--max-new-tokens", 24)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "stepflow_ext.cli", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    rows_path = out / "rows.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if rows_path.exists() and rows_path.read_text().count("\n") >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = read_jsonl_text(rows_path.read_text().rsplit("\n", 1)[0])
    assert 3 <= len(partial) < 12 and not (out / "summary.json").exists()
    assert run(*args) == 0
    rows = read_jsonl(rows_path)
    assert [r["item_id"] for r in rows] == [f"q{n}" for n in range(12)]
    assert untimed(rows[:len(partial)]) == untimed(partial)
    assert summary_of(out)["counts"]["rows"] == 12


def test_help_of_the_eval_commands(capsys):
    for command in ("eval", "compare-runs", "sweep"):
        with pytest.raises(SystemExit) as e:
            cli.main([command, "--help"])
        assert e.value.code == 0
        text = capsys.readouterr().out
        assert "example" in text and f"stepflow {command}" in text
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "eval" in capsys.readouterr().out


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_engine_vllm_without_vllm_is_a_usage_error(tiny, tmp_path, capsys):
    out = tmp_path / "x"
    assert run(*eval_args(tiny, GSM8K, "math", out, "--engine", "vllm")) == 2
    assert "vLLM is not installed" in capsys.readouterr().err
    assert not out.exists()   # nothing recorded for a run that never started


def test_old_runs_without_an_engine_setting_resume_as_hf(tiny, tmp_path):
    out = tmp_path / "run"
    assert run(*eval_args(tiny, GSM8K, "math", out, "--limit", 1)) == 0
    path = out / "settings.json"
    recorded = json.loads(path.read_text())
    del recorded["settings"]["engine"]          # as written before the engine was a setting
    path.write_text(json.dumps(recorded))
    assert run(*eval_args(tiny, GSM8K, "math", out, "--limit", 1)) == 0
    assert summary_of(out)["run"]["engine"] == "hf" and "tokens_per_s" in summary_of(out)["run"]
