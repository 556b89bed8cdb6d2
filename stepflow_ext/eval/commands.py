"""The `stepflow eval`, `stepflow compare-runs` and `stepflow sweep` commands (cli.py registers them).

Exit status, as for the other commands: 0 when everything ran, 1 when some data lines or samples
failed (listed at the end; the rest ran and are in the outputs), 2 for a usage error.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import os
import time

import numpy as np

from ..cli import segmentation_options
from ..config import CONTROLS
from ..console import UsageError, err as _err, print_table as _print_table
from ..traces import eos_ids as _eos_ids
from . import distributed
from .runner import (ERRORS, ROWS, SUMMARY, SUMMARY_HEADER, CompletionsFile, EvalSettings, HFGenerator, RunMismatch,
                     all_rows, check_settings, file_sha256, fmt_pct, read_rows, run_items, summarize, summary_row,
                     write_errors)


# --------------------------------------------------------------------------- loading


def load_model_for_eval(args, device: str):
    """(tokenizer, model): cli.load_model, or accelerate's device_map when --device-map is given."""
    from .. import cli

    if not getattr(args, "device_map", None):
        local = copy.copy(args)
        local.device = device
        return cli.load_model(local)
    if importlib.util.find_spec("accelerate") is None:
        raise UsageError("--device-map needs the `accelerate` package (pip install accelerate); "
                         "without it use --device to put the whole model on one device")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .. import hf

    kwargs = {"trust_remote_code": bool(args.trust_remote_code)}
    try:
        tok = AutoTokenizer.from_pretrained(args.model, **kwargs)
        model_kwargs = dict(kwargs, dtype=cli.DTYPES[args.dtype], device_map=args.device_map)
        if args.attn_implementation:
            model_kwargs["attn_implementation"] = args.attn_implementation
        model = AutoModelForCausalLM.from_pretrained(args.model, **model_kwargs).eval()
        hf.check_model(model)
    except (OSError, ValueError, ImportError) as e:
        raise UsageError(f"cannot load model {args.model!r} with device_map={args.device_map!r}: {e}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok, model


def load_tokenizer(args):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(args.model, trust_remote_code=bool(args.trust_remote_code))
    except (OSError, ValueError, ImportError) as e:
        raise UsageError(f"cannot load the tokenizer of {args.model!r}: {e}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def stepflow_config(spec, model):
    """--stepflow none | default | CONFIG.json -> StepFlowConfig or None."""
    from .. import cli
    from ..config import StepFlowConfig

    if spec is None or spec.lower() == "none":
        return None
    if spec.lower() == "default":
        return StepFlowConfig.default_for(model)
    return cli.load_config(spec, model)


def load_data(source, task, limit):
    from .data import load_items

    if limit is not None and limit < 0:
        raise UsageError("--limit must be >= 0")
    try:
        return load_items(source, task, limit)
    except ValueError as e:
        raise UsageError(f"--data {source}: {e}") from None


# --------------------------------------------------------------------------- one run


def _versions() -> dict:
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}


def evaluate(settings: EvalSettings, items, data_errors, out_dir, *, model, tokenizer, config, job, batch_size,
             grade_options, grade_workers, device, completions=None, progress=True, quiet=False, name=None):
    """One run into out_dir (resumed if it holds the same settings). Returns (status, summary or None).

    Every rank calls this with all items; each takes its shard. Only rank 0 writes summary.json,
    errors.jsonl and the table; every rank gets the same status.
    """
    # Rank 0 checks (or records) the settings; every rank fails the same way on a mismatch.
    problem = None
    if job.main:
        try:
            check_settings(out_dir, settings)
        except RunMismatch as e:
            problem = str(e)
    problem = job.broadcast(problem)
    if problem:
        raise UsageError(problem)
    own = distributed.row_file(out_dir, job)
    repaired = []
    if job.main and own != os.path.join(out_dir, ROWS):
        repaired += read_rows(os.path.join(out_dir, ROWS), repair=True)[1]
    repaired += read_rows(own, repair=True)[1]
    for line in repaired:
        _err(f"resume: {line}")
    job.barrier()  # every file repaired before anyone reads the others
    rows, _ = all_rows(out_dir)
    done = {(r["item_id"], r["sample"]) for r in rows}
    if job.main and done and not quiet:
        _err(f"resume: {len(done)} samples already in {out_dir}, skipped")
    mine = distributed.shard(items, job)

    if completions is not None:
        generator = completions
    else:
        generator = HFGenerator(model, tokenizer, settings, _eos_ids(model, tokenizer), config=config)
    started = time.time()
    failures = run_items(settings, mine, generator, tokenizer, own, done, batch_size=batch_size,
                         grade_options=grade_options, grade_workers=grade_workers,
                         progress=progress and job.main, desc=name or "eval")
    elapsed = time.time() - started
    all_failures = [f for part in job.gather(failures) for f in part]
    job.barrier()  # every rank's rows are on disk
    summary = None
    if job.main:
        distributed.merge_rows(out_dir, [item.id for item in items])
        write_errors(out_dir, data_errors, all_failures)
        run_info = {"batch_size": batch_size, "world_size": job.world, "device": device,
                    "limit_items": len(items), "seconds": round(elapsed, 2), "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "grade": grade_options, **_versions()}
        summary = summarize(out_dir, settings, items, data_errors, all_failures, run_info)
        if not quiet:
            _print_table(f"stepflow eval: {settings.task}, {os.path.basename(settings.data)}", SUMMARY_HEADER,
                         [summary_row(name or os.path.basename(os.path.normpath(out_dir)), summary)])
            _err(f"results in {out_dir}/ ({ROWS}, {SUMMARY}, {ERRORS})")
    status = 1 if (data_errors or all_failures) else 0
    job.barrier()  # nobody starts anything else (or exits) before rank 0 has merged
    return status, summary


def _report_failures(data_errors, failures) -> None:
    if data_errors:
        _err(f"\n{len(data_errors)} data line{'s' if len(data_errors) != 1 else ''} failed:")
        for e in data_errors:
            _err(f"  {e}")
    if failures:
        _err(f"\n{len(failures)} sample{'s' if len(failures) != 1 else ''} failed (a rerun retries them):")
        for f in failures[:50]:
            _err(f"  {f}")
        if len(failures) > 50:
            _err(f"  ... and {len(failures) - 50} more (see {ERRORS})")


def _grade_options(args) -> dict:
    if args.code_time_limit <= 0:
        raise UsageError("--code-time-limit must be > 0")
    if args.code_memory_mb < 16:
        raise UsageError("--code-memory-mb must be >= 16")
    return {"time_limit": args.code_time_limit, "memory_mb": args.code_memory_mb}


def _settings(args, data, task, stepflow=None, control=None) -> EvalSettings:
    return EvalSettings(model=args.model, data=data, task=task, stepflow=stepflow, control=control,
                        control_seed=args.control_seed, samples=args.samples, max_new_tokens=args.max_new_tokens,
                        temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                        chat_template=not args.no_chat_template, instruction=args.instruction,
                        **segmentation_options(args), dtype=args.dtype,
                        completions_from=getattr(args, "completions_from", None), data_sha256=file_sha256(data))


def _setup(args):
    """(job, device): torch.distributed started when torchrun launched us."""
    try:
        job = distributed.from_env()
    except ValueError as e:
        raise UsageError(str(e)) from None
    if job.world > 1 and getattr(args, "device_map", None):
        raise UsageError("--device-map splits one model over the GPUs of one process; it cannot be combined "
                         "with torchrun ranks (use one or the other)")
    try:
        device = distributed.device_for(job, args.device)
    except ValueError as e:
        raise UsageError(str(e)) from None
    distributed.init(job, device)
    return job, device


def cmd_eval(args) -> int:
    if args.batch_size < 1:
        raise UsageError("--batch-size must be >= 1")
    grade_options = _grade_options(args)
    control = None if args.control in (None, "none") else args.control
    if control is not None and (args.stepflow is None or args.stepflow.lower() == "none"):
        raise UsageError(f"--control {control} needs a StepFlow config (--stepflow CONFIG.json or --stepflow default): "
                         "it perturbs the same layers with the same strengths")
    completions = None
    if args.completions_from:
        if args.stepflow not in (None, "none") or control:
            raise UsageError("--completions-from grades given completions: --stepflow and --control do not apply")
        try:
            completions = CompletionsFile(args.completions_from)
        except (OSError, ValueError) as e:
            raise UsageError(f"--completions-from: {e}") from None
    items, data_errors = load_data(args.data, args.task, args.limit)
    job, device = _setup(args)
    try:
        if completions is not None:
            tok, model, config = load_tokenizer(args), None, None
        else:
            tok, model = load_model_for_eval(args, device)
            config = stepflow_config(args.stepflow, model)
        settings = _settings(args, args.data, args.task, config.to_dict() if config else None, control)
        try:
            settings.check()
        except ValueError as e:
            raise UsageError(str(e)) from None
        if settings.samples > 1 and settings.temperature == 0 and job.main:
            _err(f"note: --samples {settings.samples} with --temperature 0: greedy samples are all the same")
        if job.main:
            for e in data_errors:
                _err(f"skipping {e}")
        if not items and job.main:
            _err(f"no usable items in {args.data}")
        status, _ = evaluate(settings, items, data_errors, args.out, model=model, tokenizer=tok, config=config,
                             job=job, batch_size=args.batch_size, grade_options=grade_options,
                             grade_workers=args.grade_workers, device=device, completions=completions,
                             progress=not args.no_progress)
        if job.main:
            failures = _read_failures(args.out)
            _report_failures(data_errors, failures)
        if not items:
            status = 1
        return status
    finally:
        job.close()


def _read_failures(out_dir) -> list[str]:
    path = os.path.join(out_dir, ERRORS)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line)["text"] for line in f if line.strip() and json.loads(line).get("kind") != "data"]


