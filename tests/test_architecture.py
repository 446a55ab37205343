"""The layering drawn in docs/ARCHITECTURE.md, checked against the actual import statements."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("anoclip_core", "export", "runtime", "benchmarks", "anoclip_demo")
NAMESPACED = {"anoclip.export": "export", "anoclip.runtime": "runtime", "anoclip.benchmarks": "benchmarks",
              "anoclip.demo": "anoclip_demo"}


def _imports(path: Path) -> set[str]:
    """Absolute module names imported anywhere in a file (relative imports resolved)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    normal = set()
    for name in out:
        for ns, folder in NAMESPACED.items():
            if name == ns or name.startswith(ns + "."):
                name = folder + name[len(ns):]
        normal.add(name)
    return normal


def _package_imports(package: str) -> dict[str, set[str]]:
    return {str(p.relative_to(ROOT)): _imports(p) for p in sorted((ROOT / package).rglob("*.py"))}


def _top(name: str) -> str:
    return name.split(".")[0]


@pytest.mark.parametrize("package,forbidden", [
    ("anoclip_core", {"export", "runtime", "benchmarks", "anoclip_demo", "tensorrt"}),
    ("runtime", {"export", "benchmarks", "anoclip_demo", "torch", "open_clip"}),
    ("export", {"benchmarks", "anoclip_demo"}),
    ("benchmarks", {"anoclip_demo"}),
])
def test_dependencies_point_one_way(package, forbidden):
    for file, names in _package_imports(package).items():
        if file == "runtime/tta.py":  # the optional AnoCLIP+ hook, the one torch import of the runtime
            names = {n for n in names if _top(n) != "torch"}
        bad = sorted(n for n in names if _top(n) in forbidden)
        assert not bad, f"{file} imports {bad}"


def test_export_reads_the_runtime_only_through_the_contract():
    for file, names in _package_imports("export").items():
        runtime = sorted(n for n in names if _top(n) == "runtime" and n != "runtime")
        assert all(n == "runtime.contract" or n.startswith("runtime.contract.") for n in runtime), (
            file,
            runtime,
        )


def test_the_picture_lists_the_torch_free_core_modules_the_runtime_uses():
    used = set()
    for file, names in _package_imports("runtime").items():
        if file == "runtime/tta.py":  # imports the PyTorch core on purpose (AnoCLIP+)
            continue
        used |= {n.split(".")[1] for n in names if n.startswith("anoclip_core.") and len(n.split(".")) > 1}
    used = {n for n in used if (ROOT / "anoclip_core" / f"{n}.py").is_file()}
    doc = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    picture = doc[doc.index("anoclip_core torch-free modules"):doc.index("anoclip_core (the PyTorch method)")]
    missing = sorted(n for n in used if n not in picture)
    assert not missing, f"docs/ARCHITECTURE.md's picture does not list {missing}"
