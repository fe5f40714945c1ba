"""Top-level packages form layers: no two import each other, imports inside functions included."""
import ast
from collections import defaultdict
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("models", "guard", "engine", "backends", "evals", "guard_training", "deployments", "jobs",
            "benchmarks", "scripts")


def imported_packages(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return {name.split(".")[0] for name in names} & set(PACKAGES)


def test_no_two_packages_import_each_other():
    edges = defaultdict(set)
    for package in PACKAGES:
        for path in (REPO_ROOT / package).rglob("*.py"):
            for imported in imported_packages(path) - {package}:
                edges[package].add(imported)
    cycles = sorted((a, b) for a in list(edges) for b in edges[a] if a < b and a in edges.get(b, ()))
    assert cycles == []


def test_the_model_registry_and_the_guard_runtime_sit_at_the_bottom():
    for package, allowed in (("models", set()), ("guard", {"models"})):
        imported = set().union(*(imported_packages(p) for p in (REPO_ROOT / package).rglob("*.py")))
        assert imported - {package} <= allowed, package
