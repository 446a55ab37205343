"""Backend selection, fallbacks and errors (CPU-only fakes), the parity checker, GPU tests (skipped here)."""
from __future__ import annotations

import threading
import types

import numpy as np
import pytest
from gpu_fakes import FakeCudart, FakeEngine, FakeTrt
from rt_fakes import ConstantBackend, PatchMeanBackend

from anoclip.runtime.backends import create_backend, parity_check
from anoclip.runtime.backends.base import Backend
from anoclip.runtime.backends.ort import CPU, CUDA, TRT, OrtBackend, physical_cores, select_providers, session_options
from anoclip.runtime.backends.trt import TrtBackend
from anoclip_core.errors import ArtifactError, BackendUnavailable, InputError


def test_select_providers_cpu_cuda_trt():
    assert select_providers("cpu", [CPU]) == [(CPU, {})]
    prov = select_providers("cuda", [CUDA, CPU], device_id=1)
    assert [p for p, _ in prov] == [CUDA, CPU] and prov[0][1]["device_id"] == 1
    prov = select_providers("trt", [TRT, CUDA, CPU], trt_cache_dir=None)
    assert [p for p, _ in prov] == [TRT, CUDA, CPU]


def test_select_providers_trt_cache(tmp_path):
    prov = select_providers("trt", [TRT, CUDA, CPU], trt_cache_dir=str(tmp_path / "c"), trt_fp16=True)
    opts = prov[0][1]
    assert opts["trt_engine_cache_enable"] and opts["trt_engine_cache_path"] == str(tmp_path / "c")
    assert opts["trt_fp16_enable"] is True and (tmp_path / "c").is_dir()


@pytest.mark.parametrize("kind,avail,needle", [("cuda", [CPU], "CUDAExecutionProvider"),
                                               ("trt", [CPU], "TensorrtExecutionProvider"),
                                               ("trt", [CUDA, CPU], "TensorrtExecutionProvider"),
                                               ("nope", [CPU], "unknown")])
def test_select_providers_unavailable(kind, avail, needle):
    with pytest.raises(BackendUnavailable, match=needle):
        select_providers(kind, avail)


def test_session_options_tuned(tmp_path):
    import onnxruntime as ort

    so = session_options("cpu", None, str(tmp_path / "opt.onnx"))
    assert so.intra_op_num_threads == physical_cores() >= 1
    assert so.inter_op_num_threads == 1
    assert so.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert so.optimized_model_filepath == str(tmp_path / "opt.onnx")


class FakeSession:
    """Records how the backend drives ONNX Runtime; providers may 'fall back' like ORT does."""

    def __init__(self, path, so, providers, active=None):
        self.path, self.so, self.requested = path, so, providers
        self.active = active if active is not None else [p for p, _ in providers]
        self.bindings = []

    def get_providers(self):
        return self.active

    def get_inputs(self):
        return [types.SimpleNamespace(name=n) for n in ("pixels", "text_prototypes")]

    def get_outputs(self):
        return [types.SimpleNamespace(name=n) for n in ("patch_probs", "image_scores")]

    def _compute(self, names, feeds):
        b = feeds["pixels"].shape[0]
        full = {
            "patch_probs": np.full((b, 1, 8, 8), 0.25, np.float32),
            "image_scores": np.full((b, 1), 0.5, np.float32),
        }
        return [full[n] for n in names]

    def run(self, names, feeds):
        return self._compute(names, feeds)

    def io_binding(self):
        sess = self

        class Binding:
            def __init__(self):
                self.inputs, self.outputs = {}, []
                sess.bindings.append(self)

            def bind_cpu_input(self, name, arr):
                self.inputs[name] = arr

            def bind_output(self, name, device, device_id):
                self.outputs.append((name, device, device_id))

            def copy_outputs_to_cpu(self):
                return sess._compute([n for n, _, _ in self.outputs], self.inputs)

        return Binding()

    def run_with_iobinding(self, binding):
        binding.ran = True


def _factory(active=None):
    made = []

    def factory(path, so, providers):
        s = FakeSession(path, so, providers, active)
        made.append(s)
        return s

    return factory, made


def _inputs(b=2):
    return np.zeros((b, 3, 64, 64), np.float32), np.zeros((1, 2, 16), np.float32)


