"""transform.py (torch-free preprocessing) against PIL and the reference torchvision pipeline."""
from __future__ import annotations

import subprocess
import sys

import cv2
import numpy as np
import pytest
from PIL import Image

from anoclip_core import transform
from anoclip_core.errors import InputError
from anoclip_core.transform import (
    PreprocessConfig,
    load_rgb,
    normalize_rgb,
    preprocess,
    preprocess_batch,
    read_image,
    resize_bilinear_antialias,
    resize_mask,
    to_rgb_float,
)

SIZES = [
    ((37, 53), (64, 64)),  # up
    ((300, 200), (240, 240)),  # mixed
    ((900, 700), (240, 240)),  # strong down (wide antialias filter)
    ((17, 23), (50, 31)),  # up, non-square
    ((240, 240), (240, 240)),  # identity
    ((256, 256), (224, 224)),  # mild down
    ((5, 3), (2, 2)),  # tiny
]


def _pil_resize(img: np.ndarray, h: int, w: int) -> np.ndarray:
    return np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR)).astype(np.float64)


def _smooth_image(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(h // 8, 2), max(w // 8, 2), 3)).astype(np.uint8)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


@pytest.mark.parametrize("src,dst", SIZES)
@pytest.mark.parametrize("kind", ["noise", "smooth", "gray"])
def test_resize_matches_pil_within_one_level(src, dst, kind):
    rng = np.random.default_rng(hash((src, dst)) % 2**32)
    if kind == "noise":
        img = rng.integers(0, 256, (*src, 3), dtype=np.uint8)
    elif kind == "smooth":
        img = _smooth_image(*src, seed=1)
    else:
        img = rng.integers(0, 256, src, dtype=np.uint8)
    ours = resize_bilinear_antialias(img.astype(np.float32), *dst)
    ref = _pil_resize(img, *dst)
    assert ours.shape == ref.shape
    err = np.abs(ours - ref)
    assert err.max() <= 1.01, err.max()
    if src != dst:
        assert err.mean() < 0.5  # PIL rounds to 8 bits twice; we do not: small, not systematic
    else:
        assert err.max() == 0


def _per_pixel_resize(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """Brute force: every output value as the float32 sum, taps in order from 0, of PIL's triangle
    weights (``_resample_taps``), rows first then columns, one output pixel at a time."""
    from anoclip_core.transform import _resample_taps

    ri, rw = _resample_taps(img.shape[0], height)
    ci, cw = _resample_taps(img.shape[1], width)
    rows = np.zeros((height,) + img.shape[1:], np.float32)
    for i in range(height):
        for k in range(ri.shape[1]):
            rows[i] += rw[i, k] * img[ri[i, k]]
    out = np.zeros((height, width) + img.shape[2:], np.float32)
    for j in range(width):
        for k in range(ci.shape[1]):
            out[:, j] += cw[j, k] * rows[:, ci[j, k]]
    return out


@pytest.mark.parametrize("shape,size", [((64, 48, 3), (20, 30)), ((37, 53), (80, 9)), ((30, 31, 4), (30, 31)),
                                        ((9, 200, 3), (24, 24)), ((256, 96, 3), (60, 24)), ((199, 101), (53, 41)),
                                        ((1, 6, 3), (5, 4)), ((2, 2, 3), (240, 24))])
def test_resize_is_bit_identical_to_the_per_pixel_sum(shape, size):
    """The vectorised passes add the same float32 products in the same order: equal, not close
    (strided tap groups where the ratio repeats, the gather where it does not)."""
    img = np.random.default_rng(7).random(shape, dtype=np.float32)
    got = resize_bilinear_antialias(img, *size)
    assert got.flags.c_contiguous and got.dtype == np.float32
    np.testing.assert_array_equal(got, _per_pixel_resize(img, *size))


def test_resize_is_not_plain_bilinear():
    """Downscaling 64 -> 20 must average (antialias), unlike OpenCV's INTER_LINEAR 2-tap sampling."""
    img = np.zeros((64, 64), np.float32)
    img[:, ::2] = 255.0  # 1-pixel stripes, mean 127.5
    ours = resize_bilinear_antialias(img, 20, 20)
    plain = cv2.resize(img, (20, 20), interpolation=cv2.INTER_LINEAR)
    assert abs(ours.mean() - 127.5) < 1.0
    assert ours.std() < 10 and plain.std() > 50


def test_resize_float_and_channels():
    rng = np.random.default_rng(3)
    img = rng.random((30, 40, 4)).astype(np.float32)
    out = resize_bilinear_antialias(img, 20, 10)
    assert out.shape == (20, 10, 4) and out.dtype == np.float32
    for c in range(4):  # channels are resized independently
        np.testing.assert_allclose(out[..., c], resize_bilinear_antialias(img[..., c], 20, 10), atol=1e-6)
    # a constant image stays constant (weights sum to one)
    np.testing.assert_allclose(resize_bilinear_antialias(np.full((13, 29), 0.3, np.float32), 31, 7), 0.3, atol=1e-6)


def test_uint16_scaling():
    rng = np.random.default_rng(4)
    img8 = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    img16 = img8.astype(np.uint16) * 257  # same intensities at 16 bits
    np.testing.assert_allclose(to_rgb_float(img16), to_rgb_float(img8), atol=1e-6)
    assert to_rgb_float(np.full((4, 4), 65535, np.uint16)).max() == pytest.approx(1.0)
    cfg = PreprocessConfig(24)
    np.testing.assert_allclose(preprocess(img16, cfg), preprocess(img8, cfg), atol=1e-5)


def test_gray_rgba_bgr():
    rng = np.random.default_rng(5)
    gray = rng.integers(0, 256, (20, 30), dtype=np.uint8)
    out = to_rgb_float(gray)
    assert out.shape == (20, 30, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray / np.float32(255))
    np.testing.assert_array_equal(to_rgb_float(gray[:, :, None]), out)  # H x W x 1
    pil_rgb = np.asarray(Image.fromarray(gray).convert("RGB")).astype(np.float32) / 255
    np.testing.assert_allclose(out, pil_rgb, atol=1e-7)

    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    rgba = np.concatenate([rgb, rng.integers(0, 256, (20, 30, 1), dtype=np.uint8)], axis=2)
    np.testing.assert_array_equal(to_rgb_float(rgba), to_rgb_float(rgb))  # alpha dropped like convert("RGB")
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    np.testing.assert_array_equal(to_rgb_float(bgr, "BGR"), to_rgb_float(rgb))
    bgra = np.ascontiguousarray(rgba[:, :, [2, 1, 0, 3]])
    np.testing.assert_array_equal(to_rgb_float(bgra, "BGR"), to_rgb_float(rgb))
    f = rgb.astype(np.float64) / 255
    np.testing.assert_allclose(to_rgb_float(f), to_rgb_float(rgb), atol=1e-7)


def test_read_image_files(tmp_path):
    rng = np.random.default_rng(6)
    rgb = rng.integers(0, 256, (12, 17, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "c.png"), rgb[:, :, ::-1])
    np.testing.assert_array_equal(read_image(tmp_path / "c.png"), rgb)  # RGB out
    rgb16 = rng.integers(0, 65536, (12, 17, 3), dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "c16.png"), rgb16[:, :, ::-1])
    r16 = read_image(tmp_path / "c16.png")
    assert r16.dtype == np.uint16
    np.testing.assert_array_equal(r16, rgb16)
    gray = rng.integers(0, 256, (12, 17), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "g.png"), gray)
    np.testing.assert_array_equal(read_image(tmp_path / "g.png"), gray)
    rgba = rng.integers(0, 256, (12, 17, 4), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "a.png"), rgba[:, :, [2, 1, 0, 3]])
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), rgba)
    np.testing.assert_array_equal(load_rgb(tmp_path / "a.png"), to_rgb_float(rgba[:, :, :3]))
    # files match what PIL decodes
    pil = np.asarray(Image.open(tmp_path / "c.png").convert("RGB"))
    np.testing.assert_array_equal(read_image(tmp_path / "c.png"), pil)


