#!/usr/bin/env python
"""Parity of StepFlow's intervention (`replace_attention`, bridge OEB + value SMI) with the paper authors' own code
on a random tiny GPT-OSS.

    python scripts/paper_parity_intervention.py PATH [--oeb-layers 1] [--smi-layer L-1] [--sharpen 3] [--seed 0]

PATH is a local checkout of the authors' repository (github.com/XiaoyuXu-Vincent/step-saliency).
Nothing of it is part of this project: this script loads, at run time and from PATH only, their
package PATH/src (as `authors_src`): `BridgeGuardOEBWrapper` (src/interventions/bridge_guard_oeb.py),
`StepMomentumInjectionWrapper` (src/interventions/smi.py), and what these import
(attention_manager.py, which patches GPT-OSS's `eager_attention_forward`; state_controller.py and
the SMI wrapper, which patch `prepare_inputs_for_generation`; src/model_config.py for the harmony
channel markers `<|channel|>analysis<|message|>` / `<|channel|>final<|message|>`).

The model is the project's tiny GPT-OSS (stepflow_ext.cli.tiny_harmony, as tests/gpt_oss_fixture.py:
harmony tokenizer, eager attention, attention sinks, sliding windows on even layers), float32, its
q/k projections scaled by --sharpen so that attention is peaked and the bridge mass falls below
tau_max (OEB fires). One FIXED sequence is decoded teacher-forced through a DynamicCache, one token
per forward after the prompt's prefill, every forward's inputs made by the model's own
`prepare_inputs_for_generation` (their trackers listen there) - under (a) OEB alone, (b) SMI alone,
(c) both, with the paper's hyper-parameters on both sides (tau_max 0.15, eps 1e-6; alpha 0.06,
window 4) and the same layers: theirs `BridgeGuardOEBWrapper(tok, layers=OEB)` and
`StepMomentumInjectionWrapper(tok, strength=0.06, window_tokens=4, min_layer=SMI)` (SMI applied
before OEB, the order of their eval/Math-main/evaluation/math_eval_gptoss.py; in the other order the
OEB listener's patched prepare_inputs_for_generation, called inside SMI's, installs a fresh
AttentionState without SMI's tracker, and SMI never fires: 0 triggers, measured), ours `replace_attention(model, StepFlowConfig(oeb_layers=OEB,
oeb_rule="bridge", oeb_tau_max=0.15, smi_layers=(SMI,), smi_rule="value", smi_alpha=0.06,
smi_window=4), tokenizer=tok, steps="sentence")`.

It prints, per mode, the largest relative error of the logits over the decoded positions
(max |ours - theirs| / max |theirs| per position), how far the intervention moved the logits from
the plain model (so that a match is not a match of two no-ops), their trigger counts as their stats
record them (`stats.triggers`: OEB one per (batch row, head) per firing query and layer; SMI one
per injected token and layer) and ours (`handle.trigger_counts()`), and PASS when every mode's
error is below --tolerance (1e-4). Exit status 0 on PASS, 1 on FAIL, 2 when their code cannot be
loaded.

The sequence avoids the deliberate differences of docs/method.md 6.1 and design.md 2.5 where it
can: batch 1; the prompt ends with `<|start|>assistant`, so the analysis marker is generated (not
in the prompt; their OEB also fails on a multi-token prefill whose last token is in a channel:
its per-query shifts broadcast to a 5-D tensor and raise); every sentence has >= 15 characters and no '.' inside; OEB and SMI default to
full-attention layers: on a sliding layer whose window binds, with the cache generate() builds
(--cache window), their OEB compares the query's absolute position with the cache's shorter key
axis and returns the logits unchanged once it is past it (their masks are cut with [..., :seq_len]),
so it stops firing there; --cache full keeps every key and lets both sides run OEB on a sliding layer.

Driving their code: their listeners decide "new sequence" from model_kwargs["past_key_values"]
(transformers < 5). Transformers 5's generate() passes cache= instead, so under it their trackers
restart at every step (stats reset, SMI never sees a step close); this script passes
past_key_values= (and next_sequence_length=1) to prepare_inputs_for_generation, as their
transformers' generate did. Measured (seed 0, defaults: OEB layer 1, SMI layer 3, both full
attention): logits within 5.3e-7 (OEB, OEB+SMI) and 0 (SMI alone, bitwise); triggers OEB 44 / 44,
SMI 4 / 4 (theirs / ours). Deliberate differences that remain reachable: OEB on a sliding layer
(--oeb-layers 0): with --cache window theirs fires 0 times (see above), with --cache full theirs
also fires on queries whose window holds no bridge key (p_B = 0 over keys the window masks:
lambda_B = log(0.15 / 1e-6) = 11.9 lands on masked logits, lambda_S = log(0.85) pushes the window's
keys down against the sink); here the masses are over the keys inside the window and such a
bridge is empty, so OEB does not act (design.md 2.5). Batches, prompt thinking and bf16 (method.md
6.1) are not exercised.
Never run in CI; the authors' code is never vendored.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import os
import sys
import textwrap
import types
import warnings

import torch

PROMPT = "<|start|>user<|message|>What is 12 + 7? Reason step by step.<|end|><|start|>assistant"
COMPLETION = ("<|channel|>analysis<|message|>First, 12 + 7 means adding seven to twelve. "
              "So the sum of the two numbers is 19. Check: 19 - 7 = 12, which matches the first number. "
              "We compute the product and then we divide it. "
              "<|end|><|start|>assistant<|channel|>final<|message|>The answer is \\boxed{19}.")
TAU_MAX, ALPHA, WINDOW = 0.15, 0.06, 4


def _fail(message: str, status: int = 2):
    print(textwrap.fill(message, 100, subsequent_indent="  "), file=sys.stderr)
    raise SystemExit(status)


def load_authors(path: str) -> types.SimpleNamespace:
    """Their src/ as the package `authors_src` (its modules import each other relatively)."""
    src = os.path.join(path, "src")
    for f in ("interventions/bridge_guard_oeb.py", "interventions/smi.py", "interventions/attention_manager.py",
              "model_config.py"):
        if not os.path.isfile(os.path.join(src, f)):
            _fail(f"error: {os.path.join(src, f)} not found: PATH must be a checkout of the authors' repository "
                  "(github.com/XiaoyuXu-Vincent/step-saliency), holding src/interventions/")
    pkg = types.ModuleType("authors_src")
    pkg.__path__ = [src]
    sys.modules["authors_src"] = pkg
    try:
        oeb = importlib.import_module("authors_src.interventions.bridge_guard_oeb")
        smi = importlib.import_module("authors_src.interventions.smi")
        am = importlib.import_module("authors_src.interventions.attention_manager")
        mc = importlib.import_module("authors_src.model_config")
    except ModuleNotFoundError as e:
        _fail(f"error: the authors' code imports {e.name!r}, which is not installed here: pip install {e.name}")
    return types.SimpleNamespace(OEB=oeb.BridgeGuardOEBWrapper, SMI=smi.StepMomentumInjectionWrapper,
                                 manager=am.manager, model_config=mc.get_model_config("gpt-oss"))


# --------------------------------------------------------------------------- model, sequence, decoding


def tiny(args):
    from stepflow_ext.cli.tiny_harmony import gpt_oss_model, harmony_tokenizer

    tok = harmony_tokenizer()
    model = gpt_oss_model(len(tok), seed=args.seed, sharpen=args.sharpen, layers=args.layers,
                          sliding_window=args.window, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id,
                          dtype=torch.float32)
    return tok, model


def sequence(tok):
    prompt = tok(PROMPT, add_special_tokens=False, return_tensors="pt").input_ids
    completion = tok(COMPLETION, add_special_tokens=False, return_tensors="pt").input_ids
    return torch.cat([prompt, completion], dim=1), prompt.shape[1]


@torch.no_grad()
def decode(model, ids, prompt_len, full_cache=False):
    """Logits (T - P + 1, V) of the prefill's last position and of each teacher-forced decode step, every
    forward's inputs from the model's (possibly patched) prepare_inputs_for_generation, as generate() does."""
    from transformers import DynamicCache

    # With the config (what generate() builds), sliding layers keep only the last window - 1 keys.
    cache = DynamicCache() if full_cache else DynamicCache(config=model.config)
    out = []
    for t in range(prompt_len, ids.shape[1] + 1):
        # past_key_values=, as generate() passed it in the transformers their code was written for (their
        # listeners test model_kwargs["past_key_values"] for a new sequence; transformers >= 5 renames it cache=)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            inputs = model.prepare_inputs_for_generation(
                ids[:, :t], next_sequence_length=None if t == prompt_len else 1, past_key_values=cache,
                attention_mask=torch.ones_like(ids[:, :t]), use_cache=True)
        logits = model(**inputs).logits
        out.append(logits[0, -1].double())
    return torch.stack(out)


def run_theirs(authors, model, tok, ids, prompt_len, mode, oeb_layers, smi_layer, full_cache):
    model = copy.deepcopy(model)
    wrappers = []
    # SMI before OEB, as their math_eval_gptoss.py. min_layer is passed: the SMI wrapper hands its own
    # argument (not the resolved default) to the intervention, whose test is layer_idx < min_layer.
    if "smi" in mode:
        wrappers.append(authors.SMI(tok, strength=ALPHA, window_tokens=WINDOW, min_layer=smi_layer,
                                    model_config=authors.model_config))
    if "oeb" in mode:
        wrappers.append(authors.OEB(tok, layers=oeb_layers, tau_max=TAU_MAX, model_config=authors.model_config))
    for w in wrappers:
        w.apply(model)
    try:
        logits = decode(model, ids, prompt_len, full_cache)
        stats = {("oeb" if isinstance(w, authors.OEB) else "smi"): w.collect_stats() for w in wrappers}
    finally:
        for w in reversed(wrappers):
            w.remove()
    if authors.manager._original_forward is not None:
        _fail("error: the authors' attention patch is still installed after remove()", 1)
    return logits, stats


def run_ours(model, tok, ids, prompt_len, mode, oeb_layers, smi_layer, full_cache):
    import stepflow_ext as sf

    model = copy.deepcopy(model)
    cfg = sf.StepFlowConfig(oeb_layers=oeb_layers if "oeb" in mode else (), oeb_rule="bridge", oeb_tau_max=TAU_MAX,
                            smi_layers=(smi_layer,) if "smi" in mode else (), smi_rule="value", smi_alpha=ALPHA,
                            smi_window=WINDOW)
    handle = sf.replace_attention(model, cfg, tokenizer=tok, steps="sentence")
    try:
        logits = decode(model, ids, prompt_len, full_cache)
        counts = handle.trigger_counts()
    finally:
        handle.restore()
    return logits, counts


def rel_err(mine, ref):
    """Per position max |mine - ref| / max |ref|; returns (worst, position index of the worst)."""
    err = (mine - ref).abs().amax(dim=-1) / ref.abs().amax(dim=-1).clamp_min(1e-30)
    i = int(err.argmax())
    return float(err[i]), i


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[2] + "\nexample: python scripts/paper_parity_intervention.py /tmp/authors")
    p.add_argument("path", metavar="PATH", help="local checkout of the authors' repository (src/interventions/)")
    p.add_argument("--layers", type=int, default=4, metavar="L", help="decoder layers (default 4)")
    p.add_argument("--oeb-layers", default="1", metavar="I,J",
                   help="OEB layers, comma-separated (default 1, a full-attention layer; 'paper': StepFlowConfig."
                        "default_for(model)'s 0..ceil(L/4)-1)")
    p.add_argument("--smi-layer", type=int, default=None, metavar="K",
                   help="the SMI layer (default L-1, the last layer, full attention for even L)")
    p.add_argument("--window", type=int, default=8, metavar="W", help="sliding window of the even layers (default 8)")
    p.add_argument("--sharpen", type=float, default=3.0, metavar="S",
                   help="q/k projection scale (default 3: peaked attention, so that OEB fires)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the weights (default 0)")
    p.add_argument("--cache", choices=("window", "full"), default="window",
                   help="window (default): DynamicCache(config=...), as generate() builds it, sliding layers keeping "
                        "their last window-1 keys; full: DynamicCache() keeping every key on every layer")
    p.add_argument("--tolerance", type=float, default=1e-4, help="largest relative error accepted (default 1e-4)")
    p.add_argument("--show", action="store_true", help="print the tokens and the per-position errors")
    args = p.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    authors = load_authors(os.path.abspath(os.path.expanduser(args.path)))
    tok, model = tiny(args)
    import stepflow_ext as sf

    if args.oeb_layers == "paper":
        oeb_layers = tuple(sf.StepFlowConfig.default_for(model).oeb_layers)
    else:
        oeb_layers = tuple(int(x) for x in args.oeb_layers.split(",") if x.strip())
    smi_layer = args.layers - 1 if args.smi_layer is None else args.smi_layer
    ids, prompt_len = sequence(tok)
    types_ = model.config.layer_types
    print(f"tiny GPT-OSS: {args.layers} layers ({', '.join(t.split('_')[0] for t in types_)}; window {args.window}), "
          f"sinks, q/k x{args.sharpen:g}, fp32, seed {args.seed}; {ids.shape[1]} tokens, prompt {prompt_len}, "
          f"{ids.shape[1] - prompt_len} decode steps after the prefill")
    print(f"OEB layers {list(oeb_layers)} (tau_max {TAU_MAX}), SMI layer {smi_layer} (alpha {ALPHA}, window {WINDOW})")
    for layer in list(oeb_layers) + [smi_layer]:
        if types_[layer] == "sliding_attention" and ids.shape[1] >= args.window and args.cache == "window":
            print(f"note: layer {layer} is a sliding layer whose window binds: their masks are cut to the "
                  f"cache's key axis ([..., :seq_len]) and misalign with the absolute positions there")
    if args.show:
        pieces = [tok.decode([i]) for i in ids[0].tolist()]
        print("tokens: " + " ".join(f"{i}:{s!r}" for i, s in enumerate(pieces)))
    full = args.cache == "full"
    plain = decode(copy.deepcopy(model), ids, prompt_len, full)
    worst, rows = 0.0, []
    for mode in (("oeb",), ("smi",), ("oeb", "smi")):
        theirs, stats = run_theirs(authors, model, tok, ids, prompt_len, mode, oeb_layers, smi_layer, full)
        mine, counts = run_ours(model, tok, ids, prompt_len, mode, oeb_layers, smi_layer, full)
        err, at = rel_err(mine, theirs)
        moved, _ = rel_err(theirs, plain)
        worst = max(worst, err)
        rows.append((mode, err, at, moved, stats, counts))
        if args.show:
            e = ((mine - theirs).abs().amax(-1) / theirs.abs().amax(-1)).tolist()
            print(f"{'+'.join(mode)} per position: " + " ".join(f"{prompt_len - 1 + i}:{x:.1e}" for i, x in enumerate(e)))
    print(f"\n{'mode':>8}  {'max rel.err':>11}  {'at pos':>6}  {'effect':>8}  {'their triggers':>24}  ours")
    for mode, err, at, moved, stats, counts in rows:
        t = ", ".join(f"{k} {v['triggers']}" for k, v in stats.items())
        o = ", ".join(f"{k} {sum(counts[k].values())} {dict(counts[k])}" for k in ("oeb", "smi") if k in mode)
        print(f"{'+'.join(mode):>8}  {err:>11.2e}  {prompt_len - 1 + at:>6}  {moved:>8.2e}  {t:>24}  {o}")
    print("(effect: max relative change of their logits against the plain model; pos: the token position whose "
          "logits differ most)")
    for mode, *_, stats, _ in rows:
        for k, v in stats.items():
            print(f"their {'+'.join(mode)} {k} stats: {v}")
    verdict = worst < args.tolerance
    print(f"\nmax relative error {worst:.2e} -> {'PASS' if verdict else 'FAIL'} (tolerance {args.tolerance:g})")
    return 0 if verdict else 1


if __name__ == "__main__":
    sys.exit(main())
