"""Grading of one completion against one item.

math  math-verify on the LAST \\boxed{} of the summary (the text after the last "</think>", else all of it).
mcq   letter extraction that prefers explicit forms ("Answer: C", "the answer is (C)", "\\boxed{C}") over a
      lone letter at the end, never takes a letter inside a word, and only accepts letters of existing choices.
code  the last ```python block of the summary, run against the item's tests by `sandbox.run_tests`.

math-verify runs in a helper process with a time limit (see `math_equal`), so grading is safe from any thread.
"""
from __future__ import annotations

import atexit
import json
import re
import select
import subprocess
import sys
import threading
from dataclasses import dataclass

from .boxed import boxed_spans, extract_boxed  # noqa: F401  (extract_boxed is part of this module's API)
from .data import LETTERS, TASKS, EvalItem

MATH_TIMEOUT_S = 5.0          # parse + verify of one answer, seconds
MAX_ANSWER_CHARS = 1000       # longer "answers" are not worth a sympy parse (and could be adversarial)


@dataclass
class Verdict:
    correct: bool
    extracted: str | None
    detail: str = ""


def grade(item: EvalItem, completion: str, *, time_limit: float = 10.0, memory_mb: int = 512) -> Verdict:
    """Grade `completion` for `item`. time_limit/memory_mb only apply to code items (per program run)."""
    if not isinstance(item, EvalItem):
        raise ValueError(f"item: expected an EvalItem, got {type(item).__name__}")
    if not isinstance(completion, str):
        raise ValueError(f"completion: expected a string, got {type(completion).__name__}")
    if item.task not in TASKS:
        raise ValueError(f"item {item.id}: unknown task {item.task!r}")
    summary = summary_of(completion)
    if item.task == "math":
        return _grade_math(item, summary)
    if item.task == "mcq":
        return _grade_mcq(item, summary)
    return _grade_code(item, summary, time_limit, memory_mb)


def summary_of(completion: str) -> str:
    """The part after the last "</think>" (the model's final answer), or the whole text without one."""
    head, sep, tail = completion.rpartition("</think>")
    return tail if sep else completion


# ---------------------------------------------------------------------------------------------- math
def _grade_math(item: EvalItem, summary: str) -> Verdict:
    if item.answer is None:
        raise ValueError(f"item {item.id}: a math item needs a reference answer")
    extracted = extract_boxed(summary)
    if extracted is None:
        return Verdict(False, None, "no \\boxed{} answer")
    if not extracted:
        return Verdict(False, extracted, "empty \\boxed{}")
    if len(extracted) > MAX_ANSWER_CHARS:
        return Verdict(False, extracted[:MAX_ANSWER_CHARS], f"answer longer than {MAX_ANSWER_CHARS} characters")
    try:
        equal = math_equal(item.answer, extracted)
    except TimeoutError as e:
        return Verdict(False, extracted, f"math-verify: {e}")
    return Verdict(equal, extracted, "equivalent" if equal else f"not equivalent to {item.answer}")


def math_equal(reference: str, answer: str, *, timeout: float | None = None) -> bool:
    """math-verify equivalence of two LaTeX answers (the reference first: verify is not symmetric).

    Runs in a helper process (see `_MathWorker`), so it is safe from any thread and a pathological
    answer like 9^{9^{9^{9}}} costs `timeout` seconds (default MATH_TIMEOUT_S), then TimeoutError.
    If math-verify parses nothing on one side (a word answer), the texts are compared without spaces.
    """
    reply = _WORKER.ask({"ref": reference, "pred": answer}, MATH_TIMEOUT_S if timeout is None else timeout)
    if reply.get("parsed"):
        return bool(reply["equal"])
    return _squash(reference) == _squash(answer)


def _squash(s: str) -> str:
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", s)
    return re.sub(r"\s+", "", s).strip("$.").lower()


