"""The benchmark run: contenders, measurements, derived ratios -> one results dict (JSON-ready).

Order of a run: machine + GEMM peak, model load and text prototypes, the analytical FLOP count
(cross-checked with torch's FLOP counter), the PyTorch contenders, AnoCLIP+ (TTA) cost, the
artifact (built with ``anoclip.export.api`` or reused), the runtime contenders, fidelity against the
fp32 core, the line-scan strip, and a second GEMM peak at the end (the spread of the two says
how noisy the machine was). Every performance claim in the report is a ratio of figures taken
in this one run.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from anoclip.runtime import contract as mf
from anoclip.runtime.cpu_features import CpuFeatures, read_cpu_features
from anoclip_core.compare import compare

from . import flops as fl
from .ceiling import contender_ceiling
from .config import BASELINE, BenchConfig
from .contenders import Contender, runtime_contender, static_int8_artifact, torch_contenders
from .hardware import (
    PeakMemory,
    load_average,
    machine_summary,
    measure_gemm_peak,
    measure_gemm_peak_int8,
    measure_gemm_peak_openvino,
    measure_gemm_peak_ort,
    measure_gemm_peak_ort_int8,
    versions,
)
from .stats import paired_ratio, percentile, plan_repeats, ratio, summarize, throughput, time_calls

log = logging.getLogger("anoclip.bench")

RESULTS_FORMAT = 1
# Idle time before each interleaved call: ONNX Runtime's intra-op threads keep spinning for some
# 20-50 ms after a run (measured here: a torch GEMM right after an ORT call ran ~45% slower, after
# 50 ms it ran at full speed), which would tax whichever contender comes next in the round.
INTERLEAVE_GAP_S = 0.1


def _bar(total: int | None, desc: str, enabled: bool):
    from anoclip_core.progress import progress

    return progress(total=total, desc=desc, unit="call", enabled=enabled, leave=False)


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
                    out["skipped"][str(b)] = (
                        f"estimated {est:.0f} s per call > {plan.max_call_s:g} s limit of this effort"
                    )
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
    reduced = results.get("gemm_reduced") or {}
    breakdown = fl.get("dual_breakdown") or {}
    fp32_peak = (results.get("hardware_limit") or {}).get("gflops")
    for name, e in entries.items():
        if e["group"] != "runtime":
            continue
        r = e.get("ratios") or {}
        own = best_reduced_peak(reduced, PRECISION_PEAK.get(e.get("precision"), ""))
        mixed = contender_ceiling(e, breakdown, best_reduced_peak(reduced, "int8"), best_reduced_peak(reduced, "bf16"),
                                  fp32_peak)
        out["runtime"][name] = {
            "core_over_runtime_latency": lat("core", name),
            "ort_fp32_over_runtime_latency": lat("ort-cpu-fp32", name) if name != "ort-cpu-fp32" else None,
            "runtime_over_core_throughput": tp(name, "core"),
            "runtime_over_open_clip_throughput": tp(name, "open_clip"),
            "peak_fraction_best": r.get("peak_fraction_best"),
            "own_peak": PRECISION_PEAK.get(e.get("precision")) if own else None,
            "own_peak_fraction_best": ratio(r.get("achieved_gflops_best"), own),
            "own_peak_fraction_b1": ratio(r.get("achieved_gflops_b1"), own),
        }
        if mixed:
            out["runtime"][name].update({
                "mixed_peak_gflops": mixed["gflops"], "mixed_peak_float_precision": mixed["float_precision"],
                "mixed_peak_int8_share": mixed["int8_share"],
                "mixed_peak_fraction_best": ratio(r.get("achieved_gflops_best"), mixed["gflops"]),
                "mixed_peak_fraction_b1": ratio(r.get("achieved_gflops_b1"), mixed["gflops"]),
            })
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
    """Export an artifact with ``anoclip.export.api.export_artifact`` -> (folder, info).

    Precisions the exporter refuses here (bf16 without ONNX Runtime bf16 kernels) are left out
    with the reason; a TensorRT engine is built only when a ``trt-*`` contender is asked for and
    TensorRT + a GPU are present (else left out with the reason).
    """
    from anoclip.export import api, quantize
    from anoclip.export import trt as trt_mod

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
    from anoclip.runtime.contract import read_manifest

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
        "overhead_ms_p50": percentile([(b - a) * 1000 for a, b in zip(off, on, strict=True)], 50),
        "overhead_ratio_p50": paired_ratio(on, off),
        "overhead_ms_unpaired": s_on.p50_ms - s_off.p50_ms,
        "adapt_fraction_of_predict": ratio(s_ad.p50_ms, s_off.p50_ms),
    }


def measure_fidelity(ref: tuple[np.ndarray, np.ndarray], c: Contender, px: np.ndarray, pt: Any) -> dict:
    maps, scores = c.predict(px, pt)
    return compare(maps, scores, ref[0], ref[1])


# the run --------------------------------------------------------------------------------------
@dataclass
class BenchRun:
    """State shared by the steps of one run: the config, the logger, the results being filled in."""

    cfg: BenchConfig
    say: Callable[[str], None]
    device: str
    threads: int
    results: dict[str, Any]
    t_start: float
    ort_peaks: list = field(default_factory=list)
    model: Any = None
    load_s: float = 0.0
    prototypes: np.ndarray | None = None
    dual_flops: float = 0.0
    plain_flops: float = 0.0
    px: np.ndarray | None = None
    pt: Any = None
    contenders: list[Contender] = field(default_factory=list)
    runtime: list[Contender] = field(default_factory=list)
    entries: list[dict] = field(default_factory=list)
    probe_gflops: list[float] = field(default_factory=list)
    cleanup: list[Callable[[], None]] = field(default_factory=list)

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def threads_ort(self) -> int:
        return self.cfg.threads or self.threads


def start_run(cfg: BenchConfig, say: Callable[[str], None]) -> BenchRun:
    """Threads, device, optional model configs and the results header."""
    import torch

    t_start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    threads = torch.get_num_threads()
    device = resolve_device(cfg.device)
    if cfg.model_config:
        from anoclip_core import register_model_configs

        register_model_configs(cfg.model_config)
    results: dict[str, Any] = {
        "format": "anoclip-bench",
        "format_version": RESULTS_FORMAT,
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": cfg.command,
        "config": cfg.to_dict(),
        "machine": machine_summary(),
        "versions": versions(),
        "threads": {"torch": threads, "onnxruntime_intra_op": cfg.threads or threads},
        "device": device,
        "notes": [],
    }
    return BenchRun(cfg=cfg, say=say, device=device, threads=threads, results=results, t_start=t_start)


def measure_ort_gemm(run: BenchRun) -> None:
    """ONNX Runtime's MatMul peak (CPU only); a failure is a note, the torch GEMM still gives a limit."""
    if run.cuda:
        return
    plan = run.cfg.plan
    try:
        run.ort_peaks.append(measure_gemm_peak_ort(plan.gemm_size, plan.gemm_repeats, run.threads_ort))
    except Exception as err:  # noqa: BLE001
        run.results["notes"].append(f"ONNX Runtime GEMM peak not measured: {type(err).__name__}: {err}")


