"""``anoclip-export``: write a verified artifact, or add a class to one.

Both forms work (a click Group whose default command is ``export``)::

    anoclip-export --backbone ViT-L-14 --classes bottle,carpet --precision fp16 --out art/
    anoclip-export export --backbone ViT-L-14 ...          (same)
    anoclip-export add-class art/ carpet --domain texture

User errors (``AnoCLIPError``) print ``error: <message>`` on one line and exit 2. SIGTERM is
handled like SIGINT (the export's temp folder is deleted) and exits 143 (``anoclip_core.cli_errors``).
"""
from __future__ import annotations

import functools
import os
import sys
import time
from pathlib import Path

import click

from anoclip.runtime import contract as mf
from anoclip_core.choices import (
    DEFAULT_OPSET,
    DEFAULT_TRT_PROFILE,
    DOMAINS,
    TRT_PRECISIONS,
    Exporter,
    Int8Mode,
    Precision,
    values,
)
from anoclip_core.cli_errors import OneLineGroup
from anoclip_core.cli_options import apply_max_pixels, max_pixels_option
from anoclip_core.errors import AnoCLIPError

DEFAULT_COMMAND = "export"


class DefaultGroup(OneLineGroup):
    """A group that runs ``export`` when the first argument is not a sub-command."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and args[0] not in ("--help", "-h")):
            args = [DEFAULT_COMMAND, *args]
        return super().parse_args(ctx, args)

    def format_usage(self, ctx, formatter) -> None:
        formatter.write_usage(ctx.command_path, "[export] --backbone NAME [OPTIONS] | add-class DIR CLASS [OPTIONS]")


def _user_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except AnoCLIPError as err:
            click.echo(f"error: {str(err).splitlines()[0] if str(err) else type(err).__name__}", err=True)
            sys.exit(2)

    return wrapper


def _text_cache(value: str | None):
    if value is None:
        return "default"
    return None if value.lower() in ("none", "off", "") else value


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@click.group(cls=DefaultGroup, context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Export AnoCLIP to a verified ONNX artifact (default command), or add a class to one."""


@cli.command("export")
@click.option("--backbone", required=True, help="open_clip model name, e.g. ViT-B-16-plus-240, ViT-L-14.")
@click.option(
    "--pretrained",
    default="auto",
    show_default=True,
    help="open_clip tag (openai, laion400m_e32, ...), a local weights file, or 'none' (seeded random weights). "
    "'auto': the paper's tag for ViT-B-16-plus-240, else openai.",
)
@click.option("--image-size", type=int, default=None, help="Input size S (default: the backbone's).")
@click.option("--classes", "classes", default=None, help="Comma-separated class names, e.g. bottle,carpet.")
@click.option("--classes-file", type=click.Path(dir_okay=False), default=None, help="One class per line.")
@click.option("--domain", "domain_opts", multiple=True, metavar=f"CLASS={'|'.join(DOMAINS)}",
              help="Prompt domain of a class (default: MVTec textures 'texture', others 'object'). Repeatable.")
@click.option("--precision", "precisions", multiple=True, metavar="|".join(values(Precision)),
              help="Extra precision(s); repeatable or comma list. fp32 is always written as the reference.")
@click.option("--int8-mode", type=click.Choice(values(Int8Mode)), default=None,
              help="int8: dynamic (no calibration; the default) or static QDQ (calibrated on --calibration-images; "
                   "the default when they are given).")
@click.option("--calibration-images", type=click.Path(exists=True), default=None,
              help="Folder (or file listing paths) of GOOD images of the product, to calibrate the static int8 graph.")
@click.option("--trt", is_flag=True, help="Also build a TensorRT engine (needs tensorrt + a CUDA GPU).")
@click.option("--trt-profile", default=",".join(map(str, DEFAULT_TRT_PROFILE)), show_default=True,
              help="TensorRT batch profile min,opt,max.")
@click.option(
    "--trt-precision",
    type=click.Choice(TRT_PRECISIONS),
    default=None,
    help="TensorRT engine precision [default: the most reduced of --precision]; "
    "bf16 needs no ONNX Runtime bf16 support; int8 builds from the static QDQ graph "
    "(--precision int8 --int8-mode static --calibration-images DIR).",
)
@click.option("--trt-timing-cache", type=click.Path(dir_okay=False), default=None,
              help="TensorRT timing cache file (default ~/.cache/anoclip/trt/timing-<trt>-<gpu>.cache).")
@click.option(
    "--triton", type=click.Path(file_okay=False), default=None, help="Also write a Triton model repository here."
)
@click.option("--triton-name", default="anoclip", show_default=True, help="Triton model name.")
@click.option("--out", default=None, type=click.Path(),
              help="Artifact folder [default: a folder named after the backbone, e.g. ./ViT-L-14].")
@click.option("--force", is_flag=True, help="Replace an existing --out (atomically, only after success).")
@click.option("--model-config", type=click.Path(exists=False), default=None,
              help="Extra open_clip model config JSON file or folder (e.g. tests/configs).")
@click.option("--opset", type=int, default=DEFAULT_OPSET, show_default=True, help="ONNX opset.")
@click.option("--exporter", type=click.Choice(values(Exporter)), default=Exporter.DYNAMO.value, show_default=True,
              help="torch.onnx exporter (see export/onnx_export.py for the measured comparison).")
