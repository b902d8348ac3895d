"""The tree is the design: cache/ at the bottom, engine/ and gateway/ on it and never on each other,
loadgen/ speaking HTTP. Checked on every import statement, and on what a fresh interpreter loads."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package -> the top-level modules of this project it may import
ALLOWED = {
    "cache": {"cache.api", "cache.prompt", "cache.wire", "cache.index", "cache.planning"},
    "engine": {"engine", "cache.api", "cache.prompt", "cache.wire", "cache.planning"},
    "gateway": {"gateway", "cache"},
    "loadgen": {"loadgen", "cache.api", "cache.prompt", "cache.planning"},
}
OURS = ("cache", "engine", "gateway", "loadgen")


def imports_of(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {n for n in names if n.split(".")[0] in OURS}


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_each_package_imports_only_the_layers_below_it(package: str) -> None:
    allowed = ALLOWED[package]
    wrong = {
        f"{path.relative_to(ROOT)}: {name}"
        for path in (ROOT / package).rglob("*.py")
        for name in imports_of(path)
        if not any(name == a or name.startswith(a + ".") for a in allowed) and name != "cache"
    }
    assert not wrong, "imports across layers:\n" + "\n".join(sorted(wrong))


def test_gateway_and_loadgen_load_neither_torch_nor_the_engine() -> None:
    code = (
        "import sys, gateway.app, gateway.serve, gateway.run, loadgen, loadgen.cli; "
        "bad = sorted(m for m in sys.modules if m == 'torch' or m == 'engine' or m.startswith('engine.')); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
