"""The one contract between export and runtime (torch-free): names, the manifest, the calibration file.

Everything both sides must agree on is spelled here and nowhere else: the graph's input and
output names and shapes, the artifact's file names, ``manifest.json`` (``build_manifest``,
``validate_manifest``, ``read_manifest``, ``write_manifest``) and ``calibration.json`` (see
``runtime.calibration`` for how thresholds are computed from it). The exporter builds and
writes with it, the runtime and the benchmarks read with it. The schema is
``docs/ARCHITECTURE.md`` (format_version 1). This module imports only the
standard library and ``anoclip_core.errors`` (which is itself dependency-free), so
``import runtime.contract`` never imports torch, numpy or ONNX Runtime.

Refusals (all ``ArtifactError``, one line, naming the culprit):

* no ``manifest.json`` / not JSON / not an object;
* ``format`` other than ``anoclip-artifact``;
* ``format_version`` newer than ``FORMAT_VERSION`` ("upgrade anoclip") or not an integer;
* a missing or mistyped required field (named with its dotted path, e.g. ``text.classes``);
* ``preprocess`` mean/std (3 finite numbers, std > 0), value_range (2 numbers, low < high) or
  image_size (equal to ``image_size``) of the wrong type, shape or value;
* a file path in ``files`` that is absolute or climbs out of the artifact (``..``), also
  without the sha256 check;
* a file named by the manifest that is missing, or not listed in ``files``;
* a sha256 mismatch (names the file; reference banks are checked per class when used, see
  ``artifact_files``, and all at once by ``check_bank_files`` for ``add-class`` and ``is_complete``);
* a class not in ``text.classes`` (``require_class``);
* a ``calibration`` record (written by ``anoclip calibrate``) that is not an object with a
  ``file`` name and a hex ``sha256`` (the file itself is checked by ``runtime.calibration``).

``recover_artifact`` repairs what a killed ``--force`` replace left (see ``anoclip_core.staging``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import numbers
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from anoclip_core import staging
from anoclip_core.artlock import artifact_lock
from anoclip_core.errors import ArtifactError, InputError
from anoclip_core.fileio import atomic_write_text, sha256_file

log = logging.getLogger("anoclip.runtime")

MANIFEST_NAME = "manifest.json"
FORMAT = "anoclip-artifact"
FORMAT_VERSION = 1
TEXT_FILE = "text_embeddings.npz"

# The exported graph's interface (export/wrapper.py produces it, every backend runs it).
INPUT_NAMES = ("pixels", "text_prototypes")
OUTPUT_NAMES = ("global_embedding", "local_embeddings", "local_tokens", "patch_probs", "image_scores")
DEFAULT_OUTPUTS = ("patch_probs", "image_scores")


def io_spec(image_size: int, patch_grid: Iterable[int], embed_dim: int) -> dict[str, Any]:
    """The manifest's ``io`` block: input/output names and shapes ("B" images, "C" classes dynamic)."""
    s, d = int(image_size), int(embed_dim)
    h, w = (int(v) for v in patch_grid)
    return {
        "inputs": list(INPUT_NAMES),
        "outputs": list(OUTPUT_NAMES),
        "shapes": {
            "pixels": ["B", 3, s, s],
            "text_prototypes": ["C", 2, d],
            "global_embedding": ["B", d],
            "local_embeddings": ["B", h, w, d],
            "local_tokens": ["B", h, w, d],
            "patch_probs": ["B", "C", h, w],
            "image_scores": ["B", "C"],
        },
    }

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
    _check_preprocess(data)
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
    for name in data["files"]:
        _safe_member(Path("."), name)  # also with --no-verify: no file outside the artifact folder
    _check_calibration_record(data.get("calibration"))
    return data


def _numbers(value: Any, count: int) -> bool:
    """``value`` is a list of ``count`` finite numbers (booleans are not numbers here)."""
    return (isinstance(value, list) and len(value) == count
            and all(isinstance(v, _NUM) and not isinstance(v, bool) and math.isfinite(v) for v in value))


