"""The per-family statements of the conformance suite, collected.

A family of methods keeps its parameter-count formulas and its default-target roles in
``family_<name>.py`` beside this file (``FORMULAS``: registry name -> formula, as in formulas.py;
``DEFAULT_ROLES``: registry name -> {layout family: [roles]}, as in expected_targets.py;
``NOT_APPLICABLE``: refused (method, variant, model) cases with the reason, as in cases.py;
``STACK_OPTIONS``: config fields for the stacking suite's small layers, as in cases.py). They are
merged here into the tables the suite reads, once, when conftest imports this module; a name
stated twice is an error rather than a silent override.
"""

from __future__ import annotations

import importlib
import pathlib

import expected_targets
import formulas


def _merge(into: dict, extra: dict, what: str, source: str) -> None:
    twice = sorted(set(into) & set(extra))
    if twice:
        raise AssertionError(f"{source} states {what} for {twice}, already stated elsewhere")
    into.update(extra)


for _path in sorted(pathlib.Path(__file__).parent.glob("family_*.py")):
    _module = importlib.import_module(_path.stem)
    _merge(formulas.FORMULAS, getattr(_module, "FORMULAS", {}), "formulas", _path.name)
    _merge(expected_targets.DEFAULT_ROLES, getattr(_module, "DEFAULT_ROLES", {}), "default roles", _path.name)
    _merge(expected_targets.FROM_THE_MODEL, getattr(_module, "FROM_THE_MODEL", {}), "targets from the model",
           _path.name)

# after the tables above: importing cases collects the cases, which reads them
import cases  # noqa: E402

for _path in sorted(pathlib.Path(__file__).parent.glob("family_*.py")):
    _module = importlib.import_module(_path.stem)
    _merge(cases.NOT_APPLICABLE, getattr(_module, "NOT_APPLICABLE", {}), "refused cases", _path.name)
    _merge(cases.STACK_OPTIONS, getattr(_module, "STACK_OPTIONS", {}), "stacking options", _path.name)
