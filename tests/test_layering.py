"""The dependency rule of the README's Layout section, checked on the source: imports flow one way.

`config -> model -> export_model -> quantize -> memory -> targets -> validation -> pipeline -> cli`;
sibling targets never import each other; `validation/` imports only the model, the target interface, the
size model and the leaf utilities (errors, atomic writes);
no private name is imported across modules; only the CLI defers imports of its own package (so that
`--help` does not load torch)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"exporter": "mobilellm.exporter", "validation": "mobilellm.validation"}

# Every module, each importing only modules earlier in this list.
ORDER = [
    "exporter.errors",
    "exporter.threads",
    "exporter.config",
    "exporter.assets",
    "exporter.atomic",
    "exporter.progress",
    "exporter.bundle",
    "exporter.tokenizer",
    "exporter.hub",
    "exporter.model",
    "exporter.checkpoint",
    "exporter.export_model",
    "exporter.mixed_precision",
    "exporter.quantize",
    "exporter.memory",
    "exporter.targets.base",
    "exporter.targets",
    "exporter.targets.coreml_eval",
    "exporter.targets.executorch",
    "exporter.targets.coreml",
    "exporter.targets.onnx",
    "validation.metrics",
    "validation.sequences",
    "validation.parity",
    "validation.plots",
    "validation.reports",
    "validation",
    "exporter.recipe",
    "exporter.measure",
    "exporter.sensitivity",
    "exporter.inspect",
    "exporter.random_checkpoint",
    "exporter.pipeline",
    "exporter.validate",
    "exporter.generate",
    "exporter.release",
    "exporter.cli",
    "exporter",
]
SIBLING_TARGETS = {"exporter.targets.executorch", "exporter.targets.coreml", "exporter.targets.onnx"}
# The model, the target interface, the size model (the pictures draw a manifest's size), and the two leaf
# utilities (errors, atomic file writes).
VALIDATION_MAY_IMPORT = {
    "exporter.errors",
    "exporter.atomic",
    "exporter.memory",
    "exporter.model",
    "exporter.targets.base",
    "exporter.targets",
}


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, bool, list[str]]]:
    """(imported module in ORDER's naming, deferred inside a function, names imported) per import."""
    me = _module(path).split(".")
    package = me if path.name == "__init__.py" else me[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = package[: len(package) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
            for folder, name in PACKAGES.items():
                if target == name or target.startswith(name + "."):
                    target = folder + target[len(name) :]
                    break
            else:
                continue
        out.append((target, node.col_offset > 0, [alias.name for alias in node.names]))
    return out


def _sources() -> list[Path]:
    return sorted(p for folder in PACKAGES for p in (ROOT / folder).rglob("*.py"))


def test_every_module_is_placed() -> None:
    assert sorted(_module(p) for p in _sources()) == sorted(ORDER)


def test_imports_flow_one_way() -> None:
    problems = []
    for path in _sources():
        me = _module(path)
        for target, deferred, names in _imports(path):
            if target not in ORDER:  # `from .targets import onnx`-style module imports
                target = target.rsplit(".", 1)[0]
            if ORDER.index(target) >= ORDER.index(me):
                problems.append(f"{me} imports {target}, which comes after it")
            if me in SIBLING_TARGETS and target in SIBLING_TARGETS:
                problems.append(f"{me} imports its sibling {target}")
            if me.startswith("validation") and target.startswith("exporter") and target not in VALIDATION_MAY_IMPORT:
                problems.append(
                    f"{me} imports {target}: validation depends only on the model, the target interface, the size model and the leaf utilities"
                )
            if deferred and me != "exporter.cli":
                problems.append(f"{me} defers its import of {target} into a function")
            problems += [f"{me} imports the private name {target}.{n}" for n in names if n.startswith("_")]
    assert problems == []


def test_bench_is_outside_the_package() -> None:
    import tomllib

    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert not any(p.startswith("bench") or "bench" in p.split(".") for p in setup["packages"])
    assert not (ROOT / "exporter" / "bench.py").exists() and not (ROOT / "exporter" / "bench_peers.py").exists()
