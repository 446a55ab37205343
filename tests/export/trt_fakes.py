"""A fake ``tensorrt`` builder API (10.x and 11.x) that follows the real headers, for CPU tests.

Every behaviour below is taken from NVIDIA/TensorRT at the tag named (read with git show):

* ``NetworkDefinitionCreationFlag`` -- include/NvInfer.h and python/src/infer/pyCore.cpp:
  v10.9.0: ``kEXPLICIT_BATCH = 0`` (deprecated), ``kSTRONGLY_TYPED = 1``,
  ``kPREFER_JIT_PYTHON_PLUGINS = 2``, ``kPREFER_AOT_PYTHON_PLUGINS = 3``;
  v11.1: ``kSTRONGLY_TYPED = 0`` ("Deprecated in TensorRT 11.0. Strongly typed mode is always
  enabled. This flag is retained for API compatibility but is ignored."),
  ``kPREFER_JIT_PYTHON_PLUGINS = 1``, ``kPREFER_AOT_PYTHON_PLUGINS = 2``; EnumMax = 3.
  11.x Python has no ``EXPLICIT_BATCH``.
* ``BuilderFlag`` -- include/NvInfer.h: v10.9.0 ``kFP16 = 0``, ``kINT8 = 1``, ``kTF32 = 6``,
  ``kBF16 = 17``; v11.1 has no kFP16/kINT8/kBF16 (pyCore.cpp exposes no FP16/BF16 values) and
  keeps ``kTF32 = 6``. TF32: "Allow (but not require) computations on tensors of type
  DataType::kFLOAT to use TF32 ... Enabled by default." (both tags) -> the fake config starts
  with TF32 set; ``set_flag``/``clear_flag``/``get_flag`` as in pyCore.cpp.
* ``IBuilderConfig.set_timing_cache(cache, ignore_mismatch) -> bool`` -- NvInfer.h v11.1
  ``setTimingCache``: "A failure will be reported if the CUDA device property in the provided
  cache is different from current environment ... \\return true if set successfully, false
  otherwise"; python/docstrings/infer/pyCoreDoc.h: returns a bool.
  ``get_timing_cache()`` -- pyCoreDoc.h v11.1: "The timing cache used in current
  IBuilderConfig, or `None` if no timing cache is set." -> None until a set succeeded.
* ``build_serialized_network`` returns None on failure (pyCoreDoc.h ``build_serialized_network``).
* 10.x strongly typed network with ``kFP16`` set: the build fails -- TensorRT 10.6,
  NVIDIA/TensorRT#4253: "IBuilder::buildSerializedNetwork: Error Code 3: API Usage Error (Parameter
  check failed, condition: !config.getFlag(BuilderFlag::kFP16). )". Only kFP16 is observed there;
  kINT8/kBF16 are deprecated "Superseded by strong typing" (NvInfer.h v10.16) but their build-time
  check is not confirmed, so the fake does not refuse them.

NOT confirmed from a source, so kept minimal here: how the real cache blob encodes the device
(the fake uses a ``b"TC|<version>|<gpu>|"`` header of its own) and whether ``create_timing_cache``
itself rejects a foreign blob (the fake accepts it and lets ``set_timing_cache`` return False,
which is the documented failure path).
"""
from __future__ import annotations

import types
from pathlib import Path


def _enum(name: str, values: dict[str, int]) -> type:
    return type(name, (), dict(values))


