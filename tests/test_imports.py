"""The package has no import circle: every fptq_onnx module imports (also lazily, inside functions)
only modules below it, and each imports on its own in a fresh interpreter."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "fptq_onnx"
ROOT = PACKAGE.parent


def _modules() -> dict[str, Path]:
    """fptq_onnx.* module name -> file (passes/ and models/ are importable as fptq_onnx.passes / .models)."""
    out = {}
    for base, prefix in ((PACKAGE, "fptq_onnx"), (ROOT / "passes", "fptq_onnx.passes"), (ROOT / "models", "fptq_onnx.models")):
        for path in sorted(base.rglob("*.py")):
            if "passes" in path.relative_to(base).parts[:1] or "models" in path.relative_to(base).parts[:1]:
                continue  # the dev symlinks inside fptq_onnx/ are the same files
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([prefix, *parts])] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """fptq_onnx modules `name` imports anywhere in its file."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in known and t != name}
    return found


def test_no_import_cycles():
    modules = _modules()
    graph = {name: _imports(name, path, set(modules)) for name, path in modules.items()}
    for name in graph:  # a package's own __init__ is imported first by any of its submodules: not an edge back
        graph[name] = {t for t in graph[name] if not name.startswith(t + ".")}
    cycles = []
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target, stack + [target])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("module", ["fptq_onnx.cli", "fptq_onnx.convert", "fptq_onnx.compare", "fptq_onnx.layer_walk",
                                    "fptq_onnx.sources", "fptq_onnx.loading", "fptq_onnx.algorithms.auto"])
def test_module_imports_alone(module):
    proc = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
