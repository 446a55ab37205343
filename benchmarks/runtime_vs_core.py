"""Per-image CPU latency: torch-free runtime (ONNX Runtime) vs the PyTorch core, same backbone and batch.

Run it by hand (``anoclip-bench`` measures network calls on pre-processed pixels; this one adds the
pre-processing of full-size camera images and the runtime's post-processing at the original size)::

    python -m anoclip.benchmarks.runtime_vs_core --artifact /tmp/art-tiny --model-config tests/configs --batch 8
    python -m anoclip.benchmarks.runtime_vs_core --artifact /tmp/art-b16p --batch 1 --reps 10 --warmup 2

Both sides get the same uint8 images (``--size`` H x W, default 480 x 640) and the same thread
count (``--threads``, default: physical cores). Timed per batch, reported per image (median, mean and
min over ``--reps`` batches after ``--warmup``; the four measurements are interleaved round by round
and the speed-ups are medians of per-round ratios, as in ``anoclip-bench``):

* ``end_to_end``: images -> pre-processing -> network -> maps + scores. Core: ``load_images`` +
  ``forward_tokens`` + ``anomaly_map`` (S x S) + ``state_probs`` (what ``AnoCLIP.predict`` does,
  with the artifact's prototypes so the 924-sentence text encoding is not timed). Runtime:
  ``Detector.predict_batch`` (maps at the ORIGINAL size + defect regions).
* ``network``: the graph / the encoder + scores only, on the same normalised pixels.

The core model is rebuilt from the manifest (backbone, image size, seeded random weights when the
artifact has random weights), so both sides run the same weights.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from anoclip_core.cli_errors import run_tool

from .stats import paired_ratio, summarize, time_interleaved


def _args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", required=True)
    ap.add_argument("--model-config", default=None, help="extra open_clip model configs (tests/configs for tiny)")
    ap.add_argument("--class", dest="class_name", default=None)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--size", default="480x640", help="original image size HxW")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.reps < 1 or args.warmup < 0 or args.batch < 1:
        ap.error("need --reps >= 1, --warmup >= 0 and --batch >= 1")
    return args


def _core_model(manifest: dict, model_config: str | None, threads: int):
    """The PyTorch core with the artifact's backbone, weights, size, dual blocks and temperature."""
    import torch

    from anoclip_core import AnoCLIP

    torch.set_num_threads(threads)
    if model_config:
        import open_clip

        open_clip.add_model_config(model_config)
    pre = manifest["pretrained"]
    weights = None if pre.get("random_weights") else pre.get("source")
    return AnoCLIP.create(manifest["backbone"], pretrained=weights, image_size=manifest["image_size"], cache_dir=None,
                          dual_blocks=manifest.get("dual_blocks"), temperature=manifest["temperature"])


def _contenders(det, model, imgs: list[np.ndarray], cls: str, batch: int) -> dict[str, Callable[[], Any]]:
    """The four timed calls: core and runtime, end to end (decoded image -> map) and network only."""
    import torch
    import torch.nn.functional as F

    from anoclip_core.scores import anomaly_map, state_probs
    from anoclip_core.transform import preprocess

    protos = torch.from_numpy(det.prototypes(cls)[0].copy())
    size = model.image_size
    pixels_np = np.stack([preprocess(im, det.preprocess_config) for im in imgs])
    pixels_t = torch.from_numpy(pixels_np)

    def core_e2e():
        with torch.no_grad():
            g, loc = model.encoder.forward_tokens(model.load_images(imgs))
            maps = anomaly_map(F.normalize(loc.float(), dim=-1), protos, (size, size), model.temperature)
            return maps.numpy(), state_probs(F.normalize(g.float(), dim=-1), protos, model.temperature).numpy()

    def core_net():
        with torch.no_grad():
            g, loc = model.encoder.forward_tokens(pixels_t)
            state_probs(F.normalize(loc, dim=-1), protos, model.temperature)
            state_probs(F.normalize(g, dim=-1), protos, model.temperature)

    def rt_e2e():
        failed = [r.error for r in det.predict_batch(imgs, cls, batch=batch) if not r.ok]
        if failed:
            raise RuntimeError(f"runtime failed on {len(failed)} image(s): {failed[0]}")

    def rt_net():
        det.run_graph(pixels_np, cls, ("patch_probs", "image_scores"))

    return {"core_end_to_end": core_e2e, "runtime_end_to_end": rt_e2e, "core_network": core_net,
            "runtime_network": rt_net}


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    from anoclip.runtime import Detector
    from anoclip.runtime.backends.ort import physical_cores

    threads = args.threads or physical_cores()
    det = Detector.load(args.artifact, backend="ort-cpu", threads=threads)
    m = det.manifest
    cls = args.class_name or det.classes[0]
    h, w = (int(v) for v in args.size.lower().split("x"))
    rng = np.random.default_rng(0)
    imgs = [(rng.random((h, w, 3)) * 255).astype(np.uint8) for _ in range(args.batch)]
    model = _core_model(m, args.model_config, threads)
    fns = _contenders(det, model, imgs, cls, args.batch)
    _, core_scores = fns["core_end_to_end"]()  # same numbers on both sides (sanity, not timed)
    rt_scores = np.array([r.score for r in det.predict_batch(imgs, cls, batch=args.batch)])
    score_diff = float(np.max(np.abs(core_scores - rt_scores)))
    times = time_interleaved(fns, args.reps, args.warmup)
    results = {}
    for name, ts in times.items():
        st = summarize([t / args.batch for t in ts])
        results[name] = {"median_ms_per_image": round(st.p50_ms, 3), "mean_ms_per_image": round(st.mean_ms, 3),
                         "min_ms_per_image": round(st.min_ms, 3)}
    report = {
        "backbone": m["backbone"],
        "image_size": model.image_size,
        "original_size": [h, w],
        "batch": args.batch,
        "reps": args.reps,
        "threads": threads,
        "backend": det.backend_name,
        "random_weights": det.random_weights,
        "max_score_diff_core_vs_runtime": score_diff,
        "cpu": platform.processor() or platform.machine(),
        "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "results": results,
        "speedup_end_to_end": round(paired_ratio(times["core_end_to_end"], times["runtime_end_to_end"]), 2),
        "speedup_network": round(paired_ratio(times["core_network"], times["runtime_network"]), 2),
        "command": " ".join(
            ["python -m anoclip.benchmarks.runtime_vs_core"] + list(sys.argv[1:] if argv is None else argv)
        ),
    }
    print(json.dumps(report, indent=2))
    return 0

if __name__ == "__main__":
    run_tool(main)
