"""The benchmark run: contenders, measurements, derived ratios -> one results dict (JSON-ready).

Order of a run: machine + GEMM peak, model load and text prototypes, the analytical FLOP count
(cross-checked with torch's FLOP counter), the PyTorch contenders, AnoCLIP+ (TTA) cost, the
artifact (built with ``export.api`` or reused), the runtime contenders, fidelity against the
fp32 core, the line-scan strip, and a second GEMM peak at the end (the spread of the two says
how noisy the machine was). Every performance claim in the report is a ratio of figures taken
in this one run.
"""
from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import fidelity as fid
from . import flops as fl
from .config import BASELINE, BenchConfig
from .contenders import Contender, runtime_contender, static_int8_artifact, torch_contenders
from .hardware import PeakMemory, load_average, machine_summary, measure_gemm_peak, measure_gemm_peak_ort, versions
from .stats import percentile, plan_repeats, ratio, summarize, throughput, time_calls

log = logging.getLogger("anoclip.bench")

RESULTS_FORMAT = 1
# Idle time before each interleaved call: ONNX Runtime's intra-op threads keep spinning for some
# 20-50 ms after a run (measured here: a torch GEMM right after an ORT call ran ~45% slower, after
# 50 ms it ran at full speed), which would tax whichever contender comes next in the round.
INTERLEAVE_GAP_S = 0.1


def _bar(total: int | None, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, disable=not enabled, dynamic_ncols=True)


