"""Text encoding time of one class (924 sentences): full 77-token context vs the causal cut.

Run by hand::

    python -m anoclip.benchmarks.text_encoding --backbone ViT-B-16-plus-240 --reps 3

Both ways encode the same sentences with the same weights and batch size (``TEXT_BATCH``),
interleaved round by round; the speed-up is the median of per-round ratios (as in
``anoclip-bench``). Also reports the largest difference of the per-sentence embeddings and of
the two state prototypes between the ways (the cut is exact up to float rounding).
"""
from __future__ import annotations

import json
import time

import click
import numpy as np

from .stats import paired_ratio


def _encode_all(clip, tokens, fn, batch: int):
    import torch

    with torch.no_grad():
        return torch.cat([fn(clip, tokens[i:i + batch]) for i in range(0, tokens.shape[0], batch)]).float()


def _prototypes(emb):
    import torch.nn.functional as F

    return F.normalize(emb.reshape(2, -1, emb.shape[-1]).mean(1), dim=-1)


@click.command(help=__doc__.splitlines()[0])
@click.option("--backbone", default="ViT-B-16-plus-240", show_default=True)
@click.option("--class-name", default="bottle", show_default=True)
@click.option("--reps", type=click.IntRange(1, 100), default=3, show_default=True)
@click.option("--threads", type=click.IntRange(1, 1024), default=None, help="torch threads (default: torch's)")
@click.option("--model-config", default=None, help="extra open_clip model configs (tests/configs for tiny)")
def main(backbone: str, class_name: str, reps: int, threads: int | None, model_config: str | None) -> None:
    import open_clip
    import torch

    from anoclip_core.model import TEXT_BATCH
    from anoclip_core.prompts import state_sentences
    from anoclip_core.text_tower import can_truncate, encode_text_truncated

    if model_config:
        open_clip.add_model_config(model_config)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    clip = open_clip.create_model(backbone, pretrained=None).eval()
    sents = state_sentences(class_name)
    tokens = open_clip.get_tokenizer(backbone)(list(sents.normal + sents.abnormal))
    ways = {"full": lambda m, t: m.encode_text(t), "cut": encode_text_truncated}
    times: dict[str, list[float]] = {k: [] for k in ways}
    outs = {}
    for r in range(reps):
        for name in (ways if r % 2 == 0 else reversed(list(ways))):
            t0 = time.perf_counter()
            outs[name] = _encode_all(clip, tokens, ways[name], TEXT_BATCH)
            times[name].append(time.perf_counter() - t0)
    diff = float((outs["cut"] - outs["full"]).abs().max())
    proto_diff = float((_prototypes(outs["cut"]) - _prototypes(outs["full"])).abs().max())
    result = {
        "backbone": backbone, "sentences": int(tokens.shape[0]), "threads": torch.get_num_threads(),
        "truncation_applies": can_truncate(clip),
        "longest_needed_tokens": int(tokens.argmax(-1).max()) + 1, "context": int(tokens.shape[1]),
        "full_s_median": float(np.median(times["full"])), "cut_s_median": float(np.median(times["cut"])),
        "speedup_paired": paired_ratio(times["full"], times["cut"]),
        "sentence_max_abs": diff, "prototype_max_abs": proto_diff, "reps": reps,
    }
    click.echo(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
