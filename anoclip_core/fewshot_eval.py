"""Few-shot evaluation (``anoclip-eval --shots K --seeds N``), WinCLIP's protocol.

For each seed ``s`` in ``0 .. N - 1`` and each class, K good TRAINING images are drawn with ``s``
(:func:`anoclip_core.refbank.select_shots`), encoded into a reference bank with the model's own
local embeddings (VisA: both crops of each image, as its test protocol sees them), and the test
set is predicted with it. Every metric is reported per seed, and per class and for the class mean
as the mean and the population standard deviation (ddof = 0) over the seeds.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from .datasets import Sample, load_train_good
from .evaluate import (
    METRIC_TITLES,
    REFERENCE_KEYS,
    TABLE_KEYS,
    EvalConfig,
    class_metrics,
    mean_metrics,
    predict_class,
    two_crop_pixels,
)
from .metrics import METRIC_KEYS
from .model import AnoCLIP
from .refbank import FUSION_RULE, ReferenceBank, select_shots

SUMMARY_KEYS = METRIC_KEYS + REFERENCE_KEYS


def class_references(model: AnoCLIP, cfg: EvalConfig, class_name: str, seed: int) -> ReferenceBank:
    """The K-shot bank of one class for one seed."""
    train = load_train_good(cfg.dataset, cfg.root, class_name)
    paths = select_shots(train, cfg.shots, seed, where=f"class {class_name!r} (good training images)")
    names = [Path(p).name for p in paths]
    pixels = two_crop_pixels(model, paths)[0] if cfg.dataset == "visa" else None
    return model.build_references(paths, names, coreset_size=cfg.coreset, seed=seed,
                                  source=f"{cfg.dataset} train, seed {seed}", pixels=pixels)


def run_seed(model: AnoCLIP, cfg: EvalConfig, by_class: dict[str, list[Sample]], seed: int, bar: Any) -> dict[str, Any]:
    """Metrics of every class with the banks drawn with ``seed``."""
    per_class: dict[str, dict[str, Any]] = {}
    banks: dict[str, dict[str, Any]] = {}
    for name, items in by_class.items():
        if bar is not None:
            bar.set_postfix_str(f"{name} {cfg.shots}-shot seed {seed}")
        bank = class_references(model, cfg, name, seed)
        per_class[name] = class_metrics(predict_class(model, items, cfg, bar, references=bank))
        banks[name] = {"images": list(bank.images), "size": bank.size, "patches": bank.patches,
                       "coreset": bank.coreset}
    return {"seed": seed, "references": banks, "classes": per_class, "mean": mean_metrics(per_class)}


def spread(values: list[float]) -> dict[str, float]:
    """Mean and population std (ddof = 0) of the defined (non-NaN) values; NaN when none is."""
    defined = [v for v in values if not math.isnan(v)]
    if not defined:
        return {"mean": math.nan, "std": math.nan}
    return {"mean": float(np.mean(defined)), "std": float(np.std(defined))}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per class and class-mean {metric: {mean, std}} over the seeds' runs."""
    classes = list(runs[0]["classes"])
    return {
        "classes": {c: {k: spread([r["classes"][c][k] for r in runs]) for k in SUMMARY_KEYS} for c in classes},
        "mean": {k: spread([r["mean"][k] for r in runs]) for k in SUMMARY_KEYS},
    }


def run_few_shot(model: AnoCLIP, cfg: EvalConfig, by_class: dict[str, list[Sample]], bar: Any) -> dict[str, Any]:
    """All seeds' runs and their summary (the ``few_shot`` entry of the results)."""
    runs = [run_seed(model, cfg, by_class, seed, bar) for seed in range(cfg.seeds)]
    return {"shots": cfg.shots, "seeds": list(range(cfg.seeds)), "visual_weight": cfg.visual_weight,
            "fusion": FUSION_RULE, "coreset": cfg.coreset, "std": "population (ddof=0) over seeds",
            "runs": runs, **summarize(runs)}


def _cell(stat: dict[str, float]) -> str:
    if math.isnan(stat["mean"]):
        return "n/a"
    return f"{100.0 * stat['mean']:.1f} ± {100.0 * stat['std']:.1f}"


def markdown_section(results: dict[str, Any]) -> list[str]:
    """The few-shot table (mean ± std over seeds, percent) with the zero-shot mean as the last row."""
    fs = results["few_shot"]
    seeds = ", ".join(str(s) for s in fs["seeds"])
    coreset = f", coreset {fs['coreset']} patches" if fs.get("coreset") else ""
    zero = results["mean"]
    lines = [
        "",
        f"{fs['shots']}-shot (reference bank, WinCLIP+ rule, visual weight {fs['visual_weight']}{coreset}): "
        f"mean ± std over seeds {seeds}",
        "",
        "| class | " + " | ".join(METRIC_TITLES[k] for k in TABLE_KEYS) + " |",
        "| --- | " + " | ".join("---:" for _ in TABLE_KEYS) + " |",
    ]
    rows = list(fs["classes"].items()) + [(f"**mean, {fs['shots']}-shot**", fs["mean"])]
    lines += [f"| {name} | " + " | ".join(_cell(r[k]) for k in TABLE_KEYS) + " |" for name, r in rows]
    lines.append("| mean, zero-shot | " + " | ".join(
        "n/a" if math.isnan(zero.get(k, math.nan)) else f"{100.0 * zero[k]:.1f}" for k in TABLE_KEYS) + " |")
    return lines
