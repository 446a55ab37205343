"""Issue 9 review items on the export side, against the header-faithful fake TensorRT (trt_fakes):
network creation flags (10), TF32 (7), timing-cache mismatch (4), bf16 engines (8), Triton max batch (3)."""
from __future__ import annotations

import sys

import pytest
from trt_fakes import fake_tensorrt

from anoclip.runtime import contract as mf
from anoclip_core.errors import AnoCLIPError


def _build(trt, artifact, tmp_path, precision="fp32", cache=None, src="encoder.onnx"):
    from anoclip.export import trt as trt_mod

    return trt_mod.build_engine(trt, artifact / src, tmp_path / f"e.{precision}.plan", precision, 64, 32, 2,
                                "Fake GPU", (1, 4, 16), cache or tmp_path / "t.cache")


@pytest.mark.parametrize("version", ["10.9.0", "11.1.0"])
def test_network_created_without_plugin_preference_bits(artifact, tmp_path, version):
    """TRT 11: STRONGLY_TYPED is 0 (deprecated, ignored), bit 1 is PREFER_JIT_PYTHON_PLUGINS: no flag at all."""
    trt = fake_tensorrt(version)
    _build(trt, artifact, tmp_path)
    assert [c for c in trt.calls if c[0] == "network"] == [("network", 0)]


@pytest.mark.parametrize("version", ["10.9.0", "11.1.0"])
def test_fp32_engine_clears_tf32(artifact, tmp_path, version):
    trt = fake_tensorrt(version)
    entry = _build(trt, artifact, tmp_path, "fp32")
    built_flags = [c[1] for c in trt.calls if c[0] == "build"][0]
    assert trt.BuilderFlag.TF32 not in built_flags and entry["tf32"] is False


def test_reduced_engine_keeps_tf32_and_records_it(artifact, tmp_path):
    trt = fake_tensorrt("10.9.0")
    entry = _build(trt, artifact, tmp_path, "fp16")
    built_flags = [c[1] for c in trt.calls if c[0] == "build"][0]
    assert built_flags == {trt.BuilderFlag.TF32, trt.BuilderFlag.FP16} and entry["tf32"] is True


@pytest.mark.parametrize("version", ["10.9.0", "11.1.0"])
def test_foreign_timing_cache_falls_back_to_a_fresh_one(artifact, tmp_path, version):
    cache = tmp_path / "t.cache"
    cache.write_bytes(b"TC|10.0.0|Other GPU|stale")  # another version / device
    trt = fake_tensorrt(version)
    entry = _build(trt, artifact, tmp_path, cache=cache)
    sets = [c for c in trt.calls if c[0] == "set_cache"]
    assert sets == [("set_cache", False, False), ("set_cache", False, True)]  # refused, then a fresh cache
    assert cache.read_bytes() == f"TC|{version}|Fake GPU|+t".encode()
    assert (tmp_path / "e.fp32.plan").read_bytes() == b"PLAN-" + version.encode() and entry["file"] == "e.fp32.plan"


def test_no_timing_cache_set_is_not_an_error(artifact, tmp_path):
    """get_timing_cache() is None when no cache could be set: the plan is still written, no cache file."""
    trt = fake_tensorrt("11.1.0")
    cfg_cls = trt.Builder(None).create_builder_config().__class__
    cfg_cls.set_timing_cache = lambda self, cache, ignore: False
    cache = tmp_path / "t.cache"
    _build(trt, artifact, tmp_path, cache=cache)
    assert (tmp_path / "e.fp32.plan").is_file() and not cache.exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_failed_build_leaves_no_plan(artifact, tmp_path):
    from anoclip.export.onnx_export import ExportError

    trt = fake_tensorrt("11.1.0")
    trt.fail_build = True
    with pytest.raises(ExportError, match="failed to build"):
        _build(trt, artifact, tmp_path)
    assert not list(tmp_path.glob("*.plan*")) and not list(tmp_path.glob(".e.*"))


def test_engine_precision_is_independent_of_graphs():
    from anoclip.export.trt import choose_trt_precision

    assert choose_trt_precision(["fp32"], "bf16") == "bf16"
    assert choose_trt_precision(["fp32", "fp16"]) == "fp16"
    with pytest.raises(AnoCLIPError, match="--trt-precision"):
        choose_trt_precision(["fp32"], "int8")


@pytest.mark.parametrize("version,source", [("10.9.0", "encoder.onnx"),
                                            ("11.1.0", ".encoder.bf16.engine-source.onnx")])
def test_bf16_engine_without_ort_bf16(make_config, register_tiny, tmp_path, monkeypatch, version, source):
    """A bf16 engine is built although ONNX Runtime CPU has no bf16 kernels (the ORT check is for graphs only)."""
    from anoclip.export import quantize
    from anoclip.export import trt as trt_mod
    from anoclip.export.api import export_artifact

    monkeypatch.setattr(quantize, "bf16_support", lambda: (False, "no bf16 kernels (fake)"))
    fake = fake_tensorrt(version)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(trt_mod, "cuda_gpu_name", lambda: "Fake GPU")
    cfg = make_config(tmp_path / "art", classes=["bottle"], precisions=["fp32"], trt=True, trt_precision="bf16",
                      trt_timing_cache=tmp_path / "t.cache", verify_batch_sizes=(1,))
    out = export_artifact(cfg)
    data = mf.read_manifest(out, check_files=True)
    assert data["tensorrt"]["precision"] == "bf16" and data["tensorrt"]["source_onnx"] == source
    assert list(data["models"]) == ["fp32"] and ("parse", source) in fake.calls
    assert not [p for p in out.iterdir() if "engine-source" in p.name]  # the engine-only graph is not shipped
    if version.startswith("10"):
        assert fake.BuilderFlag.BF16 in [c[1] for c in fake.calls if c[0] == "build"][0]


def test_bf16_graph_refusal_names_the_engine_route(make_config, register_tiny, tmp_path, monkeypatch):
    from anoclip.export import quantize
    from anoclip.export.api import export_artifact

    monkeypatch.setattr(quantize, "bf16_support", lambda: (False, "no bf16 kernels (fake)"))
    with pytest.raises(AnoCLIPError, match="--trt-precision bf16"):
        export_artifact(make_config(tmp_path / "a", precisions=["bf16"]))


def test_triton_max_batch_follows_the_profile():
    from anoclip.export.triton import max_batch_size

    assert max_batch_size((1, 4, 16)) == 16
    assert max_batch_size((1, 8, 64), 32) == 32
    assert max_batch_size(None) == 32 and max_batch_size(None, 8) == 8
    with pytest.raises(AnoCLIPError, match="min = 1"):
        max_batch_size((2, 8, 32))
    with pytest.raises(AnoCLIPError, match=r"\[1, 16\]"):
        max_batch_size((1, 4, 16), 32)


def test_triton_plan_config_uses_profile_max(make_config, register_tiny, tmp_path, monkeypatch):
    from anoclip.export import trt as trt_mod
    from anoclip.export.api import export_artifact

    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt("11.1.0"))
    monkeypatch.setattr(trt_mod, "cuda_gpu_name", lambda: "Fake GPU")
    cfg = make_config(tmp_path / "art", classes=["bottle"], precisions=["fp32"], trt=True, trt_profile=(1, 2, 4),
                      trt_timing_cache=tmp_path / "t.cache", triton=tmp_path / "triton", verify_batch_sizes=(1,))
    data = mf.read_manifest(export_artifact(cfg))
    text = (tmp_path / "triton" / "anoclip" / "config.pbtxt").read_text()
    assert "max_batch_size: 4\n" in text and data["triton"]["max_batch_size"] == 4
