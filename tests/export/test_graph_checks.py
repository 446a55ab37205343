"""Exported graph at temperature 0.5 with external data, checked independently of the exporter.

One tiny fp32 artifact exported with T = 0.5 and ``external_data_threshold=0`` (weights in
``encoder.onnx.data``). The graph's scores are recomputed by hand from its own embeddings and the
prototypes (ALGORITHM.md §4: ``softmax([cos_n, cos_a] / T)[abnormal]``), the runtime is checked
against the core at the same T, a tampered external-data file must be refused, and the verifier
is fed graphs edited to perturb exactly ONE output, so each of its checks is exercised alone.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

T = 0.5


@pytest.fixture(scope="module")
def t_art(register_tiny, make_config, tmp_path_factory) -> Path:
    from anoclip.export.api import export_artifact

    root = tmp_path_factory.mktemp("t05")
    return Path(export_artifact(make_config(root / "art", temperature=T, external_data_threshold=0)))


@pytest.fixture(scope="module")
def t_model(register_tiny):
    from anoclip_core import AnoCLIP

    return AnoCLIP.create(register_tiny, pretrained=None, temperature=T, cache_dir=None)


@pytest.fixture(scope="module")
def protos(t_art) -> np.ndarray:
    return _protos_from_text(t_art, json.loads((t_art / "manifest.json").read_text()))


def _protos_from_text(art: Path, man: dict) -> np.ndarray:
    from anoclip.runtime import Detector

    det = Detector.load(art, backend="ort-cpu")
    try:
        return np.stack([det.prototypes(c)[0] for c in list(man["text"]["classes"])]).astype(np.float32)
    finally:
        det.close()


def _pixels(model) -> np.ndarray:
    """Structured images (smooth gradients + a bright square) so maps have a real spread."""
    s = model.image_size
    yy, xx = np.mgrid[0:s, 0:s] / (s - 1)
    imgs = []
    for k in range(3):
        rgb = np.stack([xx, yy, 0.5 + 0.5 * np.sin(6 * xx * (k + 1))], -1)
        rgb[s // 4:s // 2, s // 4 + 4 * k:s // 2 + 4 * k] = [1.0, 0.1 * k, 0.0]
        imgs.append((rgb * 255).astype(np.uint8))
    return model.load_images(imgs).numpy()


def _run(path: Path, pixels: np.ndarray, protos: np.ndarray) -> dict[str, np.ndarray]:
    from anoclip.export.verify import ort_session
    from anoclip.runtime.contract import INPUT_NAMES, OUTPUT_NAMES

    sess = ort_session(path)
    out = sess.run(list(OUTPUT_NAMES), {INPUT_NAMES[0]: pixels, INPUT_NAMES[1]: protos})
    return dict(zip(OUTPUT_NAMES, out, strict=True))


def test_manifest_records_temperature_and_external_data(t_art):
    man = json.loads((t_art / "manifest.json").read_text())
    assert man["temperature"] == T
    assert man["models"]["fp32"]["external_data"] == ["encoder.onnx.data"]
    assert "encoder.onnx.data" in man["files"]
    assert (t_art / "encoder.onnx.data").stat().st_size > 10_000


def test_graph_scores_follow_the_formula_at_t(t_art, t_model, protos):
    """patch_probs / image_scores = softmax([e.t_n, e.t_a] / T)[1], from the graph's own embeddings."""
    px = _pixels(t_model)
    out = _run(t_art / "encoder.onnx", px, protos)
    loc, glob = out["local_embeddings"].astype(np.float64), out["global_embedding"].astype(np.float64)

    def p_abnormal(e, c):
        logits = np.stack([e @ protos[c, 0], e @ protos[c, 1]], -1) / T
        z = np.exp(logits - logits.max(-1, keepdims=True))
        return z[..., 1] / z.sum(-1)

    for c in range(protos.shape[0]):
        np.testing.assert_allclose(out["patch_probs"][:, c], p_abnormal(loc, c), atol=2e-6, rtol=0)
        np.testing.assert_allclose(out["image_scores"][:, c], p_abnormal(glob, c), atol=2e-6, rtol=0)
    # the T-effect is far above the tolerance: at T = 1 the probabilities differ by > 1e-3
    assert np.abs(out["patch_probs"] - 0.5).max() > 2e-3


def test_graph_tokens_are_the_cores_unnormalised_tokens(t_art, t_model, protos):
    import torch

    px = _pixels(t_model)
    out = _run(t_art / "encoder.onnx", px, protos)
    with torch.no_grad():
        glob, local = t_model.encoder.forward_tokens(torch.from_numpy(px))
    scale = float(np.abs(local.numpy()).max())
    np.testing.assert_allclose(out["local_tokens"], local.numpy(), atol=1e-4 * scale, rtol=0)
    norms = np.linalg.norm(out["local_tokens"], axis=-1)
    assert np.abs(norms - 1).max() > 0.1  # tokens are NOT normalised (TTA input)


def test_swapped_prototypes_flip_graph_and_runtime_scores(t_art, t_model, protos):
    """normal/abnormal order end to end: swapping the two prototypes gives 1 - p everywhere."""
    from anoclip.runtime import Detector

    px = _pixels(t_model)
    a = _run(t_art / "encoder.onnx", px, protos)
    b = _run(t_art / "encoder.onnx", px, np.ascontiguousarray(protos[:, ::-1]))
    np.testing.assert_allclose(b["patch_probs"], 1 - a["patch_probs"], atol=2e-6)
    np.testing.assert_allclose(b["image_scores"], 1 - a["image_scores"], atol=2e-6)
    det = Detector.load(t_art, backend="ort-cpu")
    try:
        probs, scores = det.infer_pixels(px, "bottle")
        np.testing.assert_allclose(scores, a["image_scores"][:, 0], atol=2e-6)
        np.testing.assert_allclose(probs, a["patch_probs"][:, 0], atol=2e-6)
    finally:
        det.close()


