"""Artifact ``manifest.json``: reader, validator and atomic writer (torch-free).

Shared by the exporter (which writes it) and the runtime (which refuses anything it cannot
trust). The schema is ``docs/ARCHITECTURE.md`` (format_version 1). This module imports only the
standard library and ``anoclip_core.errors`` (which is itself dependency-free), so
``import runtime.manifest`` never imports torch, numpy or ONNX Runtime.

Refusals (all ``ArtifactError``, one line, naming the culprit):

* no ``manifest.json`` / not JSON / not an object;
* ``format`` other than ``anoclip-artifact``;
* ``format_version`` newer than ``FORMAT_VERSION`` ("upgrade anoclip") or not an integer;
* a missing or mistyped required field (named with its dotted path, e.g. ``text.classes``);
* a file named by the manifest that is missing, or not listed in ``files``;
* a sha256 mismatch (names the file);
* a class not in ``text.classes`` (``require_class``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

from anoclip_core.errors import ArtifactError
from anoclip_core.fileio import atomic_write_text, sha256_file

MANIFEST_NAME = "manifest.json"
FORMAT = "anoclip-artifact"
FORMAT_VERSION = 1

# dotted path -> accepted python types (JSON-decoded). ``None`` in the tuple allows null.
_NUM = (int, float)
REQUIRED_FIELDS: dict[str, tuple[type, ...]] = {
    "format": (str,),
    "format_version": (int,),
    "created": (str,),
    "backbone": (str,),
    "pretrained": (dict,),
    "pretrained.source": (str,),
    "pretrained.sha256": (str, type(None)),
    "pretrained.random_weights": (bool,),
    "image_size": (int,),
    "preprocess": (dict,),
    "preprocess.image_size": (int,),
    "preprocess.mean": (list,),
    "preprocess.std": (list,),
    "patch_grid": (list,),
    "embed_dim": (int,),
    "dual_blocks": (int,),
    "temperature": _NUM,
    "opset": (int,),
    "models": (dict,),
    "default_model": (str,),
    "io": (dict,),
    "io.inputs": (list,),
    "io.outputs": (list,),
    "text": (dict,),
    "text.file": (str,),
    "text.classes": (dict,),
    "text.prompt_set": (str,),
    "versions": (dict,),
    "files": (dict,),
}
MODEL_FIELDS: dict[str, tuple[type, ...]] = {"file": (str,), "precision": (str,)}
TENSORRT_FIELDS: dict[str, tuple[type, ...]] = {"file": (str,), "precision": (str,), "profile": (dict,)}


def _get(data: Mapping[str, Any], dotted: str) -> tuple[bool, Any]:
    cur: Any = data
    for part in dotted.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            return False, None
        cur = cur[part]
    return True, cur


def _type_name(types: tuple[type, ...]) -> str:
    names = {int: "integer", float: "number", str: "string", bool: "boolean", list: "list", dict: "object"}
    return " or ".join("null" if t is type(None) else names.get(t, t.__name__) for t in types)


def _check_fields(data: Mapping[str, Any], fields: Mapping[str, tuple[type, ...]], prefix: str = "") -> None:
    for dotted, types in fields.items():
        present, value = _get(data, dotted)
        name = prefix + dotted
        if not present:
            raise ArtifactError(f"manifest is missing required field '{name}'")
        ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
        if not ok:
            raise ArtifactError(f"manifest field '{name}' must be {_type_name(types)}, got {type(value).__name__}")


def validate_manifest(data: Any) -> dict[str, Any]:
    """Check format, version and every required field; returns ``data`` (a dict) on success."""
    if not isinstance(data, dict):
        raise ArtifactError(f"{MANIFEST_NAME} must hold a JSON object, got {type(data).__name__}")
    if "format" in data and data["format"] != FORMAT:
        raise ArtifactError(f"manifest field 'format' is {data['format']!r}, expected {FORMAT!r}")
    if "format_version" not in data:
        raise ArtifactError("manifest is missing required field 'format_version'")
    version = data["format_version"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ArtifactError(f"manifest field 'format_version' must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise ArtifactError(
            f"artifact format_version {version} is newer than this anoclip supports ({FORMAT_VERSION}); "
            "upgrade anoclip or re-export the artifact with this version"
        )
    _check_fields(data, REQUIRED_FIELDS)
    if len(data["patch_grid"]) != 2:
        raise ArtifactError(f"manifest field 'patch_grid' must be [h, w], got {data['patch_grid']!r}")
    if not data["models"]:
        raise ArtifactError("manifest field 'models' is empty: the artifact has no graph")
    for key, entry in data["models"].items():
        if not isinstance(entry, dict):
            raise ArtifactError(f"manifest field 'models.{key}' must be object, got {type(entry).__name__}")
        _check_fields(entry, MODEL_FIELDS, prefix=f"models.{key}.")
    if data["default_model"] not in data["models"]:
        raise ArtifactError(
            f"manifest field 'default_model' is {data['default_model']!r}, not one of models {sorted(data['models'])}"
        )
    trt = data.get("tensorrt")
    if trt is not None:
        if not isinstance(trt, dict):
            raise ArtifactError(f"manifest field 'tensorrt' must be object or null, got {type(trt).__name__}")
        _check_fields(trt, TENSORRT_FIELDS, prefix="tensorrt.")
    for name, digest in data["files"].items():
        if not isinstance(digest, str) or len(digest) != 64:
            raise ArtifactError(f"manifest field 'files.{name}' must be a hex sha256, got {digest!r}")
    validate_references(data)
    for name in referenced_files(data):
        if name not in data["files"]:
            raise ArtifactError(f"manifest names file {name!r} but 'files' has no sha256 for it")
    return data


def referenced_files(data: Mapping[str, Any]) -> list[str]:
    """Every file the manifest points at (graphs, external data, text, engine)."""
    names = [entry["file"] for entry in data.get("models", {}).values() if isinstance(entry, dict) and "file" in entry]
    for entry in data.get("models", {}).values():
        if isinstance(entry, dict):
            names += list(entry.get("external_data") or [])
    if isinstance(data.get("text"), dict) and "file" in data["text"]:
        names.append(data["text"]["file"])
    if isinstance(data.get("tensorrt"), dict) and "file" in data["tensorrt"]:
        names.append(data["tensorrt"]["file"])
    return names + [entry["file"] for entry in references(data).values()] + ([refsearch_file(data)] if
                                                                             refsearch_file(data) else [])


def _safe_member(root: Path, name: str) -> Path:
    if os.path.isabs(name) or ".." in Path(name).parts:
        raise ArtifactError(f"manifest 'files' entry {name!r} is not a plain relative path inside the artifact")
    return root / name


def verify_files(artifact_dir: str | os.PathLike, data: Mapping[str, Any], names: Iterable[str] | None = None) -> None:
    """Every listed file exists and matches its sha256 (``names``: a subset to check)."""
    root = Path(artifact_dir)
    files = data["files"]
    for name in names if names is not None else files:
        if name not in files:
            raise ArtifactError(f"artifact file {name!r} has no sha256 in the manifest")
        path = _safe_member(root, name)
        if not path.is_file():
            raise ArtifactError(f"artifact file missing: {path}")
        if sha256_file(path) != files[name]:
            raise ArtifactError(
                f"sha256 mismatch for artifact file {name!r} in {root}: modified or corrupted since export; re-export it"
            )


def read_manifest(artifact_dir: str | os.PathLike, check_files: bool = True) -> dict[str, Any]:
    """Load + validate ``<dir>/manifest.json``; with ``check_files`` also every file's sha256."""
    root = Path(artifact_dir)
    path = root / MANIFEST_NAME
    if not root.is_dir():
        raise ArtifactError(f"artifact folder not found: {root}")
    if not path.is_file():
        raise ArtifactError(f"not an anoclip artifact: {path} is missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ArtifactError(f"cannot read {path}: {err}") from None
    validate_manifest(data)
    if check_files:
        verify_files(root, data)
    return data


def file_hashes(artifact_dir: str | os.PathLike, names: Iterable[str]) -> dict[str, str]:
    """``{name: sha256}`` for files of an artifact folder (sorted by name)."""
    root = Path(artifact_dir)
    return {name: sha256_file(_safe_member(root, name)) for name in sorted(names)}


def write_manifest(artifact_dir: str | os.PathLike, data: Mapping[str, Any], validate: bool = True) -> Path:
    """Validate (unless told not to) and atomically write ``<dir>/manifest.json``."""
    data = dict(data)
    if validate:
        validate_manifest(data)
    path = Path(artifact_dir) / MANIFEST_NAME
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")
    return path


def require_class(data: Mapping[str, Any], class_name: str) -> str:
    """The class's prompt domain; refuses a class the artifact has no text embeddings for."""
    classes = data["text"]["classes"]
    if class_name not in classes:
        known = ", ".join(sorted(classes)) or "none"
        raise ArtifactError(
            f"class {class_name!r} is not in this artifact (text.classes: {known}); "
            f"add it with: anoclip-export add-class <artifact> {class_name}"
        )
    return classes[class_name]


def model_entry(data: Mapping[str, Any], precision: str | None = None) -> dict[str, Any]:
    """The ``models`` entry for ``precision`` (default: ``default_model``)."""
    key = precision or data["default_model"]
    if key not in data["models"]:
        raise ArtifactError(f"artifact has no {key!r} model (available: {', '.join(sorted(data['models']))})")
    return data["models"][key]


# --- few-shot reference banks (issue 13) -----------------------------------------------------------
# ``references``: optional, ``{class: entry}``; each entry names its bank file (``refs/<class>.<sha12>.npz``,
# also listed in ``files``) and repeats the bank's provenance so the manifest alone says what is there.
REFS_FIELD = "references"
REFS_DIR = "refs"
REFERENCE_FIELDS: dict[str, tuple[type, ...]] = {
    "file": (str,),
    "shots": (int,),
    "size": (int,),
    "patches": (int,),
    "coreset": (dict, type(None)),
    "backbone": (str,),
    "embed_dim": (int,),
    "images_sha256": (str,),
    "source": (str,),
    "updated": (str,),
}


def references(data: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{class: entry}`` of the artifact's reference banks ({} when it has none)."""
    refs = data.get(REFS_FIELD)
    return dict(refs) if isinstance(refs, dict) else {}


def validate_references(data: Mapping[str, Any]) -> None:
    """The ``references`` block: an object of per-class entries with every field typed, for known classes."""
    search = data.get(REFSEARCH_FIELD)
    if search is not None and (not isinstance(search, dict) or not isinstance(search.get("file"), str)):
        raise ArtifactError(f"manifest field '{REFSEARCH_FIELD}' must be null or an object with a 'file' string")
    refs = data.get(REFS_FIELD)
    if refs is None:
        return
    if not isinstance(refs, dict):
        raise ArtifactError(f"manifest field '{REFS_FIELD}' must be object, got {type(refs).__name__}")
    for cls_name, entry in refs.items():
        if not isinstance(entry, dict):
            raise ArtifactError(f"manifest field '{REFS_FIELD}.{cls_name}' must be object, got {type(entry).__name__}")
        _check_fields(entry, REFERENCE_FIELDS, prefix=f"{REFS_FIELD}.{cls_name}.")
        if cls_name not in data["text"]["classes"]:
            raise ArtifactError(f"manifest field '{REFS_FIELD}.{cls_name}': class not in text.classes")
        if entry["shots"] < 1 or entry["size"] < 1:
            raise ArtifactError(f"manifest field '{REFS_FIELD}.{cls_name}': shots and size must be >= 1")


REFSEARCH_FIELD = "refsearch"  # {"file": "refsearch.onnx", "inputs": [...], "outputs": [...]}, optional


def refsearch_file(data: Mapping[str, Any]) -> str | None:
    """The few-shot search graph's file name (written by the exporter for GPU backends), or None."""
    entry = data.get(REFSEARCH_FIELD)
    return entry.get("file") if isinstance(entry, dict) and isinstance(entry.get("file"), str) else None


def reference_entry(data: Mapping[str, Any], class_name: str) -> dict[str, Any] | None:
    """The class's reference-bank entry, or None when the class has no bank."""
    return references(data).get(class_name)
