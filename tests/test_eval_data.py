"""load_items: benchmark shapes, per-line errors, unknown tasks, hf: sources."""
from __future__ import annotations

import builtins
import json
import os

import pytest

from stepflow_ext.eval import EvalItem, ItemError, load_items

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "eval")


def fixture(name: str) -> str:
    return os.path.join(FIXTURES, name)


def write_jsonl(path, rows) -> str:
    with open(path, "w") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


def test_gsm8k_answers_are_the_number_after_hashes():
    items, errors = load_items(fixture("gsm8k.jsonl"), "math")
    assert errors == []
    assert [i.answer for i in items] == ["7", "300", "12000", "4.5", "6"]
    assert items[0].id == "gsm8k.jsonl:1" and items[0].task == "math"
    assert items[0].question.startswith("Tom has 3 apples")
    assert "<<3+4=7>>" in items[0].meta["reference_solution"]


def test_math500_uses_unique_id_and_falls_back_to_boxed_solution():
    items, errors = load_items(fixture("math500.jsonl"), "math")
    assert errors == []
    assert items[0].id == "test/precalculus/1.json"
    assert items[0].answer == "\\frac{\\sqrt{3}}{2}"
    assert items[0].meta["subject"] == "Precalculus" and "unique_id" not in items[0].meta
    assert items[-1].answer == "1024"  # no "answer" field: last \boxed{} of the solution


def test_aime_integer_answers_become_strings():
    items, errors = load_items(fixture("aime.jsonl"), "math")
    assert errors == []
    assert [(i.id, i.answer) for i in items] == [("2024-I-1", "24"), ("2024-I-2", "9"), ("2024-II-3", "1001")]


def test_gpqa_choices_are_shuffled_deterministically_and_answer_follows():
    items, errors = load_items(fixture("gpqa.jsonl"), "mcq")
    assert errors == []
    again, _ = load_items(fixture("gpqa.jsonl"), "mcq")
    assert [i.choices for i in items] == [i.choices for i in again]
    letters = "ABCD"
    correct_texts = ["Photon", "Na", "Mitochondrion"]
    for item, text in zip(items[:3], correct_texts):
        assert sorted(item.choices) == sorted(set(item.choices)) and len(item.choices) == 4
        assert item.choices[letters.index(item.answer)] == text
        assert "Photon" not in item.question  # the choices are not in the question text
    # Pinned: a change to the shuffle would silently change every GPQA run's prompts.
    assert [i.answer for i in items[:3]] == ["C", "B", "B"]
    assert items[0].choices == ["Gluon", "W boson", "Photon", "Graviton"]
    assert (items[3].id, items[3].answer, items[3].choices) == ("g4", "B", ["3", "4", "5", "22"])
    assert items[4].answer == "C"  # 0-based index 2


def test_code_tests_from_json_strings_lists_and_functional():
    items, errors = load_items(fixture("code.jsonl"), "code")
    assert errors == []
    by_id = {i.id: i for i in items}
    assert by_id["c1"].tests == [{"input": "1 2\n", "output": "3\n"}, {"input": "10 -4\n", "output": "6\n"}]
    assert by_id["c2"].tests[0]["output"] == "c\nb\na\n"
    assert by_id["c3"].tests == [{"assert": "assert Solution().twoSum(*[[2, 7, 11, 15], 9]) == [0, 1]"}]
    assert by_id["c4"].tests == [{"assert": "assert square(3) == 9"}, {"assert": "assert square(-2) == 4"}]
    assert by_id["c1"].meta["platform"] == "atcoder" and "public_test_cases" not in by_id["c1"].meta


def test_bad_lines_are_reported_with_file_line_and_field_and_the_rest_loads():
    path = fixture("bad.jsonl")
    items, errors = load_items(path, "math")
    assert [i.question for i in items] == ["Good item one: 1 + 1?", "Good item two: 2 + 3?"]
    assert [i.answer for i in items] == ["2", "5"]
    by_line = {e.line: e for e in errors}
    assert sorted(by_line) == [2, 3, 4, 6, 7, 8]  # line 5 is blank: skipped, not an error
    assert all(e.file == path for e in errors)
    assert "not valid JSON" in by_line[2].message and by_line[2].field is None
    assert "problem" in by_line[3].field and "missing" in by_line[3].message
    assert by_line[4].field == "question" and "expected a string, got int" in by_line[4].message
    assert "JSON object" in by_line[6].message
    assert by_line[7].field == "answer" and "list" in by_line[7].message
    assert str(by_line[4]) == f"{path}:4: question: expected a string, got int"


