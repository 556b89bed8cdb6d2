"""Reasoning traces on disk: the JSONL formats the `stepflow` command line reads and writes.

One JSON object per line; blank lines are skipped. The first of these field sets present wins:

1. ``{"input_ids": [...], "prompt_len": P}`` - token ids as the model saw them; the first P
   are the prompt (segment 0, the question), the rest were generated.
2. ``{"prompt": ..., "completion": "..."}`` - ``prompt`` is the exact prompt text (no chat
   template is applied; a leading BOS is added by the tokenizer unless the text starts with
   it), or a list of chat messages ``[{"role": ..., "content": ...}]`` that gets the chat
   template with the generation prompt. ``completion`` is the generated text.
3. ``{"question": "...", "thinking": "...", "summary": "..."}`` - the prompt is the chat
   template applied to the question (its plain text when the tokenizer has no template or
   ``chat_template=False``), followed by ``think_start`` ("<think>\\n") unless it already ends
   with it. The completion is ``thinking + "\\n" + think_end + "\\n\\n" + summary``, the layout
   DeepSeek-R1 and Qwen3 write (the newlines are left out where the text already has them).

Texts are tokenized prompt and completion apart (as generation produces them) and the ids are
concatenated. Records written by ``stepflow generate`` carry ``input_ids`` and ``prompt_len``
(format 1), so they read back exactly as generated; they also keep ``question``, ``prompt``,
``completion``, ``text``, ``segments`` ({"kinds", "lengths"}), ``stepflow`` (the config or
null), ``model`` and ``generation``. Any other fields (e.g. ``id``) are kept and passed on.

A malformed line raises no exception here: `read_traces` returns it as a `TraceError` naming
the file, the line and the field, and goes on with the other lines.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os

FORMATS = ("input_ids", "prompt", "question")


@dataclasses.dataclass
class TraceError:
    """What went wrong with one trace: `file:line: field: message`."""

    file: str
    line: int
    field: str
    message: str

    def __str__(self):
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"


class BadField(ValueError):
    def __init__(self, field, message):
        super().__init__(message)
        self.field = field


@dataclasses.dataclass
class Trace:
    """One trace ready for the model: ids, prompt length and where it came from."""

    input_ids: list
    prompt_len: int
    file: str
    line: int
    record: dict
    format: str

    @property
    def source(self) -> str:
        return f"{self.file}:{self.line}"

    @property
    def name(self) -> str:
        """A file-name-safe label: the record's id if it has a simple one, else the line number."""
        rid = self.record.get("id")
        if isinstance(rid, (str, int)) and not isinstance(rid, bool):
            safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(rid))[:40]
            if safe:
                return f"line{self.line:04d}-{safe}"
        return f"line{self.line:04d}"

    @property
    def text_field(self) -> str:
        """The field that holds the generated part (named in errors about it)."""
        return {"input_ids": "input_ids", "prompt": "completion", "question": "summary"}[self.format]

    def error(self, message, field=None) -> TraceError:
        return TraceError(self.file, self.line, field or self.text_field, message)


def _text(record, field, allow_empty=False):
    value = record.get(field)
    if not isinstance(value, str):
        raise BadField(field, f"must be a string, got {type(value).__name__}" if field in record else "is missing")
    if not allow_empty and not value:
        raise BadField(field, "is empty")
    return value


def _messages(field, value):
    if not value or not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                            for m in value):
        raise BadField(field, "a list of chat messages must hold {\"role\": str, \"content\": str} objects")
    return value


def apply_template(tokenizer, messages, use_template=True) -> tuple[str, bool]:
    """(prompt text, templated?): the chat template with the generation prompt, when there is one."""
    if use_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), True
    return "\n".join(m["content"] for m in messages), False


