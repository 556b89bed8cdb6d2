"""`stepflow eval --engine vllm` against `--engine hf` on the embedded tiny reasoner's test split, under
StepFlow's default config: the same per-item correctness, tokens/s of both engines from the same run,
and the paired comparison of the two runs. Runs in .venv-vllm (`make test-vllm`)."""
from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
pytest.importorskip("vllm")

from stepflow_ext import cli  # noqa: E402
from stepflow_ext.demo import default_data, write_subset  # noqa: E402
from stepflow_ext.tiny.model import PACKAGED_DIR  # noqa: E402

pytestmark = pytest.mark.vllm


def _summary(run_dir):
    with open(os.path.join(run_dir, "summary.json")) as f:
        return json.load(f)


def test_eval_engine_vllm_reproduces_hf(tmp_path, capsys):
    data = str(tmp_path / "test.jsonl")
    items = write_subset(default_data()[1], data, per_group=4, limit=24)   # stratified by chain length
    common = ["eval", "--model", PACKAGED_DIR, "--data", data, "--task", "math", "--instruction", "none",
              "--steps", "paragraph", "--dtype", "float32", "--max-new-tokens", "96", "--stepflow", "default",
              "--no-progress", "--device", "cpu"]
    hf_dir, vllm_dir = str(tmp_path / "hf"), str(tmp_path / "vllm")
    assert cli.main([*common, "--batch-size", "8", "--out", hf_dir]) == 0
    assert cli.main([*common, "--batch-size", "24", "--engine", "vllm", "--out", vllm_dir]) == 0
    hf, vl = _summary(hf_dir), _summary(vllm_dir)
    assert vl["settings"]["engine"] == "vllm" and hf["settings"]["engine"] == "hf"
    assert set(hf["per_item"]) == set(vl["per_item"]) and len(hf["per_item"]) == len(items)
    assert hf["per_item"] == vl["per_item"], "per-item correctness differs between the engines"
    rows = {}
    for name, d in (("hf", hf_dir), ("vllm", vllm_dir)):
        with open(os.path.join(d, "rows.jsonl")) as f:
            rows[name] = {(r["item_id"], r["sample"]): r["completion"] for r in map(json.loads, f)}
    same = sum(rows["hf"][k] == rows["vllm"][k] for k in rows["hf"])
    assert same == len(rows["hf"]), f"{len(rows['hf']) - same} completions differ"
    speed = {name: s["run"]["tokens_per_s"] for name, s in (("hf", hf), ("vllm", vl))}
    assert all(v and v > 0 for v in speed.values()), speed
    with capsys.disabled():
        print(f"\ntokens/s on {len(items)} items (batch 8 HF, 24 vLLM; 2-core CPU): HF {speed['hf']}, vLLM "
              f"{speed['vllm']} ({speed['vllm'] / speed['hf']:.2f}x); accuracy {hf['accuracy']}")
    # the paired comparison of the two runs works (and finds no difference)
    capsys.readouterr()
    assert cli.main(["compare-runs", hf_dir, vllm_dir, "--names", "hf,vllm", "--n-boot", "200"]) == 0
    assert "vllm" in capsys.readouterr().out


def test_eval_engine_vllm_refusals(tmp_path, capsys):
    data = str(tmp_path / "test.jsonl")
    write_subset(default_data()[1], data, per_group=1, limit=2)
    base = ["eval", "--model", PACKAGED_DIR, "--data", data, "--task", "math", "--engine", "vllm", "--out",
            str(tmp_path / "x")]
    assert cli.main([*base, "--stepflow", "default", "--control", "random-attn"]) == 2
    assert "--control is not available with --engine vllm" in capsys.readouterr().err
    assert cli.main([*base, "--tensor-parallel-size", "0"]) == 2


def test_generate_engine_vllm_equals_hf(tmp_path):
    """`stepflow generate --engine vllm` writes the same traces (tokens, segmentation) as the HF engine."""
    import stepflow_ext as sf

    prompts = tmp_path / "prompts.txt"
    problems = [json.loads(line)["problem"] for line in open(default_data()[1])][:3]
    prompts.write_text("\n".join(problems) + "\n")
    config = tmp_path / "sf.json"
    sf.StepFlowConfig.default_for(4).to_json(str(config))
    out = {}
    for engine in ("hf", "vllm"):
        path = tmp_path / f"{engine}.jsonl"
        assert cli.main(["generate", "--model", PACKAGED_DIR, "--prompts", str(prompts), "--stepflow", str(config),
                         "--steps", "paragraph", "--dtype", "float32", "--max-new-tokens", "80", "--engine", engine,
                         "--device", "cpu", "--out", str(path)]) == 0
        out[engine] = [json.loads(line) for line in open(path)]
    assert len(out["hf"]) == len(out["vllm"]) == 3
    for a, b in zip(out["hf"], out["vllm"]):
        assert a["input_ids"] == b["input_ids"] and a["segments"] == b["segments"]
        assert a["generation"]["finish"] == b["generation"]["finish"]
        assert (a["generation"]["engine"], b["generation"]["engine"]) == ("hf", "vllm")
