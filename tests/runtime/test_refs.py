"""``anoclip refs`` and the few-shot runtime: bank in the artifact, fusion, parity with the core."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from anoclip.runtime import contract as mf
from anoclip.runtime.cli import main
from anoclip_core.errors import ArtifactError, BankError
from anoclip_core.refbank import ReferenceBank

S = 64
SQUARE = (slice(24, 40), slice(32, 48))  # a 2 x 2 patch block of the 8 x 8 grid


def smooth_image(seed: int, size: int = S) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return cv2.GaussianBlur((rng.random((size, size, 3)) * 255).astype(np.uint8), (9, 9), 0)


def write_images(folder: Path, seeds: list[int], size: int = S) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in seeds:
        paths.append(folder / f"good_{s:02d}.png")
        cv2.imwrite(str(paths[-1]), smooth_image(s, size))
    return paths


def refs(art: Path, *args: str):
    return CliRunner().invoke(main, ["refs", str(art), "--backend", "ort-cpu", *args])


def manifest(art: Path) -> dict:
    return json.loads((art / "manifest.json").read_text())


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# 1. the CLI -------------------------------------------------------------------------------------
def test_refs_stores_the_graph_embeddings_without_reexport(artifact_copy, tmp_path, tiny_model):
    paths = write_images(tmp_path / "good", [1, 2, 3])
    graph_sha = sha(artifact_copy / "encoder.onnx")
    res = refs(artifact_copy, "--class", "bottle", "--good", str(tmp_path / "good"), "--shots", "2", "--seed", "4")
    assert res.exit_code == 0, res.output
    m = manifest(artifact_copy)
    entry = m["references"]["bottle"]
    assert (entry["shots"], entry["size"], entry["patches"], entry["coreset"]) == (2, 128, 128, None)
    assert entry["backbone"] == "anoclip-tiny" and entry["embed_dim"] == 32
    assert m["files"][entry["file"]] == sha(artifact_copy / entry["file"])
    assert sha(artifact_copy / "encoder.onnx") == graph_sha == m["files"]["encoder.onnx"]
    bank = ReferenceBank.load(artifact_copy / entry["file"])
    picked = [p for p in paths if p.name in bank.images]
    assert len(picked) == 2
    core = tiny_model.reference_embeddings(tiny_model.load_images([str(p) for p in picked]))
    np.testing.assert_allclose(bank.embeddings, core, atol=1e-5)
    mf.read_manifest(artifact_copy)  # every sha256 still matches


def test_refs_adds_then_replaces_and_bounds_by_coreset(banked, tmp_path):
    old = manifest(banked)["references"]["bottle"]["file"]
    write_images(tmp_path / "good", [7])  # the folder grows: only the new image is added
    res = refs(banked, "--class", "bottle", "--good", str(tmp_path / "good"))
    assert res.exit_code == 0, res.output
    entry = manifest(banked)["references"]["bottle"]
    assert (entry["shots"], entry["size"]) == (3, 192)
    assert not (banked / old).exists() and old not in manifest(banked)["files"]
    write_images(tmp_path / "other", [8])
    res = refs(banked, "--class", "bottle", "--good", str(tmp_path / "other"), "--replace", "--coreset", "40")
    assert res.exit_code == 0, res.output
    entry = manifest(banked)["references"]["bottle"]
    assert (entry["shots"], entry["size"], entry["patches"], entry["coreset"]["size"]) == (1, 40, 64, 40)
    assert ReferenceBank.load(banked / entry["file"]).images == ("good_08.png",)
    assert sorted(p.name for p in (banked / "refs").iterdir()) == [Path(entry["file"]).name]
    mf.read_manifest(banked)


def _bad_cases(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    (tmp_path / "empty").mkdir()
    write_images(tmp_path / "one", [9])
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "x.png").write_bytes(b"not a png")
    return {
        "empty": (["--class", "bottle", "--good", str(tmp_path / "empty")], "contains no images"),
        "missing": (["--class", "bottle", "--good", str(tmp_path / "nowhere")], "folder not found"),
        "class": (["--class", "tyre", "--good", str(tmp_path / "one")], "class 'tyre' is not in this artifact"),
        "unreadable": (["--class", "bottle", "--good", str(tmp_path / "broken")], "x.png cannot be used"),
        "shots": (["--class", "bottle", "--good", str(tmp_path / "one"), "--shots", "3"], "only 1 image"),
        "coreset": (["--class", "bottle", "--good", str(tmp_path / "one"), "--coreset", "0"], "--coreset must be"),
        "again": (["--class", "bottle", "--good", str(tmp_path / "good")], "already in the 'bottle' bank"),
    }


def test_refs_bad_input_is_one_line_and_leaves_the_artifact(banked, tmp_path):
    before = {p: p.read_bytes() for p in banked.rglob("*") if p.is_file()}
    for name, (args, msg) in _bad_cases(tmp_path).items():
        res = refs(banked, *args)
        assert res.exit_code == 2, (name, res.output)
        lines = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and msg in lines[0], (name, res.output)
    assert {p: p.read_bytes() for p in banked.rglob("*") if p.is_file()} == before


def test_bank_from_another_backbone_is_refused(banked, tmp_path, tiny24_model):
    from anoclip.runtime.refs import write_bank

    foreign = tiny24_model.build_references([smooth_image(0, 32)])
    with pytest.raises(BankError, match="built with backbone 'anoclip-tiny-24'"):
        write_bank(banked, "bottle", foreign)
    # a foreign bank smuggled into the artifact (with a matching sha256) is refused at load time
    entry = manifest(banked)["references"]["bottle"]
    foreign.save(banked / entry["file"])
    m = manifest(banked)
    m["files"][entry["file"]] = sha(banked / entry["file"])
    (banked / "manifest.json").write_text(json.dumps(m))
    write_images(tmp_path / "more", [5])
    res = refs(banked, "--class", "bottle", "--good", str(tmp_path / "more"))
    assert res.exit_code == 2 and "error: reference bank refs/bottle-" in res.output
    assert "built with backbone 'anoclip-tiny-24', the model is 'anoclip-tiny'" in res.output


def test_manifest_references_block_is_validated(banked):
    m = manifest(banked)
    del m["references"]["bottle"]["shots"]
    with pytest.raises(ArtifactError, match="required field 'references.bottle.shots'"):
        mf.validate_manifest(m)
    m = manifest(banked)
    del m["files"][m["references"]["bottle"]["file"]]
    with pytest.raises(ArtifactError, match="names file 'refs/bottle"):
        mf.validate_manifest(m)
    m = manifest(banked)
    m["references"]["tyre"] = m["references"]["bottle"]
    with pytest.raises(ArtifactError, match="references.tyre': class not in text.classes"):
        mf.validate_manifest(m)


# 2./3. detector: fusion, parity with the core, outputs ------------------------------------------
def _torch_fused(core_probs: torch.Tensor, local: np.ndarray, bank: np.ndarray, size, w: float):
    """The documented rule written out in torch: text and visual grids each smoothed + upsampled."""
    visual = 1.0 - torch.from_numpy(np.max(local.astype(np.float64) @ bank.T.astype(np.float64), axis=-1)).float()

    def post(g):
        x = F.avg_pool2d(F.pad(g[:, None], (1, 1, 1, 1), mode="replicate"), 3, stride=1)
        return x, F.interpolate(x, size=size, mode="bilinear", align_corners=True)[0, 0]

    vs, vmap = post(visual)
    _, tmap = post(core_probs)
    return ((1 - w) * tmap + w / 2 * vmap).numpy(), float(vs.max())


@pytest.mark.parametrize("w", [0.5, 0.3])
def test_runtime_matches_core_with_references(banked, tiny_model, w):
    from anoclip.runtime import Detector, InferConfig
    from anoclip.runtime.postprocess import anomaly_map
    from anoclip_core.scores import state_probs
    from anoclip_core.transform import preprocess

    rgb = (np.random.default_rng(3).random((100, 150, 3)) * 255).astype(np.uint8)
    with Detector.load(banked, backend="ort-cpu") as det:
        bank = det.references["bottle"]
        res = det.predict(rgb, "bottle", visual_weight=w)
        few = det.fewshot("bottle", InferConfig("bottle", visual_weight=w))
        probs, scores = det.infer_pixels(preprocess(rgb, det.preprocess_config)[None], "bottle", fewshot=few)
    pixels = tiny_model.load_images([rgb])
    core_maps, core_scores = tiny_model.predict(pixels, "bottle", references=bank, visual_weight=w)
    np.testing.assert_allclose(anomaly_map(probs, (S, S))[0], core_maps[0].numpy(), atol=1e-5, rtol=0)
    assert abs(res.score - float(core_scores[0])) <= 1e-5 and abs(float(scores[0]) - res.score) <= 1e-6
    assert res.shots == 2 and res.to_json()["references"] is True and res.to_json()["shots"] == 2
    # original-size map vs the rule written out in torch from the core's own grids
    _, local = tiny_model.encode_image(pixels)
    text = state_probs(local, tiny_model.encode_states("bottle"), tiny_model.temperature)
    ref_map, ref_peak = _torch_fused(text, local.numpy(), bank.embeddings, (100, 150), w)
    np.testing.assert_allclose(res.anomaly_map, ref_map, atol=1e-5, rtol=0)
    zero_map, zero_score = tiny_model.predict(pixels, "bottle")
    assert abs(res.score - ((1 - w) * float(zero_score[0]) + w / 2 * ref_peak)) <= 1e-5


def test_no_bank_and_no_refs_are_bit_identical_zero_shot(banked, tiny_detector):
    from anoclip.runtime import Detector

    rgb = (np.random.default_rng(4).random((70, 90, 3)) * 255).astype(np.uint8)
    plain = tiny_detector.predict(rgb, "bottle")
    assert plain.shots == 0 and plain.to_json()["references"] is False
    with Detector.load(banked, backend="ort-cpu") as det:
        off = det.predict(rgb, "bottle", use_refs=False)
        carpet = det.predict(rgb, "carpet")  # no bank for this class
        on = det.predict(rgb, "bottle")
    assert np.array_equal(off.anomaly_map, plain.anomaly_map) and off.score == plain.score and off.shots == 0
    assert np.array_equal(carpet.anomaly_map, tiny_detector.predict(rgb, "carpet").anomaly_map)
    assert on.shots == 2 and np.abs(on.anomaly_map - plain.anomaly_map).max() > 1e-3


def test_pasted_square_is_found_through_the_runtime(artifact_copy, tmp_path):
    from anoclip.runtime import Detector

    clean = smooth_image(0)
    (tmp_path / "clean").mkdir()
    cv2.imwrite(str(tmp_path / "clean" / "clean.png"), clean)
    assert refs(artifact_copy, "--class", "bottle", "--good", str(tmp_path / "clean")).exit_code == 0
    test = clean.copy()
    test[SQUARE] = (np.random.default_rng(9).random((16, 16, 3)) * 255).astype(np.uint8)
    with Detector.load(artifact_copy, backend="ort-cpu") as det:
        hit = det.predict(test, "bottle", channel_order="BGR", visual_weight=1.0)  # as cv2 wrote the file
        calm = det.predict(str(tmp_path / "clean" / "clean.png"), "bottle", visual_weight=1.0)
    y, x = np.unravel_index(int(hit.anomaly_map.argmax()), hit.anomaly_map.shape)
    assert SQUARE[0].start <= y < SQUARE[0].stop and SQUARE[1].start <= x < SQUARE[1].stop, (y, x)
    assert float(calm.anomaly_map.max()) < 1e-5 < float(hit.anomaly_map.max())


def test_tiling_streaming_and_batches_use_the_bank(banked):
    from anoclip.runtime import Detector

    rng = np.random.default_rng(6)
    imgs = [(rng.random((S, S, 3)) * 255).astype(np.uint8) for _ in range(3)]
    with Detector.load(banked, backend="ort-cpu") as det:
        single = [det.predict(im, "bottle") for im in imgs]
        batch = det.predict_batch(imgs, "bottle", batch=2)
        tiled = det.predict(imgs[0], "bottle", tile=True)  # one tile: the whole square image
        stream = det.stream("bottle", stitch=False)
        strip = stream.push(imgs[1]) + stream.flush()
        zero_tiled = det.predict(imgs[0], "bottle", tile=True, use_refs=False)
    for a, b in zip(single, batch, strict=True):
        assert b.shots == 2 and abs(a.score - b.score) <= 1e-6
        np.testing.assert_allclose(a.anomaly_map, b.anomaly_map, atol=1e-6)
    assert tiled.shots == 2 and tiled.tiles == 1 and abs(tiled.score - single[0].score) <= 1e-6
    np.testing.assert_allclose(tiled.anomaly_map, single[0].anomaly_map, atol=1e-6)
    assert len(strip) == 1 and strip[0].shots == 2
    np.testing.assert_allclose(strip[0].anomaly_map, single[1].anomaly_map, atol=1e-6)
    assert zero_tiled.shots == 0 and np.abs(zero_tiled.anomaly_map - tiled.anomaly_map).max() > 1e-3


def test_infer_cli_reports_the_bank(banked, tmp_path):
    img = tmp_path / "x.png"
    cv2.imwrite(str(img), smooth_image(11))
    runner = CliRunner()
    on = runner.invoke(main, ["infer", str(banked), str(img), "--class", "bottle", "--backend", "ort-cpu"])
    off = runner.invoke(main, ["infer", str(banked), str(img), "--class", "bottle", "--backend", "ort-cpu",
                               "--no-refs"])
    line = {k: json.loads([ln for ln in r.output.splitlines() if ln.startswith("{")][0]) for k, r in
            (("on", on), ("off", off))}
    assert (line["on"]["references"], line["on"]["shots"]) == (True, 2)
    assert (line["off"]["references"], line["off"]["shots"]) == (False, 0)
    assert "few-shot, bank of 2 shot(s) / 128 patches" in on.output and "zero-shot" in off.output
    bad = runner.invoke(main, ["infer", str(banked), str(img), "--class", "bottle", "--visual-weight", "1.5"])
    assert bad.exit_code == 2 and "error: visual weight must be in [0, 1], got 1.5" in bad.output


def test_two_concurrent_refs_runs_on_one_class_both_land(banked, tmp_path):
    """Issue 13 + review: the merge with the stored bank happens under the writer lock, on the CURRENT bank."""
    import threading

    from anoclip.runtime.refs import write_bank

    base = ReferenceBank.load(banked / manifest(banked)["references"]["bottle"]["file"])
    d = base.embed_dim
    rng = np.random.default_rng(0)

    def one(tag: str) -> ReferenceBank:
        e = rng.standard_normal((3, d)).astype(np.float32)
        return ReferenceBank(e / np.linalg.norm(e, axis=1, keepdims=True), base.backbone, base.image_size,
                             base.patch_grid, (f"{tag}.png",), tag)

    banks = [one("a"), one("b")]
    threads = [threading.Thread(target=write_bank, args=(banked, "bottle", b), kwargs={"merge": True}) for b in banks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stored = ReferenceBank.load(banked / manifest(banked)["references"]["bottle"]["file"])
    assert set(stored.images) == set(base.images) | {"a.png", "b.png"} and stored.size == base.size + 6


def test_bank_files_are_unique_per_class_name():
    from anoclip.runtime.refs import _file_stem

    assert _file_stem("metal nut") != _file_stem("metal_nut")
    assert len(_file_stem("x" * 100)) < 60


def test_a_new_bank_makes_an_earlier_calibration_stale(banked):
    from anoclip.runtime.calibration import calibration_binding

    m = manifest(banked)
    protos = np.zeros((2, 4), np.float32)
    with_bank = calibration_binding(m, "fp32", protos, "bottle")
    assert with_bank["references_sha256"] == m["files"][m["references"]["bottle"]["file"]]
    del m["references"]
    assert "references_sha256" not in calibration_binding(m, "fp32", protos, "bottle")


def test_an_error_line_does_not_claim_zero_shot_and_unknown_class_names_the_artifact(banked, tmp_path):
    """Hostile review: error lines said `references: false` on a banked class; the add-class hint had a placeholder."""
    from anoclip.runtime import Detector

    det = Detector.load(banked, backend="ort-cpu")
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    good, err = det.predict_batch([smooth_image(1, 64), str(bad)], "bottle")
    assert good.to_json()["references"] is True and good.to_json()["shots"] == 2
    assert "error" in err.to_json() and "references" not in err.to_json() and "shots" not in err.to_json()
    with pytest.raises(ArtifactError, match=f"add-class {banked} tyre"):
        det.predict(smooth_image(1, 64), "tyre")