def gemm_at_start(run: BenchRun) -> None:
    plan = run.cfg.plan
    run.say(f"GEMM peak ({run.device}, fp32, n={plan.gemm_size})")
    run.results["gemm_start"] = measure_gemm_peak(run.device, "float32", plan.gemm_size, plan.gemm_repeats).to_dict()
    measure_ort_gemm(run)


def load_model(run: BenchRun) -> None:
    """The core model and its text prototypes (timed: load, text, from cache or not)."""
    from anoclip_core import AnoCLIP
    from anoclip_core.prompts import PromptCache, state_sentences

    cfg = run.cfg
    run.say(f"loading {cfg.backbone} (pretrained={cfg.pretrained}) on {run.device}")
    t0 = time.perf_counter()
    model = AnoCLIP.create(cfg.backbone, pretrained=cfg.pretrained, image_size=cfg.image_size, device=run.device,
                           cache_dir=cfg.text_cache)
    run.load_s = time.perf_counter() - t0
    domain = state_sentences(cfg.class_name).domain
    key = PromptCache.key(model.backbone, model.weights.cache_id, cfg.class_name, domain)
    text_cached = model.prompt_cache.load(key) is not None
    run.say(
        "text prototypes" + (" (from cache)" if text_cached else " (encoding 924 sentences once; cached afterwards)")
    )
    t0 = time.perf_counter()
    states = model.state_embeddings(cfg.class_name)
    text_s = time.perf_counter() - t0
    run.prototypes = states.prototypes.float().cpu().numpy()
    run.model = model
    run.results["model"] = {
        "backbone": cfg.backbone,
        "pretrained": model.weights.source,
        "random_weights": model.random_weights,
        "image_size": model.image_size,
        "patch_grid": list(model.grid_size),
        "embed_dim": model.embed_dim,
        "dual_blocks": model.encoder.dual_blocks,
        "depth": model.encoder.depth,
        "class_name": cfg.class_name,
        "load_s": run.load_s,
        "text_s": text_s,
        "text_from_cache": text_cached,
        "parameters_m": sum(p.numel() for p in model.clip.visual.parameters()) / 1e6,
    }
    if model.random_weights:
        run.results["notes"].append("RANDOM WEIGHTS: outputs are not meaningful anomaly scores; speed figures hold, "
                                    "fidelity figures compare implementations only")