# --------------------------------------------------------------------------- compare-runs


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
    _print_table(f"Paired comparison on {report['items_in_common']} common items (baseline: {report['baseline']})",
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
        _err(f"warning: {w}")


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


def cmd_compare_runs(args) -> int:
    if args.out and not args.out.endswith((".json", ".md")):
        raise UsageError(f"--out {args.out}: use a .json or .md file name")
    if args.names and len(args.names.split(",")) != len(args.runs):
        raise UsageError(f"--names has {len(args.names.split(','))} names for {len(args.runs)} runs")
    report = compare_runs(args.runs, args.names.split(",") if args.names else None, n_boot=args.n_boot,
                          seed=args.seed)
    print_comparison(report)
    if args.out:
        write_comparison(report, args.out)
        _err(f"wrote {args.out}")
    return 0


# --------------------------------------------------------------------------- sweep


def cmd_sweep(args) -> int:
    from . import sweep

    if args.batch_size < 1:
        raise UsageError("--batch-size must be >= 1")
    grade_options = _grade_options(args)
    try:
        grid = sweep.parse_grid(args.grid)
    except ValueError as e:
        raise UsageError(f"--grid: {e}") from None
    if os.path.exists(args.dev) and os.path.exists(args.test) and os.path.samefile(args.dev, args.test):
        raise UsageError("--dev and --test are the same file: the config would be chosen on the test items")
    dev_items, dev_errors = load_data(args.dev, args.task, args.limit)
    test_items, test_errors = load_data(args.test, args.task, args.limit)
    shared = sorted({i.id for i in dev_items} & {i.id for i in test_items})
    if shared:
        raise UsageError(f"--dev and --test share {len(shared)} item id(s) (e.g. {', '.join(shared[:5])}): "
                         "choosing on dev would see test items")
    if not dev_items or not test_items:
        raise UsageError(f"no usable items in {'--dev' if not dev_items else '--test'}")
    job, device = _setup(args)
    try:
        tok, model = load_model_for_eval(args, device)
        base = stepflow_config(args.stepflow, model) if args.stepflow not in (None, "none") else None
        try:
            candidates = sweep.expand(grid, base, model)
        except ValueError as e:
            raise UsageError(f"--grid: {e}") from None
        if job.main:
            _err(f"sweep: {len(candidates)} configs on {len(dev_items)} dev items, then baseline and the chosen "
                 f"config on {len(test_items)} test items")
        common = dict(model=model, tokenizer=tok, job=job, batch_size=args.batch_size, grade_options=grade_options,
                      grade_workers=args.grade_workers, device=device, progress=not args.no_progress, quiet=True)
        status = 0
        dev_results = []
        for cand in candidates:
            settings = _settings(args, args.dev, args.task, cand.config.to_dict())
            code, summary = evaluate(settings, dev_items, dev_errors, os.path.join(args.out, "dev", cand.name),
                                     config=cand.config, name=f"dev {cand.name}", **common)
            status = max(status, code)
            dev_results.append((cand, summary))
        settings = _settings(args, args.dev, args.task)
        code, dev_base = evaluate(settings, dev_items, dev_errors, os.path.join(args.out, "dev", "baseline"),
                                  config=None, name="dev baseline", **common)
        status = max(status, code)
        chosen = None
        if job.main:
            try:
                chosen = sweep.choose([(c, s) for c, s in dev_results], dev_base)
            except ValueError as e:
                chosen = {"error": str(e)}
        chosen = job.broadcast(chosen)
        if "error" in chosen:
            raise UsageError(f"sweep: {chosen['error']} (see {os.path.join(args.out, 'dev')})")
        if job.main:
            sweep.write_json(os.path.join(args.out, "chosen.json"), chosen)
            _print_table(f"sweep on the dev split ({args.dev}, {len(dev_items)} items)", SUMMARY_HEADER,
                         [summary_row("baseline", dev_base)] + [summary_row(c.name, s) for c, s in dev_results])
            print(f"chosen on dev: {chosen['name']} ({chosen['rule']})")
        chosen_cfg = next(c.config for c in candidates if c.name == chosen["name"])

        runs = [("baseline", None, None), ("chosen", chosen_cfg, None)]
        if args.with_controls:
            runs += [(control, chosen_cfg, control) for control in CONTROLS]
        test_dirs = []
        for name, cfg, control in runs:
            settings = _settings(args, args.test, args.task, cfg.to_dict() if cfg else None, control)
            out = os.path.join(args.out, "test", name)
            code, _ = evaluate(settings, test_items, test_errors, out, config=cfg, name=f"test {name}", **common)
            status = max(status, code)
            test_dirs.append(out)
        if job.main:
            report = compare_runs(test_dirs, [name for name, _, _ in runs], n_boot=args.n_boot, seed=args.seed)
            report["chosen"] = chosen
            report["dev"] = args.dev
            report["test"] = args.test
            print_comparison(report)
            write_comparison(report, os.path.join(args.out, "report.json"))
            write_comparison(report, os.path.join(args.out, "report.md"))
            _err(f"sweep results in {args.out}/ (dev/, chosen.json, test/, report.json, report.md)")
            _report_failures(dev_errors + test_errors, [])
        return status
    finally:
        job.close()
