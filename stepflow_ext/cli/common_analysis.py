"""What `analyze` and `compare` share: their options, reading the traces, the Step-Saliency of one
trace, and the end of the run (report, exit status)."""
from __future__ import annotations

from ..traces import read_traces
from .common import UsageError, err, exit_status, segmentation_options


TRACE_FORMATS = """\
trace formats (JSONL, one object per line; the first field set present wins):
  {"input_ids": [...], "prompt_len": P}               ids as the model saw them (what `generate` writes)
  {"prompt": TEXT or [messages], "completion": TEXT}  TEXT prompts are used verbatim (no chat template)
  {"question": ..., "thinking": ..., "summary": ...}  chat template(question) + "<think>\\n", then
                                                      thinking + "\\n</think>\\n\\n" + summary
Malformed lines are reported as FILE:LINE: FIELD: problem; the other lines still run and the
command exits with status 1, listing the failures.
"""


PAPER_NOTE = ("FB and AB are the paper's final-block and analysis-block intensities: the mean of the summary x "
              "summary and of the thinking-steps x thinking-steps sub-blocks of the block view M[a,c] / (|a| |c|), "
              "per layer; FB/AB is their ratio (0 where AB <= 1e-10, as the authors' code does). The tables give "
              "their means over layers; the *_paper.png pictures show them per layer with the layer-averaged map.")


def analysis_options(p):
    p.add_argument("--traces", required=True, metavar="FILE", help="JSONL traces (formats below)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (created)")
    g = p.add_argument_group("saliency (docs/method.md section 2)")
    g.add_argument("--preset", default=None, choices=("paper",),
                   help="paper: the paper's Step-Saliency, i.e. --target all --loss-reduction mean --head-reduction "
                        "abs_mean (the authors' extract_saliency, rule 'ag', mode 'loss'); its step matrices are the "
                        "block view, which the report's FB / AB panels read. Options that contradict it are an "
                        "error. It does not change the segmentation: the paper splits the thinking into sentences "
                        "and the summary at blank lines (see the segmentation options)")
    g.add_argument("--target", default=None, choices=("summary", "thinking", "generated", "all"),
                   help="the tokens whose negative log-likelihood is the loss that the saliency explains: summary "
                        "(default), thinking, generated (thinking + summary) or all (every token after the first, "
                        "the paper's)")
    g.add_argument("--loss-reduction", default=None, choices=("sum", "mean"),
                   help="sum (default) or mean of that loss over the trace's target tokens (the paper's); the "
                        "mean divides every map of a trace by its number of targets, so row shares (LI, TS, RS) "
                        "do not change, the block values (FB, AB) do")
    g.add_argument("--head-reduction", default=None, choices=("sum_abs", "abs_sum", "abs_mean"),
                   help="how the heads of a layer combine: sum_abs |sum_h A dL/dA| (default, signed contributions "
                        "of the heads can cancel), abs_sum sum_h |A dL/dA|, or abs_mean the mean over heads of "
                        "|A dL/dA| (the paper's)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute each layer in the backward pass (long traces, less memory)")
    p.add_argument("--chunk-tokens", type=int, default=1024, metavar="N",
                   help="tokens per chunk of the vocabulary projection (default 1024)")
    p.add_argument("--bins", type=int, default=10, metavar="N",
                   help="relative-position bins of the thinking in the aggregate maps (default 10)")
    p.add_argument("--plots", type=int, default=8, metavar="N",
                   help="draw per-trace pictures for the first N traces (default 8, -1: all)")
    p.add_argument("--no-plots", action="store_true", help="write maps and JSON only, no pictures or report")
    d = p.add_argument_group("diagnostic thresholds (docs/method.md, Diagnostics)")
    d.add_argument("--lock-in-margin", type=float, default=0.1, metavar="X",
                   help="Shallow Lock-in: LI(first third) - LI(middle third) above this (default 0.1)")
    d.add_argument("--decay-drop", type=float, default=0.25, metavar="X",
                   help="Deep Decay: TS(last third) below (1 - this) x peak TS (default 0.25)")
    d.add_argument("--recent-window", type=int, default=2, metavar="W",
                   help="steps counted as recent in RS (default 2)")


def resolve_saliency_options(args) -> None:
    """analyze/compare: resolve --preset, --target, --loss-reduction, --head-reduction in place."""
    from ..saliency import PRESETS, resolve_options

    for name, value in PRESETS.get(args.preset, {}).items():
        mine = getattr(args, name)
        if mine is not None and mine != value:
            flag = "--" + name.replace("_", "-")
            raise UsageError(f"{flag} {mine} contradicts --preset {args.preset}, which sets {flag} {value}")
    chosen = resolve_options(args.target, args.loss_reduction, args.head_reduction, args.preset)
    args.target, args.loss_reduction, args.head_reduction = (chosen["target"], chosen["loss_reduction"],
                                                             chosen["head_reduction"])


