"""The embedded tiny reasoner: its task family, tokenizer, packaged weights and project fit.

Nothing here trains; the model tests run the shipped weights (stepflow_ext/data/tiny_reasoner/).
"""
import json
import os
import re

import pytest
import torch

import stepflow_ext as sf
from stepflow_ext.tiny import tasks
from stepflow_ext.tiny.model import PACKAGED_DIR, generate_completions, is_correct

TASKS_DIR = os.path.join(os.path.dirname(PACKAGED_DIR), "tiny_tasks")


def _solve(question: str) -> int:
    """An independent reading of a question: evaluate the Let-chain and return the asked variable."""
    values = {}
    for name, expr in re.findall(r"Let ([a-z]) = ([^.]+)\.", question):
        parts = expr.split()
        if len(parts) == 1:
            values[name] = int(parts[0])
        else:
            prev, op, k = parts
            values[name] = values[prev] + int(k) if op == "+" else values[prev] - int(k)
    return values[re.search(r"What is ([a-z])\?", question).group(1)]


# --------------------------------------------------------------------------- task family

def test_generator_is_deterministic_and_has_the_asked_shape():
    a = tasks.generate(20, 4, seed=7)
    assert a == tasks.generate(20, 4, seed=7)
    assert a != tasks.generate(20, 4, seed=8)
    for p in a:
        assert p.num_steps == 4 and p.question.count("Let ") == 5
        assert p.answer == _solve(p.question)
        assert all(0 <= int(n) <= tasks.MAX_VALUE for n in re.findall(r"\d+", p.question + "".join(p.thinking_steps)))
        assert p.summary == f"The answer is \\boxed{{{p.answer}}}."
        # each step substitutes the previous value: "y = x op k = v op k = r", r is the next step's v
        for step, nxt in zip(p.thinking_steps, p.thinking_steps[1:]):
            assert step.split(" = ")[-1] == nxt.split(" = ")[2].split()[0]
    mixed = tasks.generate(200, (1, 6), seed=0)
    assert {p.num_steps for p in mixed} == {1, 6}


@pytest.mark.parametrize("bad", [0, 26, 2.0, True, "3"])
def test_make_problem_rejects_bad_steps(bad):
    import random
    with pytest.raises(ValueError, match="steps"):
        tasks.make_problem(random.Random(0), bad)


def test_generate_rejects_bad_count():
    with pytest.raises(ValueError, match="count"):
        tasks.generate(-1, 3, seed=0)
    with pytest.raises(ValueError, match="steps"):
        tasks.generate(2, (), seed=0)


def test_render_is_prompt_then_thinking_then_summary():
    p = tasks.generate(1, 3, seed=1)[0]
    text = tasks.render(p, eos="<|end|>")
    assert text == (f"<|user|>\n{p.question}\n<|assistant|>\n<think>\n" + "\n\n".join(p.thinking_steps)
                    + f"\n</think>\n\nThe answer is \\boxed{{{p.answer}}}.<|end|>")
    assert tasks.boxed_answer(text) == str(p.answer)
    assert tasks.boxed_answer("no box") is None
    assert is_correct("x \\boxed{3} y \\boxed{ 12 }", 12) and not is_correct("\\boxed{12}", 13)


def test_splits_are_disjoint_and_test_has_longer_chains():
    splits = tasks.build_splits(n_train=2000, n_dev=50, n_test_per_steps=5)
    questions = {name: [p.question for p, _ in items] for name, items in splits.items()}
    assert [len(q) for q in questions.values()] == [2000, 50, 50]
    for name, q in questions.items():
        assert len(set(q)) == len(q), name
    assert not set(questions["train"]) & set(questions["dev"])
    assert not (set(questions["train"]) | set(questions["dev"])) & set(questions["test"])
    assert {p.num_steps for p, _ in splits["train"]} == set(tasks.TRAIN_STEPS)
    kinds = {}
    for p, kind in splits["test"]:
        kinds.setdefault(kind, set()).add(p.num_steps)
    assert kinds == {"in_distribution": set(tasks.IN_DISTRIBUTION_STEPS), "longer": set(tasks.LONGER_STEPS)}
    assert min(tasks.LONGER_STEPS) > max(tasks.TRAIN_STEPS)


def test_packaged_splits_are_the_exported_ones(tmp_path):
    paths = tasks.export_splits(tmp_path, splits=("dev", "test"))
    assert sorted(paths) == ["dev", "test"]
    for split in ("dev", "test"):
        with open(os.path.join(TASKS_DIR, f"{split}.jsonl")) as f, open(paths[split]) as g:
            assert f.read() == g.read(), split
    with open(paths["test"]) as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 600
    assert {"id", "problem", "answer", "steps", "split_kind", "solution"} <= set(rows[0])
    assert rows[0]["answer"] == str(_solve(rows[0]["problem"]))
    assert sum(r["split_kind"] == "longer" for r in rows) == 300
    with pytest.raises(ValueError, match="unknown split"):
        tasks.export_splits(tmp_path, splits=("validation",))


# --------------------------------------------------------------------------- packaged tokenizer and model

@pytest.fixture(scope="module")
def packaged():
    with pytest.MonkeyPatch.context() as mp:  # offline: any hub access would fail here
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        return sf.load_default()


