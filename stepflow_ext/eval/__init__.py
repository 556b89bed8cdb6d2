"""Evaluation harness: datasets, grading, sandboxed code tests and paired statistics.

Public names (see docs/method.md for how they are used by `stepflow eval`):
  data:    EvalItem, ItemError, TASKS, load_items
  grade:   Verdict, grade, extract_boxed, extract_choice, extract_code, summary_of
  sandbox: SandboxResult, run_tests
  stats:   accuracy, bootstrap_ci, mcnemar_exact, paired_bootstrap
"""
from .data import TASKS, EvalItem, ItemError, load_items

__all__ = ["TASKS", "EvalItem", "ItemError", "load_items"]
