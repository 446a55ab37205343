"""Write a run's results as ``results.json``, ``report.md`` and ``latency_vs_batch.png``."""
from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

JSON_NAME = "results.json"
MD_NAME = "report.md"
PNG_NAME = "latency_vs_batch.png"

NOISE_NOTE = (
    "This machine is shared and noisy (other jobs run on the same cores). Absolute times are not "
    "comparable between runs; the claims below are ratios of figures measured in this one run, with "
    "the contenders' timed calls interleaved round by round and ratios paired by round."
)


def _f(v: Any, digits: int = 3) -> str:
    """Compact number formatting for tables ('-' for missing)."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if v == 0:
            return "0"
        a = abs(v)
        if a >= 1000:
            return f"{v:,.0f}"
        if a >= 100:
            return f"{v:.0f}"
        if a >= 1:
            return f"{v:.{max(0, digits - 1)}f}"
        if a >= 1e-3:
            return f"{v:.{digits}f}"
        return f"{v:.2e}"
    return str(v)


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _table(header: list[str], rows: Iterable[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    out += ["| " + " | ".join(str(c).replace("|", "/") for c in r) + " |" for r in rows]
    return out


def _device_name(results: dict, device: str) -> str:
    m = results.get("machine", {})
    if device.startswith("cuda"):
        g = m.get("gpu") or {}
        return f"GPU: {g.get('name', '?')}"
    cc = m.get("cpu_count", {})
    return f"CPU: {m.get('cpu', '?')} ({cc.get('usable', '?')} usable cores)"


def _speed(other_over_this: float, other: str, bold: bool = False) -> str:
    """``'2.00x faster than X'``, or ``'1.25x slower than X'`` for a ratio below 1 (never '0.80x faster')."""
    faster = other_over_this >= 1.0
    text = f"{_x(other_over_this if faster else 1.0 / other_over_this)} {'faster' if faster else 'slower'}"
    return f"**{text}** than {other}" if bold else f"{text} than {other}"


def _runtime_ratios(r: dict) -> str:
    """One runtime contender's key ratios, naming only those measured in this run (a contender
    missing from --contenders leaves its ratio out, rather than printing a dash)."""
    latency = []
    if r.get("core_over_runtime_latency"):
        latency.append(_speed(r["core_over_runtime_latency"], "the core", bold=True))
    if r.get("ort_fp32_over_runtime_latency"):
        latency.append(_speed(r["ort_fp32_over_runtime_latency"], "`ort-cpu-fp32`"))
    throughput = [f"{_x(r[k])} {what}" for k, what in (("runtime_over_core_throughput", "the core's"),
                                                       ("runtime_over_open_clip_throughput", "plain open_clip's"))
                  if r.get(k)]
    parts = []
    if latency:
        parts.append(", ".join(latency) + " at batch 1")
    if throughput:
        parts.append("throughput " + ", ".join(throughput))
    if r.get("peak_fraction_best") is not None:
        peak = f"{_pct(r['peak_fraction_best'])} of the fp32 GEMM peak"
        if r.get("own_peak") and r.get("own_peak_fraction_best") is not None:
            peak += (f", {_pct(r['own_peak_fraction_best'])} of the {r['own_peak']} GEMM peak at its best batch "
                     f"({_pct(r.get('own_peak_fraction_b1'))} at batch 1)")
        if r.get("mixed_peak_fraction_best") is not None:
            peak += (f", {_pct(r['mixed_peak_fraction_best'])} of its mixed-precision ceiling "
                     f"({_f(r['mixed_peak_gflops'])} GOP/s: its int8 Linear layers, "
                     f"{_pct(r.get('mixed_peak_int8_share'))} of the FLOPs, at the int8 peak, the rest at the "
                     f"{r.get('mixed_peak_float_precision')} peak; {_pct(r.get('mixed_peak_fraction_b1'))} at batch 1)")
        parts.append(peak)
    return "; ".join(parts) or "no ratio measured (its reference contenders did not run)"


PEAK_LIBRARY = {"": "torch on the CPU",
                "openvino": "OpenVINO's own MatMul (what the openvino contenders' kernels reach)",
                "onnxruntime": "ONNX Runtime's MatMulInteger, u8 x s8 (what the ort-cpu int8 contenders' kernels "
                               "reach)"}


def _isa(machine: dict) -> str:
    """'; int8 dot-product (VNNI / AMX): no; native bf16: no' from the machine's CPU features."""
    f = machine.get("cpu_features") or {}
    if not f:
        return ""
    word = {True: "yes", False: "no", None: "unknown"}
    return (f"; int8 dot-product (VNNI / AMX): {word[f.get('int8_dot')]}; "
            f"native bf16 (AVX512_BF16 / AMX): {word[f.get('native_bf16')]}")