def synthetic_images(n: int, height: int, width: int, seed: int = 0) -> list[np.ndarray]:
    """``n`` deterministic RGB uint8 images: a smooth textured surface with a few bright/dark blobs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    out = []
    for _ in range(n):
        fy, fx = rng.uniform(0.01, 0.06, size=2)
        base = 0.5 + 0.2 * np.sin(fy * yy + rng.uniform(0, 6.3)) * np.cos(fx * xx + rng.uniform(0, 6.3))
        img = np.repeat(base[..., None], 3, axis=2) * rng.uniform(0.7, 1.0, size=3)[None, None, :]
        for _ in range(int(rng.integers(1, 4))):
            cy, cx = rng.uniform(0, height), rng.uniform(0, width)
            r = rng.uniform(0.02, 0.08) * min(height, width)
            blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
            img += rng.choice([-0.4, 0.4]) * blob[..., None]
        img += rng.normal(0, 0.02, size=img.shape)
        out.append((np.clip(img, 0, 1) * 255).astype(np.uint8))
    return out


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"--device {device}: torch sees no CUDA device")
    return device


# measurement ----------------------------------------------------------------------------------
def _timed(c: Contender, x: np.ndarray, t: Any) -> float:
    if c.sync:
        c.sync()
    t0 = time.perf_counter()
    c.call(x, t)
    if c.sync:
        c.sync()
    return time.perf_counter() - t0


def prepare_contender(c: Contender, px: np.ndarray, pt: Any, cfg: BenchConfig, cuda_memory: bool = False) -> dict:
    """Sequential per contender: first call (lazy init / engine build), warm-up at batch 1 and one
    warm-up call at every batch size (skipped when its estimated time exceeds ``max_call_s``).

    Peak memory is taken here, where the largest batch first runs. Returns the entry's
    ``first_call_s``, ``warm_s`` ({batch: seconds of the last warm-up call}), ``skipped`` and
    ``memory``.
    """
    plan = cfg.plan
    out: dict[str, Any] = {"warm_s": {}, "skipped": {}}
    time.sleep(INTERLEAVE_GAP_S)  # let the previous contender's thread pool go idle
    with PeakMemory(cuda=cuda_memory) as mem:
        out["first_call_s"] = _timed(c, px[:1], pt[:1])
        warm = out["first_call_s"]
        for _ in range(max(0, plan.warmup - 1)):
            warm = _timed(c, px[:1], pt[:1])
        out["warm_s"]["1"] = warm
        if "throughput" in cfg.sections:
            for b in cfg.batch_sizes:
                if b == 1:
                    continue
                if b > px.shape[0]:
                    out["skipped"][str(b)] = f"only {px.shape[0]} input images"
                    continue
                est = b * out["warm_s"]["1"]
                if est > plan.max_call_s:
                    out["skipped"][str(b)] = f"estimated {est:.0f} s per call > {plan.max_call_s:g} s limit of this effort"
                    continue
                try:
                    out["warm_s"][str(b)] = _timed(c, px[:b], pt[:b])
                except Exception as err:  # noqa: BLE001 - e.g. out of memory at a large batch
                    out["skipped"][str(b)] = f"failed: {type(err).__name__}: {str(err)[:200]}"
                    break
    out["memory"] = mem.to_dict()
    return out


def interleaved_samples(
    contenders: list[Contender],
    x: np.ndarray,
    t: Any,
    estimates: dict[str, float],
    repeats: int,
    budget_s: float,
    min_repeats: int,
    bar=None,
    gap_s: float = INTERLEAVE_GAP_S,
) -> dict[str, list[float]]:
    """Time the contenders in rounds (one call of each per round) so that a noisy neighbour
    slows all of them alike; each stops at ``repeats`` calls or once its ``budget_s`` is spent
    (never before ``min_repeats``). A contender of group ``"probe"`` (the GEMM probe) takes part in
    every round while any other contender is still running. ``estimates`` (seconds per call) only
    size the progress bar. ``gap_s`` of idle time precedes every call (see ``INTERLEAVE_GAP_S``)."""
    samples: dict[str, list[float]] = {c.name: [] for c in contenders}
    spent: dict[str, float] = {c.name: 0.0 for c in contenders}
    active = list(contenders)
    if bar is not None:
        bar.reset(total=sum(plan_repeats(estimates.get(c.name, 0.0), repeats, budget_s, min_repeats)
                            for c in contenders if c.group != "probe"))
    rnd = 0
    while any(c.group != "probe" for c in active):
        k = rnd % len(active)  # rotate the order so no contender always follows the same one
        rnd += 1
        for c in active[k:] + active[:k]:
            if gap_s > 0:
                time.sleep(gap_s)
            dt = _timed(c, x, t)
            samples[c.name].append(dt)
            spent[c.name] += dt
            if c.group == "probe":
                continue
            if bar is not None:
                bar.update(1)
            n = len(samples[c.name])
            if n >= repeats or (n >= min_repeats and spent[c.name] >= budget_s):
                active.remove(c)
    return samples


def gemm_probe(device: str, n: int) -> Contender:
    """An fp32 ``n x n`` matmul timed like a contender, to measure the hardware limit under the same
    load as the contenders (it joins every interleaved round)."""
    import torch

    gen = torch.Generator().manual_seed(1)
    a = torch.randn(n, n, generator=gen).to(device)
    b = torch.randn(n, n, generator=gen).to(device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else None

    def call(px, pt):
        return torch.mm(a, b)

    probe = Contender("_gemm", f"fp32 GEMM {n}x{n}", "probe", device, "fp32", call=call, sync=sync)
    probe.info = {"flops_per_call": 2.0 * n**3, "n": n}
    return probe


def measure_all(cs: list[Contender], px: np.ndarray, pt: Any, cfg: BenchConfig, prepared: dict[str, dict],
                probe: Contender | None = None) -> dict:
    """Latency at batch 1 and throughput at every batch size, interleaved across contenders.

    ``probe`` (see ``gemm_probe``) joins every round; its samples are returned under ``"_probe"``.
    """
    plan = cfg.plan
    res: dict[str, Any] = {c.name: {"latency": None, "throughput": {}} for c in cs}
    res["_probe"] = []
    extra = [probe] if probe is not None else []

    def keep_probe(samples: dict[str, list[float]]) -> None:
        if probe is not None:
            res["_probe"].extend(samples.pop(probe.name))

    bar = _bar(None, "latency b1 (interleaved)", cfg.progress)
    lat = interleaved_samples(cs + extra, px[:1], pt[:1], {c.name: prepared[c.name]["warm_s"]["1"] for c in cs},
                              plan.latency_repeats, plan.latency_budget_s, plan.latency_min_repeats, bar)
    keep_probe(lat)
    for c in cs:
        st = summarize(lat[c.name])
        res[c.name]["latency"] = dict(st.to_dict(), samples_ms=[round(v * 1000, 3) for v in lat[c.name]])
        res[c.name]["throughput"]["1"] = {"img_s": throughput(1, lat[c.name]), "calls": st.n, "p50_ms": st.p50_ms,
                                          "note": "from the batch-1 latency samples"}
    if "throughput" in cfg.sections:
        for b in cfg.batch_sizes:
            if b == 1:
                continue
            key = str(b)
            group = [c for c in cs if key in prepared[c.name]["warm_s"]]
            for c in cs:
                if c not in group:
                    res[c.name]["throughput"][key] = {"skipped": prepared[c.name]["skipped"].get(key, "not run")}
            if not group:
                continue
            bar.set_description(f"batch {b} (interleaved)")
            tp = interleaved_samples(group + extra, px[:b], pt[:b],
                                     {c.name: prepared[c.name]["warm_s"][key] for c in group},
                                     plan.throughput_repeats, plan.throughput_budget_s, plan.throughput_min_repeats,
                                     bar)
            keep_probe(tp)
            for c in group:
                ms = [v * 1000 for v in tp[c.name]]
                res[c.name]["throughput"][key] = {"img_s": throughput(b, tp[c.name]), "calls": len(ms),
                                                  "p50_ms": percentile(ms, 50), "samples_ms": [round(v, 3) for v in ms]}
    bar.close()
    return res


def best_throughput(entry: dict) -> tuple[float | None, str | None]:
    best, at = None, None
    for b, t in (entry.get("throughput") or {}).items():
        v = t.get("img_s")
        if v is not None and (best is None or v > best):
            best, at = v, b
    return best, at


def samples_at(entry: dict | None, batch: str) -> list[float]:
    """Timed call samples (ms) of a contender at a batch size, in round order ([] when none)."""
    if not entry or not entry.get("latency"):
        return []
    if batch == "1":
        return list(entry["latency"].get("samples_ms") or [])
    return list(((entry.get("throughput") or {}).get(batch) or {}).get("samples_ms") or [])


def paired_ratio(a: list[float], b: list[float]) -> float | None:
    """Median over rounds of ``a[k] / b[k]``: calls of the same interleaved round saw the same load.

    Sample k of every contender comes from round k (see ``interleaved_samples``), so pairing by
    index compares calls made seconds apart; a burst of load that hits one round cancels out.
    """
    n = min(len(a), len(b))
    if n == 0:
        return None
    return percentile([a[k] / b[k] for k in range(n) if b[k] > 0], 50)


def derive_ratios(results: dict) -> None:
    """Add per-contender ratios to the baseline (c) and to the measured GEMM peak, in place.

    Ratios between contenders are paired by interleaved round (``paired_ratio``); the ratio of
    the two medians is kept too (``latency_p50_vs_open_clip``).
    """
    entries = {e["name"]: e for e in results["contenders"]}
    base = entries.get(BASELINE)
    base = base if base and base.get("latency") else None
    peak = results["hardware_limit"]["gflops"]
    base_best, _ = best_throughput(base) if base else (None, None)
    for e in results["contenders"]:
        if not e.get("available") or not e.get("latency"):
            continue
        p50 = e["latency"]["p50_ms"]
        gf = e["gflops_per_image"]
        best, at = best_throughput(e)
        r = {
            "latency_vs_open_clip": paired_ratio(samples_at(e, "1"), samples_at(base, "1")),
            "latency_p50_vs_open_clip": ratio(p50, base["latency"]["p50_ms"]) if base else None,
            "achieved_gflops_b1": gf / (p50 / 1000.0),
            "peak_fraction_b1": ratio(gf / (p50 / 1000.0), peak),
            "best_img_s": best,
            "best_batch": int(at) if at else None,
            "achieved_gflops_best": gf * best if best else None,
            "peak_fraction_best": ratio(gf * best, peak) if best else None,
            "throughput_vs_open_clip": {},
        }
        for bs in (e.get("throughput") or {}):
            v = paired_ratio(samples_at(base, bs), samples_at(e, bs))  # time ratio (c)/(x) = img/s ratio
            if v is not None:
                r["throughput_vs_open_clip"][bs] = v
        r["best_throughput_vs_open_clip"] = r["throughput_vs_open_clip"].get(at) if at else None
        if r["best_throughput_vs_open_clip"] is None:
            r["best_throughput_vs_open_clip"] = ratio(best, base_best)
        e["ratios"] = r


def headline(results: dict) -> dict:
    """The few ratios a reader wants first (all from this run, paired by round): see ``report``."""
    entries = {e["name"]: e for e in results.get("contenders", []) if e.get("available") and e.get("latency")}

    def lat(a: str, b: str) -> float | None:
        return paired_ratio(samples_at(entries.get(a), "1"), samples_at(entries.get(b), "1"))

    def tp(a: str, b: str) -> float | None:
        """img/s of ``a`` over ``b`` at ``a``'s best batch (paired), else the ratio of the bests."""
        if a not in entries or b not in entries:
            return None
        best_a, at = best_throughput(entries[a])
        v = paired_ratio(samples_at(entries[b], at), samples_at(entries[a], at)) if at else None
        return v if v is not None else ratio(best_a, best_throughput(entries[b])[0])

    fl = results.get("flops", {})
    out: dict[str, Any] = {
        "reference_over_core_latency": lat("reference", "core"),
        "core_over_open_clip_latency": lat("core", "open_clip"),
        "dual_over_plain_flops": ratio(fl.get("dual_gflops"), fl.get("plain_gflops")),
        "core_peak_fraction_best": (entries.get("core", {}).get("ratios") or {}).get("peak_fraction_best"),
        "runtime": {},
    }
    for name, e in entries.items():
        if e["group"] != "runtime":
            continue
        out["runtime"][name] = {
            "core_over_runtime_latency": lat("core", name),
            "runtime_over_core_throughput": tp(name, "core"),
            "runtime_over_open_clip_throughput": tp(name, "open_clip"),
            "peak_fraction_best": (e.get("ratios") or {}).get("peak_fraction_best"),
        }
    tta = results.get("tta")
    if tta:
        out["tta_over_plain_p50"] = tta.get("overhead_ratio_p50")
        out["tta_overhead_ms_p50"] = tta.get("overhead_ms_p50")
    return out


