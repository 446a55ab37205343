"""``InferConfig``: every inference setting, from the CLI (or a caller) down to ``Detector``."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from anoclip_core.errors import InputError
from anoclip_core.refbank import DEFAULT_VISUAL_WEIGHT, check_weight

from .contract import check_threshold
from .prefetch import MAX_DEPTH

LOAD_TIME = ("backend", "precision", "threads", "streams", "verify")  # fixed by Detector.load, not per call


@dataclass
class InferConfig:
    """Every inference setting, from the CLI (or a caller) down to ``Detector``; one typed object.

    Thresholds are in the scores' own units (probabilities in [0, 1]); ``None`` means: the
    artifact's calibration for the class when present, else 0.5. ``prefetch``: batches decoded,
    resized and normalised ahead on a worker thread while the backend runs the current one
    (``runtime.prefetch``; 0 = everything on the caller's thread, for debugging).
    """

    class_name: str
    backend: str = "auto"
    precision: str | None = None
    batch: int = 8
    tile: bool = False
    tile_size: int | None = None
    overlap: int | None = None
    threshold: float | None = None
    pixel_threshold: float | None = None
    min_area: int = 1
    max_regions: int | None = 100
    tta: bool = False
    channel_order: str = "RGB"
    out_dir: str | None = None
    overlays: bool = True
    masks: bool = True
    alpha: float = 0.5
    threads: int | None = None
    streams: int = 1
    verify: bool = True
    prefetch: int = 1
    use_refs: bool = True
    visual_weight: float = DEFAULT_VISUAL_WEIGHT

    def __post_init__(self) -> None:
        if self.batch < 1:
            raise InputError(f"batch must be >= 1, got {self.batch}")
        if self.tile_size is not None and self.tile_size < 2:
            raise InputError(f"tile size must be >= 2 pixels (leave it out for the default), got {self.tile_size}")
        if self.overlap is not None and self.overlap < 0:
            raise InputError(f"overlap must be >= 0 pixels, got {self.overlap}")
        if self.overlap is not None and self.tile_size is not None and self.overlap > self.tile_size // 2:
            raise InputError(f"overlap {self.overlap} is over half the tile size {self.tile_size}")
        if self.threads is not None and self.threads < 1:
            raise InputError(f"threads must be >= 1, got {self.threads}")
        if self.streams < 1:
            raise InputError(f"streams must be >= 1, got {self.streams}")
        if self.streams > 1 and self.backend != "openvino":
            raise InputError(f"--streams {self.streams} is an OpenVINO option: add --backend openvino")
        for name in ("threshold", "pixel_threshold"):
            v = getattr(self, name)
            if v is not None:
                check_threshold(v, name)
        if self.min_area < 1:
            raise InputError(f"min_area must be >= 1, got {self.min_area}")
        if not 0 <= int(self.prefetch) <= MAX_DEPTH:
            raise InputError(f"prefetch must be between 0 (off) and {MAX_DEPTH} batches, got {self.prefetch}")
        if self.channel_order not in ("RGB", "BGR"):
            raise InputError(f"channel_order must be RGB or BGR, got {self.channel_order!r}")
        check_weight(self.visual_weight)

    def replace(self, **changes: Any) -> InferConfig:
        return replace(self, **changes)

    @classmethod
    def merged(cls, class_name: str, base: InferConfig | None, overrides: Mapping[str, Any]) -> InferConfig:
        """``base`` (or the defaults) for ``class_name`` with keyword ``overrides``; an unknown
        option is a ``TypeError`` naming it (as a misspelt keyword argument would be)."""
        known = {f.name for f in fields(cls)}
        bad = sorted(set(overrides) - known)
        if bad:
            raise TypeError(f"unknown inference option(s): {', '.join(bad)}")
        fixed = sorted(set(overrides) & set(LOAD_TIME))
        if fixed:
            raise TypeError(f"{', '.join(fixed)} cannot change per call: they are chosen when the detector is "
                            f"loaded (Detector.load(artifact, {fixed[0]}=...))")
        return replace(base or cls(class_name=class_name), class_name=class_name, **overrides)
