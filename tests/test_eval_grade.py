"""grade(): math with math-verify (cases that trip naive graders), mcq letter extraction, code blocks."""
from __future__ import annotations

import importlib
import threading
import time

import pytest

from stepflow_ext.eval import EvalItem, Verdict, extract_boxed, extract_choice, extract_code, grade, summary_of
grade_module = importlib.import_module("stepflow_ext.eval.grade")  # the package attribute `grade` is the function


def math_item(answer: str) -> EvalItem:
    return EvalItem("m", "math", "question", answer)


def mcq_item(answer: str, n: int = 4) -> EvalItem:
    return EvalItem("q", "mcq", "question", answer, [f"choice {i}" for i in range(n)])


@pytest.mark.parametrize("reference, completion", [
    ("\\frac{1}{2}", "So the answer is \\boxed{0.5}."),
    ("0.5", "\\boxed{\\frac{1}{2}}"),
    ("\\frac{1}{2}", "\\boxed{\\dfrac{1}{2}}"),
    ("1000", "\\boxed{1,000}"),
    ("12000", "\\boxed{12{,}000}"),
    ("10", "\\boxed{10\\%}"),
    ("5", "\\boxed{5 \\text{ cm}}"),
    ("\\frac{\\sqrt{3}}{2}", "\\boxed{\\frac{\\sqrt{3}}{2}}"),
    ("\\frac{\\sqrt{3}}{2}", "\\boxed{\\frac{\\sqrt3}2}"),
    ("(-2,2)", "\\boxed{(-2, 2)}"),
    ("4.5", "\\boxed{\\frac{9}{2}}"),
    ("3", "first \\boxed{4}, then corrected: \\boxed{3}"),
    ("3", "<think>maybe \\boxed{4}</think>The answer is \\boxed{3}."),
    ("x^2+1", "\\boxed{1 + x^2}"),
])
def test_math_equivalent_forms_are_correct(reference, completion):
    verdict = grade(math_item(reference), completion)
    assert verdict.correct, verdict


@pytest.mark.parametrize("reference, completion, extracted", [
    ("3", "\\boxed{3} at first, but finally \\boxed{4}", "4"),          # the LAST box counts
    ("3", "<think>\\boxed{3}</think>The answer is \\boxed{4}.", "4"),    # the reasoning's box does not count
    ("3", "<think>it is \\boxed{3}</think>So the answer is three.", None),  # no box in the summary
    ("3", "The answer is 3.", None),                                  # no box at all
    ("\\frac{1}{2}", "\\boxed{\\frac{1}{3}}", "\\frac{1}{3}"),
    ("\\pi", "\\boxed{3.14159}", "3.14159"),
])
def test_math_wrong_or_missing_answers_are_incorrect(reference, completion, extracted):
    verdict = grade(math_item(reference), completion)
    assert not verdict.correct and verdict.extracted == extracted, verdict
    if extracted is None:
        assert "no \\boxed{}" in verdict.detail


def test_extract_boxed_nested_braces_and_truncated():
    assert extract_boxed("a \\boxed{\\frac{a^{2}}{b_{1}}} b") == "\\frac{a^{2}}{b_{1}}"
    assert extract_boxed("\\boxed{1} \\boxed{\\left\\{1, 2\\right\\}}") == "\\left\\{1, 2\\right\\}"
    assert extract_boxed("\\boxed 7$") == "7"
    assert extract_boxed("\\boxed{12") is None  # cut off by max_new_tokens: no answer
    assert extract_boxed("no box") is None


def test_summary_is_text_after_last_think_close():
    assert summary_of("a</think>b</think>c") == "c"
    assert summary_of("no think tags") == "no think tags"


def test_math_grading_works_in_a_worker_thread():
    results = []
    thread = threading.Thread(target=lambda: results.append(grade(math_item("\\frac{1}{2}"), "\\boxed{0.5}")))
    thread.start()
    thread.join(timeout=120)
    assert results == [Verdict(True, "0.5", "equivalent")]


