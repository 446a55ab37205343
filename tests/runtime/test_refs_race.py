"""Concurrent ``anoclip refs`` runs adding the same image keep it once: ``write_bank`` drops, under the
artifact lock, the images whose content the bank it re-reads there already holds."""
from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from test_refs import manifest, sha, write_images

from anoclip_core.errors import BankError
from anoclip_core.refbank import ReferenceBank

GRID = 64  # the tiny model's 8 x 8 patch grid: rows per image


def stored(art: Path) -> ReferenceBank:
    return ReferenceBank.load(art / manifest(art)["references"]["bottle"]["file"])


def _two_lines(tmp_path: Path) -> tuple[Path, Path, str, str]:
    """Two good-image folders sharing one image (same bytes, another name); the second has one more.
    Returns both folders and the content sha256 of the shared and of the extra image."""
    a, b = tmp_path / "line_a", tmp_path / "line_b"
    shared = write_images(a, [7])[0]
    extra = write_images(b, [8])[0]
    shutil.copyfile(shared, b / "copy_of_7.png")
    return a, b, sha(shared), sha(extra)


def _build_both(art: Path, a: Path, b: Path) -> list[ReferenceBank]:
    """Both runs' banks, built before either is written (what two concurrent runs see)."""
    from anoclip.runtime import Detector
    from anoclip.runtime.refs import build_bank

    with Detector.load(art, backend="ort-cpu") as det:
        return [build_bank(det, "bottle", folder) for folder in (a, b)]


def _check_each_image_once(art: Path, base: ReferenceBank, banks: list[ReferenceBank], shared: str,
                           extra: str) -> None:
    bank = stored(art)
    assert bank.image_sha256.count(shared) == 1 and bank.image_sha256.count(extra) == 1
    assert bank.shots == base.shots + 2 and bank.size == base.size + 2 * GRID
    entry = manifest(art)["references"]["bottle"]
    assert (entry["shots"], entry["size"]) == (base.shots + 2, base.size + 2 * GRID)
    np.testing.assert_array_equal(bank.embeddings[: base.size], base.embeddings)
    for h in (shared, extra):  # each image's rows are the rows its run encoded
        src = next(b for b in banks if h in b.image_sha256)
        i, j = src.image_sha256.index(h), bank.image_sha256.index(h)
        np.testing.assert_array_equal(bank.embeddings[j * GRID : (j + 1) * GRID],
                                      src.embeddings[i * GRID : (i + 1) * GRID])


def test_two_racing_refs_runs_adding_the_same_image_keep_it_once(banked, tmp_path):
    from anoclip.runtime.refs import write_bank

    base = stored(banked)
    a, b, shared, extra = _two_lines(tmp_path)
    banks = _build_both(banked, a, b)
    assert all(shared in bk.image_sha256 for bk in banks)  # each run alone thinks the image is new
    start, errors = threading.Barrier(2), []

    def run(bank: ReferenceBank) -> None:
        start.wait()
        try:
            write_bank(banked, "bottle", bank, merge=True)
        except Exception as err:  # noqa: BLE001 - reported by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(bk,)) for bk in banks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    _check_each_image_once(banked, base, banks, shared, extra)


@pytest.mark.parametrize("first", [0, 1])
def test_either_order_of_two_overlapping_writes_keeps_each_image_once(banked, tmp_path, first):
    """Both interleavings the lock allows: the second writer drops the shared image (order 0: one of its two
    images; order 1: its only image, so nothing is written and the stored entry is returned)."""
    from anoclip.runtime.refs import write_bank

    base = stored(banked)
    a, b, shared, extra = _two_lines(tmp_path)
    banks = _build_both(banked, a, b)
    write_bank(banked, "bottle", banks[first], merge=True)
    before = manifest(banked)
    second = write_bank(banked, "bottle", banks[1 - first], merge=True)
    assert second == manifest(banked)["references"]["bottle"]
    if first == 1:
        assert manifest(banked) == before  # nothing new: not rewritten
    _check_each_image_once(banked, base, banks, shared, extra)


def test_a_coreset_bank_repeating_a_stored_image_is_refused(banked, tmp_path):
    from anoclip.runtime.refs import reduce, write_bank

    a, b, _, _ = _two_lines(tmp_path)
    first, second = _build_both(banked, a, b)
    write_bank(banked, "bottle", first, merge=True)
    before = {p: p.read_bytes() for p in banked.rglob("*") if p.is_file()}
    with pytest.raises(BankError, match=r"repeating images already in it.*not 64 per image"):
        write_bank(banked, "bottle", reduce(second, 10, 0), merge=True)
    assert {p: p.read_bytes() for p in banked.rglob("*") if p.is_file()} == before
