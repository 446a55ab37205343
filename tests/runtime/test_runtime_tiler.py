"""Tiling and line-scan streaming with fake backends whose patch probabilities follow the image."""
from __future__ import annotations

import numpy as np
import pytest
from rt_fakes import ConstantBackend, PatchMeanBackend, fake_detector

from anoclip.runtime.postprocess import anomaly_map, find_regions
from anoclip.runtime.tiler import StripStream, axis_layout, predict_tiled
from anoclip_core.errors import InputError


def infer_fn(backend=None):
    return fake_detector(backend or PatchMeanBackend()).tile_infer("bottle")


def smooth_strip(h, w, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = 0.5 + 0.2 * np.sin(xx / 97.0 + rng.random()) * np.cos(yy / 53.0) + 0.1 * xx / w
    return (np.clip(img, 0, 1)[..., None].repeat(3, 2) * 255).astype(np.uint8)


@pytest.mark.parametrize("length,t,o", [(1000, 100, 25), (1000, 100, 0), (1000, 100, 50), (100, 100, 25),
                                        (161, 100, 40), (101, 100, 10), (16384, 1024, 256), (250, 64, 1)])
def test_axis_layout_weights_partition_unity(length, t, o):
    lay = axis_layout(length, t, o)
    total = np.zeros(length)
    cover = np.zeros(length, int)
    for a in lay:
        assert 0 <= a.start and a.start + t <= length
        total[a.start:a.start + t] += a.weight
        cover[a.start:a.start + t] += a.weight > 0
    np.testing.assert_allclose(total, 1.0, atol=1e-6)
    assert cover.max() <= 2 and cover.min() >= 1
    assert lay[0].start == 0 and lay[-1].start + t == length


@pytest.mark.parametrize("t,o", [(100, 51), (100, -1), (0, 0)])
def test_axis_layout_rejects_bad_overlap(t, o):
    with pytest.raises(InputError):
        axis_layout(500, t, o)


def test_constant_probability_gives_constant_map():
    strip = smooth_strip(128, 2000)
    out = predict_tiled(strip, infer_fn(ConstantBackend(0.37)), overlap=32)
    assert out.anomaly_map.shape == (128, 2000)
    np.testing.assert_allclose(out.anomaly_map, 0.37, atol=1e-6)
    assert out.score == pytest.approx(0.37)


def test_exact_copy_where_tiles_do_not_overlap_and_no_seams():
    strip = smooth_strip(128, 1500, seed=3)
    infer = infer_fn()
    t, o = 128, 32
    out = predict_tiled(strip, infer, t, o, batch=3)
    lay = axis_layout(1500, t, o)
    owners = np.zeros(1500, int)
    for a in lay:
        owners[a.start:a.start + t][a.weight > 0] += 1
    checked = 0
    for a in lay:
        probs, _ = infer([strip[:, a.start:a.start + t]])
        m = anomaly_map(probs, (t, t))[0]
        solo = np.where((owners[a.start:a.start + t] == 1) & (a.weight == 1.0))[0]
        # bit-exact copy of that tile's own map where it is the only tile
        assert np.array_equal(out.anomaly_map[:, a.start + solo], m[:, solo])
        checked += solo.size
    assert checked > 1500 // 2
    # seams: the horizontal gradient in overlaps is no larger than inside single tiles (+ slack)
    gx = np.abs(np.diff(out.anomaly_map, axis=1))
    blend_cols = np.where(owners[:-1] == 2)[0]
    solo_cols = np.where(owners[:-1] == 1)[0]
    assert gx[:, blend_cols].max() <= 2.0 * gx[:, solo_cols].max() + 1e-4


def test_seam_free_vs_naive_paste():
    """Tile maps disagree near borders (each tile sees different context); blending must not jump."""
    strip = smooth_strip(96, 800, seed=5)
    out = predict_tiled(strip, infer_fn(), 96, 24)
    gx = np.abs(np.diff(out.anomaly_map, axis=1)).max()
    gy = np.abs(np.diff(out.anomaly_map, axis=0)).max()
    assert gx < 0.02 and gy < 0.02


def test_defect_across_tile_border_is_one_region():
    h, w, t, o = 128, 1024, 128, 32
    strip = np.full((h, w, 3), 40, np.uint8)
    lay = axis_layout(w, t, o)
    border = lay[1].start + t  # end of tile 1: inside the overlap with tile 2
    strip[40:90, border - 50:border + 50] = 255  # a bright defect straddling tile 1 / tile 2
    out = predict_tiled(strip, infer_fn(), t, o)
    regs = find_regions(out.anomaly_map, 0.5, min_area=10)
    assert len(regs) == 1
    r = regs[0]
    assert r.x < border - 20 and r.x + r.width > border + 20
    assert r.max_score > 0.8


def test_2d_tiling_and_small_images():
    img = smooth_strip(300, 500, seed=1)
    out = predict_tiled(img, infer_fn(), 128, 32)
    assert out.anomaly_map.shape == (300, 500)
    assert len(out.boxes) == len(axis_layout(300, 128, 32)) * len(axis_layout(500, 128, 32))
    tiny = predict_tiled(img[:20, :30], infer_fn(), None, None)  # tile shrinks to the short side
    assert tiny.anomaly_map.shape == (20, 30)
    with pytest.raises(InputError):
        predict_tiled(img[:1, :30], infer_fn())


@pytest.mark.parametrize("strip_h,tile,overlap", [(64, None, None), (64, None, 16), (50, 64, 16), (64, 64, 0),
                                                   (100, 64, 32), (37, 48, 7)])
def test_stream_equals_one_shot_tiling_of_the_whole_scan(strip_h, tile, overlap):
    n, w = 7, 700
    scan = smooth_strip(n * strip_h + 13, w, seed=2)
    strips = [scan[i:i + strip_h] for i in range(0, scan.shape[0], strip_h)]
    stream = StripStream(infer_fn(), tile=tile, overlap=overlap, batch=4)
    results = list(stream.run(strips))
    assert [r.index for r in results] == list(range(len(strips)))
    assert [r.y0 for r in results] == [i * strip_h for i in range(len(strips))]
    stitched = np.concatenate([r.anomaly_map for r in results])
    t = tile or strip_h
    o = t // 4 if overlap is None else overlap
    ref = predict_tiled(scan, infer_fn(), t, o)
    assert stitched.shape == ref.anomaly_map.shape
    np.testing.assert_allclose(stitched, ref.anomaly_map, atol=1e-5)
    assert max(r.score for r in results) == pytest.approx(ref.score)


@pytest.mark.parametrize("strip_h,tile", [(30, 64), (64, None), (100, 64)])
def test_stream_keeps_its_own_copy_of_a_reused_frame_buffer(strip_h, tile):
    """A camera hands every strip in the same buffer: the stream must not read the rows it carries
    from the caller's array after push returns (expected: the same strips as separate arrays)."""
    scan = smooth_strip(6 * strip_h, 300, seed=5)
    strips = [scan[i:i + strip_h] for i in range(0, scan.shape[0], strip_h)]
    separate = list(StripStream(infer_fn(), tile=tile, overlap=16, batch=2).run(strips))
    stream, frame, reused = StripStream(infer_fn(), tile=tile, overlap=16, batch=2), np.empty_like(strips[0]), []
    for strip in strips:
        frame[:] = strip
        reused += stream.push(frame)
    reused += stream.flush()
    assert len(reused) == len(separate) == len(strips)
    for a, b in zip(separate, reused, strict=True):
        assert a.anomaly_map.tobytes() == b.anomaly_map.tobytes() and a.score == b.score


def test_stream_emits_with_bounded_memory_and_latency():
    h, w = 64, 512
    stream = StripStream(infer_fn(), overlap=16)
    emitted = 0
    max_rows = 0
    for i in range(60):
        out = stream.push(smooth_strip(h, w, seed=i))
        emitted += len(out)
        max_rows = max(max_rows, stream.carried_rows)
        assert emitted >= i - 1  # at most about one strip of latency
    emitted += len(stream.flush())
    assert emitted == 60
    assert max_rows <= 3 * h  # carry: overlap context + accumulator + one strip, never the scan


def test_stream_without_stitch_is_per_strip_and_checks_width():
    strips = [smooth_strip(64, 300, seed=i) for i in range(3)]
    stream = StripStream(infer_fn(), stitch=False)
    out = [stream.push(s) for s in strips]
    for s, res in zip(strips, out, strict=True):
        assert len(res) == 1
        np.testing.assert_array_equal(res[0].anomaly_map, predict_tiled(s, infer_fn()).anomaly_map)
    assert stream.flush() == []
    s2 = StripStream(infer_fn())
    s2.push(strips[0])
    with pytest.raises(InputError, match="does not continue"):
        s2.push(smooth_strip(64, 301))
    with pytest.raises(InputError, match="does not continue"):
        s2.push(strips[1][..., 0])


def test_stream_shorter_than_one_tile():
    s = StripStream(infer_fn(), tile=128)
    assert s.push(smooth_strip(40, 300)) == []
    assert s.push(smooth_strip(40, 300, seed=1)) == []
    res = s.flush()
    assert [r.anomaly_map.shape for r in res] == [(40, 300), (40, 300)]


def test_detector_stream_results_have_regions():
    det = fake_detector()
    strip = np.full((64, 600, 3), 30, np.uint8)
    strip[10:50, 280:330] = 250
    stream = det.stream("bottle", pixel_threshold=0.5, min_area=5)
    res = list(stream.run([strip, np.full((64, 600, 3), 30, np.uint8)]))
    assert len(res) == 2
    assert res[0].label == "anomaly" and len(res[0].regions) == 1
    assert res[1].regions == [] and res[1].y0 == 64


def test_a_backend_returning_the_wrong_number_of_grids_is_an_inference_error():
    from anoclip_core.errors import InferenceError

    def short(crops):
        return np.zeros((len(crops) - 1, 4, 4), np.float32), np.zeros(len(crops), np.float32)

    with pytest.raises(InferenceError, match=r"shape \[1, 4, 4\] for 2 tiles"):
        predict_tiled(np.zeros((32, 60, 3), np.uint8), short, 32, 8, batch=2)
