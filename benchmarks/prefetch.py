"""Pre-processing overlapped with inference: the runtime with prefetch on vs off, same artifact, one run.

Run it by hand (a harness, not a test)::

    python -m anoclip.benchmarks.prefetch --artifact /tmp/art-tiny --batch 8 --images 32
    python -m anoclip.benchmarks.prefetch --artifact /tmp/b16 --batch 8 --images 16 --reps 3 --strip 1024x16384

Two workloads, each timed with ``InferConfig.prefetch`` 1 (the default: the next batch is decoded,
resized and normalised on a worker while the backend runs the current one) and 0 (everything on
the calling thread), calls interleaved round by round in rotating order; the speed-up is the
median of per-round ratios (off / on), as in ``anoclip-bench``:

* ``batch``: ``Detector.predict_batch`` over ``--images`` PNG files of ``--size`` (decoded from
  disk, so decoding is part of the pre-processing), ``--batch`` images per backend call;
* ``strip``: one ``--strip`` H x W uint8 line-scan strip through ``Detector.stream`` (push + flush;
  tile side = strip height, overlap tile // 4, ``--batch`` tiles per backend call).

Before timing, both settings are checked to give the same scores and maps bit for bit.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from anoclip_core.cli_errors import run_tool

from .stats import paired_ratio, summarize, time_interleaved


def _write_images(folder: Path, n: int, h: int, w: int) -> list[str]:
    import cv2

    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        img = cv2.GaussianBlur((rng.random((h, w, 3)) * 255).astype(np.uint8), (5, 5), 0)
        path = folder / f"img{i:03d}.png"
        cv2.imwrite(str(path), img)
        paths.append(str(path))
    return paths


def _strip(h: int, w: int) -> np.ndarray:
    import cv2

    rng = np.random.default_rng(1)
    return cv2.GaussianBlur((rng.random((h, w, 3)) * 255).astype(np.uint8), (9, 9), 0)


def _same(a: list[Any], b: list[Any]) -> bool:
    return len(a) == len(b) and all(
        x.error == y.error
        and x.score == y.score
        and (x.anomaly_map is None or x.anomaly_map.tobytes() == y.anomaly_map.tobytes())
        for x, y in zip(a, b, strict=True)
    )


def _section(times: dict[str, list[float]], per: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, ts in times.items():
        st = summarize(ts)
        out[name] = {"median_ms": round(st.p50_ms, 2), "min_ms": round(st.min_ms, 2),
                     "median_ms_per_item": round(st.p50_ms / per, 3)}
    ratio = paired_ratio(times["prefetch_off"], times["prefetch_on"])
    out["speedup_on_vs_off"] = None if ratio is None else round(ratio, 3)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", required=True)
    ap.add_argument("--class", dest="class_name", default=None)
    ap.add_argument("--backend", default="ort-cpu")
    ap.add_argument("--precision", default=None, help="graph precision (default: the artifact's default model)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--size", default="480x640", help="image size HxW")
    ap.add_argument("--strip", default="1024x16384", help="strip size HxW ('' to skip)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.reps < 1 or args.warmup < 0 or args.batch < 1 or args.images < 1:
        ap.error("need --reps >= 1, --warmup >= 0, --batch >= 1 and --images >= 1")

    from anoclip.runtime import Detector

    det = Detector.load(args.artifact, backend=args.backend, precision=args.precision, threads=args.threads)
    cls = args.class_name or det.classes[0]
    h, w = (int(v) for v in args.size.lower().split("x"))
    report: dict[str, Any] = {"backbone": det.manifest["backbone"], "image_size": det.image_size,
                              "backend": det.backend_name, "batch_size": args.batch, "reps": args.reps,
                              "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        files = _write_images(Path(tmp), args.images, h, w)

        def batch(prefetch: int) -> Callable[[], list[Any]]:
            return lambda: det.predict_batch(files, cls, batch=args.batch, prefetch=prefetch)

        same = _same(batch(0)(), batch(1)())
        times = time_interleaved({"prefetch_on": batch(1), "prefetch_off": batch(0)}, args.reps, args.warmup)
        report["batch"] = {"images": args.images, "size": [h, w], "identical": same, **_section(times, args.images)}
    if args.strip:
        sh, sw = (int(v) for v in args.strip.lower().split("x"))
        strip = _strip(sh, sw)

        def stream(prefetch: int) -> Callable[[], list[Any]]:
            def run() -> list[Any]:
                s = det.stream(cls, batch=args.batch, prefetch=prefetch)
                return s.push(strip) + s.flush()
            return run

        same = _same(stream(0)(), stream(1)())
        times = time_interleaved({"prefetch_on": stream(1), "prefetch_off": stream(0)}, args.reps, args.warmup)
        report["strip"] = {"size": [sh, sw], "identical": same, **_section(times, 1)}
    report["loadavg"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    report["command"] = " ".join(
        ["python -m anoclip.benchmarks.prefetch"] + list(sys.argv[1:] if argv is None else argv)
    )
    det.close()
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    run_tool(main)