# artifact -------------------------------------------------------------------------------------
def artifact_precisions(contenders: tuple[str, ...]) -> list[str]:
    """Graphs the runtime contenders need: fp32 always; int8 / fp16 / bf16 when asked for."""
    wanted = {n.rpartition("-")[2] for n in contenders}
    return ["fp32"] + [p for p in ("int8", "fp16", "bf16") if p in wanted]


def build_artifact(cfg: BenchConfig, out_dir: Path, contenders: tuple[str, ...], progress: bool,
                   say: Callable[[str], None] = lambda m: None) -> tuple[Path, dict]:
    """Export an artifact with ``export.api.export_artifact`` -> (folder, info).

    Precisions the exporter refuses here (bf16 without ONNX Runtime bf16 kernels) are left out
    with the reason; a TensorRT engine is built only when a ``trt-*`` contender is asked for and
    TensorRT + a GPU are present (else left out with the reason).
    """
    from export import api, quantize
    from export import trt as trt_mod

    skipped: dict[str, str] = {}
    precisions = artifact_precisions(contenders)
    if "bf16" in precisions:
        ok, why = quantize.bf16_support()
        if not ok:
            precisions.remove("bf16")
            skipped["bf16"] = why
    want_trt = any(n.startswith("trt-") for n in contenders)
    if want_trt:
        try:
            trt_mod.require_tensorrt()
        except Exception as err:  # noqa: BLE001 - BackendUnavailable with a clear reason
            want_trt = False
            skipped["tensorrt"] = str(err)
    ecfg = api.ExportConfig(
        backbone=cfg.backbone,
        classes=(cfg.class_name,),
        pretrained=cfg.pretrained,
        image_size=cfg.image_size,
        precisions=tuple(precisions),
        out=out_dir,
        force=False,  # never replace a folder the user pointed --artifact at
        model_config=cfg.model_config,
        trt=want_trt,
        text_cache=cfg.text_cache,
        progress=progress,
    )
    t0 = time.perf_counter()
    try:
        path = Path(api.export_artifact(ecfg))
    except Exception as err:  # noqa: BLE001 - retry without the optional extras, keep the reason
        if not (want_trt or len(precisions) > 1):
            raise
        say(f"export with {precisions} (TensorRT: {want_trt}) failed ({type(err).__name__}: {err}); retrying fp32 only")
        for p in precisions[1:]:
            skipped[p] = f"export failed: {type(err).__name__}: {str(err)[:200]}"
        if want_trt:
            skipped["tensorrt"] = f"export failed: {type(err).__name__}: {str(err)[:200]}"
        ecfg.precisions, ecfg.trt = ("fp32",), False
        path = Path(api.export_artifact(ecfg))
    info = {"built_in_run": True, "export_s": time.perf_counter() - t0, "precisions": list(ecfg.precisions),
            "tensorrt_requested": bool(ecfg.trt), "skipped": skipped}
    return path, info


