"""Every method registers itself on import; importing this package registers them all.

Each module under a family folder (``lowrank/``, ``adapters/``, ...) is imported here, in sorted
order: a method is added by adding its file, and nothing else lists it. Modules whose names start
with an underscore are helpers and are not imported. A Hugging Face PEFT format (``*_peft.py``)
imports the method it describes, so the order does not matter.
"""

import importlib as _importlib
import pkgutil as _pkgutil


def _import_all() -> list[str]:
    names = []
    for family in sorted(m.name for m in _pkgutil.iter_modules(__path__) if m.ispkg):
        package = _importlib.import_module(f"{__name__}.{family}")
        for module in sorted(m.name for m in _pkgutil.iter_modules(package.__path__)):
            if not module.startswith("_"):
                names.append(_importlib.import_module(f"{package.__name__}.{module}").__name__)
    return names


MODULES = _import_all()