def count_flops(run: BenchRun) -> None:
    """Analytical FLOPs of both paths, cross-checked with torch's FLOP counter."""
    import torch

    model, size = run.model, run.model.image_size
    spec = fl.ViTSpec.from_encoder(model.encoder)
    run.dual_flops, run.plain_flops = fl.vit_flops(spec, True), fl.vit_flops(spec, False)
    info: dict[str, Any] = {
        "spec": spec.to_dict(),
        "dual_gflops": run.dual_flops / 1e9,
        "plain_gflops": run.plain_flops / 1e9,
        "dual_breakdown": fl.flop_breakdown(spec, True),
        "plain_breakdown": fl.flop_breakdown(spec, False),
    }
    try:
        xc = torch.zeros(1, 3, size, size, device=run.device)
        counted_dual, _ = fl.torch_flops(lambda: model.encoder.forward_tokens(xc))
        counted_plain, _ = fl.torch_flops(lambda: model.clip.encode_image(xc))
        info["counter"] = {
            "tool": "torch.utils.flop_counter.FlopCounterMode",
            "dual": counted_dual,
            "plain": counted_plain,
            "dual_rel_diff": (counted_dual - run.dual_flops) / run.dual_flops,
            "plain_rel_diff": (counted_plain - run.plain_flops) / run.plain_flops,
        }
    except Exception as err:  # noqa: BLE001 - the cross-check must not end a run
        info["counter"] = {"error": f"{type(err).__name__}: {err}"}
    run.results["flops"] = info


def make_inputs(run: BenchRun) -> None:
    """Seeded synthetic images, pre-processed once and shared by every contender."""
    import torch

    from anoclip_core.transform import preprocess_batch

    cfg, size = run.cfg, run.model.image_size
    n_inputs = max(max(cfg.batch_sizes), cfg.plan.fidelity_images)
    images = synthetic_images(n_inputs, size, size, cfg.seed)
    run.px = np.ascontiguousarray(preprocess_batch(images, run.model.preprocess_config), dtype=np.float32)
    run.pt = torch.from_numpy(run.px)
    run.results["inputs"] = {"images": n_inputs, "kind": "synthetic textured RGB uint8, seeded", "seed": cfg.seed,
                             "shape": list(run.px.shape)}


