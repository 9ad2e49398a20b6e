"""Config base class: every method config is a validated dataclass.

Fields shared by every method:

- ``targets``: which modules the method wraps. Each entry is an exact module name or a dotted
  name suffix (``"query"`` matches ``encoder.layer.0.attention.self.query``), a regular
  expression prefixed with ``re:`` (full match), a module type given as a class or as
  ``"type:Linear"``, or the special ``"all-linear"`` (every Linear except the output head).
  ``None`` means the method's defaults for the model's architecture.
- ``exclude``: the same syntax; matching modules are never wrapped.
- ``layers``: restrict the method to modules under these layer indices (the first integer
  component of the module name, e.g. ``encoder.layer.3.attention``).
- ``trainable_modules``: whole modules (e.g. a new classification head) trained and saved with
  the adapter; each adapter keeps its own copy.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import typing
from typing import Any, ClassVar

from torch import nn

from ..checks import _check_value, check, check_choice, check_number  # noqa: F401  (methods import them from here)
from .errors import DeltatuneError


def _normalise_pattern(p: Any, field: str) -> str:
    if isinstance(p, type) and issubclass(p, nn.Module):
        return f"type:{p.__name__}"
    if not isinstance(p, str) or not p:
        raise DeltatuneError(
            f"{field} entries must be non-empty strings (module name, suffix, 're:<regex>', "
            f"'type:<ClassName>' or 'all-linear') or nn.Module classes, got {p!r}")
    if p.startswith("re:"):
        import re
        try:
            re.compile(p[3:])
        except re.error as e:
            raise DeltatuneError(f"{field} entry {p!r} is not a valid regular expression: {e}") from None
    return p


def _pattern_list(value: Any, field: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, (str, type)):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise DeltatuneError(f"{field} must be a list of patterns, got {type(value).__name__}")
    return [_normalise_pattern(p, field) for p in value]


@dataclasses.dataclass
class BaseConfig:
    """Fields every method config has; see the module docstring."""

    method: ClassVar[str] = ""

    targets: list[str] | None = None
    exclude: list[str] = dataclasses.field(default_factory=list)
    layers: list[int] | None = None
    trainable_modules: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        self.targets = _pattern_list(self.targets, "targets")
        if self.targets is not None and not self.targets:
            raise DeltatuneError("targets is an empty list: give at least one pattern, or None for the defaults")
        self.exclude = _pattern_list(self.exclude, "exclude") or []
        self.trainable_modules = _pattern_list(self.trainable_modules, "trainable_modules") or []
        if self.layers is not None:
            if isinstance(self.layers, int):
                self.layers = [self.layers]
            if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.layers):
                raise DeltatuneError(f"layers must be a list of non-negative ints, got {self.layers!r}")
            self.layers = list(self.layers)
        check_field_types(self)
        self.validate()

    def validate(self) -> None:
        """Method-specific checks; raise DeltatuneError naming the field and the valid range."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BaseConfig":
        return cls(**d)


@functools.lru_cache(maxsize=None)
def _field_hints(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)}


def check_field_types(cfg: "BaseConfig") -> None:
    """Every field of a config against its annotation, generically: floats finite numbers (NaN or
    Inf would only surface as NaN outputs after training), ints real ints (not bool, not float)
    within int64, bools real bools. Ranges are the method's ``validate``."""
    for name, hint in _field_hints(type(cfg)).items():
        _check_value(name, getattr(cfg, name), hint)


# Hugging Face PEFT's names for our fields, so that a PEFT user's muscle memory gets a hint.
PEFT_NAMES = {"rank": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "target_modules": "targets",
              "modules_to_save": "trainable_modules", "use_rslora": "rslora", "init_lora_weights": "init",
              "layers_to_transform": "layers", "exclude_modules": "exclude", "feedforward_modules": "feedforward",
              "use_dora": "method 'dora'"}


def method_config(cls):
    """Class decorator: make ``cls`` a dataclass whose constructor rejects unknown fields with a
    suggestion of the closest valid one (instead of Python's bare TypeError)."""
    cls = dataclasses.dataclass(cls)
    init = cls.__init__
    names = [f.name for f in dataclasses.fields(cls)]

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        unknown = [k for k in kwargs if k not in names]
        if unknown:
            hints = []
            for k in unknown:
                close = [PEFT_NAMES[k]] if PEFT_NAMES.get(k) in names else difflib.get_close_matches(k, names, n=1)
                hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise DeltatuneError(
                f"{cls.__name__} got unknown field(s) {', '.join(hints)}; valid fields: {', '.join(names)}")
        init(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls
