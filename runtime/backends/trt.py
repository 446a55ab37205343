"""Native TensorRT backend (TensorRT >= 10 name-based tensor API), torch-free.

* The serialized engine (``manifest["tensorrt"]["file"]``, e.g. ``encoder.fp16.plan``) is
  deserialised once; IO tensors are found by name (``pixels``, ``text_prototypes`` and the five
  outputs of docs/ARCHITECTURE.md).
* Two slots, each with its own execution context, CUDA stream, device buffers and PINNED host
  buffers (``cudaMallocHost``), all allocated ONCE for the profile's maximum shapes
  (``get_tensor_profile_shape``) through the torch-free CUDA runtime bindings
  (``cuda.bindings.runtime``, i.e. cuda-python; older ``cuda.cudart`` accepted). No torch.
* A batch larger than the profile maximum runs in chunks that alternate between the slots:
  chunk k+1 is staged into pinned memory and its host->device copy is queued on its own stream
  while chunk k still computes (pageable numpy memory would make every copy synchronous).
  Per chunk: ``set_input_shape``, ``set_tensor_address``, async copies, ``execute_async_v3``
  on the slot's stream (the integer handle ``int(cudaStream_t)``), async device->host copies;
  a slot is synchronised only when it is reused or at the end of the call.
* Errors carry the CUDA error name (``cudaErrorInsufficientDriver`` ...), not "no GPU".

Thread model: an ``IExecutionContext`` and its buffers are NOT thread-safe, so ``run`` and
``close`` are serialised with a lock. The CUDA current device is per HOST THREAD, so both call
``cudaSetDevice(device_id)`` under the lock before any CUDA work: a worker thread of a backend
on GPU 1 launches on GPU 1. For overlap across threads, load several backends.
"""
from __future__ import annotations

import ctypes
import os
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from anoclip_core.errors import ArtifactError, BackendUnavailable, InputError

from ..contract import INPUT_NAMES
from ..contract import OUTPUT_NAMES as ALL_OUTPUTS
from .base import BaseBackend


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
                "backend trt needs the CUDA runtime bindings: pip install 'anoclip[trt]' (cuda-python with the "
                f"CUDA major of your driver and tensorrt wheel); import failed: {err}"
            ) from None
    return cudart


INSUFFICIENT_DRIVER = 35  # cudaErrorInsufficientDriver (driver_types.h)
SLOTS = 2


def cuda_error_name(err: Any) -> str:
    """``cudaErrorInsufficientDriver (35)`` from a cuda-python ``cudaError_t`` (or a bare int)."""
    name = getattr(err, "name", None) or str(err).rsplit(".", 1)[-1]
    return f"{name} ({int(err)})"


def _hint(err: Any) -> str:
    if int(err) == INSUFFICIENT_DRIVER:
        return ("; the NVIDIA driver is older than the CUDA runtime of the installed cuda-python "
                "(cuda-bindings 13 needs a CUDA 13 driver): install the cuda-python of the driver's CUDA major, "
                "e.g. pip install 'cuda-python>=12,<13' for a CUDA 12 driver")
    return ""


def _check(result: Any, what: str) -> Any:
    """cuda-python calls return ``(err, *values)``; raise on error, return the value(s)."""
    if isinstance(result, tuple):
        err, rest = result[0], result[1:]
    else:
        err, rest = result, ()
    if int(err) != 0:
        raise BackendUnavailable(f"CUDA call {what} failed: {cuda_error_name(err)}{_hint(err)}")
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else rest


def probe_gpus(cudart: Any | None = None) -> tuple[int, str]:
    """(number of CUDA devices, why none) -- the real ``cudaError`` when the runtime call fails."""
    try:
        cudart = cudart or import_cudart()
    except BackendUnavailable as err:
        return 0, str(err)
    status, n = cudart.cudaGetDeviceCount()
    if int(status) != 0:
        return 0, f"cudaGetDeviceCount failed: {cuda_error_name(status)}{_hint(status)}"
    return int(n), "" if int(n) else "the CUDA runtime reports 0 devices"


def gpu_count(cudart: Any | None = None) -> int:
    return probe_gpus(cudart)[0]


def stream_handle(stream: Any) -> int:
    """The ``cudaStream_t`` value TensorRT expects: ``int(stream)`` (cuda-python's ``getPtr()`` is the
    address of the handle's storage, not the stream, so it is never used)."""
    try:
        return int(stream)
    except (TypeError, ValueError):
        raise BackendUnavailable(f"cannot convert CUDA stream {stream!r} to its handle (int(stream) failed); "
                                 "use cuda-python >= 12") from None


