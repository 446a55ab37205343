"""``anoclip-bench``: latency, throughput and fidelity of every contender, with a report."""
from __future__ import annotations

import logging
import os
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

import click

from anoclip_core.cli_errors import OneLineCommand
from anoclip_core.transform import DEFAULT_MAX_IMAGE_PIXELS

from .config import SECTIONS, BenchConfig, ConfigError, default_batch_sizes, parse_batch_sizes, parse_contenders

PROG = "anoclip-bench"


def exact_command(args: list[str], prog: str = PROG) -> str:
    """The command line as typed (shell-quoted): ``anoclip-bench ARGS``."""
    return " ".join([prog] + [shlex.quote(a) for a in args])


#: Largest line-scan strip, in pixels: the runtime's default image limit (``--max-pixels``); a bigger
#: strip would only fail (out of memory) after every other section had run.
MAX_STRIP_PIXELS = DEFAULT_MAX_IMAGE_PIXELS


def _parse_size(text: str) -> tuple[int, int]:
    """'16384x1024' (width x height) -> (height, width); errors name ``--linescan-size``."""
    def bad(why: str) -> click.BadParameter:
        return click.BadParameter(why, param_hint="'--linescan-size'")

    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise bad(f"expected WIDTHxHEIGHT, e.g. 16384x1024, got {text!r}") from None
    if w < 2 or h < 2:
        raise bad(f"line-scan strip sides must be >= 2, got {text!r}")
    if w * h > MAX_STRIP_PIXELS:
        raise bad(f"{text!r} is {w * h:,} pixels, over the {MAX_STRIP_PIXELS:,} a strip may have")
    return h, w


@click.command(
    name=PROG, cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"], "show_default": True}
)
@click.option("--backbone", default="ViT-B-16-plus-240", help="open_clip ViT name.")
@click.option("--pretrained", default="none",
              help="open_clip tag, local weights file, or 'none' (random weights: speed only, flagged in the report).")
@click.option("--image-size", type=int, default=None, help="Input size S (default: the backbone's).")
@click.option("--quick", is_flag=True, help="Minutes on a CPU: few repeats, small budgets, batch sizes 1,2,4.")
@click.option("--batch-sizes", default=None, help="Comma-separated batch sizes [quick: 1,2,4; full: 1,2,4,8,16,32].")
@click.option("--contenders", default="all",
              help="Comma-separated names or groups (all, torch, runtime, cpu, gpu): reference, core, open_clip, "
                   "ort-cpu-fp32, ort-cpu-int8 (dynamic), ort-cpu-int8s (static QDQ), ort-cpu-bf16, ort-cpu-fp16, "
                   "openvino-fp32, openvino-bf16, openvino-int8 (static QDQ), ort-cuda-fp32, ort-cuda-fp16, "
                   "ort-trt-fp32, ort-trt-fp16, trt-fp16.")
@click.option("--skip", "skip", default="", help=f"Comma-separated sections to skip: {', '.join(SECTIONS)}.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Report folder [benchmarks/results/<backbone>-<device>-<quick|full>-<UTC time>].")
@click.option("--model-config", type=click.Path(exists=True, path_type=Path), default=None,
              help="Extra open_clip model config (JSON file or folder) to register first.")
@click.option("--artifact", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Artifact folder for the runtime contenders: reused when it has a manifest.json, else exported "
                   "there (kept). Without it an artifact is exported to a temporary folder and deleted.")
@click.option("--class-name", default="bottle", help="Class whose text prototypes are used.")
@click.option("--device", default="auto", help="Device of the PyTorch contenders: auto, cpu, cuda[:N].")
@click.option("--threads", type=int, default=None, help="CPU threads for torch and ONNX Runtime [torch's default].")
@click.option("--linescan-size", default="16384x1024", help="Line-scan strip WIDTHxHEIGHT.")
@click.option("--seed", type=int, default=0, help="Seed of the synthetic inputs.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@click.pass_context
def bench(ctx, backbone, pretrained, image_size, quick, batch_sizes, contenders, skip, out, model_config, artifact,
         class_name, device, threads, linescan_size, seed, no_progress) -> None:
    """Benchmark AnoCLIP contenders side by side and write report.md, results.json and a PNG plot."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        skipped = tuple(s.strip() for s in skip.split(",") if s.strip())
        bad = [s for s in skipped if s not in SECTIONS]
        if bad:
            raise ConfigError(f"--skip: unknown section(s) {bad}; choose from {', '.join(SECTIONS)}")
        if out is None:
            stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
            out = Path("benchmarks/results") / f"{backbone}-{device}-{'quick' if quick else 'full'}-{stamp}"
        cfg = BenchConfig(
            backbone=backbone,
            pretrained=pretrained,
            image_size=image_size,
            quick=quick,
            batch_sizes=parse_batch_sizes(batch_sizes) if batch_sizes else default_batch_sizes(quick),
            contenders=parse_contenders(contenders),
            sections=tuple(s for s in SECTIONS if s not in skipped),
            out=out,
            model_config=model_config,
            artifact=artifact,
            class_name=class_name,
            device=device,
            threads=threads,
            linescan_size=_parse_size(linescan_size),
            seed=seed,
            command=exact_command(ctx.obj["argv"], ctx.obj["prog"]),
            progress=not no_progress,
        )
    except ConfigError as err:
        raise click.UsageError(str(err)) from None

    from .report import write_report
    from .runner import run_benchmark

    def say(msg: str) -> None:
        click.echo(f"[anoclip-bench {datetime.now().strftime('%H:%M:%S')}] {msg}", err=True)

    try:
        results = run_benchmark(cfg, log_fn=say)
    except Exception as err:  # noqa: BLE001 - one line for the user, the traceback with ANOCLIP_DEBUG=1
        if os.environ.get("ANOCLIP_DEBUG"):
            raise
        raise click.ClickException(f"{type(err).__name__}: {err}") from None
    paths = write_report(results, cfg.out)
    for kind, p in paths.items():
        click.echo(f"{kind}: {p}")


def main(argv: list[str] | None = None, prog: str = PROG, standalone_mode: bool = True):
    """Console entry point (``anoclip-bench``); ``argv`` defaults to ``sys.argv[1:]``.

    The exact command written into the report is ``prog`` plus these arguments.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    return bench.main(args=args, prog_name=prog, standalone_mode=standalone_mode, obj={"argv": args, "prog": prog})


if __name__ == "__main__":  # pragma: no cover
    main()
