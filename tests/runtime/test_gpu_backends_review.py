"""Issue 9 review items on the runtime side, against header/doc-faithful fakes (gpu_fakes):
cuda errors + the [trt] extra (1), ORT TensorRT EP profile (2), per-thread device (5), no trt_fp16 on
the fp16 graph (6), stream handle (9), pinned double-buffered host memory (11)."""
from __future__ import annotations

import configparser
import threading
from pathlib import Path

import numpy as np
import pytest
from gpu_fakes import FakeCudart, FakeEngine, FakeTrt, cudaError_t, cudaStream_t
from rt_fakes import fake_manifest

from anoclip.runtime.backends import create_backend
from anoclip.runtime.backends.trt import TrtBackend, probe_gpus, stream_handle
from anoclip_core.errors import BackendUnavailable

ROOT = Path(__file__).resolve().parents[2]


def _backend(tmp_path, devices=1, device_id=0):
    plan = tmp_path / "e.plan"
    plan.write_bytes(b"plan")
    cud = FakeCudart(devices=devices)
    engine = FakeEngine(cud)
    return TrtBackend(plan, trt=FakeTrt(engine), cudart=cud, device_id=device_id), cud, engine


# ---- item 1 -----------------------------------------------------------------------------------
def test_insufficient_driver_is_named_not_no_gpu(tmp_path):
    (tmp_path / "e.plan").write_bytes(b"plan")
    cud = FakeCudart(devices=1, fail={"cudaGetDeviceCount": cudaError_t.cudaErrorInsufficientDriver})
    n, why = probe_gpus(cud)
    assert n == 0 and "cudaErrorInsufficientDriver (35)" in why and "CUDA 13 driver" in why
    with pytest.raises(BackendUnavailable, match=r"cudaErrorInsufficientDriver \(35\).*cuda-python"):
        TrtBackend(tmp_path / "e.plan", trt=FakeTrt(), cudart=cud)


def test_trt_extra_brings_cuda_python_of_the_same_cuda_major():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    extras = cfg["options.extras_require"]

    def reqs(name):
        return [r.strip() for r in extras[name].splitlines() if r.strip() and not r.strip().startswith("%")]

    assert "tensorrt-cu12>=10,<12" in reqs("trt") and "cuda-python>=12,<13" in reqs("trt")
    assert "tensorrt-cu13<12" in reqs("trt-cu13") and "cuda-python>=13,<14" in reqs("trt-cu13")


# ---- item 2 and 6 -----------------------------------------------------------------------------
class _Session:
    def __init__(self, providers):
        self.providers = providers

    def get_providers(self):
        return [p for p, _ in self.providers]

    def get_inputs(self):
        return []

    def get_outputs(self):
        return []


