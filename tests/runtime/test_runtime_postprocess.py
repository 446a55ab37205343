"""runtime.postprocess vs the PyTorch core's post-processing; defect regions."""
from __future__ import annotations

import numpy as np
import pytest

from anoclip.runtime.postprocess import anomaly_map, find_regions, interp_matrix, smooth_patch_probs

torch = pytest.importorskip("torch")
F = torch.nn.functional


def torch_map(probs: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    x = F.pad(torch.from_numpy(probs)[:, None], (1, 1, 1, 1), mode="replicate")
    x = F.avg_pool2d(x, 3, stride=1)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)[:, 0].numpy()


@pytest.mark.parametrize("grid", [(8, 8), (15, 15), (16, 16), (3, 5), (1, 4)])
@pytest.mark.parametrize("size", [(64, 64), (240, 240), (480, 640), (1000, 333), (17, 2049), (1, 7), (5, 1)])
def test_map_matches_torch_align_corners(grid, size):
    probs = np.random.default_rng(1).random((2, *grid)).astype(np.float32)
    ours = anomaly_map(probs, size)
    ref = torch_map(probs, size)
    assert ours.shape == ref.shape == (2, *size)
    np.testing.assert_allclose(ours, ref, atol=2e-6, rtol=0)


def test_core_smooth_and_upsample_identity():
    from anoclip_core.scores import smooth_and_upsample

    probs = np.random.default_rng(2).random((3, 15, 15)).astype(np.float32)
    ref = smooth_and_upsample(torch.from_numpy(probs), (240, 240)).numpy()
    np.testing.assert_allclose(anomaly_map(probs, (240, 240)), ref, atol=2e-6, rtol=0)


def test_smooth_is_replicate_padded_box_mean():
    p = np.zeros((4, 4), np.float32)
    p[0, 0] = 9.0
    s = smooth_patch_probs(p)
    # corner: the replicate pad repeats p[0,0] four times inside the 3x3 window
    assert s[0, 0] == pytest.approx(4.0)
    assert s[1, 1] == pytest.approx(1.0)
    assert s[3, 3] == 0.0


def test_interp_matrix_rows_sum_to_one_and_hit_corners():
    m = interp_matrix(15, 1024)
    np.testing.assert_allclose(m.sum(1), 1.0, atol=1e-6)
    assert m[0, 0] == 1.0 and m[-1, -1] == 1.0
    assert not m.flags.writeable


def test_find_regions_components_bbox_stats():
    a = np.zeros((50, 60), np.float32)
    a[5:10, 7:17] = 0.8       # 5 x 10 = 50 px
    a[7, 9] = 0.95
    a[30:32, 40:42] = 0.7     # 4 px
    a[45, 0] = 0.9            # 1 px
    regs = find_regions(a, 0.5, min_area=3)
    assert len(regs) == 2
    r = regs[0]
    assert (r.x, r.y, r.width, r.height, r.area) == (7, 5, 10, 5, 50)
    assert r.max_score == pytest.approx(0.95)
    assert r.mean_score == pytest.approx((49 * 0.8 + 0.95) / 50, rel=1e-6)
    assert (regs[1].x, regs[1].y, regs[1].area) == (40, 30, 4)
    assert len(find_regions(a, 0.5, min_area=1)) == 3
    assert find_regions(a, 0.99) == []
    assert len(find_regions(a, 0.5, max_regions=1)) == 1
    d = r.to_dict()
    assert d["area"] == 50 and len(d["centroid"]) == 2


def test_region_statistics_use_only_their_own_pixels_inside_a_shared_box():
    """A ring around a blob: the blob lies inside the ring's bounding box, yet each region's max and
    mean are over its own pixels only (brute force over the known pixel sets)."""
    rng = np.random.default_rng(3)
    a = np.zeros((40, 40), np.float32)
    ring = np.zeros((40, 40), bool)
    ring[5:35, 5:35] = True
    ring[8:32, 8:32] = False
    blob = np.zeros((40, 40), bool)
    blob[15:25, 15:25] = True
    a[ring] = 0.55 + 0.1 * rng.random(int(ring.sum()), dtype=np.float32)
    a[blob] = 0.8 + 0.2 * rng.random(int(blob.sum()), dtype=np.float32)
    regs = {(r.x, r.y): r for r in find_regions(a, 0.5)}
    assert set(regs) == {(5, 5), (15, 15)}
    for (x, y), pixels in (((5, 5), ring), ((15, 15), blob)):
        vals = a[pixels].astype(np.float64)
        assert regs[(x, y)].area == pixels.sum()
        assert regs[(x, y)].max_score == float(vals.max())
        assert regs[(x, y)].mean_score == pytest.approx(vals.mean(), rel=1e-12)


@pytest.mark.parametrize("count", [5, 100])  # both statistics paths (per-bbox and sorted)
def test_find_regions_stats_many_components(count):
    rng = np.random.default_rng(count)
    a = np.zeros((200, 200), np.float32)
    truth = {}
    for k in range(count):
        y, x = divmod(k, 10)
        block = (0.6 + 0.4 * rng.random((3, 4))).astype(np.float32)
        a[y * 20 + 2:y * 20 + 5, x * 20 + 3:x * 20 + 7] = block
        truth[(x * 20 + 3, y * 20 + 2)] = (float(block.max()), float(block.astype(np.float64).mean()))
    regs = find_regions(a, 0.5)
    assert len(regs) == count
    for r in regs:
        mx, mean = truth[(r.x, r.y)]
        assert (r.width, r.height, r.area) == (4, 3, 12)
        assert r.max_score == pytest.approx(mx, abs=1e-7) and r.mean_score == pytest.approx(mean, abs=1e-6)
    assert [r.max_score for r in regs] == sorted((r.max_score for r in regs), reverse=True)


@pytest.mark.parametrize("height,width", [(70, 37), (32, 32), (1, 5), (97, 200)])
@pytest.mark.parametrize("row_weight", [True, False])
def test_add_weighted_map_equals_the_whole_map_times_the_weight(height, width, row_weight):
    """The blocked blend is the map, the outer-product weight and their product computed whole,
    bit for bit, for heights on and off the block size, added to what the accumulator held."""
    from anoclip.runtime.postprocess import add_weighted_map

    rng = np.random.default_rng(height * width)
    probs = rng.random((7, 5), dtype=np.float32)
    wy = rng.random(height, dtype=np.float32) if row_weight else None
    wx = rng.random(width, dtype=np.float32)
    start = rng.random((height, width), dtype=np.float32)
    weight = (wy[:, None] * wx[None, :]) if row_weight else np.broadcast_to(wx[None, :], (height, width))
    expected = start + weight * anomaly_map(probs, (height, width))
    acc = start.copy()
    add_weighted_map(acc, probs, wy, wx)
    assert acc.tobytes() == expected.tobytes()


def test_add_weighted_map_names_a_bad_shape():
    from anoclip.runtime.postprocess import add_weighted_map
    from anoclip_core.errors import InputError

    acc = np.zeros((10, 12), np.float32)
    with pytest.raises(InputError, match=r"\[h, w\]"):
        add_weighted_map(acc, np.zeros((2, 3, 3), np.float32), None, np.ones(12, np.float32))
    bad = r"tile weights \(rows: 9 values, columns: 12 values\) do not fit a map of 10 x 12"
    with pytest.raises(InputError, match=bad):
        add_weighted_map(acc, np.zeros((3, 3), np.float32), np.ones(9, np.float32), np.ones(12, np.float32))
