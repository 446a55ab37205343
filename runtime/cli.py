"""Command line: ``anoclip-infer`` and the ``anoclip`` group (``infer``, ``calibrate``, ``refs``, ``parity``).

Torch-free unless ``--tta`` is given. User errors (bad artifact, unknown class, ...) print one
line and exit 2; images that fail in a batch get an ``error`` JSON line, the rest still run, and
the exit status is 1 when any image failed.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
import numpy as np

from anoclip_core.cli_errors import OneLineCommand, OneLineGroup
from anoclip_core.cli_options import apply_max_pixels, max_pixels_option
from anoclip_core.errors import AnoCLIPError, InputError
from anoclip_core.refbank import DEFAULT_VISUAL_WEIGHT

from .backends import CHOICES
from .contract import CALIBRATION_NAME
from .detector import RANDOM_WEIGHTS_WARNING, Detector, InferConfig, Result
from .inputs import collect_inputs

log = logging.getLogger("anoclip.runtime")


def _fail(err: Exception) -> None:
    click.echo(f"error: {err}", err=True)
    sys.exit(2)


def _finite(obj: Any) -> Any:
    """``obj`` with NaN / infinite floats as null, so the line is strict JSON."""
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _warn_random(det: Detector) -> None:
    if det.random_weights:
        bar = "!" * 78
        click.echo(f"{bar}\n!!! WARNING: {RANDOM_WEIGHTS_WARNING}\n{bar}", err=True)


def _visualize():
    """The overlay and PNG writer (anoclip_core.visualize: torch-free, imported on first use)."""
    from anoclip_core.visualize import heatmap_overlay, save_png

    return heatmap_overlay, save_png


#: Longest side of written overlays: bounds the overlay's memory whatever the image size.
OVERLAY_MAX_SIDE = 2048


def _bounded(path: str, amap: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The image and its map, shrunk (area interpolation) so the long side is <= OVERLAY_MAX_SIDE."""
    import cv2

    from anoclip_core.transform import read_image, to_rgb_float

    img = read_image(path)
    h, w = img.shape[:2]
    f = OVERLAY_MAX_SIDE / max(h, w)
    if f < 1:
        size = (max(2, round(w * f)), max(2, round(h * f)))
        img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
        amap = cv2.resize(np.asarray(amap, np.float32), size, interpolation=cv2.INTER_AREA)
    return to_rgb_float(img, "RGB", name=path), amap


def check_out_dir(out_dir: str) -> None:
    """Fail early (before loading a model) when ``out_dir`` cannot be created or written."""
    p = Path(out_dir)
    if p.exists() and not p.is_dir():
        raise InputError(f"--out {out_dir} exists and is not a folder")
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".anoclip-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise InputError(f"--out {out_dir} is not writable: {err.strerror or err}") from None


class _Writer:
    """JSON lines to stdout or ``out/results.jsonl``; overlays and masks as PNG in ``out``."""

    def __init__(self, cfg: InferConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.out_dir) if cfg.out_dir else None
        self._names: set[str] = set()
        self._fh = None
        if self.out:
            self.out.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.out / "results.jsonl", "w", encoding="utf-8")
            if cfg.overlays or cfg.masks:
                self._overlay, self._save = _visualize()

    def _stem(self, res: Result, i: int) -> str:
        stem = Path(res.path).stem if res.path else f"image{i:05d}"
        name, k = stem, 1
        while name in self._names:
            k += 1
            name = f"{stem}_{k}"
        self._names.add(name)
        return name

    def write(self, res: Result, i: int) -> None:
        d = res.to_json()
        if self.out and res.ok and (self.cfg.overlays or self.cfg.masks):
            stem = self._stem(res, i)
            if self.cfg.overlays and res.path and res.anomaly_map is not None:
                rgb, amap = _bounded(res.path, res.anomaly_map)
                self._save(self.out / f"{stem}_overlay.png", self._overlay(rgb, amap, self.cfg.alpha))
                d["overlay"] = f"{stem}_overlay.png"
            if self.cfg.masks:
                import cv2

                cv2.imwrite(str(self.out / f"{stem}_mask.png"), res.mask())
                d["mask"] = f"{stem}_mask.png"
        line = json.dumps(d, allow_nan=False)
        if self._fh:
            self._fh.write(line + "\n")
            self._fh.flush()
        else:
            click.echo(line)

    def close(self) -> None:
        if self._fh:
            self._fh.close()


