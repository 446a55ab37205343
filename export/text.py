"""Text side of an artifact: ``text_embeddings.npz`` with every class's state embeddings.

Layout (ARCHITECTURE.md): ``"<class>/prototypes"`` float32 [2, D] (normal, abnormal; L2-normalised)
and ``"<class>/sentences"`` float32 [924, D] (per-sentence, L2-normalised, normal first). The
class -> prompt-domain map lives in the manifest (``text.classes``).
"""
from __future__ import annotations

import os
import unicodedata
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from anoclip.runtime import contract as mf
from anoclip_core.errors import AnoCLIPError

MAX_CLASS_NAME = 100  # a prompt sentence must fit CLIP's 77-token context; a name is also a file stem


def check_class_name(name: str) -> str:
    """A usable class name, trimmed; refuses what could not be passed back later (``--classes`` is
    comma separated, the classes file one per line) or would garble a log line or a key."""
    raw = name if isinstance(name, str) else ""
    name = raw.strip()
    if not name:
        raise AnoCLIPError(f"class name must be a non-empty string, got {raw!r}")
    bad = next((c for c in raw if c == "," or unicodedata.category(c)[0] in "CZ" and c != " "), None)
    if bad is not None:
        what = "a comma" if bad == "," else f"the control or separator character {bad!r}"
        raise AnoCLIPError(f"class name {raw!r} contains {what}; use letters, digits, spaces, '-' or '_'")
    if len(name) > MAX_CLASS_NAME:
        raise AnoCLIPError(f"class name {name[:20]!r}... is {len(name)} characters long; at most {MAX_CLASS_NAME}")
    if "/" in name or "\\" in name or name.startswith("."):
        raise AnoCLIPError(f"class name {name!r} may not contain '/' or '\\\\' or start with '.'")
    return name


def parse_classes(text: str | Iterable[str]) -> list[str]:
    """``"bottle, carpet"`` or an iterable -> unique class names in order; two names that differ only in
    letter case ("Bottle", "bottle") are refused, naming both."""
    if isinstance(text, str) and not text.strip():
        return []
    items = text.split(",") if isinstance(text, str) else list(text)
    out: list[str] = []
    for item in items:
        name = check_class_name(item.strip(" ") if isinstance(item, str) else item)
        if name not in out:
            mf.refuse_case_collision(out, name, "the class list")
            out.append(name)
    return out


def read_classes_file(path: str | os.PathLike) -> list[str]:
    """One class per line (or comma separated); ``#`` starts a comment."""
    p = Path(path)
    if not p.is_file():
        raise AnoCLIPError(f"classes file not found: {p}")
    try:
        raw = p.read_bytes()
        if b"\x00" in raw:
            raise ValueError("it holds NUL bytes")
        content = raw.decode("utf-8-sig")
    except (OSError, ValueError) as err:  # UnicodeDecodeError is a ValueError
        reason = "not UTF-8" if isinstance(err, UnicodeDecodeError) else str(getattr(err, "strerror", None) or err)
        raise AnoCLIPError(f"classes file {p} is not a text file of class names ({reason})") from None
    names: list[str] = []
    for line in content.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names += parse_classes(line)
    return parse_classes(names)


def encode_class(model, class_name: str, domain: str | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """(prototypes [2, D], sentences [924, D], domain) as float32 numpy, via the core."""
    emb = model.state_embeddings(class_name, domain)
    return (
        emb.prototypes.detach().float().cpu().numpy(),
        emb.sentences.detach().float().cpu().numpy(),
        emb.domain,
    )


def encode_classes(
    model, classes: Mapping[str, str | None], progress: bool = True
) -> dict[str, tuple[np.ndarray, np.ndarray, str]]:
    """Encode every class with a progress bar (924 sentences each through the text tower)."""
    from anoclip_core.progress import progress as progress_bar

    out = {}
    bar = progress_bar(list(classes.items()), desc="text encoding", unit="class", enabled=progress)
    for name, domain in bar:
        bar.set_postfix_str(name)
        out[name] = encode_class(model, name, domain)
    return out


def write_npz(path: str | os.PathLike, classes: Mapping[str, tuple[np.ndarray, np.ndarray, str]]) -> None:
    arrays = {}
    for name in sorted(classes):
        protos, sents, _ = classes[name]
        arrays[f"{name}/prototypes"] = np.ascontiguousarray(protos, dtype=np.float32)
        arrays[f"{name}/sentences"] = np.ascontiguousarray(sents, dtype=np.float32)
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def read_npz(path: str | os.PathLike) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{class: (prototypes, sentences)}`` from an artifact's npz."""
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    with np.load(path) as data:
        names = sorted({k.rsplit("/", 1)[0] for k in data.files})
        for name in names:
            out[name] = (data[f"{name}/prototypes"].copy(), data[f"{name}/sentences"].copy())
    return out


def prototypes_array(classes: Mapping[str, tuple[np.ndarray, ...]], order: Iterable[str]) -> np.ndarray:
    """Stack prototypes of ``order`` into the graph's ``text_prototypes`` input [C, 2, D]."""
    return np.stack([classes[name][0] for name in order]).astype(np.float32)