# Why a process and not math-verify's own timeouts: those use SIGALRM, which works only in the main
# thread, and the runner may grade in worker threads. With its timeouts off, an in-thread watchdog cannot
# stop sympy either: 9^{9^{9^{9}}} ends in one C-level big-integer power that no Python-level exception
# interrupts. A process can be killed. It serves requests one JSON line at a time, is started on first use,
# restarted after a timeout or crash, and exits when our end of its stdin closes.
_WORKER_SOURCE = r"""
import json, logging, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))  # a huge expression fails, not the machine
logging.disable(logging.CRITICAL)                             # its "timeout disabled" warning: we time it
from math_verify import parse, verify
sys.stdout.write("ready\n"); sys.stdout.flush()
for line in sys.stdin:
    req = json.loads(line)
    try:
        gold = parse("\\boxed{" + req["ref"] + "}", parsing_timeout=None)
        pred = parse("\\boxed{" + req["pred"] + "}", parsing_timeout=None)
        if gold and pred:
            reply = {"parsed": True, "equal": bool(verify(gold, pred, timeout_seconds=None))}
        else:
            reply = {"parsed": False}
    except (Exception, MemoryError) as e:
        reply = {"parsed": True, "equal": False, "error": type(e).__name__ + ": " + str(e)[:200]}
    sys.stdout.write(json.dumps(reply) + "\n"); sys.stdout.flush()
"""