def _reduced_peak_line(name: str, g: dict) -> str:
    """One bf16 / int8 GEMM peak: its rate, or why it was not measured."""
    precision, _, library = name.partition("_")
    how = PEAK_LIBRARY.get(library, library)
    if "gflops" not in g:
        why = g.get("skipped") or g.get("error")
        return f"- {precision} GEMM peak ({how}): not measured: {why}"
    unit = "GOP/s" if precision == "int8" else "GFLOP/s"  # integer operations, not floating-point ones
    return (f"- {precision} GEMM peak ({g.get('n', '')}x{g.get('n', '')}, {how}, best of {g.get('calls', '')} "
            f"calls at the end of the run): **{_f(g['gflops'])} {unit}**")


def _headline(results: dict) -> list[str]:
    h = results.get("headline") or {}
    if not h:
        return []
    out = ["## Key ratios", "",
           "Latency at batch 1 and throughput at the contender's best batch; each ratio is the median of per-round "
           "ratios of calls made in the same interleaved round (so a burst of load on the shared machine cancels).",
           ""]
    if h.get("reference_over_core_latency"):
        out.append(
            f"- Reference-style pipeline (a) vs the core's fused forward (b): **{_x(h['reference_over_core_latency'])}"
            "** the latency (23 dual forwards vs 1)."
        )
    if h.get("core_over_open_clip_latency"):
        out.append(f"- Core (b) vs plain open_clip (c): **{_x(h['core_over_open_clip_latency'])}** the latency "
                   f"(analytical FLOP ratio {_x(h.get('dual_over_plain_flops'))}: the V-V path).")
    for name, r in (h.get("runtime") or {}).items():
        out.append(f"- `{name}`: {_runtime_ratios(r)}.")
    if h.get("core_peak_fraction_best") is not None:
        out.append(
            f"- Core at its best batch reaches {_pct(h['core_peak_fraction_best'])} of the measured fp32 GEMM peak."
        )
    if h.get("tta_over_plain_p50") is not None:
        out.append(f"- AnoCLIP+ (TTA): {_x(h['tta_over_plain_p50'])} the latency of AnoCLIP "
                   f"(+{_f(h.get('tta_overhead_ms_p50'))} ms per image).")
    out.append("")
    return out


def _md_title(results: dict) -> list[str]:
    """Title, warnings (random weights, shared machine, noise gauge), headline and command."""
    cfg = results.get("config", {})
    model = results.get("model", {})
    hl = results.get("hardware_limit", {})
    lines: list[str] = []
    title = f"# AnoCLIP benchmark: {model.get('backbone', cfg.get('backbone'))} @ {model.get('image_size', '?')} px"
    lines += [title, ""]
    if model.get("random_weights"):
        lines += [
            "> **RANDOM WEIGHTS (`--pretrained none`).** The model is randomly initialised: its anomaly maps and "
            "scores are NOT meaningful. Speed figures hold for the architecture; fidelity figures only compare "
            "implementations of the same random model.",
            "",
        ]
    lines += [f"> **Shared machine.** {NOISE_NOTE}", ""]
    if hl.get("spread") is not None:
        lines += [
            f"Noise gauge: the same fp32 GEMM, timed at the start, between the contenders' calls and at the end, "
            f"ran at {_f(hl.get('gflops_min'))} to {_f(hl.get('gflops'))} GFLOP/s (the slowest "
            f"{_pct(hl['spread'])} below the best)"
            + (
                f"; {_pct(gd['slow_fraction'])} of the {gd['calls']} probes between the contenders' calls ran "
                "below 80% of the best"
                if (gd := results.get("gemm_during") or {}).get("slow_fraction") is not None
                else ""
            )
            + f"; load average {results['machine'].get('load_average_start')} "
            f"at the start, {results['machine'].get('load_average_end')} at the end.",
            "",
        ]
    lines += _headline(results)
    lines += ["## Command", "", "```", results.get("command") or "(library call)", "```", ""]
    lines += [f"Started {results.get('started')}, finished {results.get('finished')} "
              f"({_f(results.get('wall_s'))} s). Effort: {'quick' if cfg.get('quick') else 'full'} "
              f"(warm-up {cfg.get('effort', {}).get('warmup')} call(s), then repeated timed calls within a time "
              f"budget; see `config.effort` in {JSON_NAME}).", ""]
    return lines


