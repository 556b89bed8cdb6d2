"""One evaluation run into a directory (what `stepflow eval` runs, and `stepflow sweep` for each config).

The settings are checked against (or recorded in) the directory, finished samples are skipped, the
items are sharded over the ranks of a torchrun job and the rows merged by rank 0, which writes the
summary, errors.jsonl and the table.
"""
from __future__ import annotations

import json
import os
import time

from ..console import UsageError, err, print_table
from ..traces import eos_ids
from . import distributed
from .runner import (ERRORS, ROWS, SUMMARY, SUMMARY_HEADER, EvalSettings, HFGenerator, RunMismatch, all_rows,
                     check_settings, read_rows, run_items, summarize, summary_row, write_errors)


def _versions() -> dict:
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}


def evaluate(settings: EvalSettings, items, data_errors, out_dir, *, model, tokenizer, config, job, batch_size,
             grade_options, grade_workers, device, completions=None, progress=True, quiet=False, name=None,
             generator=None):
    """One run into out_dir (resumed if it holds the same settings). Returns (status, summary or None).

    Every rank calls this with all items; each takes its shard. Only rank 0 writes summary.json,
    errors.jsonl and the table; every rank gets the same status. generator: what completes the
    requests (default: the HF engine's HFGenerator on `model`; --engine vllm passes a VLLMGenerator).
    """
    # Rank 0 checks (or records) the settings; every rank fails the same way on a mismatch.
    problem = None
    if job.main:
        try:
            check_settings(out_dir, settings)
        except RunMismatch as e:
            problem = str(e)
    problem = job.broadcast(problem)
    if problem:
        raise UsageError(problem)
    own = distributed.row_file(out_dir, job)
    repaired = []
    if job.main and own != os.path.join(out_dir, ROWS):
        repaired += read_rows(os.path.join(out_dir, ROWS), repair=True)[1]
    repaired += read_rows(own, repair=True)[1]
    for line in repaired:
        err(f"resume: {line}")
    job.barrier()  # every file repaired before anyone reads the others
    rows, _ = all_rows(out_dir)
    done = {(r["item_id"], r["sample"]) for r in rows}
    if job.main and done and not quiet:
        err(f"resume: {len(done)} samples already in {out_dir}, skipped")
    mine = distributed.shard(items, job)

    if completions is not None:
        generator = completions
    elif generator is None:
        generator = HFGenerator(model, tokenizer, settings, eos_ids(model, tokenizer), config=config)
    timed = _Timed(generator)
    started = time.time()
    failures = run_items(settings, mine, timed, tokenizer, own, done, batch_size=batch_size,
                         grade_options=grade_options, grade_workers=grade_workers,
                         progress=progress and job.main, desc=name or "eval")
    elapsed = time.time() - started
    all_failures = [f for part in job.gather(failures) for f in part]
    throughput = job.gather((timed.tokens, timed.seconds))
    job.barrier()  # every rank's rows are on disk
    summary = None
    if job.main:
        distributed.merge_rows(out_dir, [item.id for item in items])
        write_errors(out_dir, data_errors, all_failures)
        run_info = {"batch_size": batch_size, "world_size": job.world, "device": device,
                    "limit_items": len(items), "seconds": round(elapsed, 2), "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "grade": grade_options, "engine": settings.engine, **_throughput(throughput), **_versions()}
        summary = summarize(out_dir, settings, items, data_errors, all_failures, run_info)
        if not quiet:
            print_table(f"stepflow eval: {settings.task}, {os.path.basename(settings.data)}", SUMMARY_HEADER,
                        [summary_row(name or os.path.basename(os.path.normpath(out_dir)), summary)])
            err(f"results in {out_dir}/ ({ROWS}, {SUMMARY}, {ERRORS})")
    status = 1 if (data_errors or all_failures) else 0
    job.barrier()  # nobody starts anything else (or exits) before rank 0 has merged
    return status, summary


class _Timed:
    """The generator, counting the tokens it generates and the seconds it takes (grading excluded)."""

    def __init__(self, generator):
        self.generator, self.tokens, self.seconds = generator, 0, 0.0

    def __call__(self, requests):
        start = time.perf_counter()
        out = self.generator(requests)
        self.seconds += time.perf_counter() - start
        self.tokens += sum(int(g.get("tokens") or 0) for g in out)
        return out


def _throughput(parts) -> dict:
    """Generated tokens and tokens/s over all ranks (the ranks run side by side: the slowest one's time)."""
    tokens = sum(t for t, _ in parts)
    seconds = max((s for _, s in parts), default=0.0)
    return {"generated_tokens": tokens, "generate_seconds": round(seconds, 3),
            "tokens_per_s": round(tokens / seconds, 2) if seconds > 0 else None}


def report_failures(data_errors, failures) -> None:
    if data_errors:
        err(f"\n{len(data_errors)} data line{'s' if len(data_errors) != 1 else ''} failed:")
        for e in data_errors:
            err(f"  {e}")
    if failures:
        err(f"\n{len(failures)} sample{'s' if len(failures) != 1 else ''} failed (a rerun retries them):")
        for f in failures[:50]:
            err(f"  {f}")
        if len(failures) > 50:
            err(f"  ... and {len(failures) - 50} more (see {ERRORS})")


def read_failures(out_dir) -> list[str]:
    path = os.path.join(out_dir, ERRORS)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line)["text"] for line in f if line.strip() and json.loads(line).get("kind") != "data"]
