"""External-data files (``encoder.onnx.data``, the weights of models over 2 GB) are covered by the
manifest's sha256 set exactly like the graph: listed -> must have a hash, tampered -> refused."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
from test_contract import _artifact

from anoclip.runtime import contract as mf
from anoclip_core.errors import ArtifactError


def _with_external(root: Path) -> dict:
    data = _artifact(root)
    (root / "encoder.onnx.data").write_bytes(bytes(range(256)) * 64)
    data["models"]["fp32"]["external_data"] = ["encoder.onnx.data"]
    data["files"] = mf.file_hashes(root, ["encoder.onnx", "encoder.onnx.data", "text_embeddings.npz"])
    mf.write_manifest(root, data)
    return data


def test_external_data_is_referenced_and_needs_a_hash(tmp_path):
    data = _with_external(tmp_path / "a")
    assert "encoder.onnx.data" in mf.referenced_files(data)
    bad = copy.deepcopy(data)
    del bad["files"]["encoder.onnx.data"]
    with pytest.raises(ArtifactError, match=r"encoder\.onnx\.data"):
        mf.validate_manifest(bad)


def test_tampered_external_data_is_refused_same_size(tmp_path):
    root = tmp_path / "a"
    _with_external(root)
    mf.read_manifest(root)  # intact: accepted
    raw = bytearray((root / "encoder.onnx.data").read_bytes())
    raw[1000] ^= 0x40
    (root / "encoder.onnx.data").write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match=r"sha256 mismatch for artifact file 'encoder\.onnx\.data'"):
        mf.read_manifest(root)
    mf.read_manifest(root, check_files=False)  # only the hash check sees it