def _check_preprocess(data: Mapping[str, Any]) -> None:
    """Shapes and values of the pre-processing fields (a bad one would fail mid-batch otherwise)."""
    pre = data["preprocess"]
    for name in ("image_size", "embed_dim"):
        if data[name] < 1:
            raise ArtifactError(f"manifest field '{name}' must be a positive integer, got {data[name]!r}")
    if pre["image_size"] != data["image_size"]:
        raise ArtifactError(f"manifest field 'preprocess.image_size' is {pre['image_size']!r} but 'image_size' is "
                            f"{data['image_size']!r}; they must agree")
    if not _numbers(pre["mean"], 3):
        raise ArtifactError(f"manifest field 'preprocess.mean' must be 3 finite numbers, got {pre['mean']!r}")
    if not _numbers(pre["std"], 3) or not all(v > 0 for v in pre["std"]):
        raise ArtifactError(f"manifest field 'preprocess.std' must be 3 finite numbers > 0, got {pre['std']!r}")
    if "value_range" in pre and not (_numbers(pre["value_range"], 2) and pre["value_range"][0] < pre["value_range"][1]):
        raise ArtifactError(
            f"manifest field 'preprocess.value_range' must be 2 finite numbers [low, high] with low < high, "
            f"got {pre['value_range']!r}")


def _check_calibration_record(record: Any) -> None:
    if record is None:
        return
    if not isinstance(record, dict):
        raise ArtifactError(f"manifest field 'calibration' must be object or null, got {type(record).__name__}")
    _check_fields(record, {"file": (str,), "sha256": (str,), "classes": (dict,)}, prefix="calibration.")
    if len(record["sha256"]) != 64:
        raise ArtifactError(f"manifest field 'calibration.sha256' must be a hex sha256, got {record['sha256']!r}")


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
    search = refsearch_file(data)
    return names + [entry["file"] for entry in references(data).values()] + ([search] if search else [])


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
                f"sha256 mismatch for artifact file {name!r} in {root}: modified or corrupted since export; "
                "re-export it"
            )


def read_manifest(artifact_dir: str | os.PathLike, check_files: bool = True) -> dict[str, Any]:
    """Load + validate ``<dir>/manifest.json``; with ``check_files`` also the sha256 of every file but
    the reference banks (``artifact_files``; ``check_bank_files`` checks those)."""
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
        verify_files(root, data, artifact_files(data))
    return data


def artifact_files(data: Mapping[str, Any]) -> list[str]:
    """The files a load must verify: every listed file but the reference banks, which are checked
    per class when used (``runtime.refs.read_bank``), so one damaged bank does not block the others."""
    banks = {entry["file"] for entry in references(data).values()}
    return [name for name in data["files"] if name not in banks]


def check_bank_files(artifact_dir: str | os.PathLike, data: Mapping[str, Any]) -> None:
    """Every reference bank file exists and matches its sha256; ``ArtifactError`` naming the bank file,
    its class and the repair command otherwise.

    Loads do not call it (a damaged bank blocks only its class there, see ``artifact_files``); the
    writers and checks that must see a whole artifact do: ``anoclip-export add-class`` (it rewrites
    the manifest) and ``is_complete`` (whether a killed ``--force`` replace's new folder is put in place)."""
    root = Path(artifact_dir)
    for cls_name, entry in references(data).items():
        name = entry["file"]
        path = _safe_member(root, name)
        if not path.is_file():
            problem = "is missing"
        elif sha256_file(path) != data["files"][name]:
            problem = "does not match its sha256 in the manifest (modified or corrupted)"
        else:
            continue
        raise ArtifactError(f"reference bank {name} of class {cls_name!r} in {root} {problem}; "
                            f"{bank_repair_hint(root, cls_name)}")