def _md_machine(results: dict) -> list[str]:
    """Machine, threads, hardware limit, versions, model and artifact."""
    model = results.get("model", {})
    hl = results.get("hardware_limit", {})
    lines: list[str] = []
    m = results.get("machine", {})
    lines += ["## Machine and versions", ""]
    cc = m.get("cpu_count") or {}
    th = results.get("threads") or {}
    lines += [f"- CPU: {m.get('cpu')}; {cc.get('logical')} logical / {cc.get('physical')} physical cores, "
              f"{cc.get('usable')} usable by this process; memory {m.get('memory_gb')} GiB{_isa(m)}",
              f"- GPU: {(m.get('gpu') or {}).get('name', 'none (torch sees no CUDA device)')}",
              f"- Platform: {m.get('platform')}",
              f"- Threads: torch {th.get('torch')}, ONNX Runtime intra-op {th.get('onnxruntime_intra_op')}",
              f"- Hardware limit: {hl.get('what')}: **{_f(hl.get('gflops'))} GFLOP/s** (torch best "
              f"{_f(hl.get('torch_best_gflops'))}, ONNX Runtime best {_f(hl.get('onnxruntime_best_gflops'))})"]
    if results.get("gemm_fp16"):
        lines.append(f"- fp16 GEMM on the GPU: {_f(results['gemm_fp16']['gflops'])} GFLOP/s")
    lines += [_reduced_peak_line(name, g) for name, g in (results.get("gemm_reduced") or {}).items()]
    if any("_" in k for k in results.get("gemm_reduced") or {}):
        lines.append("- A contender's 'of the bf16 / int8 GEMM peak' is relative to the best of these per precision.")
    lines.append("- Versions: " + ", ".join(f"{k} {v}" for k, v in results.get("versions", {}).items()))
    lines += [f"- Model: {model.get('backbone')} ({_f(model.get('parameters_m'))} M visual parameters), "
              f"pretrained `{model.get('pretrained')}`, grid {model.get('patch_grid')}, D = {model.get('embed_dim')}, "
              f"{model.get('dual_blocks')} dual blocks of {model.get('depth')}; load {_f(model.get('load_s'))} s; "
              f"text prototypes for '{model.get('class_name')}' {_f(model.get('text_s'))} s "
              f"({'disk cache' if model.get('text_from_cache') else 'encoded now, 924 sentences'})"]

    art = results.get("artifact")
    if art:
        if "error" in art:
            lines += [f"- Artifact: **{art['error']}**"]
        else:
            how = (f"exported inside this run with `anoclip.export.api.export_artifact` in {_f(art.get('export_s'))} s "
                   "(graph export, reduced precisions, verification"
                   + (", TensorRT engine build" if art.get("tensorrt") else "") + ")"
                   if art.get("built_in_run") else "reused")
            skipped = "; ".join(f"{k}: {v}" for k, v in (art.get("skipped") or {}).items())
            lines += [f"- Artifact: {how}; graphs {', '.join(art.get('models') or {})}"
                      + ("; TensorRT engine: yes" if art.get("tensorrt") else "")
                      + (f"; left out: {skipped}" if skipped else "") + f"; at {art.get('path')}"]
    lines.append("")
    return lines