class _MathWorker:
    START_TIMEOUT_S = 120.0  # importing sympy on a busy machine; not charged to an answer's timeout

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        atexit.register(self.close)

    def ask(self, request: dict, timeout: float) -> dict:
        with self._lock:  # one request at a time; grading threads queue here
            if self._proc is None or self._proc.poll() is not None:
                self._start()
            assert self._proc is not None and self._proc.stdin is not None
            try:
                self._proc.stdin.write(json.dumps(request) + "\n")
                self._proc.stdin.flush()
            except OSError:  # it died between requests: one fresh start, then give up
                self._start()
                self._proc.stdin.write(json.dumps(request) + "\n")
                self._proc.stdin.flush()
            line = self._readline(timeout)
            if line is None:
                self.close_locked()
                raise TimeoutError(f"no verdict within {timeout:g} s")
            return json.loads(line)

    def _start(self) -> None:
        self.close_locked()
        self._proc = subprocess.Popen([sys.executable, "-I", "-c", _WORKER_SOURCE], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        if self._readline(self.START_TIMEOUT_S) != "ready":
            self.close_locked()
            raise RuntimeError("the math-verify helper process did not start (is math-verify installed?)")

    def _readline(self, timeout: float) -> str | None:
        assert self._proc is not None and self._proc.stdout is not None
        ready, _, _ = select.select([self._proc.stdout], [], [], timeout)
        if not ready:
            return None
        line = self._proc.stdout.readline()
        return line.strip() if line else None  # "" = it died (e.g. out of memory)

    def close_locked(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            for stream in (self._proc.stdin, self._proc.stdout):
                if stream is not None:
                    stream.close()
            self._proc = None

    def close(self) -> None:
        with self._lock:
            self.close_locked()


_WORKER = _MathWorker()


# ---------------------------------------------------------------------------------------------- mcq
_LETTER_END = r"(?=\s*$|\s*[.,;:!)\]}*]|\s*\n)"
# "answer is (C)", "Answer: C", "final answer: **C**", "correct option is C)", "answer = C"
_EXPLICIT = re.compile(
    r"answer(?:\s+is)?(?:\s+(?:option|choice))?\s*(?:[:=]|is)?\s*(?:\*\*|__)?\s*[\(\[]?\s*"
    r"(?:option\s+|choice\s+)?\*?\*?([A-Z])\b(?![\w'])(?:\s*[\)\]])?(?:\*\*)?",
    re.IGNORECASE)
_OPTION = re.compile(r"\b(?:option|choice)\s*[\(\[]?([A-Z])\b(?![\w'])", re.IGNORECASE)
_LONE_LINE = re.compile(r"^\s*(?:[-*>#]+\s*)?(?:\*\*|__)?\s*[\(\[]?([A-Z])[\)\]]?\s*(?:\*\*|__)?\s*[.:]?\s*$",
                        re.MULTILINE)
_PAREN = re.compile(r"\(([A-Z])\)")
_ENGLISH_WORDS = {"A", "I"}  # "answer is A photon": the article, not choice A


def extract_choice(text: str, n_choices: int, choices: list[str] | None = None) -> str | None:
    """The chosen letter in `text`, or None. Valid letters: the first n_choices of A..Z.

    Tiers, highest first; within a tier the LAST occurrence wins:
      1. \\boxed{C} (also \\boxed{\\text{C}}, \\boxed{(C)}, \\boxed{C) ...}, or the boxed text of a choice)
         and "answer ... C" forms;
      2. "option C" / "choice C", or a line that is only the letter ("**C**", "(C)", "C.");
      3. "(C)" anywhere.
    """
    if not 1 <= n_choices <= len(LETTERS):
        raise ValueError(f"n_choices: expected 1..26, got {n_choices}")
    valid = set(LETTERS[:n_choices])
    tiers: list[list[tuple[int, str]]] = [[], [], []]

    for pos, content in boxed_spans(text):
        letter = _letter_in_box(content, valid, choices)
        if letter:
            tiers[0].append((pos, letter))
    for m in _EXPLICIT.finditer(text):
        letter = m.group(1)
        if not letter.isupper() or letter not in valid:
            continue
        after = text[m.end(1):]
        if letter in _ENGLISH_WORDS and re.match(r"\s+[a-z]", after):
            continue  # "the answer is A photon" / "answer: I think"
        tiers[0].append((m.start(1), letter))
    for m in _OPTION.finditer(text):
        if m.group(1).isupper() and m.group(1) in valid:
            tiers[1].append((m.start(1), m.group(1)))
    for m in _LONE_LINE.finditer(text):
        if m.group(1) in valid:
            tiers[1].append((m.start(1), m.group(1)))
    for m in _PAREN.finditer(text):
        if m.group(1) in valid:
            tiers[2].append((m.start(1), m.group(1)))

    for tier in tiers:
        if tier:
            return max(tier)[1]
    return None


def _letter_in_box(content: str, valid: set[str], choices: list[str] | None) -> str | None:
    inner = re.sub(r"\\(?:text|textbf|mathrm|mathbf)\s*\{([^{}]*)\}", r"\1", content).strip()
    m = re.fullmatch(r"[\(\[]?\s*([A-Za-z])\s*[\)\]]?\.?(?:[\s:)].*)?", inner, re.DOTALL)
    if m and m.group(1).upper() in valid and (len(inner) == 1 or not inner[1:2].isalpha()):
        return m.group(1).upper()
    if choices:  # \boxed{Photon}: the text of exactly one choice
        hits = [LETTERS[i] for i, c in enumerate(choices) if _squash(c) == _squash(inner)]
        if len(hits) == 1 and hits[0] in valid:
            return hits[0]
    return None


def _grade_mcq(item: EvalItem, summary: str) -> Verdict:
    if not item.choices or item.answer is None:
        raise ValueError(f"item {item.id}: an mcq item needs choices and a correct letter")
    letter = extract_choice(summary, len(item.choices), item.choices)
    if letter is None:
        return Verdict(False, None, "no answer letter found")
    correct = letter == item.answer
    return Verdict(correct, letter, "correct letter" if correct else f"expected {item.answer}")


# ---------------------------------------------------------------------------------------------- code
_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(text: str) -> str | None:
    """The last ```python (or ```py / ```python3) block; else the last fenced block without a language.

    A final block whose closing fence is missing (output cut at max_new_tokens) still counts.
    """
    blocks = [(m.group(1).lower(), m.group(2)) for m in _FENCE.finditer(text)]
    python = [code for lang, code in blocks if lang in ("python", "py", "python3")]
    if python:
        return python[-1]
    untagged = [code for lang, code in blocks if lang == ""]
    return untagged[-1] if untagged else None


def _grade_code(item: EvalItem, summary: str, time_limit: float, memory_mb: int) -> Verdict:
    from .sandbox import run_tests

    if not item.tests:
        raise ValueError(f"item {item.id}: a code item needs tests")
    program = extract_code(summary)
    if program is None or not program.strip():
        return Verdict(False, None, "no ```python code block")
    result = run_tests(program, item.tests, time_limit=time_limit, memory_mb=memory_mb)
    return Verdict(result.passed, program, f"{result.status}: {result.detail}" if result.detail else result.status)