def load_artifact(path: Path) -> dict:
    from runtime.manifest import read_manifest

    return read_manifest(path)


def check_artifact_matches(manifest: dict, cfg: BenchConfig, image_size: int, random_weights: bool,
                           weights_source: str | None = None) -> None:
    """Refuse an artifact of another backbone / image size / weights: fidelity would be meaningless."""
    problems = []
    if manifest.get("backbone") != cfg.backbone:
        problems.append(f"backbone {manifest.get('backbone')} != {cfg.backbone}")
    if int(manifest.get("image_size", -1)) != image_size:
        problems.append(f"image size {manifest.get('image_size')} != {image_size}")
    pre = manifest.get("pretrained") or {}
    if bool(pre.get("random_weights", False)) != bool(random_weights):
        problems.append(f"artifact random_weights={pre.get('random_weights')} but the bench model has "
                        f"random_weights={random_weights}")
    elif not random_weights and weights_source and pre.get("source") and pre["source"] != weights_source:
        problems.append(f"artifact weights {pre['source']} != {weights_source}")
    if problems:
        raise RuntimeError("--artifact does not match this benchmark: " + "; ".join(problems))


# sections -------------------------------------------------------------------------------------
def measure_tta(model, px_t, class_name: str, repeats: int, progress: bool, sync=None) -> dict:
    """AnoCLIP+ per-image cost: predict(tta=True) vs predict(tta=False), interleaved, batch 1.

    Also times the adaptation alone (``adapt_tokens`` on the tokens of the same image), which is
    the overhead without the shared forward's noise.
    """
    from anoclip_core.tta import TTAConfig, adapt_tokens

    x = px_t[:1]
    model.predict(x, class_name, tta=True)  # warm-up both paths
    model.predict(x, class_name)
    off, on = [], []
    bar = _bar(2 * repeats, "AnoCLIP+ (TTA) cost", progress)
    for _ in range(repeats):
        for flag, dst in ((False, off), (True, on)):
            if sync:
                sync()
            t0 = time.perf_counter()
            model.predict(x, class_name, tta=flag)
            if sync:
                sync()
            dst.append(time.perf_counter() - t0)
            bar.update(1)
    bar.close()
    states = model.state_embeddings(class_name)
    _, local = model.encode_tokens(x)
    cfg = TTAConfig(temperature=model.temperature)
    adapt = time_calls(lambda: adapt_tokens(local, states.sentences, states.prototypes, cfg), repeats=max(3, repeats),
                       warmup=1, sync=sync)
    s_off, s_on, s_ad = summarize(off), summarize(on), summarize(adapt)
    return {
        "batch": 1,
        "steps": cfg.steps,
        "predict_ms": s_off.to_dict(),
        "predict_tta_ms": s_on.to_dict(),
        "adapt_only_ms": s_ad.to_dict(),
        # paired: the two calls of one round ran back to back under the same load
        "overhead_ms_p50": percentile([(b - a) * 1000 for a, b in zip(off, on)], 50),
        "overhead_ratio_p50": paired_ratio(on, off),
        "overhead_ms_unpaired": s_on.p50_ms - s_off.p50_ms,
        "adapt_fraction_of_predict": ratio(s_ad.p50_ms, s_off.p50_ms),
    }


