"""Export targets: siblings behind one small interface, looked up by name.

A target module exposes `export(model, options, out_dir) -> TargetResult`; adding a target means
adding a module and one line to `_MODULES`, nothing else.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import UserError

TARGET_NAMES: tuple[str, ...] = ("executorch", "coreml", "onnx")
_MODULES: dict[str, str] = {}  # name -> module, filled in as targets land


def load_target(name: str) -> ModuleType:
    if name not in TARGET_NAMES:
        raise UserError(f"unknown target {name!r}; choose one of {', '.join(TARGET_NAMES)} or all")
    if name not in _MODULES:
        raise UserError(f"the {name} target is not available in this version yet; choose one of: {', '.join(_MODULES) or 'none yet'}")
    return importlib.import_module(_MODULES[name], __name__)