def test_ort_cuda_uses_iobinding_with_fakes():
    factory, made = _factory()
    be = OrtBackend("m.onnx", "cuda", available=[CUDA, CPU], session_factory=factory, device_id=0)
    out = be.run(*_inputs(3))
    assert be.name == "ort-cuda" and out["patch_probs"].shape == (3, 1, 8, 8)
    b = made[0].bindings[0]
    assert b.ran and set(b.inputs) == {"pixels", "text_prototypes"}
    assert [(d, i) for _, d, i in b.outputs] == [("cuda", 0), ("cuda", 0)]


def test_ort_gpu_silent_cpu_fallback_is_an_error():
    factory, _ = _factory(active=[CPU])
    with pytest.raises(BackendUnavailable, match="fell back"):
        OrtBackend("m.onnx", "cuda", available=[CUDA, CPU], session_factory=factory)


def test_ort_gpu_session_failure_is_backend_unavailable():
    def boom(path, so, providers):
        raise RuntimeError("libcudnn.so.9: cannot open shared object file")

    with pytest.raises(BackendUnavailable, match="libcudnn"):
        OrtBackend("m.onnx", "trt", available=[TRT, CUDA, CPU], session_factory=boom)


def test_ort_cpu_optimized_model_cache(tiny_artifact, tmp_path):
    model = tiny_artifact / "encoder.onnx"
    a = OrtBackend(model, "cpu", optimized_cache_dir=tmp_path)
    cached = list(tmp_path.glob("*.ort-opt.onnx"))
    assert len(cached) == 1
    b = OrtBackend(model, "cpu", optimized_cache_dir=tmp_path)  # loads the cached optimised graph
    px = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    protos = np.random.default_rng(1).standard_normal((2, 2, 32)).astype(np.float32)
    rep = parity_check(a, b, px, protos)
    assert rep.passed, str(rep)


def _manifest(trt=False):
    m = {"models": {"fp32": {"file": "encoder.onnx", "precision": "fp32"}}, "default_model": "fp32"}
    m["tensorrt"] = {"file": "encoder.fp16.plan", "precision": "fp16", "profile": {}} if trt else None
    return m


def test_auto_picks_fastest_available_and_says_why(tmp_path):
    factory, _ = _factory()
    choice = create_backend("auto", tmp_path, _manifest(), available_providers=[CUDA, CPU], session_factory=factory)
    assert choice.name == "ort-cuda"
    assert set(choice.skipped) == {"trt", "ort-trt"}
    assert "auto -> ort-cuda" in choice.describe() and "TensorRT" in choice.describe()
    choice = create_backend(
        "auto",
        tmp_path,
        _manifest(),
        available_providers=[TRT, CUDA, CPU],
        session_factory=factory,
        cache_dir=str(tmp_path / "cache"),
    )
    assert choice.name == "ort-trt"
    assert choice.backend.session.requested[0][1]["trt_engine_cache_path"].startswith(str(tmp_path / "cache"))
    choice = create_backend("auto", tmp_path, _manifest(), available_providers=[CPU], session_factory=factory)
    assert choice.name == "ort-cpu" and set(choice.skipped) == {"trt", "ort-trt", "ort-cuda", "openvino"}


def test_auto_falls_back_when_gpu_provider_fails(tmp_path):
    def factory(path, so, providers):
        return FakeSession(path, so, providers, active=[CPU])  # CUDA EP failed to load

    choice = create_backend("auto", tmp_path, _manifest(), available_providers=[CUDA, CPU], session_factory=factory)
    assert choice.name == "ort-cpu" and "fell back" in choice.skipped["ort-cuda"]


def test_explicit_unavailable_backends_raise_clear_errors(tmp_path):
    with pytest.raises(BackendUnavailable, match="onnxruntime-gpu"):
        create_backend("ort-cuda", tmp_path, _manifest(), available_providers=[CPU])
    with pytest.raises(BackendUnavailable, match="no TensorRT engine"):
        create_backend("trt", tmp_path, _manifest())
    with pytest.raises(BackendUnavailable, match="unknown backend"):
        create_backend("vulkan", tmp_path, _manifest())


def test_trt_without_tensorrt_or_gpu(tmp_path):
    (tmp_path / "encoder.fp16.plan").write_bytes(b"x")
    try:
        import tensorrt  # noqa: F401
    except Exception:  # noqa: BLE001
        with pytest.raises(BackendUnavailable, match="TensorRT"):
            create_backend("trt", tmp_path, _manifest(trt=True))
    fake_cudart = FakeCudart(devices=0)
    with pytest.raises(BackendUnavailable, match="NVIDIA GPU"):
        TrtBackend(tmp_path / "encoder.fp16.plan", trt=FakeTrt(), cudart=fake_cudart)


