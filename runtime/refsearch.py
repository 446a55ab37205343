"""Where the few-shot nearest-neighbour search runs: on the GPU for GPU backends, else on the host.

``make_search(bank, backend_name, artifact_dir, manifest)`` returns ``(search, where)``:

* CPU backends (``ort-cpu``, ``openvino``): ``refbank.visual_anomaly``, chunked BLAS matmuls.
* GPU backends (``ort-cuda``, ``ort-trt``, ``trt``) with the artifact's ``refsearch.onnx``
  (written by the exporter; see ``export/refsearch.py``): ONNX Runtime on the CUDA execution
  provider. The bank is copied to the device ONCE (an ``OrtValue`` bound as the ``references``
  input of every call; its size N is a dynamic dimension, so a grown bank needs no new graph);
  per call only the local embeddings go up and the [B, h, w] result comes back. The CUDA EP
  (not TensorRT's) runs it: TensorRT would build an engine per new N.
* A GPU backend with an artifact exported before the graph existed, or where the CUDA provider
  cannot start: the host search, with a logged note saying why.

Torch-free.
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from anoclip_core.errors import BackendUnavailable
from anoclip_core.refbank import ReferenceBank, visual_anomaly

from . import contract as mf
from .backends.ort import CUDA, select_providers, session_options

log = logging.getLogger("anoclip.runtime")

GPU_BACKENDS = ("ort-cuda", "ort-trt", "trt")
SearchFn = Callable[[np.ndarray], np.ndarray]


@lru_cache(maxsize=1)
def _blas_controller() -> Any:
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # optional: without it the BLAS library keeps its own thread count
        return None
    return ThreadpoolController()


def one_blas_thread() -> Any:
    """A context in which numpy's BLAS runs on one thread (threadpoolctl; a no-op without it)."""
    ctl = _blas_controller()
    return ctl.limit(limits=1, user_api="blas") if ctl is not None else contextlib.nullcontext()


def host_search(bank: ReferenceBank) -> SearchFn:
    """The CPU search: chunked BLAS matmuls (``refbank.visual_anomaly``) on ONE BLAS thread.

    The inference backend's thread pool owns the cores; a multi-threaded BLAS call between two
    graph runs wakes a second pool that fights it (measured on the 2 shared cores here: a 900 x 640
    bank searched by 225 patches, 22 ms with OpenBLAS's threads vs 2.6 ms on one).
    """
    def search(local: np.ndarray) -> np.ndarray:
        with one_blas_thread():
            return visual_anomaly(local, bank.embeddings)

    return search


def _session(path: str, so: Any, providers: list) -> Any:
    import onnxruntime as ort

    return ort.InferenceSession(path, sess_options=so, providers=providers)


def _upload(array: np.ndarray, device_id: int) -> Any:
    import onnxruntime as ort

    return ort.OrtValue.ortvalue_from_numpy(array, "cuda", device_id)


class DeviceSearch:
    """``refsearch.onnx`` on ONNX Runtime's CUDA EP with the bank resident on the device."""

    def __init__(self, graph: str | os.PathLike, bank: ReferenceBank, device_id: int = 0,
                 available: Sequence[str] | None = None, session_factory: Callable[..., Any] | None = None,
                 upload: Callable[[np.ndarray, int], Any] | None = None) -> None:
        self.device_id = int(device_id)
        providers = select_providers("cuda", available, self.device_id)  # BackendUnavailable without CUDA
        try:
            self.session = (session_factory or _session)(os.fspath(graph), session_options("cuda"), providers)
        except Exception as err:  # noqa: BLE001 - ORT raises its own exception types
            raise BackendUnavailable(f"refsearch.onnx failed to start: {type(err).__name__}: {err}") from None
        if CUDA not in list(self.session.get_providers()):
            raise BackendUnavailable("refsearch.onnx: ONNX Runtime fell back to the CPU provider")
        self.references = (upload or _upload)(np.ascontiguousarray(bank.embeddings, np.float32), self.device_id)

    def __call__(self, local: np.ndarray) -> np.ndarray:
        binding = self.session.io_binding()  # one per call: bindings are not shared between threads
        binding.bind_cpu_input("local_embeddings", np.ascontiguousarray(local, np.float32))
        binding.bind_ortvalue_input("references", self.references)
        binding.bind_output("visual_anomaly", "cuda", self.device_id)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]


def make_search(bank: ReferenceBank, backend_name: str, artifact_dir: str | os.PathLike | None,
                manifest: Mapping[str, Any], **opts: Any) -> tuple[SearchFn, str]:
    """The search for ``bank`` on this backend and a few words saying where it runs (module docstring).

    ``opts``: ``device_id``, and for tests ``available_providers``, ``session_factory``, ``upload``.
    """
    if backend_name not in GPU_BACKENDS:
        return host_search(bank), "host (BLAS)"
    graph = mf.refsearch_file(manifest)
    if graph is None or artifact_dir is None:
        log.warning("reference bank: this artifact has no refsearch.onnx (exported before it existed); "
                    "the nearest-neighbour search runs on the host. Re-export to run it on the GPU.")
        return host_search(bank), "host (artifact has no refsearch.onnx)"
    try:
        search = DeviceSearch(Path(artifact_dir) / graph, bank, opts.get("device_id", 0),
                              opts.get("available_providers"), opts.get("session_factory"), opts.get("upload"))
    except BackendUnavailable as err:
        log.warning("reference bank: device search unavailable (%s); searching on the host", err)
        return host_search(bank), f"host ({err})"
    return search, "device (refsearch.onnx, CUDA EP)"