def _md_devices(results: dict) -> list[str]:
    """Latency/throughput and efficiency tables, one pair per device."""
    cfg = results.get("config", {})
    lines: list[str] = []
    entries = results.get("contenders", [])
    avail = [e for e in entries if e.get("available") and e.get("latency")]
    batches = [str(b) for b in cfg.get("batch_sizes", [])]
    devices = []
    for e in avail:
        if e["device"] not in devices:
            devices.append(e["device"])
    for dev in devices:
        rows_a, rows_b = [], []
        for e in (x for x in avail if x["device"] == dev):
            lat, r = e["latency"], e.get("ratios", {})
            tp = e.get("throughput", {})
            tps = []
            for b in batches:
                t = tp.get(b, {})
                tps.append(_f(t.get("img_s")) if "img_s" in t else ("skip" if "skipped" in t else "-"))
            rows_a.append([f"`{e['name']}`", e["precision"], _f(lat["p50_ms"]), _f(lat["p90_ms"]), _f(lat["p99_ms"]),
                           str(lat["n"]), *tps, _x(r.get("latency_vs_open_clip")),
                           _x(r.get("best_throughput_vs_open_clip"))])
            mem = e.get("memory", {})
            mem_s = f"{_f(mem.get('rss_peak_mb'))} (+{_f(mem.get('rss_delta_mb'))})"
            if mem.get("gpu_peak_mb") is not None:
                mem_s += f" / GPU torch {_f(mem.get('gpu_peak_mb'))}"
            if mem.get("gpu_device_used_peak_mb") is not None:
                mem_s += (f" / GPU device {_f(mem.get('gpu_device_used_peak_mb'))}"
                          f" (+{_f(mem['gpu_device_used_peak_mb'] - (mem.get('gpu_device_used_start_mb') or 0.0))})")
            rows_b.append([f"`{e['name']}`", _f(e["gflops_per_image"]), _f(r.get("achieved_gflops_b1")),
                           _pct(r.get("peak_fraction_b1")), _f(r.get("achieved_gflops_best")),
                           _pct(r.get("peak_fraction_best")), _f(e.get("load_s")), _f(e.get("first_call_s")), mem_s])
        lines += [f"## {_device_name(results, dev)}", ""]
        lines += ["Latency per call at batch 1 (ms) and throughput (img/s) per batch size; ratios to `open_clip` "
                  "(c), paired by interleaved round: latency (lower is faster) and throughput at the contender's "
                  "best batch (higher is faster).", ""]
        lines += _table(["contender", "prec", "p50 ms", "p90 ms", "p99 ms", "n", *[f"img/s b{b}" for b in batches],
                         "latency / (c)", "best img/s / (c)"], rows_a)
        lines += [
            "",
            "Efficiency and resources: GFLOPs per image (analytical), achieved GFLOP/s and its fraction of "
            "the measured fp32 GEMM peak (at batch 1 and at the best batch), model load and first-call time "
            "(s), peak process RSS in MiB (+ growth during the contender; on a GPU also torch's peak allocation "
            "and the "
            "device-wide used memory).",
            "",
        ]
        lines += _table(["contender", "GFLOPs/img", "GFLOP/s b1", "of peak b1", "GFLOP/s best", "of peak best",
                         "load s", "first call s", "peak RSS MiB"], rows_b)
        lines.append("")
    return lines


def _md_contenders(results: dict, png_name: str | None) -> list[str]:
    """Every contender with its label or why it was unavailable, then the plot."""
    entries = results.get("contenders", [])
    avail = [e for e in entries if e.get("available") and e.get("latency")]
    lines: list[str] = []
    lines += ["Contenders:", ""]
    for e in entries:
        lines.append(f"- `{e['name']}`: {e.get('label')}"
                     + ("" if e.get("available") else f" - **unavailable: {e.get('reason')}**"))
    skipped = [
        (e["name"], b, t["skipped"]) for e in avail for b, t in e.get("throughput", {}).items() if "skipped" in t
    ]
    if skipped:
        lines += ["", "Skipped throughput points: " + "; ".join(f"`{n}` b{b}: {why}" for n, b, why in skipped)]
    lines.append("")
    if png_name:
        lines += [f"![latency and throughput vs batch size]({png_name})", ""]
    return lines


