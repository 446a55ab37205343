"""``Result``: one image's (or strip's) outcome, with its JSON form."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from anoclip_core.errors import InputError

from .postprocess import Region

RANDOM_WEIGHTS_WARNING = (
    "RANDOM WEIGHTS: this artifact was exported without pretrained weights; scores are NOT meaningful"
)


@dataclass
class Result:
    """One image's outcome; ``error`` is set (and score/map are None) when that image failed."""

    path: str | None
    class_name: str
    score: float | None = None
    label: str | None = None
    anomaly_map: np.ndarray | None = field(default=None, repr=False)
    regions: list[Region] = field(default_factory=list)
    image_threshold: float | None = None
    pixel_threshold: float | None = None
    threshold_source: str | None = None
    size: tuple[int, int] | None = None
    tiles: int = 1
    timing: dict[str, float] = field(default_factory=dict)
    backend: str | None = None
    random_weights: bool = False
    error: str | None = None
    index: int | None = None
    y0: int | None = None
    shots: int = 0  # few-shot: images in the class's reference bank (0: zero-shot)
    visual_weight: float | None = None  # few-shot: the bank's weight in the fusion (None: zero-shot)
    precision: str | None = None  # what the backend computes in, e.g. "int8 (float ops in bf16)"

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def is_anomaly(self) -> bool:
        return self.label == "anomaly"

    def mask(self) -> np.ndarray:
        """Binary defect mask (uint8 0/255) of ``anomaly_map > pixel_threshold``."""
        if self.anomaly_map is None:
            raise InputError(f"no anomaly map for {self.path}: {self.error}")
        return ((self.anomaly_map > np.float32(self.pixel_threshold)) * 255).astype(np.uint8)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"path": self.path, "class": self.class_name}
        if self.index is not None:
            d["index"] = self.index
        if self.y0 is not None:
            d["y0"] = self.y0
        if self.error is not None:
            d["error"] = self.error
        else:
            d.update({
                "score": round(float(self.score or 0.0), 6), "label": self.label,
                "image_threshold": self.image_threshold, "pixel_threshold": self.pixel_threshold,
                "threshold_source": self.threshold_source,
                "size": list(self.size) if self.size else None, "tiles": self.tiles,
                "regions": [r.to_dict() for r in self.regions],
            })
        d["timing"] = {k: round(v, 3) for k, v in self.timing.items()}
        d["backend"] = self.backend
        if self.precision is not None:
            d["precision"] = self.precision
        if self.error is None:  # a failed image used no bank: say nothing rather than "references: false"
            d["references"] = self.shots > 0
            d["shots"] = self.shots
            d["visual_weight"] = self.visual_weight
        d["random_weights"] = self.random_weights
        if self.random_weights:
            d["warning"] = RANDOM_WEIGHTS_WARNING
        return d
