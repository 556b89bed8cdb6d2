"""The evaluation loop of `stepflow eval`: generate, grade, append rows, resume, summarize.

A run directory holds:

- settings.json   what identifies the run (model, data and its sha256, task, StepFlow config, control,
                  sampling, prompt options, dtype). A rerun with other settings is refused.
- rows.jsonl      one row per (item, sample), appended and flushed as soon as the sample is graded.
                  Under torchrun each rank appends to rows.rank{r}.jsonl; rank 0 merges them at the end.
- errors.jsonl    what failed in the latest invocation: bad data lines and failed generations/gradings.
- summary.json    settings, counts, stats.accuracy over the complete items, per-item correctness.

Resume: the (item_id, sample) pairs already in the row files are skipped. A truncated or garbled
line (a killed run) is dropped from the file, so that sample is generated again; a duplicate pair
keeps its first row. Rows are never written twice for the same pair by one invocation.

Reproducibility: sample k of item i is drawn with its own random stream, seeded from
(seed, item id, k) (`sample_seed`), by `PerRowSampler`, not by the global RNG, so which batch or
rank an item lands in does not change the random numbers it gets. What can still differ across
batch sizes, padding, shardings or devices is floating point: batched matmuls of a left-padded row
are not bit-identical to the unpadded row, which can flip a greedy argmax or a sample that sits on
a CDF boundary (rare, but possible). Same settings + same batch size + same world size + same device
and library versions give bit-identical rows (except time_s). The random-residual / random-attn
controls draw per batch row from a seed hashed from --control-seed and the batch's (item, sample)
pairs (`control_batch_seed`), so their draws depend on batch composition unless --batch-size is 1.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..config import CONTROLS

ROWS = "rows.jsonl"
ERRORS = "errors.jsonl"
SETTINGS = "settings.json"
SUMMARY = "summary.json"


class RunMismatch(ValueError):
    """The run directory holds another run (other settings) or something that is not a run."""


@dataclasses.dataclass
class EvalSettings:
    """Everything that decides what the rows of a run are. Two invocations may share a run directory
    only when these are equal (batch size, limit, device and world size may differ)."""

    model: str
    data: str
    task: str
    stepflow: dict | None = None
    control: str | None = None
    control_seed: int = 0
    samples: int = 1
    max_new_tokens: int = 1024
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    chat_template: bool = True
    instruction: str = "default"
    # segmentation (design.md 2.1; the options of stepflow_ext.segment)
    think_start: str | None = "auto"
    think_end: str = "auto"
    steps: str = "sentence"
    summary_steps: bool = False
    step_delimiter: str = "\n\n"
    dtype: str = "auto"
    completions_from: str | None = None
    data_sha256: str | None = None
    engine: str = "hf"           # hf (transformers' generate) or vllm (stepflow_ext.vllm)

    def segmentation(self) -> dict:
        """The segmentation options, as segment() and replace_attention() take them."""
        return dict(think_start=self.think_start, think_end=self.think_end, steps=self.steps,
                    summary_steps=self.summary_steps, step_delimiter=self.step_delimiter)

    def check(self) -> None:
        if self.samples < 1:
            raise ValueError("--samples must be >= 1")
        if self.max_new_tokens < 1:
            raise ValueError("--max-new-tokens must be >= 1")
        if not self.temperature >= 0:
            raise ValueError("--temperature must be >= 0 (0: greedy decoding)")
        if not 0 < self.top_p <= 1:
            raise ValueError("--top-p must be in (0, 1]")
        if self.control is not None and self.control not in CONTROLS:
            raise ValueError(f"--control must be none or one of {', '.join(CONTROLS)}, got {self.control!r}")
        if self.control is not None and self.stepflow is None:
            raise ValueError(f"--control {self.control} needs a StepFlow config (--stepflow CONFIG.json or default): "
                             "the control perturbs the same layers with the same strengths as that config")
        if self.engine not in ("hf", "vllm"):
            raise ValueError(f"--engine must be hf or vllm, got {self.engine!r}")
        if self.engine == "vllm" and self.control is not None:
            raise ValueError("--control is not available with --engine vllm yet (the controls run in the HF engine's "
                             "attention): use --engine hf")
        if self.completions_from is not None and (self.stepflow is not None or self.control is not None):
            raise ValueError("--completions-from grades given completions; --stepflow/--control would mislabel them")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def file_sha256(path: str) -> str | None:
    """sha256 of a local data file (None for hf: sources), so that a changed file is not mixed into a run."""
    if not os.path.isfile(path):
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sample_seed(seed: int, item_id: str, sample: int) -> int:
    """The seed of sample `sample` of item `item_id`: a hash, independent of batches and ranks."""
    digest = hashlib.sha256(f"{seed}\x00{item_id}\x00{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


# --------------------------------------------------------------------------- sampling


def _sampler_class():
    import torch
    from transformers import LogitsProcessor

    class PerRowSampler(LogitsProcessor):
        """Temperature + nucleus sampling with one CPU random stream per batch row.

        Runs as the last logits processor of a *greedy* generate(): it draws each row's token from
        its own generator and returns scores that are 0 there and -inf elsewhere, so greedy
        decoding picks exactly that token. One uniform draw per row per step, inverse-CDF over the
        probabilities sorted in descending order (stable), so a row's tokens depend only on its
        seed and its own logits.
        """

        def __init__(self, seeds, temperature: float, top_p: float):
            self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
            self.temperature, self.top_p = float(temperature), float(top_p)

        def __call__(self, input_ids, scores):
            if scores.shape[0] != len(self.generators):
                raise ValueError(f"PerRowSampler has {len(self.generators)} rows, the batch {scores.shape[0]}")
            probs = torch.softmax(scores.float() / self.temperature, dim=-1)
            probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
            if self.top_p < 1.0:
                # Keep the smallest prefix whose mass reaches top_p (always at least the first token).
                before = probs.cumsum(-1) - probs
                probs = probs.masked_fill(before >= self.top_p, 0.0)
            cdf = probs.cumsum(-1)
            u = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in self.generators])
            target = (u.to(cdf.device, cdf.dtype) * cdf[:, -1]).unsqueeze(-1)
            pick = torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[-1] - 1)
            # A zero-probability slot can only be hit at the right edge; step back to the last kept one.
            kept = (probs > 0).sum(-1, keepdim=True) - 1
            pick = torch.minimum(pick, kept)
            token = order.gather(-1, pick)
            out = torch.full_like(scores, float("-inf"))
            return out.scatter_(-1, token, 0.0)

    return PerRowSampler


def per_row_sampler(seeds, temperature, top_p):
    return _sampler_class()(seeds, temperature, top_p)


def control_batch_seed(control_seed: int, requests) -> int:
    """The control's seed for one generate call: a hash of --control-seed and the batch's (item, sample)
    pairs. The controls draw their random key groups / directions from (seed, layer, batch row, ...)
    (stepflow_ext.controls), so with one fixed seed row r of every batch would get the same draws; this
    gives every batch its own. With --batch-size 1 each (item, sample) has its own draws, independent of
    batching and sharding; with larger batches they depend on which items share the batch."""
    key = "\x01".join(f"{r.item.id}\x00{r.sample}" for r in requests)
    digest = hashlib.sha256(f"{control_seed}\x02{key}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


# --------------------------------------------------------------------------- generators


@dataclasses.dataclass
class Request:
    """One (item, sample) to complete."""

    item: object
    sample: int
    prompt: str
    prompt_ids: list
    seed: int


class HFGenerator:
    """Completes a batch of Requests with model.generate (left padding), under StepFlow (or its
    control) when `config` is given, with online step tracking.

    StepFlow is installed around each generate call and restored after it, because a control's
    random draws are seeded per batch (control_batch_seed).
    """

    def __init__(self, model, tokenizer, settings: EvalSettings, eos_ids: set, config=None):
        self.model, self.tok, self.settings, self.eos = model, tokenizer, settings, set(eos_ids)
        self.config = config

    def _install(self, control_seed):
        if self.config is None:
            return None
        import stepflow_ext as sf

        s = self.settings
        control = {"control": s.control, "control_seed": control_seed} if s.control else {}
        return sf.replace_attention(self.model, self.config, tokenizer=self.tok, **s.segmentation(), **control)

    def __call__(self, requests: list[Request]) -> list[dict]:
        import torch
        from transformers import LogitsProcessorList

        import stepflow_ext as sf

        s, tok = self.settings, self.tok
        device = self.model.get_input_embeddings().weight.device
        width = max(len(r.prompt_ids) for r in requests)
        pad = tok.pad_token_id
        ids = torch.tensor([[pad] * (width - len(r.prompt_ids)) + r.prompt_ids for r in requests], device=device)
        mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in requests],
                            device=device)
        processors = LogitsProcessorList()
        if s.temperature > 0:
            processors.append(per_row_sampler([r.seed for r in requests], s.temperature, s.top_p))
        start = time.perf_counter()
        batch_seed = control_batch_seed(s.control_seed, requests) if s.control else None
        handle = self._install(batch_seed)
        try:
            out = self._generate(ids, mask, processors)
        finally:
            if handle is not None:
                handle.restore()
        elapsed = (time.perf_counter() - start) / len(requests)
        results = []
        rule = dict(s.segmentation(), model=self.model)
        for row, r in enumerate(requests):
            gen = out[row, width:].tolist()
            cut = next((i for i, t in enumerate(gen) if t in self.eos), None)
            finish = "eos" if cut is not None else "length"
            text_ids = gen[:cut] if cut is not None else gen
            gen = gen[:cut + 1] if cut is not None else gen
            seg = sf.segment(torch.tensor([r.prompt_ids + gen]), [len(r.prompt_ids)], tokenizer=tok, **rule)
            kinds = seg.kinds[0]
            results.append({"completion": tok.decode(text_ids, skip_special_tokens=False,
                                                     clean_up_tokenization_spaces=False),
                            "tokens": len(gen), "finish": finish, "steps": kinds.count("step"),
                            "summary": "summary" in kinds, "time_s": round(elapsed, 4),
                            "control_batch_seed": batch_seed})
        return results

    def _generate(self, ids, mask, processors):
        import torch

        with torch.no_grad():
            # Greedy generate: the sampling (if any) is PerRowSampler's; the model's own sampling
            # defaults (temperature, top_p, top_k of its generation_config) are switched off.
            return self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=self.settings.max_new_tokens,
                                       do_sample=False, temperature=None, top_p=None, top_k=None,
                                       logits_processor=processors, pad_token_id=self.tok.pad_token_id,
                                       eos_token_id=sorted(self.eos) or None)


class CompletionsFile:
    """Given completions instead of generation: JSONL lines {"item_id", "sample" (default 0), "completion"}.
    Grades outputs produced elsewhere, and lets the tests check grading end to end."""

    def __init__(self, path: str):
        self.path = path
        self.completions: dict[tuple[str, int], str] = {}
        with open(path) as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    key = (str(record["item_id"]), int(record.get("sample", 0)))
                    text = record["completion"]
                    if not isinstance(text, str):
                        raise TypeError("completion must be a string")
                except (ValueError, KeyError, TypeError) as e:
                    raise ValueError(f"{path}:{number}: a completions line needs item_id and completion (string), "
                                     f"optional sample: {type(e).__name__}: {e}") from None
                self.completions.setdefault(key, text)

    def __call__(self, requests: list[Request]) -> list[dict]:
        out = []
        for r in requests:
            text = self.completions.get((r.item.id, r.sample))
            if text is None:
                raise KeyError(f"{self.path} has no completion for item {r.item.id!r} sample {r.sample}")
            out.append({"completion": text, "tokens": None, "finish": "given", "time_s": 0.0})
        return out


# --------------------------------------------------------------------------- row files


def _valid_row(row) -> bool:
    return (isinstance(row, dict) and isinstance(row.get("item_id"), str) and isinstance(row.get("sample"), int)
            and not isinstance(row.get("sample"), bool) and isinstance(row.get("correct"), bool))


def read_rows(path: str, repair: bool = False) -> tuple[list[dict], list[str]]:
    """(rows, problems) of a row file. Bad lines (a killed run leaves a truncated last one) and
    repeated (item_id, sample) pairs are left out and described in `problems`; with repair=True the
    file is rewritten (atomically) without them."""
    if not os.path.exists(path):
        return [], []
    with open(path, "rb") as f:
        data = f.read()
    rows, problems, seen = [], [], set()
    lines = data.split(b"\n")
    complete_end = data.endswith(b"\n")
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        last = number == len(lines)  # no newline after it: cut off while being written
        try:
            row = json.loads(raw)
            if not _valid_row(row):
                raise ValueError("not a row (item_id, sample, correct)")
        except (ValueError, UnicodeDecodeError) as e:
            what = "truncated last line" if last and not complete_end else "unreadable line"
            problems.append(f"{path}:{number}: {what} dropped ({type(e).__name__}); its sample will be redone")
            continue
        key = (row["item_id"], row["sample"])
        if key in seen:
            problems.append(f"{path}:{number}: item {key[0]!r} sample {key[1]} repeated; the first row is kept")
            continue
        seen.add(key)
        rows.append(row)
    if repair and (problems or (data and not complete_end)):
        write_rows(path, rows)
    return rows, problems


def write_rows(path: str, rows: list[dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rank_files(out_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(out_dir, "rows.rank*.jsonl")))


def all_rows(out_dir: str) -> tuple[list[dict], list[str]]:
    """Rows of rows.jsonl and any rank files, first occurrence of each (item_id, sample) kept."""
    rows, problems, seen = [], [], set()
    for path in [os.path.join(out_dir, ROWS)] + rank_files(out_dir):
        got, bad = read_rows(path)
        problems += bad
        for row in got:
            key = (row["item_id"], row["sample"])
            if key not in seen:
                seen.add(key)
                rows.append(row)
    return rows, problems


def check_settings(out_dir: str, settings: EvalSettings) -> None:
    """Refuse to mix runs: DIR's settings.json must equal these settings; a fresh DIR gets them."""
    path = os.path.join(out_dir, SETTINGS)
    mine = settings.to_dict()
    if os.path.exists(path):
        try:
            with open(path) as f:
                theirs = json.load(f)
        except (OSError, ValueError) as e:
            raise RunMismatch(f"{path} is unreadable ({e}); use another --out") from None
        theirs = theirs.get("settings", theirs) if isinstance(theirs, dict) else theirs
        if not isinstance(theirs, dict):
            raise RunMismatch(f"{path} does not hold run settings; use another --out")
        theirs = {"engine": "hf", **theirs}   # runs recorded before the engine was a setting were HF runs
        keys = set(mine) | set(theirs)
        if mine.get("data_sha256") and mine.get("data_sha256") == theirs.get("data_sha256"):
            keys.discard("data")  # the same file contents, reached by another path
        diff = [f"  {k}: {theirs.get(k)!r} there, {mine.get(k)!r} now" for k in sorted(keys)
                if theirs.get(k) != mine.get(k)]
        if diff:
            raise RunMismatch(f"{out_dir} holds a run with other settings; resuming it would mix two runs.\n"
                              + "\n".join(diff) + "\nUse another --out (or the same settings to resume).")
        return
    if os.path.exists(os.path.join(out_dir, ROWS)) or rank_files(out_dir):
        raise RunMismatch(f"{out_dir} has rows but no {SETTINGS}: not a run this command can resume; "
                          "use another --out")
    os.makedirs(out_dir, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"settings": mine}, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------- the loop