def test_weights_are_small_safetensors():
    weights = os.path.join(PACKAGED_DIR, "model.safetensors")
    assert os.path.getsize(weights) <= 20 * 1024 * 1024
    assert os.path.isfile(os.path.join(PACKAGED_DIR, "tokenizer.json"))


def test_tokenizer_has_the_markers_as_single_tokens(packaged):
    _, tok = packaged
    for text in ("\n\n", "<think>", "</think>"):
        ids = tok.encode(text, add_special_tokens=False)
        assert len(ids) == 1 and tok.decode(ids) == text, text
    assert tok.eos_token == "<|end|>" and tok.pad_token == "<|pad|>" and tok.eos_token_id != tok.pad_token_id
    assert len(tok) <= packaged[0].config.vocab_size   # no id past the embedding (AutoTokenizer adds none)
    p = tasks.generate(1, 2, seed=3)[0]
    prompt = tok.apply_chat_template([{"role": "user", "content": p.question}], add_generation_prompt=True,
                                     tokenize=False)
    assert prompt == p.prompt and prompt.endswith("<think>\n")


def test_build_tokenizer_reproduces_the_packaged_one():
    from stepflow_ext.tiny.tokenizer import build_tokenizer
    built = json.loads(build_tokenizer().backend_tokenizer.to_str())
    with open(os.path.join(PACKAGED_DIR, "tokenizer.json")) as f:
        shipped = json.load(f)
    assert built["model"] == shipped["model"] and built["added_tokens"] == shipped["added_tokens"]


@pytest.mark.parametrize("steps", [1, 4, 12])
def test_rendered_trace_segments_into_its_steps(packaged, steps):
    _, tok = packaged
    p = tasks.generate(1, steps, seed=steps)[0]
    prompt = tok(p.prompt, add_special_tokens=False)["input_ids"]
    ids = prompt + tok(p.completion, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == tasks.render(p)
    # Its steps are paragraphs without sentence ends: the paragraph rule finds them, the paper's sentence
    # rule (the default) sees one step (why the demo segments this model by paragraphs).
    seg = sf.segment(torch.tensor([ids]), len(prompt), tokenizer=tok, steps="paragraph")
    assert seg.kinds[0] == ["question"] + ["step"] * steps + ["summary"]
    assert sf.segment(torch.tensor([ids]), len(prompt), tokenizer=tok).kinds[0] == ["question", "step", "summary"]
    # the fast path with explicit ids (no think_start: the prompt is the question) agrees with the text rule
    seg = sf.segment(torch.tensor([ids]), len(prompt), tokenizer=tok, steps="paragraph", think_start=None)
    fast = sf.segment(torch.tensor([ids]), len(prompt), boundary_token_ids=[tok.convert_tokens_to_ids("\n\n")],
                      think_end_token_ids=[tok.convert_tokens_to_ids("</think>")])
    assert torch.equal(fast.seg_ids, seg.seg_ids)


def test_load_default_is_offline_and_solves_in_distribution_items(packaged):
    model, tok = packaged
    assert type(model).__name__ == "Qwen2ForCausalLM" and not model.training
    assert 1e6 <= sum(p.numel() for p in model.parameters()) <= 5e6
    with open(os.path.join(TASKS_DIR, "test.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    items = [r for r in rows if r["split_kind"] == "in_distribution" and r["steps"] in (2, 4, 6)][::60][:3]
    assert [r["steps"] for r in items] == [2, 4, 6]
    completions = generate_completions(model, tok, [r["problem"] for r in items])
    for r, c in zip(items, completions):
        assert is_correct(c, r["answer"]), (r["problem"], c)
        assert c.count("\n\n") >= r["steps"] - 1 and "</think>" in c


def test_load_default_rejects_a_missing_model(tmp_path):
    from stepflow_ext.tiny.model import load_default
    with pytest.raises(ValueError, match="config.json"):
        load_default(path=str(tmp_path))
    with pytest.raises(ValueError, match="dtype"):
        load_default(dtype="float16")


def test_step_saliency_and_stepflow_run_on_the_tiny_reasoner(packaged):
    model, tok = packaged
    p = tasks.generate(1, 4, seed=11)[0]
    prompt = tok(p.prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ids = model.generate(prompt, max_new_tokens=100, do_sample=False, pad_token_id=tok.pad_token_id)
    seg = sf.segment(ids, prompt.shape[1], tokenizer=tok, steps="paragraph")
    assert seg.kinds[0] == ["question"] + ["step"] * 4 + ["summary"]
    result = sf.step_saliency(model, ids, seg)
    layers = model.config.num_hidden_layers
    assert result.maps.shape == (1, layers, 6, 6)
    rows = result.normalized("row")[0]   # (layers, S, S): the share of each row's saliency per source
    assert torch.allclose(rows[:, 5].sum(-1), torch.ones(layers), atol=1e-4)
    assert bool((rows[:, 5, 1:5].sum(-1) > 0).all())   # the summary draws on the thinking steps
    with sf.replace_attention(model, sf.StepFlowConfig.default_for(model), tokenizer=tok, steps="paragraph") as handle:
        with torch.no_grad():
            out = model.generate(prompt, max_new_tokens=100, do_sample=False, pad_token_id=tok.pad_token_id)
        assert handle.segmentation(out).kinds[0][:2] == ["question", "step"]
    assert tok.decode(out[0, prompt.shape[1]:], skip_special_tokens=True).count("\\boxed{") == 1