@pytest.mark.parametrize("row, field, words", [
    ({"question": "q?", "choices": ["a", "b"], "answer": "E"}, "answer", "not one of the letters"),
    ({"question": "q?", "choices": ["a", "b"], "answer": 5}, "answer", "out of range"),
    ({"question": "q?", "choices": "ab", "answer": "A"}, "choices", "list of strings"),
    ({"question": "q?", "choices": ["only"], "answer": "A"}, "choices", "2..26"),
    ({"question": "q?", "answer": "A"}, "choices", "missing"),
    ({"Question": "q?", "Correct Answer": "x"}, "Incorrect Answer 1", "missing"),
])
def test_mcq_field_errors(tmp_path, row, field, words):
    items, errors = load_items(write_jsonl(tmp_path / "m.jsonl", [row]), "mcq")
    assert items == [] and len(errors) == 1
    assert errors[0].field == field and words in errors[0].message and errors[0].line == 1


@pytest.mark.parametrize("row, field, words", [
    ({"question": "q"}, "tests", "missing"),
    ({"question": "q", "tests": []}, "tests", "missing or empty"),
    ({"question": "q", "tests": "not json"}, "tests", "JSON list"),
    ({"question": "q", "tests": [{"input": "1"}]}, "tests[0].output", "missing"),
    ({"question": "q", "tests": [{"input": 1, "output": "1"}]}, "tests[0].input", "expected a string"),
    ({"question": "q", "tests": [5]}, "tests[0]", "expected an object"),
    ({"question": "q", "tests": [{"input": "[1]", "output": "1", "testtype": "functional"}]},
     "tests[0].testtype", "func_name"),
])
def test_code_field_errors(tmp_path, row, field, words):
    items, errors = load_items(write_jsonl(tmp_path / "c.jsonl", [row]), "code")
    assert items == [] and len(errors) == 1
    assert errors[0].field == field and words in errors[0].message


def test_duplicate_ids_are_errors_not_silent_overwrites(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"id": 1, "question": "a", "answer": "1"},
                                              {"id": "1", "question": "b", "answer": "2"}])
    items, errors = load_items(path, "math")
    assert [i.question for i in items] == ["a"]
    assert errors[0].line == 2 and errors[0].field == "id" and "first on line 1" in errors[0].message


def test_unknown_task_and_bad_arguments_raise():
    with pytest.raises(ValueError, match="task: unknown task 'essay'"):
        load_items(fixture("gsm8k.jsonl"), "essay")
    with pytest.raises(ValueError, match="no such file"):
        load_items(fixture("missing.jsonl"), "math")
    with pytest.raises(ValueError, match="limit"):
        load_items(fixture("gsm8k.jsonl"), "math", limit=-1)


def test_empty_file_gives_no_items_and_no_errors(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    assert load_items(str(path), "code") == ([], [])
    path.write_text("\n  \n")
    assert load_items(str(path), "mcq") == ([], [])


def test_limit_counts_loaded_items():
    items, _ = load_items(fixture("gsm8k.jsonl"), "math", limit=2)
    assert [i.answer for i in items] == ["7", "300"]
    items, errors = load_items(fixture("bad.jsonl"), "math", limit=1)
    assert len(items) == 1 and errors == []  # stops before the bad lines


def test_hf_source_without_datasets_is_a_clear_error(monkeypatch):
    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("No module named 'datasets'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(ValueError, match="'datasets' package is needed"):
        load_items("hf:openai/gsm8k:test", "math")


def test_hf_source_reads_records_through_datasets(monkeypatch):
    import sys
    import types

    calls = []

    def load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        if name == "offline/none":
            raise ConnectionError("no network")
        return [{"question": "1+1?", "answer": "#### 2"}, {"question": 3, "answer": "#### 3"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    items, errors = load_items("hf:openai/gsm8k:main:test", "math")
    assert calls == [("openai/gsm8k", "main", "test")]
    assert [(i.id, i.answer) for i in items] == [("openai/gsm8k:main:test:1", "2")]
    assert [(e.file, e.line, e.field) for e in errors] == [("hf:openai/gsm8k:main:test", 2, "question")]
    load_items("hf:some/set", "math")
    assert calls[-1] == ("some/set", None, "test")
    with pytest.raises(ValueError, match="could not load the dataset.*no network"):
        load_items("hf:offline/none:train", "math")
    with pytest.raises(ValueError, match="hf:NAME"):
        load_items("hf:a:b:c:d", "math")


def test_item_error_str_without_field():
    assert str(ItemError("f.jsonl", 3, None, "not valid JSON")) == "f.jsonl:3: -: not valid JSON"
    assert isinstance(EvalItem("x", "math", "q", "1"), EvalItem)
