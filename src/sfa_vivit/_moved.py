"""Names that moved keep working for one release, with a DeprecationWarning that names the new place.

A moved module's old name (`sfa_vivit.checkpoints`) is the new module itself (`sfa_vivit.models.checkpoints`),
not a copy: code that patches or reads one sees the other. A moved function or class is found through the old
module's `__getattr__` (`moved_attribute`).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from typing import Any

# old module -> new module (release 0.2 removes the old names)
MODULES = {
    "sfa_vivit.runtime": "sfa_vivit.core.runtime",
    "sfa_vivit.storage": "sfa_vivit.core.storage",
    "sfa_vivit.progress": "sfa_vivit.core.progress",
    "sfa_vivit.plots": "sfa_vivit.core.plots",
    "sfa_vivit.lease": "sfa_vivit.core.lease",
    "sfa_vivit.checkpoints": "sfa_vivit.models.checkpoints",
    "sfa_vivit.importers": "sfa_vivit.models.importers",
    "sfa_vivit.mlflow_model": "sfa_vivit.models.mlflow_model",
    "sfa_vivit.membench": "sfa_vivit.tools.membench",
    "sfa_vivit.costmodel": "sfa_vivit.tools.costmodel",
    "sfa_vivit.evaluate": "sfa_vivit.tools.evaluate",
    "sfa_vivit.train.image_vit": "sfa_vivit.tools.synth_vit",
    "sfa_vivit.data.annotations": "sfa_vivit.data.prep.annotations",
    "sfa_vivit.data.video": "sfa_vivit.data.prep.video",
    "sfa_vivit.data.synth": "sfa_vivit.data.prep.synth",
}


def _warn(old: str, new: str, stacklevel: int) -> None:
    """The warning, attributed to the code that used the old name (the import system's frames are skipped)."""
    warnings.warn(f"{old} has moved to {new}; the old name will be removed in sfa-vivit 0.2", DeprecationWarning,
                  stacklevel=stacklevel + 1)


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old module name and hands back the new module (with a warning)."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname not in MODULES:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: Any) -> Any:
        new = MODULES[spec.name]
        _warn(spec.name, new, stacklevel=2)
        module = importlib.import_module(new)
        self._own_spec = module.__spec__
        return module

    def exec_module(self, module: Any) -> None:
        # The import system has set the module's __spec__ to the alias's: give it back its own, so that it stays
        # the module it is (its name, its file) under both names.
        module.__spec__ = self._own_spec


def install() -> None:
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.append(_Alias())


def moved_attribute(module: str, name: str, table: dict[str, str]) -> Any:
    """For a module's `__getattr__`: `name` from the module `table` says it moved to, with a warning."""
    if name not in table:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    _warn(f"{module}.{name}", f"{table[name]}.{name}", stacklevel=3)
    return getattr(importlib.import_module(table[name]), name)
