"""AnoCLIP.predict(..., references=bank) and the bank builder, on the tiny random model."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from anoclip_core.errors import BankError, InputError
from anoclip_core.refbank import ReferenceBank
from anoclip_core.scores import smooth_and_upsample

SQUARE = (slice(24, 40), slice(32, 48))  # rows, cols of a 2 x 2 patch block on the 64 px, 8 x 8 grid


def smooth_image(seed: int, size: int = 64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return cv2.GaussianBlur(rng.random((size, size, 3)).astype(np.float32), (9, 9), 0)


def brute_visual(local: np.ndarray, bank: np.ndarray) -> np.ndarray:
    """1 - max cosine per patch, an explicit loop over the bank rows."""
    best = np.full(local.shape[:-1], -np.inf)
    for row in bank.astype(np.float64):
        best = np.maximum(best, (local.astype(np.float64) * row).sum(-1))
    return 1.0 - best


def replicate_mean3(grid: np.ndarray) -> np.ndarray:
    """§4 smoothing written out: replicate-pad 1, 3 x 3 mean."""
    p = np.pad(grid, ((0, 0), (1, 1), (1, 1)), mode="edge")
    h, w = grid.shape[1:]
    return sum(p[:, i : i + h, j : j + w] for i in range(3) for j in range(3)) / 9.0


def test_pasted_foreign_square_is_found(tiny_model) -> None:
    clean = smooth_image(0)
    bank = tiny_model.build_references([clean])
    test = clean.copy()
    test[SQUARE] = np.random.default_rng(9).random((16, 16, 3)).astype(np.float32)
    maps, _ = tiny_model.predict(tiny_model.load_images([test]), "bottle", references=bank, visual_weight=1.0)
    y, x = np.unravel_index(int(maps[0].argmax()), maps[0].shape)
    assert SQUARE[0].start <= y < SQUARE[0].stop and SQUARE[1].start <= x < SQUARE[1].stop, (y, x)
    clean_map, _ = tiny_model.predict(tiny_model.load_images([clean]), "bottle", references=bank, visual_weight=1.0)
    assert float(clean_map.max()) < 1e-5 < float(maps.max())


def test_predict_fuses_as_documented(tiny_model) -> None:
    images = [smooth_image(s) for s in (1, 2, 3)]
    bank = tiny_model.build_references(images[:2])
    pixels = tiny_model.load_images(images[1:])
    text_maps, text_scores = tiny_model.predict(pixels, "bottle")
    maps, scores = tiny_model.predict(pixels, "bottle", references=bank, visual_weight=0.3)
    _, local = tiny_model.encode_image(pixels)
    grid = replicate_mean3(brute_visual(local.numpy(), bank.embeddings))
    visual_map = smooth_and_upsample(torch.from_numpy(brute_visual(local.numpy(), bank.embeddings)).float(), (64, 64))
    np.testing.assert_allclose(maps.numpy(), 0.7 * text_maps.numpy() + 0.15 * visual_map.numpy(), atol=1e-5)
    np.testing.assert_allclose(scores.numpy(), 0.7 * text_scores.numpy() + 0.15 * grid.max(axis=(1, 2)), atol=1e-5)
    zero_maps, zero_scores = tiny_model.predict(pixels, "bottle", references=bank, visual_weight=0.0)
    assert torch.equal(zero_maps, text_maps) and torch.equal(zero_scores, text_scores)


def test_builder_uses_the_local_embeddings(tiny_model, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr("anoclip_core.model.IMAGE_BATCH", 2)  # 3 images: two forwards
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"good_{i}.png"))
        cv2.imwrite(paths[-1], (smooth_image(10 + i) * 255).astype(np.uint8))
    bank = tiny_model.build_references(paths, source=str(tmp_path))
    _, local = tiny_model.encode_image(tiny_model.load_images(paths))
    np.testing.assert_array_equal(bank.embeddings, local.reshape(-1, local.shape[-1]).numpy())
    assert bank.images == ("good_0.png", "good_1.png", "good_2.png") and bank.shots == 3 and bank.size == 3 * 64
    assert (bank.backbone, bank.image_size, bank.patch_grid, bank.embed_dim) == ("anoclip-tiny", 64, (8, 8), 32)
    small = tiny_model.build_references(paths, coreset_size=20, seed=1)
    assert small.size == 20 and small.patches == 192 and small.coreset["size"] == 20 and small.coreset["radius"] > 0
    assert all(any(np.array_equal(r, b) for b in bank.embeddings) for r in small.embeddings)


def test_reference_errors(tiny_model, tiny24_model) -> None:
    with pytest.raises(InputError, match="no good images"):
        tiny_model.build_references([])
    other = tiny24_model.build_references([smooth_image(0, 32)])
    pixels = tiny_model.load_images([smooth_image(1)])
    with pytest.raises(BankError, match="built with backbone 'anoclip-tiny-24'"):
        tiny_model.predict(pixels, "bottle", references=other)
    narrow = ReferenceBank(other.embeddings[:, :16] / np.linalg.norm(other.embeddings[:, :16], axis=1, keepdims=True),
                           "anoclip-tiny", 64, (8, 8), ("x.png",))
    with pytest.raises(BankError, match="D = 16, the model has D = 32"):
        tiny_model.predict(pixels, "bottle", references=narrow)
    with pytest.raises(BankError, match="visual weight"):
        tiny_model.predict(pixels, "bottle", references=tiny_model.build_references([smooth_image(2)]),
                           visual_weight=-0.1)
