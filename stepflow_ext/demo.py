"""`stepflow demo`: the whole method on one model and one data set, in one command.

With no arguments it runs offline on the embedded tiny reasoner (stepflow_ext/data/tiny_reasoner/)
and its packaged splits (stepflow_ext/data/tiny_tasks/: dev, and test with in-distribution chains
and longer ones than training saw). The stages are the project's own commands, run in turn:

1. data: a subset of dev and test, stratified by chain length when the items say it ("steps");
2. `stepflow sweep --with-controls`: every config of a small grid on dev, the best one chosen
   there, then on test: the stock model (baseline), the chosen config, and both controls
   (random-attn, random-residual) with the chosen config's layers and strengths;
3. `stepflow eval --stepflow default`: StepFlowConfig.default_for the model, on test;
4. the paired table of all test runs against the baseline (compare-runs), and accuracy by
   chain length;
5. `stepflow analyze` on the baseline's own test traces (Step-Saliency maps, the Shallow
   Lock-in / Deep Decay diagnostics) and `stepflow compare` with the chosen config (the same
   traces before and after);
6. one report (report.html, self-contained, and report.md) and a summary in the terminal.
"""
from __future__ import annotations

import collections
import json
import os
import time

import numpy as np

# Around the paper's values (τ_max 0.15, α 0.06: design.md 2.5) and a stronger setting of each.
DEFAULT_GRID = "oeb_tau_max=0.15,0.3;smi_alpha=0.06,0.3"

HONESTY = (
    "What this measures: the accuracy of THIS model on THESE items, greedy decoding, with and without "
    "StepFlow, paired by item, with 95% bootstrap intervals and McNemar's exact test. On the embedded tiny "
    "reasoner (1.6 million parameters, 4 layers, trained on 2 CPU cores on synthetic variable-substitution chains) "
    "it shows the pipeline working end to end and how the intervention acts on a model whose step flow "
    "breaks on chains longer than it was trained on. It says nothing, by itself, about large reasoning "
    "models: their failure modes, layer counts and the sizes of any effect differ, and a few dozen items "
    "give wide intervals. Whatever the sign of the effect here, it is reported as measured.")


def _packaged(name: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", name)


def default_model_dir() -> str:
    return _packaged("tiny_reasoner")


def default_data() -> tuple[str, str]:
    """(dev, test) JSONL of the embedded model's task family."""
    return os.path.join(_packaged("tiny_tasks"), "dev.jsonl"), os.path.join(_packaged("tiny_tasks"), "test.jsonl")


def _read_jsonl(path: str) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    rows.append({"_unparseable": line})  # kept: the eval reports it with its line
    return rows


def stratified(records: list[dict], per_group: int, limit: int) -> list[dict]:
    """Up to `per_group` records of each chain length ("steps"), in file order; records without
    that field are taken in order up to `limit`."""
    if not any(isinstance(r.get("steps"), int) for r in records):
        return records[:limit]
    taken, count = [], collections.Counter()
    for r in records:
        key = r.get("steps")
        if count[key] < per_group:
            taken.append(r)
            count[key] += 1
    return taken


def write_subset(src: str, dst: str, per_group: int, limit: int) -> list[dict]:
    records = stratified(_read_jsonl(src), per_group, limit)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    with open(dst, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r["_unparseable"] if "_unparseable" in r else json.dumps(r)) + "\n")
    return records


def _stage(title: str) -> float:
    print(f"\n=== {title}", flush=True)
    return time.time()


def _groups_of(record: dict) -> list[str]:
    """The rows of the by-length table an item counts in: its split kind (all of them) and its length."""
    steps, kind = record.get("steps"), record.get("split_kind")
    short = {"in_distribution": "in-distribution", "longer": "longer"}.get(kind, kind)
    groups = [f"all {short}"] if short else []
    if isinstance(steps, int):
        groups.append(f"{steps} steps" + (f" ({short})" if short else ""))
    return groups or ["all"]


def by_group(run_dir: str, groups: dict) -> dict:
    """{group: (n, pass@1, [lo, hi])} from a run's per-item correctness."""
    from .eval.paired import read_summary
    from .eval.stats import accuracy

    per_item = read_summary(run_dir)["per_item"]
    out = {}
    for group, ids in groups.items():
        rows = [per_item[i] for i in ids if i in per_item]
        if rows:
            k = min(len(r) for r in rows)
            acc = accuracy(np.array([r[:k] for r in rows], dtype=bool), n_boot=2000, seed=0)
            out[group] = (acc["n_items"], acc["pass@1"], acc["ci95"])
    return out


