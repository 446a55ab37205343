"""Cost of the few-shot reference bank: batch-1 latency with banks of 1, 4 and 16 shots and a
10k-patch (coreset-sized) bank against zero-shot, on one runtime backend.

The banks of K shots hold the graph's own ``local_embeddings`` of K synthetic images; the 10k bank
holds 10,000 random unit vectors (the search cost depends only on the bank's N x D, and encoding
the ~45 images a real 10k coreset of ViT-B/16+ needs would dominate the run). Every variant runs
``Detector.predict(image, class)`` end to end (pre-processing, graph, search, fusion, map at the
image size, regions) in interleaved rounds, so load from neighbours hits all variants alike; the
ratio to zero-shot is the median over rounds of the paired per-call ratios.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

SHOTS = (1, 4, 16)
CORESET_SIZE = 10_000
TARGET_SHOTS, TARGET_RATIO = 4, 1.1


def _graph_bank(det: Any, class_name: str, images: list[np.ndarray], seed: int) -> Any:
    from anoclip_core.refbank import ReferenceBank
    from anoclip_core.transform import preprocess

    m = det.manifest
    px = np.stack([preprocess(im, det.preprocess_config) for im in images])
    local = np.concatenate([det.run_graph(px[i : i + 4], class_name, ("local_embeddings",))["local_embeddings"]
                            for i in range(0, len(px), 4)])
    return ReferenceBank(local.reshape(-1, local.shape[-1]), m["backbone"], m["image_size"], tuple(m["patch_grid"]),
                         tuple(f"synthetic_{i}" for i in range(len(images))), f"benchmark seed {seed}")


def _random_bank(det: Any, size: int, seed: int) -> Any:
    from anoclip_core.refbank import ReferenceBank

    m = det.manifest
    x = np.random.default_rng(seed).standard_normal((size, int(m["embed_dim"]))).astype(np.float32)
    return ReferenceBank(x / np.linalg.norm(x, axis=1, keepdims=True), m["backbone"], m["image_size"],
                         tuple(m["patch_grid"]), ("random",), "random unit vectors", size)


def make_variants(det: Any, class_name: str, seed: int, synthetic: Callable[..., list[np.ndarray]]
                  ) -> dict[str, Any]:
    """``{"zero-shot": None, "1-shot": bank, ..., "10k coreset": bank}``."""
    s = det.image_size
    images = synthetic(max(SHOTS), s, s, seed + 11)
    full = _graph_bank(det, class_name, images, seed)
    variants: dict[str, Any] = {"zero-shot": None}
    for k in SHOTS:
        variants[f"{k}-shot"] = full if k == max(SHOTS) else _graph_bank(det, class_name, images[:k], seed)
    variants["10k coreset"] = _random_bank(det, CORESET_SIZE, seed)
    return variants


def measure_fewshot(det: Any, backend: str, class_name: str, image: np.ndarray, variants: dict[str, Any],
                    rounds: int, min_rounds: int, budget_s: float, warmup: int = 1) -> dict[str, Any]:
    """Interleaved batch-1 ``predict`` timings of every variant (see module docstring)."""
    from .runner import INTERLEAVE_GAP_S
    from .stats import paired_ratio, summarize

    saved = det.references
    samples: dict[str, list[float]] = {name: [] for name in variants}

    def call(name: str) -> float:
        bank = variants[name]
        det.references = {class_name: bank} if bank is not None else {}
        time.sleep(INTERLEAVE_GAP_S)  # the previous call's thread pools go idle, as in the contenders' rounds
        t0 = time.perf_counter()
        det.predict(image, class_name, batch=1)
        return time.perf_counter() - t0

    try:
        for name in variants:
            for _ in range(warmup):
                call(name)
        names, t_start = list(variants), time.perf_counter()
        for k in range(rounds):
            for name in names[k % len(names):] + names[: k % len(names)]:
                samples[name].append(call(name))
            if k + 1 >= min_rounds and time.perf_counter() - t_start >= budget_s * len(names):
                break
    finally:
        det.references = saved
    zero = samples["zero-shot"]
    out = {name: {"shots": bank.shots if bank is not None else 0, "bank_size": bank.size if bank is not None else 0,
                  "latency": summarize(samples[name]).to_dict(),
                  "ratio_to_zero_shot": paired_ratio(samples[name], zero)} for name, bank in variants.items()}
    target = out[f"{TARGET_SHOTS}-shot"]["ratio_to_zero_shot"]
    return {
        "backend": backend, "call": "Detector.predict(image, class, batch=1)", "image": list(image.shape[:2]),
        "patch_grid": list(det.manifest["patch_grid"]), "embed_dim": int(det.manifest["embed_dim"]),
        "rounds": len(zero), "variants": out,
        "target": f"{TARGET_SHOTS}-shot latency <= {TARGET_RATIO}x zero-shot",
        "meets_target": bool(target is not None and target <= TARGET_RATIO),
    }
