"""Fakes of cuda-python's runtime bindings and TensorRT's runtime API, for CPU tests of runtime/backends/trt.py.

``FakeCudart`` follows ``cuda.bindings.runtime`` (cuda-python 12.x / 13.x), documented at
https://nvidia.github.io/cuda-python/cuda-bindings/latest/module/runtime.html :

* every call returns a tuple whose first item is a ``cudaError_t``, then the C out-parameters:
  ``cudaGetDeviceCount() -> (err, count)``, ``cudaSetDevice(d) -> (err,)``,
  ``cudaGetDevice() -> (err, device)``, ``cudaMalloc(n) -> (err, devPtr: int)``,
  ``cudaMallocHost(n) -> (err, ptr: int)``, ``cudaFree/cudaFreeHost(p) -> (err,)``,
  ``cudaStreamCreate() -> (err, cudaStream_t)``, ``cudaMemcpyAsync(dst, src, count, kind, stream) -> (err,)``,
  ``cudaStreamSynchronize/cudaStreamDestroy(stream) -> (err,)``;
* ``cudaError_t`` is an enum with ``.name``; values from CUDA's driver_types.h:
  ``cudaSuccess = 0``, ``cudaErrorInsufficientDriver = 35`` ("the installed NVIDIA CUDA driver is
  older than the CUDA runtime library"), ``cudaErrorInvalidDevice = 101``, ``cudaErrorNoDevice = 100``
  (100/101: from the CUDA Runtime API reference, not re-read in a header this session);
* ``cudaStream_t`` supports ``int(stream)`` (the handle value) and ``getPtr()``, which returns
  the address of the object's own storage of the handle -- NOT the stream (cuda-python docs,
  https://nvidia.github.io/cuda-python/cuda-bindings/latest/tips_and_tricks.html: "int(instance_of_CUstream)
  ... returns the address as a Python int, while ... getPtr() returns the pointer to the CUstream
  C object (that is, &CUstream)");
* ``cudaSetDevice`` sets the current device of the calling HOST THREAD (CUDA Runtime API,
  cudaSetDevice: "Sets device as the current device for the calling host thread").

Memory is real host memory (ctypes), so copies and the fake engine compute real numbers;
``cudaMemcpyAsync`` records whether its host side lies in a ``cudaMallocHost`` allocation.
Not modelled (not needed, not confirmed here): asynchronous completion -- copies happen at once.

``FakeTrt``/``FakeEngine``/``FakeContext`` follow the TensorRT >= 10 name-based API
(NVIDIA/TensorRT python/docstrings/infer/pyCoreDoc.h, v10.9.0 and v11.1): ``num_io_tensors``,
``get_tensor_name``, ``get_tensor_dtype``, ``get_tensor_profile_shape(name, profile) -> (min, opt, max)``,
``create_execution_context``, ``set_input_shape -> bool``, ``set_tensor_address``,
``get_tensor_shape``, ``execute_async_v3(stream_handle: int) -> bool``; ``Runtime.deserialize_cuda_engine``
returns None for a plan it cannot load.
"""
from __future__ import annotations

import ctypes
import enum
import threading

import numpy as np


class cudaError_t(enum.IntEnum):  # noqa: N801 - cuda-python's name
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorInsufficientDriver = 35
    cudaErrorNoDevice = 100
    cudaErrorInvalidDevice = 101


class cudaStream_t:  # noqa: N801 - cuda-python's name
    """int(stream) is the handle; getPtr() is where the handle is stored (a different number)."""

    def __init__(self, handle: int) -> None:
        self._storage = ctypes.c_void_p(handle)

    def __int__(self) -> int:
        return int(self._storage.value)

    def getPtr(self) -> int:  # noqa: N802
        return ctypes.addressof(self._storage)


