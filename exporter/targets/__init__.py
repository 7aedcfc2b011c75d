"""Export targets: siblings behind one small interface (`base.Target`), looked up by name.

Adding a target means adding its module (defining `TARGET`) and one line to `_MODULES` and `_RUNTIMES`;
no other target changes.
"""

from __future__ import annotations

import importlib
import importlib.util

from ..errors import UserError
from .base import (
    ExportedArtifact,
    GenerationRequest,
    GenerationResult,
    RunnerMetadata,
    Target,
    TargetOptions,
    TargetRuntime,
    TextSink,
)

__all__ = [
    "TARGET_NAMES",
    "ExportedArtifact",
    "GenerationRequest",
    "GenerationResult",
    "RunnerMetadata",
    "TextSink",
    "Target",
    "TargetOptions",
    "TargetRuntime",
    "load_target",
    "available_targets",
]

_MODULES: dict[str, str] = {"executorch": ".executorch", "coreml": ".coreml", "onnx": ".onnx"}
# The package each target lowers and runs with: a target is available when it is installed.
_RUNTIMES: dict[str, str] = {"executorch": "executorch", "coreml": "coremltools", "onnx": "onnxruntime"}
TARGET_NAMES: tuple[str, ...] = tuple(_MODULES)


def available_targets() -> list[str]:
    return [name for name in _MODULES if importlib.util.find_spec(_RUNTIMES[name]) is not None]


def load_target(name: str) -> Target:
    if name not in _MODULES:
        raise UserError(f"unknown target {name!r}; choose one of {', '.join(TARGET_NAMES)} or all")
    if name not in available_targets():
        raise UserError(
            f"the {name} target needs the {_RUNTIMES[name]} package, which is not installed; "
            f"pip install mobilellm-export (it pins {_RUNTIMES[name]}) or export to {', '.join(available_targets()) or 'no other target'}"
        )
    return importlib.import_module(_MODULES[name], __name__).TARGET
