"""The floor plan, read from the source (docs/design.md, "Where things live"): arrows point only downward.

- `prism_tf` (math, Keras, and `prism_tf.federated`, a run without TFF) imports neither TFF, `tff_pipelines` nor
  `export`;
- `export` imports neither TFF nor `tff_pipelines`;
- only `tff_pipelines` imports TFF.
Imports inside functions count too: every ``import``/``from`` statement of every module is read with `ast`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "prism_tf": ("tensorflow_federated", "tff_pipelines", "export"),
    "export": ("tensorflow_federated", "tff_pipelines"),
}


def imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found


def test_the_reader_sees_imports_inside_functions(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from tff_pipelines.round import process\n    import tensorflow_federated as tff\n")
    assert imported_modules(source) == {"tff_pipelines.round", "tensorflow_federated"}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_upward_import(package):
    offenders = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for module in imported_modules(path):
            if any(module == bad or module.startswith(bad + ".") for bad in FORBIDDEN[package]):
                offenders.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not offenders, "\n".join(offenders)