def obtain_artifact(run: BenchRun) -> tuple[Path, dict, dict]:
    """Reuse ``--artifact`` when it holds one, else export one (temporary unless ``--artifact`` names a folder)."""
    cfg = run.cfg
    if cfg.artifact and (Path(cfg.artifact) / mf.MANIFEST_NAME).is_file():
        art_dir = Path(cfg.artifact)
        art_info: dict[str, Any] = {"built_in_run": False, "path": str(art_dir)}
        run.say(f"reusing artifact {art_dir}")
    else:
        if cfg.artifact:
            art_dir = Path(cfg.artifact)
        else:
            tmp_obj = tempfile.TemporaryDirectory(prefix="anoclip-bench-artifact-")
            run.cleanup.append(tmp_obj.cleanup)
            art_dir = Path(tmp_obj.name) / "artifact"
        run.say(
            f"exporting an artifact ({', '.join(artifact_precisions(cfg.runtime_contenders))}) with anoclip.export.api"
        )
        art_dir, art_info = build_artifact(cfg, art_dir, cfg.runtime_contenders, cfg.progress, run.say)
        art_info["path"] = str(art_dir) if cfg.artifact else "(temporary, deleted after the run)"
    manifest = load_artifact(art_dir)
    check_artifact_matches(manifest, cfg, run.model.image_size, run.model.random_weights, run.model.weights.source)
    art_info["models"] = {k: v.get("file") for k, v in (manifest.get("models") or {}).items()}
    art_info["tensorrt"] = bool(manifest.get("tensorrt"))
    return art_dir, manifest, art_info


def add_contenders(run: BenchRun) -> None:
    """The PyTorch contenders, then the runtime ones (each unavailable, with why, when it cannot run)."""
    cfg = run.cfg
    order = [n for n in ("open_clip", "core", "reference") if n in cfg.torch_contenders]
    run.contenders = list(torch_contenders(run.model, cfg.class_name, tuple(order), run.load_s))
    if not cfg.runtime_contenders:
        return
    try:
        art_dir, manifest, art_info = obtain_artifact(run)
    except Exception as err:  # noqa: BLE001 - report every runtime contender as unavailable, with why
        reason = f"no artifact: {type(err).__name__}: {err}"
        log.warning(reason)
        run.results["artifact"] = {"error": reason}
        run.contenders += [Contender.unavailable(name, reason) for name in cfg.runtime_contenders]
        return
    run.results["artifact"] = art_info
    static = static_int8_artifact(cfg, art_dir, manifest, cfg.runtime_contenders, run.say)
    for name in cfg.runtime_contenders:
        run.say(f"loading runtime {name}")
        # the runtime's defaults (no optimised-model cache): load time as a fresh user sees it
        c = runtime_contender(name, art_dir, manifest, cfg.class_name, run.model.image_size, run.threads_ort,
                              skipped=art_info.get("skipped"), static_int8=static)
        run.contenders.append(c)
        if c.available:
            run.runtime.append(c)


def warm_up(run: BenchRun) -> dict[str, dict]:
    """First call, warm-up at every batch size and peak memory per contender; a failure marks it unavailable."""
    prepared: dict[str, dict] = {}
    for c in run.contenders:
        if not c.available:
            continue
        run.say(f"first call and warm-up: {c.name}")
        try:
            prepared[c.name] = prepare_contender(c, run.px, run.pt, run.cfg, run.cuda)
        except Exception as err:  # noqa: BLE001 - a backend failing at run time is a result too
            c.available, c.reason = False, f"failed while running: {type(err).__name__}: {str(err)[:300]}"
            if c in run.runtime:
                run.runtime.remove(c)
    return prepared


def time_contenders(run: BenchRun, prepared: dict[str, dict]) -> None:
    """Interleaved latency/throughput rounds with a GEMM probe, then one entry per contender."""
    cfg = run.cfg
    ready = [c for c in run.contenders if c.available]
    measured: dict[str, Any] = {}
    probe = gemm_probe(run.device, cfg.plan.gemm_size)
    if ready and ("latency" in cfg.sections or "throughput" in cfg.sections):
        run.say(f"timing {len(ready)} contenders in interleaved rounds (+ a GEMM probe): "
                f"{', '.join(c.name for c in ready)}")
        measured = measure_all(ready, run.px, run.pt, cfg, prepared, probe)
    run.probe_gflops = [probe.info["flops_per_call"] / t / 1e9 for t in measured.pop("_probe", [])]
    for c in run.contenders:
        gf = (run.dual_flops if c.dual_path else run.plain_flops) * c.forwards_per_image / 1e9
        e = {"name": c.name, "label": c.label, "group": c.group, "device": c.device, "precision": c.precision,
             "available": c.available, "reason": c.reason, "load_s": c.load_s, "load_note": c.load_note,
             "forwards_per_image": c.forwards_per_image, "gflops_per_image": gf, "info": c.info}
        if c.name in prepared:
            p = prepared[c.name]
            e.update(first_call_s=p["first_call_s"], warm_s=p["warm_s"], memory=p["memory"])
        e.update(measured.get(c.name, {}))
        run.entries.append(e)
    run.results["contenders"] = run.entries


