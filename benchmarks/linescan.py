"""Line-scan strips: one long strip through the runtime tiler, the fastest runtime contender
against the CPU baseline (``ort-cpu-int8``), calls interleaved round by round.

An OpenVINO contender also runs the strip with one stream per physical core (``streams=N``: a
batch of tiles inferred as N parts at once, see ``runtime/backends/openvino.py``), since that is
how a strip is meant to run there; the faster of its variants is the headline, and every variant
is reported. Ratios are medians of per-round ratios, so a burst of load on a shared machine hits
both sides of a pair alike.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .stats import paired_ratio, percentile, summarize, time_interleaved

BASELINE = "ort-cpu-int8"  # the CPU strip figure the fastest contender is compared with
MIN_ROUNDS = 3  # paired ratios need a few rounds even in --quick
GAP_S = 0.1  # idle time before each strip (engine threads spin after a run; see runner.INTERLEAVE_GAP_S)


@dataclass
class StripRunner:
    """One way to run the strip: a contender's detector, with ``streams`` OpenVINO streams."""

    key: str
    backend: str
    streams: int
    detector: Any
    owned: bool = False  # loaded here (closed here), not the contender's own detector

    @property
    def label(self) -> str:
        return self.backend if self.streams == 1 else f"{self.backend} ({self.streams} streams)"


def strip_runners(fastest: Any, baseline: Any | None, cores: int,
                  load: Callable[..., Any] | None = None) -> tuple[list[StripRunner], list[str]]:
    """The fastest contender (plus its ``cores``-stream variant on OpenVINO) and the baseline;
    notes say what could not be loaded."""
    runners = [StripRunner("fastest", fastest.name, 1, fastest.detector)]
    notes: list[str] = []
    det = fastest.detector
    if det.backend_name == "openvino" and cores > 1:
        from anoclip.runtime import Detector

        try:
            streamed = (load or Detector.load)(det.artifact_dir, backend="openvino", precision=det.precision,
                                               verify=False, threads=cores, streams=cores)
            runners.append(StripRunner("fastest_streams", fastest.name, cores, streamed, owned=True))
        except Exception as err:  # noqa: BLE001 - reported in place of the variant
            notes.append(f"{fastest.name} with {cores} streams not run: {type(err).__name__}: {err}")
    if baseline is not None:
        runners.append(StripRunner("baseline", baseline.name, 1, baseline.detector))
    return runners, notes


def no_baseline_reason(fastest: str, contenders: list[Any]) -> str:
    """Why the strip has no ``BASELINE`` figure to be compared with."""
    if fastest == BASELINE:
        return f"the fastest runtime contender is {BASELINE} itself, the baseline: nothing to compare"
    if not any(c.name == BASELINE for c in contenders):
        return f"{BASELINE} did not run in this benchmark (add it to --contenders)"
    return f"{BASELINE} is unavailable here"


def time_strips(runners: list[StripRunner], strip: np.ndarray, class_name: str, rounds: int, batch: int,
                bar: Any = None) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Seconds per strip for every runner, one call each per round in a rotating order after one
    untimed warm-up call each (``stats.time_interleaved``); the last result per runner."""
    last: dict[str, Any] = {}

    def call(r: StripRunner) -> Callable[[], None]:
        def run() -> None:
            last[r.key] = r.detector.predict(strip, class_name, tile=True, batch=batch)
        return run

    times = time_interleaved({r.key: call(r) for r in runners}, rounds, warmup=1, gap_s=GAP_S,
                             on_call=(lambda: bar.update(1)) if bar is not None else None)
    return times, last


def strip_entry(r: StripRunner, samples: list[float], res: Any, size: tuple[int, int], tile: int, overlap: int,
                tiles_expected: int, batch: int) -> dict[str, Any]:
    """The results-dict record of one runner's strips."""
    height, width = size
    med = percentile(samples, 50)
    return {
        "backend": r.backend, "streams": r.streams, "label": r.label,
        "call": "Detector.predict(strip, tile=True)",
        "strip": {"height": height, "width": width}, "tile": tile, "overlap": overlap,
        "tiles_per_strip": int(res.tiles), "tiles_expected": tiles_expected, "tile_batch": batch,
        "repeats": len(samples), "seconds_per_strip": summarize(samples).to_dict(),
        "strips_per_s": 1.0 / med, "megapixels_per_s": height * width / med / 1e6, "tiles_per_s": res.tiles / med,
        "last_strip_timing_ms": dict(res.timing), "map_shape": list(res.anomaly_map.shape),
    }


