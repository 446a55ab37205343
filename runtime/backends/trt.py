"""Native TensorRT backend (TensorRT >= 10 name-based tensor API), torch-free.

* The serialized engine (``manifest["tensorrt"]["file"]``, e.g. ``encoder.fp16.plan``) is
  deserialised once; IO tensors are found by name (``pixels``, ``text_prototypes`` and the five
  outputs of docs/ARCHITECTURE.md).
* Device buffers for every IO tensor are preallocated ONCE for the profile's maximum shapes
  (``get_tensor_profile_shape``), through the torch-free CUDA runtime bindings
  (``cuda.bindings.runtime``, i.e. cuda-python; older ``cuda.cudart`` accepted). No torch.
* A call: ``set_input_shape`` for the real batch, ``set_tensor_address`` for every tensor,
  host->device copies, ``execute_async_v3`` on the backend's single CUDA stream, device->host
  copies of the requested outputs, one stream synchronise. A batch larger than the profile
  maximum is run in chunks.

Thread model: an ``IExecutionContext`` and its buffers are NOT thread-safe, so a backend owns
exactly one context + one stream + one buffer set and serialises ``run`` with a lock. Several
threads may share one backend safely (calls queue on the lock; the GPU is busy anyway); for
overlap across threads, load several backends (each has its own context and memory).
"""
from __future__ import annotations

import os
import threading
from typing import Any, Sequence

import numpy as np

from anoclip_core.errors import ArtifactError, BackendUnavailable, InputError

from .base import ALL_OUTPUTS, DEFAULT_OUTPUTS, INPUT_NAMES, check_inputs, check_outputs


def import_trt() -> Any:
    try:
        import tensorrt  # type: ignore[import-not-found]
    except Exception as err:  # noqa: BLE001 - ImportError or a broken install (missing libs)
        raise BackendUnavailable(
            f"backend trt needs the TensorRT Python package (pip install anoclip[trt]); import failed: {err}"
        ) from None
    return tensorrt


def import_cudart() -> Any:
    try:
        from cuda.bindings import runtime as cudart  # type: ignore[import-not-found]
    except Exception:  # noqa: BLE001
        try:
            from cuda import cudart  # type: ignore[import-not-found,no-redef]
        except Exception as err:  # noqa: BLE001
            raise BackendUnavailable(
                f"backend trt needs the CUDA runtime bindings (pip install cuda-python); import failed: {err}"
            ) from None
    return cudart


def _check(result: Any, what: str) -> Any:
    """cuda-python calls return ``(err, *values)``; raise on error, return the value(s)."""
    if isinstance(result, tuple):
        err, rest = result[0], result[1:]
    else:
        err, rest = result, ()
    if int(err) != 0:
        raise BackendUnavailable(f"CUDA call {what} failed: {err}")
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else rest


def gpu_count(cudart: Any | None = None) -> int:
    try:
        cudart = cudart or import_cudart()
        err, n = cudart.cudaGetDeviceCount()
        return int(n) if int(err) == 0 else 0
    except BackendUnavailable:
        return 0


