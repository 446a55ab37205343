"""Detector: bad inputs, artifact refusals, thresholds/calibration, concurrency, memory soak, torch-free."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading

import cv2
import numpy as np
import pytest
from rt_fakes import fake_detector

from anoclip.runtime import Detector, InferConfig
from anoclip.runtime.calibration import calibrate
from anoclip_core.errors import ArtifactError, InputError


def _img(seed=0, h=64, w=64):
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


# ---- bad input ----------------------------------------------------------------------------------
@pytest.fixture()
def bad_files(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    one = tmp_path / "one.png"
    cv2.imwrite(str(one), np.zeros((1, 1, 3), np.uint8))
    good = tmp_path / "good.png"
    cv2.imwrite(str(good), _img(1, 50, 70))
    return {"empty": empty, "corrupt": corrupt, "one": one, "good": good, "missing": tmp_path / "missing.png"}


@pytest.mark.parametrize("key,needle", [("empty", "empty"), ("corrupt", "cannot decode"), ("one", "too small"),
                                        ("missing", "not found")])
def test_bad_files_raise_clear_errors(tiny_detector, bad_files, key, needle):
    with pytest.raises(InputError, match=needle):
        tiny_detector.predict(str(bad_files[key]), "bottle")


@pytest.mark.parametrize("arr,needle", [
    (np.full((30, 30, 3), np.nan, np.float32), "NaN"),
    (np.zeros((0, 10, 3), np.uint8), "too small"),
    (np.zeros((1, 1), np.uint8), "too small"),
    (np.zeros((10, 10, 5), np.uint8), "expected"),
    (np.zeros((10, 10, 3), np.int64), "dtype"),
    (np.full((10, 10, 3), 2.0, np.float32), r"\[0, 1\]"),
])
def test_bad_arrays_raise_clear_errors(tiny_detector, arr, needle):
    with pytest.raises(InputError, match=needle):
        tiny_detector.predict(arr, "bottle")
    with pytest.raises(InputError, match=needle):
        tiny_detector.predict(arr, "bottle", tile=True)


def test_batch_keeps_going_with_per_image_errors(tiny_detector, bad_files):
    items = [str(bad_files["good"]), str(bad_files["empty"]), np.full((9, 9), np.nan, np.float32),
             str(bad_files["corrupt"]), _img(2), str(bad_files["one"]), str(bad_files["missing"])]
    for tile in (False, True):
        res = tiny_detector.predict_batch(items, "bottle", batch=3, tile=tile)
        assert [r.ok for r in res] == [True, False, False, False, True, False, False]
        assert res[0].anomaly_map.shape == (50, 70) and res[4].anomaly_map.shape == (64, 64)
        assert "empty" in res[1].error and "NaN" in res[2].error and "decode" in res[3].error
        j = res[1].to_json()
        assert j["path"] == str(bad_files["empty"]) and "score" not in j and j["error"]
        ref = tiny_detector.predict(str(bad_files["good"]), "bottle", tile=tile)
        np.testing.assert_allclose(res[0].anomaly_map, ref.anomaly_map, atol=1e-6)


def test_unknown_class_is_an_artifact_error(tiny_detector):
    with pytest.raises(ArtifactError, match="'screw' is not in this artifact"):
        tiny_detector.predict(_img(), "screw")
    with pytest.raises(ArtifactError):
        tiny_detector.predict_batch([_img()], "screw")


# ---- artifact refusals --------------------------------------------------------------------------
def test_tampered_graph_is_refused(artifact_copy):
    with open(artifact_copy / "encoder.onnx", "r+b") as f:
        f.seek(1000)
        b = f.read(1)
        f.seek(1000)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(ArtifactError, match="sha256 mismatch.*encoder.onnx"):
        Detector.load(artifact_copy, backend="ort-cpu")


def test_tampered_text_embeddings_are_refused(artifact_copy):
    with open(artifact_copy / "text_embeddings.npz", "ab") as f:
        f.write(b"junk")
    with pytest.raises(ArtifactError, match="text_embeddings.npz"):
        Detector.load(artifact_copy)


def test_newer_format_version_is_refused(artifact_copy):
    path = artifact_copy / "manifest.json"
    data = json.loads(path.read_text())
    data["format_version"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="newer"):
        Detector.load(artifact_copy)


def test_missing_file_and_field_are_refused(artifact_copy, tmp_path):
    os.remove(artifact_copy / "encoder.onnx")
    with pytest.raises(ArtifactError, match="missing"):
        Detector.load(artifact_copy)
    with pytest.raises(ArtifactError, match="not found"):
        Detector.load(tmp_path / "nowhere")


# ---- thresholds, calibration, random-weights flag ---------------------------------------------
def test_thresholds_precedence_and_labels():
    det = fake_detector()
    img = np.full((64, 64, 3), 200, np.uint8)  # fake score = brightness ~ 0.78
    assert det.predict(img, "bottle").label == "anomaly"
    r = det.predict(img, "bottle", threshold=0.9, pixel_threshold=0.95)
    assert r.label == "normal" and r.regions == [] and r.threshold_source == "given"
    det.calibration = {"classes": {"bottle": {"image_threshold": 0.99, "pixel_threshold": 0.1}}}
    r = det.predict(img, "bottle")
    assert r.label == "normal" and r.threshold_source == "calibration" and len(r.regions) == 1
    assert det.predict(img, "carpet").threshold_source == "default"
    with pytest.raises(InputError):
        InferConfig(class_name="bottle", threshold=3.0)


def test_calibrate_writes_beside_manifest(artifact_copy, tmp_path):
    good = tmp_path / "good"
    good.mkdir()
    for i in range(6):
        cv2.imwrite(str(good / f"{i}.png"), _img(i, 40 + i, 50))
    manifest_before = (artifact_copy / "manifest.json").read_bytes()
    det = Detector.load(artifact_copy, backend="ort-cpu")
    entry = calibrate(det, [good], "bottle", quantile=0.9)
    scores = [det.predict(str(good / f"{i}.png"), "bottle", threshold=1.0).score for i in range(6)]
    assert entry["image_threshold"] == pytest.approx(float(np.quantile(scores, 0.9)), abs=1e-7)
    assert entry["images"] == 6
    cal = json.loads((artifact_copy / "calibration.json").read_text())
    assert set(cal["classes"]) == {"bottle"} and cal["format"] == "anoclip-calibration"
    manifest_after = json.loads((artifact_copy / "manifest.json").read_text())
    record = manifest_after.pop("calibration")  # the only change: the file's sha256 and provenance
    assert manifest_after == json.loads(manifest_before)
    assert record["sha256"] == hashlib.sha256((artifact_copy / "calibration.json").read_bytes()).hexdigest()
    assert record["classes"]["bottle"]["images"] == 6 and record["classes"]["bottle"]["quantile"] == 0.9
    det2 = Detector.load(artifact_copy, backend="ort-cpu")  # calibration.json is outside the graph's sha set
    r = det2.predict(str(good / "0.png"), "bottle")
    assert r.threshold_source == "calibration" and r.image_threshold == pytest.approx(entry["image_threshold"])
    calibrate(det2, [good], "carpet", quantile=0.5)
    cal = json.loads((artifact_copy / "calibration.json").read_text())
    assert set(cal["classes"]) == {"bottle", "carpet"}


def test_stale_calibration_is_ignored(artifact_copy):
    binding = {"model": "fp32", "graph_sha256": "0" * 64, "prototypes_sha256": "1" * 64}
    (artifact_copy / "calibration.json").write_text(json.dumps(
        {"format": "anoclip-calibration", "format_version": 1,
         "classes": {"bottle": {"image_threshold": 0.01, "pixel_threshold": 0.01, "binding": binding},
                     "carpet": {"image_threshold": 0.02, "pixel_threshold": 0.03}}}))
    det = Detector.load(artifact_copy, backend="ort-cpu")
    assert det.predict(_img(), "bottle").threshold_source == "default"
    assert det.predict(_img(), "carpet").threshold_source == "calibration"
    (artifact_copy / "calibration.json").write_text(json.dumps({"format": "anoclip-calibration",
                                                                "format_version": 7, "classes": {}}))
    with pytest.raises(ArtifactError, match="format_version"):
        Detector.load(artifact_copy, backend="ort-cpu")


def test_random_weights_flag_in_every_result(tiny_detector):
    assert tiny_detector.random_weights
    j = tiny_detector.predict(_img(), "bottle").to_json()
    assert j["random_weights"] is True and "RANDOM WEIGHTS" in j["warning"]


# ---- concurrency, memory ------------------------------------------------------------------------
def test_concurrent_threads_equal_sequential(tiny_detector):
    imgs = [_img(i, 40 + 7 * i, 90 - 5 * i) for i in range(12)]
    seq = [tiny_detector.predict(im, "carpet" if i % 2 else "bottle") for i, im in enumerate(imgs)]
    seq_batch = tiny_detector.predict_batch(imgs[:5], "bottle", batch=2)
    got: dict[tuple[int, int], object] = {}
    errors = []

    def worker(t):
        try:
            for rep in range(3):
                for i in range(t, len(imgs), 2):
                    got[(i, rep)] = tiny_detector.predict(imgs[i], "carpet" if i % 2 else "bottle")
                got[(-1, t * 10 + rep)] = tiny_detector.predict_batch(imgs[:5], "bottle", batch=2)
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(t % 2,)) for t in range(6)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors
    for (i, _rep), res in got.items():
        if i < 0:
            for k, r in enumerate(res):
                assert r.score == seq_batch[k].score and np.array_equal(r.anomaly_map, seq_batch[k].anomaly_map)
        else:
            assert res.score == seq[i].score
            assert np.array_equal(res.anomaly_map, seq[i].anomaly_map)


def test_soak_1000_calls_rss_bounded(tiny_detector):
    psutil = pytest.importorskip("psutil")
    proc = psutil.Process()
    img = _img(3, 120, 160)
    rss = []
    for i in range(1000):
        r = tiny_detector.predict(img, "bottle")
        assert r.ok
        if i % 50 == 49:
            rss.append(proc.memory_info().rss)
    first, second = rss[: len(rss) // 2], rss[len(rss) // 2:]
    growth = max(second) - max(first)
    assert growth < 32 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB in the second half of the soak"


# ---- torch-free -------------------------------------------------------------------------------------
def test_runtime_never_imports_torch(tiny_artifact, tmp_path):
    img = tmp_path / "x.png"
    cv2.imwrite(str(img), _img(5, 80, 100))
    code = f"""
