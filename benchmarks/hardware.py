"""The machine: CPU/GPU model, library versions, a measured GEMM peak, and memory sampling."""
from __future__ import annotations

import os
import platform
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import metadata
from typing import Any


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (Linux), else platform.processor()."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def cpu_count() -> dict:
    logical = os.cpu_count()
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = logical
    physical = None
    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
    except Exception:  # noqa: BLE001 - psutil is optional here
        pass
    return {"logical": logical, "usable": affinity, "physical": physical}


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def total_memory_gb() -> float | None:
    try:
        import psutil

        return round(psutil.virtual_memory().total / 2**30, 1)
    except Exception:  # noqa: BLE001
        return None


def gpu_info() -> dict | None:
    """Name, memory and capability of CUDA device 0 through torch, or None without CUDA."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return {
        "name": props.name,
        "memory_gb": round(props.total_memory / 2**30, 1),
        "capability": f"{props.major}.{props.minor}",
        "count": torch.cuda.device_count(),
        "cuda": torch.version.cuda,
    }


# (distribution, module): the module's own __version__ (e.g. torch's "+cu130" build tag) when it
# is importable, else the installed distribution's version
VERSION_PACKAGES = (
    ("anoclip", "anoclip_core"), ("torch", "torch"), ("open_clip_torch", "open_clip"), ("onnx", "onnx"),
    ("onnxruntime", "onnxruntime"), ("onnxruntime-gpu", None), ("tensorrt", None), ("numpy", "numpy"),
    ("opencv-python-headless", "cv2"), ("opencv-python", None), ("psutil", "psutil"), ("matplotlib", "matplotlib"),
)


def versions() -> dict[str, str]:
    """Versions of the packages that matter (absent ones left out) and Python."""
    import importlib

    out = {"python": platform.python_version()}
    for dist, module in VERSION_PACKAGES:
        version = None
        if module is not None:
            try:
                version = str(getattr(importlib.import_module(module), "__version__", "") or "") or None
            except Exception:  # noqa: BLE001 - not installed / broken install: fall back to metadata
                version = None
        if version is None:
            try:
                version = metadata.version(dist)
            except metadata.PackageNotFoundError:
                continue
        out[dist] = version
    return out


def machine_summary() -> dict:
    return {
        "cpu": cpu_model(),
        "cpu_count": cpu_count(),
        "memory_gb": total_memory_gb(),
        "platform": platform.platform(),
        "gpu": gpu_info(),
        "cpu_features": cpu_features(),
        "load_average_start": load_average(),
    }


def cpu_features() -> dict[str, bool | None]:
    """Whether the CPU has int8 dot-product (VNNI / AMX) and native bf16 instructions (None: unknown)."""
    from anoclip.runtime.cpu_features import read_cpu_features

    f = read_cpu_features()
    return {"int8_dot": f.int8_dot, "native_bf16": f.native_bf16}


@dataclass(frozen=True)
class GemmPeak:
    """Best measured GEMM rate on a device: ``2 n³`` FLOPs per ``n x n`` matmul."""

    device: str
    dtype: str
    n: int
    calls: int
    best_s: float
    gflops: float

    def to_dict(self) -> dict:
        return asdict(self)


def _best_of(call: Callable[[], object], repeats: int) -> float:
    """Seconds of the fastest of ``repeats`` calls, after one warm-up call."""
    call()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_gemm_peak(device: str = "cpu", dtype: str = "float32", n: int = 2048, repeats: int = 5) -> GemmPeak:
    """Measure the matrix-multiply peak (GFLOP/s) of ``device`` with torch, best of ``repeats``.

    Uses the same torch threading settings as the contenders, so it is the ceiling they can reach.
    """
    import torch

    dt = getattr(torch, dtype)
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dt)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dt)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    def call() -> None:
        sync()
        torch.mm(a, b)
        sync()

    best = _best_of(call, repeats)
    return GemmPeak(device, dtype, n, repeats, best, 2.0 * n**3 / best / 1e9)


def measure_gemm_peak_int8(n: int = 2048, repeats: int = 5) -> GemmPeak:
    """The CPU's int8 matrix-multiply peak (GOP/s: int8 x int8 -> int32, ``torch._int_mm``, oneDNN's
    VNNI / AMX kernels when the CPU has them), best of ``repeats``: the ceiling of int8 contenders."""
    import torch

    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randint(-128, 127, (n, n), generator=gen, dtype=torch.int8)
    b = torch.randint(-128, 127, (n, n), generator=gen, dtype=torch.int8)
    best = _best_of(lambda: torch._int_mm(a, b), repeats)
    return GemmPeak("cpu", "int8", n, repeats, best, 2.0 * n**3 / best / 1e9)


def _ort_cpu_session(graph: Any, threads: int | None) -> Any:
    """An ONNX Runtime CPU session of a one-node ONNX ``graph`` (opset 18), quiet, on ``threads``."""
    import onnxruntime as ort
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = int(threads)
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def measure_gemm_peak_ort(n: int = 2048, repeats: int = 5, threads: int | None = None) -> GemmPeak:
    """The same fp32 ``n x n`` matmul as one ONNX ``MatMul`` node on ONNX Runtime's CPU provider
    (its MLAS kernels, the ones the runtime contenders use), best of ``repeats``."""
    import numpy as np
    from onnx import TensorProto, helper

    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, [n, n])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, n])
    sess = _ort_cpu_session(helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["y"])], "gemm", [a, b], [y]),
                            threads)
    rng = np.random.default_rng(0)
    feeds = {"a": rng.standard_normal((n, n), dtype=np.float32), "b": rng.standard_normal((n, n), dtype=np.float32)}
    best = _best_of(lambda: sess.run(None, feeds), repeats)
    return GemmPeak("cpu (onnxruntime)", "float32", n, repeats, best, 2.0 * n**3 / best / 1e9)


def measure_gemm_peak_ort_int8(n: int = 2048, repeats: int = 5, threads: int | None = None) -> GemmPeak:
    """ONNX Runtime's int8 ``n x n`` matmul: one ``MatMulInteger`` node, uint8 activations times a
    constant int8 weight (MLAS's u8s8 kernels, which the ``ort-cpu`` int8 contenders run; they keep
    an int8 speed-up on AVX2 CPUs without VNNI / AMX), best of ``repeats``."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    a = helper.make_tensor_value_info("a", TensorProto.UINT8, [n, n])
    y = helper.make_tensor_value_info("y", TensorProto.INT32, [n, n])
    w = numpy_helper.from_array(rng.integers(-64, 64, (n, n)).astype(np.int8), "w")
    sess = _ort_cpu_session(
        helper.make_graph([helper.make_node("MatMulInteger", ["a", "w"], ["y"])], "gemm_int8", [a], [y], [w]), threads)
    feeds = {"a": rng.integers(0, 256, (n, n)).astype(np.uint8)}
    best = _best_of(lambda: sess.run(None, feeds), repeats)
    return GemmPeak("cpu (onnxruntime)", "int8", n, repeats, best, 2.0 * n**3 / best / 1e9)


