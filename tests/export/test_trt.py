"""TensorRT: immediate refusal without TensorRT/GPU, builder logic against a fake ``tensorrt``
module (TensorRT 10 and 11 APIs), and a real-GPU build (marked ``gpu``)."""
from __future__ import annotations

import sys

import pytest
from trt_fakes import fake_tensorrt

from anoclip.runtime import contract as mf
from anoclip_core.errors import AnoCLIPError, BackendUnavailable


def _no_weights(monkeypatch):
    from anoclip_core import model as core_model

    monkeypatch.setattr(core_model.AnoCLIP, "create", classmethod(lambda *a, **k: pytest.fail("loaded weights")))


def test_trt_without_tensorrt_fails_at_once(make_config, register_tiny, tmp_path, monkeypatch):
    from anoclip.export.api import export_artifact

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    _no_weights(monkeypatch)
    with pytest.raises(BackendUnavailable, match="--trt needs TensorRT, which is not importable"):
        export_artifact(make_config(tmp_path / "a", trt=True))
    assert not list(tmp_path.iterdir())


def test_trt_without_gpu_fails_at_once(make_config, register_tiny, tmp_path, monkeypatch):
    from anoclip.export import trt as trt_mod
    from anoclip.export.api import export_artifact

    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt("10.9.0"))
    monkeypatch.setattr(trt_mod, "cuda_gpu_name", lambda: None)
    _no_weights(monkeypatch)
    with pytest.raises(BackendUnavailable, match="needs a CUDA GPU"):
        export_artifact(make_config(tmp_path / "a", trt=True))


def test_trt_int8_only_refused(make_config, register_tiny, tmp_path, monkeypatch):
    from anoclip.export.api import export_artifact

    _no_weights(monkeypatch)
    with pytest.raises(AnoCLIPError, match="TensorRT cannot build"):
        export_artifact(make_config(tmp_path / "a", trt=True, precisions=["int8"]))


def test_profile_shapes():
    from anoclip.export.trt import profile_shapes

    shapes = profile_shapes(240, 640, 3, (1, 8, 32))
    assert shapes["pixels"] == ((1, 3, 240, 240), (8, 3, 240, 240), (32, 3, 240, 240))
    assert shapes["text_prototypes"] == ((1, 2, 640), (3, 2, 640), (64, 2, 640))
    with pytest.raises(AnoCLIPError):
        profile_shapes(240, 640, 3, (4, 2, 8))


@pytest.mark.parametrize("version", ["10.9.0", "11.0.1"])
def test_build_engine_precision_api(artifact, tmp_path, version):
    from anoclip.export import trt as trt_mod

    trt = fake_tensorrt(version)
    graphs = {"fp32": "encoder.onnx", "fp16": "encoder.fp16.onnx"}
    src = trt_mod.engine_source(trt, "fp16", graphs)
    cache = tmp_path / "t.cache"
    old = f"TC|{version}|Fake GPU|old".encode()
    cache.write_bytes(old)
    entry = trt_mod.build_engine(trt, artifact / src, tmp_path / "encoder.fp16.plan", "fp16", 64, 32, 2,
                                 "Fake GPU", (1, 4, 16), cache)
    calls = trt.calls
    if version.startswith("10"):
        # weak typing: fp32 graph + FP16 builder flag
        assert src == "encoder.onnx" and trt.BuilderFlag.FP16 in calls[-1][1]
        assert ("network", 0) in calls and entry["strongly_typed"] is False
    else:
        # TensorRT 11: no FP16 flag; strongly typed network from the fp16 graph
        assert src == "encoder.fp16.onnx" and calls[-1] == ("build", frozenset({trt.BuilderFlag.TF32}))
        assert ("network", 0) in calls and entry["strongly_typed"] is True
    assert ("parse", src) in calls
    assert ("shape", "pixels", (1, 3, 64, 64), (4, 3, 64, 64), (16, 3, 64, 64)) in calls
    assert ("shape", "text_prototypes", (1, 2, 32), (2, 2, 32), (64, 2, 32)) in calls
    assert ("cache_in", old) in calls
    assert cache.read_bytes() == old + b"+t"  # timing cache written back
    assert (tmp_path / "encoder.fp16.plan").read_bytes() == b"PLAN-" + version.encode()
    assert entry["trt_version"] == version and entry["gpu"] == "Fake GPU"
    assert entry["profile"] == {"min": 1, "opt": 4, "max": 16}
    assert entry["timing_cache"] == str(cache) and entry["file"] == "encoder.fp16.plan"


def test_trt11_without_reduced_graph_uses_an_engine_only_graph():
    """TRT 11 is strongly typed: a bf16 engine is built from a bf16 graph converted for it alone
    (not the ORT-verified model list), so --trt-precision bf16 works without ORT bf16 kernels."""
    from anoclip.export import trt as trt_mod

    graphs = {"fp32": "encoder.onnx"}
    assert trt_mod.engine_source(fake_tensorrt("11.0.0"), "bf16", graphs) == ".encoder.bf16.engine-source.onnx"
    assert trt_mod.engine_source(fake_tensorrt("10.9.0"), "bf16", graphs) == "encoder.onnx"


