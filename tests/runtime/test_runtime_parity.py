"""Parity of the torch-free runtime (ONNX Runtime CPU) with the PyTorch core on the tiny model."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from anoclip.runtime.postprocess import anomaly_map
from anoclip_core.scores import state_probs

S = 64


def _images():
    rng = np.random.default_rng(0)
    rgb = (rng.random((100, 150, 3)) * 255).astype(np.uint8)
    return [
        ("rgb8-square", (rng.random((S, S, 3)) * 255).astype(np.uint8), "RGB"),
        ("rgb8-100x150", rgb, "RGB"),
        ("bgr8-100x150", np.ascontiguousarray(rgb[:, :, ::-1]), "BGR"),
        ("gray16-33x47", (rng.random((33, 47)) * 65535).astype(np.uint16), "RGB"),
        ("rgba8-200x90", (rng.random((200, 90, 4)) * 255).astype(np.uint8), "RGB"),
        ("float-37x300", rng.random((37, 300, 3)).astype(np.float32), "RGB"),
        ("gray8-2x2", (rng.random((2, 2)) * 255).astype(np.uint8), "RGB"),
    ]


def core_outputs(model, image, order):
    pixels = model.load_images([image], order)
    maps, scores = model.predict(pixels, "bottle")
    glob, local = model.encode_image(pixels)
    probs = state_probs(local, model.encode_states("bottle"), model.temperature)  # [1, h, w]
    return maps[0].numpy(), float(scores[0]), probs


@pytest.mark.parametrize("name,image,order", _images(), ids=[i[0] for i in _images()])
def test_predict_matches_core(tiny_model, tiny_detector, name, image, order):
    core_map, core_score, core_probs = core_outputs(tiny_model, image, order)
    res = tiny_detector.predict(image, "bottle", channel_order=order)
    h, w = image.shape[:2]
    assert res.anomaly_map.shape == (h, w)
    assert abs(res.score - core_score) <= 1e-5
    # model-size map from the runtime's patch probabilities vs the core's map (S x S)
    from anoclip_core.transform import preprocess

    px = preprocess(image, tiny_detector.preprocess_config, order)[None]
    probs, scores = tiny_detector.infer_pixels(px, "bottle")
    np.testing.assert_allclose(anomaly_map(probs, (S, S))[0], core_map, atol=1e-4, rtol=0)
    # original-size map vs torch's align_corners bilinear of the core's smoothed grid, straight to H x W
    x = F.avg_pool2d(F.pad(core_probs[:, None], (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    ref = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=True)[0, 0].numpy()
    np.testing.assert_allclose(res.anomaly_map, ref, atol=1e-4, rtol=0)


def test_file_inputs_match_core(tiny_model, tiny_detector, tmp_path):
    rng = np.random.default_rng(1)
    files = []
    img16 = (rng.random((70, 90, 3)) * 65535).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "a16.png"), img16)
    files.append(tmp_path / "a16.png")
    gray = (rng.random((50, 40)) * 255).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "g.png"), gray)
    files.append(tmp_path / "g.png")
    bgra = (rng.random((64, 80, 4)) * 255).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "c.png"), bgra)
    files.append(tmp_path / "c.png")
    results = tiny_detector.predict_batch([str(f) for f in files], "bottle", batch=2)
    for f, res in zip(files, results, strict=True):
        core_map, core_score, _ = core_outputs(tiny_model, str(f), "RGB")
        assert res.ok and res.path == str(f)
        assert abs(res.score - core_score) <= 1e-5
        single = tiny_detector.predict(str(f), "bottle")
        np.testing.assert_allclose(res.anomaly_map, single.anomaly_map, atol=1e-6)


def test_batch_equals_single_and_core_batch(tiny_model, tiny_detector):
    rng = np.random.default_rng(2)
    imgs = [(rng.random((S, S, 3)) * 255).astype(np.uint8) for _ in range(5)]
    batch = tiny_detector.predict_batch(imgs, "carpet", batch=3)
    maps, scores = tiny_model.predict(tiny_model.load_images(imgs), "carpet")
    for i, res in enumerate(batch):
        assert abs(res.score - float(scores[i])) <= 1e-5
        np.testing.assert_allclose(res.anomaly_map, maps[i].numpy(), atol=1e-4, rtol=0)


def test_all_graph_outputs_match_core(tiny_model, tiny_detector):
    rng = np.random.default_rng(3)
    px = rng.standard_normal((3, 3, S, S)).astype(np.float32)
    out = tiny_detector.run_graph(px, "bottle", ("global_embedding", "local_embeddings", "local_tokens"))
    g, loc = tiny_model.encode_tokens(torch.from_numpy(px))
    np.testing.assert_allclose(out["local_tokens"], loc.numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(out["global_embedding"], F.normalize(g, dim=-1).numpy(), atol=1e-5)
    np.testing.assert_allclose(out["local_embeddings"], F.normalize(loc, dim=-1).numpy(), atol=1e-5)


def test_tta_matches_core(tiny_model, tiny_detector):
    rng = np.random.default_rng(4)
    img = (rng.random((S, S, 3)) * 255).astype(np.uint8)
    maps, scores = tiny_model.predict(tiny_model.load_images([img]), "bottle", tta=True)
    res = tiny_detector.predict(img, "bottle", tta=True)
    plain = tiny_detector.predict(img, "bottle")
    assert abs(res.score - float(scores[0])) <= 1e-5
    np.testing.assert_allclose(res.anomaly_map, maps[0].numpy(), atol=1e-4, rtol=0)
    assert np.abs(res.anomaly_map - plain.anomaly_map).max() > 1e-4  # TTA really ran


def test_tiled_square_image_equals_plain(tiny_detector):
    """A single tile covering the whole image is exactly the untiled pipeline."""
    img = (np.random.default_rng(5).random((120, 120, 3)) * 255).astype(np.uint8)
    a = tiny_detector.predict(img, "bottle")
    b = tiny_detector.predict(img, "bottle", tile=True)
    assert b.tiles == 1
    np.testing.assert_allclose(a.anomaly_map, b.anomaly_map, atol=1e-6)
    assert a.score == pytest.approx(b.score, abs=1e-7)
