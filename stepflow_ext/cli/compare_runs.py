"""`stepflow compare-runs`: the paired table of eval runs against a baseline."""
from __future__ import annotations

from ..eval.paired import compare_runs, print_comparison, write_comparison
from .common import RAW, UsageError, err


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
        err(f"wrote {args.out}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("compare-runs", formatter_class=RAW, help="paired table of eval runs against a baseline",
                       description="Pair eval runs by item id (items every run completed; the others are\n"
                                   "dropped and counted) and compare each with the first run, the baseline:\n"
                                   "pass@1 with its 95% bootstrap CI, the paired difference with a paired-\n"
                                   "bootstrap CI and p-value, and McNemar's exact test (first sample per item).",
                       epilog="example:\n"
                              "  stepflow compare-runs runs/base runs/sf runs/random-attn runs/random-residual "
                              "--out runs/paired.md\n")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="eval output directories; the first is the baseline")
    p.add_argument("--names", default=None, metavar="A,B,...", help="labels for the runs (default: directory names)")
    p.add_argument("--out", default=None, metavar="FILE", help="also write the comparison as .json or .md")
    p.add_argument("--n-boot", type=int, default=10000, metavar="N", help="bootstrap resamples (default 10000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.set_defaults(func=cmd_compare_runs)
