"""The OpenVINO backend: precision plan, bf16 refusal, threading, ``auto`` selection (CPU fakes),
and real OpenVINO runs on the tiny artifact (skipped where openvino is not installed)."""
from __future__ import annotations

import sys
import threading

import numpy as np
import pytest

from anoclip.runtime.backends import check_precision, create_backend
from anoclip.runtime.backends.openvino import OpenVinoBackend, compile_config, graph_plan, require_hint
from anoclip.runtime.cpu_features import CpuFeatures
from anoclip_core.errors import ArtifactError, BackendUnavailable, InputError

CAPS_AVX2 = ["FP32", "INT8", "BIN", "EXPORT_IMPORT"]  # what OpenVINO 2026.4 reports on this AVX2-only EPYC
CAPS_BF16 = ["FP32", "BF16", "INT8", "BIN", "EXPORT_IMPORT"]  # + "BF16" on AVX512_BF16 / AMX CPUs
OUTPUTS = ("global_embedding", "local_embeddings", "local_tokens", "patch_probs", "image_scores")


def _manifest(int8_mode: str | None = "static") -> dict:
    models = {"fp32": {"file": "encoder.onnx", "precision": "fp32"},
              "fp16": {"file": "encoder.fp16.onnx", "precision": "fp16"}}
    if int8_mode:
        models["int8"] = {"file": "encoder.int8.onnx", "precision": "int8", "quantization": {"mode": int8_mode}}
    return {"models": models, "default_model": "fp32"}


# --- precision plan (pure logic) ---------------------------------------------------------------
@pytest.mark.parametrize("precision,expected", [(None, ("fp32", "f32")), ("fp32", ("fp32", "f32")),
                                                ("bf16", ("fp32", "bf16")), ("int8", ("int8", "remainder"))])
def test_graph_plan_maps_precision_to_graph_and_hint(precision, expected):
    assert graph_plan(_manifest(), precision) == expected


def test_graph_plan_refusals_name_the_problem():
    with pytest.raises(BackendUnavailable, match="int8 graph is dynamic.*--int8-mode static"):
        graph_plan(_manifest("dynamic"), "int8")
    with pytest.raises(BackendUnavailable, match="run it with --backend ort-cpu"):  # no re-export needed for int8
        graph_plan(_manifest("dynamic"), "int8")
    with pytest.raises(BackendUnavailable, match="fp32, bf16 or int8, not 'fp16'"):
        graph_plan(_manifest(), "fp16")
    with pytest.raises(ArtifactError, match="no 'int8' model"):
        graph_plan(_manifest(None), "int8")


def test_check_precision_lets_bf16_through_only_for_openvino():
    m = _manifest()
    check_precision("openvino", m, "bf16")
    check_precision("auto", m, "bf16")
    with pytest.raises(ArtifactError, match="no 'bf16' model"):
        check_precision("ort-cpu", m, "bf16")


def test_check_precision_refuses_what_openvino_never_runs_before_a_missing_graph():
    """'artifact has no fp16 model' sent the user to re-export fp16, which OpenVINO then refuses anyway."""
    fp32_only = {"models": {"fp32": {"file": "encoder.onnx"}}, "default_model": "fp32"}
    with pytest.raises(BackendUnavailable, match="fp32, bf16 or int8, not 'fp16'; use --backend ort-cpu"):
        check_precision("openvino", fp32_only, "fp16")
    with pytest.raises(ArtifactError, match="no 'int8' model"):
        check_precision("openvino", fp32_only, "int8")


def test_bf16_hint_refused_without_native_bf16_and_accepted_with_it():
    with pytest.raises(BackendUnavailable, match="native bf16.*FP32, INT8, BIN, EXPORT_IMPORT") as err:
        require_hint("bf16", CAPS_AVX2)
    # the advice must not steer to OpenVINO's int8, the slower engine on such (AVX2) CPUs: auto picks per CPU
    assert "int8 with a static" not in str(err.value) and "--precision int8 with --backend auto" in str(err.value)
    require_hint("bf16", CAPS_BF16)
    require_hint("f32", CAPS_AVX2)