def test_preprocess_matches_reference_pipeline(tmp_path):
    """Resize((S, S)) on PIL, CenterCrop, ToTensor, Normalize(OpenAI) - as official vl_test.py."""
    tv = pytest.importorskip("torchvision.transforms")
    s = 48
    rng = np.random.default_rng(7)
    rgb = _smooth_image(90, 130, seed=7)
    noise = rng.integers(0, 256, (70, 50, 3), dtype=np.uint8)
    pipeline = tv.Compose(
        [
            tv.Resize((s, s), interpolation=tv.InterpolationMode.BILINEAR),
            tv.CenterCrop(s),
            tv.ToTensor(),
            tv.Normalize(transform.OPENAI_MEAN, transform.OPENAI_STD),
        ]
    )
    cfg = PreprocessConfig(s)
    tol = 1.01 / 255 / min(transform.OPENAI_STD)
    for img in (rgb, noise):
        ref = pipeline(Image.fromarray(img)).numpy()
        ours = preprocess(img, cfg)
        assert ours.shape == (3, s, s) and ours.dtype == np.float32
        assert np.abs(ours - ref).max() <= tol
    cv2.imwrite(str(tmp_path / "p.png"), rgb[:, :, ::-1])
    ref = pipeline(Image.open(tmp_path / "p.png")).numpy()
    assert np.abs(preprocess(tmp_path / "p.png", cfg) - ref).max() <= tol