def section_tta(run: BenchRun) -> None:
    if "tta" in run.cfg.sections and "core" in run.cfg.torch_contenders:
        import torch

        run.say("AnoCLIP+ (TTA) cost")
        sync = torch.cuda.synchronize if run.cuda else None
        run.results["tta"] = measure_tta(run.model, run.pt, run.cfg.class_name, run.cfg.plan.tta_repeats,
                                         run.cfg.progress, sync)


def section_fidelity(run: BenchRun) -> None:
    """Every runtime backend/precision against the fp32 core on the same pixels."""
    if not (run.runtime and "fidelity" in run.cfg.sections):
        return
    import torch

    cfg = run.cfg
    run.say("fidelity vs the fp32 core")
    n = cfg.plan.fidelity_images
    fid_px, fid_pt = run.px[:n], run.pt[:n]
    with torch.no_grad():
        maps, scores = run.model.predict(fid_pt, cfg.class_name)
    core_ref = (maps.float().cpu().numpy(), scores.float().cpu().numpy())
    by_contender: dict[str, Any] = {}
    for c in run.runtime:
        try:
            by_contender[c.name] = measure_fidelity(core_ref, c, fid_px, fid_pt)
            art_protos = c.detector.prototypes(cfg.class_name).reshape(2, -1)
            by_contender[c.name]["prototype_max_abs"] = float(np.abs(art_protos - run.prototypes).max())
        except Exception as err:  # noqa: BLE001
            by_contender[c.name] = {"error": f"{type(err).__name__}: {err}"}
    ref_maps = core_ref[0]
    run.results["fidelity"] = {
        "reference": "core fp32 (predict, views=False) on the same pixels",
        "images": int(fid_px.shape[0]), "by_contender": by_contender,
        "reference_maps": {"min": float(ref_maps.min()), "max": float(ref_maps.max()), "std": float(ref_maps.std()),
                           "std_within_image_mean": float(ref_maps.reshape(ref_maps.shape[0], -1).std(axis=1).mean())},
    }


def fastest_runtime(run: BenchRun) -> Contender:
    """The runtime contender with the best measured throughput (the line-scan and few-shot sections use it)."""

    def best(c: Contender) -> float:
        return best_throughput(next(x for x in run.entries if x["name"] == c.name))[0] or 0.0

    return max(run.runtime, key=best)


def section_linescan(run: BenchRun) -> None:
    """One long strip through the runtime tiler: the fastest runtime contender (and its multi-stream
    variant on OpenVINO) against ``ort-cpu-int8``, interleaved (``benchmarks/linescan.py``)."""
    from anoclip.runtime.backends.ort import physical_cores

    from . import linescan

    cfg = run.cfg
    if "linescan" not in cfg.sections:
        return
    if not run.runtime:
        run.results["linescan"] = {"error": "no runtime contender ran (the line-scan figure uses the runtime tiler)"}
        return
    fastest = fastest_runtime(run)
    baseline = next((c for c in run.runtime if c.name == linescan.BASELINE and c is not fastest), None)
    runners, notes = linescan.strip_runners(fastest, baseline, min(run.threads, physical_cores()))
    run.results["notes"].extend(notes)
    height, width = cfg.linescan_size
    run.say(f"line-scan strip {width} x {height}: {', '.join(r.label for r in runners)} (interleaved)")
    rounds = max(cfg.plan.linescan_repeats, linescan.MIN_ROUNDS)
    bar = _bar(rounds * len(runners), f"line-scan {width}x{height}", cfg.progress)
    try:
        strip = synthetic_images(1, height, width, cfg.seed + 7)[0]
        run.results.update(linescan.measure_linescan(runners, strip, cfg.class_name, rounds, max(cfg.batch_sizes),
                                                     bar))
        if baseline is None:
            run.results["linescan_baseline"] = {"error": linescan.no_baseline_reason(fastest.name, run.runtime)}
    except Exception as err:  # noqa: BLE001
        run.results["linescan"] = {"error": f"{type(err).__name__}: {err}"}
    finally:
        bar.close()
        for r in runners:
            if r.owned:
                r.detector.close()