def _ort_trt(tmp_path, precision):
    seen = {}

    def factory(path, so, providers):
        seen["providers"] = providers
        return _Session(providers)

    manifest = fake_manifest(image_size=64)
    manifest["models"]["fp16"] = {"file": "encoder.fp16.onnx", "precision": "fp16"}
    manifest["tensorrt"] = {"profile": {"min": 1, "opt": 4, "max": 16}}
    create_backend("ort-trt", tmp_path, manifest, precision, session_factory=factory, trt_cache_dir=str(tmp_path),
                   available_providers=["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    name, opts = seen["providers"][0]
    assert name == "TensorrtExecutionProvider"
    return opts


def test_ort_trt_gets_explicit_profile_equal_to_native_engine(tmp_path):
    opts = _ort_trt(tmp_path, "fp32")
    # fake_manifest: S = 64, D = 16, 2 classes -> classes 1/2/64 (the native profile's rule, export.trt.profile_shapes)
    assert opts["trt_profile_min_shapes"] == "pixels:1x3x64x64,text_prototypes:1x2x16"
    assert opts["trt_profile_opt_shapes"] == "pixels:4x3x64x64,text_prototypes:2x2x16"
    assert opts["trt_profile_max_shapes"] == "pixels:16x3x64x64,text_prototypes:64x2x16"


def test_ort_trt_profile_matches_export_profile_shapes():
    from anoclip.export.trt import profile_shapes
    from anoclip.runtime.backends.ort import manifest_profile

    manifest = fake_manifest(image_size=64)
    manifest["tensorrt"] = {"profile": {"min": 1, "opt": 8, "max": 32}}
    assert manifest_profile(manifest) == profile_shapes(64, 16, 2, (1, 8, 32))


def test_ort_trt_fp16_graph_keeps_trt_fp16_off(tmp_path):
    assert _ort_trt(tmp_path, "fp16")["trt_fp16_enable"] is False


# ---- item 5 -----------------------------------------------------------------------------------
def test_run_from_a_worker_thread_launches_on_the_backend_device(tmp_path):
    be, cud, engine = _backend(tmp_path, devices=2, device_id=1)
    px = np.zeros((2, 3, 16, 16), np.float32)
    pr = np.zeros((1, 2, 4), np.float32)
    worker = threading.Thread(target=be.run, args=(px, pr))
    worker.start()
    worker.join()
    assert engine.launches and all(dev == 1 for dev, _ in engine.launches)
    assert all(dev == 1 for _, _, dev in cud.copies)


# ---- item 9 -----------------------------------------------------------------------------------
def test_stream_handle_is_the_stream_not_its_storage(tmp_path):
    s = cudaStream_t(0xBEEF0)
    assert stream_handle(s) == 0xBEEF0 != s.getPtr()

    class NoInt:
        def getPtr(self):  # noqa: N802
            return 1234

    with pytest.raises(BackendUnavailable, match="int\\(stream\\)"):
        stream_handle(NoInt())
    be, cud, engine = _backend(tmp_path)
    be.run(np.zeros((1, 3, 16, 16), np.float32), np.zeros((1, 2, 4), np.float32))
    handles = {int(slot.stream) for slot in be._slots}
    assert {h for _, h in engine.launches} <= handles


# ---- item 11 ----------------------------------------------------------------------------------
def test_host_copies_are_pinned_and_chunks_alternate_slots(tmp_path):
    be, cud, engine = _backend(tmp_path)
    rng = np.random.default_rng(0)
    px = rng.standard_normal((7, 3, 16, 16)).astype(np.float32)
    pr = rng.standard_normal((2, 2, 4)).astype(np.float32)
    out = be.run(px, pr, ("image_scores", "patch_probs"))
    expected = px.mean(axis=(1, 2, 3))[:, None] + pr.sum(axis=(1, 2))[None, :]
    np.testing.assert_allclose(out["image_scores"], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["patch_probs"][:, 0], px[:, :1, :2, :2].mean(axis=1), rtol=1e-6)
    assert cud.copies and all(pinned for _, pinned, _ in cud.copies)  # never pageable numpy memory
    streams = [h for _, h in engine.launches]
    assert len(streams) == 3 and streams[0] != streams[1] and streams[0] == streams[2]  # slots alternate
    allocs = [kind for _, kind in cud.mem.values()]
    assert allocs.count("pinned") == 2 * 7  # allocated once: 2 slots x 7 IO tensors
    be.run(px[:2], pr)
    assert [kind for _, kind in cud.mem.values()].count("pinned") == 14  # no allocation per call
    be.close()
    assert len(cud.freed) == 28


def test_outputs_are_copies_not_views_of_reused_pinned_memory(tmp_path):
    be, _, _ = _backend(tmp_path)
    pr = np.zeros((1, 2, 4), np.float32)
    first = be.run(np.ones((1, 3, 16, 16), np.float32), pr, ("image_scores",))["image_scores"].copy()
    kept = be.run(np.ones((1, 3, 16, 16), np.float32), pr, ("image_scores",))["image_scores"]
    be.run(np.full((1, 3, 16, 16), 5.0, np.float32), pr, ("image_scores",))
    np.testing.assert_array_equal(kept, first)