class FakeCudart:
    """cuda.bindings.runtime with ``devices`` GPUs; ``fail`` maps a function name to a cudaError_t."""

    class cudaMemcpyKind:  # noqa: N801
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2

    def __init__(self, devices: int = 1, fail: dict[str, cudaError_t] | None = None) -> None:
        self.devices = devices
        self.fail = fail or {}
        self._tls = threading.local()
        self.mem: dict[int, tuple[ctypes.Array, str]] = {}
        self.freed: list[int] = []
        self.copies: list[tuple[int, bool, int]] = []  # (kind, host side pinned, device)
        self._next_stream = 0x7000

    def _err(self, name: str) -> cudaError_t:
        return self.fail.get(name, cudaError_t.cudaSuccess)

    def current_device(self) -> int:
        return getattr(self._tls, "device", 0)  # a new host thread starts on device 0

    def cudaGetDeviceCount(self):  # noqa: N802
        err = self._err("cudaGetDeviceCount")
        if not err and self.devices == 0:
            err = cudaError_t.cudaErrorNoDevice  # "no CUDA-capable devices were detected"
        return (err, 0 if err else self.devices)

    def cudaSetDevice(self, d: int):  # noqa: N802
        if not 0 <= d < self.devices:
            return (cudaError_t.cudaErrorInvalidDevice,)
        self._tls.device = d
        return (self._err("cudaSetDevice"),)

    def cudaGetDevice(self):  # noqa: N802
        return (cudaError_t.cudaSuccess, self.current_device())

    def _alloc(self, n: int, kind: str) -> int:
        buf = (ctypes.c_byte * n)()
        ptr = ctypes.addressof(buf)
        self.mem[ptr] = (buf, kind)
        return ptr

    def cudaMalloc(self, n: int):  # noqa: N802
        return (cudaError_t.cudaSuccess, self._alloc(n, f"device{self.current_device()}"))

    def cudaMallocHost(self, n: int):  # noqa: N802
        return (cudaError_t.cudaSuccess, self._alloc(n, "pinned"))

    def cudaFree(self, p: int):  # noqa: N802
        self.freed.append(p)
        return (cudaError_t.cudaSuccess,)

    cudaFreeHost = cudaFree

    def cudaStreamCreate(self):  # noqa: N802
        self._next_stream += 0x10
        return (cudaError_t.cudaSuccess, cudaStream_t(self._next_stream))

    def cudaStreamSynchronize(self, s):  # noqa: N802
        return (cudaError_t.cudaSuccess,)

    def cudaStreamDestroy(self, s):  # noqa: N802
        return (cudaError_t.cudaSuccess,)

    def _pinned(self, p: int) -> bool:
        return any(kind == "pinned" and base <= p < base + len(buf) for base, (buf, kind) in self.mem.items())

    def cudaMemcpyAsync(self, dst: int, src: int, n: int, kind: int, stream):  # noqa: N802
        assert isinstance(stream, cudaStream_t)
        host = src if kind == self.cudaMemcpyKind.cudaMemcpyHostToDevice else dst
        self.copies.append((kind, self._pinned(host), self.current_device()))
        ctypes.memmove(dst, src, n)
        return (cudaError_t.cudaSuccess,)


class FakeEngine:
    S, D, G, MAXB, MAXC = 16, 4, 2, 3, 2
    names = ["pixels", "text_prototypes", "global_embedding", "local_embeddings", "local_tokens", "patch_probs",
             "image_scores"]

    def __init__(self, cudart: FakeCudart) -> None:
        self.cudart = cudart
        self.num_io_tensors = len(self.names)
        self.contexts: list[FakeContext] = []
        self.launches: list[tuple[int, int]] = []  # (current device of the launching thread, stream handle)

    def get_tensor_name(self, i: int) -> str:
        return self.names[i]

    def get_tensor_dtype(self, n: str) -> str:
        return "f32"

    def get_tensor_profile_shape(self, n: str, p: int):
        if n == "pixels":
            return (1, 3, self.S, self.S), (2, 3, self.S, self.S), (self.MAXB, 3, self.S, self.S)
        return (1, 2, self.D), (1, 2, self.D), (self.MAXC, 2, self.D)

    def create_execution_context(self) -> FakeContext:
        ctx = FakeContext(self)
        self.contexts.append(ctx)
        return ctx


