"""Issue 11 item 9: the installed packages live under ``anoclip.*``; a user's own ``runtime/`` folder
in the working directory does not shadow them, and no generic top-level name is installed."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_runtime_imports_from_a_directory_holding_a_runtime_folder(tmp_path):
    for name in ("runtime", "export", "benchmarks"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("raise ImportError('the user folder shadowed anoclip')\n")
    code = ("import anoclip.runtime as r, anoclip.runtime.contract as c, anoclip.export.cli, anoclip.benchmarks.cli; "
            "print(r.__file__); print(c.FORMAT)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    path, fmt = out.stdout.split()
    assert Path(path).resolve() == (ROOT / "runtime" / "__init__.py").resolve() and fmt == "anoclip-artifact"


def test_setup_installs_only_namespaced_packages():
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    packages = cfg["options"]["packages"].split()
    assert set(packages) == {"anoclip_core", "anoclip.export", "anoclip.runtime", "anoclip.runtime.backends",
                             "anoclip.benchmarks", "anoclip.demo"}
    scripts = dict(line.split(" = ") for line in cfg["options.entry_points"]["console_scripts"].strip().splitlines())
    assert all(target.startswith(("anoclip.", "anoclip_core.")) for target in scripts.values()), scripts


def test_no_code_imports_the_folders_by_their_bare_names():
    """Run from the repository root, ``from runtime.cli import ...`` would still work (the folder is on
    sys.path) and hide a name an installed user does not have: every import spells ``anoclip.*``."""
    import re

    folders = "export|runtime|benchmarks|anoclip_demo"
    bare = re.compile(rf"(?:^\s*|[\"';]\s*)(?:from|import)\s+(?:{folders})(?:\.|\s|$)", re.M)
    offenders = []
    for folder in ("anoclip_core", "export", "runtime", "benchmarks", "anoclip_demo", "tests", "tools"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for m in bare.finditer(path.read_text()):
                line = path.read_text().count("\n", 0, m.start()) + 1
                offenders.append(f"{path.relative_to(ROOT)}:{line}")
    assert not offenders, offenders
