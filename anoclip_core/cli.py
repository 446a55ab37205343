"""``anoclip-eval``: zero-shot evaluation from the command line (see :mod:`anoclip_core.evaluate`)."""
from __future__ import annotations

import sys

import click

from .cli_options import apply_max_pixels, max_pixels_option
from .errors import AnoCLIPError


def _split_classes(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    names = tuple(c.strip() for c in text.split(",") if c.strip())
    if not names:
        raise AnoCLIPError(f"--classes {text!r} names no class (expected a comma-separated list, e.g. bottle,cable)")
    return names


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--dataset", required=True, type=click.Choice(["mvtec", "visa", "folder"], case_sensitive=False),
              help="Dataset layout.")
@click.option("--root", required=True, help="Dataset root folder (VisA: the folder holding split_csv/, or the csv).")
@click.option("--backbone", default="ViT-B-16-plus-240", show_default=True, help="open_clip model name.")
@click.option("--pretrained", default="laion400m_e32", show_default=True,
              help="open_clip pretrained tag, a local weights file, or 'none' for random weights.")
@click.option("--image-size", type=int, default=None, help="Input size S (default: the backbone's).")
@click.option("--tta", is_flag=True, help="AnoCLIP+ test-time adaptation.")
@click.option("--tta-mode", type=click.Choice(["reference", "per-image"]), default="reference", show_default=True,
              help="reference: one AdamW per class carried over its images in dataset order (official code); "
                   "per-image: a fresh AdamW per image (order-free, as the runtime's --tta).")
@click.option("--views/--no-views", default=None,
              help="Average image scores over the 22 reference views [default: on for mvtec, off otherwise].")
@click.option("--classes", default=None, help="Comma-separated class names (default: all).")
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--out", default=None, help="Folder for results.json, results.md and overlays/.")
@click.option("--overlays", type=int, default=3, show_default=True, help="Overlay PNGs per class (with --out).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--model-config", default=None,
              help="Extra open_clip model config (a JSON file or a folder of them) to register.")
@click.option("--text-cache", default="default", show_default=True,
              help="Prompt-embedding cache folder ('default': $ANOCLIP_CACHE or ~/.cache/anoclip/text).")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar.")
@click.option("--shots", type=int, default=None,
              help="Also evaluate few-shot: K good training images per class as a reference bank (WinCLIP protocol).")
@click.option("--seeds", type=int, default=3, show_default=True, help="With --shots: draws (seeds 0..N-1), mean ± std.")
@click.option("--visual-weight", type=float, default=0.5, show_default=True,
              help="With --shots: weight of the visual (bank) part; 0.5 is WinCLIP+'s average.")
@click.option("--coreset", type=int, default=None, help="With --shots: reduce each bank to this many patches.")
@max_pixels_option
def main(
    dataset: str,
    root: str,
    backbone: str,
    pretrained: str,
    image_size: int | None,
    tta: bool,
    tta_mode: str,
    views: bool | None,
    classes: str | None,
    batch_size: int,
    out: str | None,
    overlays: int,
    device: str,
    model_config: str | None,
    text_cache: str,
    progress: bool,
    shots: int | None,
    seeds: int,
    visual_weight: float,
    coreset: int | None,
    max_pixels: int | None,
) -> None:
    """Evaluate AnoCLIP zero-shot (and few-shot with --shots) on MVTec AD, VisA or a folder dataset."""
    try:
        from .evaluate import EvalConfig, evaluate, markdown_table

        apply_max_pixels(max_pixels)
        cfg = EvalConfig(
            dataset=dataset, root=root, backbone=backbone, pretrained=pretrained, image_size=image_size,
            tta=tta, tta_mode=tta_mode, views=views, classes=_split_classes(classes), batch_size=batch_size, out=out,
            overlays=overlays, device=device, model_config=model_config, progress=progress,
            text_cache=None if text_cache.lower() == "none" else text_cache,
            shots=shots, seeds=seeds, visual_weight=visual_weight, coreset=coreset,
        )
        results = evaluate(cfg)
    except AnoCLIPError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)
    click.echo(markdown_table(results), nl=False)
    if out:
        click.echo(f"results written to {out}/results.json and {out}/results.md")


if __name__ == "__main__":
    main()