def _md_flops(results: dict) -> list[str]:
    """Analytical FLOPs and the FLOP-counter cross-check."""
    lines: list[str] = []
    fl = results.get("flops", {})
    if fl:
        lines += ["## FLOP accounting", ""]
        sp = fl["spec"]
        spec_s = (f"{sp['image_size'][0]} px, patch {sp['patch_size'][0]}, {sp['tokens']} tokens, width {sp['width']}, "
                  f"{sp['layers']} blocks ({sp['dual_blocks']} dual), MLP {sp['mlp_hidden']}, D {sp['embed_dim']}")
        lines += [f"Analytical count from the ViT config ({spec_s}): dual path (AnoCLIP) **{_f(fl['dual_gflops'])} "
                  f"GFLOPs**/image, plain open_clip **{_f(fl['plain_gflops'])} GFLOPs**/image "
                  f"(V-V overhead {_pct(fl['dual_gflops'] / fl['plain_gflops'] - 1)}). The reference-style pipeline "
                  f"runs 23 dual forwards per image."]
        cnt = fl.get("counter", {})
        if "dual" in cnt:
            lines.append(f"Cross-check with {cnt['tool']} on this model: dual {_f(cnt['dual'] / 1e9)} GFLOPs "
                         f"(rel. diff {cnt['dual_rel_diff']:+.2e}), plain {_f(cnt['plain'] / 1e9)} GFLOPs "
                         f"(rel. diff {cnt['plain_rel_diff']:+.2e}).")
        elif cnt:
            lines.append(f"FLOP counter cross-check failed: {cnt.get('error')}")
        lines.append("")
    return lines


def _md_fidelity(results: dict) -> list[str]:
    """Each runtime contender against the fp32 core."""
    lines: list[str] = []
    fd = results.get("fidelity")
    lines += ["## Fidelity vs the fp32 core", ""]
    if fd:
        lines += [f"Reference: {fd['reference']}; {fd['images']} image(s). Pearson and top-1% IoU: mean over images "
                  "(worst image).", ""]
        rows = []
        for name, f in fd["by_contender"].items():
            rows.append([f"`{name}`", _f(f["map_max_abs"]), _f(f["map_mean_abs"]), _f(f["score_max_abs"]),
                         f"{f['pearson']['mean']:.6f} ({f['pearson']['worst']:.6f})",
                         f"{f['top_iou']['mean']:.3f} ({f['top_iou']['worst']:.3f})",
                         _f(f.get("prototype_max_abs"))])
        lines += _table(["contender", "map max abs", "map mean abs", "score max abs", "map Pearson",
                         "top-1% pixel IoU", "text prototypes max abs"], rows)
        lines += ["", "The runtime uses the artifact's own text prototypes (last column: their difference from the "
                  "core's), so these errors cover the whole exported path."]
        rm = fd.get("reference_maps")
        if rm:
            lines.append(f"The reference maps span [{rm['min']:.4f}, {rm['max']:.4f}] with a within-image std of "
                         f"{rm['std_within_image_mean']:.2e}: the smaller that spread (random weights give nearly "
                         "flat maps), the more a small absolute error reorders the top 1% of pixels.")
        lines.append("")
    else:
        lines.append("Not measured (no runtime contender ran, or the section was off).")
    lines.append("")
    return lines


def _strip_line(e: dict) -> str:
    """One strip variant's figures."""
    return (f"`{e.get('label', e['backend'])}`: **{e['strips_per_s']:.4f} strips/s** "
            f"({_f(e['seconds_per_strip']['p50_ms'] / 1000)} s per strip, {_f(e['tiles_per_s'])} tiles/s, "
            f"{_f(e['megapixels_per_s'])} MPix/s, n = {e['repeats']})")


