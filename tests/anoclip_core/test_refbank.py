"""Reference bank (few-shot): search, coreset, file format, fusion rule and errors, against brute force."""
from __future__ import annotations

import itertools
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from anoclip_core import refbank
from anoclip_core.errors import BankError
from anoclip_core.refbank import ReferenceBank, coverage_radius, fuse, fuse_image_score, greedy_coreset
from anoclip_core.scores import visual_anomaly as visual_anomaly_torch


def unit_rows(rng: np.random.Generator, *shape: int) -> np.ndarray:
    x = rng.standard_normal(shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_bank(n: int = 5, d: int = 8, **kwargs) -> ReferenceBank:
    args = dict(backbone="anoclip-tiny", image_size=64, patch_grid=(8, 8), images=("a.png", "b.png"), source="unit")
    args.update(kwargs)
    return ReferenceBank(unit_rows(np.random.default_rng(0), n, d), **args)


# search -----------------------------------------------------------------------------------------
def brute_visual(local: np.ndarray, bank: np.ndarray) -> np.ndarray:
    """1 - max cosine, one query and one bank row at a time in float64."""
    out = np.zeros(local.shape[:-1])
    for idx in np.ndindex(*local.shape[:-1]):
        q = local[idx].astype(np.float64)
        out[idx] = 1.0 - max(sum(float(a) * float(b) for a, b in zip(q, row, strict=True)) for row in bank)
    return out


@pytest.mark.parametrize("chunk", [1, 3, 4096])
def test_search_matches_brute_force(chunk: int) -> None:
    rng = np.random.default_rng(1)
    local, bank = unit_rows(rng, 2, 3, 4, 6), unit_rows(rng, 7, 6)
    want = brute_visual(local, bank)
    np.testing.assert_allclose(refbank.visual_anomaly(local, bank, chunk), want, atol=1e-6)
    got = visual_anomaly_torch(torch.from_numpy(local), torch.from_numpy(bank), chunk).numpy()
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_search_is_zero_on_a_bank_member_and_checks_shapes() -> None:
    rng = np.random.default_rng(2)
    bank = unit_rows(rng, 5, 4)
    assert np.allclose(refbank.visual_anomaly(bank[None, None, 1:3], bank), 0.0, atol=1e-6)
    with pytest.raises(BankError, match="do not fit"):
        refbank.visual_anomaly(unit_rows(rng, 1, 2, 2, 3), bank)


# coreset ----------------------------------------------------------------------------------------
def brute_k_center(x: np.ndarray, start: int, k: int) -> list[int]:
    """Greedy k-center from ``start``: each step the point whose nearest chosen point is farthest."""
    chosen = [start]
    while len(chosen) < k:
        far = [min(math.dist(x[i], x[c]) for c in chosen) for i in range(len(x))]
        chosen.append(int(np.argmax(far)))
    return chosen


def brute_radius(x: np.ndarray, chosen: list[int]) -> float:
    return max(min(math.dist(x[i], x[c]) for c in chosen) for i in range(len(x)))


def test_coreset_follows_the_greedy_k_center_sequence() -> None:
    x = np.random.default_rng(3).standard_normal((40, 5)).astype(np.float32)
    idx = greedy_coreset(x, 9, seed=7)
    assert idx.shape == (9,) and len(set(idx.tolist())) == 9
    assert idx.tolist() == brute_k_center(x.astype(np.float64), int(idx[0]), 9)
    assert greedy_coreset(x, 9, seed=7).tolist() == idx.tolist()
    assert {int(greedy_coreset(x, 2, seed=s)[0]) for s in range(6)} != {int(idx[0])}


def test_coreset_coverage_radius_within_twice_the_optimum() -> None:
    x = np.random.default_rng(4).standard_normal((10, 3))
    k = 3
    idx = greedy_coreset(x, k, seed=0)
    radius = coverage_radius(x, idx)
    assert radius == pytest.approx(brute_radius(x, idx.tolist()), rel=1e-5)
    optimum = min(brute_radius(x, list(c)) for c in itertools.combinations(range(len(x)), k))
    assert optimum <= radius <= 2.0 * optimum + 1e-9


def test_coreset_sizes_and_projection() -> None:
    x = np.random.default_rng(5).standard_normal((30, 16)).astype(np.float32)
    assert greedy_coreset(x, 50).tolist() == list(range(30))
    proj = greedy_coreset(x, 6, seed=1, projection_dim=4)
    assert proj.shape == (6,) and len(set(proj.tolist())) == 6
    with pytest.raises(BankError, match="coreset size"):
        greedy_coreset(x, 0)


# fusion rule ------------------------------------------------------------------------------------
def test_fusion_is_winclip_plus_at_half_weight() -> None:
    text, visual = np.array([0.6, 0.2]), np.array([0.4, 1.6])
    # WinCLIP+: (zero-shot + (1 - max cos) / 2) / 2
    np.testing.assert_allclose(fuse(text, visual), [(0.6 + 0.2) / 2, (0.2 + 0.8) / 2])
    np.testing.assert_allclose(fuse(text, visual, 0.2), [0.8 * 0.6 + 0.1 * 0.4, 0.8 * 0.2 + 0.1 * 1.6])
    assert fuse_image_score(0.7, 1.0) == pytest.approx((0.7 + 0.5) / 2)
    np.testing.assert_array_equal(fuse(text, visual, 0.0), text)
    with pytest.raises(BankError, match="visual weight"):
        fuse(text, visual, 1.5)


# shots ------------------------------------------------------------------------------------------
def test_select_shots_is_seeded_and_checked() -> None:
    items = [f"{i}.png" for i in range(10)]
    a = refbank.select_shots(items, 3, seed=0)
    assert a == refbank.select_shots(items, 3, seed=0) and len(set(a)) == 3
    assert a == sorted(a, key=items.index)
    assert len({tuple(refbank.select_shots(items, 3, seed=s)) for s in range(3)}) == 3
    assert refbank.select_shots(items, None) == items
    with pytest.raises(BankError, match="asked for 11 shots"):
        refbank.select_shots(items, 11)


# file -------------------------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path: Path) -> None:
    bank = make_bank(coreset={"size": 5, "seed": 0, "projection_dim": None, "radius": 0.5}, patches=128)
    path = bank.save(tmp_path / "refs" / "bottle.npz")
    back = ReferenceBank.load(path)
    np.testing.assert_array_equal(back.embeddings, bank.embeddings)
    assert back.provenance() == bank.provenance()
    assert back.shots == 2 and back.size == 5 and back.patches == 128 and back.patch_grid == (8, 8)


def test_save_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = make_bank(n=3).save(tmp_path / "bank.npz")
    before = path.read_bytes()

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        make_bank(n=6).save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["bank.npz"]


# bad input --------------------------------------------------------------------------------------
def test_bank_validation_errors() -> None:
    bad = unit_rows(np.random.default_rng(0), 4, 8)
    bad[1, 2] = np.nan
    with pytest.raises(BankError, match="NaN or infinite"):
        ReferenceBank(bad, "anoclip-tiny", 64, (8, 8), ("a.png",))
    with pytest.raises(BankError, match="not L2-normalised"):
        ReferenceBank(2 * unit_rows(np.random.default_rng(0), 4, 8), "anoclip-tiny", 64, (8, 8), ("a.png",))
    with pytest.raises(BankError, match=r"\[N >= 1, D >= 1\]"):
        ReferenceBank(np.zeros((0, 8), np.float32), "anoclip-tiny", 64, (8, 8), ("a.png",))
    with pytest.raises(BankError, match="shots = 0"):
        ReferenceBank(unit_rows(np.random.default_rng(0), 4, 8), "anoclip-tiny", 64, (8, 8), ())


@pytest.mark.parametrize(
    "args, match",
    [
        (("ViT-B-16", 8, 64), "built with backbone 'anoclip-tiny'"),
        (("anoclip-tiny", 32, 64), "D = 8, the model has D = 32"),
        (("anoclip-tiny", 8, 224), "image size 64"),
    ],
)
def test_check_compatible(args: tuple, match: str) -> None:
    bank = make_bank()
    bank.check_compatible("anoclip-tiny", 8, 64)
    with pytest.raises(BankError, match=match):
        bank.check_compatible(*args)


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(BankError, match="not found"):
        ReferenceBank.load(tmp_path / "none.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(BankError, match="not a readable .npz"):
        ReferenceBank.load(tmp_path / "junk.npz")
    np.savez(tmp_path / "other.npz", embeddings=np.eye(2, dtype=np.float32))
    with pytest.raises(BankError, match="missing entry provenance"):
        ReferenceBank.load(tmp_path / "other.npz")
    bank = make_bank()
    meta = bank.provenance() | {"format_version": 99}
    np.savez(tmp_path / "new.npz", embeddings=bank.embeddings, provenance=np.array(json.dumps(meta)))
    with pytest.raises(BankError, match="newer"):
        ReferenceBank.load(tmp_path / "new.npz")
    nan = bank.embeddings.copy()
    nan[0, 0] = np.inf
    np.savez(tmp_path / "nan.npz", embeddings=nan, provenance=np.array(json.dumps(bank.provenance())))
    with pytest.raises(BankError, match=r"nan.npz: .*NaN or infinite"):
        ReferenceBank.load(tmp_path / "nan.npz")


def test_refbank_is_torch_free() -> None:
    import subprocess
    import sys

    code = "import sys, anoclip_core.refbank; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
