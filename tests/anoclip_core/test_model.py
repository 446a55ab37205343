"""The AnoCLIP front door: shapes, ranges, precision, preprocessing config, image loading."""
from __future__ import annotations

import json
import logging

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from anoclip_core import AnoCLIP, transform
from anoclip_core.errors import ModelError
from anoclip_core.model import RANDOM_WEIGHTS_WARNING
from anoclip_core.scores import image_views, state_probs
from anoclip_core.transform import PreprocessConfig


def _pixels(b: int, seed: int, size: int = 64) -> torch.Tensor:
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("b", [1, 3])
def test_encode_image_shapes_and_norms(tiny_model, b):
    glob, local = tiny_model.encode_image(_pixels(b, seed=b))
    assert glob.shape == (b, 32) and local.shape == (b, 8, 8, 32)
    assert glob.dtype == local.dtype == torch.float32
    torch.testing.assert_close(glob.norm(dim=-1), torch.ones(b))
    torch.testing.assert_close(local.norm(dim=-1), torch.ones(b, 8, 8))
    g_tok, l_tok = tiny_model.encode_tokens(_pixels(b, seed=b))
    assert g_tok.shape == (b, 32) and l_tok.shape == (b, 8, 8, 32)


@pytest.mark.parametrize("b", [1, 3])
def test_predict_shapes_and_ranges(tiny_model, b):
    maps, scores = tiny_model.predict(_pixels(b, seed=10 + b), "bottle")
    assert maps.shape == (b, 64, 64) and scores.shape == (b,)
    assert maps.dtype == scores.dtype == torch.float32
    assert torch.isfinite(maps).all() and torch.isfinite(scores).all()
    assert maps.min() >= 0 and maps.max() <= 1 and scores.min() >= 0 and scores.max() <= 1
    assert maps.std() > 0  # not a constant map


def test_predict_matches_components(tiny_model):
    """maps = §4 map of the local embeddings; scores = the 2-way softmax of the global one."""
    x = _pixels(3, seed=20)
    maps, scores = tiny_model.predict(x, "carpet")
    glob, local = tiny_model.encode_image(x)
    protos = tiny_model.encode_states("carpet")
    torch.testing.assert_close(scores, state_probs(glob, protos), atol=1e-6, rtol=0)
    p = state_probs(local, protos)
    padded = F.pad(p.unsqueeze(1), (1, 1, 1, 1), mode="replicate")
    smooth = F.avg_pool2d(padded, 3, stride=1)
    expected = F.interpolate(smooth, size=(64, 64), mode="bilinear", align_corners=True)[:, 0]
    torch.testing.assert_close(maps, expected, atol=1e-6, rtol=0)


def test_batch_equals_single(tiny_model):
    x = _pixels(3, seed=21)
    maps, scores = tiny_model.predict(x, "bottle")
    for i in range(3):
        m1, s1 = tiny_model.predict(x[i : i + 1], "bottle")
        torch.testing.assert_close(m1[0], maps[i], atol=1e-5, rtol=0)
        torch.testing.assert_close(s1[0], scores[i], atol=1e-5, rtol=0)


def test_view_scores(tiny_model):
    x = _pixels(2, seed=22)
    _, single = tiny_model.predict(x, "bottle")
    maps_v, multi = tiny_model.predict(x, "bottle", views=True)
    assert multi.shape == (2,) and multi.min() >= 0 and multi.max() <= 1
    assert (multi - single).abs().max() > 1e-6
    protos = tiny_model.encode_states("bottle")
    per_view = torch.stack([tiny_model.predict(v, "bottle")[1] for v in image_views(x)])
    assert per_view.shape == (22, 2)
    torch.testing.assert_close(multi, per_view.mean(0), atol=1e-5, rtol=0)
    torch.testing.assert_close(per_view[0], single)
    torch.testing.assert_close(maps_v, tiny_model.predict(x, "bottle")[0])  # views do not touch maps
    assert protos.shape == (2, 32)


@pytest.mark.parametrize("tta", [False, True])
def test_bf16_autocast_close_to_fp32(tiny_model, tta):
    x = _pixels(3, seed=23)
    maps, scores = tiny_model.predict(x, "bottle", tta=tta)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        maps_bf, scores_bf = tiny_model.predict(x, "bottle", tta=tta)
        glob_bf, local_bf = tiny_model.encode_image(x)
    assert maps_bf.dtype == scores_bf.dtype == torch.float32  # outputs stay float32
    assert glob_bf.dtype == torch.bfloat16  # ...while the encoder really ran in bf16
    glob, local = tiny_model.encode_image(x)
    assert (glob_bf.float() - glob).abs().max() < 0.05 and (local_bf.float() - local).abs().max() < 0.05
    assert (glob_bf.float() - glob).abs().max() > 0  # not silently fp32
    # tolerances scaled to the signal (maps spread ~0.017, scores ~0.0066 from 0.5; bf16 error ~6e-5):
    # a constant map/score (the mean) or swapped states (1 - p) must fail the same bound
    map_tol = 0.05 * float((maps - maps.mean()).abs().max())
    score_tol = 0.1 * float((scores - 0.5).abs().max())
    for wrong_maps, wrong_scores in (
        (torch.full_like(maps, float(maps.mean())), torch.full_like(scores, float(scores.mean()))),
        (1 - maps, 1 - scores),
    ):
        assert (wrong_maps - maps).abs().max() > map_tol and (wrong_scores - scores).abs().max() > score_tol
    torch.testing.assert_close(maps_bf, maps, atol=map_tol, rtol=0)
    torch.testing.assert_close(scores_bf, scores, atol=score_tol, rtol=0)