def _openvino_matmul_onnx(n: int, dtype: str) -> bytes:
    """``y = x @ W`` (``x`` a float input, ``W`` a constant) as ONNX: for int8 with symmetric QDQ on
    both sides, the pattern the exporter's static int8 graph gives every Linear layer."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, n])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, n])
    if dtype == "int8":
        inits = [numpy_helper.from_array(rng.integers(-64, 64, (n, n)).astype(np.int8), "w"),
                 numpy_helper.from_array(np.full(n, 0.01, np.float32), "ws"),
                 numpy_helper.from_array(np.zeros(n, np.int8), "wz"),
                 numpy_helper.from_array(np.array(0.05, np.float32), "xs"),
                 numpy_helper.from_array(np.array(0, np.int8), "xz")]
        nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
                 helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
                 helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=1),
                 helper.make_node("MatMul", ["xd", "wd"], ["y"])]
    else:
        inits = [numpy_helper.from_array(rng.standard_normal((n, n)).astype(np.float32), "w")]
        nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
    graph = helper.make_graph(nodes, "gemm", [x], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString()


def measure_gemm_peak_openvino(dtype: str, n: int = 2048, repeats: int = 5, threads: int | None = None) -> GemmPeak:
    """OpenVINO's own ``n x n`` matmul on the CPU (``dtype`` bfloat16: the f32 graph with the bf16
    inference hint; int8: the QDQ pattern, activations quantised inside the call as in the runtime's
    int8 graph), compiled like the runtime's backend, best of ``repeats``: the ceiling its kernels
    reach on this machine, beside torch's."""
    import os
    import tempfile

    import numpy as np
    import openvino as ov

    hint = {"bfloat16": "bf16", "int8": "bf16"}[dtype]
    with tempfile.TemporaryDirectory(prefix="anoclip-ov-gemm-") as tmp:
        path = os.path.join(tmp, "gemm.onnx")
        with open(path, "wb") as fh:
            fh.write(_openvino_matmul_onnx(n, dtype))
        config = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = str(int(threads))
        compiled = ov.Core().compile_model(path, "CPU", config)
    request = compiled.create_infer_request()
    feed = {"x": np.random.default_rng(1).standard_normal((n, n)).astype(np.float32)}
    best = _best_of(lambda: request.infer(feed), repeats)
    return GemmPeak("cpu (openvino)", dtype, n, repeats, best, 2.0 * n**3 / best / 1e9)