import sys, numpy as np
import anoclip.runtime as runtime
from anoclip.runtime import Detector, InferConfig, StripStream
from anoclip.runtime import cli, calibration, tiler, postprocess
from anoclip.runtime.backends import create_backend, parity_check
from anoclip.runtime.backends import ort, trt
det = Detector.load({str(tiny_artifact)!r}, backend="auto")
r = det.predict({str(img)!r}, "bottle")
b = det.predict_batch([{str(img)!r}, np.zeros((40, 300, 3), np.uint8)], "carpet", tile=True)
s = list(det.stream("bottle").run([np.zeros((32, 200, 3), np.uint8)] * 3))
assert r.ok and all(x.ok for x in b) and len(s) == 3
bad = [m for m in sys.modules if m == "torch" or m.startswith("torch.") or m.startswith("open_clip")]
print("LEAK", bad) if bad else print("CLEAN")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "CLEAN" in out.stdout, out.stdout


def test_calibration_survives_add_class(artifact_copy, tmp_path, text_cache):
    from anoclip.export.api import add_class

    good = tmp_path / "good"
    good.mkdir()
    for i in range(3):
        cv2.imwrite(str(good / f"{i}.png"), _img(i, 40, 50))
    entry = calibrate(Detector.load(artifact_copy, backend="ort-cpu"), [good], "bottle", quantile=0.5)
    add_class(artifact_copy, "screw", text_cache=text_cache, progress=False)
    det = Detector.load(artifact_copy, backend="ort-cpu")
    assert "screw" in det.classes
    r = det.predict(str(good / "0.png"), "bottle")
    assert r.threshold_source == "calibration" and r.image_threshold == pytest.approx(entry["image_threshold"])
    assert det.predict(str(good / "0.png"), "screw").threshold_source == "default"


def test_corrupt_text_embeddings_without_verify(artifact_copy):
    (artifact_copy / "text_embeddings.npz").write_bytes(b"PK\x03\x04 broken zip")
    with pytest.raises(ArtifactError, match="cannot read text embeddings"):
        Detector.load(artifact_copy, backend="ort-cpu", verify=False)


def test_pathlike_inputs_and_result_json(tiny_detector, tmp_path):
    p = tmp_path / "a.png"
    cv2.imwrite(str(p), _img(9, 33, 44))
    r = tiny_detector.predict(p, "bottle", pixel_threshold=0.0)
    assert r.path == str(p) and r.anomaly_map.shape == (33, 44)
    j = json.loads(json.dumps(r.to_json()))
    assert j["size"] == [33, 44] and j["regions"][0]["area"] == 33 * 44
    assert set(j["timing"]) >= {"preprocess_ms", "infer_ms", "map_ms", "regions_ms", "total_ms"}
    assert r.mask().dtype == np.uint8 and r.mask().max() == 255
