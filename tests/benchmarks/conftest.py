"""Make ``benchmarks`` / ``anoclip_core`` resolve to the real packages under a bare ``pytest``.

pytest puts ``tests/`` on ``sys.path`` (rootdir-relative conftest), and the test folders
``tests/benchmarks`` and ``tests/anoclip_core`` have no ``__init__.py``: without the repository
root ahead of them they would be imported as empty namespace packages that shadow the real ones
(the editable install's finder comes after ``sys.path``). ``python -m pytest`` from the root is
not affected (the working directory is on ``sys.path`` first).
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[2])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
