"""Options shared by every CLI that decodes user images (``anoclip-infer``, ``anoclip calibrate`` /
``refs``, ``anoclip-eval``, ``anoclip-export --calibration-images``).

The decoder's refusal of an oversized image (``anoclip_core.transform``) names ``--max-pixels``,
so each of these commands offers it, with one spelling and one meaning.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import click

from .transform import DEFAULT_MAX_IMAGE_PIXELS, set_max_image_pixels

F = TypeVar("F", bound=Callable[..., object])

MAX_PIXELS_HELP = (f"largest image decoded, in pixels (default {DEFAULT_MAX_IMAGE_PIXELS} or "
                   "$ANOCLIP_MAX_IMAGE_PIXELS)")


def max_pixels_option(fn: F) -> F:
    """``--max-pixels N`` (an int or None), passed to the command as ``max_pixels``."""
    return click.option("--max-pixels", type=int, default=None, help=MAX_PIXELS_HELP)(fn)  # type: ignore[return-value]


def apply_max_pixels(limit: int | None) -> None:
    """Set the decode limit to ``--max-pixels`` when given (``InputError`` below 4 pixels)."""
    if limit is not None:
        set_max_image_pixels(limit)
