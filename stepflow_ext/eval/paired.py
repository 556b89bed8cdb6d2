"""Paired comparison of eval runs against a baseline (`stepflow compare-runs`, the sweep's and the demo's
test reports): pass@1 with bootstrap CIs, the paired bootstrap and McNemar's exact test, as a table,
markdown or JSON."""
from __future__ import annotations

import json
import os

import numpy as np

from ..console import UsageError, err, print_table
from .runner import SUMMARY, fmt_pct


def read_summary(run_dir: str) -> dict:
    path = run_dir if run_dir.endswith(".json") else os.path.join(run_dir, SUMMARY)
    if not os.path.exists(path):
        raise UsageError(f"{run_dir}: no {SUMMARY} (not an eval run, or it did not finish: rerun "
                         "`stepflow eval` with the same --out to complete it)")
    try:
        with open(path) as f:
            summary = json.load(f)
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: unreadable: {e}") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("per_item"), dict) or "settings" not in summary:
        raise UsageError(f"{path}: not a `stepflow eval` summary (no per_item / settings)")
    return summary


def _describe(summary) -> str:
    s = summary["settings"]
    if s.get("stepflow"):
        import warnings

        from ..config import StepFlowConfig

        with warnings.catch_warnings():  # a run recorded before the paper's rules: described as it ran
            warnings.simplefilter("ignore")
            config = StepFlowConfig.from_dict(s["stepflow"]).describe()
        if s.get("control"):
            return f"control {s['control']} (seed {s.get('control_seed', 0)}) sized as StepFlow {config}"
        return f"StepFlow {config}"
    if s.get("completions_from"):
        return f"completions from {s['completions_from']}"
    return "baseline (no StepFlow)"


def compare_runs(run_dirs: list[str], names: list[str] | None = None, *, n_boot=10000, seed=0) -> dict:
    """Paired comparison of runs on the items they all completed; the first run is the baseline."""
    from .stats import accuracy, mcnemar_exact, paired_bootstrap

    if len(run_dirs) < 2:
        raise UsageError("compare-runs needs at least two runs (the first is the baseline)")
    summaries = [read_summary(d) for d in run_dirs]
    names = names or [os.path.basename(os.path.normpath(d)) for d in run_dirs]
    tasks = {s["settings"]["task"] for s in summaries}
    if len(tasks) > 1:
        raise UsageError(f"the runs are of different tasks ({', '.join(sorted(tasks))}): nothing to pair")
    warnings = []
    base = summaries[0]["settings"]
    for name, s in zip(names[1:], summaries[1:]):
        other = s["settings"]
        for key in ("model", "data_sha256", "samples", "temperature", "top_p", "max_new_tokens", "seed", "dtype"):
            if other.get(key) != base.get(key):
                warnings.append(f"{name}: {key} {other.get(key)!r} differs from the baseline's {base.get(key)!r}")
    common = [i for i in summaries[0]["per_item"] if all(i in s["per_item"] for s in summaries[1:])]
    if not common:
        raise UsageError("the runs have no completed item in common")

    def matrix(summary):
        rows = [summary["per_item"][i] for i in common]
        k = min(len(r) for r in rows)
        return np.array([r[:k] for r in rows], dtype=bool)

    base_m = matrix(summaries[0])
    runs = []
    for name, path, s in zip(names, run_dirs, summaries):
        m = matrix(s)
        entry = {"name": name, "path": path, "what": _describe(s), "items_in_run": len(s["per_item"]),
                 "dropped": len(s["per_item"]) - len(common), "accuracy": accuracy(m, n_boot=n_boot, seed=seed),
                 "settings": s["settings"]}
        if runs:  # paired against the baseline
            entry["vs_baseline"] = {
                "paired_bootstrap": paired_bootstrap(base_m.mean(1), m.mean(1), n_boot=n_boot, seed=seed),
                # McNemar needs one verdict per item: the first sample of each (pass@1 draw).
                "mcnemar": mcnemar_exact(base_m[:, 0], m[:, 0]),
            }
        runs.append(entry)
    return {"command": "compare-runs", "baseline": names[0], "items_in_common": len(common), "warnings": warnings,
            "mcnemar_note": "McNemar's exact test on the first sample of each item; the paired bootstrap on "
                            "per-item means over samples", "runs": runs, "items": common}


def _pp(x) -> str:
    return "n/a" if x is None else f"{100 * x:+.1f}"


def _p(x) -> str:
    return "n/a" if x is None else (f"{x:.3f}" if x >= 0.001 else f"{x:.1e}")


COMPARE_HEADER = ["run", "items", "pass@1 %", "95% CI", "Δ pp", "Δ 95% CI", "p boot", "b01/b10", "p McNemar"]


def compare_table(report: dict, what: bool = False) -> list[list[str]]:
    rows = []
    for run in report["runs"]:
        acc = run["accuracy"]
        row = [run["name"]] + ([run["what"]] if what else []) + [str(acc["n_items"]), fmt_pct(acc["pass@1"]),
               f"[{fmt_pct(acc['ci95'][0])}, {fmt_pct(acc['ci95'][1])}]"]
        vs = run.get("vs_baseline")
        if vs is None:
            row += ["baseline", "", "", "", ""]
        else:
            pb, mc = vs["paired_bootstrap"], vs["mcnemar"]
            row += [_pp(pb["diff"]), f"[{_pp(pb['ci95'][0])}, {_pp(pb['ci95'][1])}]", _p(pb.get("p_value")),
                    f"{mc['b01']}/{mc['b10']}", _p(mc["p_value"])]
        rows.append(row)
    return rows


def compare_markdown(report: dict) -> str:
    lines = [f"# Paired comparison against `{report['baseline']}`", "",
             f"{report['items_in_common']} items completed by every run. {report['mcnemar_note']}. "
             "b01: items the baseline got wrong and this run right; b10: the reverse.", ""]
    header = COMPARE_HEADER[:1] + ["what"] + COMPARE_HEADER[1:]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for row in compare_table(report, what=True):
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |")
    for run in report["runs"]:
        if run["dropped"]:
            lines.append(f"\n{run['name']}: {run['dropped']} of its {run['items_in_run']} items are not in every "
                         "run and were left out.")
    for w in report["warnings"]:
        lines.append(f"\nwarning: {w}")
    return "\n".join(lines) + "\n"


def print_comparison(report: dict) -> None:
    print_table(f"Paired comparison on {report['items_in_common']} common items (baseline: {report['baseline']})",
                COMPARE_HEADER, compare_table(report))
    for run in report["runs"]:
        print(f"  {run['name']}: {run['what']}")
    print(f"Δ: pass@1 minus the baseline's, in percentage points, with a paired-bootstrap CI and p-value.\n"
          f"{report['mcnemar_note']}; b01 = baseline wrong, run right; b10 = the reverse.")
    for run in report["runs"]:
        if run["dropped"]:
            print(f"{run['name']}: {run['dropped']} of its {run['items_in_run']} completed items are not in every "
                  "run: dropped")
    for w in report["warnings"]:
        err(f"warning: {w}")


def write_comparison(report: dict, path: str) -> None:
    if path.endswith(".md"):
        text = compare_markdown(report)
    elif path.endswith(".json"):
        text = json.dumps(report, indent=2, allow_nan=False) + "\n"
    else:
        raise UsageError(f"--out {path}: use a .json or .md file name")
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
