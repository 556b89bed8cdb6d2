"""`torchrun --nproc_per_node 2 stepflow eval ...` on the CPU (gloo): sharded, merged, equal to one process.

The torchrun test starts real processes (about half a minute on a small machine); the helpers of
eval/distributed.py are also checked directly.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from stepflow_ext import cli
from stepflow_ext.eval import distributed, runner

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GSM8K = os.path.join(ROOT, "tests", "fixtures", "eval", "gsm8k.jsonl")
UNTIMED = ("time_s", "grade_s")


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def untimed(rows):
    return [{k: v for k, v in r.items() if k not in UNTIMED} for r in rows]


def test_from_env_shard_and_device(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.from_env() == distributed.Dist()
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    job = distributed.from_env()
    assert (job.rank, job.world, job.local_rank, job.main) == (2, 3, 0, False)
    assert distributed.shard(list(range(8)), job) == [2, 5]
    assert distributed.row_file("D", job) == os.path.join("D", "rows.rank2.jsonl")
    assert distributed.device_for(job, "cpu") == "cpu"
    with pytest.raises(ValueError, match="same GPU"):
        distributed.device_for(job, "cuda:1")
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(ValueError, match="RANK=5"):
        distributed.from_env()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ValueError, match="not an integer"):
        distributed.from_env()
    # every item lands on exactly one rank
    shards = [distributed.shard(list(range(11)), distributed.Dist(r, 4)) for r in range(4)]
    assert sorted(x for s in shards for x in s) == list(range(11))


def test_merge_rows_dedups_and_orders(tmp_path):
    def row(item, sample, text="x"):
        return {"item_id": item, "sample": sample, "correct": False, "completion": text}

    runner.write_rows(str(tmp_path / "rows.jsonl"), [row("b", 0)])
    runner.write_rows(str(tmp_path / "rows.rank0.jsonl"), [row("a", 1), row("c", 0)])
    runner.write_rows(str(tmp_path / "rows.rank1.jsonl"), [row("a", 0), row("b", 0, "later"), row("zz", 0)])
    with open(tmp_path / "rows.rank1.jsonl", "a") as f:
        f.write('{"item_id": "d", "sam')  # a rank killed mid-line
    assert distributed.merge_rows(str(tmp_path), ["a", "b", "c", "d"]) == 5
    rows = read_jsonl(tmp_path / "rows.jsonl")
    assert [(r["item_id"], r["sample"]) for r in rows] == [("a", 0), ("a", 1), ("b", 0), ("c", 0), ("zz", 0)]
    assert rows[2]["completion"] == "x"
    assert not list(tmp_path.glob("rows.rank*.jsonl"))


@pytest.mark.slow
def test_torchrun_two_cpu_ranks_equal_one_process(tmp_path):
    tiny = tmp_path / "tiny"
    cli.make_tiny_model(str(tiny))
    common = ["eval", "--model", str(tiny), "--device", "cpu", "--data", GSM8K, "--task", "math",
              "--max-new-tokens", "8", "--samples", "2", "--temperature", "0.8", "--top-p", "0.9", "--seed", "3",
              "--stepflow", "default", "--batch-size", "1", "--no-progress"]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)

    def torchrun(out):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "stepflow_ext.cli", *common, "--out", str(out)]
        done = subprocess.run(cmd, env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done

    single = tmp_path / "single"
    assert cli.main(common + ["--out", str(single)]) == 0
    expected = read_jsonl(single / "rows.jsonl")
    assert len(expected) == 10

    dist_out = tmp_path / "dist"
    done = torchrun(dist_out)
    assert "stepflow eval: math" in done.stdout  # rank 0's table, printed once
    assert done.stdout.count("stepflow eval: math") == 1
    assert sorted(os.listdir(dist_out)) == ["errors.jsonl", "rows.jsonl", "settings.json", "summary.json"]
    merged = read_jsonl(dist_out / "rows.jsonl")
    assert untimed(merged) == untimed(expected)
    with open(dist_out / "summary.json") as f:
        summary = json.load(f)
    with open(single / "summary.json") as f:
        reference = json.load(f)
    assert summary["per_item"] == reference["per_item"] and summary["run"]["world_size"] == 2
    assert summary["settings"] == reference["settings"]

    # kill simulation under torchrun: rows lost and a cut line; the rerun completes without duplicates
    lines = (dist_out / "rows.jsonl").read_text().splitlines(keepends=True)
    (dist_out / "rows.jsonl").write_text("".join(lines[:4]) + lines[4][:20])
    torchrun(dist_out)
    assert untimed(read_jsonl(dist_out / "rows.jsonl")) == untimed(expected)
