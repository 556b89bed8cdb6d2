"""`stepflow sweep`: choose a StepFlow config on a dev split, report it once on the test split.

The grid is "FIELD=V1,V2,...;FIELD=..." over StepFlowConfig fields: the paper's rules' oeb_tau_max (τ_max)
and smi_alpha (α), smi_window (w); the earlier rules' oeb_strength (λ), num_sink, smi_gamma (γ), smi_beta;
the rules oeb_rule (bridge, odds) and smi_rule (value, residual); and oeb_layers, smi_layers (layer sets:
"0-3" is 0,1,2,3 inclusive, "5" one layer, "0-1+6-7" a union, "none" no layer). Fields not in the grid
come from --stepflow (default: StepFlowConfig.default_for(model), the paper's configuration). Every
combination runs on the dev split.

The choice (stated in chosen.json): the highest dev pass@1; among configs tied on it, the smaller
perturbation, compared in this order: total OEB size (τ_max for bridge, λ for odds) × |OEB layers|, then
total SMI size (α for value, γ for residual) × |SMI layers|, then the earlier combination in grid order.
The test split is only ever used for the baseline and the chosen config (and, with --with-controls, its
two controls).
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import os

NUMBER_FIELDS = {"oeb_tau_max": float, "smi_alpha": float, "smi_window": int, "oeb_strength": float,
                 "smi_gamma": float, "smi_beta": float, "num_sink": int}
CHOICE_FIELDS = {"oeb_rule": ("bridge", "odds"), "smi_rule": ("value", "residual")}
LAYER_FIELDS = ("oeb_layers", "smi_layers")
SHORT = {"oeb_tau_max": "tau", "smi_alpha": "alpha", "smi_window": "w", "oeb_strength": "lam", "smi_gamma": "gamma",
         "smi_beta": "beta", "num_sink": "sink", "oeb_rule": "oeb-", "smi_rule": "smi-", "oeb_layers": "oeb",
         "smi_layers": "smi"}


def parse_layers(text: str) -> tuple[int, ...]:
    text = text.strip()
    if text.lower() in ("none", "-", ""):
        return ()
    layers = []
    for part in text.split("+"):
        lo, sep, hi = part.strip().partition("-")
        try:
            a, b = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise ValueError(f"layer range {part!r}: expected N or A-B (inclusive), joined with +") from None
        if a < 0 or b < a:
            raise ValueError(f"layer range {part!r}: expected 0 <= A <= B")
        layers += range(a, b + 1)
    if len(set(layers)) != len(layers):
        raise ValueError(f"layer set {text!r} lists a layer twice")
    return tuple(sorted(layers))


def parse_grid(text: str) -> dict[str, list]:
    """"oeb_strength=0.25,0.5;oeb_layers=0-2,0-4" -> {"oeb_strength": [0.25, 0.5], "oeb_layers": [(0,1,2), ...]}."""
    if not text or not text.strip():
        raise ValueError("empty grid; e.g. \"oeb_tau_max=0.1,0.15,0.2;smi_alpha=0.03,0.06\"")
    grid: dict[str, list] = {}
    for part in text.split(";"):
        if not part.strip():
            continue
        name, sep, values = part.partition("=")
        name = name.strip()
        if not sep:
            raise ValueError(f"{part.strip()!r}: expected FIELD=V1,V2,...")
        if name in grid:
            raise ValueError(f"{name} appears twice")
        if name in NUMBER_FIELDS:
            try:
                parsed = [NUMBER_FIELDS[name](v.strip()) for v in values.split(",")]
            except ValueError:
                raise ValueError(f"{name}: values must be {NUMBER_FIELDS[name].__name__}s, got {values!r}") from None
        elif name in LAYER_FIELDS:
            parsed = [parse_layers(v) for v in values.split(",")]
        elif name in CHOICE_FIELDS:
            parsed = [v.strip() for v in values.split(",")]
            bad = [v for v in parsed if v not in CHOICE_FIELDS[name]]
            if bad:
                raise ValueError(f"{name}: values must be among {CHOICE_FIELDS[name]}, got {bad}")
        else:
            known = list(NUMBER_FIELDS) + list(CHOICE_FIELDS) + list(LAYER_FIELDS)
            raise ValueError(f"unknown field {name!r}; use {', '.join(known)}")
        if len(set(parsed)) != len(parsed):
            raise ValueError(f"{name} lists a value twice")
        grid[name] = parsed
    if not grid:
        raise ValueError("empty grid")
    return grid


@dataclasses.dataclass
class Candidate:
    name: str         # directory name under DIR/dev/
    index: int        # position in grid order
    overrides: dict   # the grid's values for this combination
    config: object    # StepFlowConfig

    def perturbation(self) -> tuple:
        c = self.config
        oeb = c.oeb_tau_max if c.oeb_rule == "bridge" else c.oeb_strength
        smi = c.smi_alpha if c.smi_rule == "value" else c.smi_gamma
        return (oeb * len(c.oeb_layers), smi * len(c.smi_layers), self.index)


def _value_name(value) -> str:
    if isinstance(value, tuple):
        from ..console import span

        return span(value).replace(",", "+") if value else "none"
    return f"{value:g}" if isinstance(value, float) else str(value)


def expand(grid: dict, base, model) -> list[Candidate]:
    """Every combination of the grid as a StepFlowConfig on top of `base` (default_for(model) if None)."""
    from .. import hf
    from ..config import StepFlowConfig

    base = base if base is not None else StepFlowConfig.default_for(model)
    fields = list(grid)
    out = []
    for index, values in enumerate(itertools.product(*(grid[f] for f in fields))):
        overrides = dict(zip(fields, values))
        config = StepFlowConfig.from_dict(base.to_dict() | overrides)
        config.check_layers(hf.num_layers(model))
        name = "_".join(f"{SHORT[f]}{_value_name(v)}" for f, v in overrides.items())
        out.append(Candidate(name, index, overrides, config))
    return out


RULE = ("highest dev pass@1; ties (equal pass@1) go to the smaller perturbation: smaller OEB size (τ_max, or λ "
        "for odds) × |OEB layers|, then smaller SMI size (α, or γ for residual) × |SMI layers|, then the earlier grid "
        "entry")


def choose(results: list[tuple[Candidate, dict]], baseline: dict | None = None) -> dict:
    """The chosen candidate (see RULE) with every candidate's dev score, as written to chosen.json."""
    scored = []
    for cand, summary in results:
        acc = (summary or {}).get("accuracy") or {}
        scored.append((acc.get("pass@1"), cand, acc))
    usable = [s for s in scored if s[0] is not None]
    if not usable:
        raise ValueError("no config completed any dev item: nothing to choose from")
    best = max(s[0] for s in usable)
    tied = [s for s in usable if abs(s[0] - best) <= 1e-12]
    _, winner, acc = min(tied, key=lambda s: s[1].perturbation())
    return {"name": winner.name, "config": winner.config.to_dict(), "overrides": _jsonable(winner.overrides),
            "dev_pass@1": best, "dev_ci95": acc.get("ci95"), "tied": [s[1].name for s in tied], "rule": RULE,
            "dev_baseline_pass@1": ((baseline or {}).get("accuracy") or {}).get("pass@1"),
            "candidates": [{"name": c.name, "overrides": _jsonable(c.overrides), "dev_pass@1": p,
                            "dev_ci95": a.get("ci95")} for p, c, a in scored]}


def _jsonable(overrides: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()}


def write_json(path: str, value) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(value, f, indent=2, allow_nan=False)
        f.write("\n")