class PeakMemory:
    """Peak resident memory of this process while the ``with`` block runs (psutil sampling thread).

    With ``cuda`` it also resets and reads ``torch.cuda.max_memory_allocated`` (torch's own
    allocations) and samples the device-wide used memory (``torch.cuda.mem_get_info``: includes
    ONNX Runtime / TensorRT allocations, and anything else on the GPU). Reports MiB.
    """

    def __init__(self, interval_s: float = 0.01, cuda: bool = False) -> None:
        self.interval_s = interval_s
        self.cuda = cuda
        self.start_mb: float | None = None
        self.peak_mb: float | None = None
        self.gpu_peak_mb: float | None = None
        self.gpu_used_start_mb: float | None = None
        self.gpu_used_peak_mb: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _rss(self) -> float:
        return self._proc.memory_info().rss / 2**20

    def _gpu_used(self) -> float | None:
        try:
            import torch

            free, total = torch.cuda.mem_get_info()
            return (total - free) / 2**20
        except Exception:  # noqa: BLE001 - sampling must never break a run
            return None

    def _sample(self) -> None:
        self.peak_mb = max(self.peak_mb or 0.0, self._rss())
        if self.cuda:
            used = self._gpu_used()
            if used is not None:
                self.gpu_used_peak_mb = max(self.gpu_used_peak_mb or 0.0, used)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> PeakMemory:
        import psutil

        self._proc = psutil.Process()
        self.start_mb = self._rss()
        self.peak_mb = self.start_mb
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.gpu_used_start_mb = self._gpu_used()
            self.gpu_used_peak_mb = self.gpu_used_start_mb
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            self.gpu_peak_mb = torch.cuda.max_memory_allocated() / 2**20
        self._sample()

    def to_dict(self) -> dict:
        out = {
            "rss_start_mb": round(self.start_mb, 1) if self.start_mb is not None else None,
            "rss_peak_mb": round(self.peak_mb, 1) if self.peak_mb is not None else None,
            "rss_delta_mb": round(self.peak_mb - self.start_mb, 1)
            if self.peak_mb is not None and self.start_mb is not None
            else None,
        }
        if self.cuda:
            out["gpu_peak_mb"] = round(self.gpu_peak_mb, 1) if self.gpu_peak_mb is not None else None
            out["gpu_device_used_start_mb"] = (round(self.gpu_used_start_mb, 1)
                                               if self.gpu_used_start_mb is not None else None)
            out["gpu_device_used_peak_mb"] = (round(self.gpu_used_peak_mb, 1)
                                              if self.gpu_used_peak_mb is not None else None)
        return out
