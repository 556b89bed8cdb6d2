"""The `stepflow` program: the parser, assembled from the command modules, and main().

Each command is a module of this package with `add_parser(sub)` (its options and help) and
`cmd_NAME(args)` (what it does); this module only puts them together, in the order `stepflow
--help` lists them.
"""
from __future__ import annotations

import argparse

from . import analyze, compare, compare_runs, demo, generate, sweep, tiny_model
from . import eval as eval_command
from .common import command_parser, dispatch

COMMANDS = (generate, analyze, compare, tiny_model, eval_command, compare_runs, sweep, demo)


def build_parser() -> argparse.ArgumentParser:
    return command_parser(COMMANDS, description=(
        "Step-Saliency diagnostics and StepFlow repair of reasoning traces on Hugging Face causal LMs."),
        epilog="examples:\n  stepflow make-tiny-model tiny\n"
               "  stepflow generate --model tiny --prompt 'What is 12 + 7?' --out gen.jsonl\n"
               "  stepflow analyze --model tiny --traces tiny/traces.jsonl --out runs/analyze\n"
               "  stepflow compare --model tiny --traces tiny/traces.jsonl --stepflow stepflow.json --out runs/compare\n"
               "  stepflow eval --model tiny --data gsm8k.jsonl --task math --max-new-tokens 16 --out runs/base\n"
               "  stepflow compare-runs runs/base runs/sf\n"
               "\nrun `stepflow COMMAND --help` for the options of each command.")


def main(argv=None) -> int:
    """`stepflow ARGV`: the exit status (0 all ran, 1 some traces / items failed, 2 usage error)."""
    return dispatch(build_parser(), argv)