def test_compile_config_sets_f32_explicitly_and_threads():
    cfg = compile_config("f32", 3)
    assert cfg == {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": "3"}


def test_compile_config_for_streams_uses_throughput_mode_over_the_same_threads():
    cfg = compile_config("bf16", 4, streams=2)
    assert cfg == {"INFERENCE_PRECISION_HINT": "bf16", "PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": "2",
                   "INFERENCE_NUM_THREADS": "4"}
    from anoclip_core.errors import InputError

    with pytest.raises(InputError, match=r"^--streams 3 is more than the 2 thread\(s\) OpenVINO runs on \(--threads.*"
                                         r"use --streams 2 or fewer$"):
        compile_config("f32", 2, streams=3)
    with pytest.raises(InputError, match="got 0"):
        compile_config("f32", 2, streams=0)


@pytest.mark.parametrize("batch,streams,sizes", [(1, 2, [1]), (2, 2, [1, 1]), (5, 2, [2, 3]), (7, 3, [2, 3, 2]),
                                                 (3, 4, [1, 1, 1]), (8, 1, [8])])
def test_batch_parts_are_contiguous_in_order_and_near_equal(batch, streams, sizes):
    from anoclip.runtime.backends.openvino import batch_parts

    parts = batch_parts(batch, streams)
    assert [p.stop - p.start for p in parts] == sizes  # hand-computed: round(k * batch / parts) bounds
    assert parts[0].start == 0 and parts[-1].stop == batch
    assert all(a.stop == b.start for a, b in zip(parts, parts[1:], strict=False))


# --- fake OpenVINO -------------------------------------------------------------------------------
class FakePort:
    """``openvino.ConstOutput``: ``get_any_name()`` returns the tensor name (OpenVINO Python API)."""

    def __init__(self, name: str) -> None:
        self._name = name

    def get_any_name(self) -> str:
        return self._name


class FakeTensor:
    """``openvino.Tensor``: ``.data`` is a numpy view of the tensor's memory."""

    def __init__(self, data: np.ndarray) -> None:
        self.data = data


class FakeRequest:
    """``openvino.InferRequest``: ``infer(dict)`` returns an ``OVDict`` indexable by output name; the
    arrays are views of the request's own output tensors, overwritten by its next call.
    ``start_async(dict)`` returns at once and ``wait()`` blocks until done (here the work is done in
    ``start_async``, and ``wait`` only counts); ``get_tensor(name).data`` reads an output
    (OpenVINO Python API, ``InferRequest``). Every output of image i holds the mean of pixels[i]."""

    def __init__(self, log: list) -> None:
        self.log = log
        self.buffers: dict[str, np.ndarray] = {}
        self.calls: list[str] = []

    def _compute(self, inputs) -> None:
        px, pr = inputs["pixels"], inputs["text_prototypes"]
        self.log.append((threading.get_ident(), id(self)))
        b, c = px.shape[0], pr.shape[0]
        shapes = {"global_embedding": (b, 4), "local_embeddings": (b, 2, 2, 4), "local_tokens": (b, 4, 4),
                  "patch_probs": (b, c, 2, 2), "image_scores": (b, c)}
        for name, shape in shapes.items():
            buf = self.buffers.get(name)
            if buf is None or buf.shape != shape:
                buf = self.buffers[name] = np.empty(shape, np.float32)
            buf[...] = px.reshape(b, -1).mean(1).reshape((b,) + (1,) * (len(shape) - 1))

    def infer(self, inputs):
        self.calls.append("infer")
        self._compute(inputs)
        return dict(self.buffers)

    def start_async(self, inputs) -> None:
        self.calls.append("start_async")
        self._compute(inputs)

    def wait(self) -> None:
        self.calls.append("wait")

    def get_tensor(self, name: str) -> FakeTensor:
        return FakeTensor(self.buffers[name])


class FakeCompiled:
    """``openvino.CompiledModel``: ``inputs`` / ``outputs`` ports and ``create_infer_request()``."""

    def __init__(self, log: list, inputs=("pixels", "text_prototypes")) -> None:
        self.inputs = [FakePort(n) for n in inputs]
        self.outputs = [FakePort(n) for n in OUTPUTS]
        self.log = log
        self.requests: list[FakeRequest] = []

    def create_infer_request(self) -> FakeRequest:
        req = FakeRequest(self.log)
        self.requests.append(req)
        return req


class FakeCore:
    """``openvino.Core``: ``get_property("CPU", "OPTIMIZATION_CAPABILITIES")`` (ov::device::capabilities,
    values from ov::device::capability: "FP32", "BF16", "INT8", ...), ``set_property(dict)`` and
    ``compile_model(path, "CPU", config)``."""

    def __init__(self, caps=CAPS_AVX2, fail: str | None = None, inputs=("pixels", "text_prototypes")) -> None:
        self.caps, self.fail, self.inputs = list(caps), fail, inputs
        self.compiled: list[tuple[str, str, dict]] = []
        self.properties: dict = {}
        self.log: list = []

    def get_property(self, device: str, name: str):
        assert (device, name) == ("CPU", "OPTIMIZATION_CAPABILITIES")
        return self.caps

    def set_property(self, props: dict) -> None:
        self.properties.update(props)

    def compile_model(self, path: str, device: str, config: dict):
        if self.fail:
            raise RuntimeError(self.fail)
        self.compiled.append((path, device, dict(config)))
        self.model = FakeCompiled(self.log, self.inputs)
        return self.model


class FakeOpenVINO:
    __version__ = "2026.4.1-fake"

    def __init__(self, core: FakeCore) -> None:
        self._core = core

    def Core(self) -> FakeCore:  # noqa: N802 - mirrors openvino.Core
        return self._core


@pytest.fixture()
def graph(tmp_path):
    (tmp_path / "encoder.onnx").write_bytes(b"onnx")
    (tmp_path / "encoder.int8.onnx").write_bytes(b"onnx")
    return tmp_path


def test_bf16_backend_refused_on_cpu_without_bf16_before_compiling(graph):
    core = FakeCore(CAPS_AVX2)
    with pytest.raises(BackendUnavailable, match="native bf16"):
        OpenVinoBackend(graph / "encoder.onnx", "bf16", openvino=FakeOpenVINO(core))
    assert core.compiled == []


def test_bf16_backend_accepted_on_cpu_with_bf16(graph):
    core = FakeCore(CAPS_BF16)
    choice = create_backend("openvino", graph, _manifest(), "bf16", openvino_module=FakeOpenVINO(core), threads=2,
                            cache_dir=str(graph / "cache"))
    path, device, config = core.compiled[0]
    assert path.endswith("encoder.onnx") and device == "CPU"
    assert config["INFERENCE_PRECISION_HINT"] == "bf16" and config["INFERENCE_NUM_THREADS"] == "2"
    assert core.properties["CACHE_DIR"] == str(graph / "cache" / "openvino") and (graph / "cache" / "openvino").is_dir()
    assert choice.name == "openvino"


def test_fp32_picks_its_graph_with_an_explicit_f32_hint(graph):
    core = FakeCore(CAPS_BF16)  # a bf16 CPU: OpenVINO would default to bf16 without the explicit hint
    create_backend("openvino", graph, _manifest(), None, openvino_module=FakeOpenVINO(core))
    path, _, config = core.compiled[0]
    assert path.endswith("encoder.onnx") and config["INFERENCE_PRECISION_HINT"] == "f32"


@pytest.mark.parametrize("caps,remainder", [(CAPS_BF16, "bf16"), (CAPS_AVX2, "f32")])
def test_int8_runs_its_float_remainder_in_bf16_only_where_the_cpu_has_it(graph, caps, remainder):
    core = FakeCore(caps)
    choice = create_backend("openvino", graph, _manifest(), "int8", openvino_module=FakeOpenVINO(core))
    path, _, config = core.compiled[0]
    assert path.endswith("encoder.int8.onnx") and config["INFERENCE_PRECISION_HINT"] == remainder
    assert choice.backend.hint == remainder


def test_compile_failure_and_wrong_inputs_are_one_line_errors(graph):
    with pytest.raises(BackendUnavailable, match="could not compile encoder.onnx: RuntimeError: bad op"):
        OpenVinoBackend(graph / "encoder.onnx", openvino=FakeOpenVINO(FakeCore(fail="bad op\nstack...")))
    with pytest.raises(ArtifactError, match="has inputs"):
        OpenVinoBackend(graph / "encoder.onnx", openvino=FakeOpenVINO(FakeCore(inputs=("images",))))
    with pytest.raises(ArtifactError, match="graph file not found"):
        OpenVinoBackend(graph / "missing.onnx", openvino=FakeOpenVINO(FakeCore()))


def test_one_request_per_thread_and_outputs_copied(graph):
    core = FakeCore()
    be = OpenVinoBackend(graph / "encoder.onnx", openvino=FakeOpenVINO(core))
    pr = np.ones((2, 2, 4), np.float32)
    first = be.run(np.full((1, 3, 8, 8), 1.0, np.float32), pr)
    second = be.run(np.full((1, 3, 8, 8), 2.0, np.float32), pr)
    assert float(first["patch_probs"].max()) == 1.0 and float(second["patch_probs"].max()) == 2.0  # not aliased
    assert set(first) == {"patch_probs", "image_scores"}
    results: dict[int, float] = {}
    barrier = threading.Barrier(3)

    def worker(k: int) -> None:
        barrier.wait()
        for _ in range(5):
            out = be.run(np.full((1, 3, 8, 8), float(k), np.float32), pr, ["image_scores"])
            assert float(out["image_scores"][0, 0]) == float(k)
        results[k] = 1.0

    threads = [threading.Thread(target=worker, args=(k,)) for k in (3, 4, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3
    assert len(core.model.requests) == 4  # main thread + 3 workers, each reusing its own request (1 stream)
    by_thread: dict[int, set] = {}
    for tid, rid in core.log:
        by_thread.setdefault(tid, set()).add(rid)
    assert all(len(r) == 1 for r in by_thread.values())


def test_streams_split_a_batch_over_requests_at_once_and_join_it_in_order(graph):
    core = FakeCore()
    be = OpenVinoBackend(graph / "encoder.onnx", openvino=FakeOpenVINO(core), threads=2, streams=2)
    assert core.compiled[0][2]["NUM_STREAMS"] == "2"
    px = np.stack([np.full((3, 8, 8), float(k), np.float32) for k in range(5)])
    pr = np.ones((3, 2, 4), np.float32)
    out = be.run(px, pr)
    assert out["patch_probs"].shape == (5, 3, 2, 2)
    np.testing.assert_array_equal(out["patch_probs"][:, 0, 0, 0], [0, 1, 2, 3, 4])  # order kept across the parts
    np.testing.assert_array_equal(out["image_scores"][:, 2], [0, 1, 2, 3, 4])
    reqs = core.model.requests
    assert len(reqs) == 2 and [r.calls for r in reqs] == [["start_async", "wait"]] * 2  # both started, then waited
    again = be.run(px[:1] + 7, pr)  # a batch of one: one request, synchronously
    assert float(again["image_scores"][0, 0]) == 7.0 and reqs[0].calls[-1] == "infer" and len(core.model.requests) == 2
    assert float(out["image_scores"][0, 0]) == 0.0  # the earlier result was copied out, not a view


def test_streams_need_the_openvino_backend(graph, tiny_artifact):
    from anoclip.runtime import Detector, InferConfig
    from anoclip_core.errors import InputError

    with pytest.raises(InputError, match="--streams 2 is an OpenVINO option: add --backend openvino"):
        InferConfig(class_name="bottle", streams=2)
    with pytest.raises(InputError, match="streams must be >= 1"):
        InferConfig(class_name="bottle", backend="openvino", streams=0)
    with pytest.raises(InputError, match=r"streams \(2\) are an OpenVINO option"):
        Detector.load(tiny_artifact, backend="ort-cpu", streams=2)


@pytest.mark.parametrize("streams", [0, -1, 2.5, "2", True])
def test_streams_that_are_not_a_whole_number_from_one_up_are_refused_not_rounded(graph, streams):
    """The API path (``Detector.load(..., streams=...)``) has no InferConfig check: 0 used to run as 1
    stream and 2.5 as 2, silently."""
    from anoclip_core.errors import InputError

    core = FakeCore()
    with pytest.raises(InputError, match=f"streams must be a whole number >= 1, got {streams!r}"):
        create_backend("openvino", graph, _manifest(), None, openvino_module=FakeOpenVINO(core), streams=streams)
    assert core.compiled == []
    create_backend("openvino", graph, _manifest(), None, openvino_module=FakeOpenVINO(core), streams=np.int64(2),
                   threads=2)
    assert core.compiled[0][2]["NUM_STREAMS"] == "2"


def test_bad_inputs_and_outputs_rejected(graph):
    be = OpenVinoBackend(graph / "encoder.onnx", openvino=FakeOpenVINO(FakeCore()))
    from anoclip_core.errors import InputError

    with pytest.raises(InputError, match="pixels must be"):
        be.run(np.zeros((3, 8, 8), np.float32), np.ones((1, 2, 4), np.float32))
    with pytest.raises(InputError, match="unknown graph output"):
        be.run(np.zeros((1, 3, 8, 8), np.float32), np.ones((1, 2, 4), np.float32), ["maps"])


# --- selection: auto and a missing openvino --------------------------------------------------
def test_auto_on_cpu_picks_openvino_and_says_why(graph):
    choice = create_backend("auto", graph, _manifest(), openvino_module=FakeOpenVINO(FakeCore()),
                            available_providers=["CPUExecutionProvider"])
    assert choice.name == "openvino"
    assert set(choice.skipped) == {"trt", "ort-trt", "ort-cuda"}
    assert ("auto -> openvino, precision fp32, first to start of trt > ort-trt > ort-cuda > openvino > ort-cpu"
            in choice.describe())


def test_without_openvino_auto_keeps_ort_cpu_and_explicit_is_refused(tiny_artifact, monkeypatch):
    from anoclip.runtime import Detector

    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError, as when not installed
    with pytest.raises(BackendUnavailable, match=r"openvino package, which is not installed \(pip install"):
        Detector.load(tiny_artifact, backend="openvino")
    det = Detector.load(tiny_artifact, backend="auto")
    try:
        assert (
            det.backend_name == "ort-cpu"
            and "openvino: backend openvino needs the openvino package" in det.backend_note
        )
    finally:
        det.close()


class _Session:
    """The least of an ONNX Runtime session that ``OrtBackend`` touches at start (ort-cpu fallback)."""

    def __init__(self, path, so, providers):
        self.path = path

    def get_providers(self):
        return ["CPUExecutionProvider"]

    def get_inputs(self):
        return []

    get_outputs = get_inputs


def test_auto_falls_back_to_ort_cpu_for_a_graph_openvino_refuses(graph):
    choice = create_backend("auto", graph, _manifest("dynamic"), "int8", openvino_module=FakeOpenVINO(FakeCore()),
                            available_providers=["CPUExecutionProvider"], session_factory=_Session)
    assert choice.name == "ort-cpu" and "dynamic" in choice.skipped["openvino"]


NO_INT8_DOT = CpuFeatures(frozenset({"avx2", "fma"}), "test")
VNNI = CpuFeatures(frozenset({"avx2", "avx512_vnni"}), "test")
UNKNOWN = CpuFeatures(None, "test")


@pytest.mark.parametrize("features,picked", [(NO_INT8_DOT, "ort-cpu"), (VNNI, "openvino"), (UNKNOWN, "openvino")])
def test_auto_leaves_openvino_out_for_int8_only_on_a_cpu_known_to_lack_vnni(graph, features, picked):
    core = FakeCore(CAPS_AVX2)  # OpenVINO reports INT8 on AVX2 too: its capabilities cannot tell
    choice = create_backend("auto", graph, _manifest("static"), "int8", openvino_module=FakeOpenVINO(core),
                            available_providers=["CPUExecutionProvider"], session_factory=_Session,
                            cpu_features=features)
    assert choice.name == picked
    if picked == "ort-cpu":
        assert core.compiled == []  # refused before compiling
        assert "no int8 dot-product instructions (AVX512_VNNI, AVX_VNNI or AMX_INT8)" in choice.skipped["openvino"]
        assert "openvino: not picked for int8" in choice.describe()


def test_auto_bf16_without_a_bf16_engine_gives_openvino_reason_not_a_missing_graph(graph, monkeypatch):
    # bf16 is OpenVINO's hint on the fp32 graph: "artifact has no 'bf16' model" (ort-cpu's refusal) is misleading
    with pytest.raises(BackendUnavailable, match="needs a CPU with native bf16.*use --precision fp32"):
        create_backend("auto", graph, _manifest(), "bf16", openvino_module=FakeOpenVINO(FakeCore(CAPS_AVX2)),
                       available_providers=["CPUExecutionProvider"], session_factory=_Session)
    monkeypatch.setitem(sys.modules, "openvino", None)  # not installed: that is the reason, with the install line
    with pytest.raises(BackendUnavailable, match="openvino package, which is not installed"):
        create_backend("auto", graph, _manifest(), "bf16", available_providers=["CPUExecutionProvider"],
                       session_factory=_Session)
    with pytest.raises(ArtifactError, match="no 'fp16' model"):  # other precisions: ort-cpu's own refusal
        create_backend("auto", graph, _manifest(None) | {"models": {"fp32": {"file": "encoder.onnx"}}}, "fp16",
                       openvino_module=FakeOpenVINO(FakeCore(CAPS_AVX2)),
                       available_providers=["CPUExecutionProvider"], session_factory=_Session)


def test_auto_keeps_openvino_for_fp32_on_a_cpu_without_vnni(graph):
    choice = create_backend("auto", graph, _manifest("static"), "fp32", openvino_module=FakeOpenVINO(FakeCore()),
                            available_providers=["CPUExecutionProvider"], cpu_features=NO_INT8_DOT)
    assert choice.name == "openvino"


def test_openvino_int8_asked_for_by_name_without_vnni_runs_and_warns(graph, caplog):
    core = FakeCore(CAPS_AVX2)
    with caplog.at_level("WARNING", logger="anoclip.runtime"):
        choice = create_backend("openvino", graph, _manifest("static"), "int8", openvino_module=FakeOpenVINO(core),
                                cpu_features=NO_INT8_DOT)
    assert choice.name == "openvino" and core.compiled[0][0].endswith("encoder.int8.onnx")
    assert any("no int8 dot-product instructions" in r.getMessage() and "--backend ort-cpu" in r.getMessage()
               for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING", logger="anoclip.runtime"):
        create_backend("openvino", graph, _manifest("static"), "int8", openvino_module=FakeOpenVINO(FakeCore()),
                       cpu_features=VNNI)
    assert not [r for r in caplog.records if "dot-product" in r.getMessage()]
    caplog.clear()
    with caplog.at_level("WARNING", logger="anoclip.runtime"), pytest.raises(InputError, match="--streams 2"):
        create_backend("openvino", graph, _manifest("static"), "int8", openvino_module=FakeOpenVINO(FakeCore()),
                       cpu_features=NO_INT8_DOT, streams=2, threads=1)
    assert not [r for r in caplog.records if "dot-product" in r.getMessage()]  # refused: no "runs slower" first


# --- real OpenVINO ---------------------------------------------------------------------------------
def _real_openvino():
    return pytest.importorskip("openvino", reason="openvino not installed (pip install 'anoclip[openvino]')")


def _pixels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 64, 64)).astype(np.float32)


def test_real_openvino_f32_matches_ort_cpu_within_fp32_tolerance(tiny_artifact):
    _real_openvino()
    from anoclip.runtime import Detector
    from anoclip.runtime.backends import parity_check

    ref = Detector.load(tiny_artifact, backend="ort-cpu")
    ov = Detector.load(tiny_artifact, backend="openvino", verify=False)
    try:
        report = parity_check(ref.backend, ov.backend, _pixels(3), ref.prototypes("bottle"))
        assert report.passed, str(report)
        assert report.outputs["patch_probs"].max_abs <= 1e-5, str(report)  # fp32 vs fp32: far inside 1e-4
    finally:
        ref.close()
        ov.close()


def test_real_openvino_threads_match_single_thread(tiny_artifact):
    _real_openvino()
    from anoclip.runtime import Detector

    det = Detector.load(tiny_artifact, backend="openvino", verify=False)
    pr = det.prototypes("carpet")
    inputs = [_pixels(2, seed) for seed in range(4)]
    expected = [det.backend.run(px, pr)["patch_probs"] for px in inputs]
    got: dict[int, np.ndarray] = {}

    def work(i: int) -> None:
        for _ in range(3):
            got[i] = det.backend.run(inputs[i], pr)["patch_probs"]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    det.close()
    for i in range(4):
        np.testing.assert_array_equal(got[i], expected[i])


def test_real_bf16_on_this_cpu_refused_or_close(tiny_artifact):
    ov = _real_openvino()
    from anoclip.runtime import Detector

    caps = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    if "BF16" not in caps:
        with pytest.raises(BackendUnavailable, match="native bf16"):
            Detector.load(tiny_artifact, backend="openvino", precision="bf16")
        return
    ref = Detector.load(tiny_artifact, backend="ort-cpu")
    det = Detector.load(tiny_artifact, backend="openvino", precision="bf16")
    px = _pixels(2)
    a = ref.backend.run(px, ref.prototypes("bottle"))["patch_probs"]
    b = det.backend.run(px, ref.prototypes("bottle"))["patch_probs"]
    assert np.abs(a - b).max() <= 5e-3


def test_real_cli_parity_ort_cpu_vs_openvino(tiny_artifact):
    _real_openvino()
    from click.testing import CliRunner

    from anoclip.runtime.cli import main

    res = CliRunner().invoke(main, ["parity", str(tiny_artifact), "--a", "ort-cpu", "--b", "openvino"])
    assert res.exit_code == 0, res.output
    assert "PASSED" in res.output


def test_real_openvino_two_streams_give_each_image_the_one_stream_result(tiny_artifact):
    """A batch cut into parts run at once is the batch run whole (per image, up to f32 rounding of a
    different batch size in the kernels), in the same order; a tiled strip agrees too."""
    _real_openvino()
    from anoclip.runtime import Detector

    one = Detector.load(tiny_artifact, backend="openvino", threads=2, verify=False)
    two = Detector.load(tiny_artifact, backend="openvino", threads=2, streams=2, verify=False)
    try:
        assert two.backend.config["NUM_STREAMS"] == "2"
        px, pr = _pixels(5, seed=3), one.prototypes("bottle")
        a, b = one.backend.run(px, pr), two.backend.run(px, pr)
        for name in a:
            np.testing.assert_allclose(b[name], a[name], rtol=0, atol=1e-6, err_msg=name)
        spread = float(a["patch_probs"].max() - a["patch_probs"].min())
        assert spread > 1e-3  # images differ: a swapped order would fail the 1e-6 check above
        strip = (np.random.default_rng(4).random((64, 400, 3)) * 255).astype(np.uint8)
        ra, rb = one.predict(strip, "bottle", tile=True, batch=4), two.predict(strip, "bottle", tile=True, batch=4)
        np.testing.assert_allclose(rb.anomaly_map, ra.anomaly_map, rtol=0, atol=1e-6)
    finally:
        one.close()
        two.close()


# --- what precision runs: said in the note, the JSON lines and the summary ------------------------
@pytest.mark.parametrize("precision,caps,runs", [
    (None, CAPS_BF16, "fp32"), ("bf16", CAPS_BF16, "bf16"),
    ("int8", CAPS_BF16, "int8 (float ops in bf16)"), ("int8", CAPS_AVX2, "int8 (float ops in fp32)"),
])
def test_the_backend_note_says_what_precision_openvino_runs(graph, precision, caps, runs):
    choice = create_backend("openvino", graph, _manifest(), precision, openvino_module=FakeOpenVINO(FakeCore(caps)))
    assert choice.precision == runs
    assert choice.describe() == f"backend openvino, precision {runs}"


@pytest.mark.parametrize("name,precision,runs", [
    ("ort-cpu", None, "fp32"), ("ort-cpu", "fp16", "fp16"), ("ort-cpu", "int8", "int8 (dynamic)"),
    ("trt", None, "fp16 (TensorRT engine)"),
])
def test_running_precision_of_graph_backends_is_the_graph_and_its_int8_mode(name, precision, runs):
    from anoclip.runtime.backends import running_precision

    manifest = {**_manifest("dynamic"), "tensorrt": {"file": "encoder.fp16.plan", "precision": "fp16"}}
    assert running_precision(object(), name, manifest, precision) == runs


def test_real_cli_json_and_summary_say_the_precision_that_ran(tiny_artifact, tmp_path):
    ov = _real_openvino()
    import json

    import cv2
    from click.testing import CliRunner

    from anoclip.runtime.cli import infer_main

    caps = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    image = tmp_path / "part.png"
    cv2.imwrite(str(image), (np.random.default_rng(0).random((40, 48, 3)) * 255).astype(np.uint8))
    for precision, runs in (("fp32", "fp32"), ("bf16", "bf16")):
        if precision == "bf16" and "BF16" not in caps:
            continue
        out = tmp_path / precision
        res = CliRunner().invoke(infer_main, [str(tiny_artifact), str(image), "--class", "bottle", "--backend",
                                              "openvino", "--precision", precision, "--out", str(out), "--quiet",
                                              "--no-overlays", "--no-masks", "--no-verify"])
        assert res.exit_code == 0, res.output
        assert f"backend openvino, precision {runs};" in res.output
        line = json.loads((out / "results.jsonl").read_text().splitlines()[0])
        assert line["precision"] == runs and line["backend"] == "openvino"
        assert json.loads((out / "summary.json").read_text())["precision"] == runs
