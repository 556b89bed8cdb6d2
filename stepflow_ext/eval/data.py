"""Evaluation datasets: local JSONL in the common benchmark shapes, or `hf:NAME[:split]`.

Every record becomes an `EvalItem`; a record that cannot become one becomes an `ItemError` naming the
file, line and field, and the other records still load. Recognized shapes:

  math  GSM8K      {"question", "answer": "... #### 1,234"}         -> answer "1234"
        MATH-500   {"problem", "answer"[, "solution", "unique_id"]}  (no "answer": last \\boxed{} of "solution")
        AIME       {"problem"|"question", "answer": 204 | "204"}
  mcq   GPQA       {"Question", "Correct Answer", "Incorrect Answer 1".."Incorrect Answer 3"}
                   (choices shuffled deterministically from the item id, so every run sees the same order)
        generic    {"question", "choices"|"options": [...], "answer": "C" | 2 (0-based index) | the choice text}
  code  LiveCodeBench-style {"question_content"|"prompt"|"question"|"problem",
                   "public_test_cases"|"tests"|"test_cases": [...] or the same list as a JSON string}
                   tests: {"input", "output"} (stdin/stdout; LiveCodeBench "functional" tests become asserts
                   on Solution().<func_name> from metadata), {"assert": python code}; MBPP "test_list";
                   HumanEval {"test": "def check(candidate): ...", "entry_point"}.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from typing import Any, Iterable

from .boxed import extract_boxed

TASKS = ("math", "mcq", "code")

ID_KEYS = ("id", "idx", "question_id", "unique_id", "problem_id", "task_id", "Record ID")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass
class EvalItem:
    id: str
    task: str                       # "math" | "mcq" | "code"
    question: str                   # shown to the model; for mcq without the lettered choices
    answer: str | None = None       # math: reference answer; mcq: correct letter
    choices: list[str] | None = None
    tests: list[dict] | None = None
    meta: dict = field(default_factory=dict)


@dataclass
class ItemError:
    file: str
    line: int
    field: str | None
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.field or '-'}: {self.message}"


class _FieldError(Exception):
    def __init__(self, field_name: str | None, message: str):
        super().__init__(message)
        self.field = field_name
        self.message = message


def load_items(source: str, task: str, limit: int | None = None) -> tuple[list[EvalItem], list[ItemError]]:
    """Load `source` (a .jsonl path or "hf:NAME[:split]" / "hf:NAME:CONFIG:SPLIT") as items of `task`."""
    if task not in TASKS:
        raise ValueError(f"task: unknown task {task!r}; expected one of {', '.join(TASKS)}")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
        raise ValueError(f"limit: expected a non-negative integer or None, got {limit!r}")
    if not isinstance(source, str) or not source:
        raise ValueError(f"source: expected a .jsonl path or 'hf:NAME[:split]', got {source!r}")
    if source.startswith("hf:"):
        label, records = source, _hf_records(source)
        default_id = f"{source[3:]}:{{line}}"
    else:
        if not os.path.isfile(source):
            raise ValueError(f"source: no such file {source!r}")
        label, records = source, _jsonl_records(source)
        default_id = f"{os.path.basename(source)}:{{line}}"

    items: list[EvalItem] = []
    errors: list[ItemError] = []
    seen: dict[str, int] = {}
    for line, record, parse_error in records:
        if limit is not None and len(items) >= limit:
            break
        if parse_error is not None:
            errors.append(ItemError(label, line, None, parse_error))
            continue
        try:
            item = _to_item(record, task, default_id.format(line=line))
        except _FieldError as e:
            errors.append(ItemError(label, line, e.field, e.message))
            continue
        if item.id in seen:  # runs are resumed and paired by id, so ids must be unique
            errors.append(ItemError(label, line, "id", f"duplicate id {item.id!r} (first on line {seen[item.id]})"))
            continue
        seen[item.id] = line
        items.append(item)
    return items, errors


# ---------------------------------------------------------------------------------------------- sources
def _jsonl_records(path: str) -> Iterable[tuple[int, Any, str | None]]:
    with open(path, encoding="utf-8", errors="replace") as f:
        for line_no, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                yield line_no, None, f"not valid JSON: {e.msg} (column {e.colno})"
                continue
            if not isinstance(record, dict):
                yield line_no, None, f"expected a JSON object, got {type(record).__name__}"
                continue
            yield line_no, record, None


def _hf_records(source: str) -> Iterable[tuple[int, Any, str | None]]:
    parts = source[3:].split(":")
    if len(parts) == 1:
        name, config, split = parts[0], None, "test"
    elif len(parts) == 2:
        name, config, split = parts[0], None, parts[1]
    elif len(parts) == 3:
        name, config, split = parts
    else:
        raise ValueError(f"source: expected 'hf:NAME[:split]' or 'hf:NAME:CONFIG:SPLIT', got {source!r}")
    if not name or not split:
        raise ValueError(f"source: empty dataset name or split in {source!r}")
    try:
        import datasets  # lazy: only hf: sources need it
    except ImportError as e:
        raise ValueError(f"source {source!r}: the 'datasets' package is needed for hf: sources "
                         f"(pip install datasets), or pass a local .jsonl file") from e
    try:
        dataset = datasets.load_dataset(name, config, split=split) if config else \
            datasets.load_dataset(name, split=split)
    except Exception as e:  # network, unknown name, unknown split: all reported the same way
        raise ValueError(f"source {source!r}: could not load the dataset ({type(e).__name__}: {e}); "
                         f"without a network, pass a local .jsonl file") from e
    for index, record in enumerate(dataset):
        yield index + 1, dict(record), None


# ---------------------------------------------------------------------------------------------- records
def _to_item(record: dict, task: str, default_id: str) -> EvalItem:
    item_id = default_id
    for key in ID_KEYS:
        if key in record and record[key] is not None:
            value = record[key]
            if isinstance(value, bool) or not isinstance(value, (str, int)) or str(value).strip() == "":
                raise _FieldError(key, f"expected a non-empty string or integer id, got {value!r}")
            item_id = str(value)
            break
    if task == "math":
        return _math_item(record, item_id)
    if task == "mcq":
        return _mcq_item(record, item_id)
    return _code_item(record, item_id)


def _text(record: dict, keys: tuple[str, ...], what: str) -> tuple[str, str]:
    for key in keys:
        if key in record:
            value = record[key]
            if not isinstance(value, str):
                raise _FieldError(key, f"expected a string, got {type(value).__name__}")
            if not value.strip():
                raise _FieldError(key, "is empty")
            return key, value
    raise _FieldError("/".join(keys), f"missing {what}")


def _meta(record: dict, used: set[str]) -> dict:
    return {k: v for k, v in record.items() if k not in used}


def _math_item(record: dict, item_id: str) -> EvalItem:
    q_key, question = _text(record, ("problem", "question", "Problem", "Question"), "the problem text")
    used = {q_key, *ID_KEYS}
    meta_extra: dict = {}
    for key in ("answer", "Answer", "final_answer"):
        if key in record:
            value = record[key]
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                raise _FieldError(key, f"expected a string or number, got {type(value).__name__}")
            answer = str(value).strip()
            if "####" in answer:  # GSM8K: worked solution, then "#### 1,234"
                meta_extra["reference_solution"] = answer
                answer = answer.rsplit("####", 1)[1].strip().replace(",", "").lstrip("$").strip()
            if not answer:
                raise _FieldError(key, "is empty")
            used.add(key)
            break
    else:
        if "solution" not in record:
            raise _FieldError("answer", "missing the reference answer (no 'answer' and no 'solution')")
        if not isinstance(record["solution"], str):
            raise _FieldError("solution", f"expected a string, got {type(record['solution']).__name__}")
        answer = extract_boxed(record["solution"])
        if not answer:
            raise _FieldError("solution", "no 'answer' field and no \\boxed{} answer in 'solution'")
    return EvalItem(item_id, "math", question, answer, None, None, {**_meta(record, used), **meta_extra})


def _mcq_item(record: dict, item_id: str) -> EvalItem:
    if "Correct Answer" in record:  # GPQA
        q_key, question = _text(record, ("Question", "question"), "the question text")
        _, correct = _text(record, ("Correct Answer",), "the correct answer")
        wrong_keys = [k for k in ("Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3") if k in record]
        if not wrong_keys:
            raise _FieldError("Incorrect Answer 1", "missing (GPQA records need at least one incorrect answer)")
        wrong = [_text(record, (k,), "an incorrect answer")[1] for k in wrong_keys]
        choices = [correct.strip(), *(w.strip() for w in wrong)]
        # Deterministic per-item order: same id -> same shuffle in every run and on every rank.
        seed = int.from_bytes(hashlib.sha256(item_id.encode()).digest()[:8], "big")
        order = list(range(len(choices)))
        random.Random(seed).shuffle(order)
        shuffled = [choices[i] for i in order]
        answer = LETTERS[order.index(0)]
        used = {q_key, "Correct Answer", *wrong_keys, *ID_KEYS}
        return EvalItem(item_id, "mcq", question, answer, shuffled, None, _meta(record, used))

    q_key, question = _text(record, ("question", "Question", "problem"), "the question text")
    c_key = next((k for k in ("choices", "options") if k in record), None)
    if c_key is None:
        raise _FieldError("choices", "missing (expected a list of answer options)")
    choices = record[c_key]
    if isinstance(choices, dict):  # {"A": "...", "B": "..."}
        if not all(isinstance(k, str) and len(k) == 1 and k.upper() in LETTERS for k in choices):
            raise _FieldError(c_key, "a dict of choices needs single-letter keys")
        keys = sorted(choices, key=str.upper)
        if [k.upper() for k in keys] != list(LETTERS[:len(keys)]):
            raise _FieldError(c_key, f"choice letters must be A.. without gaps, got {keys}")
        choices = [choices[k] for k in keys]
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        raise _FieldError(c_key, "expected a list of strings")
    if not 2 <= len(choices) <= len(LETTERS):
        raise _FieldError(c_key, f"expected 2..26 choices, got {len(choices)}")
    if "answer" not in record:
        raise _FieldError("answer", "missing the correct letter")
    raw = record["answer"]
    if isinstance(raw, bool):
        raise _FieldError("answer", f"expected a letter or a 0-based index, got {raw!r}")
    if isinstance(raw, int):
        if not 0 <= raw < len(choices):
            raise _FieldError("answer", f"index {raw} out of range for {len(choices)} choices")
        answer = LETTERS[raw]
    elif isinstance(raw, str):
        letter = raw.strip().strip("()").strip().upper()
        if len(letter) == 1 and letter in LETTERS[:len(choices)]:
            answer = letter
        elif raw.strip() in [c.strip() for c in choices]:
            answer = LETTERS[[c.strip() for c in choices].index(raw.strip())]
        else:
            raise _FieldError("answer", f"{raw!r} is not one of the letters A..{LETTERS[len(choices) - 1]} "
                                        f"nor the text of a choice")
    else:
        raise _FieldError("answer", f"expected a letter or a 0-based index, got {type(raw).__name__}")
    used = {q_key, c_key, "answer", *ID_KEYS}
    return EvalItem(item_id, "mcq", question, answer, list(choices), None, _meta(record, used))


def _code_item(record: dict, item_id: str) -> EvalItem:
    q_key, question = _text(record, ("question_content", "prompt", "question", "problem", "text"),
                            "the problem statement")
    used = {q_key, *ID_KEYS}
    tests: list[dict] = []
    t_key = next((k for k in ("public_test_cases", "tests", "test_cases") if k in record), None)
    func_name = _func_name(record.get("metadata"))
    if t_key is not None:
        raw = record[t_key]
        if isinstance(raw, str):
            try:
                raw = json.loads(raw)
            except json.JSONDecodeError as e:
                raise _FieldError(t_key, f"a string of tests must be a JSON list ({e.msg})") from None
        if not isinstance(raw, list):
            raise _FieldError(t_key, f"expected a list of tests, got {type(raw).__name__}")
        tests.extend(_test(t, f"{t_key}[{i}]", func_name) for i, t in enumerate(raw))
        used.add(t_key)
    if "test_list" in record:  # MBPP
        raw = record["test_list"]
        if not isinstance(raw, list) or not all(isinstance(t, str) for t in raw):
            raise _FieldError("test_list", "expected a list of assert statements (strings)")
        tests.extend({"assert": t} for t in raw)
        used.add("test_list")
    if "test" in record and "entry_point" in record:  # HumanEval
        test, entry = record["test"], record["entry_point"]
        if not isinstance(test, str) or not isinstance(entry, str) or not entry.isidentifier():
            raise _FieldError("test", "HumanEval records need string 'test' and an identifier 'entry_point'")
        tests.append({"assert": f"{test}\ncheck({entry})"})
        used |= {"test", "entry_point"}
    if not tests:
        raise _FieldError("tests", "missing or empty: a code item needs at least one test")
    return EvalItem(item_id, "code", question, None, None, tests, _meta(record, used))


def _func_name(metadata: Any) -> str | None:
    if isinstance(metadata, str):
        try:
            metadata = json.loads(metadata)
        except json.JSONDecodeError:
            return None
    name = metadata.get("func_name") if isinstance(metadata, dict) else None
    return name if isinstance(name, str) and name.isidentifier() else None


def _test(test: Any, where: str, func_name: str | None) -> dict:
    if not isinstance(test, dict):
        raise _FieldError(where, f"expected an object, got {type(test).__name__}")
    if "assert" in test:
        if not isinstance(test["assert"], str) or not test["assert"].strip():
            raise _FieldError(f"{where}.assert", "expected a non-empty string of Python code")
        out = {"assert": test["assert"]}
        if "entry_point" in test:
            if not isinstance(test["entry_point"], str) or not test["entry_point"].isidentifier():
                raise _FieldError(f"{where}.entry_point", "expected a Python identifier")
            out["entry_point"] = test["entry_point"]
        return out
    for key in ("input", "output"):
        if key not in test:
            raise _FieldError(f"{where}.{key}", "missing (a test is {input, output} or {assert})")
        if not isinstance(test[key], str):
            raise _FieldError(f"{where}.{key}", f"expected a string, got {type(test[key]).__name__}")
    if test.get("testtype") == "functional":  # LiveCodeBench: one JSON value per input line
        if func_name is None:
            raise _FieldError(f"{where}.testtype", "functional test without metadata.func_name")
        try:
            args = [json.loads(a) for a in test["input"].split("\n") if a.strip()]
            expected = json.loads(test["output"])
        except json.JSONDecodeError as e:
            raise _FieldError(where, f"functional test input/output must be JSON values ({e.msg})") from None
        return {"assert": f"assert Solution().{func_name}(*{args!r}) == {expected!r}"}
    return {"input": test["input"], "output": test["output"]}