def section_fewshot(run: BenchRun) -> None:
    """Batch-1 latency with reference banks of 1, 4, 16 shots and 10k patches vs zero-shot (fastest runtime)."""
    from .fewshot import make_variants, measure_fewshot

    cfg = run.cfg
    if "fewshot" not in cfg.sections:
        return
    if not run.runtime:
        run.results["fewshot"] = {"error": "no runtime contender ran (the few-shot figure uses runtime.Detector)"}
        return
    c = fastest_runtime(run)
    run.say(f"few-shot reference banks vs zero-shot on {c.name}")
    try:
        s = c.detector.image_size
        variants = make_variants(c.detector, cfg.class_name, cfg.seed, synthetic_images)
        image = synthetic_images(1, s, s, cfg.seed + 5)[0]
        plan = cfg.plan
        run.results["fewshot"] = measure_fewshot(c.detector, c.name, cfg.class_name, image, variants,
                                                 plan.latency_repeats, plan.latency_min_repeats,
                                                 plan.latency_budget_s, plan.warmup)
    except Exception as err:  # noqa: BLE001
        run.results["fewshot"] = {"error": f"{type(err).__name__}: {err}"}


def release(run: BenchRun) -> None:
    """Close runtime backends and delete the temporary artifact."""
    for c in run.runtime:
        if c.close:
            with contextlib.suppress(Exception):
                c.close()
    for fn in run.cleanup:
        fn()


def hardware_limit(run: BenchRun) -> None:
    """Second GEMM peak and the machine's limit over the whole run (its spread says how noisy it was)."""
    plan, results, probe = run.cfg.plan, run.results, run.probe_gflops
    run.say("GEMM peak again (end of run)")
    g_end = measure_gemm_peak(run.device, "float32", plan.gemm_size, plan.gemm_repeats)
    results["gemm_end"] = g_end.to_dict()
    measure_ort_gemm(run)
    results["gemm_onnxruntime"] = [g.to_dict() for g in run.ort_peaks]
    g_start = results["gemm_start"]["gflops"]
    everything = [g_start, g_end.gflops] + probe + [g.gflops for g in run.ort_peaks]
    peak = max(everything)
    results["gemm_during"] = {
        "calls": len(probe),
        "gflops_max": max(probe) if probe else None,
        "gflops_p50": percentile(probe, 50) if probe else None,
        "gflops_min": min(probe) if probe else None,
        "gflops_samples": [round(v, 1) for v in probe],
        "slow_fraction": sum(v < 0.8 * peak for v in probe) / len(probe) if probe else None,
    }
    ort_note = (f", and ONNX Runtime's MatMul ({plan.gemm_repeats} calls at the start and at the end)"
                if run.ort_peaks else "")
    results["hardware_limit"] = {
        "what": f"fp32 GEMM ({plan.gemm_size}x{plan.gemm_size}) on {run.device}, {run.threads} threads: the best "
                f"rate of torch.mm ({plan.gemm_repeats} calls at the start, {len(probe)} calls interleaved with the "
                f"contenders' timed rounds, {plan.gemm_repeats} at the end){ort_note}",
        "torch_best_gflops": max([g_start, g_end.gflops] + probe),
        "onnxruntime_best_gflops": max(g.gflops for g in run.ort_peaks) if run.ort_peaks else None,
        "gflops": peak,
        "gflops_min": min(everything),
        "spread": (peak - min(everything)) / peak if peak else None,
    }
    if run.cuda:
        with contextlib.suppress(Exception):
            results["gemm_fp16"] = measure_gemm_peak(run.device, "float16", plan.gemm_size,
                                                     plan.gemm_repeats).to_dict()
    else:
        results["gemm_reduced"] = reduced_precision_peaks(plan.gemm_size, plan.gemm_repeats, run.threads_ort)