def _md_linescan(results: dict) -> list[str]:
    """The line-scan strip figure: every variant of the fastest contender, the baseline, paired ratios."""
    lines: list[str] = ["## Line-scan strip", ""]
    ls = results.get("linescan")
    if not ls or "error" in ls:
        return lines + [f"Not measured: {(ls or {}).get('error', 'section off')}", ""]
    base = results.get("linescan_baseline")
    variants = results.get("linescan_variants") or [ls]
    several = len(variants) + bool(base and "error" not in base) > 1
    lines += [f"One {ls['strip']['width']} x {ls['strip']['height']} strip through `{ls['call']}` (the runtime "
              f"tiler): {ls['tiles_per_strip']} tiles of {ls['tile']} px (overlap {ls['overlap']}), batches of "
              f"{ls['tile_batch']}" + ("; the strips of every variant below were timed interleaved, one each per "
                                       "round." if several else "."), ""]
    lines += [f"- {_strip_line(e)}" for e in variants]
    if base and "error" not in base:
        lines += [f"- baseline {_strip_line(base)}"]
    lines.append("")
    if base and "error" in base:
        lines += [f"No baseline figure: {base['error']}.", ""]
    streams = next((e for e in variants if e.get("speedup_vs_one_stream_paired")), None)
    if streams:
        lines += [f"{streams['streams']} OpenVINO streams vs one, paired by round: "
                  f"**{_x(streams['speedup_vs_one_stream_paired'])}**.", ""]
    if base and "error" not in base:
        paired = ls.get("speedup_vs_baseline_paired")
        ratio = paired or ls["strips_per_s"] / base["strips_per_s"]
        how = "median of the per-round ratios" if paired else "ratio of the medians"
        than = _speed(ratio, f"`{base['backend']}`", bold=True)
        lines += [f"The fastest runtime contender by batch throughput, `{ls.get('label', ls['backend'])}`, runs the "
                  f"strip {than} in this run ({how}).", ""]
    split = results.get("linescan_network_split")
    if split:
        parts = [f"`{r['label']}` {r['network_s']:.2f} s of its {r['strip_s']:.2f} s ({_f(r['img_per_s'])} img/s at "
                 f"batch {r['tile_batch']}; the rest {r['rest_s']:.2f} s)" for r in split["runners"]]
        lines += [f"Network and the rest: at each engine's own throughput measured in the batch rounds above, the "
                  f"strip's tiles take {'; '.join(parts)}. The rest is pre- and post-processing and the cores it "
                  f"shares with the network; with it free for both, the strip ratio would be the network ratio, "
                  f"**{_x(split['network_only_ratio'])}**.", ""]
    bound = results.get("linescan_bound")
    if bound:
        lines += [f"Bound: at the best int8 GEMM rate of this run ({_f(bound['int8_peak_gops'])} GOP/s) the "
                  f"{bound['tiles']} tiles of {_f(bound['gflops_per_tile'])} GFLOP take at least "
                  f"{bound['min_seconds_per_strip']:.2f} s even with free pre- and post-processing, so no engine "
                  f"can run this strip more than **{_x(bound['max_speedup_vs_baseline'])}** faster than "
                  f"`{base['backend'] if base else 'the baseline'}` "
                  f"({bound['baseline_seconds_per_strip']:.2f} s) on this machine.", ""]
    return lines


def _md_tta(results: dict) -> list[str]:
    """The AnoCLIP+ cost."""
    lines: list[str] = []
    tta = results.get("tta")
    lines += ["## AnoCLIP+ (test-time adaptation) cost", ""]
    if tta:
        lines += [
            f"Batch 1, {tta['steps']} AdamW steps; predict(tta=True) and predict(tta=False) back to back in "
            f"each of {tta['predict_ms']['n']} rounds: p50 {_f(tta['predict_tta_ms']['p50_ms'])} ms vs "
            f"{_f(tta['predict_ms']['p50_ms'])} ms; paired by round, AnoCLIP+ costs **{_f(tta['overhead_ms_p50'])} "
            f"ms more per image ({_x(tta['overhead_ratio_p50'])} the latency)**. The adaptation alone "
            f"(adapt_tokens on the same tokens, n = {tta['adapt_only_ms']['n']}): p50 "
            f"{_f(tta['adapt_only_ms']['p50_ms'])} ms = {_pct(tta['adapt_fraction_of_predict'])} of a "
            "predict call.",
            "",
        ]
    else:
        lines += ["Not measured (section off).", ""]
    return lines


