"""Imports run one way: core <- tokenizers <- latents <- generators, with eval above them (DEVELOPERS.md)."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYERS = ["core", "tokenizers", "latents", "generators", "eval"]


def imported_packages(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names & set(LAYERS)


def test_no_package_imports_a_layer_above_it():
    upward = []
    for rank, package in enumerate(LAYERS):
        for path in sorted((REPO / package).glob("*.py")):
            above = imported_packages(path) & set(LAYERS[rank + 1:])
            upward += [f"{path.relative_to(REPO)} imports {name}" for name in sorted(above)]
    assert not upward, upward