def reduced_precision_peaks(n: int, repeats: int, threads: int | None = None,
                            features: CpuFeatures | None = None) -> dict[str, Any]:
    """The CPU's bf16 and int8 GEMM peaks, measured like the fp32 one: torch (oneDNN), ONNX Runtime's
    int8 kernels (``int8_onnxruntime``) and, where it is installed, OpenVINO's own (``bf16_openvino``
    / ``int8_openvino``); the best of each precision is the ceiling of its contenders. What this CPU
    has no native instructions for is not timed (it would time an emulation, not a ceiling): bf16
    without AVX512_BF16 / AMX (OpenVINO would run f32 under a bf16 label), torch's int8 without
    VNNI / AMX. Those entries say why instead (``skipped``)."""
    features = features or read_cpu_features()
    out: dict[str, Any] = {}
    measures: dict[str, Callable[[], Any]] = {
        "bf16": lambda: measure_gemm_peak("cpu", "bfloat16", n, repeats),
        "int8": lambda: measure_gemm_peak_int8(n, repeats),
        "int8_onnxruntime": lambda: measure_gemm_peak_ort_int8(n, repeats, threads),
    }
    if importlib.util.find_spec("openvino") is not None:
        measures["bf16_openvino"] = lambda: measure_gemm_peak_openvino("bfloat16", n, repeats, threads)
        measures["int8_openvino"] = lambda: measure_gemm_peak_openvino("int8", n, repeats, threads)
    for name, measure in measures.items():
        skip = _not_native(name, features)
        if skip:
            out[name] = {"skipped": skip}
            continue
        try:
            out[name] = measure().to_dict()
        except Exception as err:  # noqa: BLE001 - reported in place of the figure
            out[name] = {"error": f"{type(err).__name__}: {err}"}
    return out


def _not_native(name: str, features: CpuFeatures) -> str | None:
    """Why peak ``name`` would time an emulation on this CPU (None: measure it)."""
    if name.startswith("bf16") and features.native_bf16 is False:
        return "this CPU has no native bf16 (AVX512_BF16 / AMX), so no bf16 contender runs here"
    if name == "int8" and features.int8_dot is False:
        return "this CPU has no int8 dot-product instructions (VNNI / AMX), which torch's int8 matmul needs"
    return None


def best_reduced_peak(reduced: dict[str, Any], precision: str) -> float | None:
    """The best measured GEMM rate of ``precision`` (bf16 / int8) over the libraries that measured it."""
    rates = [g["gflops"] for k, g in reduced.items() if k.split("_")[0] == precision and g.get("gflops")]
    return max(rates) if rates else None


PRECISION_PEAK = {"bf16": "bf16", "int8": "int8", "int8s": "int8"}


def finish(run: BenchRun) -> dict:
    """Derived ratios, the headline and the run's end stamps."""
    results = run.results
    from .linescan import network_split, speedup_bound

    derive_ratios(results)
    bound = speedup_bound(results)
    if bound:
        results["linescan_bound"] = bound
    split = network_split(results)
    if split:
        results["linescan_network_split"] = split
    results["headline"] = headline(results)
    results["machine"]["load_average_end"] = load_average()
    results["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    results["wall_s"] = time.perf_counter() - run.t_start
    return results


def run_benchmark(cfg: BenchConfig, log_fn: Callable[[str], None] | None = None) -> dict:
    """Run everything ``cfg`` asks for; returns the results dict (see ``report.write_report``)."""
    run = start_run(cfg, log_fn or (lambda m: log.info(m)))
    gemm_at_start(run)
    load_model(run)
    count_flops(run)
    make_inputs(run)
    try:
        add_contenders(run)
        prepared = warm_up(run)
        time_contenders(run, prepared)
        section_tta(run)
        section_fidelity(run)
        section_linescan(run)
        section_fewshot(run)
    finally:
        release(run)
    hardware_limit(run)
    return finish(run)