def _md_fewshot(results: dict) -> list[str]:
    """The reference bank's cost against zero-shot."""
    fs = results.get("fewshot")
    lines = ["## Few-shot reference bank cost", ""]
    if not fs or "error" in fs:
        return lines + [f"Not measured: {(fs or {}).get('error', 'section off')}", ""]
    lines += [f"`{fs['call']}` on `{fs['backend']}`, a {fs['image'][1]} x {fs['image'][0]} image "
              f"({fs['patch_grid'][0]} x {fs['patch_grid'][1]} patches, D = {fs['embed_dim']}), the variants "
              f"interleaved in {fs['rounds']} rounds; ratio = median over rounds of the paired ratio to zero-shot. "
              "K-shot banks hold the graph's embeddings of K synthetic images; the 10k bank holds 10,000 random "
              "unit vectors (the search cost depends only on N x D).", ""]
    rows = [[name, str(v["bank_size"]) if v["bank_size"] else "-", _f(v["latency"]["p50_ms"]),
             _f(v["latency"]["p90_ms"]), _x(v["ratio_to_zero_shot"])] for name, v in fs["variants"].items()]
    lines += _table(["bank", "patches", "p50 ms", "p90 ms", "vs zero-shot"], rows)
    lines += ["", f"Target ({fs['target']}): **{'met' if fs['meets_target'] else 'NOT met'}**.", ""]
    return lines


def _md_method(results: dict) -> list[str]:
    """How it was measured, and the run's notes."""
    lines: list[str] = []
    lines += [
        "## How it was measured",
        "",
        "- Same backbone, image size and inputs (seeded synthetic RGB images, pre-processed once by "
        "`anoclip_core.transform`) for every contender; each call includes its own host-to-device copy.",
        "- (a) `reference`: `predict(views=True)`: one dual forward for the map plus the 22 views in one "
        "batched dual forward; (b) `core`: `predict()`; (c) `open_clip`: `model.clip.encode_image` (no "
        "scores); (d) runtime: `runtime.Detector.load(artifact, backend, precision)`, timed call "
        "`detector.infer_pixels` plus the runtime's map post-processing at S x S.",
        "- Per contender, one after another: the first call (lazy initialisation / engine build: `first call "
        "s`), warm-up calls, one warm-up call at every batch size (batches whose estimated call time exceeds "
        "the effort's limit are skipped, and say so); peak memory is taken here (process RSS sampled every "
        "10 ms with psutil; on a GPU also torch's peak allocation and the device-wide used memory).",
        "- Then the timed calls, interleaved: one call of every contender per round (order rotating), plus "
        "an fp32 GEMM probe, each after 100 ms of idle time (ONNX Runtime's threads spin for 20-50 ms after a "
        "run and would slow whatever runs next); each contender stops at its repeat count or when its time budget "
        "is spent, "
        "never before its minimum. p50/p90/p99 use linear interpolation (with few samples p99 is about the "
        "maximum); throughput is batch size / median call time. Ratios between contenders are medians of "
        "per-round ratios (`time.perf_counter`; CUDA synchronised where torch uses the GPU).",
        "- Hardware limit: the best fp32 GEMM rate seen on the same device and threads in this run (torch, "
        "and ONNX Runtime's MatMul on a CPU); GFLOPs per image are analytical (checked against "
        "`FlopCounterMode` above). Reduced precisions have other ceilings: 'of the fp32 GEMM peak' is "
        "relative to fp32, and bf16 / int8 contenders also get 'of the bf16 / int8 GEMM peak': the best of "
        "torch (torch.mm in bf16, torch._int_mm), ONNX Runtime's MatMulInteger (int8) and OpenVINO's own MatMul, "
        "timed at the end of the run (one the CPU has no native instructions for is not timed: see above).",
        "",
    ]
    for note in results.get("notes", []):
        lines.append(f"- Note: {note}")
    lines.append("")
    return lines