# ---- native TensorRT logic with fake tensorrt + cuda modules (gpu_fakes: cuda-python / TensorRT API) ----
def _trt(tmp_path, data=b"plan"):
    plan = tmp_path / "e.plan"
    plan.write_bytes(data)
    cud = FakeCudart()
    trt = FakeTrt(FakeEngine(cud))
    return TrtBackend(plan, trt=trt, cudart=cud), cud, trt


def test_trt_preallocates_max_profile_and_chunks_batches(tmp_path):
    be, cud, trt = _trt(tmp_path)
    device = [len(buf) for buf, kind in cud.mem.values() if kind.startswith("device")]
    assert len(device) == 14  # one buffer per IO tensor per slot (2 slots), allocated once
    assert device[0] == FakeEngine.MAXB * 3 * 16 * 16 * 4
    px = np.random.default_rng(0).standard_normal((7, 3, 16, 16)).astype(np.float32)
    pr = np.zeros((1, 2, 4), np.float32)
    out = be.run(px, pr, ("image_scores", "patch_probs"))
    np.testing.assert_allclose(out["image_scores"][:, 0], px.mean(axis=(1, 2, 3)), rtol=1e-5)
    assert out["patch_probs"].shape == (7, 1, 2, 2)
    assert len(trt.engine.launches) == 3  # 3 + 3 + 1 with max batch 3
    assert len(cud.mem) == 28  # no allocation per call (14 device + 14 pinned)
    with pytest.raises(InputError, match="exceed"):
        be.run(px[:1], np.zeros((3, 2, 4), np.float32))
    with pytest.raises(InputError, match="expects 16"):
        be.run(np.zeros((1, 3, 32, 32), np.float32), pr)
    be.close()
    assert len(cud.freed) == 28  # device + pinned host buffers of both slots
    with pytest.raises(BackendUnavailable, match="closed"):
        be.run(px[:1], pr)


def test_trt_context_is_serialised_across_threads(tmp_path):
    be, _, _ = _trt(tmp_path)
    rng = np.random.default_rng(1)
    inputs = [rng.standard_normal((2, 3, 16, 16)).astype(np.float32) for _ in range(8)]
    pr = np.zeros((1, 2, 4), np.float32)
    expected = [be.run(x, pr, ("image_scores",))["image_scores"] for x in inputs]
    got = [None] * len(inputs)

    def work(i):
        for _ in range(5):
            got[i] = be.run(inputs[i], pr, ("image_scores",))["image_scores"]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    for e, g in zip(expected, got, strict=True):
        np.testing.assert_array_equal(e, g)


def test_trt_bad_engine_is_a_clear_error(tmp_path):
    with pytest.raises(BackendUnavailable, match="deserialise"):
        _trt(tmp_path, b"bad")
    cud = FakeCudart()
    with pytest.raises(ArtifactError, match="missing"):
        TrtBackend(tmp_path / "nope.plan", trt=FakeTrt(), cudart=cud)


# ---- parity checker -------------------------------------------------------------------------
def test_parity_check_reports_and_fails():
    px = np.random.default_rng(0).random((2, 3, 64, 64)).astype(np.float32)
    pr = np.zeros((1, 2, 16), np.float32)
    assert isinstance(ConstantBackend(), Backend)
    same = parity_check(ConstantBackend(0.3), ConstantBackend(0.3), px, pr)
    assert same.passed and same.outputs["patch_probs"].max_abs == 0.0
    diff = parity_check(ConstantBackend(0.3), ConstantBackend(0.30005), px, pr, outputs=("patch_probs", "image_scores"))
    assert not diff.passed
    assert diff.outputs["patch_probs"].passed and not diff.outputs["image_scores"].passed
    assert "FAILED" in str(diff) and diff.to_dict()["passed"] is False
    loose = parity_check(PatchMeanBackend(), PatchMeanBackend(0.01), px, pr, tolerance=0.02)
    assert loose.passed
    with pytest.raises(InputError, match="unknown graph output"):
        parity_check(ConstantBackend(), ConstantBackend(), px, pr, outputs=("logits",))


