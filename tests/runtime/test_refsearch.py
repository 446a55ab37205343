"""The few-shot search graph (refsearch.onnx) and where the runtime runs the search."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from gpu_fakes import FakeCudaOrtSession, FakeDeviceValue

from anoclip.export import refsearch as export_refsearch
from anoclip.runtime.refsearch import DeviceSearch, make_search
from anoclip_core.refbank import ReferenceBank, visual_anomaly

CUDA_AVAILABLE = ["CUDAExecutionProvider", "CPUExecutionProvider"]


def unit(rng: np.random.Generator, shape) -> np.ndarray:
    x = rng.standard_normal(shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def bank_of(emb: np.ndarray) -> ReferenceBank:
    return ReferenceBank(emb, "anoclip-tiny", 64, (8, 8), ("a.png",))


@pytest.fixture(scope="module")
def graph_path(tmp_path_factory):
    folder = tmp_path_factory.mktemp("refsearch")
    export_refsearch.write(folder, 32)
    return folder / export_refsearch.FILE


@pytest.mark.parametrize("n", [1, 100, 5000])
def test_graph_on_cpu_ep_matches_the_host_search_and_brute_force(graph_path, n):
    import onnxruntime as ort

    rng = np.random.default_rng(n)
    local, bank = unit(rng, (2, 8, 8, 32)), unit(rng, (n, 32))
    sess = ort.InferenceSession(str(graph_path), providers=["CPUExecutionProvider"])
    got = sess.run(["visual_anomaly"], {"local_embeddings": local, "references": bank})[0]
    assert got.shape == (2, 8, 8)
    np.testing.assert_allclose(got, visual_anomaly(local, bank), atol=1e-6, rtol=0)
    brute = 1.0 - np.max([(local.astype(np.float64) * row).sum(-1) for row in bank.astype(np.float64)], axis=0)
    np.testing.assert_allclose(got, brute, atol=1e-6, rtol=0)


def test_exported_artifact_lists_the_graph(tiny_artifact):
    m = json.loads((tiny_artifact / "manifest.json").read_text())
    assert m["refsearch"] == {"file": "refsearch.onnx", "inputs": ["local_embeddings", "references"],
                              "outputs": ["visual_anomaly"]}
    assert "refsearch.onnx" in m["files"]


@pytest.mark.parametrize("backend", ["ort-cpu", "openvino"])
def test_cpu_backends_search_on_the_host(tiny_artifact, backend):
    m = json.loads((tiny_artifact / "manifest.json").read_text())
    search, where = make_search(bank_of(unit(np.random.default_rng(0), (10, 32))), backend, tiny_artifact, m,
                                session_factory=pytest.fail)
    assert where == "host (BLAS)"


@pytest.mark.parametrize("backend", ["ort-cuda", "ort-trt", "trt"])
def test_gpu_backends_search_on_the_device_with_the_bank_uploaded_once(tiny_artifact, backend):
    m = json.loads((tiny_artifact / "manifest.json").read_text())
    rng = np.random.default_rng(1)
    emb = unit(rng, (300, 32))
    sessions: list[FakeCudaOrtSession] = []

    def factory(path, so, providers):
        sessions.append(FakeCudaOrtSession(path, so, providers))
        return sessions[-1]

    FakeDeviceValue.uploads.clear()
    search, where = make_search(bank_of(emb), backend, tiny_artifact, m, device_id=1,
                                available_providers=CUDA_AVAILABLE, session_factory=factory, upload=FakeDeviceValue)
    assert where == "device (refsearch.onnx, CUDA EP)" and isinstance(search, DeviceSearch)
    for _ in range(2):
        local = unit(rng, (3, 8, 8, 32))
        np.testing.assert_allclose(search(local), visual_anomaly(local, emb), atol=1e-6, rtol=0)
    assert len(FakeDeviceValue.uploads) == 1 and FakeDeviceValue.uploads[0].device_id == 1
    b = sessions[0].bindings[-1]
    assert b.inputs["references"] == ("cuda", FakeDeviceValue.uploads[0]) and b.inputs["local_embeddings"][0] == "cpu"
    assert b.outputs == [("visual_anomaly", "cuda", 1)] and sessions[0].providers[0] == "CUDAExecutionProvider"


def test_old_artifact_or_no_cuda_falls_back_to_the_host_with_a_note(tiny_artifact, caplog):
    m = json.loads((tiny_artifact / "manifest.json").read_text())
    bank = bank_of(unit(np.random.default_rng(2), (10, 32)))
    old = {k: v for k, v in m.items() if k != "refsearch"}
    with caplog.at_level(logging.WARNING, logger="anoclip.runtime"):
        _, where = make_search(bank, "ort-cuda", tiny_artifact, old, available_providers=CUDA_AVAILABLE,
                               session_factory=pytest.fail)
    assert where == "host (artifact has no refsearch.onnx)" and "no refsearch.onnx" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="anoclip.runtime"):
        _, where = make_search(bank, "trt", tiny_artifact, m, available_providers=["CPUExecutionProvider"])
    assert where.startswith("host (backend ort-cuda needs") and "searching on the host" in caplog.text
    _, where = make_search(bank, "ort-cuda", tiny_artifact, m, available_providers=CUDA_AVAILABLE,
                           session_factory=lambda p, so, prov: FakeCudaOrtSession(p, so, ["CPUExecutionProvider"]))
    assert where == "host (refsearch.onnx: ONNX Runtime fell back to the CPU provider)"


class AsGpu:
    """A CPU backend under the name of a GPU backend."""

    name = "ort-cuda"

    def __init__(self, backend) -> None:
        self.backend = backend

    def run(self, *args):
        return self.backend.run(*args)


def test_detector_on_a_gpu_backend_uses_the_device_search(artifact_copy, tmp_path):
    from click.testing import CliRunner
    from test_refs import write_images

    from anoclip.runtime import Detector
    from anoclip.runtime.cli import main

    write_images(tmp_path / "good", [1, 2])
    assert CliRunner().invoke(main, ["refs", str(artifact_copy), "--class", "bottle", "--backend", "ort-cpu",
                                     "--good", str(tmp_path / "good")]).exit_code == 0
    img = (np.random.default_rng(5).random((50, 70, 3)) * 255).astype(np.uint8)
    sessions: list[FakeCudaOrtSession] = []
    with Detector.load(artifact_copy, backend="ort-cpu") as det:
        host = det.predict(img, "bottle")
        # the graph still runs on the CPU EP under a GPU backend's name; the search session is faked on CUDA
        gpu = Detector(AsGpu(det.backend), det.manifest, {c: det.prototypes(c)[0] for c in det.classes},
                       artifact_copy, references=det.references)
        gpu.search_opts = {"available_providers": CUDA_AVAILABLE, "upload": FakeDeviceValue,
                           "session_factory": lambda *a: sessions.append(FakeCudaOrtSession(*a)) or sessions[-1]}
        dev = gpu.predict(img, "bottle")
        gpu.predict(img, "bottle")
    assert len(sessions) == 1 and len(sessions[0].bindings) == 2 and dev.shots == 2
    np.testing.assert_allclose(dev.anomaly_map, host.anomaly_map, atol=1e-6, rtol=0)
    assert abs(dev.score - host.score) <= 1e-6


def test_host_search_runs_blas_on_one_thread(monkeypatch):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    if max((i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"), default=1) < 2:
        pytest.skip("BLAS already runs on one thread here")
    import anoclip.runtime.refsearch as rs

    seen = []

    def spy(local, bank):
        seen.append(max(i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"))
        return visual_anomaly(local, bank)

    monkeypatch.setattr(rs, "visual_anomaly", spy)
    emb = unit(np.random.default_rng(3), (20, 32))
    local = unit(np.random.default_rng(4), (1, 8, 8, 32))
    search, _ = make_search(bank_of(emb), "ort-cpu", None, {})
    np.testing.assert_allclose(search(local), visual_anomaly(local, emb), atol=1e-7)
    assert seen == [1]
