"""Scores (ALGORITHM.md §4) against straightforward numpy re-computations."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from anoclip_core.errors import InputError
from anoclip_core.scores import (
    NUM_VIEWS,
    _affine_view,
    anomaly_map,
    image_views,
    smooth_and_upsample,
    state_probs,
    two_crop_boxes,
)


def np_smooth_upsample(p: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """replicate-pad 1, 3 x 3 mean, bilinear with align_corners=True; loops, float64."""
    h, w = p.shape
    padded = np.pad(p.astype(np.float64), 1, mode="edge")
    smooth = np.zeros((h, w))
    for i in range(h):
        for j in range(w):
            smooth[i, j] = padded[i : i + 3, j : j + 3].sum() / 9.0
    out = np.zeros((out_h, out_w))
    for i in range(out_h):
        y = i * (h - 1) / (out_h - 1) if out_h > 1 else 0.0
        y0 = int(math.floor(y))
        y1 = min(y0 + 1, h - 1)
        fy = y - y0
        for j in range(out_w):
            x = j * (w - 1) / (out_w - 1) if out_w > 1 else 0.0
            x0 = int(math.floor(x))
            x1 = min(x0 + 1, w - 1)
            fx = x - x0
            top = smooth[y0, x0] * (1 - fx) + smooth[y0, x1] * fx
            bottom = smooth[y1, x0] * (1 - fx) + smooth[y1, x1] * fx
            out[i, j] = top * (1 - fy) + bottom * fy
    return out


@pytest.mark.parametrize(
    "grid,size", [((8, 8), (64, 64)), ((5, 7), (33, 20)), ((15, 15), (240, 240)), ((4, 4), (4, 4))]
)
def test_smooth_and_upsample_matches_numpy(grid, size):
    gen = torch.Generator().manual_seed(0)
    probs = torch.rand(2, *grid, generator=gen)
    out = smooth_and_upsample(probs, size)
    assert out.shape == (2, *size)
    for b in range(2):
        np.testing.assert_allclose(out[b].numpy(), np_smooth_upsample(probs[b].numpy(), *size), atol=1e-6)


def test_smoothing_is_not_zero_padded():
    """Replicate padding: a constant map stays exactly constant (zero padding would darken borders)."""
    probs = torch.full((1, 6, 6), 0.7)
    out = smooth_and_upsample(probs, (30, 30))
    np.testing.assert_allclose(out.numpy(), 0.7, atol=1e-6)


def np_state_probs(emb: np.ndarray, protos: np.ndarray, temperature: float) -> np.ndarray:
    logits = np.stack([emb @ protos[0], emb @ protos[1]], axis=-1) / temperature
    logits -= logits.max(-1, keepdims=True)
    e = np.exp(logits)
    return (e / e.sum(-1, keepdims=True))[..., 1]


def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


@pytest.mark.parametrize("temperature", [1.0, 0.5, 0.07])
def test_state_probs_match_numpy(temperature):
    gen = torch.Generator().manual_seed(1)
    emb = _unit(torch.randn(3, 4, 5, 16, generator=gen))
    protos = _unit(torch.randn(2, 16, generator=gen))
    p = state_probs(emb, protos, temperature)
    assert p.shape == (3, 4, 5)
    np.testing.assert_allclose(p.numpy(), np_state_probs(emb.numpy(), protos.numpy(), temperature), atol=1e-6)


def test_temperature_sharpens_and_keeps_the_side():
    gen = torch.Generator().manual_seed(2)
    emb = _unit(torch.randn(200, 16, generator=gen))
    protos = _unit(torch.randn(2, 16, generator=gen))
    p1 = state_probs(emb, protos, 1.0)
    p_small = state_probs(emb, protos, 0.1)
    # p = sigmoid((cos_a - cos_n) / T): lower T pushes away from 0.5, never across it
    assert torch.all(torch.sign(p1 - 0.5) == torch.sign(p_small - 0.5))
    assert torch.all((p_small - 0.5).abs() >= (p1 - 0.5).abs() - 1e-7)
    assert (p_small - 0.5).abs().mean() > 3 * (p1 - 0.5).abs().mean()
    diff = emb @ protos[1] - emb @ protos[0]
    torch.testing.assert_close(p_small, torch.sigmoid(diff / 0.1), atol=1e-6, rtol=0)
    # with raw cosines (T = 1) probabilities stay within sigmoid(+-2)
    assert p1.min() >= 1 / (1 + math.e**2) - 1e-6 and p1.max() <= 1 / (1 + math.e**-2) + 1e-6


def test_anomaly_map_composes():
    gen = torch.Generator().manual_seed(3)
    local = _unit(torch.randn(2, 8, 8, 16, generator=gen))
    protos = _unit(torch.randn(2, 16, generator=gen))
    out = anomaly_map(local, protos, (64, 64), temperature=0.5)
    p = np_state_probs(local.numpy(), protos.numpy(), 0.5)
    for b in range(2):
        np.testing.assert_allclose(out[b].numpy(), np_smooth_upsample(p[b], 64, 64), atol=1e-6)
    assert out.min() >= 0 and out.max() <= 1


def test_twenty_two_views():
    assert NUM_VIEWS == 22
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 21, 21, generator=gen)
    v = image_views(x)
    assert v.shape == (22, 2, 3, 21, 21)
    assert torch.equal(v[0], x)  # view 0 is the identity
    # every other view differs from the original
    for i in range(1, 22):
        assert (v[i] - x).abs().max() > 1e-3, i
    # horizontal flip, grayscale, rot90 x 1, 2, 3 are the last five
    assert torch.equal(v[17], torch.flip(x, dims=[3]))
    gray = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    for c in range(3):
        torch.testing.assert_close(v[18][:, c], gray)
    for k in (1, 2, 3):
        assert torch.equal(v[18 + k], torch.rot90(x, k, dims=(2, 3)))


def test_translation_views_shift_by_pixels():
    """Shift (0.2, 0.2) in normalised coords with align_corners=True = 0.2 * (S - 1) / 2 pixels."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1, 3, 21, 21, generator=gen)  # (21 - 1) / 2 * 0.2 = 2 pixels
    v = image_views(x)
    shifts = {9: (2, 2), 10: (-2, 2), 11: (-2, -2), 12: (2, -2), 13: (1, 1), 14: (-1, 1), 15: (-1, -1), 16: (1, -1)}
    for idx, (dx, dy) in shifts.items():
        # output(i, j) samples input(i + dy, j + dx) in the interior
        out = v[idx][0, :, 3:-3, 3:-3]
        src = x[0, :, 3 + dy : 21 - 3 + dy, 3 + dx : 21 - 3 + dx]
        torch.testing.assert_close(out, src, atol=1e-5, rtol=0)
    # reflection padding: no zeros leak in from outside
    const = torch.full((1, 3, 21, 21), 2.5)
    torch.testing.assert_close(image_views(const)[1:17], torch.full((16, 1, 3, 21, 21), 2.5), atol=1e-5, rtol=0)


