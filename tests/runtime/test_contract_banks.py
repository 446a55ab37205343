"""``check_bank_files``: loads skip the reference banks (a damaged bank blocks only its class), but
``anoclip-export add-class`` and the decision to put a killed ``--force`` replace's new folder in place
verify them, with an error naming the bank file."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_refs import manifest

from anoclip.runtime import contract as mf
from anoclip_core.errors import ArtifactError


def _bank(art: Path) -> str:
    return manifest(art)["references"]["bottle"]["file"]


def _damage(art: Path, how: str) -> str:
    """Damage the bottle bank (the manifest still names it with its old sha256); returns its file name."""
    name = _bank(art)
    path = art / name
    if how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.unlink()
    return name


def _snapshot(art: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in art.rglob("*") if p.is_file()}


@pytest.mark.parametrize("how, problem", [("truncated", "does not match its sha256"), ("missing", "is missing")])
def test_check_bank_files_names_the_bank_file_and_the_repair(banked, how, problem):
    mf.check_bank_files(banked, manifest(banked))  # intact: nothing to say
    name = _damage(banked, how)
    mf.read_manifest(banked, check_files=True)  # a load still reads the artifact (the class alone is blocked)
    with pytest.raises(ArtifactError) as err:
        mf.check_bank_files(banked, manifest(banked))
    msg = str(err.value)
    assert name in msg and "class 'bottle'" in msg and problem in msg and "--replace" in msg and "\n" not in msg


# add-class ------------------------------------------------------------------------------------------
def test_add_class_refuses_a_damaged_bank_naming_it(banked):
    from anoclip.export.cli import cli

    name = _damage(banked, "truncated")
    before = _snapshot(banked)
    res = CliRunner().invoke(cli, ["add-class", str(banked), "cable", "--text-cache", "none", "--quiet"])
    lines = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert res.exit_code == 2 and len(lines) == 1, res.output
    assert name in lines[0] and "class 'bottle'" in lines[0] and "--replace" in lines[0]
    assert _snapshot(banked) == before


def test_add_class_rechecks_the_banks_under_the_lock(banked, monkeypatch):
    """A bank damaged while add-class encodes (unlocked) is caught by the locked re-read before the commit."""
    from anoclip.export import api

    encode = api.text.encode_classes
    damaged: list[str] = []

    def encode_then_damage(*args, **kwargs):
        out = encode(*args, **kwargs)
        damaged.append(_damage(banked, "truncated"))
        return out

    monkeypatch.setattr(api.text, "encode_classes", encode_then_damage)
    text_before = (banked / "text_embeddings.npz").read_bytes()
    with pytest.raises(ArtifactError, match="reference bank .* of class 'bottle'") as err:
        api.add_class(banked, "cable", text_cache=None, progress=False)
    assert damaged and damaged[0] in str(err.value)
    assert (banked / "text_embeddings.npz").read_bytes() == text_before and "cable" not in manifest(banked)["text"][
        "classes"]


def test_add_class_with_intact_banks_keeps_them(banked):
    from anoclip.export.api import add_class

    entry = manifest(banked)["references"]["bottle"]
    add_class(banked, "cable", text_cache=None, progress=False)
    m = manifest(banked)
    assert "cable" in m["text"]["classes"] and m["references"]["bottle"] == entry
    mf.check_bank_files(banked, m)


# the restore decision of a killed --force replace --------------------------------------------------
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _killed_replace(old: Path, new: Path, parent: Path) -> Path:
    """What a --force replace of ``parent/art`` killed between its renames leaves: the old artifact parked
    as ``.art.old-PID``, the new one still staged as ``.art.tmp-PID-x``, nothing at ``art``."""
    pid = _dead_pid()
    shutil.copytree(old, parent / f".art.old-{pid}")
    shutil.copytree(new, parent / f".art.tmp-{pid}-x")
    return parent / "art"


@pytest.mark.parametrize("how", ["truncated", "missing"])
def test_a_staged_artifact_with_a_damaged_bank_is_not_put_in_place(banked, tiny_artifact, tmp_path, how):
    assert mf.is_complete(banked)
    _damage(banked, how)
    assert not mf.is_complete(banked)
    out = _killed_replace(tiny_artifact, banked, tmp_path / "scene")
    notes = mf.recover_artifact(out)
    assert any("restored the previous artifact" in n for n in notes), notes
    assert manifest(out) == manifest(tiny_artifact)


def test_a_staged_artifact_with_intact_banks_is_put_in_place(banked, tiny_artifact, tmp_path):
    out = _killed_replace(tiny_artifact, banked, tmp_path / "scene")
    notes = mf.recover_artifact(out)
    assert any("completed the interrupted --force replace" in n for n in notes), notes
    assert manifest(out) == manifest(banked)