def test_preprocess_batch_and_mask():
    rng = np.random.default_rng(8)
    imgs = [rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8) for i in range(3)]
    batch = preprocess_batch(imgs, PreprocessConfig(16))
    assert batch.shape == (3, 3, 16, 16) and batch.dtype == np.float32
    np.testing.assert_array_equal(batch[1], preprocess(imgs[1], PreprocessConfig(16)))
    mask = np.zeros((40, 40), np.uint8)
    mask[:20] = 255
    m = resize_mask(mask, 10)
    assert m.dtype == np.uint8 and set(np.unique(m)) == {0, 1}
    assert m[:5].all() and not m[5:].any()
    m3 = resize_mask(np.stack([mask] * 3, axis=2), 10)
    np.testing.assert_array_equal(m3, m)


def test_transform_does_not_import_torch():
    code = (
        "import sys, anoclip_core.transform, anoclip_core.timing; assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "arr,match",
    [
        (np.zeros((10, 10, 2), np.uint8), "H x W"),
        (np.zeros((10, 10, 5), np.uint8), "H x W"),
        (np.zeros((2, 10, 10, 3), np.uint8), "H x W"),
        (np.zeros(10, np.uint8), "H x W"),
        (np.zeros((1, 10, 3), np.uint8), "too small"),
        (np.zeros((10, 10, 3), np.int64), "unsupported dtype"),
        (np.zeros((10, 10, 3), bool), "unsupported dtype"),
        (np.full((10, 10, 3), 2.0, np.float32), r"\[0, 1\]"),
        (np.full((10, 10, 3), -0.5, np.float32), r"\[0, 1\]"),
        (np.full((10, 10, 3), np.nan, np.float32), "NaN"),
        (np.full((10, 10, 3), np.inf, np.float64), "NaN or infinite"),
    ],
)
def test_bad_arrays(arr, match):
    with pytest.raises(InputError, match=match) as info:
        to_rgb_float(arr)
    assert "\n" not in str(info.value)