def test_temperature(tiny_model):
    x = _pixels(2, seed=24)
    sharp = AnoCLIP(tiny_model.clip, tiny_model.backbone, tiny_model.weights, temperature=0.01, cache_dir=None)
    maps1, scores1 = tiny_model.predict(x, "bottle")
    maps2, scores2 = sharp.predict(x, "bottle")
    assert ((scores2 - 0.5).abs() > (scores1 - 0.5).abs()).all()
    assert (maps2 - 0.5).abs().mean() > 5 * (maps1 - 0.5).abs().mean()
    with pytest.raises(ModelError, match="temperature"):
        AnoCLIP(tiny_model.clip, tiny_model.backbone, tiny_model.weights, temperature=0.0, cache_dir=None)


def test_preprocess_config_is_plain_data(tiny_model):
    cfg = tiny_model.preprocess_config
    assert isinstance(cfg, PreprocessConfig) and cfg.image_size == 64
    d = cfg.to_dict()
    text = json.dumps(d)  # plain JSON types only
    assert json.loads(text) == d
    assert set(d) == {"image_size", "mean", "std", "resize", "interpolation", "channel_order", "value_range"}
    assert all(isinstance(v, (int, float, str, list)) for v in d.values())
    assert PreprocessConfig.from_dict(json.loads(text)) == cfg
    np.testing.assert_allclose(d["mean"], transform.OPENAI_MEAN)
    np.testing.assert_allclose(d["std"], transform.OPENAI_STD)
    # unknown keys are ignored, missing optional ones take defaults
    assert PreprocessConfig.from_dict({"image_size": 64, "future_field": 1}) == PreprocessConfig(64)


def _write_png(path, rgb: np.ndarray) -> str:
    assert cv2.imwrite(str(path), rgb[:, :, ::-1])  # OpenCV writes BGR
    return str(path)


def test_load_images_paths_and_arrays(tiny_model, tmp_path):
    gen = np.random.default_rng(0)
    a = gen.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    b = gen.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    pa = _write_png(tmp_path / "a.png", a)
    from_paths = tiny_model.load_images([pa, tmp_path / "a.png"])
    from_arrays = tiny_model.load_images([a, a])
    assert from_paths.shape == (2, 3, 64, 64) and from_paths.dtype == torch.float32
    torch.testing.assert_close(from_paths, from_arrays, atol=0, rtol=0)
    mixed = tiny_model.load_images([b, pa])
    assert mixed.shape == (2, 3, 64, 64)
    expected = transform.preprocess_batch([b, a], tiny_model.preprocess_config)
    np.testing.assert_array_equal(mixed.numpy(), expected)
    bgr = tiny_model.load_images([np.ascontiguousarray(a[:, :, ::-1])], channel_order="BGR")
    torch.testing.assert_close(bgr, from_arrays[:1], atol=0, rtol=0)
    # values: a 64 x 64 image is not resized, so pixel (0, 0) is just normalised
    mean, std = np.array(transform.OPENAI_MEAN), np.array(transform.OPENAI_STD)
    np.testing.assert_allclose(mixed[0, :, 0, 0].numpy(), (b[0, 0] / 255.0 - mean) / std, atol=1e-5)


def test_predict_images_numpy(tiny_model, tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    maps, scores = tiny_model.predict_images([_write_png(tmp_path / "x.png", rgb), rgb], "bottle")
    assert isinstance(maps, np.ndarray) and maps.shape == (2, 64, 64) and scores.shape == (2,)
    np.testing.assert_allclose(maps[0], maps[1], atol=1e-6)


def test_properties_and_random_weights_warning(register_tiny, caplog):
    with caplog.at_level(logging.WARNING, logger="anoclip"):
        model = AnoCLIP.create(register_tiny, pretrained="none", cache_dir=None)
    assert RANDOM_WEIGHTS_WARNING in caplog.text
    assert model.random_weights and model.weights.kind == "none"
    assert model.image_size == 64 and model.grid_size == (8, 8) and model.embed_dim == 32
    assert model.device == torch.device("cpu")
    assert model.backbone == register_tiny


def test_random_weights_are_reproducible(register_tiny, tiny_model):
    again = AnoCLIP.create(register_tiny, pretrained=None, cache_dir=None)
    x = _pixels(1, seed=25)
    torch.testing.assert_close(again.encode_image(x)[1], tiny_model.encode_image(x)[1], atol=0, rtol=0)
    assert again.weights.cache_id == tiny_model.weights.cache_id


def test_image_size_override(register_tiny):
    model = AnoCLIP.create(register_tiny, pretrained=None, image_size=32, cache_dir=None)
    assert model.image_size == 32 and model.grid_size == (4, 4)
    assert model.preprocess_config.image_size == 32
    maps, _ = model.predict(_pixels(1, seed=26, size=32), "bottle")
    assert maps.shape == (1, 32, 32)


def test_weights_file_round_trip(tiny_model, register_tiny, tmp_path):
    import hashlib

    path = tmp_path / "tiny.pt"
    torch.save(tiny_model.clip.state_dict(), path)
    loaded = AnoCLIP.create(register_tiny, pretrained=str(path), cache_dir=None)
    assert loaded.weights.kind == "file" and not loaded.random_weights
    assert loaded.weights.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded.weights.cache_id != tiny_model.weights.cache_id
    x = _pixels(2, seed=27)
    torch.testing.assert_close(loaded.encode_image(x)[1], tiny_model.encode_image(x)[1], atol=1e-6, rtol=0)
