"""``python -m anoclip.benchmarks.prefetch`` on the tiny model: a well-formed report whose two settings
give identical results (no timing is asserted)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from anoclip.benchmarks import prefetch
from anoclip.export import api


@pytest.fixture(scope="module")
def tiny_artifact(register_tiny, text_cache, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prefetch") / "art"
    cfg = api.ExportConfig(backbone=register_tiny, classes=("bottle",), pretrained="none", out=out,
                           text_cache=str(text_cache), progress=False)
    return Path(api.export_artifact(cfg))


def test_report_with_identical_results(tiny_artifact, capsys):
    argv = ["--artifact", str(tiny_artifact), "--batch", "2", "--images", "5", "--size", "40x60",
            "--strip", "32x300", "--reps", "2", "--warmup", "0", "--threads", "1"]
    assert prefetch.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["backbone"] == "anoclip-tiny" and report["batch_size"] == 2
    for section in ("batch", "strip"):
        r = report[section]
        assert r["identical"] is True and r["speedup_on_vs_off"] > 0
        for name in ("prefetch_on", "prefetch_off"):
            assert 0 < r[name]["min_ms"] <= r[name]["median_ms"]
    assert report["batch"]["images"] == 5 and report["strip"]["size"] == [32, 300]


def test_rejects_bad_counts(tiny_artifact):
    with pytest.raises(SystemExit):
        prefetch.main(["--artifact", str(tiny_artifact), "--reps", "0"])


def test_bad_artifact_or_precision_is_one_error_line(tiny_artifact, capsys):
    from anoclip_core.cli_errors import run_tool

    for argv, message in ((["--artifact", str(tiny_artifact) + "-missing"], "error: artifact folder not found"),
                          (["--artifact", str(tiny_artifact), "--precision", "fp99"],
                           "error: artifact has no 'fp99' model")):
        with pytest.raises(SystemExit) as exit_info:
            run_tool(lambda a=argv: prefetch.main(a))
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(message) and len(err.splitlines()) == 1