def pick_traces(run_dir: str, count: int) -> list[dict]:
    """The first `count` completions of a run that reached a summary, spread over the run's items, as
    {"prompt", "completion"} traces (the format `stepflow analyze` reads)."""
    from .eval.runner import ROWS, read_rows

    rows, _ = read_rows(os.path.join(run_dir, ROWS))
    with_summary = [r for r in rows if r.get("summary") and r.get("sample", 0) == 0]
    if len(with_summary) > count:
        idx = np.linspace(0, len(with_summary) - 1, count).round().astype(int)
        with_summary = [with_summary[i] for i in idx]
    return [{"prompt": r["prompt"], "completion": r["completion"], "id": r["item_id"], "correct": r["correct"]}
            for r in with_summary]


def run(args, command) -> int:
    """The demo with the options of `stepflow demo` (args); command(argv) runs `stepflow ARGV` (sweep,
    eval, analyze, compare) and returns its exit status. Returns the worst status of the stages."""
    from .console import UsageError, err, print_table
    from .eval import paired
    from .eval.data import load_items
    from .report import Report

    start = time.time()
    packaged = args.model is None
    model = args.model or default_model_dir()
    if packaged and not os.path.isfile(os.path.join(model, "config.json")):
        raise UsageError(f"the embedded model is missing at {model} (was the package installed with its data "
                             "files?); pass --model M")
    if args.data is None:
        if not packaged:
            raise UsageError("--model needs --data FILE (the embedded data suits only the embedded model)")
        dev_src, test_src = default_data()
    else:
        test_src, dev_src = args.data, args.dev
        if dev_src is None:
            raise UsageError("--data needs --dev FILE: the config is chosen on dev, never on the test items")
    for path in (dev_src, test_src):
        if not os.path.isfile(path):
            raise UsageError(f"no such file: {path}")
    instruction = args.instruction or ("none" if packaged else "default")
    # The embedded model writes one substitution per paragraph and no sentence ends ("y = x - 1 = 80\n\n"),
    # so the paper's sentence rule would see one step: it is segmented by the paragraph rule. Other models
    # get the paper's rule unless --steps says otherwise.
    steps = args.steps or ("paragraph" if packaged else "sentence")
    out = args.out
    os.makedirs(out, exist_ok=True)

    _stage("1/6 data")
    dev_path, test_path = os.path.join(out, "data", "dev.jsonl"), os.path.join(out, "data", "test.jsonl")
    dev = write_subset(dev_src, dev_path, args.per_length, args.items)
    test = write_subset(test_src, test_path, args.per_length, args.items)
    print(f"dev: {len(dev)} items from {dev_src}; test: {len(test)} items from {test_src}")
    groups = collections.defaultdict(list)  # table row -> item ids, as the eval names them
    for item in load_items(test_path, args.task)[0]:
        for group in _groups_of(item.meta or {}):
            groups[group].append(item.id)
    placement = ["--device", args.device, "--dtype", args.dtype, "--steps", steps]
    common = ["--model", model, "--task", args.task, *placement,
              "--max-new-tokens", str(args.max_new_tokens), "--batch-size", str(args.batch_size),
              "--instruction", instruction]
    status = 0

    t = _stage("2/6 sweep on dev, then baseline / chosen / controls on test")
    sweep_dir = os.path.join(out, "sweep")
    status = max(status, command(["sweep", *common, "--dev", dev_path, "--test", test_path, "--grid", args.grid,
                                  "--with-controls", "--out", sweep_dir]))
    chosen_path = os.path.join(sweep_dir, "chosen.json")
    if not os.path.isfile(chosen_path):
        err("demo: the sweep chose no config; see the messages above")
        return max(status, 1)
    with open(chosen_path) as f:
        chosen = json.load(f)
    config_path = os.path.join(out, "chosen_config.json")
    with open(config_path, "w") as f:
        json.dump(chosen["config"], f, indent=2)
    print(f"({time.time() - t:.0f} s)")

    t = _stage("3/6 StepFlow's default config on test")
    default_dir = os.path.join(out, "test_default")
    status = max(status, command(["eval", *common, "--data", test_path,
                                  "--stepflow", "default", "--out", default_dir]))
    print(f"({time.time() - t:.0f} s)")

    _stage("4/6 paired comparison on test")
    names = ["baseline", "default", "chosen", "random-attn", "random-residual"]
    dirs = [os.path.join(sweep_dir, "test", "baseline"), default_dir] + \
        [os.path.join(sweep_dir, "test", n) for n in names[2:]]
    report = paired.compare_runs(dirs, names, n_boot=args.n_boot, seed=0)
    paired.print_comparison(report)
    paired.write_comparison(report, os.path.join(out, "paired.json"))
    length_rows = []
    per_run = {n: by_group(d, groups) for n, d in zip(names, dirs)}
    for group in groups:
        row = [group, str(len(groups[group]))]
        for n in names:
            g = per_run[n].get(group)
            row.append("n/a" if g is None else f"{100 * g[1]:.0f} [{100 * g[2][0]:.0f}, {100 * g[2][1]:.0f}]")
        length_rows.append(row)
    length_header = ["items", "n"] + names
    print_table("pass@1 % by chain length [95% bootstrap CI]", length_header, length_rows)

    t = _stage("5/6 Step-Saliency of the baseline's test traces, before and after the chosen config")
    traces = pick_traces(dirs[0], args.traces)
    trace_path = os.path.join(out, "traces.jsonl")
    with open(trace_path, "w", encoding="utf-8") as f:
        for tr in traces:
            f.write(json.dumps(tr) + "\n")
    analyze_dir, compare_dir = os.path.join(out, "analyze"), os.path.join(out, "compare")
    if traces:
        status = max(status, command(["analyze", "--model", model, *placement, "--traces", trace_path,
                                      "--out", analyze_dir]))
        status = max(status, command(["compare", "--model", model, *placement, "--traces", trace_path,
                                      "--stepflow", config_path, "--out", compare_dir]))
    else:
        err("demo: no baseline completion reached a summary; no Step-Saliency maps")
    print(f"({time.time() - t:.0f} s)")

    _stage("6/6 report")
    rep = Report("StepFlow demo: " + ("the embedded tiny reasoner" if packaged else model))
    rep.heading("What was measured")
    rep.text(HONESTY)
    rep.text(f"Model: {model}. Test: {len(test)} items from {test_src}; dev (for choosing the config): "
             f"{len(dev)} items from {dev_src}. Greedy decoding, at most {args.max_new_tokens} new tokens, "
             f"instruction: {instruction}. Steps: the {steps} rule"
             + (" (the embedded model writes one substitution per paragraph, without sentence ends, so the "
                "paper's sentence rule would see a single step)" if packaged and steps == "paragraph" else "")
             + f". StepFlow's default config is the paper's (Table 8): {_describe_config(default_dir)}. Grid on dev: "
             f"{args.grid}. Chosen on dev: {chosen['name']}, {_describe_config(None, chosen['config'])} "
             f"({chosen.get('rule', '')}).")
    rep.heading("Accuracy on test, paired against the stock model")
    rep.table(["run", "what"] + paired.COMPARE_HEADER[1:], paired.compare_table(report, what=True))
    rep.text(f"{report['mcnemar_note']}. Δ: pass@1 minus the baseline's in percentage points, paired-bootstrap "
             "95% CI and p-value; b01: items the baseline got wrong and the run right, b10: the reverse. "
             "random-attn / random-residual: the chosen config with OEB / SMI replaced by its control "
             "(docs/method.md, Controls).")
    rep.heading("Accuracy by chain length (pass@1 %, 95% bootstrap CI)")
    rep.table(length_header, length_rows)
    if traces:
        rep.heading("Step-Saliency of the baseline's own traces")
        rep.text(f"{len(traces)} test completions of the stock model that reached a summary. Maps: the share of "
                 "each segment's saliency drawn from each earlier segment (Q: question, S1..Sk: thinking steps, "
                 "A: summary), per layer, then resampled to relative step position and averaged.")
        for name, caption in (("aggregate_heatmaps.png", "mean step-to-step saliency shares per layer"),
                              ("aggregate_curves.png", "diagnostics over layers: lock-in index, summary thinking "
                                                       "share, summary recent share (95% bands)")):
            path = os.path.join(analyze_dir, name)
            if os.path.isfile(path):
                rep.image(path, caption)
        rep.heading("Before and after the chosen config")
        for name, caption in (("side_by_side.png", "selected layers, before | after | after - before"),
                              ("curves.png", "diagnostic curves before and after"),
                              ("heatmaps_diff.png", "difference of the mean maps, after - before, every layer")):
            path = os.path.join(compare_dir, name)
            if os.path.isfile(path):
                rep.image(path, caption)
        md = os.path.join(compare_dir, "report.md")
        if os.path.isfile(md):
            rep.text(f"Numbers of the before/after comparison: {os.path.relpath(md, out)}.")
    html_path, md_path = rep.write(out)
    print(f"report: {html_path} (and {md_path})")
    print(f"demo done in {time.time() - start:.0f} s; everything is in {out}/")
    return status


def _describe_config(run_dir, config=None) -> str:
    """One line for a StepFlow config, from a run's settings or a config dict."""
    from .config import StepFlowConfig
    from .eval.paired import read_summary

    if config is None:
        try:
            config = read_summary(run_dir)["settings"].get("stepflow")
        except Exception:  # noqa: BLE001 - the run failed; its error was reported
            return "n/a"
    return StepFlowConfig.from_dict(config).describe() if config else "none"
