"""\\boxed{} answers in model output and reference solutions.

Below both `data` (a MATH record without an "answer" field takes the last \\boxed{} of its solution)
and `grade` (the math grader reads the last \\boxed{} of the summary), so neither imports the other
for it.
"""
from __future__ import annotations

import re

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*")


def boxed_spans(text: str) -> list[tuple[int, str]]:
    """All \\boxed{...} / \\fbox{...} / "\\boxed 5" contents with their start offsets; braces may nest."""
    found = []
    for m in _BOXED.finditer(text):
        i = m.end()
        if i < len(text) and text[i] == "{":
            depth, j = 0, i
            while j < len(text):
                if text[j] == "{" and text[j - 1] != "\\":
                    depth += 1
                elif text[j] == "}" and text[j - 1] != "\\":
                    depth -= 1
                    if depth == 0:
                        break
                j += 1
            if depth == 0:  # an unclosed brace (truncated output) is no answer
                found.append((m.start(), text[i + 1:j]))
        elif m.group().endswith((" ", "\t")):  # "\boxed 5": up to whitespace or "$"
            word = re.match(r"[^\s$]+", text[i:])
            if word:
                found.append((m.start(), word.group()))
    return found


def extract_boxed(text: str) -> str | None:
    """Content of the last \\boxed{} in `text` (nested braces kept), or None."""
    spans = boxed_spans(text)
    return spans[-1][1].strip() if spans else None
