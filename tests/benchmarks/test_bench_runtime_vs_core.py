"""``python -m anoclip.benchmarks.runtime_vs_core`` on the tiny model: a well-formed report whose core and
runtime sides compute the same scores (no timing is asserted)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from anoclip.benchmarks import runtime_vs_core
from anoclip.export import api

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def tiny_art(register_tiny, text_cache, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rvc") / "art"
    cfg = api.ExportConfig(backbone=register_tiny, classes=("bottle",), pretrained="none", out=out,
                           text_cache=str(text_cache), progress=False)
    return Path(api.export_artifact(cfg))


def test_report_and_same_scores(tiny_art, capsys):
    argv = ["--artifact", str(tiny_art), "--model-config", str(CONFIGS), "--batch", "2", "--reps", "3",
            "--warmup", "1", "--size", "50x70", "--threads", "1"]
    assert runtime_vs_core.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["backbone"] == "anoclip-tiny" and report["batch"] == 2 and report["original_size"] == [50, 70]
    assert report["max_score_diff_core_vs_runtime"] < 1e-5
    for name in ("core_end_to_end", "runtime_end_to_end", "core_network", "runtime_network"):
        r = report["results"][name]
        assert 0 < r["min_ms_per_image"] <= r["median_ms_per_image"]
    assert report["speedup_end_to_end"] > 0 and report["speedup_network"] > 0
    assert report["command"].startswith("python -m anoclip.benchmarks.runtime_vs_core --artifact")


def test_rejects_bad_counts(tiny_art):
    with pytest.raises(SystemExit):
        runtime_vs_core.main(["--artifact", str(tiny_art), "--reps", "0"])
