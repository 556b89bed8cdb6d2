"""Evaluation datasets: local JSONL in the common benchmark shapes, or `hf:NAME[:split]`."""
from __future__ import annotations

from dataclasses import dataclass, field

TASKS = ("math", "mcq", "code")


@dataclass
class EvalItem:
    id: str
    task: str
    question: str
    answer: str | None = None
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
        where = f"{self.file}:{self.line}"
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"


def load_items(source: str, task: str, limit: int | None = None) -> tuple[list[EvalItem], list[ItemError]]:
    raise NotImplementedError("load_items: being written by eval-core")