def run_infer(artifact: str, inputs: Sequence[str], cfg: InferConfig, progress: bool = True) -> dict[str, Any]:
    """Library entry of the CLI: returns the summary dict (also printed to stderr)."""
    from anoclip_core.progress import progress as progress_bar

    if cfg.out_dir:
        check_out_dir(cfg.out_dir)
    files = collect_inputs(inputs)
    det = Detector.load(artifact, backend=cfg.backend, precision=cfg.precision, verify=cfg.verify,
                        threads=cfg.threads, streams=cfg.streams)
    det.prototypes(cfg.class_name)
    few = det.fewshot(cfg.class_name, cfg)
    mode = f"few-shot, bank of {few.shots} shot(s) / {few.bank.size} patches" if few else "zero-shot"
    click.echo(f"anoclip: {det.backend_note}; {len(files)} image(s); class {cfg.class_name}; {mode}", err=True)
    _warn_random(det)
    stale = det.calibration_warning(cfg.class_name, cfg) if None in (cfg.threshold, cfg.pixel_threshold) else None
    if stale:
        click.echo(f"warning: {stale}", err=True)
    writer = _Writer(cfg)
    n = anomalies = errors = 0
    latencies: list[float] = []
    t0 = time.perf_counter()
    try:
        bar = progress_bar(total=len(files), desc="anoclip", unit="img", enabled=progress)
        for i, res in enumerate(det.iter_predict(files, cfg.class_name, cfg)):
            n += 1
            if res.ok:
                anomalies += int(res.is_anomaly)
                latencies.append(res.timing.get("total_ms", 0.0))
            else:
                errors += 1
            writer.write(res, i)
            bar.update(1)
        bar.close()
    finally:
        writer.close()
        det.close()
    summary = {
        "summary": True, "count": n, "ok": n - errors, "errors": errors, "anomalies": anomalies,
        "mean_latency_ms": round(float(np.mean(latencies)), 3) if latencies else None,
        "wall_s": round(time.perf_counter() - t0, 3), "backend": det.backend_name,
        "backend_requested": cfg.backend, "backend_note": det.backend_note,  # auto: what it picked and why
        "precision": det.running_precision, "class": cfg.class_name,
        "random_weights": det.random_weights, "references": few is not None, "shots": few.shots if few else 0,
        "visual_weight": few.weight if few else None,
    }
    if cfg.out_dir:
        (Path(cfg.out_dir) / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    click.echo(
        f"anoclip: {n} image(s), {anomalies} anomal{'y' if anomalies == 1 else 'ies'}, {errors} error(s), "
        f"mean latency {summary['mean_latency_ms']} ms/image, backend {det.backend_name}, "
        f"precision {det.running_precision}"
        + (" [RANDOM WEIGHTS]" if det.random_weights else ""), err=True)
    return summary


def _infer_options(f):
    opts = [
        click.argument("artifact", type=click.Path(file_okay=False)),
        click.argument("inputs", nargs=-1, required=True),
        click.option("--class", "class_name", required=True, help="class name (must be in the artifact)"),
        click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
                     help="folder for results.jsonl, summary.json, overlays and masks (default: JSON lines on stdout)"),
        click.option("--batch", type=int, default=8, show_default=True, help="images per backend call"),
        click.option("--tile/--no-tile", default=False, help="tile wide images (line-scan strips)"),
        click.option("--tile-size", type=int, default=None, help="tile side in pixels (default: short side)"),
        click.option("--overlap", type=int, default=None, help="tile overlap in pixels (default: tile // 4)"),
        click.option("--backend", type=click.Choice(CHOICES), default="auto", show_default=True),
        click.option("--precision", default=None, help="graph precision (default: the manifest's default_model)"),
        click.option("--threshold", type=float, default=None,
                     help="image-score threshold (score units; default: calibration, else 0.5)"),
        click.option("--pixel-threshold", type=float, default=None,
                     help="anomaly-map threshold for regions/masks (default: calibration, else 0.5)"),
        click.option("--min-area", type=int, default=1, show_default=True, help="smallest region, in pixels"),
        click.option("--tta/--no-tta", default=False, help="AnoCLIP+ test-time adaptation (needs torch)"),
        click.option("--channel-order", type=click.Choice(["RGB", "BGR"]), default="RGB", show_default=True,
                     help="channel order of array inputs (files are decoded as stored)"),
        click.option("--no-overlays", is_flag=True, default=False, help="do not write heat-map overlays"),
        click.option("--no-masks", is_flag=True, default=False, help="do not write binary masks"),
        click.option("--threads", type=int, default=None, help="CPU threads (default: physical cores)"),
        click.option("--streams", type=int, default=1, show_default=True,
                     help="OpenVINO only: infer a batch (or the tiles of a strip) as N parts at once, each on "
                          "threads/N threads; faster for batches and strips, slower for single images"),
        click.option("--no-prefetch", is_flag=True, default=False,
                     help="decode and pre-process on the calling thread only (default: the next batch is "
                          "prepared on a worker while the backend runs; for debugging)"),
        click.option("--no-verify", is_flag=True, default=False, help="skip the sha256 check of artifact files"),
        click.option("--no-refs", is_flag=True, default=False,
                     help="ignore the class's reference bank (pure zero-shot); by default a bank is used when present"),
        click.option("--visual-weight", type=float, default=DEFAULT_VISUAL_WEIGHT, show_default=True,
                     help="weight of the reference bank's visual map in the fused map and score (WinCLIP+: 0.5)"),
        click.option("--quiet", is_flag=True, default=False, help="no progress bar"),
        max_pixels_option,
    ]
    for o in reversed(opts):
        f = o(f)
    return f


