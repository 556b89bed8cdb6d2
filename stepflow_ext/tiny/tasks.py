"""The task family of the embedded tiny reasoner: variable-substitution chains.

A problem with `steps` = n defines n + 1 variables, the first a number, each next one the
previous one combined with a small operand; it asks for the last one:

    Let q = 7. Let r = q + 5. Let s = r - 9. What is s?

Its gold trajectory has one thinking step per definition, each a small computation that
substitutes the value found in the step before, then a summary with the boxed answer:

    r = q + 5 = 7 + 5 = 12

    s = r - 9 = 12 - 9 = 3
    </think>

    The answer is \\boxed{3}.

`steps` is the difficulty knob. Values stay in 0..MAX_VALUE and each step adds or subtracts
one digit, so a model of a few million parameters can learn the arithmetic exactly; what grows
with `steps` is the length of the chain to carry (and the positions the model must reach).
Variable names are consecutive letters from a random start (wrapping after z), so every
letter is seen in training whatever the chain length.

The splits (`export_splits`): train and dev hold chains of TRAIN_STEPS steps; test holds the
same range ("in_distribution") and longer chains ("longer", LONGER_STEPS) never seen in
training, where the step-to-step flow has to carry further than it learned to.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import string

MAX_VALUE = 99
TRAIN_STEPS = (1, 2, 3, 4, 5, 6)           # chain lengths of the train and dev splits
IN_DISTRIBUTION_STEPS = (2, 3, 4, 5, 6)     # the in-distribution test items
LONGER_STEPS = (8, 9, 10, 11, 12)           # the longer test chains (never trained on)
SPLIT_SEEDS = {"train": 1, "dev": 2, "test": 3}

THINK_START = "<think>\n"
THINK_END = "</think>"
STEP_DELIMITER = "\n\n"
# The prompt the packaged chat template writes for one user question (tokenizer.CHAT_TEMPLATE
# renders exactly this; a test checks it).
PROMPT_FORMAT = "<|user|>\n{question}\n<|assistant|>\n" + THINK_START

_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


@dataclasses.dataclass(frozen=True)
class Problem:
    """One chain: the question, its thinking steps, the summary and the integer answer."""

    question: str
    thinking_steps: tuple
    summary: str
    answer: int

    @property
    def num_steps(self) -> int:
        return len(self.thinking_steps)

    @property
    def prompt(self) -> str:
        return PROMPT_FORMAT.format(question=self.question)

    @property
    def completion(self) -> str:
        """What the model writes after the prompt: steps, end of thinking, summary."""
        return STEP_DELIMITER.join(self.thinking_steps) + "\n" + THINK_END + "\n\n" + self.summary


def _next_operation(rng: random.Random, value: int) -> tuple[str, int, int]:
    """A random (op, operand, result): add or subtract 1..9, the result kept in 0..MAX_VALUE."""
    ops = [op for op, ok in (("+", value < MAX_VALUE), ("-", value > 0)) if ok]
    op = rng.choice(ops)
    if op == "+":
        k = rng.randint(1, min(9, MAX_VALUE - value))
        return op, k, value + k
    k = rng.randint(1, min(9, value))
    return op, k, value - k


def make_problem(rng: random.Random, steps: int) -> Problem:
    """A chain of `steps` computations drawn from `rng` (a random.Random)."""
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= 25:
        raise ValueError(f"steps must be an integer in 1..25 (distinct letters), got {steps!r}")
    # Consecutive letters from a random start, wrapping after z: the next variable is the
    # next letter, and every letter (and every successor pair) occurs in short chains too.
    start = rng.randrange(26)
    names = [string.ascii_lowercase[(start + i) % 26] for i in range(steps + 1)]
    value = rng.randint(0, MAX_VALUE)
    clauses = [f"Let {names[0]} = {value}."]
    thinking = []
    for prev, name in zip(names, names[1:]):
        op, k, result = _next_operation(rng, value)
        clauses.append(f"Let {name} = {prev} {op} {k}.")
        thinking.append(f"{name} = {prev} {op} {k} = {value} {op} {k} = {result}")
        value = result
    question = " ".join(clauses) + f" What is {names[-1]}?"
    return Problem(question, tuple(thinking), f"The answer is \\boxed{{{value}}}.", value)


def generate(count: int, steps, seed: int) -> list[Problem]:
    """`count` problems from a fixed seed; `steps` is an int or a sequence of chain lengths
    drawn uniformly per problem. Same arguments, same problems."""
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise ValueError(f"count must be a non-negative integer, got {count!r}")
    choices = (steps,) if isinstance(steps, int) else tuple(steps)
    if not choices:
        raise ValueError("steps must be an integer or a non-empty sequence of integers")
    rng = random.Random(seed)
    return [make_problem(rng, rng.choice(choices)) for _ in range(count)]


def render(problem: Problem, eos: str = "") -> str:
    """The full trajectory text: prompt (chat template, opening the thinking) + completion."""
    return problem.prompt + problem.completion + eos


def boxed_answer(text: str):
    """The content of the last \\boxed{...} in `text`, stripped, or None."""
    found = _BOXED.findall(text)
    return found[-1].strip() if found else None


def record(problem: Problem, id: str, split_kind: str) -> dict:
    """A JSONL record in the MATH-500-like shape the eval harness reads ({"problem", "answer"});
    `solution` is the gold completion, `steps` the chain length."""
    return {"id": id, "problem": problem.question, "answer": str(problem.answer), "steps": problem.num_steps,
            "split_kind": split_kind, "solution": problem.completion}


def _take(problems, taken: set, count: int) -> list:
    """The first `count` problems whose question is not in `taken` and not repeated."""
    seen, out = set(taken), []
    if count == 0:
        return out
    for p in problems:
        if p.question not in seen:
            seen.add(p.question)
            out.append(p)
            if len(out) == count:
                return out
    raise ValueError(f"could not draw {count} distinct problems (got {len(out)})")


def build_splits(n_train: int = 40000, n_dev: int = 200, n_test_per_steps: int = 60) -> dict:
    """{"train": [...], "dev": [...], "test": [...]} of (Problem, split_kind) pairs; no question
    is in two splits (test is drawn first, then dev, then train, each skipping the ones taken).
    Test has `n_test_per_steps` items per chain length in IN_DISTRIBUTION_STEPS + LONGER_STEPS."""
    for name, n in (("n_train", n_train), ("n_dev", n_dev), ("n_test_per_steps", n_test_per_steps)):
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {n!r}")
    test = []
    for k in IN_DISTRIBUTION_STEPS + LONGER_STEPS:
        kind = "in_distribution" if k in IN_DISTRIBUTION_STEPS else "longer"
        # 2x draws then dedupe: short chains repeat now and then.
        drawn = _take(generate(2 * n_test_per_steps, k, SPLIT_SEEDS["test"] * 1000 + k), set(), n_test_per_steps)
        test += [(p, kind) for p in drawn]
    taken = {p.question for p, _ in test}
    dev = [(p, "in_distribution") for p in
           _take(generate(2 * n_dev, TRAIN_STEPS, SPLIT_SEEDS["dev"]), taken, n_dev)]
    taken |= {p.question for p, _ in dev}
    train = [(p, "train") for p in _take(generate(n_train + n_train // 4, TRAIN_STEPS, SPLIT_SEEDS["train"]),
                                         taken, n_train)]
    return {"train": train, "dev": dev, "test": test}


def export_splits(directory, n_train: int = 40000, n_dev: int = 200, n_test_per_steps: int = 60,
                  splits=("train", "dev", "test")) -> dict:
    """Writes {split}.jsonl for each of `splits` to `directory`; returns {split: path}.
    The defaults give the splits the packaged model was trained and measured on."""
    unknown = set(splits) - {"train", "dev", "test"}
    if unknown:
        raise ValueError(f"splits: unknown split(s) {sorted(unknown)}; use train, dev, test")
    os.makedirs(directory, exist_ok=True)
    paths = {}
    for split, items in build_splits(n_train if "train" in splits else 0, n_dev, n_test_per_steps).items():
        if split not in splits:
            continue
        path = os.path.join(directory, f"{split}.jsonl")
        with open(path, "w") as f:
            for i, (problem, kind) in enumerate(items):
                f.write(json.dumps(record(problem, f"{split}-{i:05d}", kind)) + "\n")
        paths[split] = path
    return paths


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m stepflow_ext.tiny.tasks", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write the train/dev/test JSONL splits of the tiny reasoner's task family.",
        epilog="example:\n  python -m stepflow_ext.tiny.tasks /tmp/tiny_tasks --splits dev test")
    parser.add_argument("directory")
    parser.add_argument("--splits", nargs="+", default=["train", "dev", "test"], choices=["train", "dev", "test"])
    parser.add_argument("--train", type=int, default=40000, help="train items (default 40000)")
    parser.add_argument("--dev", type=int, default=200, help="dev items (default 200)")
    parser.add_argument("--test-per-steps", type=int, default=60, help="test items per chain length (default 60)")
    args = parser.parse_args(argv)
    for split, path in export_splits(args.directory, args.train, args.dev, args.test_per_steps, args.splits).items():
        print(f"{split}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