def saliency_settings(args) -> dict:
    return {"preset": args.preset, "target": args.target, "loss_reduction": args.loss_reduction,
            "head_reduction": args.head_reduction}


def saliency_words(args) -> str:
    """A short description of the saliency settings for titles and report lines."""
    what = f"target {args.target}, loss {args.loss_reduction}, heads {args.head_reduction}"
    return f"preset {args.preset} = {what}" if args.preset else what


def check_analysis_args(args):
    if args.bins < 1:
        raise UsageError("--bins must be >= 1")
    if args.recent_window < 1:
        raise UsageError("--recent-window must be >= 1")
    if args.chunk_tokens < 1:
        raise UsageError("--chunk-tokens must be >= 1")
    if not 0 <= args.decay_drop <= 1:
        raise UsageError("--decay-drop must be in [0, 1]")


def diagnostic_thresholds(args) -> dict:
    return {"lock_in_margin": args.lock_in_margin, "decay_drop": args.decay_drop, "recent_window": args.recent_window}


def _segment(trace, tok, rule):
    import torch

    import stepflow_ext as sf

    return sf.segment(torch.tensor([trace.input_ids]), [trace.prompt_len], tokenizer=tok, **rule)


def _check_target(trace, seg, target, rule):
    kinds = seg.kinds[0]
    if target == "summary" and "summary" not in kinds:
        return trace.error(f"no summary: the end-of-thinking marker (--think-end {rule['think_end']!r}) never completes in the "
                           "generated tokens (use --target thinking or generated, or --think-end)")
    if target == "thinking" and "step" not in kinds:
        return trace.error("no thinking step: the trace opens with the summary (use --target summary)")
    return None


def trace_saliency(model, tok, trace, args, rule, model_name, warn=True):
    """(result, diagnose report) of one trace, or a TraceError."""
    import torch

    import stepflow_ext as sf

    seg = _segment(trace, tok, rule)
    problem = _check_target(trace, seg, args.target, rule)
    if problem is not None:
        return problem
    stored = trace.record.get("segments")
    if warn and isinstance(stored, dict) and stored.get("kinds") not in (None, seg.kinds[0]):
        err(f"warning: {trace.source}: segments: the stored segmentation differs from the one computed here "
            "(another --step-delimiter / --think-end?); using the computed one")
    device = next(model.parameters()).device
    ids = torch.tensor([trace.input_ids], device=device)
    try:
        res = sf.step_saliency(model, ids, seg, target=args.target, head_reduction=args.head_reduction,
                               loss_reduction=args.loss_reduction, preset=args.preset,
                               gradient_checkpointing=args.gradient_checkpointing, chunk_tokens=args.chunk_tokens)
    except Exception as e:  # noqa: BLE001 - report the trace, go on with the others
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return trace.error(f"step_saliency failed: {type(e).__name__}: {e}")
    res.meta.update({"name": trace.name, "source": trace.source, "model": model_name, "num_tokens": len(ids[0]),
                     "prompt_len": trace.prompt_len, "segment_lengths": seg.lengths()[0], "format": trace.format,
                     "id": trace.record.get("id")})
    report = res.diagnose(recent_window=args.recent_window, lock_in_margin=args.lock_in_margin,
                          decay_drop=args.decay_drop)[0]
    return res, report


def _composition_markers(args, tok, model) -> tuple[str, str]:
    """The markers that join {question, thinking, summary} records into one text: the segmentation's
    (resolved per model family for "auto"); the thinking opens with the marker and a newline."""
    from ..segment import markers_for

    opts = segmentation_options(args)
    auto = markers_for(tok, model)
    start = auto[0] if opts["think_start"] in ("auto", None) else opts["think_start"]
    end = auto[1] if opts["think_end"] == "auto" else opts["think_end"]
    return start + "\n", end


def load_traces(args, tok, model):
    start, end = _composition_markers(args, tok, model)
    try:
        return read_traces(args.traces, tok, chat_template=not args.no_chat_template, think_start=start,
                           think_end=end, vocab_size=model.get_input_embeddings().weight.shape[0])
    except OSError as e:
        raise UsageError(f"cannot read traces: {e}") from None


def write_report(report, out, errors) -> None:
    """analyze/compare: the traces that failed go into the report too, then it is written."""
    if errors:
        report.heading("Failed")
        report.pre("\n".join(str(e) for e in errors))
    html_path, _ = report.write(out)
    err(f"report: {html_path}")


def end_of_run(out, done, errors, what="") -> int:
    """analyze/compare: where the results are, and the exit status."""
    err(f"results in {out}/ ({len(done)} trace{'s' if len(done) != 1 else ''}{what})")
    if not done and not errors:
        err("no traces in the file")
        return 1
    return exit_status(errors)