def markdown(results: dict, png_name: str | None = PNG_NAME) -> str:
    """The report page: one section function per heading, in reading order."""
    lines: list[str] = []
    for section in (_md_title, _md_machine, _md_devices):
        lines += section(results)
    lines += _md_contenders(results, png_name)
    for section in (_md_flops, _md_fidelity, _md_linescan, _md_tta, _md_fewshot, _md_method):
        lines += section(results)
    return "\n".join(lines)


def plot(results: dict, path: Path) -> Path:
    """Latency per call and throughput vs batch size, one line per contender (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    entries = [e for e in results.get("contenders", []) if e.get("available") and e.get("throughput")]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 5.0), dpi=110)
    markers = "os^vD<>pPX*h"
    for i, e in enumerate(entries):
        pts = sorted((int(b), t) for b, t in e["throughput"].items() if "img_s" in t)
        if not pts:
            continue
        bs = [b for b, _ in pts]
        lat = [b / t["img_s"] * 1000 for b, t in pts]  # median call time, ms
        tp = [t["img_s"] for _, t in pts]
        style = "--" if e["group"] == "torch" else "-"
        kw = dict(marker=markers[i % len(markers)], linestyle=style, label=f"{e['name']} ({e['device']})")
        ax1.plot(bs, lat, **kw)
        ax2.plot(bs, tp, **kw)
        if len(bs) == 1 and len(e["throughput"]) > 1:  # larger batches skipped: say so on the plot
            for ax, y in ((ax1, lat[0]), (ax2, tp[0])):
                ax.annotate(f"  {e['name']}: batch 1 only", (bs[0], y), fontsize=7, va="center", color="dimgray")
    limit = results.get("hardware_limit", {}).get("gflops")
    fl = results.get("flops", {})
    if limit and fl.get("dual_gflops"):
        ax2.axhline(limit / fl["dual_gflops"], color="gray", linestyle=":", linewidth=1.2,
                    label=f"dual-path ceiling at fp32 GEMM peak ({limit:.0f} GFLOP/s)")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.grid(True, which="both", alpha=0.3)
        bsz = sorted({int(b) for e in entries for b, t in e["throughput"].items() if "img_s" in t})
        if bsz:
            ax.set_xticks(bsz)
            ax.set_xticklabels([str(b) for b in bsz])
    ax1.set_ylabel("median latency per call (ms, log)")
    ax1.set_title("latency per batch call")
    ax2.set_ylabel("throughput (images/s, log)")
    ax2.set_title("throughput")
    handles, labels = ax2.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, max(1, len(labels))), fontsize=8, frameon=False)
    model = results.get("model", {})
    dev = results.get("device", "?")
    title = f"AnoCLIP bench - {model.get('backbone')} @ {model.get('image_size')} px - {_device_name(results, dev)}"
    sub = "shared/noisy machine: compare ratios within this run"
    if model.get("random_weights"):
        sub = "RANDOM WEIGHTS - " + sub
    fig.suptitle(f"{title}\n{sub}", fontsize=10)
    rows = max(1, math.ceil(len(labels) / 4))
    fig.tight_layout(rect=(0, 0.03 + 0.04 * rows, 1, 0.95))
    fig.savefig(path)
    plt.close(fig)
    return path


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return repr(o)


def write_report(results: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write JSON, PNG and Markdown into ``out_dir`` (created) -> their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / JSON_NAME, "png": out / PNG_NAME, "markdown": out / MD_NAME}
    paths["json"].write_text(json.dumps(results, indent=2, default=_json_default, allow_nan=True) + "\n")
    try:
        plot(results, paths["png"])
        png = PNG_NAME
    except Exception as err:  # noqa: BLE001 - the numbers matter more than the picture
        results.setdefault("notes", []).append(f"plot failed: {type(err).__name__}: {err}")
        paths.pop("png")
        png = None
    paths["markdown"].write_text(markdown(results, png))
    return paths