def measure_fidelity(ref: tuple[np.ndarray, np.ndarray], c: Contender, px: np.ndarray, pt: Any) -> dict:
    maps, scores = c.predict(px, pt)
    return fid.compare(maps, scores, ref[0], ref[1])


def measure_linescan(c: Contender, class_name: str, size: tuple[int, int], repeats: int, seed: int,
                     batch: int, progress: bool) -> dict:
    """Strips per second for one ``height x width`` strip: ``Detector.predict(strip, tile=True)``
    (the runtime tiler: tiles of the strip height, blended, plus defect regions)."""
    from runtime import tiler

    det = c.detector
    height, width = size
    strip = synthetic_images(1, height, width, seed + 7)[0]
    t, o = tiler.resolve_tile(height, width, None, None)
    tiles = len(tiler.axis_layout(height, t, o)) * len(tiler.axis_layout(width, t, o))
    bar = _bar(repeats, f"line-scan {width}x{height} ({c.name}, {tiles} tiles)", progress)
    samples, timing = [], {}
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = det.predict(strip, class_name, tile=True, batch=batch)
        samples.append(time.perf_counter() - t0)
        timing = dict(res.timing)
        bar.update(1)
    bar.close()
    med = percentile(samples, 50)
    return {
        "backend": c.name,
        "call": "Detector.predict(strip, tile=True)",
        "strip": {"height": height, "width": width},
        "tile": t,
        "overlap": o,
        "tiles_per_strip": int(res.tiles),
        "tiles_expected": tiles,
        "tile_batch": batch,
        "repeats": len(samples),
        "seconds_per_strip": summarize(samples).to_dict(),
        "strips_per_s": 1.0 / med,
        "megapixels_per_s": height * width / med / 1e6,
        "tiles_per_s": res.tiles / med,
        "last_strip_timing_ms": timing,
        "map_shape": list(res.anomaly_map.shape),
    }


