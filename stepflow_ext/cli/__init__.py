"""The `stepflow` command line: generate traces, analyze them with Step-Saliency, compare StepFlow.

    stepflow generate --model M --prompt "What is 12 + 7?" --out traces.jsonl
    stepflow analyze  --model M --traces traces.jsonl --out runs/analyze
    stepflow compare  --model M --traces traces.jsonl --stepflow stepflow.json --out runs/compare
    stepflow make-tiny-model DIR      # a random tiny model to try the commands offline
    stepflow eval --model M --data gsm8k.jsonl --task math --stepflow default --out runs/sf
    stepflow compare-runs runs/base runs/sf     # paired accuracy table
    stepflow sweep --model M --dev dev.jsonl --test test.jsonl --task math --grid ... --out runs/sweep

`python -m stepflow_ext.cli ...` is the same without installing the console script.
Exit status: 0 when everything ran, 1 when some traces (or prompts) failed (they are listed at
the end; the others still ran), 2 for a usage error (bad option, model or config not loadable).

Layout: `app` assembles the parser from one module per command (generate, analyze, compare,
tiny_model for make-tiny-model, eval, compare_runs, sweep, demo); `common` holds what every command
shares (errors, tables, model loading, the model and segmentation options), `common_analysis` what
analyze and compare share, `common_eval` what eval and sweep share. Nothing outside this package
imports it (README, "Where things live").
"""
from .app import build_parser, main
from .common import UsageError
from .tiny_model import make_tiny_model, tiny_traces

__all__ = ["main", "build_parser", "UsageError", "make_tiny_model", "tiny_traces"]