def measure_linescan(runners: list[StripRunner], strip: np.ndarray, class_name: str, rounds: int, batch: int,
                     bar: Any = None) -> dict[str, Any]:
    """``linescan`` (the fastest contender's best variant), ``linescan_baseline`` and every variant,
    with the paired speed-up of each over the baseline."""
    from anoclip.runtime import tiler

    height, width = strip.shape[:2]
    t, o = tiler.resolve_tile(height, width, None, None)
    expected = len(tiler.axis_layout(height, t, o)) * len(tiler.axis_layout(width, t, o))
    times, last = time_strips(runners, strip, class_name, max(rounds, MIN_ROUNDS), batch, bar)
    entries = {r.key: strip_entry(r, times[r.key], last[r.key], (height, width), t, o, expected, batch)
               for r in runners}
    if "baseline" in times:
        for key, e in entries.items():
            if key != "baseline":
                e["speedup_vs_baseline_paired"] = paired_ratio(times["baseline"], times[key])
    if "fastest_streams" in times:
        entries["fastest_streams"]["speedup_vs_one_stream_paired"] = paired_ratio(times["fastest"],
                                                                               times["fastest_streams"])
    own = [k for k in ("fastest", "fastest_streams") if k in entries]
    best = min(own, key=lambda k: entries[k]["seconds_per_strip"]["p50_ms"])
    out: dict[str, Any] = {"linescan": entries[best], "linescan_variants": [entries[k] for k in own]}
    if "baseline" in entries:
        out["linescan_baseline"] = entries["baseline"]
    return out


def speedup_bound(results: dict[str, Any]) -> dict[str, Any] | None:
    """The most any engine could gain on the baseline's strip on this machine: the strip's tiles at
    the best int8 GEMM rate measured in the run (the fastest rate of any precision on a CPU), with
    pre- and post-processing free. None without a baseline strip, a FLOP count or an int8 peak."""
    base = results.get("linescan_baseline") or {}
    gflops = (results.get("flops") or {}).get("dual_gflops")
    rates = [g["gflops"] for k, g in (results.get("gemm_reduced") or {}).items()
             if k.split("_")[0] == "int8" and g.get("gflops")]
    if "error" in base or not base.get("tiles_per_strip") or not gflops or not rates:
        return None
    peak = max(rates)
    floor_s = base["tiles_per_strip"] * gflops / peak
    base_s = base["seconds_per_strip"]["p50_ms"] / 1000.0
    return {"int8_peak_gops": peak, "gflops_per_tile": gflops, "tiles": base["tiles_per_strip"],
            "min_seconds_per_strip": floor_s, "baseline_seconds_per_strip": base_s,
            "max_speedup_vs_baseline": base_s / floor_s}



def network_split(results: dict[str, Any]) -> dict[str, Any] | None:
    """Each one-stream strip runner's seconds split into its network time (the strip's tiles at the
    contender's own throughput at the tile batch, measured in this run's batch rounds) and the rest
    (pre- and post-processing, and the cores they share with the network), plus the strip ratio the
    two would have with that rest free. None without a baseline strip or the throughputs."""
    rates = {c.get("name"): c.get("throughput") or {} for c in results.get("contenders") or []}
    runners = [e for e in (results.get("linescan_variants") or []) if e.get("streams", 1) == 1]
    base = results.get("linescan_baseline") or {}
    if not runners or "error" in base:
        return None
    split = []
    for e in runners + [base]:
        img_s = (rates.get(e["backend"], {}).get(str(e["tile_batch"])) or {}).get("img_s")
        if not img_s:
            return None
        strip_s = e["seconds_per_strip"]["p50_ms"] / 1000.0
        network_s = e["tiles_per_strip"] / img_s
        split.append({"label": e.get("label", e["backend"]), "tile_batch": e["tile_batch"], "img_per_s": img_s,
                      "strip_s": strip_s, "network_s": network_s, "rest_s": strip_s - network_s})
    return {"runners": split, "network_only_ratio": split[-1]["network_s"] / split[0]["network_s"]}
