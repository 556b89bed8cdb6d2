"""StepFlowConfig: which layers get the Odds-Equal Bridge and Step Momentum Injection, and how hard."""
from __future__ import annotations

import dataclasses
import json
from typing import Iterable


# The evaluation controls that can stand in for one of StepFlow's components (docs/method.md, "Controls").
CONTROLS = ("random-attn", "random-residual")


def _as_layers(name, value) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ValueError(f"{name} must be an iterable of layer indices (e.g. range(0, 7)), got {value!r}")
    layers = []
    for x in value:
        if isinstance(x, bool) or not isinstance(x, int):
            raise ValueError(f"{name} must hold ints, got {x!r}")
        if x < 0:
            raise ValueError(f"{name} must hold non-negative layer indices, got {x}")
        layers.append(int(x))
    if len(set(layers)) != len(layers):
        raise ValueError(f"{name} lists a layer twice: {layers}")
    return tuple(sorted(layers))


def _number(name, value, lo, hi, hi_open=False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    ok = (lo <= value < hi) if hi_open else (lo <= value <= hi)
    if not ok:
        raise ValueError(f"{name} must be in [{lo}, {hi}{')' if hi_open else ']'}, got {value}")
    return value


OEB_RULES = ("bridge", "odds")
SMI_RULES = ("value", "residual")
# Fields that only the earlier rules read: a JSON config that has them and names no rule was
# written before the paper's rules became the default (it meant odds / residual).
_OLD_OEB_FIELDS, _OLD_SMI_FIELDS = ("oeb_strength", "num_sink"), ("smi_beta", "smi_gamma")


def paper_layers(num_layers: int) -> tuple[range, tuple[int]]:
    """The paper's layers (design.md 2.5): OEB on 0..ceil(L/4)-1, SMI on the single layer L - ceil(L/4)."""
    quarter = -(-num_layers // 4)
    return range(0, quarter), (num_layers - quarter,)


@dataclasses.dataclass(frozen=True)
class StepFlowConfig:
    """The StepFlow intervention (design.md 2.3 and 2.4). Defaults are the paper's (its Table 8).

    Odds-Equal Bridge, in oeb_layers (shallow layers):
      oeb_rule "bridge" (the paper's): thinking tokens get at least tau_B of their attention on the
        question, summary tokens on the thinking; tau_B = min(sqrt(|B| / (|B| + |S|)), oeb_tau_max).
      oeb_rule "odds" (this project's earlier OEB): a token's odds of attending its current step
        over the earlier context become their (1 - oeb_strength) power; num_sink first keys untouched.
    Step Momentum Injection, in smi_layers (deep layers):
      smi_rule "value" (the paper's): the first token of each thinking step k >= 2 gets
        smi_alpha times the mean value vector of the last smi_window tokens of step k-1 added to
        each head's attention output.
      smi_rule "residual" (this project's earlier SMI): the hidden state leaving the layer gets
        smi_gamma * |h| / |m| * m, m the momentum (smi_beta) over completed steps' mean states.
    """

    oeb_layers: tuple[int, ...] = ()
    oeb_rule: str = "bridge"
    oeb_tau_max: float = 0.15
    oeb_strength: float = 0.5
    num_sink: int = 1
    smi_layers: tuple[int, ...] = ()
    smi_rule: str = "value"
    smi_alpha: float = 0.06
    smi_window: int = 4
    smi_beta: float = 0.9
    smi_gamma: float = 0.05

    def __post_init__(self):
        set_ = object.__setattr__
        set_(self, "oeb_layers", _as_layers("oeb_layers", self.oeb_layers))
        set_(self, "smi_layers", _as_layers("smi_layers", self.smi_layers))
        if self.oeb_rule not in OEB_RULES:
            raise ValueError(f"oeb_rule must be one of {OEB_RULES}, got {self.oeb_rule!r}")
        if self.smi_rule not in SMI_RULES:
            raise ValueError(f"smi_rule must be one of {SMI_RULES}, got {self.smi_rule!r}")
        tau = _number("oeb_tau_max", self.oeb_tau_max, 0.0, 1.0)
        if tau == 0:
            raise ValueError("oeb_tau_max must be in (0, 1], got 0.0 (use oeb_layers=() to switch OEB off)")
        set_(self, "oeb_tau_max", tau)
        set_(self, "oeb_strength", _number("oeb_strength", self.oeb_strength, 0.0, 1.0))
        set_(self, "smi_beta", _number("smi_beta", self.smi_beta, 0.0, 1.0, hi_open=True))
        for name in ("smi_gamma", "smi_alpha"):
            x = getattr(self, name)
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not 0 <= float(x) < float("inf"):
                raise ValueError(f"{name} must be a finite number >= 0, got {x!r}")
            set_(self, name, float(x))
        for name, lo in (("num_sink", 0), ("smi_window", 1)):
            x = getattr(self, name)
            if isinstance(x, bool) or not isinstance(x, int) or x < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {x!r}")

    @classmethod
    def default_for(cls, model_or_num_layers, **overrides) -> "StepFlowConfig":
        """The paper's configuration (design.md 2.5, its Table 8): bridge OEB on layers 0..ceil(L/4)-1
        with tau_max 0.15, value SMI on the single layer L - ceil(L/4) with alpha 0.06 and a window of
        4 tokens (28 layers: OEB 0-6, SMI 21). `overrides` replace any field."""
        if isinstance(model_or_num_layers, int) and not isinstance(model_or_num_layers, bool):
            n = model_or_num_layers
        else:
            from .hf import num_layers

            n = num_layers(model_or_num_layers)
        if n < 1:
            raise ValueError(f"the model must have at least one layer, got {n}")
        oeb, smi = paper_layers(n)
        fields = dict(oeb_layers=oeb, smi_layers=smi, oeb_rule="bridge", oeb_tau_max=0.15, smi_rule="value",
                      smi_alpha=0.06, smi_window=4)
        fields.update(overrides)
        return cls(**fields)

    def check_layers(self, num_layers: int) -> None:
        for name in ("oeb_layers", "smi_layers"):
            bad = [x for x in getattr(self, name) if x >= num_layers]
            if bad:
                raise ValueError(f"{name} {bad} out of range: the model has {num_layers} layers (0..{num_layers - 1})")

    def describe(self) -> str:
        """One line for tables and logs, e.g. "OEB bridge tau<=0.15 @0-6; SMI value alpha=0.06 w=4 @21"."""
        def span(layers):
            if not layers:
                return "none"
            runs, start = [], layers[0]
            for a, b in zip(layers, layers[1:] + (None,)):
                if b != a + 1:
                    runs.append(f"{start}-{a}" if a != start else f"{a}")
                    start = b
            return ",".join(runs)

        oeb = (f"bridge τ≤{self.oeb_tau_max:g}" if self.oeb_rule == "bridge"
               else f"odds λ={self.oeb_strength:g} sinks={self.num_sink}")
        smi = (f"value α={self.smi_alpha:g} w={self.smi_window}" if self.smi_rule == "value"
               else f"residual γ={self.smi_gamma:g} β={self.smi_beta:g}")
        return (f"OEB {oeb} @{span(self.oeb_layers)}" if self.oeb_layers else "OEB off") + "; " + \
               (f"SMI {smi} @{span(self.smi_layers)}" if self.smi_layers else "SMI off")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["oeb_layers"], d["smi_layers"] = list(self.oeb_layers), list(self.smi_layers)
        return d

    def to_json(self, path=None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            with open(path, "w") as f:
                f.write(text + "\n")
        return text

    @classmethod
    def from_dict(cls, d: dict) -> "StepFlowConfig":
        """A config from its dict. A dict written before the paper's rules became the default
        (it has oeb_strength / num_sink or smi_beta / smi_gamma and no oeb_rule / smi_rule) meant
        the earlier rules: it loads with oeb_rule="odds" / smi_rule="residual" and a warning that
        says how to write it today."""
        if not isinstance(d, dict):
            raise ValueError(f"a StepFlowConfig must be a dict, got {type(d).__name__}")
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown StepFlowConfig fields: {sorted(unknown)} (known: "
                             f"{', '.join(f.name for f in dataclasses.fields(cls))})")
        d = dict(d)
        inferred = []
        if "oeb_rule" not in d and any(f in d for f in _OLD_OEB_FIELDS):
            d["oeb_rule"] = "odds"
            inferred.append('"oeb_rule": "odds"')
        if "smi_rule" not in d and any(f in d for f in _OLD_SMI_FIELDS):
            d["smi_rule"] = "residual"
            inferred.append('"smi_rule": "residual"')
        if inferred:
            import warnings

            warnings.warn("this StepFlow config predates the paper's rules (it sets "
                          f"{', '.join(sorted(set(d) & set(_OLD_OEB_FIELDS + _OLD_SMI_FIELDS)))} but no rule): it is "
                          f"loaded with {' and '.join(inferred)}, the rules those fields belong to. Add "
                          f"{' and '.join(inferred)} to keep this meaning, or drop those fields for the paper's "
                          "bridge / value rules (StepFlowConfig.default_for(model).to_json()).", UserWarning,
                          stacklevel=2)
        return cls(**d)

    @classmethod
    def from_json(cls, text_or_path) -> "StepFlowConfig":
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            with open(text) as f:
                text = f.read()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"StepFlowConfig JSON is not valid: {e}") from None
        if not isinstance(data, dict):
            raise ValueError("StepFlowConfig JSON must be an object")
        return cls.from_dict(data)
