"""Prompts of `stepflow eval`: one user message per item, put through the tokenizer's chat template.

The instruction depends on the task, so that the grader (eval/grade.py) finds the answer where
the prompt asked for it:

- math: the problem, then "Please reason step by step, and put your final answer within \\boxed{}."
  (the instruction DeepSeek-R1 and Qwen use for MATH/AIME).
- mcq: the question, the choices as "A) ...", one per line, then a request for the letter in \\boxed{}.
- code: the problem, then either "write a program that reads stdin and writes stdout" (stdin/stdout
  tests) or "write the function NAME" (assert tests), the code in one ```python block.
"""
from __future__ import annotations

import string

from ..traces import apply_template

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
MCQ_INSTRUCTION = ("Please reason step by step, then answer with the letter of the correct choice "
                   "in \\boxed{{}}, e.g. \\boxed{{{example}}}.")
CODE_STDIO_INSTRUCTION = ("Write a complete Python 3 program that reads the input from standard input and "
                          "writes the answer to standard output. Put the whole program in a single "
                          "```python code block.")
CODE_FUNCTION_INSTRUCTION = ("Write a Python 3 function `{name}` that solves the problem; it will be checked "
                             "with assert statements such as:\n{example}\nPut the function (and any imports or "
                             "helpers it needs) in a single ```python code block; do not read input.")
CODE_ASSERT_INSTRUCTION = ("Write Python 3 code that solves the problem; it will be checked with assert "
                           "statements such as:\n{example}\nPut the code in a single ```python code block; "
                           "do not read input.")

LETTERS = string.ascii_uppercase


def _entry_point(item) -> str | None:
    """The function name the assert tests call, if the record names one."""
    name = (item.meta or {}).get("entry_point")
    if not name:
        name = next((t.get("entry_point") for t in item.tests or [] if isinstance(t, dict) and t.get("entry_point")),
                    None)
    return name if isinstance(name, str) and name else None


def _lettered(item) -> str:
    """The choices of a multiple-choice item as "A) ...", one per line."""
    choices = item.choices or []
    if not choices:
        raise ValueError(f"item {item.id}: a multiple-choice item needs choices")
    if len(choices) > len(LETTERS):
        raise ValueError(f"item {item.id}: {len(choices)} choices, at most {len(LETTERS)} can be lettered")
    return "\n".join(f"{LETTERS[i]}) {str(c).strip()}" for i, c in enumerate(choices))


def user_message(item, instruction: str = "default") -> str:
    """The text of the one user message for `item` (an eval.data.EvalItem). `instruction`: "default" (the
    task's own, below), "none" (nothing after the question and, for mcq, its choices) or a text of one's own."""
    question = item.question.strip()
    if instruction != "default":
        if item.task not in ("math", "mcq", "code"):
            raise ValueError(f"item {item.id}: unknown task {item.task!r} (expected math, mcq or code)")
        if item.task == "mcq":
            question = f"{question}\n\n{_lettered(item)}"
        return question if instruction == "none" else f"{question}\n\n{instruction}"
    if item.task == "math":
        return f"{question}\n\n{MATH_INSTRUCTION}"
    if item.task == "mcq":
        return f"{question}\n\n{_lettered(item)}\n\n{MCQ_INSTRUCTION.format(example=LETTERS[0])}"
    if item.task == "code":
        tests = item.tests or []
        asserts = [t["assert"] for t in tests if isinstance(t, dict) and isinstance(t.get("assert"), str)]
        stdio = [t for t in tests if isinstance(t, dict) and "input" in t]
        if asserts and not stdio:
            name = _entry_point(item)
            template = CODE_FUNCTION_INSTRUCTION if name else CODE_ASSERT_INSTRUCTION
            return f"{question}\n\n{template.format(name=name, example=asserts[0].strip())}"
        return f"{question}\n\n{CODE_STDIO_INSTRUCTION}"
    raise ValueError(f"item {item.id}: unknown task {item.task!r} (expected math, mcq or code)")


def build_prompt(tokenizer, item, use_chat_template: bool = True, instruction: str = "default") -> tuple[str, bool]:
    """(prompt text, templated?): the user message through the chat template with the generation prompt
    (plain text when the tokenizer has none or use_chat_template is False)."""
    return apply_template(tokenizer, [{"role": "user", "content": user_message(item, instruction)}],
                          use_chat_template)
