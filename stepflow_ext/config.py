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


@dataclasses.dataclass(frozen=True)
class StepFlowConfig:
    """The StepFlow intervention (design.md 2.3 and 2.4).

    oeb_layers: layers whose attention becomes Odds-Equal Bridge attention (shallow layers).
    oeb_strength: lambda in [0, 1]; 0 is the identity, 1 gives equal odds.
    num_sink: the first valid keys that are never rebalanced (attention sinks).
    smi_layers: layers whose output hidden state gets Step Momentum Injection (deep layers).
    smi_beta: momentum in [0, 1); smi_gamma >= 0: residual size relative to the hidden state.
    """

    oeb_layers: tuple[int, ...] = ()
    oeb_strength: float = 0.5
    num_sink: int = 1
    smi_layers: tuple[int, ...] = ()
    smi_beta: float = 0.9
    smi_gamma: float = 0.05

    def __post_init__(self):
        set_ = object.__setattr__
        set_(self, "oeb_layers", _as_layers("oeb_layers", self.oeb_layers))
        set_(self, "smi_layers", _as_layers("smi_layers", self.smi_layers))
        set_(self, "oeb_strength", _number("oeb_strength", self.oeb_strength, 0.0, 1.0))
        set_(self, "smi_beta", _number("smi_beta", self.smi_beta, 0.0, 1.0, hi_open=True))
        gamma = self.smi_gamma
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 <= float(gamma) < float("inf"):
            raise ValueError(f"smi_gamma must be a finite number >= 0, got {gamma!r}")
        set_(self, "smi_gamma", float(gamma))
        if isinstance(self.num_sink, bool) or not isinstance(self.num_sink, int) or self.num_sink < 0:
            raise ValueError(f"num_sink must be a non-negative int, got {self.num_sink!r}")

    @classmethod
    def default_for(cls, model_or_num_layers, **overrides) -> "StepFlowConfig":
        """OEB on the shallow quarter of the layers, SMI on the deep quarter, lambda 0.5, gamma 0.05."""
        if isinstance(model_or_num_layers, int):
            n = model_or_num_layers
        else:
            from .hf import num_layers

            n = num_layers(model_or_num_layers)
        if n < 1:
            raise ValueError(f"the model must have at least one layer, got {n}")
        quarter = max(1, n // 4)
        fields = dict(oeb_layers=range(0, quarter), smi_layers=range(n - quarter, n), oeb_strength=0.5,
                      num_sink=1, smi_beta=0.9, smi_gamma=0.05)
        fields.update(overrides)
        return cls(**fields)

    def check_layers(self, num_layers: int) -> None:
        for name in ("oeb_layers", "smi_layers"):
            bad = [x for x in getattr(self, name) if x >= num_layers]
            if bad:
                raise ValueError(f"{name} {bad} out of range: the model has {num_layers} layers (0..{num_layers - 1})")

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
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown StepFlowConfig fields: {sorted(unknown)}")
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