@click.command("infer", cls=OneLineCommand)
@_infer_options
def infer_main(artifact: str, inputs: tuple[str, ...], class_name: str, out_dir: str | None, batch: int, tile: bool,
               tile_size: int | None, overlap: int | None, backend: str, precision: str | None,
               threshold: float | None, pixel_threshold: float | None, min_area: int, tta: bool, channel_order: str,
               no_overlays: bool, no_masks: bool, threads: int | None, streams: int, no_prefetch: bool,
               no_verify: bool, no_refs: bool, visual_weight: float, quiet: bool, max_pixels: int | None) -> None:
    """Run anomaly detection on image files, folders or globs (INPUTS) with an exported ARTIFACT."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        apply_max_pixels(max_pixels)
        cfg = InferConfig(class_name=class_name, backend=backend, precision=precision, batch=batch, tile=tile,
                          tile_size=tile_size, overlap=overlap, threshold=threshold, pixel_threshold=pixel_threshold,
                          min_area=min_area, tta=tta, channel_order=channel_order, out_dir=out_dir,
                          overlays=not no_overlays, masks=not no_masks, threads=threads, streams=streams,
                          verify=not no_verify, prefetch=0 if no_prefetch else 1, use_refs=not no_refs,
                          visual_weight=visual_weight)
        summary = run_infer(artifact, inputs, cfg, progress=not quiet)
    except AnoCLIPError as err:
        _fail(err)
    sys.exit(1 if summary["errors"] else 0)


@click.group(cls=OneLineGroup)
def main() -> None:
    """AnoCLIP torch-free runtime: inference, calibration and backend parity checks."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


main.add_command(infer_main, "infer")


@main.command("calibrate")
@click.argument("artifact", type=click.Path(file_okay=False))
@click.option("--good", "good", multiple=True, required=True, help="folder/glob/file of defect-free images")
@click.option("--class", "class_name", required=True)
@click.option("--quantile", type=float, default=0.99, show_default=True)
@click.option("--backend", type=click.Choice(CHOICES), default="auto", show_default=True)
@click.option("--precision", default=None,
              help="graph precision the thresholds are for: the one you infer with (default: the manifest's "
                   "default_model); thresholds of another graph are ignored at inference")
@click.option("--batch", type=int, default=8, show_default=True)
@click.option("--tile/--no-tile", default=False)
@click.option("--threads", type=int, default=None)
@click.option("--no-refs", is_flag=True, default=False,
              help="calibrate zero-shot scores although the class has a reference bank (for infer --no-refs)")
@click.option("--visual-weight", type=float, default=DEFAULT_VISUAL_WEIGHT, show_default=True,
              help="few-shot weight the thresholds are for (recorded; infer with another weight ignores them)")
@max_pixels_option
@click.option("--quiet", is_flag=True, default=False, help="no progress bar")
def calibrate_cmd(artifact: str, good: tuple[str, ...], class_name: str, quantile: float, backend: str,
                  precision: str | None, batch: int, tile: bool, threads: int | None, no_refs: bool,
                  visual_weight: float, max_pixels: int | None, quiet: bool) -> None:
    """Per-class thresholds from good images -> ARTIFACT/calibration.json (not part of the graph)."""
    from anoclip_core.progress import progress as progress_bar

    from .calibration import calibrate

    try:
        if not 0.0 < quantile <= 1.0:
            raise InputError(f"--quantile must be in (0, 1], got {quantile}")
        apply_max_pixels(max_pixels)
        cfg = InferConfig(class_name=class_name, batch=batch, tile=tile, threads=threads, use_refs=not no_refs,
                          visual_weight=visual_weight)  # checked before loading
        files = collect_inputs(good)
        det = Detector.load(artifact, backend=backend, precision=precision, threads=threads,
                            calibration=False)  # rewritten below
        _warn_random(det)
        bar = progress_bar(total=len(files), desc="anoclip calibrate", unit="img", enabled=not quiet)
        entry = calibrate(det, files, class_name, quantile, cfg, progress=lambda _res: bar.update(1))
        bar.close()
    except AnoCLIPError as err:
        _fail(err)
    for e in entry.pop("errors"):
        click.echo(f"skipped {e}", err=True)
    click.echo(json.dumps({"class": class_name, "calibration": str(Path(artifact) / CALIBRATION_NAME), **entry},
                          allow_nan=False))


