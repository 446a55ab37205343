"""Expand CLI inputs (files, folders, globs) into an ordered list of image paths.

``folder_images`` is the one way a folder of images is listed (``infer``, ``calibrate`` and
``refs`` alike): recursive, every extension in ``IMAGE_EXTENSIONS``, sorted by path."""
from __future__ import annotations

import glob
import os
from collections.abc import Iterable
from pathlib import Path

from anoclip_core.errors import InputError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pnm")


def _is_image(p: str) -> bool:
    return p.lower().endswith(IMAGE_EXTENSIONS)


def folder_images(folder: str | os.PathLike, recursive: bool = True) -> list[str]:
    """The image files under ``folder`` (sub-folders too unless ``recursive`` is False), sorted by path;
    ``InputError`` when there are none."""
    text = os.fspath(folder)
    pattern = "**/*" if recursive else "*"
    found = sorted(str(p) for p in Path(text).glob(pattern) if p.is_file() and _is_image(str(p)))
    if not found and _is_image(text):  # e.g. a shell glob '*.png' that matched a folder
        raise InputError(f"{text} is a directory, not an image file (and it holds no images)")
    if not found:
        raise InputError(f"folder {text} contains no images ({', '.join(IMAGE_EXTENSIONS)})")
    return found


def collect_inputs(inputs: Iterable[str | os.PathLike], recursive: bool = True) -> list[str]:
    """Folders -> their image files (sorted, recursive), globs -> matches (sorted), files as given.

    A path that does not exist is kept (so a batch reports it as that image's error); a glob or
    a folder with no images raises ``InputError``. Duplicates are dropped, order kept.
    """
    out: list[str] = []
    for item in inputs:
        text = os.fspath(item)
        if os.path.isdir(text):
            out.extend(folder_images(text, recursive))
        elif glob.has_magic(text):
            found = sorted(p for p in glob.glob(text, recursive=True) if os.path.isfile(p))
            if not found:
                raise InputError(f"no files match {text}")
            out.extend(found)
        else:
            out.append(text)
    return list(dict.fromkeys(out))  # duplicates dropped, first occurrence kept