@dataclasses.dataclass
class Failure:
    """A (item, sample) that failed to generate or grade in this invocation; it is retried on a rerun."""

    item_id: str
    sample: int
    stage: str
    message: str

    def __str__(self):
        return f"item {self.item_id} sample {self.sample}: {self.stage} failed: {self.message}"

    def to_dict(self):
        return {"kind": self.stage, "item_id": self.item_id, "sample": self.sample, "message": self.message}


def _row(settings: EvalSettings, request: Request, gen: dict, verdict) -> dict:
    return {"item_id": request.item.id, "sample": request.sample, "task": settings.task, "prompt": request.prompt,
            "completion": gen["completion"], "extracted": verdict.extracted, "correct": bool(verdict.correct),
            "detail": verdict.detail, "tokens": gen.get("tokens"), "finish": gen.get("finish"),
            "steps": gen.get("steps"), "summary": gen.get("summary"), "time_s": gen.get("time_s"),
            "grade_s": round(gen.get("grade_s", 0.0), 4), "seed": request.seed,
            "temperature": settings.temperature, "top_p": settings.top_p, "max_new_tokens": settings.max_new_tokens,
            "stepflow": settings.stepflow, "control": settings.control,
            "control_seed": settings.control_seed if settings.control else None,
            "control_batch_seed": gen.get("control_batch_seed"), "model": settings.model}