class FakeContext:
    def __init__(self, engine: FakeEngine) -> None:
        self.e = engine
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addr: dict[str, int] = {}
        self.active = 0

    def set_input_shape(self, n: str, shape) -> bool:
        lo, _, hi = self.e.get_tensor_profile_shape(n, 0)
        ok = all(a <= b <= c for a, b, c in zip(lo, shape, hi, strict=True))
        if ok:
            self.shapes[n] = tuple(shape)
        return ok

    def set_tensor_address(self, n: str, p: int) -> None:
        self.addr[n] = p

    def get_tensor_shape(self, n: str) -> tuple[int, ...]:
        b, c = self.shapes["pixels"][0], self.shapes["text_prototypes"][0]
        g, d = self.e.G, self.e.D
        return {"pixels": self.shapes["pixels"], "text_prototypes": self.shapes["text_prototypes"],
                "global_embedding": (b, d), "local_embeddings": (b, g, g, d), "local_tokens": (b, g, g, d),
                "patch_probs": (b, c, g, g), "image_scores": (b, c)}[n]

    def _arr(self, n: str) -> np.ndarray:
        shape = self.get_tensor_shape(n)
        raw = (ctypes.c_float * int(np.prod(shape))).from_address(self.addr[n])
        return np.frombuffer(raw, np.float32).reshape(shape)

    def execute_async_v3(self, stream_handle: int) -> bool:
        assert isinstance(stream_handle, int)
        self.active += 1
        assert self.active == 1, "IExecutionContext used by two threads at once (not thread-safe)"
        self.e.launches.append((self.e.cudart.current_device(), stream_handle))
        px, pr = self._arr("pixels"), self._arr("text_prototypes")
        self._arr("image_scores")[:] = px.mean(axis=(1, 2, 3))[:, None] + pr.sum(axis=(1, 2))[None, :]
        self._arr("patch_probs")[:] = px[:, :1, :2, :2].mean(axis=1)[:, None]
        self.active -= 1
        return True


class FakeTrt:
    class Logger:
        WARNING = 2

        def __init__(self, level: int) -> None:
            pass

    def __init__(self, engine: FakeEngine | None = None) -> None:
        self.engine = engine

    def Runtime(self, logger):  # noqa: N802 - mirrors tensorrt
        outer = self

        class R:
            def deserialize_cuda_engine(self, data: bytes):
                return None if data == b"bad" else outer.engine

        return R()

    @staticmethod
    def nptype(dtype) -> type:
        return np.float32


class FakeDeviceValue:
    """Stands for an ``onnxruntime.OrtValue`` on a CUDA device (``OrtValue.ortvalue_from_numpy(a, "cuda", id)``)."""

    uploads: list[FakeDeviceValue] = []

    def __init__(self, array: np.ndarray, device_id: int) -> None:
        self.array, self.device_id = np.array(array), device_id
        FakeDeviceValue.uploads.append(self)


class FakeIOBinding:
    """onnxruntime ``IOBinding``: ``bind_cpu_input``, ``bind_ortvalue_input``, ``bind_output(name, device_type,
    device_id)``, ``copy_outputs_to_cpu()`` (onnxruntime.ai/docs/api/python/api_summary.html#iobinding)."""

    def __init__(self, session: FakeCudaOrtSession) -> None:
        self.session, self.inputs, self.outputs, self.results = session, {}, [], []

    def bind_cpu_input(self, name: str, array: np.ndarray) -> None:
        self.inputs[name] = ("cpu", array)

    def bind_ortvalue_input(self, name: str, value: FakeDeviceValue) -> None:
        assert isinstance(value, FakeDeviceValue)
        self.inputs[name] = ("cuda", value)

    def bind_output(self, name: str, device_type: str = "cpu", device_id: int = 0) -> None:
        self.outputs.append((name, device_type, device_id))

    def copy_outputs_to_cpu(self) -> list[np.ndarray]:
        return self.results


class FakeCudaOrtSession:
    """An ``InferenceSession`` that reports ``providers`` (e.g. CUDA first) but computes on the real CPU EP."""

    def __init__(self, path: str, so, providers: list) -> None:
        import onnxruntime as ort

        self.inner = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        self.providers = [p[0] if isinstance(p, tuple) else p for p in providers]
        self.bindings: list[FakeIOBinding] = []

    def get_providers(self) -> list[str]:
        return self.providers

    def io_binding(self) -> FakeIOBinding:
        self.bindings.append(FakeIOBinding(self))
        return self.bindings[-1]

    def run_with_iobinding(self, binding: FakeIOBinding) -> None:
        feeds = {k: (v.array if where == "cuda" else v) for k, (where, v) in binding.inputs.items()}
        binding.results = self.inner.run([name for name, _, _ in binding.outputs], feeds)