def bank_repair_hint(artifact_dir: str | os.PathLike, class_name: str) -> str:
    """The command that rewrites a class's bank, and the way to run without it."""
    return (f"rebuild it with: anoclip refs {os.fspath(artifact_dir)} --class {class_name!r} --good DIR --replace "
            "(or infer without it: --no-refs)")


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
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, allow_nan=False) + "\n")
    return path


def require_class(data: Mapping[str, Any], class_name: str, artifact: str | os.PathLike | None = None) -> str:
    """The class's prompt domain; refuses a class the artifact has no text embeddings for (the
    message gives the add-class command, with the artifact's path when known)."""
    classes = data["text"]["classes"]
    if class_name not in classes:
        known = ", ".join(sorted(classes)) or "none"
        where = os.fspath(artifact) if artifact is not None else "<artifact>"
        near = case_collision(classes, class_name)
        hint = (f"class names are case-sensitive: did you mean {near!r}?" if near is not None
                else f"add it with: anoclip-export add-class {where} {class_name}")
        raise ArtifactError(f"class {class_name!r} is not in this artifact (text.classes: {known}); {hint}")
    return classes[class_name]


def case_collision(classes: Iterable[str], class_name: str) -> str | None:
    """A class of ``classes`` that differs from ``class_name`` only in letter case ("Bottle" vs
    "bottle"), or None. Such pairs are refused: they read as one product on a report or a file system."""
    key = class_name.casefold()
    return next((c for c in classes if c != class_name and c.casefold() == key), None)


def refuse_case_collision(classes: Iterable[str], class_name: str, where: str) -> None:
    """``ArtifactError`` naming both classes when ``class_name`` collides (by case) with one of ``classes``."""
    other = case_collision(classes, class_name)
    if other is not None:
        raise ArtifactError(f"class {class_name!r} and class {other!r} in {where} differ only in letter case; "
                            "class names are compared case-insensitively, use one spelling")


def model_entry(data: Mapping[str, Any], precision: str | None = None) -> dict[str, Any]:
    """The ``models`` entry for ``precision`` (default: ``default_model``)."""
    key = precision or data["default_model"]
    if key not in data["models"]:
        raise ArtifactError(f"artifact has no {key!r} model (available: {', '.join(sorted(data['models']))})")
    return data["models"][key]


def build_manifest(artifact_dir: str | os.PathLike, *, backbone: str, pretrained: Mapping[str, Any],
                   open_clip_config: Mapping[str, Any] | None, preprocess: Mapping[str, Any],
                   patch_grid: Iterable[int], patch_size: Iterable[int], embed_dim: int, depth: int,
                   dual_blocks: int, temperature: float, opset: int, exporter: str, models: Mapping[str, Any],
                   classes: Mapping[str, str], prompt_set: str, sentences_per_state: int,
                   tensorrt: Mapping[str, Any] | None, triton: Mapping[str, Any] | None,
                   refsearch: Mapping[str, Any] | None,
                   versions: Mapping[str, str], created: str, export_seconds: float | None) -> dict[str, Any]:
    """A complete, validated manifest for the files now in ``artifact_dir`` (sha256 of each)."""
    root = Path(artifact_dir)
    image_size = int(preprocess["image_size"])
    grid = [int(v) for v in patch_grid]
    files = sorted(p.name for p in root.iterdir() if p.is_file() and p.name != MANIFEST_NAME)
    data: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": created,
        "backbone": backbone,
        "pretrained": dict(pretrained),
        "open_clip_config": open_clip_config,
        "image_size": image_size,
        "preprocess": dict(preprocess),
        "patch_grid": grid,
        "patch_size": [int(v) for v in patch_size],
        "embed_dim": int(embed_dim),
        "depth": int(depth),
        "dual_blocks": int(dual_blocks),
        "temperature": float(temperature),
        "opset": int(opset),
        "exporter": exporter,
        "precisions": list(models),
        "models": dict(models),
        "default_model": "fp32",
        "io": io_spec(image_size, grid, embed_dim),
        "text": {
            "file": TEXT_FILE,
            "classes": {name: classes[name] for name in sorted(classes)},
            "prompt_set": prompt_set,
            "sentences_per_state": int(sentences_per_state),
        },
        "tensorrt": tensorrt,
        "triton": triton,
        REFSEARCH_FIELD: dict(refsearch) if refsearch else None,
        "versions": dict(versions),
        "export_seconds": export_seconds,
        "files": file_hashes(root, files),
    }
    return validate_manifest(data)


