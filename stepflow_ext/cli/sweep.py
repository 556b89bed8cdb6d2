"""`stepflow sweep`: choose a StepFlow config on dev, report it on test."""
from __future__ import annotations

import os

from ..config import CONTROLS
from ..eval.paired import compare_runs, print_comparison, write_comparison
from ..eval.run import evaluate, report_failures
from ..eval.runner import SUMMARY_HEADER, summary_row
from .common import RAW, UsageError, err, model_options, print_table
from .common_eval import (eval_settings, generation_options, grade_limits, load_data, load_model_for_eval, setup,
                          stepflow_config)


def cmd_sweep(args) -> int:
    from ..eval import sweep

    if args.batch_size < 1:
        raise UsageError("--batch-size must be >= 1")
    grade_options = grade_limits(args)
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
    job, device = setup(args)
    try:
        tok, model = load_model_for_eval(args, device)
        base = stepflow_config(args.stepflow, model) if args.stepflow not in (None, "none") else None
        try:
            candidates = sweep.expand(grid, base, model)
        except ValueError as e:
            raise UsageError(f"--grid: {e}") from None
        if job.main:
            err(f"sweep: {len(candidates)} configs on {len(dev_items)} dev items, then baseline and the chosen "
                f"config on {len(test_items)} test items")
        common = dict(model=model, tokenizer=tok, job=job, batch_size=args.batch_size, grade_options=grade_options,
                      grade_workers=args.grade_workers, device=device, progress=not args.no_progress, quiet=True)
        status = 0
        dev_results = []
        for cand in candidates:
            settings = eval_settings(args, args.dev, args.task, cand.config.to_dict())
            code, summary = evaluate(settings, dev_items, dev_errors, os.path.join(args.out, "dev", cand.name),
                                     config=cand.config, name=f"dev {cand.name}", **common)
            status = max(status, code)
            dev_results.append((cand, summary))
        settings = eval_settings(args, args.dev, args.task)
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
            print_table(f"sweep on the dev split ({args.dev}, {len(dev_items)} items)", SUMMARY_HEADER,
                        [summary_row("baseline", dev_base)] + [summary_row(c.name, s) for c, s in dev_results])
            print(f"chosen on dev: {chosen['name']} ({chosen['rule']})")
        chosen_cfg = next(c.config for c in candidates if c.name == chosen["name"])

        runs = [("baseline", None, None), ("chosen", chosen_cfg, None)]
        if args.with_controls:
            runs += [(control, chosen_cfg, control) for control in CONTROLS]
        test_dirs = []
        for name, cfg, control in runs:
            settings = eval_settings(args, args.test, args.task, cfg.to_dict() if cfg else None, control)
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
            err(f"sweep results in {args.out}/ (dev/, chosen.json, test/, report.json, report.md)")
            report_failures(dev_errors + test_errors, [])
        return status
    finally:
        job.close()


def add_parser(sub) -> None:
    p = sub.add_parser("sweep", formatter_class=RAW, help="choose a StepFlow config on dev, report it on test",
                       description="Run every StepFlow config of a grid on the dev split (each an eval run in\n"
                                   "DIR/dev/NAME), choose the best dev pass@1 (ties: the smaller perturbation,\n"
                                   "smaller λ×|OEB layers| then γ×|SMI layers|), write DIR/chosen.json, then\n"
                                   "evaluate the baseline and the chosen config once on the test split\n"
                                   "(DIR/test/) and write the paired report (DIR/report.md, report.json).\n"
                                   "There is no way to choose on the test split: dev and test must be\n"
                                   "different files with no item id in common.",
                       epilog="example:\n"
                              "  stepflow sweep --model tiny --dev dev.jsonl --test test.jsonl --task math \\\n"
                              "      --grid 'oeb_strength=0.25,0.5,1.0;smi_gamma=0.02,0.05;oeb_layers=0-0,0-1' "
                              "--max-new-tokens 16 --out runs/sweep\n\n"
                              "grid: FIELD=V1,V2,... joined by ';'. Fields: oeb_strength, smi_gamma, smi_beta,\n"
                              "num_sink, oeb_layers, smi_layers. Layer sets: 0-3 (inclusive), 5, 0-1+6-7, none.\n"
                              "Fields not in the grid come from --stepflow (default: default_for the model).")
    model_options(p)
    p.add_argument("--dev", required=True, metavar="FILE", help="the split the config is chosen on")
    p.add_argument("--test", required=True, metavar="FILE", help="the split it is reported on (once)")
    p.add_argument("--task", required=True, choices=("math", "mcq", "code"))
    p.add_argument("--grid", required=True, metavar="GRID", help="see below")
    p.add_argument("--out", required=True, metavar="DIR", help="sweep directory (resumable)")
    p.add_argument("--stepflow", default="default", metavar="CONFIG.json|default",
                   help="the config the grid varies (default: StepFlowConfig.default_for the model)")
    p.add_argument("--with-controls", action="store_true",
                   help="also run random-attn and random-residual with the chosen config on the test split")
    p.add_argument("--control-seed", type=int, default=0, metavar="S", help="seed of the controls (default 0)")
    p.add_argument("--n-boot", type=int, default=10000, metavar="N", help="bootstrap resamples (default 10000)")
    generation_options(p)
    p.set_defaults(func=cmd_sweep)