def _grade(item, completion, grade_options):
    from .grade import grade

    start = time.perf_counter()
    verdict = grade(item, completion, **grade_options)
    return verdict, time.perf_counter() - start


def run_items(settings: EvalSettings, items: list, generator, tokenizer, row_path: str, done: set, *,
              batch_size: int = 8, grade_options: dict | None = None, grade_workers: int = 4,
              progress: bool = True, desc: str = "eval") -> list[Failure]:
    """Generate and grade every (item, sample) of `items` not in `done`; append each row to row_path
    as soon as it is graded (flushed). Returns the failures (those pairs get no row)."""
    from tqdm import tqdm

    from ..traces import encode_prompt
    from .prompts import build_prompt

    grade_options = dict(grade_options or {})
    failures: list[Failure] = []
    todo: list[tuple] = []
    for item in items:
        missing = [k for k in range(settings.samples) if (item.id, k) not in done]
        if missing:
            try:
                prompt, templated = build_prompt(tokenizer, item, settings.chat_template, settings.instruction)
                ids = encode_prompt(tokenizer, prompt, templated)
            except Exception as e:  # noqa: BLE001 - one bad item must not stop the others
                failures += [Failure(item.id, k, "prompt", f"{type(e).__name__}: {e}") for k in missing]
                continue
            todo += [Request(item, k, prompt, ids, sample_seed(settings.seed, item.id, k)) for k in missing]
    remaining = {}  # item id -> samples still to finish in this invocation
    for r in todo:
        remaining[r.item.id] = remaining.get(r.item.id, 0) + 1
    complete_before = sum(1 for item in items if all((item.id, k) in done for k in range(settings.samples)))
    bar = tqdm(total=len(items), initial=complete_before, unit="item", desc=desc, file=sys.stderr,
               disable=not progress)
    # Code runs in a sandboxed subprocess (seconds per item): grade it in threads while the next batch
    # generates. Math (one math-verify helper process) and mcq are quick: graded inline, in order.
    pool = ThreadPoolExecutor(max(1, grade_workers)) if settings.task == "code" else None
    pending = []  # (request, gen, future) in submission order

    with open(row_path, "a", encoding="utf-8") as out:
        def finish_one(request, gen, verdict=None, error=None):
            if error is not None:
                failures.append(Failure(request.item.id, request.sample, "grading", error))
            else:
                out.write(json.dumps(_row(settings, request, gen, verdict), ensure_ascii=False) + "\n")
                out.flush()
            remaining[request.item.id] -= 1
            if remaining[request.item.id] == 0:
                bar.update(1)

        def drain(block):
            while pending and (block or pending[0][2].done()):
                request, gen, future = pending.pop(0)
                try:
                    verdict, seconds = future.result()
                    gen["grade_s"] = seconds
                    finish_one(request, gen, verdict)
                except Exception as e:  # noqa: BLE001
                    finish_one(request, gen, error=f"{type(e).__name__}: {e}")

        try:
            for start in range(0, len(todo), max(1, batch_size)):
                batch = todo[start:start + max(1, batch_size)]
                try:
                    generations = generator(batch)
                except Exception as e:  # noqa: BLE001 - report the batch, go on with the others
                    for request in batch:
                        failures.append(Failure(request.item.id, request.sample, "generation",
                                                f"{type(e).__name__}: {e}"))
                        remaining[request.item.id] -= 1
                    continue
                for request, gen in zip(batch, generations):
                    if pool is not None:
                        pending.append((request, gen, pool.submit(_grade, request.item, gen["completion"],
                                                                  grade_options)))
                        continue
                    try:
                        verdict, seconds = _grade(request.item, gen["completion"], grade_options)
                        gen["grade_s"] = seconds
                        finish_one(request, gen, verdict)
                    except Exception as e:  # noqa: BLE001
                        finish_one(request, gen, error=f"{type(e).__name__}: {e}")
                drain(block=False)
            drain(block=True)
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
            bar.close()
    return failures