def test_pathological_answer_times_out_in_a_thread_and_grading_goes_on(monkeypatch):
    # 9^(9^(9^9)) makes sympy compute a giant power in one C call; SIGALRM could not stop it in a thread.
    monkeypatch.setattr(grade_module, "MATH_TIMEOUT_S", 1.0)
    results = []
    thread = threading.Thread(target=lambda: results.append(grade(math_item("1"), "\\boxed{9^{9^{9^{9}}}}")))
    start = time.monotonic()
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive() and time.monotonic() - start < 30
    assert not results[0].correct and "1 s" in results[0].detail
    assert grade(math_item("2"), "\\boxed{2}").correct  # the helper process restarts


@pytest.mark.parametrize("text, letter", [
    ("Answer: C", "C"),
    ("The answer is (B).", "B"),
    ("the correct answer is **D**", "D"),
    ("Final answer: \\boxed{C}", "C"),
    ("\\boxed{\\text{(B)}}", "B"),
    ("Considering everything.\n\n**D**", "D"),
    ("(A) is wrong and (B) is wrong.\nAnswer: D", "D"),          # explicit beats earlier parentheses
    ("Answer: A at first. On reflection the answer is C.", "C"),  # last explicit answer wins
    ("The answer is A photon? No. Answer: B", "B"),               # "A" as an article is not a choice
    ("I think Apple is the answer because of Ions", None),        # letters inside words
    ("I believe it.", None),
    ("Answer: E", None),                                          # only 4 choices
    ("Answer: E. Hmm, 4 choices, so Answer: B", "B"),
    ("It must be option C.", "C"),
    ("Between (A) and (C), I pick (C)", "C"),
    ("", None),
])
def test_extract_choice(text, letter):
    assert extract_choice(text, 4) == letter


def test_extract_choice_boxed_choice_text_and_bounds():
    choices = ["Photon", "Gluon", "W boson", "Graviton"]
    assert extract_choice("\\boxed{Gluon}", 4, choices) == "B"
    assert extract_choice("Answer: F", 6) == "F"
    with pytest.raises(ValueError, match="n_choices"):
        extract_choice("A", 0)


def test_mcq_grade_uses_summary_only():
    item = mcq_item("B")
    assert grade(item, "<think>Answer: A</think>Answer: B") == Verdict(True, "B", "correct letter")
    wrong = grade(item, "<think>Answer: B</think>Answer: A")
    assert not wrong.correct and wrong.extracted == "A" and "expected B" in wrong.detail
    assert grade(item, "no idea") == Verdict(False, None, "no answer letter found")


def test_extract_code_last_python_block():
    text = "```python\nprint(1)\n```\nbetter:\n```py\nprint(2)\n```\n```text\nout\n```"
    assert extract_code(text) == "print(2)\n"
    assert extract_code("```\nprint(3)\n```") == "print(3)\n"
    assert extract_code("```python\nprint(4)\n") == "print(4)\n"  # cut off: still counts
    assert extract_code("```cpp\nint main(){}\n```") is None
    assert extract_code("print(5)") is None


def test_code_grade_runs_the_sandbox():
    item = EvalItem("c", "code", "sum", None, None, [{"input": "1 2\n", "output": "3\n"}])
    good = grade(item, "<think>```python\nprint(0)\n```</think>```python\na, b = map(int, input().split())\nprint(a + b)\n```",
                 time_limit=5)
    assert good.correct and "a + b" in good.extracted and good.detail.startswith("ok")
    bad = grade(item, "```python\nprint(a)\n```", time_limit=5)
    assert not bad.correct and bad.detail.startswith("error") and "NameError" in bad.detail
    none = grade(item, "I would print the sum.")
    assert none == Verdict(False, None, "no ```python code block")


def test_grade_rejects_bad_arguments():
    with pytest.raises(ValueError, match="completion"):
        grade(math_item("1"), None)
    with pytest.raises(ValueError, match="unknown task"):
        grade(EvalItem("x", "essay", "q", "1"), "a")
    with pytest.raises(ValueError, match="reference answer"):
        grade(EvalItem("x", "math", "q", None), "\\boxed{1}")
