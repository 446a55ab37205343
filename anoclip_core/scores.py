"""Anomaly maps and image scores (ALGORITHM.md §4), including the 22-view image score."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .errors import InputError


def state_probs(emb: torch.Tensor, prototypes: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """softmax([cos(e, t_n), cos(e, t_a)] / T)[abnormal] for normalised ``emb`` [..., D]."""
    logits = emb @ prototypes.to(emb.dtype).t() / temperature
    return logits.softmax(dim=-1)[..., 1]


def smooth(patch_values: torch.Tensor) -> torch.Tensor:
    """[B, h, w] -> [B, h, w]: replicate-pad 1, 3 x 3 mean (the first half of the §4 post-processing)."""
    x = F.pad(patch_values.unsqueeze(1), (1, 1, 1, 1), mode="replicate")
    return F.avg_pool2d(x, 3, stride=1)[:, 0]


def upsample(grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[B, h, w] -> [B, H, W]: bilinear (align_corners=True), the second half of §4."""
    return F.interpolate(grid.unsqueeze(1), size=size, mode="bilinear", align_corners=True)[:, 0]


def smooth_and_upsample(patch_probs: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[B, h, w] -> [B, H, W]: replicate-pad 1, 3 x 3 mean, bilinear (align_corners=True)."""
    return upsample(smooth(patch_probs), size)


def visual_anomaly(local: torch.Tensor, bank: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Normalised local embeddings [B, h, w, D] -> 1 - max cosine similarity to ``bank`` [N, D], [B, h, w].

    The torch twin of :func:`anoclip_core.refbank.visual_anomaly` (same chunking, on the model's device).
    """
    q = local.reshape(-1, local.shape[-1])
    best = torch.full((q.shape[0],), -math.inf, dtype=q.dtype, device=q.device)
    for i in range(0, q.shape[0], chunk):
        for j in range(0, bank.shape[0], chunk):
            sims = q[i : i + chunk] @ bank[j : j + chunk].t()
            best[i : i + chunk] = torch.maximum(best[i : i + chunk], sims.amax(dim=1))
    return (1.0 - best).reshape(local.shape[:-1])


def anomaly_map(
    local: torch.Tensor, prototypes: torch.Tensor, size: tuple[int, int], temperature: float = 1.0
) -> torch.Tensor:
    """Normalised local embeddings [B, h, w, D] -> anomaly map [B, H, W] in [0, 1]."""
    return smooth_and_upsample(state_probs(local, prototypes, temperature), size)


def _affine_view(x: torch.Tensor, angle: float = 0.0, tx: float = 0.0, ty: float = 0.0) -> torch.Tensor:
    """Rotate by ``angle`` (radians) / translate by (tx, ty) in [-1, 1] coordinates, reflection padding.

    Same sampling as the reference (``affine_grid``/``grid_sample`` with ``align_corners=True``).
    """
    c, s = math.cos(angle), math.sin(angle)
    theta = torch.tensor([[c, -s, tx], [s, c, ty]], dtype=x.dtype, device=x.device)
    grid = F.affine_grid(theta.expand(x.shape[0], 2, 3), list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=True)


VIEW_ANGLES = tuple(k * math.pi / 16 for k in (-4, -3, -2, -1, 1, 2, 3, 4))
VIEW_SHIFTS = ((0.2, 0.2), (-0.2, 0.2), (-0.2, -0.2), (0.2, -0.2), (0.1, 0.1), (-0.1, 0.1), (-0.1, -0.1), (0.1, -0.1))
NUM_VIEWS = 1 + len(VIEW_ANGLES) + len(VIEW_SHIFTS) + 2 + 3


def image_views(x: torch.Tensor) -> torch.Tensor:
    """The reference's 22 views of normalised images [B, 3, S, S] -> [22, B, 3, S, S].

    Original; rotations ±π/16, ±π/8, ±3π/16, ±π/4 and translations (±0.1, ±0.1), (±0.2, ±0.2),
    both with reflection padding; horizontal flip; grayscale; rot90 x 1, 2, 3. As in the
    reference, grayscale weights (0.299, 0.587, 0.114) apply to the normalised tensor.
    """
    views = [x]
    views += [_affine_view(x, angle=a) for a in VIEW_ANGLES]
    views += [_affine_view(x, tx=a, ty=b) for a, b in VIEW_SHIFTS]
    views.append(torch.flip(x, dims=[3]))
    gray = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    views.append(gray.unsqueeze(1).expand(-1, 3, -1, -1))
    views += [torch.rot90(x, k, dims=(2, 3)) for k in (1, 2, 3)]
    return torch.stack(views)


def two_crop_boxes(height: int, width: int) -> list[tuple[int, int, int, int]]:
    """VisA protocol: two overlapping squares (top, left, size, size) along the long side.

    The squares cover the image only while the long side is at most twice the short one; beyond
    that the middle would get no map at all, so such sizes are refused with ``InputError``.
    """
    height, width = int(height), int(width)
    side = min(height, width)
    if side < 1:
        raise InputError(f"two_crop_boxes: image size must be positive, got {height} x {width} (H x W)")
    if max(height, width) > 2 * side:
        raise InputError(
            f"two_crop_boxes: two {side} x {side} squares cannot cover a {height} x {width} (H x W) image "
            "(aspect ratio above 2)"
        )
    if height >= width:
        return [(0, 0, side, side), (height - side, 0, side, side)]
    return [(0, 0, side, side), (0, width - side, side, side)]