def fake_tensorrt(version: str, gpu: str = "Fake GPU") -> types.ModuleType:
    """``tensorrt`` module of ``version`` (10.x or 11.x); ``trt.calls`` records the builder calls."""
    major = int(version.split(".")[0])
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.calls = []
    trt.gpu = gpu
    trt.fail_build = False
    if major >= 11:
        net_flags = {"STRONGLY_TYPED": 0, "PREFER_JIT_PYTHON_PLUGINS": 1, "PREFER_AOT_PYTHON_PLUGINS": 2}
        builder_flags = {"DEBUG": 2, "GPU_FALLBACK": 3, "REFIT": 4, "DISABLE_TIMING_CACHE": 5, "TF32": 6}
    else:
        net_flags = {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1, "PREFER_JIT_PYTHON_PLUGINS": 2,
                     "PREFER_AOT_PYTHON_PLUGINS": 3}
        builder_flags = {"FP16": 0, "INT8": 1, "DEBUG": 2, "GPU_FALLBACK": 3, "REFIT": 4,
                         "DISABLE_TIMING_CACHE": 5, "TF32": 6, "BF16": 17}
    trt.NetworkDefinitionCreationFlag = _enum("NetworkDefinitionCreationFlag", net_flags)
    trt.BuilderFlag = _enum("BuilderFlag", builder_flags)
    trt.MemoryPoolType = _enum("MemoryPoolType", {"WORKSPACE": 0})

    class Logger:
        WARNING = 2

        def __init__(self, level: int) -> None:
            self.level = level

    class Input:
        def __init__(self, name: str) -> None:
            self.name = name

    class Network:
        def __init__(self, flags: int) -> None:
            if flags >> len(net_flags):
                raise ValueError(f"invalid NetworkDefinitionCreationFlag bits {flags:#x}")
            self.flags = flags
            self.inputs: list[Input] = []

        @property
        def num_inputs(self) -> int:
            return len(self.inputs)

        def get_input(self, i: int) -> Input:
            return self.inputs[i]

    class Parser:
        num_errors = 0

        def __init__(self, network: Network, logger: Logger) -> None:
            self.network = network

        def parse_from_file(self, path: str) -> bool:
            import onnx

            trt.calls.append(("parse", Path(path).name))
            model = onnx.load(str(path), load_external_data=False)
            self.network.inputs = [Input(i.name) for i in model.graph.input]
            return True

    header = f"TC|{version}|{gpu}|".encode()

    class TimingCache:
        def __init__(self, blob: bytes) -> None:
            blob = bytes(blob)
            self.compatible = not blob or blob.startswith(header)
            self.entries = blob[len(header):] if blob.startswith(header) else b""

        def serialize(self) -> bytes:
            return header + self.entries

    class Profile:
        def set_shape(self, name, lo, opt, hi) -> None:
            trt.calls.append(("shape", name, tuple(lo), tuple(opt), tuple(hi)))

    class Config:
        def __init__(self) -> None:
            self.flags = {builder_flags["TF32"]}  # TF32: "Enabled by default"
            self._cache: TimingCache | None = None

        def set_memory_pool_limit(self, pool: int, size: int) -> None:
            trt.calls.append(("workspace", size))

        def set_flag(self, flag: int) -> None:
            self.flags.add(int(flag))

        def clear_flag(self, flag: int) -> None:
            self.flags.discard(int(flag))

        def get_flag(self, flag: int) -> bool:
            return int(flag) in self.flags

        def add_optimization_profile(self, profile: Profile) -> int:
            trt.calls.append(("profile",))
            return 0

        def create_timing_cache(self, blob: bytes) -> TimingCache:
            trt.calls.append(("cache_in", bytes(blob)))
            return TimingCache(blob)

        def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
            ok = cache.compatible or bool(ignore_mismatch)
            trt.calls.append(("set_cache", bool(ignore_mismatch), ok))
            if ok:
                self._cache = cache
            return ok

        def get_timing_cache(self) -> TimingCache | None:
            return self._cache

    class Builder:
        def __init__(self, logger: Logger) -> None:
            pass

        def create_network(self, flags: int = 0) -> Network:
            trt.calls.append(("network", flags))
            return Network(flags)

        def create_builder_config(self) -> Config:
            return Config()

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def build_serialized_network(self, network: Network, config: Config):
            trt.calls.append(("build", frozenset(config.flags)))
            strongly_typed = major < 11 and network.flags >> net_flags["STRONGLY_TYPED"] & 1
            if trt.fail_build or (strongly_typed and builder_flags["FP16"] in config.flags):
                return None
            if config._cache is not None:
                config._cache.entries += b"+t"
            return b"PLAN-" + version.encode()

    trt.Logger, trt.OnnxParser, trt.Builder = Logger, Parser, Builder
    return trt