def test_bad_types_and_files(tmp_path):
    with pytest.raises(InputError, match="numpy array or a file path"):
        to_rgb_float([[1, 2], [3, 4]])
    with pytest.raises(InputError, match="channel_order"):
        to_rgb_float(np.zeros((4, 4, 3), np.uint8), "RGBA")
    with pytest.raises(InputError, match="not found"):
        read_image(tmp_path / "missing.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        read_image(tmp_path / "empty.png")
    (tmp_path / "junk.png").write_bytes(b"this is not an image" * 10)
    with pytest.raises(InputError, match="cannot decode"):
        read_image(tmp_path / "junk.png")
    with pytest.raises(InputError, match="no images"):
        preprocess_batch([], PreprocessConfig(8))
    with pytest.raises(InputError, match="H x W"):
        resize_bilinear_antialias(np.zeros((2, 3, 4, 5), np.float32), 4, 4)
    with pytest.raises(InputError, match=r"cannot resize.*\(0, 3\)"):
        resize_bilinear_antialias(np.zeros((0, 3), np.float32), 4, 4)
    with pytest.raises(InputError, match="cannot resize"):
        resize_bilinear_antialias(np.zeros((5, 3), np.float32), 0, 4)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(image_size=0), "image_size"),
        (dict(image_size=8, resize="crop"), "resize"),
        (dict(image_size=8, interpolation="nearest"), "interpolation"),
        (dict(image_size=8, std=(0.2, 0.0, 0.2)), "std"),
        (dict(image_size=8, mean=(0.5, 0.5)), "mean"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(InputError, match=match):
        PreprocessConfig(**kwargs)


def test_from_dict_requires_image_size():
    with pytest.raises(InputError, match="image_size"):
        PreprocessConfig.from_dict({"mean": [0.5, 0.5, 0.5]})


def test_both_resample_paths_are_exercised_by_the_brute_force_cases():
    """The brute-force cases above cover tap groups (ratio 64 / 15, the 1024 -> 240 tile case) and the
    gather (199 -> 53: a ratio that does not repeat within ``MAX_TAP_GROUPS`` outputs)."""
    from anoclip_core.transform import MAX_TAP_GROUPS, _tap_groups

    groups = _tap_groups(256, 60)
    assert groups is not None and sum(g.count for g in groups) == 60
    assert _tap_groups(199, 53) is None and 53 > MAX_TAP_GROUPS
    one = _tap_groups(1, 5)  # every output reads the one input row: no rising progression, one group each
    assert one is not None and [g.count for g in one] == [1] * 5


def _windows_one_by_one(raw, boxes, side, cfg, order):
    return np.stack([normalize_rgb(to_rgb_float(raw[y:y + side, x:x + side], order), cfg) for y, x in boxes])


@pytest.mark.parametrize("kind", ["u8", "u8-gray", "u8-gray1", "u8-rgba", "u16", "u16-gray", "f32", "f32-gray"])
@pytest.mark.parametrize("order", ["RGB", "BGR"])
def test_preprocess_windows_equals_each_window_alone(kind, order):
    """Shared rows pass and uint8 tables: the same bits as pre-processing each window on its own,
    for windows on two rows, overlapping, out of order."""
    from anoclip_core.transform import preprocess_windows

    rng = np.random.default_rng(3)
    shapes = {"u8": (130, 300, 3), "u8-gray": (130, 300), "u8-gray1": (130, 300, 1), "u8-rgba": (130, 300, 4),
              "u16": (130, 300, 3), "u16-gray": (130, 300), "f32": (130, 300, 3), "f32-gray": (130, 300, 1)}
    if kind.startswith("f32"):
        raw = rng.random(shapes[kind], dtype=np.float32)
    else:
        hi = 65536 if kind.startswith("u16") else 256
        raw = rng.integers(0, hi, shapes[kind]).astype(np.uint16 if kind.startswith("u16") else np.uint8)
    cfg = PreprocessConfig(24)
    boxes = [(0, 0), (0, 48), (0, 236), (66, 120), (66, 10), (0, 100)]
    got = preprocess_windows(raw, boxes, 64, cfg, order)
    assert got.shape == (6, 3, 24, 24) and got.dtype == np.float32
    np.testing.assert_array_equal(got, _windows_one_by_one(raw, boxes, 64, cfg, order))


@pytest.mark.parametrize("side,size", [(24, 24), (37, 16)])
def test_preprocess_windows_without_a_resize_or_tap_groups(side, size):
    """A window already at the model size, and a ratio without tap groups, take the per-window path."""
    from anoclip_core.transform import preprocess_windows

    raw = np.random.default_rng(4).integers(0, 256, (60, 90, 3)).astype(np.uint8)
    cfg = PreprocessConfig(size)
    boxes = [(0, 0), (10, 40), (0, 53)]
    np.testing.assert_array_equal(preprocess_windows(raw, boxes, side, cfg),
                                  _windows_one_by_one(raw, boxes, side, cfg, "RGB"))


def test_preprocess_windows_checks_like_to_rgb_float():
    from anoclip_core.transform import preprocess_windows

    with pytest.raises(InputError, match="channel_order"):
        preprocess_windows(np.zeros((64, 64, 3), np.uint8), [(0, 0)], 64, PreprocessConfig(24), "RBG")
    with pytest.raises(InputError, match="unsupported dtype"):
        preprocess_windows(np.zeros((64, 64, 3), np.int32), [(0, 0)], 64, PreprocessConfig(24))


def test_preprocess_windows_names_the_whole_array_in_a_layout_error():
    """The layout is checked on the pixels it reads, not on a 2 x 2 corner: the message gives their shape."""
    from anoclip_core.transform import preprocess_windows

    with pytest.raises(InputError, match=r"got shape \(64, 64, 5\)"):
        preprocess_windows(np.zeros((64, 300, 5), np.uint8), [(0, 0)], 64, PreprocessConfig(24))


@pytest.mark.parametrize("shape,dtype", [((7, 5), np.float32), ((7, 5, 1), np.float32), ((7, 5, 3), np.float32),
                                         ((7, 5, 4), np.float32), ((7, 5, 5), np.float32), ((7, 5, 3), np.float64),
                                         ((0, 5, 3), np.float32)])
def test_swap_rows_cols_is_the_transposed_copy(shape, dtype):
    from anoclip_core.transform import _swap_rows_cols

    a = np.random.default_rng(0).random(shape).astype(dtype)
    for src in (a, a[:, ::-1]):  # contiguous and a reversed view
        got = _swap_rows_cols(src)
        assert got.shape == (shape[1], shape[0]) + shape[2:] and got.dtype == dtype and got.flags.c_contiguous
        assert np.array_equal(got, np.swapaxes(src, 0, 1))


def test_normalized_planes_equals_the_interleaved_formula():
    from anoclip_core.transform import _normalized_planes

    rng = np.random.default_rng(1)
    hwc = rng.random((9, 6, 3), dtype=np.float32)[:, :, ::-1]
    mean, std = rng.random(3, dtype=np.float32), rng.random(3, dtype=np.float32) + 0.1
    out = _normalized_planes(hwc, mean, std, np.empty((3, 9, 6), np.float32))
    assert out.tobytes() == np.ascontiguousarray(((hwc - mean) / std).transpose(2, 0, 1)).tobytes()
    gray = np.ascontiguousarray(hwc[:, :, 0])  # one plane standing for three equal channels
    out = _normalized_planes(gray, mean, std, np.empty((3, 9, 6), np.float32))
    assert out.tobytes() == np.ascontiguousarray(((gray[:, :, None] - mean) / std).transpose(2, 0, 1)).tobytes()


def test_normalize_rgb_of_a_one_channel_array_broadcasts_as_before_and_refuses_two():
    """Only an H x W x 3 image takes the per-plane path; one channel broadcasts over the three means
    (never planes left unwritten), two channels are refused."""
    from anoclip_core.transform import PreprocessConfig, _normalized_planes, normalize_rgb, resize_bilinear_antialias

    cfg = PreprocessConfig(image_size=8)
    x = np.random.default_rng(2).random((16, 16, 1), dtype=np.float32)
    mean, std = np.asarray(cfg.mean, np.float32), np.asarray(cfg.std, np.float32)
    expected = ((resize_bilinear_antialias(x, 8, 8) - mean) / std).transpose(2, 0, 1)
    for _ in range(3):
        assert normalize_rgb(x, cfg).tobytes() == np.ascontiguousarray(expected).tobytes()
    with pytest.raises(ValueError):
        normalize_rgb(np.zeros((16, 16, 2), np.float32), cfg)
    with pytest.raises(InputError, match=r"H x W x 3 .* got shape \(4, 4, 2\)"):
        _normalized_planes(np.zeros((4, 4, 2), np.float32), mean, std, np.empty((3, 4, 4), np.float32))