def is_complete(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a whole artifact (valid manifest, every file's sha256 matching, the
    reference banks' too)."""
    try:
        check_bank_files(folder, read_manifest(folder, check_files=True))
    except ArtifactError:
        return False
    return True


def recover_artifact(artifact_dir: str | os.PathLike) -> list[str]:
    """Under the artifact's lock: finish or undo a ``--force`` replace killed between its renames,
    then delete hidden temp/old folders of dead processes. Returns notes for the user."""
    root = Path(artifact_dir).absolute()
    if not staging.pending(root):  # the usual case: no lock file is created
        return []
    try:
        with artifact_lock(root, what="anoclip recovery"):
            note = staging.recover(root, is_complete)
            removed = staging.sweep(root)
    except PermissionError as err:
        if staging.has_leftovers(root) and not root.exists():
            raise ArtifactError(f"artifact {root} is missing and an interrupted --force replace left "
                                f".{root.name}.old-*; cannot repair it here ({err.strerror}): "
                                f"rename that folder back to {root.name}") from None
        return []
    notes = [note] if note else []
    if removed:
        notes.append(f"deleted {len(removed)} leftover folder(s) of interrupted exports of {root.name}: "
                     + ", ".join(p.name for p in removed))
    return notes


# --- few-shot reference banks (issue 13) -----------------------------------------------------------
# ``references``: optional, ``{class: entry}``; each entry names its bank file
# (``refs/<class>-<name hash>.<sha12>.npz``,
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
#: Optional in an entry (banks written before content hashes were kept lack it): sha256 of the JSON
#: list of the bank images' content sha256 (the file bytes), in bank order.
REFERENCE_OPTIONAL_FIELDS: dict[str, tuple[type, ...]] = {"contents_sha256": (str,)}
REFSEARCH_FIELD = "refsearch"  # {"file": "refsearch.onnx", "inputs": [...], "outputs": [...]}, optional


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
        _check_fields(entry, {k: v for k, v in REFERENCE_OPTIONAL_FIELDS.items() if k in entry},
                      prefix=f"{REFS_FIELD}.{cls_name}.")
        if cls_name not in data["text"]["classes"]:
            raise ArtifactError(f"manifest field '{REFS_FIELD}.{cls_name}': class not in text.classes")
        if entry["shots"] < 1 or entry["size"] < 1:
            raise ArtifactError(f"manifest field '{REFS_FIELD}.{cls_name}': shots and size must be >= 1")


def refsearch_file(data: Mapping[str, Any]) -> str | None:
    """The few-shot search graph's file name (written by the exporter for GPU backends), or None."""
    entry = data.get(REFSEARCH_FIELD)
    return entry.get("file") if isinstance(entry, dict) and isinstance(entry.get("file"), str) else None


def reference_entry(data: Mapping[str, Any], class_name: str) -> dict[str, Any] | None:
    """The class's reference-bank entry, or None when the class has no bank."""
    return references(data).get(class_name)


# --- calibration.json: per-class thresholds, written by `anoclip calibrate` ---------------------------
CALIBRATION_NAME = "calibration.json"
CALIBRATION_FORMAT = "anoclip-calibration"
CALIBRATION_VERSION = 1
THRESHOLD_FIELDS = ("image_threshold", "pixel_threshold")


def check_threshold(value: Any, where: str, error: type[Exception] = InputError) -> float:
    """The one threshold rule: a real number (not a bool or string), finite, in [0, 1] (score units)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if ok and math.isfinite(float(value)) and 0.0 <= float(value) <= 1.0:
        return float(value)
    raise error(f"{where} must be a finite number in [0, 1] (score units), got {value!r}")


def validate_calibration(data: Any, path: str | os.PathLike) -> dict[str, Any]:
    """Format, version and every class's thresholds; ``ArtifactError`` naming the class and field."""
    if (
        not isinstance(data, dict)
        or data.get("format") != CALIBRATION_FORMAT
        or not isinstance(data.get("classes"), dict)
    ):
        raise ArtifactError(f"{path} is not an anoclip calibration file")
    version = data.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version > CALIBRATION_VERSION:
        raise ArtifactError(f"{path} has format_version {version!r}; this anoclip reads {CALIBRATION_VERSION}")
    for name, entry in data["classes"].items():
        if not isinstance(entry, dict):
            raise ArtifactError(f"{path}: class {name!r} must be an object, got {type(entry).__name__}")
        for field in THRESHOLD_FIELDS:
            if field not in entry:
                raise ArtifactError(f"{path}: class {name!r} has no '{field}'")
            check_threshold(entry[field], f"{path}: class {name!r} field '{field}'", ArtifactError)
    return data


def load_calibration(artifact_dir: str | os.PathLike, manifest: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``calibration.json`` of an artifact, validated ({} when absent). With ``manifest``, the file
    must match the manifest's ``calibration`` record (sha256), when there is one."""
    path = Path(artifact_dir) / CALIBRATION_NAME
    record = (manifest or {}).get("calibration")
    if not path.is_file():
        if record:
            raise ArtifactError(f"{path} is missing but the manifest records a calibration (calibration.sha256); "
                                "re-run anoclip calibrate")
        return {}
    try:
        raw = path.read_bytes()
        data = json.loads(raw.decode("utf-8"))  # NaN / Infinity parse; check_threshold names them
    except (OSError, ValueError) as err:
        raise ArtifactError(f"cannot read {path}: {err}") from None
    if record and hashlib.sha256(raw).hexdigest() != record["sha256"]:
        raise ArtifactError(f"{path} changed since anoclip calibrate wrote it (sha256 differs from the manifest's "
                            "calibration.sha256); re-run anoclip calibrate")
    return validate_calibration(data, path)


def write_calibration(artifact_dir: str | os.PathLike, class_name: str, entry: Mapping[str, Any]) -> dict[str, Any]:
    """Store one class's entry, keeping the others; returns the whole file's content.

    Under the artifact's exclusive lock: re-read the file and the manifest, write the file (temp +
    rename), then the manifest with the file's sha256 and provenance (last: a reader pairing the
    new file with the old manifest sees a mismatch and re-reads under the lock)."""
    root = Path(artifact_dir)
    for field in THRESHOLD_FIELDS:
        check_threshold(entry[field], f"calibrated class {class_name!r} field '{field}'")
    with artifact_lock(root, what="anoclip calibrate"):
        manifest = read_manifest(root, check_files=False)
        try:
            old = load_calibration(root, manifest)
        except ArtifactError as err:
            log.warning("starting a new calibration file: the old one is unusable (%s)", err)
            old = {}
        data: dict[str, Any] = {
            "format": CALIBRATION_FORMAT,
            "format_version": CALIBRATION_VERSION,
            "classes": dict(old.get("classes", {})),
        }
        data["classes"][class_name] = dict(entry)
        text = json.dumps(data, indent=2, allow_nan=False) + "\n"
        atomic_write_text(root / CALIBRATION_NAME, text)
        record = dict(manifest.get("calibration") or {"classes": {}})
        record["classes"] = {k: v for k, v in dict(record.get("classes", {})).items() if k in data["classes"]}
        record["classes"][class_name] = {k: entry[k] for k in ("images", "quantile", "created") if k in entry}
        record.update(
            file=CALIBRATION_NAME,
            sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(),
            modified=entry.get("created"),
        )
        manifest["calibration"] = record
        write_manifest(root, manifest)
    return data