def encode_prompt(tokenizer, text: str, templated: bool) -> list:
    """Prompt ids: a chat template already wrote the special tokens; plain text gets the tokenizer's (BOS)."""
    bos = getattr(tokenizer, "bos_token", None)
    special = not templated and not (bos and text.startswith(bos))
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def encode_completion(tokenizer, text: str) -> list:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def eos_ids(model, tokenizer) -> set:
    """The ids that end a generation: the model's generation config's and config's eos_token_id
    (an int or a list) and the tokenizer's."""
    ids = set()
    for source in (getattr(model, "generation_config", None), model.config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _ids(record, vocab_size):
    ids = record.get("input_ids")
    if not isinstance(ids, list) or not ids:
        raise BadField("input_ids", "must be a non-empty list of token ids")
    for pos, t in enumerate(ids):
        if isinstance(t, bool) or not isinstance(t, int):
            raise BadField("input_ids", f"position {pos} holds {t!r}, not an int")
        if t < 0 or (vocab_size is not None and t >= vocab_size):
            raise BadField("input_ids", f"position {pos} holds {t}, outside the vocabulary [0, {vocab_size})")
    if "prompt_len" not in record:
        raise BadField("prompt_len", "is missing (the number of prompt tokens at the start of input_ids)")
    p = record["prompt_len"]
    if isinstance(p, bool) or not isinstance(p, int) or not 1 <= p < len(ids):
        raise BadField("prompt_len", f"must be an int in [1, {len(ids) - 1}] (at least one prompt and one "
                                     f"generated token), got {p!r}")
    return list(ids), p


def trace_from_record(record, tokenizer, file="<record>", line=0, chat_template=True, think_start="<think>\n",
                      think_end="</think>", vocab_size=None) -> Trace:
    """A Trace from one JSON object (see the module docstring); raises BadField."""
    if not isinstance(record, dict):
        raise BadField("", f"each line must be a JSON object, got {type(record).__name__}")
    if "input_ids" in record:
        ids, p = _ids(record, vocab_size)
        return Trace(ids, p, file, line, record, "input_ids")
    if tokenizer is None:
        raise BadField("input_ids", "text traces need a tokenizer")
    if "prompt" in record:
        prompt = record["prompt"]
        if isinstance(prompt, list):
            text, templated = apply_template(tokenizer, _messages("prompt", prompt), True)
        elif isinstance(prompt, str) and prompt:
            text, templated = prompt, False
        else:
            raise BadField("prompt", "must be a non-empty string or a list of chat messages")
        prompt_ids = encode_prompt(tokenizer, text, templated)
        completion_ids = encode_completion(tokenizer, _text(record, "completion"))
        fmt = "prompt"
    elif "question" in record:
        question = record["question"]
        messages = _messages("question", question) if isinstance(question, list) else \
            [{"role": "user", "content": _text(record, "question")}]
        text, templated = apply_template(tokenizer, messages, chat_template)
        if think_start and not text.rstrip().endswith(think_start.strip()):
            text += think_start
        prompt_ids = encode_prompt(tokenizer, text, templated)
        thinking = _text(record, "thinking")
        summary = _text(record, "summary", allow_empty=True)
        if thinking.startswith(think_start):
            thinking = thinking[len(think_start):]
        elif think_start.strip() and thinking.lstrip().startswith(think_start.strip()):
            thinking = thinking.lstrip()[len(think_start.strip()):]
        if think_end in thinking:
            raise BadField("thinking", f"contains the end-of-thinking marker {think_end!r}; put what follows it "
                                       "in 'summary'")
        completion = thinking + ("" if thinking.endswith("\n") else "\n") + think_end
        completion += ("" if summary[:1].isspace() or not summary else "\n\n") + summary
        completion_ids = encode_completion(tokenizer, completion)
        fmt = "question"
    else:
        raise BadField("input_ids|prompt|question", "no trace fields: expected {\"input_ids\", \"prompt_len\"}, "
                                                    "{\"prompt\", \"completion\"} or {\"question\", \"thinking\", "
                                                    "\"summary\"}")
    if not prompt_ids:
        raise BadField("prompt" if fmt == "prompt" else "question", "tokenizes to no tokens")
    if not completion_ids:
        raise BadField("completion", "tokenizes to no tokens")
    return Trace(prompt_ids + completion_ids, len(prompt_ids), file, line, record, fmt)


def read_traces(path, tokenizer=None, **options) -> tuple[list[Trace], list[TraceError]]:
    """All traces of a JSONL file and the errors of its malformed lines (the others still load).

    options: chat_template, think_start, think_end, vocab_size (see trace_from_record).
    A missing or unreadable file raises OSError.
    """
    path = str(path)
    traces, errors = [], []
    with open(path, encoding="utf-8") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except json.JSONDecodeError as e:
                errors.append(TraceError(path, number, "", f"not valid JSON: {e.msg} (column {e.colno})"))
                continue
            try:
                traces.append(trace_from_record(record, tokenizer, path, number, **options))
            except BadField as e:
                errors.append(TraceError(path, number, e.field, str(e)))
    return traces, errors


def read_prompts(path) -> tuple[list[dict], list[TraceError]]:
    """Prompts for `stepflow generate`: a .jsonl/.json file with one object per line holding
    "prompt" or "question" (a string or chat messages; other fields are passed on), or any other
    file with one prompt per line (a backslash-n in the line stands for a newline)."""
    path = str(path)
    prompts, errors = [], []
    as_json = path.endswith((".jsonl", ".json"))
    with open(path, encoding="utf-8") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            if not as_json:
                prompts.append({"question": raw.rstrip("\n").replace("\\n", "\n"), "_line": number})
                continue
            try:
                record = json.loads(raw)
            except json.JSONDecodeError as e:
                errors.append(TraceError(path, number, "", f"not valid JSON: {e.msg} (column {e.colno})"))
                continue
            if not isinstance(record, dict):
                errors.append(TraceError(path, number, "", "each line must be a JSON object"))
                continue
            field = "prompt" if "prompt" in record else "question"
            value = record.get(field)
            ok = (isinstance(value, str) and value) or (isinstance(value, list) and value and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in value))
            if not ok:
                errors.append(TraceError(path, number, field, "must be a non-empty string or a list of chat "
                                         "messages" if field in record else "is missing (\"prompt\" or \"question\")"))
                continue
            prompts.append(dict(record, _line=number))
    return prompts, errors


def jsonable(x):
    """Plain JSON values: NaN and infinities become null (JSON has no NaN), tuples lists, tensors lists."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if hasattr(x, "tolist"):
        return jsonable(x.tolist())
    if isinstance(x, (str, int, bool)) or x is None:
        return x
    return str(x)


def write_json(path, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(jsonable(obj), f, indent=2, allow_nan=False)
        f.write("\n")


class TraceWriter:
    """Append records to a JSONL file, one flushed line each (a crash keeps what was written)."""

    def __init__(self, path):
        os.makedirs(os.path.dirname(os.path.abspath(str(path))), exist_ok=True)
        self.f = open(path, "w", encoding="utf-8")

    def write(self, record: dict) -> None:
        self.f.write(json.dumps(jsonable(record), ensure_ascii=False, allow_nan=False) + "\n")
        self.f.flush()

    def close(self):
        self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