def test_default_timing_cache_path(monkeypatch, tmp_path):
    from anoclip.export import trt as trt_mod

    monkeypatch.setenv("ANOCLIP_TRT_CACHE", str(tmp_path))
    path = trt_mod.default_timing_cache(fake_tensorrt("10.9.0"), "NVIDIA H100 80GB HBM3")
    assert path == tmp_path / "timing-10.9.0-NVIDIA_H100_80GB_HBM3.cache"


def test_export_with_fake_trt_and_triton_plan(make_config, register_tiny, tmp_path, monkeypatch):
    """Whole export path with --trt (fake TensorRT 11 + fake GPU) and --triton: plan in the artifact,
    manifest tensorrt entry and sha256, Triton repository with model.plan."""
    from anoclip.export import trt as trt_mod
    from anoclip.export.api import export_artifact

    fake = fake_tensorrt("11.0.1")
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(trt_mod, "cuda_gpu_name", lambda: "Fake GPU")
    cfg = make_config(tmp_path / "art", classes=["bottle"], precisions=["fp16"], trt=True,
                      trt_timing_cache=tmp_path / "cache" / "t.cache", triton=tmp_path / "triton")
    out = export_artifact(cfg)
    data = mf.read_manifest(out)
    t = data["tensorrt"]
    assert t["file"] == "encoder.fp16.plan" and t["precision"] == "fp16" and t["trt_version"] == "11.0.1"
    assert t["gpu"] == "Fake GPU" and t["profile"] == {"min": 1, "opt": 8, "max": 32} and t["strongly_typed"]
    assert "encoder.fp16.plan" in data["files"] and data["versions"]["tensorrt"] == "11.0.1"
    assert (tmp_path / "cache" / "t.cache").is_file()
    model_dir = tmp_path / "triton" / "anoclip"
    assert sorted(p.name for p in (model_dir / "1").iterdir()) == ["model.plan"]
    assert 'platform: "tensorrt_plan"' in (model_dir / "config.pbtxt").read_text()
    # the Triton engine was built from the folded graph: pixels is its only input
    shapes = [c[1] for c in fake.calls if c[0] == "shape"]
    assert shapes.count("pixels") == 2 and shapes.count("text_prototypes") == 1
    assert data["triton"]["platform"] == "tensorrt_plan"


def _real_trt():
    try:
        import tensorrt  # noqa: F401
    except Exception as err:  # noqa: BLE001
        return f"tensorrt not importable ({type(err).__name__})"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU"
    return None


@pytest.mark.gpu
def test_real_trt_engine_build(make_config, register_tiny, tmp_path):
    reason = _real_trt()
    if reason:
        pytest.skip(f"real TensorRT build needs TensorRT and a CUDA GPU: {reason}")
    from anoclip.export.api import export_artifact

    out = export_artifact(make_config(tmp_path / "art", classes=["bottle"], precisions=["fp16"], trt=True,
                                      trt_timing_cache=tmp_path / "t.cache"))
    data = mf.read_manifest(out)
    assert (out / data["tensorrt"]["file"]).stat().st_size > 0
    assert (tmp_path / "t.cache").stat().st_size > 0
    import numpy as np
    import onnxruntime as ort
    import tensorrt as trt
    import torch

    from anoclip.export.text import prototypes_array, read_npz

    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine((out / data["tensorrt"]["file"]).read_bytes())
    names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
    assert names == set(data["io"]["inputs"]) | set(data["io"]["outputs"])
    # run it at batch 3 and compare with the fp32 ONNX graph on CPU (fp16 engine: 1e-2)
    protos = prototypes_array(read_npz(out / "text_embeddings.npz"), ["bottle"])
    pixels = np.random.default_rng(0).standard_normal((3, 3, 64, 64)).astype(np.float32)
    ref = ort.InferenceSession(str(out / "encoder.onnx"), providers=["CPUExecutionProvider"]).run(
        ["image_scores", "patch_probs"], {"pixels": pixels, "text_prototypes": protos})
    ctx = engine.create_execution_context()
    inputs = {"pixels": torch.from_numpy(pixels).cuda(), "text_prototypes": torch.from_numpy(protos).cuda()}
    for name, t in inputs.items():
        ctx.set_input_shape(name, tuple(t.shape))
        ctx.set_tensor_address(name, t.data_ptr())
    outs = {}
    for name in data["io"]["outputs"]:
        outs[name] = torch.empty(tuple(ctx.get_tensor_shape(name)), dtype=torch.float32, device="cuda")
        ctx.set_tensor_address(name, outs[name].data_ptr())
    assert ctx.execute_async_v3(torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    np.testing.assert_allclose(outs["image_scores"].cpu().numpy(), ref[0], atol=1e-2)
    np.testing.assert_allclose(outs["patch_probs"].cpu().numpy(), ref[1], atol=1e-2)