@main.command("refs")
@click.argument("artifact", type=click.Path(file_okay=False))
@click.option("--class", "class_name", required=True, help="class the bank is for (must be in the artifact)")
@click.option("--good", "good", required=True, type=click.Path(),
              help="folder of defect-free images (sub-folders too, as infer and calibrate list a folder)")
@click.option("--shots", type=int, default=None, help="use K images drawn with --seed (default: all)")
@click.option("--coreset", type=int, default=None, help="bound the bank to N patches (PatchCore greedy coreset)")
@click.option("--seed", type=int, default=0, show_default=True, help="seed of the shot draw and the coreset start")
@click.option("--replace", is_flag=True, default=False,
              help="replace the class's bank instead of adding to it (also repairs a damaged bank)")
@click.option("--backend", type=click.Choice(CHOICES), default="auto", show_default=True)
@click.option("--batch", type=int, default=8, show_default=True)
@click.option("--threads", type=int, default=None)
@max_pixels_option
@click.option("--quiet", is_flag=True, default=False, help="no progress bar")
def refs_cmd(artifact: str, class_name: str, good: str, shots: int | None, coreset: int | None, seed: int,
             replace: bool, backend: str, batch: int, threads: int | None, max_pixels: int | None,
             quiet: bool) -> None:
    """Encode good images with ARTIFACT's own graph into the class's few-shot reference bank (refs/ in ARTIFACT).

    Adds to the existing bank unless --replace; the graph is not re-exported. Inference uses the bank
    automatically (anoclip infer --no-refs turns it off)."""
    from anoclip_core.progress import progress as progress_bar

    from .refs import build_bank, write_bank

    try:
        if batch < 1:
            raise InputError(f"--batch must be >= 1, got {batch}")
        if seed < 0:
            raise InputError(f"--seed must be >= 0, got {seed}")
        if coreset is not None and coreset < 1:
            raise InputError(f"--coreset must be >= 1, got {coreset}")
        apply_max_pixels(max_pixels)
        with Detector.load(artifact, backend=backend, threads=threads) as det:
            _warn_random(det)
            bar = progress_bar(desc="anoclip refs", unit="img", enabled=not quiet)
            bank = build_bank(det, class_name, good, shots, coreset, seed, replace, batch, bar)
            bar.close()
        entry = write_bank(artifact, class_name, bank, merge=not replace, coreset=coreset, seed=seed)
    except AnoCLIPError as err:
        _fail(err)
    click.echo(json.dumps({"class": class_name, **entry}))


@main.command("parity")
@click.argument("artifact", type=click.Path(file_okay=False))
@click.option("--a", "backend_a", type=click.Choice(CHOICES), default="ort-cpu", show_default=True)
@click.option("--b", "backend_b", type=click.Choice(CHOICES), default="auto", show_default=True)
@click.option("--class", "class_name", default=None, help="class whose prototypes to use (default: first)")
@click.option("--batch", type=int, default=2, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def parity_cmd(artifact: str, backend_a: str, backend_b: str, class_name: str | None, batch: int, seed: int) -> None:
    """Compare two backends on the same random inputs (all graph outputs)."""
    from .backends import parity_check

    try:
        if batch < 1:
            raise InputError(f"--batch must be >= 1, got {batch}")
        if seed < 0:
            raise InputError(f"--seed must be >= 0, got {seed}")
        a = Detector.load(artifact, backend=backend_a)
        b = Detector.load(artifact, backend=backend_b, verify=False)
        cls = class_name or a.classes[0]
        s = a.image_size
        px = np.random.default_rng(seed).standard_normal((batch, 3, s, s)).astype(np.float32)
        report = parity_check(a.backend, b.backend, px, a.prototypes(cls))
    except AnoCLIPError as err:
        _fail(err)
    click.echo(str(report), err=True)
    click.echo(json.dumps(_finite(report.to_dict()), allow_nan=False))
    sys.exit(0 if report.passed else 1)