def test_runtime_matches_core_at_t(t_art, t_model):
    """Runtime predict (T read from the manifest) equals the core at T = 0.5, and not at T = 1."""
    from anoclip.runtime import Detector

    s = t_model.image_size
    img = (np.clip(_pixels(t_model)[0].transpose(1, 2, 0) * 0.2 + 0.5, 0, 1) * 255).astype(np.uint8)
    det = Detector.load(t_art, backend="ort-cpu")
    try:
        res = det.predict(img, "bottle")
    finally:
        det.close()
    maps, scores = t_model.predict(t_model.load_images([img]), "bottle")
    spread = float(maps.max() - maps.min())
    assert spread > 5e-3
    assert abs(res.score - float(scores[0])) <= 1e-5
    np.testing.assert_allclose(res.anomaly_map, maps[0].numpy(), atol=max(1e-4, 0.01 * spread), rtol=0)
    assert abs(float(scores[0]) - 0.5) > 1e-3  # at T = 1 the score would move by ~half of this: >> 1e-5
    assert res.anomaly_map.shape == (s, s)


def test_tampered_external_data_is_refused(t_art, tmp_path):
    """Flip one byte in the middle of encoder.onnx.data (size unchanged): the sha256 check names it."""
    import shutil

    from anoclip.runtime import Detector
    from anoclip.runtime.contract import read_manifest
    from anoclip_core.errors import ArtifactError

    art = tmp_path / "art"
    shutil.copytree(t_art, art)
    data = art / "encoder.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match=r"sha256 mismatch.*encoder\.onnx\.data"):
        read_manifest(art)
    with pytest.raises(ArtifactError, match=r"encoder\.onnx\.data"):
        Detector.load(art, backend="ort-cpu")


# --- the verifier, each check alone ----------------------------------------------------------

def _perturb(src: Path, dst: Path, output: str, op: str, value: float) -> Path:
    """Copy of the graph where only ``output`` goes through one extra ``Add``/``Mul`` by ``value``."""
    model = onnx.load(str(src), load_external_data=True)
    g = model.graph
    raw = output + "__raw"
    for node in g.node:
        node.input[:] = [raw if n == output else n for n in node.input]
        node.output[:] = [raw if n == output else n for n in node.output]
    g.initializer.append(numpy_helper.from_array(np.asarray(value, np.float32), output + "__c"))
    g.node.append(helper.make_node(op, [raw, output + "__c"], [output]))
    onnx.save_model(model, str(dst))
    return dst


@pytest.fixture(scope="module")
def verifier(t_model, protos, t_art):
    from anoclip.export.verify import Verifier

    man = json.loads((t_art / "manifest.json").read_text())
    return Verifier(t_model, list(man["text"]["classes"]), man["text"]["classes"], protos)


def test_verifier_passes_the_untouched_graph(verifier, t_art):
    res = verifier.verify(t_art / "encoder.onnx", "fp32")
    assert res["passed"] and res["map_max_abs"] < 1e-4


@pytest.mark.parametrize("output,op,value,metric", [
    ("patch_probs", "Add", 0.01, "map_max_abs"),
    ("image_scores", "Add", 0.01, "score_max_abs"),
    ("global_embedding", "Add", 0.01, "embedding_max_abs"),
    ("local_tokens", "Mul", 1.01, "tokens_max_rel"),
])
def test_each_check_alone_rejects_a_wrong_graph(verifier, t_art, tmp_path, output, op, value, metric):
    from anoclip.export.verify import VerificationError

    bad = _perturb(t_art / "encoder.onnx", tmp_path / "bad.onnx", output, op, value)
    with pytest.raises(VerificationError) as info:
        verifier.verify(bad, "fp32")
    msg = str(info.value)
    assert f"{metric} = " in msg
    others = {"map_max_abs", "score_max_abs", "embedding_max_abs", "tokens_max_rel"} - {metric}
    assert not any(f"{m} = " in msg for m in others), msg  # only this check is violated


def test_tolerances_pinned_to_the_documented_table():
    """Values from verify.py's table (fp32 1e-4, fp16 1e-2 / 2e-2, int8 5e-2 / 1.5e-1), scaled by 1/T for T < 1 only."""
    from anoclip.export.verify import tolerance_for

    assert tolerance_for("fp32", 1.0) == pytest.approx({"map": 1e-4, "score": 1e-4, "embedding": 1e-4})
    assert tolerance_for("fp16", 2.0) == pytest.approx({"map": 1e-2, "score": 1e-2, "embedding": 2e-2})
    assert tolerance_for("int8", 0.5) == pytest.approx({"map": 1e-1, "score": 1e-1, "embedding": 1.5e-1})


def test_runtime_tta_uses_the_artifact_temperature(t_art, t_model):
    """AnoCLIP+ through the runtime (T from the manifest) equals the core's AnoCLIP+ at T = 0.5."""
    from anoclip.runtime import Detector
    from anoclip.runtime.postprocess import anomaly_map

    px = _pixels(t_model)[:1]
    det = Detector.load(t_art, backend="ort-cpu")
    try:
        assert det.temperature == T
        probs, _ = det.infer_pixels(px, "bottle", tta=True)
    finally:
        det.close()
    import torch

    core_maps, _ = t_model.predict(torch.from_numpy(px), "bottle", tta=True)
    spread = float(core_maps.max() - core_maps.min())
    assert spread > 5e-3
    got = anomaly_map(probs, (t_model.image_size,) * 2)
    np.testing.assert_allclose(got, core_maps.numpy(), atol=0.01 * spread, rtol=0)
