"""What this CPU computes fast, read from the operating system (no torch, no engine).

Two facts decide which CPU path is worth taking:

* int8 dot-product instructions (``avx512_vnni``, ``avx_vnni``, ``amx_int8``): without them
  OpenVINO's int8 kernels run slower than its own fp32 ones (measured on an AVX2 EPYC: see
  ``benchmarks/results/cpu-avx2-vitb16plus240-quick``), so ``--backend auto`` leaves OpenVINO out
  for int8 there and ONNX Runtime's int8 kernels (which have an AVX2 path) run instead;
* native bf16 (``avx512_bf16``, ``amx_bf16``): without it there is no bf16 to measure or run.

The flags are the Linux kernel's names in ``/proc/cpuinfo`` on x86. Anywhere else (another OS,
an ARM CPU) the answer is ``None``, "unknown", and callers keep their default behaviour.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
CPUINFO = "/proc/cpuinfo"


@dataclass(frozen=True)
class CpuFeatures:
    """The x86 flags of the CPU; ``flags=None`` when they could not be read."""

    flags: frozenset[str] | None = None
    source: str = "unknown"

    def _any(self, names: tuple[str, ...]) -> bool | None:
        return None if self.flags is None else any(n in self.flags for n in names)

    @property
    def int8_dot(self) -> bool | None:
        """True with VNNI or AMX int8, False without, None when unknown."""
        return self._any(INT8_DOT_FLAGS)

    @property
    def native_bf16(self) -> bool | None:
        """True with AVX512_BF16 or AMX bf16, False without, None when unknown."""
        return self._any(BF16_FLAGS)


def parse_cpuinfo(text: str, source: str = CPUINFO) -> CpuFeatures:
    """The first x86 ``flags`` line of ``/proc/cpuinfo`` text (ARM's ``Features`` lines: unknown)."""
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            return CpuFeatures(frozenset(value.split()), source)
    return CpuFeatures(None, source)


def read_cpu_features(path: str | os.PathLike = CPUINFO) -> CpuFeatures:
    """This machine's ``CpuFeatures`` (unknown when ``path`` cannot be read)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return parse_cpuinfo(fh.read(), os.fspath(path))
    except OSError:
        return CpuFeatures(None, os.fspath(path))
