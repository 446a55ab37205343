"""Class names that could not be used later (commas, newlines, control characters, blanks) and
unreadable classes files are refused up front by ``anoclip-export``, naming the class or the file."""
from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

BAD_NAMES = [("metal\nnut", r"'metal\nnut'"), ("a\tb", r"'a\tb'"), ("zip\x00per", r"'zip\x00per'"),
             ("esc\x1bape", r"'esc\x1bape'"), ("cable,wire", "'cable,wire' contains a comma"), ("   ", "non-empty")]


def _one_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


@pytest.mark.parametrize("name,needle", BAD_NAMES)
def test_add_class_refuses_unusable_names(tmp_path: Path, name: str, needle: str):
    from anoclip.export.cli import main

    # the artifact does not exist: the name is checked first, before anything is read
    line = _one_error(CliRunner().invoke(main, ["add-class", str(tmp_path / "art"), name]))
    assert needle in line


@pytest.mark.parametrize("classes,needle", [("bottle,metal\nnut", r"'metal\nnut'"), ("bottle,,carpet", "non-empty"),
                                            ("bottle, ,carpet", "non-empty"), ("bot\x07tle", r"'bot\x07tle'")])
def test_export_classes_option_refuses_unusable_names(tmp_path: Path, classes: str, needle: str):
    from anoclip.export.cli import main

    res = CliRunner().invoke(main, ["--backbone", "ViT-Nope", "--classes", classes, "--out", str(tmp_path / "o")])
    assert needle in _one_error(res)


@pytest.mark.parametrize("content,needle", [
    (b"bottle\ncar\x1bpet\n", r"'car\x1bpet'"),
    (b"bottle\n\tgrid\tscrew\n", r"'grid\tscrew'"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "is not a text file of class names"),
    (b"bottle\n\xff\xfe carpet\n", "not UTF-8"),
    (b"bottle\x00\ncarpet\n", "NUL bytes"),
])
def test_export_classes_file_refuses_binary_and_bad_names(tmp_path: Path, content: bytes, needle: str):
    from anoclip.export.cli import main

    f = tmp_path / "classes.txt"
    f.write_bytes(content)
    line = _one_error(CliRunner().invoke(main, ["--backbone", "ViT-Nope", "--classes-file", str(f),
                                                "--out", str(tmp_path / "o")]))
    assert needle in line
    if "text file" in needle or "UTF-8" in needle or "NUL" in needle:
        assert str(f) in line


def test_good_names_still_pass(tmp_path: Path):
    from anoclip.export.text import parse_classes, read_classes_file

    assert parse_classes(" bottle , metal_nut,pill-2 , screw top") == ["bottle", "metal_nut", "pill-2", "screw top"]
    f = tmp_path / "c.txt"
    f.write_bytes("\ufeffbottle\r\n# c\r\n\r\ncarpet, grid  # x\r\n".encode())
    assert read_classes_file(f) == ["bottle", "carpet", "grid"]