@click.option(
    "--temperature", type=float, default=1.0, show_default=True, help="Softmax temperature baked into the graph."
)
@click.option(
    "--text-cache",
    default=None,
    help="Text-embedding cache folder ('none' disables; default $ANOCLIP_CACHE or ~/.cache/anoclip/text).",
)
@click.option("--quiet", is_flag=True, help="No progress bars.")
@max_pixels_option
@_user_errors
def export_cmd(backbone, pretrained, image_size, classes, classes_file, domain_opts, precisions, int8_mode,
               calibration_images, trt, trt_profile, trt_precision,
               trt_timing_cache, triton, triton_name, out, force, model_config, opset, exporter, temperature,
               text_cache, quiet, max_pixels) -> None:
    """Export a backbone + classes to a verified artifact folder (the default command)."""
    from . import text
    from .api import ExportConfig, export_artifact
    from .quantize import check_precisions

    apply_max_pixels(max_pixels)  # --calibration-images are decoded with this limit
    if classes and classes_file:
        raise AnoCLIPError("use --classes or --classes-file, not both")
    names = text.read_classes_file(classes_file) if classes_file else text.parse_classes(classes or "")
    domains = {}
    for item in domain_opts:
        if "=" not in item:
            raise AnoCLIPError(f"--domain expects CLASS={'|'.join(DOMAINS)}, got {item!r}")
        k, v = item.split("=", 1)
        domains[k.strip()] = v.strip()
    try:
        profile = tuple(int(v) for v in trt_profile.split(","))
        assert len(profile) == 3 and 1 <= profile[0] <= profile[1] <= profile[2]
    except (ValueError, AssertionError):
        raise AnoCLIPError(f"--trt-profile expects min,opt,max with 1 <= min <= opt <= max, got {trt_profile!r}"
                           ) from None
    if int8_mode and "int8" not in check_precisions(precisions):
        raise AnoCLIPError(f"--int8-mode {int8_mode} chooses how the int8 graph is made: add --precision int8")
    if image_size is not None and image_size < 1:
        raise AnoCLIPError(f"--image-size must be >= 1, got {image_size}")
    cfg = ExportConfig(
        backbone=backbone,
        classes=names,
        pretrained=None if str(pretrained).lower() in ("none", "random") else pretrained,
        image_size=image_size,
        domains=domains,
        precisions=list(precisions),
        int8_mode=int8_mode or ("static" if calibration_images else "dynamic"),
        calibration_images=_image_list(calibration_images),
        out=out,
        force=force,
        opset=opset,
        exporter=exporter,
        temperature=temperature,
        model_config=model_config,
        trt=trt,
        trt_profile=profile,
        trt_precision=trt_precision,
        trt_timing_cache=trt_timing_cache,
        triton=triton,
        triton_model_name=triton_name,
        text_cache=_text_cache(text_cache),
        progress=not quiet,
    )
    t0 = time.time()
    path = export_artifact(cfg)
    _summary(path, time.time() - t0)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def _image_list(path: str | None) -> list[str]:
    if not path:
        return []
    p = Path(path)
    if p.is_dir():
        files = sorted(str(f) for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
    else:
        files = [ln.strip() for ln in p.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    if not files:
        raise AnoCLIPError(f"--calibration-images {path}: no images found")
    return files


def _summary(path: Path, seconds: float) -> None:
    data = mf.read_manifest(path, check_files=False)
    click.echo(f"artifact: {path}  ({seconds:.1f} s)")
    if data["pretrained"]["random_weights"]:
        click.echo("  WARNING: random weights (pretrained.random_weights = true)")
    for name in sorted(data["files"]):
        click.echo(f"  {name:28s} {_human(os.path.getsize(path / name))}")
    for key, entry in data["models"].items():
        v = entry["verification"]
        line = (
            f"  verify {key:5s} map {v['map_max_abs']:.2e} (mean {v['map_mean_abs']:.2e}) "
            f"score {v['score_max_abs']:.2e} "
            f"embedding {v['embedding_max_abs']:.2e}  <= {v['tolerance']['map']:.0e}: ok"
        )
        click.echo(line)
    if data.get("tensorrt"):
        t = data["tensorrt"]
        click.echo(f"  tensorrt {t['file']} ({t['precision']}, TensorRT {t['trt_version']}, {t['gpu']})")
    if data.get("triton"):
        click.echo(f"  triton {data['triton']['repository']}/{data['triton']['model']} ({data['triton']['platform']})")
    if not data["text"]["classes"]:
        click.echo(f"  no classes yet: add one with `anoclip-export add-class {path} bottle`, "
                   f"then run `anoclip-infer {path} IMAGES --class bottle`")


@cli.command("add-class")
@click.argument("artifact", type=click.Path(file_okay=False))
@click.argument("class_name")
@click.option("--domain", type=click.Choice(DOMAINS), default=None,
              help="Prompt domain (default: MVTec textures 'texture', others 'object').")
@click.option(
    "--model-config", type=click.Path(), default=None, help="Extra open_clip model config JSON file or folder."
)
@click.option("--text-cache", default=None, help="Text-embedding cache folder ('none' disables).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@_user_errors
def add_class_cmd(artifact, class_name, domain, model_config, text_cache, quiet) -> None:
    """Encode CLASS_NAME with the artifact's backbone/weights and add it (graphs untouched)."""
    from . import text
    from .api import add_class

    text.check_class_name(class_name)  # before anything is read or loaded
    t0 = time.time()
    add_class(artifact, class_name, domain, text_cache=_text_cache(text_cache), model_config=model_config,
              progress=not quiet)
    data = mf.read_manifest(artifact, check_files=False)
    click.echo(
        f"added {class_name!r} to {artifact} ({time.time() - t0:.1f} s); classes: {', '.join(data['text']['classes'])}"
    )


main = cli

if __name__ == "__main__":  # pragma: no cover
    main()