# ---- real GPU ---------------------------------------------------------------------------------
def _has_cuda_provider() -> bool:
    import onnxruntime as ort

    return CUDA in ort.get_available_providers()


@pytest.mark.gpu
@pytest.mark.skipif(not _has_cuda_provider(), reason="no CUDA GPU / onnxruntime-gpu on this machine")
def test_gpu_ort_cuda_parity_with_cpu(tiny_artifact):
    cpu = OrtBackend(tiny_artifact / "encoder.onnx", "cpu")
    gpu = OrtBackend(tiny_artifact / "encoder.onnx", "cuda")
    px = np.random.default_rng(0).standard_normal((3, 3, 64, 64)).astype(np.float32)
    pr = np.random.default_rng(1).standard_normal((2, 2, 32)).astype(np.float32)
    rep = parity_check(cpu, gpu, px, pr)
    assert rep.passed, str(rep)


@pytest.mark.gpu
@pytest.mark.skipif(not _has_cuda_provider(), reason="no CUDA GPU / onnxruntime-gpu on this machine")
def test_gpu_auto_picks_a_gpu_backend(tiny_artifact):
    from anoclip.runtime import Detector

    det = Detector.load(tiny_artifact, backend="auto")
    assert det.backend_name in ("trt", "ort-trt", "ort-cuda")


def _has_tensorrt_gpu() -> bool:
    try:
        import tensorrt  # noqa: F401

        from anoclip.runtime.backends.trt import gpu_count

        return gpu_count() > 0
    except Exception:  # noqa: BLE001
        return False


@pytest.mark.gpu
@pytest.mark.skipif(not _has_tensorrt_gpu(), reason="no TensorRT + CUDA GPU on this machine")
def test_gpu_native_trt_parity(register_tiny, text_cache, tmp_path):
    from anoclip.export.api import ExportConfig, export_artifact
    from anoclip.runtime import Detector

    art = export_artifact(ExportConfig(backbone=register_tiny, classes=["bottle"], pretrained="none", trt=True,
                                       out=tmp_path / "trt", text_cache=text_cache, progress=False))
    cpu = Detector.load(art, backend="ort-cpu")
    gpu = Detector.load(art, backend="trt")
    px = np.random.default_rng(0).standard_normal((3, 3, 64, 64)).astype(np.float32)
    tol = {"patch_probs": 5e-3, "image_scores": 5e-3, "global_embedding": 5e-3, "local_embeddings": 5e-3,
           "local_tokens": 5e-2}
    rep = parity_check(cpu.backend, gpu.backend, px, cpu.prototypes("bottle"), tolerance=tol)
    assert rep.passed, str(rep)


def test_base_backend_checks_once_and_run_impl_runs():
    """Polygraphy's runner pattern: ``run`` validates, ``run_impl`` only runs (and is never reached on bad input)."""
    from anoclip.runtime.backends.base import BaseBackend
    from anoclip.runtime.backends.openvino import OpenVinoBackend
    from anoclip.runtime.backends.ort import OrtBackend
    from anoclip.runtime.backends.trt import TrtBackend
    from anoclip_core.errors import ArtifactError, InputError

    calls = []

    class Recorder(BaseBackend):
        name = "recorder"
        output_names = ("patch_probs", "image_scores")

        def run_impl(self, pixels, prototypes, outputs):
            calls.append((pixels, prototypes, outputs))
            return {o: np.zeros(1, np.float32) for o in outputs}

    b = Recorder()
    px64 = np.zeros((2, 3, 8, 8), np.float64)
    pr = np.ones((1, 2, 4), np.float32)
    b.run(px64, pr)
    (px, prr, outs), = calls
    assert px.dtype == np.float32 and px.flags.c_contiguous and outs == ("patch_probs", "image_scores")
    for bad in (np.zeros((3, 8, 8)), np.zeros((1, 4, 8, 8))):
        with pytest.raises(InputError, match="pixels must be"):
            b.run(bad, pr)
    with pytest.raises(InputError, match="unknown graph output"):
        b.run(px64, pr, ("nope",))
    with pytest.raises(ArtifactError, match="no output 'local_tokens'"):
        b.run(px64, pr, ("local_tokens",))
    assert len(calls) == 1
    for cls in (OrtBackend, OpenVinoBackend, TrtBackend):
        assert issubclass(cls, BaseBackend) and "run" not in vars(cls) and "run_impl" in vars(cls)
