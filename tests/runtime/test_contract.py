"""runtime/contract.py: torch-free reader/validator/atomic writer of manifest.json."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

from anoclip.runtime import contract as mf
from anoclip_core.errors import ArtifactError


def _artifact(root: Path) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    (root / "encoder.onnx").write_bytes(b"graph")
    (root / "text_embeddings.npz").write_bytes(b"text")
    data = {
        "format": "anoclip-artifact",
        "format_version": 1,
        "created": "2026-01-01T00:00:00Z",
        "backbone": "ViT-B-16-plus-240",
        "pretrained": {"source": "laion400m_e32", "sha256": None, "random_weights": False},
        "image_size": 240,
        "preprocess": {"image_size": 240, "mean": [0.5] * 3, "std": [0.5] * 3, "resize": "stretch",
                       "interpolation": "bilinear_antialias", "channel_order": "RGB", "value_range": [0, 1]},
        "patch_grid": [15, 15],
        "embed_dim": 640,
        "dual_blocks": 12,
        "temperature": 1.0,
        "opset": 18,
        "models": {"fp32": {"file": "encoder.onnx", "precision": "fp32", "verification": {"passed": True}}},
        "default_model": "fp32",
        "io": {"inputs": ["pixels", "text_prototypes"],
               "outputs": ["global_embedding", "local_embeddings", "local_tokens", "patch_probs", "image_scores"]},
        "text": {"file": "text_embeddings.npz", "classes": {"bottle": "object"}, "prompt_set": "anoclip-v1",
                 "sentences_per_state": 462},
        "tensorrt": None,
        "versions": {"anoclip": "0.1.0"},
        "files": mf.file_hashes(root, ["encoder.onnx", "text_embeddings.npz"]),
    }
    mf.write_manifest(root, data)
    return data


def test_round_trip(tmp_path):
    data = _artifact(tmp_path / "a")
    assert mf.read_manifest(tmp_path / "a") == data
    assert mf.model_entry(data)["file"] == "encoder.onnx"
    assert mf.require_class(data, "bottle") == "object"


@pytest.mark.parametrize("field", ["backbone", "pretrained.random_weights", "text.classes", "files", "models",
                                   "preprocess.mean", "image_size", "opset"])
def test_missing_field_named(tmp_path, field):
    data = _artifact(tmp_path / "a")
    broken = copy.deepcopy(data)
    parent, _, leaf = field.rpartition(".")
    target = broken
    for part in parent.split(".") if parent else []:
        target = target[part]
    del target[leaf]
    (tmp_path / "a" / "manifest.json").write_text(json.dumps(broken))
    with pytest.raises(ArtifactError, match=f"missing required field '{field}'"):
        mf.read_manifest(tmp_path / "a")


def test_wrong_type_named(tmp_path):
    data = _artifact(tmp_path / "a")
    data["image_size"] = "240"
    with pytest.raises(ArtifactError, match="'image_size' must be integer"):
        mf.validate_manifest(data)
    data["image_size"] = True
    with pytest.raises(ArtifactError, match="'image_size' must be integer"):
        mf.validate_manifest(data)


def test_newer_format_version_refused(tmp_path):
    data = _artifact(tmp_path / "a")
    data["format_version"] = 2
    (tmp_path / "a" / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="format_version 2 is newer than this anoclip supports \\(1\\)"):
        mf.read_manifest(tmp_path / "a")


def test_wrong_format_refused(tmp_path):
    data = _artifact(tmp_path / "a")
    data["format"] = "something-else"
    with pytest.raises(ArtifactError, match="'format'"):
        mf.validate_manifest(data)


def test_tampered_file_refused_naming_it(tmp_path):
    _artifact(tmp_path / "a")
    (tmp_path / "a" / "text_embeddings.npz").write_bytes(b"TEXT")
    with pytest.raises(ArtifactError, match="sha256 mismatch for artifact file 'text_embeddings.npz'"):
        mf.read_manifest(tmp_path / "a")
    mf.read_manifest(tmp_path / "a", check_files=False)  # structure alone is still fine


def test_missing_file_refused(tmp_path):
    _artifact(tmp_path / "a")
    (tmp_path / "a" / "encoder.onnx").unlink()
    with pytest.raises(ArtifactError, match="artifact file missing: .*encoder.onnx"):
        mf.read_manifest(tmp_path / "a")


def test_unlisted_referenced_file_refused(tmp_path):
    data = _artifact(tmp_path / "a")
    data["models"]["fp16"] = {"file": "encoder.fp16.onnx", "precision": "fp16"}
    with pytest.raises(ArtifactError, match="'encoder.fp16.onnx' but 'files' has no sha256"):
        mf.validate_manifest(data)


def test_path_escape_refused(tmp_path):
    data = _artifact(tmp_path / "a")
    data["files"]["../../etc/passwd"] = "0" * 64
    (tmp_path / "a" / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="not a plain relative path"):
        mf.read_manifest(tmp_path / "a")


def test_not_an_artifact(tmp_path):
    with pytest.raises(ArtifactError, match="artifact folder not found"):
        mf.read_manifest(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="manifest.json is missing"):
        mf.read_manifest(tmp_path / "empty")
    (tmp_path / "empty" / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="cannot read"):
        mf.read_manifest(tmp_path / "empty")


def test_unknown_class_refused(tmp_path):
    data = _artifact(tmp_path / "a")
    with pytest.raises(ArtifactError, match="class 'carpet' is not in this artifact.*add-class"):
        mf.require_class(data, "carpet")


def test_atomic_write_keeps_old_on_failure(tmp_path, monkeypatch):
    data = _artifact(tmp_path / "a")
    before = (tmp_path / "a" / "manifest.json").read_text()
    bad = dict(data)
    del bad["backbone"]
    with pytest.raises(ArtifactError):
        mf.write_manifest(tmp_path / "a", bad)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(mf.os, "replace", boom)
    with pytest.raises(OSError):
        mf.write_manifest(tmp_path / "a", data)
    assert (tmp_path / "a" / "manifest.json").read_text() == before
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "encoder.onnx",
        "manifest.json",
        "text_embeddings.npz",
    ]


def test_manifest_module_is_torch_free():
    code = "import sys, runtime.contract; assert 'torch' not in sys.modules and 'numpy' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


@pytest.mark.parametrize("field,value", [
    ("mean", [0.5, 0.5]), ("mean", "0.5,0.5,0.5"), ("mean", [0.5, "x", 0.5]), ("mean", [0.5, True, 0.5]),
    ("mean", [0.5, float("nan"), 0.5]),
    ("std", [0.5, 0.5, 0.0]), ("std", [0.5, -1, 0.5]), ("std", [[0.5], [0.5], [0.5]]), ("std", [0.5] * 4),
    ("value_range", [1, 0]), ("value_range", [0, 0]), ("value_range", [0]), ("value_range", ["0", "1"]),
    ("value_range", None), ("image_size", 224),
])
def test_bad_preprocess_field_is_named(tmp_path, field, value):
    data = _artifact(tmp_path / "a")
    data["preprocess"][field] = value
    (tmp_path / "a" / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match=rf"manifest field 'preprocess\.{field}'"):
        mf.read_manifest(tmp_path / "a", check_files=False)


def test_good_preprocess_fields_pass_and_value_range_is_optional(tmp_path):
    data = _artifact(tmp_path / "a")
    data["preprocess"].update(mean=[0, 1, 0.25], std=[1, 2, 0.125], value_range=[-1.0, 1])
    mf.validate_manifest(data)
    del data["preprocess"]["value_range"]
    mf.validate_manifest(data)


@pytest.mark.parametrize("name", ["../outside.bin", "/etc/passwd", "sub/../../x.bin"])
def test_no_verify_still_keeps_paths_inside_the_artifact(tmp_path, name):
    data = _artifact(tmp_path / "a")
    data["files"][name] = "0" * 64
    data["text"]["file"] = name
    (tmp_path / "a" / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="not a plain relative path inside the artifact"):
        mf.read_manifest(tmp_path / "a", check_files=False)


def test_contract_names_are_spelled_only_in_the_contract_module():
    """Issue 11: nothing but runtime/contract.py spells an artifact file name or a format name/version."""
    import ast

    root = Path(__file__).resolve().parents[2]
    owned = {"manifest.json", "calibration.json", "text_embeddings.npz", "anoclip-artifact", "anoclip-calibration"}
    graph_io = {"pixels", "text_prototypes"}  # the graph's input names, where graphs are built and run
    offenders = []
    for package in ("anoclip_core", "export", "runtime", "benchmarks", "anoclip_demo"):
        for path in sorted((root / package).rglob("*.py")):
            if path.name == "contract.py":
                continue
            tree = ast.parse(path.read_text())
            docstrings = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr)
                          and isinstance(n.value, ast.Constant)}
            for node in ast.walk(tree):
                names = owned | (graph_io if package == "export" or "backends" in path.parts else set())
                if (isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names
                        and id(node) not in docstrings):
                    offenders.append(f"{path.relative_to(root)}:{node.lineno} {node.value!r}")
    assert not offenders, offenders