# the run --------------------------------------------------------------------------------------
def run_benchmark(cfg: BenchConfig, log_fn: Callable[[str], None] | None = None) -> dict:
    """Run everything ``cfg`` asks for; returns the results dict (see ``report.write_report``)."""
    import torch

    say = log_fn or (lambda m: log.info(m))
    plan = cfg.plan
    started = datetime.now(timezone.utc)
    t_run = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    threads = torch.get_num_threads()
    device = resolve_device(cfg.device)
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else None
    if cfg.model_config:
        from anoclip_core import register_model_configs

        register_model_configs(cfg.model_config)

    results: dict[str, Any] = {
        "format": "anoclip-bench",
        "format_version": RESULTS_FORMAT,
        "started": started.isoformat(timespec="seconds"),
        "command": cfg.command,
        "config": cfg.to_dict(),
        "machine": machine_summary(),
        "versions": versions(),
        "threads": {"torch": threads, "onnxruntime_intra_op": cfg.threads or threads},
        "device": device,
        "notes": [],
    }
    say(f"GEMM peak ({device}, fp32, n={plan.gemm_size})")
    g0 = measure_gemm_peak(device, "float32", plan.gemm_size, plan.gemm_repeats)
    results["gemm_start"] = g0.to_dict()
    ort_peaks = []

    def ort_gemm() -> None:
        if cuda:
            return
        try:
            ort_peaks.append(measure_gemm_peak_ort(plan.gemm_size, plan.gemm_repeats, cfg.threads or threads))
        except Exception as err:  # noqa: BLE001 - the torch GEMM still gives a limit
            results["notes"].append(f"ONNX Runtime GEMM peak not measured: {type(err).__name__}: {err}")

    ort_gemm()

    # model and text ------------------------------------------------------------------------
    from anoclip_core import AnoCLIP
    from anoclip_core.prompts import PromptCache, state_sentences

    say(f"loading {cfg.backbone} (pretrained={cfg.pretrained}) on {device}")
    t0 = time.perf_counter()
    model = AnoCLIP.create(cfg.backbone, pretrained=cfg.pretrained, image_size=cfg.image_size, device=device,
                           cache_dir=cfg.text_cache)
    load_s = time.perf_counter() - t0
    size = model.image_size
    domain = state_sentences(cfg.class_name).domain
    key = PromptCache.key(model.backbone, model.weights.cache_id, cfg.class_name, domain)
    text_cached = model.prompt_cache.load(key) is not None
    say("text prototypes" + (" (from cache)" if text_cached else " (encoding 924 sentences once; cached afterwards)"))
    t0 = time.perf_counter()
    states = model.state_embeddings(cfg.class_name)
    text_s = time.perf_counter() - t0
    prototypes = states.prototypes.float().cpu().numpy()
    results["model"] = {
        "backbone": cfg.backbone,
        "pretrained": model.weights.source,
        "random_weights": model.random_weights,
        "image_size": size,
        "patch_grid": list(model.grid_size),
        "embed_dim": model.embed_dim,
        "dual_blocks": model.encoder.dual_blocks,
        "depth": model.encoder.depth,
        "class_name": cfg.class_name,
        "load_s": load_s,
        "text_s": text_s,
        "text_from_cache": text_cached,
        "parameters_m": sum(p.numel() for p in model.clip.visual.parameters()) / 1e6,
    }
    if model.random_weights:
        results["notes"].append("RANDOM WEIGHTS: outputs are not meaningful anomaly scores; speed figures hold, "
                                "fidelity figures compare implementations only")

    # FLOPs ---------------------------------------------------------------------------------
    spec = fl.ViTSpec.from_encoder(model.encoder)
    dual_f, plain_f = fl.vit_flops(spec, True), fl.vit_flops(spec, False)
    flops_info: dict[str, Any] = {
        "spec": spec.to_dict(),
        "dual_gflops": dual_f / 1e9,
        "plain_gflops": plain_f / 1e9,
        "dual_breakdown": fl.flop_breakdown(spec, True),
        "plain_breakdown": fl.flop_breakdown(spec, False),
    }
    try:
        xc = torch.zeros(1, 3, size, size, device=device)
        counted_dual, _ = fl.torch_flops(lambda: model.encoder.forward_tokens(xc))
        counted_plain, _ = fl.torch_flops(lambda: model.clip.encode_image(xc))
        flops_info["counter"] = {
            "tool": "torch.utils.flop_counter.FlopCounterMode",
            "dual": counted_dual,
            "plain": counted_plain,
            "dual_rel_diff": (counted_dual - dual_f) / dual_f,
            "plain_rel_diff": (counted_plain - plain_f) / plain_f,
        }
    except Exception as err:  # noqa: BLE001 - the cross-check must not end a run
        flops_info["counter"] = {"error": f"{type(err).__name__}: {err}"}
    results["flops"] = flops_info

    # inputs --------------------------------------------------------------------------------
    n_inputs = max(max(cfg.batch_sizes), plan.fidelity_images)
    from anoclip_core.transform import preprocess_batch

    images = synthetic_images(n_inputs, size, size, cfg.seed)
    px = np.ascontiguousarray(preprocess_batch(images, model.preprocess_config), dtype=np.float32)
    pt = torch.from_numpy(px)
    results["inputs"] = {"images": n_inputs, "kind": "synthetic textured RGB uint8, seeded", "seed": cfg.seed,
                         "shape": list(px.shape)}

    # contenders ------------------------------------------------------------------------------
    order = [n for n in ("open_clip", "core", "reference") if n in cfg.torch_contenders]
    all_cs: list[Contender] = list(torch_contenders(model, cfg.class_name, tuple(order), load_s))

    tmp_artifact: str | None = None
    runtime_cs: list[Contender] = []
    if cfg.runtime_contenders:
        art_info: dict[str, Any] = {}
        manifest = None
        try:
            if cfg.artifact and (Path(cfg.artifact) / "manifest.json").is_file():
                art_dir = Path(cfg.artifact)
                art_info = {"built_in_run": False, "path": str(art_dir)}
                say(f"reusing artifact {art_dir}")
            else:
                if cfg.artifact:
                    art_dir = Path(cfg.artifact)
                else:
                    # removed at the end of the run, or at interpreter exit if the run fails
                    tmp_obj = tempfile.TemporaryDirectory(prefix="anoclip-bench-artifact-")
                    tmp_artifact = tmp_obj.name
                    art_dir = Path(tmp_artifact) / "artifact"
                say(f"exporting an artifact ({', '.join(artifact_precisions(cfg.runtime_contenders))}) with export.api")
                art_dir, art_info = build_artifact(cfg, art_dir, cfg.runtime_contenders, cfg.progress, say)
                art_info["path"] = str(art_dir) if cfg.artifact else "(temporary, deleted after the run)"
            manifest = load_artifact(art_dir)
            check_artifact_matches(manifest, cfg, size, model.random_weights, model.weights.source)
            art_info["models"] = {k: v.get("file") for k, v in (manifest.get("models") or {}).items()}
            art_info["tensorrt"] = bool(manifest.get("tensorrt"))
            results["artifact"] = art_info
        except Exception as err:  # noqa: BLE001 - report every runtime contender as unavailable, with why
            reason = f"no artifact: {type(err).__name__}: {err}"
            log.warning(reason)
            results["artifact"] = {"error": reason}
            manifest = None
            all_cs += [Contender.unavailable(name, reason) for name in cfg.runtime_contenders]
        if manifest is not None:
            static = static_int8_artifact(cfg, art_dir, manifest, cfg.runtime_contenders, say)
            for name in cfg.runtime_contenders:
                say(f"loading runtime {name}")
                # the runtime's defaults (no optimised-model cache): load time as a fresh user sees it
                c = runtime_contender(name, art_dir, manifest, cfg.class_name, size, cfg.threads or threads,
                                      skipped=art_info.get("skipped"), static_int8=static)
                all_cs.append(c)
                if c.available:
                    runtime_cs.append(c)

    # per contender: first call, warm-up at every batch size, peak memory -------------------
    prepared: dict[str, dict] = {}
    for c in all_cs:
        if not c.available:
            continue
        say(f"first call and warm-up: {c.name}")
        try:
            prepared[c.name] = prepare_contender(c, px, pt, cfg, cuda)
        except Exception as err:  # noqa: BLE001 - a backend failing at run time is a result too
            c.available, c.reason = False, f"failed while running: {type(err).__name__}: {str(err)[:300]}"
            if c in runtime_cs:
                runtime_cs.remove(c)
    ready = [c for c in all_cs if c.available]

    # interleaved timing ----------------------------------------------------------------------
    measured: dict[str, Any] = {}
    probe = gemm_probe(device, plan.gemm_size)
    if ready and ("latency" in cfg.sections or "throughput" in cfg.sections):
        say(f"timing {len(ready)} contenders in interleaved rounds (+ a GEMM probe): "
            f"{', '.join(c.name for c in ready)}")
        measured = measure_all(ready, px, pt, cfg, prepared, probe)
    probe_gflops = [probe.info["flops_per_call"] / t / 1e9 for t in measured.pop("_probe", [])]

    entries: list[dict] = []
    for c in all_cs:
        gf = (dual_f if c.dual_path else plain_f) * c.forwards_per_image / 1e9
        e = {"name": c.name, "label": c.label, "group": c.group, "device": c.device, "precision": c.precision,
             "available": c.available, "reason": c.reason, "load_s": c.load_s, "load_note": c.load_note,
             "forwards_per_image": c.forwards_per_image, "gflops_per_image": gf, "info": c.info}
        if c.name in prepared:
            p = prepared[c.name]
            e.update(first_call_s=p["first_call_s"], warm_s=p["warm_s"], memory=p["memory"])
        e.update(measured.get(c.name, {}))
        entries.append(e)
    results["contenders"] = entries

    # TTA -------------------------------------------------------------------------------------
    if "tta" in cfg.sections and "core" in cfg.torch_contenders:
        say("AnoCLIP+ (TTA) cost")
        results["tta"] = measure_tta(model, pt, cfg.class_name, plan.tta_repeats, cfg.progress, sync)

    # fidelity: every runtime backend/precision vs the fp32 core on the same pixels ---------
    if runtime_cs and "fidelity" in cfg.sections:
        say("fidelity vs the fp32 core")
        fid_px, fid_pt = px[: plan.fidelity_images], pt[: plan.fidelity_images]
        with torch.no_grad():
            maps, scores = model.predict(fid_pt, cfg.class_name)
        core_ref = (maps.float().cpu().numpy(), scores.float().cpu().numpy())
        fidelity: dict[str, Any] = {}
        for c in runtime_cs:
            try:
                fidelity[c.name] = measure_fidelity(core_ref, c, fid_px, fid_pt)
                art_protos = c.detector.prototypes(cfg.class_name).reshape(2, -1)
                fidelity[c.name]["prototype_max_abs"] = float(np.abs(art_protos - prototypes).max())
            except Exception as err:  # noqa: BLE001
                fidelity[c.name] = {"error": f"{type(err).__name__}: {err}"}
        results["fidelity"] = {"reference": "core fp32 (predict, views=False) on the same pixels",
                               "images": int(fid_px.shape[0]), "by_contender": fidelity,
                               "reference_maps": {"min": float(core_ref[0].min()), "max": float(core_ref[0].max()),
                                                  "std": float(core_ref[0].std()),
                                                  "std_within_image_mean": float(core_ref[0].reshape(
                                                      core_ref[0].shape[0], -1).std(axis=1).mean())}}

    # line-scan -------------------------------------------------------------------------------
    if "linescan" in cfg.sections:
        if runtime_cs:
            def best(c: Contender) -> float:
                e = next(x for x in entries if x["name"] == c.name)
                return best_throughput(e)[0] or 0.0

            fastest = max(runtime_cs, key=best)
            say(f"line-scan strip {cfg.linescan_size[1]} x {cfg.linescan_size[0]} on {fastest.name}")
            try:
                results["linescan"] = measure_linescan(
                    fastest, cfg.class_name, cfg.linescan_size, plan.linescan_repeats, cfg.seed,
                    batch=max(cfg.batch_sizes), progress=cfg.progress)
            except Exception as err:  # noqa: BLE001
                results["linescan"] = {"error": f"{type(err).__name__}: {err}"}
        else:
            results["linescan"] = {"error": "no runtime contender ran (the line-scan figure uses the runtime tiler)"}

    for c in runtime_cs:
        if c.close:
            with contextlib.suppress(Exception):
                c.close()
    if tmp_artifact:
        tmp_obj.cleanup()

    say("GEMM peak again (end of run)")
    g1 = measure_gemm_peak(device, "float32", plan.gemm_size, plan.gemm_repeats)
    results["gemm_end"] = g1.to_dict()
    ort_gemm()
    results["gemm_onnxruntime"] = [g.to_dict() for g in ort_peaks]
    results["gemm_during"] = {
        "calls": len(probe_gflops),
        "gflops_max": max(probe_gflops) if probe_gflops else None,
        "gflops_p50": percentile(probe_gflops, 50) if probe_gflops else None,
        "gflops_min": min(probe_gflops) if probe_gflops else None,
    }
    everything = [g0.gflops, g1.gflops] + probe_gflops + [g.gflops for g in ort_peaks]
    peak = max(everything)
    results["gemm_during"]["gflops_samples"] = [round(v, 1) for v in probe_gflops]
    results["gemm_during"]["slow_fraction"] = (sum(v < 0.8 * peak for v in probe_gflops) / len(probe_gflops)
                                               if probe_gflops else None)
    ort_note = (f", and ONNX Runtime's MatMul ({plan.gemm_repeats} calls at the start and at the end)"
                if ort_peaks else "")
    results["hardware_limit"] = {
        "what": f"fp32 GEMM ({plan.gemm_size}x{plan.gemm_size}) on {device}, {threads} threads: the best rate of "
                f"torch.mm ({plan.gemm_repeats} calls at the start, {len(probe_gflops)} calls interleaved with the "
                f"contenders' timed rounds, {plan.gemm_repeats} at the end){ort_note}",
        "torch_best_gflops": max([g0.gflops, g1.gflops] + probe_gflops),
        "onnxruntime_best_gflops": max(g.gflops for g in ort_peaks) if ort_peaks else None,
        "gflops": peak,
        "gflops_min": min(everything),
        "spread": (peak - min(everything)) / peak if peak else None,
    }
    if cuda:
        with contextlib.suppress(Exception):
            results["gemm_fp16"] = measure_gemm_peak(device, "float16", plan.gemm_size, plan.gemm_repeats).to_dict()
    derive_ratios(results)
    results["headline"] = headline(results)
    results["machine"]["load_average_end"] = load_average()
    results["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    results["wall_s"] = time.perf_counter() - t_run
    return results