class TrtBackend:
    """Native TensorRT engine (see module docstring for the memory and thread model)."""

    name = "trt"

    def __init__(self, plan_path: str | os.PathLike, trt: Any | None = None, cudart: Any | None = None,
                 device_id: int = 0) -> None:
        self.trt = trt or import_trt()
        self.cudart = cudart or import_cudart()
        if gpu_count(self.cudart) < 1:
            raise BackendUnavailable("backend trt needs an NVIDIA GPU with a working driver; none was found")
        plan_path = os.fspath(plan_path)
        if not os.path.isfile(plan_path):
            raise ArtifactError(f"TensorRT engine file missing: {plan_path}")
        _check(self.cudart.cudaSetDevice(int(device_id)), "cudaSetDevice")
        self._logger = self.trt.Logger(self.trt.Logger.WARNING)
        self._runtime = self.trt.Runtime(self._logger)
        with open(plan_path, "rb") as f:
            self.engine = self._runtime.deserialize_cuda_engine(f.read())
        if self.engine is None:
            raise BackendUnavailable(
                f"TensorRT could not deserialise {plan_path}: built for another TensorRT version or GPU; "
                "rebuild it with anoclip-export on this machine"
            )
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        missing = [n for n in (*INPUT_NAMES, *ALL_OUTPUTS) if n not in names]
        if missing:
            raise ArtifactError(f"TensorRT engine {plan_path} lacks tensors {missing} (has {names})")
        self.tensor_names = names
        self.dtypes = {n: np.dtype(self.trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        pmin, _, pmax = self.engine.get_tensor_profile_shape("pixels", 0)
        cmin, _, cmax = self.engine.get_tensor_profile_shape("text_prototypes", 0)
        self.max_batch = int(pmax[0])
        self.max_classes = int(cmax[0])
        self.image_size = int(pmax[2])
        self.embed_dim = int(cmax[2])
        # preallocate device buffers for the maximum profile shapes
        self.context.set_input_shape("pixels", tuple(pmax))
        self.context.set_input_shape("text_prototypes", tuple(cmax))
        self._buffers: dict[str, int] = {}
        self._nbytes: dict[str, int] = {}
        for n in names:
            shape = tuple(int(d) for d in self.context.get_tensor_shape(n))
            nbytes = int(np.prod(shape)) * self.dtypes[n].itemsize
            self._nbytes[n] = nbytes
            self._buffers[n] = int(_check(self.cudart.cudaMalloc(max(nbytes, 1)), f"cudaMalloc({n})"))
        self.stream = _check(self.cudart.cudaStreamCreate(), "cudaStreamCreate")
        try:  # cuda-python's cudaStream_t -> the integer handle TensorRT expects
            self._stream_handle = int(self.stream)
        except TypeError:
            self._stream_handle = int(getattr(self.stream, "getPtr")())
        self._lock = threading.Lock()
        self._closed = False

    def _run_chunk(self, px: np.ndarray, pr: np.ndarray, outs: Sequence[str]) -> dict[str, np.ndarray]:
        cudart, ctx = self.cudart, self.context
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        inputs = {"pixels": np.ascontiguousarray(px, dtype=self.dtypes["pixels"]),
                  "text_prototypes": np.ascontiguousarray(pr, dtype=self.dtypes["text_prototypes"])}
        for n, arr in inputs.items():
            if not ctx.set_input_shape(n, arr.shape):
                raise InputError(f"TensorRT rejected input shape {list(arr.shape)} for {n!r}")
        for n in self.tensor_names:
            ctx.set_tensor_address(n, self._buffers[n])
        for n, arr in inputs.items():
            _check(cudart.cudaMemcpyAsync(self._buffers[n], arr.ctypes.data, arr.nbytes, h2d, self.stream),
                   f"cudaMemcpyAsync({n})")
        if not ctx.execute_async_v3(self._stream_handle):
            raise BackendUnavailable("TensorRT execute_async_v3 failed")
        host: dict[str, np.ndarray] = {}
        for n in outs:
            shape = tuple(int(d) for d in ctx.get_tensor_shape(n))
            out = np.empty(shape, dtype=self.dtypes[n])
            _check(cudart.cudaMemcpyAsync(out.ctypes.data, self._buffers[n], out.nbytes, d2h, self.stream),
                   f"cudaMemcpyAsync({n})")
            host[n] = out
        _check(cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        return {n: a.astype(np.float32, copy=False) for n, a in host.items()}

    def run(self, pixels: np.ndarray, prototypes: np.ndarray, outputs: Sequence[str] = DEFAULT_OUTPUTS
            ) -> dict[str, np.ndarray]:
        outs = check_outputs(outputs)
        px, pr = check_inputs(pixels, prototypes)
        if px.shape[2] != self.image_size:
            raise InputError(f"pixels are {px.shape[2]} px but the TensorRT engine expects {self.image_size}")
        if pr.shape[0] > self.max_classes or pr.shape[2] != self.embed_dim:
            raise InputError(f"text_prototypes {list(pr.shape)} exceed the engine profile "
                             f"(max {self.max_classes} classes, D = {self.embed_dim})")
        parts = []
        with self._lock:
            if self._closed:
                raise BackendUnavailable("TensorRT backend is closed")
            for i in range(0, px.shape[0], self.max_batch):
                parts.append(self._run_chunk(px[i:i + self.max_batch], pr, outs))
        if len(parts) == 1:
            return parts[0]
        return {n: np.concatenate([p[n] for p in parts]) for n in outs}

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for ptr in self._buffers.values():
                self.cudart.cudaFree(ptr)
            self._buffers.clear()
            self.cudart.cudaStreamDestroy(self.stream)
            self.context = None
            self.engine = None

    def __del__(self) -> None:  # best effort: free device memory of a forgotten backend
        try:
            if not getattr(self, "_closed", True):
                self.close()
        except Exception:  # noqa: BLE001
            pass
