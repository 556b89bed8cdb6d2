"""Evaluation harness: datasets, grading, sandboxed code tests and paired statistics.

  data:    EvalItem, ItemError, TASKS, load_items
  grade:   Verdict, grade, math_equal, extract_boxed, extract_choice, extract_code, summary_of
  sandbox: SandboxResult, run_tests
  stats:   accuracy, bootstrap_ci, mcnemar_exact, paired_bootstrap
"""
from .data import TASKS, EvalItem, ItemError, load_items
from .grade import Verdict, extract_boxed, extract_choice, extract_code, grade, math_equal, summary_of
from .sandbox import SandboxResult, run_tests
from .stats import accuracy, bootstrap_ci, mcnemar_exact, paired_bootstrap

__all__ = [
    "TASKS", "EvalItem", "ItemError", "load_items",
    "Verdict", "grade", "math_equal", "extract_boxed", "extract_choice", "extract_code", "summary_of",
    "SandboxResult", "run_tests",
    "accuracy", "bootstrap_ci", "mcnemar_exact", "paired_bootstrap",
]