def test_rotation_views_angles():
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(1, 3, 17, 17, generator=gen)
    torch.testing.assert_close(_affine_view(x, angle=0.0), x, atol=1e-5, rtol=0)
    quarter = _affine_view(x, angle=math.pi / 2)
    assert min((quarter - torch.rot90(x, k, dims=(2, 3))).abs().max().item() for k in (1, 3)) < 1e-4
    v = image_views(x)
    angles = [k * math.pi / 16 for k in (-4, -3, -2, -1, 1, 2, 3, 4)]
    for i, a in enumerate(angles):
        torch.testing.assert_close(v[1 + i], _affine_view(x, angle=a), atol=1e-6, rtol=0)
    # on a linear ramp (bilinear sampling is exact there) each view is the ramp rotated by its angle:
    # output(x, y) = input(cos a * x - sin a * y, sin a * x + cos a * y) in [-1, 1] coordinates
    s = 33
    coords = torch.linspace(-1, 1, s)
    ramp_x = coords.expand(s, s)  # value = normalised x coordinate
    ramp = ramp_x.expand(1, 3, s, s).contiguous()
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    centre = (xx.abs() <= 0.5) & (yy.abs() <= 0.5)  # samples stay inside the image for |a| <= pi/4
    rv = image_views(ramp)
    for i, a in enumerate(angles):
        expected = math.cos(a) * xx - math.sin(a) * yy
        got = rv[1 + i][0, 0]
        torch.testing.assert_close(got[centre], expected[centre], atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "h,w,expected",
    [
        (300, 500, [(0, 0, 300, 300), (0, 200, 300, 300)]),
        (500, 300, [(0, 0, 300, 300), (200, 0, 300, 300)]),
        (256, 256, [(0, 0, 256, 256), (0, 0, 256, 256)]),
        (100, 200, [(0, 0, 100, 100), (0, 100, 100, 100)]),
        (3, 5, [(0, 0, 3, 3), (0, 2, 3, 3)]),
    ],
)
def test_two_crop_boxes(h, w, expected):
    boxes = two_crop_boxes(h, w)
    assert boxes == expected
    covered = np.zeros((h, w), dtype=int)
    for top, left, bh, bw in boxes:
        assert bh == bw == min(h, w)
        assert 0 <= top and top + bh <= h and 0 <= left and left + bw <= w
        covered[top : top + bh, left : left + bw] += 1
    assert covered.min() >= 1  # the two squares cover the whole image


@pytest.mark.parametrize("h,w", [(100, 201), (500, 30), (0, 10), (10, 0)])
def test_two_crop_boxes_rejects_uncoverable(h, w):
    """Beyond aspect 2 two squares leave a gap (no map there): refuse instead of leaving holes."""
    with pytest.raises(InputError):
        two_crop_boxes(h, w)