@dataclass
class _Slot:
    """One execution context + stream + device and pinned host buffers (see module docstring)."""

    context: Any
    stream: Any
    handle: int
    device: dict[str, int] = field(default_factory=dict)
    host: dict[str, int] = field(default_factory=dict)
    pending: tuple[str, ...] | None = None


class TrtBackend(BaseBackend):
    """Native TensorRT engine (see module docstring for the memory and thread model)."""

    name = "trt"

    def __init__(self, plan_path: str | os.PathLike, trt: Any | None = None, cudart: Any | None = None,
                 device_id: int = 0) -> None:
        self.trt = trt or import_trt()
        self.cudart = cudart or import_cudart()
        n, why = probe_gpus(self.cudart)
        if n < 1:
            raise BackendUnavailable(f"backend trt needs an NVIDIA GPU with a working driver: {why}")
        plan_path = os.fspath(plan_path)
        if not os.path.isfile(plan_path):
            raise ArtifactError(f"TensorRT engine file missing: {plan_path}")
        self.device_id = int(device_id)
        self._lock = threading.Lock()
        self._closed = True
        self._slots: list[_Slot] = []
        self._set_device()
        self.engine = self._load_engine(plan_path)
        self._read_profile(plan_path)
        self._closed = False
        for _ in range(SLOTS):
            self._slots.append(self._make_slot())

    def _set_device(self) -> None:
        _check(self.cudart.cudaSetDevice(self.device_id), f"cudaSetDevice({self.device_id})")

    def _load_engine(self, plan_path: str) -> Any:
        self._logger = self.trt.Logger(self.trt.Logger.WARNING)
        self._runtime = self.trt.Runtime(self._logger)
        with open(plan_path, "rb") as f:
            engine = self._runtime.deserialize_cuda_engine(f.read())
        if engine is None:
            raise BackendUnavailable(
                f"TensorRT could not deserialise {plan_path}: built for another TensorRT version or GPU; "
                "rebuild it with anoclip-export on this machine"
            )
        return engine

    def _read_profile(self, plan_path: str) -> None:
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        missing = [n for n in (*INPUT_NAMES, *ALL_OUTPUTS) if n not in names]
        if missing:
            raise ArtifactError(f"TensorRT engine {plan_path} lacks tensors {missing} (has {names})")
        self.tensor_names = names
        self.dtypes = {n: np.dtype(self.trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        _, _, pmax = self.engine.get_tensor_profile_shape(INPUT_NAMES[0], 0)
        _, _, cmax = self.engine.get_tensor_profile_shape(INPUT_NAMES[1], 0)
        self._pmax, self._cmax = tuple(int(d) for d in pmax), tuple(int(d) for d in cmax)
        self.max_batch = self._pmax[0]
        self.max_classes = self._cmax[0]
        self.image_size = self._pmax[2]
        self.embed_dim = self._cmax[2]

    def _make_slot(self) -> _Slot:
        """Context + stream + device buffers + pinned host buffers, sized for the profile maximum."""
        cudart = self.cudart
        context = self.engine.create_execution_context()
        context.set_input_shape(INPUT_NAMES[0], self._pmax)
        context.set_input_shape(INPUT_NAMES[1], self._cmax)
        stream = _check(cudart.cudaStreamCreate(), "cudaStreamCreate")
        slot = _Slot(context, stream, stream_handle(stream))
        self._slots.append(slot)  # registered at once, so close() frees a half-made slot too
        self._nbytes: dict[str, int] = {}
        for n in self.tensor_names:
            shape = tuple(int(d) for d in context.get_tensor_shape(n))
            nbytes = max(int(np.prod(shape)) * self.dtypes[n].itemsize, 1)
            self._nbytes[n] = nbytes
            slot.device[n] = int(_check(cudart.cudaMalloc(nbytes), f"cudaMalloc({n})"))
            slot.host[n] = int(_check(cudart.cudaMallocHost(nbytes), f"cudaMallocHost({n})"))
        self._slots.pop()
        return slot

    @property
    def context(self) -> Any:
        """The first slot's execution context (kept for callers that inspect it)."""
        return self._slots[0].context if self._slots else None

    def _pinned(self, slot: _Slot, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """numpy view of ``shape`` on the slot's pinned host buffer of tensor ``name``."""
        dtype = self.dtypes[name]
        count = int(np.prod(shape))
        raw = (ctypes.c_byte * self._nbytes[name]).from_address(slot.host[name])
        return np.frombuffer(memoryview(raw), dtype=dtype, count=count).reshape(shape)

    def _enqueue(self, slot: _Slot, px: np.ndarray, pr: np.ndarray, outs: Sequence[str]) -> None:
        """Stage inputs in pinned memory and queue copies + execution + output copies on the slot's stream."""
        cudart, ctx = self.cudart, slot.context
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for n, arr in ((INPUT_NAMES[0], px), (INPUT_NAMES[1], pr)):
            if not ctx.set_input_shape(n, arr.shape):
                raise InputError(f"TensorRT rejected input shape {list(arr.shape)} for {n!r}")
            staged = self._pinned(slot, n, arr.shape)
            np.copyto(staged, arr, casting="same_kind")
            _check(cudart.cudaMemcpyAsync(slot.device[n], slot.host[n], staged.nbytes, h2d, slot.stream),
                   f"cudaMemcpyAsync({n})")
        for n in self.tensor_names:
            ctx.set_tensor_address(n, slot.device[n])
        if not ctx.execute_async_v3(slot.handle):
            raise BackendUnavailable("TensorRT execute_async_v3 failed")
        for n in outs:
            nbytes = int(np.prod(tuple(ctx.get_tensor_shape(n)))) * self.dtypes[n].itemsize
            _check(cudart.cudaMemcpyAsync(slot.host[n], slot.device[n], nbytes, d2h, slot.stream),
                   f"cudaMemcpyAsync({n})")
        slot.pending = tuple(outs)

    def _collect(self, slot: _Slot) -> dict[str, np.ndarray]:
        """Wait for the slot's stream and copy its outputs out of pinned memory."""
        _check(self.cudart.cudaStreamSynchronize(slot.stream), "cudaStreamSynchronize")
        outs, slot.pending = slot.pending or (), None
        return {n: self._pinned(slot, n, tuple(int(d) for d in slot.context.get_tensor_shape(n)))
                .astype(np.float32, copy=True) for n in outs}

    def _run_chunks(self, px: np.ndarray, pr: np.ndarray, outs: Sequence[str]) -> list[dict[str, np.ndarray]]:
        """Chunks of ``max_batch`` alternate between the slots; results in input order."""
        parts: list[dict[str, np.ndarray]] = []
        queued: deque[_Slot] = deque()
        for k, start in enumerate(range(0, px.shape[0], self.max_batch)):
            slot = self._slots[k % len(self._slots)]
            if slot.pending is not None:
                parts.append(self._collect(queued.popleft()))
            self._enqueue(slot, px[start:start + self.max_batch], pr, outs)
            queued.append(slot)
        while queued:
            parts.append(self._collect(queued.popleft()))
        return parts

    def run_impl(self, pixels: np.ndarray, prototypes: np.ndarray, outputs: tuple[str, ...]
                 ) -> dict[str, np.ndarray]:
        px, pr, outs = pixels, prototypes, outputs
        if px.shape[2] != self.image_size:
            raise InputError(f"pixels are {px.shape[2]} px but the TensorRT engine expects {self.image_size}")
        if pr.shape[0] > self.max_classes or pr.shape[2] != self.embed_dim:
            raise InputError(f"text_prototypes {list(pr.shape)} exceed the engine profile "
                             f"(max {self.max_classes} classes, D = {self.embed_dim})")
        with self._lock:
            if self._closed:
                raise BackendUnavailable("TensorRT backend is closed")
            self._set_device()  # the current device is per host thread
            try:
                parts = self._run_chunks(px, pr, outs)
            except BaseException:
                self._drain()
                raise
        if len(parts) == 1:
            return parts[0]
        return {n: np.concatenate([p[n] for p in parts]) for n in outs}

    def _drain(self) -> None:
        """After an error: wait for every queued slot so its buffers are free to reuse."""
        for slot in self._slots:
            if slot.pending is not None:
                self.cudart.cudaStreamSynchronize(slot.stream)
                slot.pending = None

    def close(self) -> None:
        with self._lock:
            if self._closed and not self._slots:
                return
            self._closed = True
            self.cudart.cudaSetDevice(self.device_id)  # free on the device that owns the memory
            for slot in self._slots:
                self.cudart.cudaStreamSynchronize(slot.stream)
                for ptr in slot.device.values():
                    self.cudart.cudaFree(ptr)
                for ptr in slot.host.values():
                    self.cudart.cudaFreeHost(ptr)
                self.cudart.cudaStreamDestroy(slot.stream)
            self._slots.clear()
            self.engine = None

    def __del__(self) -> None:  # best effort: free device memory of a forgotten backend
        try:
            if getattr(self, "_slots", None):
                self.close()
        except Exception:  # noqa: BLE001
            pass
