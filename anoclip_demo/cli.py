"""``anoclip-demo``: the main job on the embedded sample data, end to end.

Export an artifact for the class "textile" (texture prompts), calibrate thresholds on good
images, run the torch-free runtime on held-out good and defective images, and write JSON lines,
overlays, masks and one contact sheet. The sample data is the PyPI package
``conformal-clip-data`` (MIT): 1000 good and 1000 defective simulated textile images.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np

from anoclip_core.errors import AnoCLIPError

CLASS_NAME = "textile"
DOMAIN = "texture"


@dataclass(frozen=True)
class DemoConfig:
    """Settings of one demo run (one typed object from the CLI down)."""

    backbone: str = "ViT-B-16-plus-240"
    pretrained: str = "laion400m_e32"
    images: int = 4
    calibration_images: int = 16
    out: Path = Path("out/demo")
    backend: str = "auto"
    force_export: bool = False
    model_config: str | None = None
    int8: bool = False  # also export a static int8 graph calibrated on the bundled good images; infer with it

    @property
    def precision(self) -> str | None:
        return "int8" if self.int8 else None


def sample_images(n_test: int, n_calib: int) -> tuple[list[Path], list[Path], list[Path]]:
    """(calibration good, test good, test defective) file lists, deterministic."""
    try:
        import conformal_clip_data as ccd
    except ImportError:
        raise AnoCLIPError(
            "sample data not installed: pip install conformal-clip-data (or pip install -e '.[data]')"
        ) from None
    good = sorted(Path(ccd.nominal_dir()).glob("*.jpg"))
    local = sorted(Path(ccd.local_dir()).glob("*.jpg"))
    glob_ = sorted(Path(ccd.global_dir()).glob("*.jpg"))
    if len(good) < n_test + n_calib or not local or not glob_:
        raise AnoCLIPError(f"sample data under {ccd.data_root()} is incomplete")
    half = max(1, n_test // 2)
    defective = local[:half] + glob_[: max(1, n_test - half)]
    return good[:n_calib], good[n_calib : n_calib + n_test], defective


def _existing_artifact_matches(art: Path, cfg: DemoConfig) -> bool:
    from anoclip.runtime import contract as mf

    try:
        m = mf.read_manifest(art, check_files=False)
    except (AnoCLIPError, OSError):
        return False
    source = str((m.get("pretrained") or {}).get("source", ""))
    wanted = "none" if cfg.pretrained.lower() == "none" else cfg.pretrained
    int8 = (m.get("models", {}).get("int8") or {}).get("quantization", {})
    return m.get("backbone") == cfg.backbone and (source == wanted or source.endswith(wanted)) and CLASS_NAME in (
        m.get("text", {}).get("classes", {})
    ) and (not cfg.int8 or int8.get("mode") == "static")


def contact_sheet(results: list[dict], path: Path, random_weights: bool = False) -> Path | None:
    """One PNG: each test image's overlay with its true group, label and score written on it."""
    import cv2

    from anoclip_core.visualize import save_png

    tiles = []
    for r in results:
        overlay = r.get("overlay")
        if not overlay or not Path(overlay).is_file():
            continue
        img = cv2.cvtColor(cv2.imread(str(overlay)), cv2.COLOR_BGR2RGB)
        img = cv2.resize(img, (256, 256), interpolation=cv2.INTER_AREA)
        text = f"{r['_group']} -> {r.get('label')} {r.get('score', float('nan')):.3f}"
        cv2.rectangle(img, (0, 0), (256, 22), (0, 0, 0), -1)
        cv2.putText(img, text, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
        tiles.append(img)
    if not tiles:
        return None
    cols = min(4, len(tiles))
    rows = (len(tiles) + cols - 1) // cols
    sheet = np.zeros((rows * 256, cols * 256, 3), np.uint8)
    for i, t in enumerate(tiles):
        y, x = divmod(i, cols)
        sheet[y * 256 : (y + 1) * 256, x * 256 : (x + 1) * 256] = t
    if random_weights:
        banner = np.zeros((28, sheet.shape[1], 3), np.uint8)
        banner[:] = (200, 0, 0)
        cv2.putText(banner, "RANDOM WEIGHTS (--pretrained none): scores and maps are NOT meaningful",
                    (6, 19), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1, cv2.LINE_AA)
        sheet = np.concatenate([banner, sheet, banner])
    return save_png(path, sheet)


def run_demo(cfg: DemoConfig) -> dict:
    """Export (or reuse) the artifact, calibrate, infer; returns the summary."""
    from anoclip.export.api import ExportConfig, export_artifact
    from anoclip.runtime.calibration import calibrate
    from anoclip.runtime.cli import run_infer
    from anoclip.runtime.detector import Detector, InferConfig

    calib, good, defective = sample_images(cfg.images, cfg.calibration_images)
    out = Path(cfg.out)
    art = out / "artifact"
    if cfg.force_export or not _existing_artifact_matches(art, cfg):
        click.echo(f"[1/3] exporting {cfg.backbone} ({cfg.pretrained}) for class '{CLASS_NAME}' -> {art}", err=True)
        if cfg.int8:
            click.echo(f"      static int8 calibrated on the {len(calib)} bundled good calibration images", err=True)
        export_artifact(
            ExportConfig(
                backbone=cfg.backbone,
                classes=[CLASS_NAME],
                domains={CLASS_NAME: DOMAIN},
                pretrained=cfg.pretrained,
                out=art,
                force=True,
                model_config=cfg.model_config,
                precisions=["int8"] if cfg.int8 else ["fp32"],
                int8_mode="static" if cfg.int8 else "dynamic",
                calibration_images=[str(p) for p in calib] if cfg.int8 else (),
            )
        )
    else:
        click.echo(f"[1/3] reusing artifact {art} (pass --force-export to rebuild)", err=True)
    click.echo(f"[2/3] calibrating thresholds on {len(calib)} good images", err=True)
    with Detector.load(art, backend=cfg.backend, precision=cfg.precision) as det:
        entry = calibrate(det, [str(p) for p in calib], CLASS_NAME, quantile=0.99)
    click.echo(f"      image threshold {entry['image_threshold']:.4f}, pixel threshold {entry['pixel_threshold']:.4f}",
               err=True)
    results_dir = out / "results"
    summaries = {}
    rows: list[dict] = []
    click.echo(f"[3/3] inference on {len(good)} good and {len(defective)} defective images", err=True)
    for group, files in (("good", good), ("defect", defective)):
        gdir = results_dir / group
        icfg = InferConfig(class_name=CLASS_NAME, backend=cfg.backend, precision=cfg.precision, out_dir=str(gdir))
        summaries[group] = run_infer(str(art), [str(p) for p in files], icfg, progress=True)
        jsonl = gdir / "results.jsonl"
        if jsonl.is_file():
            for line in jsonl.read_text().splitlines():
                rec = json.loads(line)
                if "path" in rec and not rec.get("summary"):
                    rec["_group"] = group
                    if rec.get("overlay"):
                        rec["overlay"] = str(gdir / rec["overlay"])
                    rows.append(rec)
    sheet = contact_sheet(rows, out / "contact_sheet.png", random_weights=cfg.pretrained.lower() == "none")
    summary = {
        "backbone": cfg.backbone,
        "pretrained": cfg.pretrained,
        "artifact": str(art),
        "precision": cfg.precision or "fp32",
        "calibration": {k: entry[k] for k in ("image_threshold", "pixel_threshold", "images")},
        "good": summaries["good"],
        "defect": summaries["defect"],
        "contact_sheet": str(sheet) if sheet else None,
        "random_weights": cfg.pretrained.lower() == "none",
    }
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


@click.command()
@click.option("--backbone", default=DemoConfig.backbone, show_default=True, help="open_clip ViT name")
@click.option("--pretrained", default=DemoConfig.pretrained, show_default=True,
              help="open_clip tag (downloads once, then cached), a local weights file, or 'none' (random weights)")
@click.option("--images", type=int, default=DemoConfig.images, show_default=True, help="test images per group")
@click.option("--calibration-images", type=int, default=DemoConfig.calibration_images, show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=DemoConfig.out, show_default=True)
@click.option("--backend", default="auto", show_default=True, help="auto|ort-cpu|openvino|ort-cuda|ort-trt|trt")
@click.option("--int8", is_flag=True,
              help="also export a static int8 graph calibrated on the bundled good images, and infer with it")
@click.option("--force-export", is_flag=True, help="rebuild the artifact even if a matching one exists")
@click.option("--model-config", default=None, help="extra open_clip model configs (file or folder)")
def main(**kwargs) -> None:
    """Run the whole pipeline (export -> calibrate -> infer) on the bundled textile images."""
    cfg = DemoConfig(**kwargs)
    if cfg.pretrained.lower() == "none":
        click.echo("!" * 78 + "\n!! RANDOM WEIGHTS (--pretrained none): scores and maps below are NOT meaningful;"
                   "\n!! this run checks the pipeline end to end, not detection quality.\n" + "!" * 78, err=True)
    try:
        summary = run_demo(cfg)
    except AnoCLIPError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)
    g, d = summary["good"], summary["defect"]
    click.echo(
        f"demo done: good {g['anomalies']}/{g['count']} flagged, defective {d['anomalies']}/{d['count']} flagged; "
        f"outputs in {cfg.out} (contact sheet: {summary['contact_sheet']})"
        + (" [RANDOM WEIGHTS]" if summary["random_weights"] else "")
    )


if __name__ == "__main__":
    main()