# --------------------------------------------------------------------------- summary


def summarize(out_dir: str, settings: EvalSettings, items: list, data_errors: list, failures: list,
              run_info: dict) -> dict:
    """summary.json from the rows in out_dir, over the loaded items (all samples present)."""
    from .stats import accuracy

    rows, _ = all_rows(out_dir)
    by_key = {(r["item_id"], r["sample"]): r for r in rows}
    per_item, incomplete, tokens = {}, [], []
    for item in items:
        got = [by_key.get((item.id, k)) for k in range(settings.samples)]
        if any(r is None for r in got):
            incomplete.append(item.id)
            continue
        per_item[item.id] = [bool(r["correct"]) for r in got]
        tokens += [r["tokens"] for r in got if isinstance(r.get("tokens"), int)]
    correct = np.array(list(per_item.values()), dtype=bool).reshape(len(per_item), settings.samples)
    acc = accuracy(correct) if len(per_item) else None
    summary = {
        "command": "eval", "settings": settings.to_dict(), "model": settings.model, "data": settings.data,
        "task": settings.task, "stepflow": settings.stepflow, "control": settings.control, "run": run_info,
        "counts": {"items_loaded": len(items), "data_errors": len(data_errors), "items_complete": len(per_item),
                   "items_incomplete": len(incomplete), "rows": sum(len(v) for v in per_item.values()),
                   "failed_samples": len(failures)},
        "accuracy": acc,
        "mean_tokens": float(np.mean(tokens)) if tokens else None,
        "incomplete_items": incomplete,
        "failures": [str(f) for f in failures] + [str(e) for e in data_errors],
        "per_item": per_item,
    }
    tmp = os.path.join(out_dir, SUMMARY + ".tmp")
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=2, allow_nan=False)
        f.write("\n")
    os.replace(tmp, os.path.join(out_dir, SUMMARY))
    return summary


def write_errors(out_dir: str, data_errors: list, failures: list, name: str = ERRORS) -> None:
    with open(os.path.join(out_dir, name), "w") as f:
        for e in data_errors:
            f.write(json.dumps({"kind": "data", "file": e.file, "line": e.line, "field": e.field,
                                "message": e.message, "text": str(e)}) + "\n")
        for failure in failures:
            f.write(json.dumps(failure.to_dict() | {"text": str(failure)}) + "\n")


def fmt_pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def summary_row(name: str, summary: dict) -> list:
    acc = summary.get("accuracy") or {}
    ci = acc.get("ci95")
    k = summary["settings"]["samples"]
    return [name, str(acc.get("n_items", 0)), str(k), fmt_pct(acc.get("pass@1")),
            f"[{fmt_pct(ci[0])}, {fmt_pct(ci[1])}]" if ci else "n/a", fmt_pct(acc.get(f"pass@{k}", acc.get("pass@K"))),
            "n/a" if summary.get("mean_tokens") is None else f"{summary['mean_tokens']:.0f}"]


SUMMARY_HEADER = ["run", "items", "K", "pass@1 %", "95% CI", "pass@K %", "tokens"]
