"""Stress: concurrent ``add-class`` / ``calibrate`` writers against a loader (not collected by pytest).

Each round runs, at the same time, in separate processes: two ``add-class`` runs (a new class
each), two ``calibrate`` runs (bottle and carpet, each with a quantile unique to the round), while
another process loads the artifact (``Detector.load``: manifest, sha256 of every file, text
embeddings, calibration) in a loop for the whole run. After each round the artifact must hold
both new classes (manifest and npz) and both calibrations with this round's quantiles, with the
manifest's calibration record matching the file. Rounds go on until ``--rounds`` are done and the
loader has made ``--min-loads`` loads. Prints the figures; exit 0 only with 0 lost writes and 0
false alarms (a load that failed)::

    PYTHONPATH=. python tests/runtime/stress_writers.py --rounds 50 --min-loads 2000
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
CONFIG_DIR = HERE.parents[1] / "configs"
BASE_CLASSES = ("bottle", "carpet")
ADDERS, CALIBRATED = 2, BASE_CLASSES


def quantile(round_no: int, k: int) -> float:
    """A quantile unique to (round, calibrator): a lost write shows as a stale value."""
    return round(0.5 + (round_no % 400) * 0.001 + k * 0.0005, 6)


def build(root: Path) -> tuple[Path, Path]:
    """A tiny artifact (bottle, carpet) and three good images."""
    import cv2
    import numpy as np
    import open_clip

    from anoclip.export.api import ExportConfig, export_artifact

    open_clip.add_model_config(CONFIG_DIR)
    art = export_artifact(ExportConfig(backbone="anoclip-tiny", classes=list(BASE_CLASSES), pretrained=None,
                                       out=root / "art", text_cache=None, progress=False))
    good = root / "good"
    good.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        cv2.imwrite(str(good / f"g{i}.png"), (rng.random((40, 48, 3)) * 255).astype(np.uint8))
    return Path(art), good


def _quiet() -> None:
    import logging

    logging.disable(logging.WARNING)  # random-weights banners from every process


def _rounds(kind: str, k: int, barrier, stop, results, op) -> None:
    """Run ``op(r)`` once per round, in step with the other writers; report each outcome, never raise."""
    _quiet()
    r = 0
    while True:
        barrier.wait()
        if stop.is_set():
            return
        try:
            op(r)
            results.put((kind, k, r, None))
        except Exception as err:  # noqa: BLE001 - reported, not raised
            results.put((kind, k, r, f"{type(err).__name__}: {err}"))
        barrier.wait()
        r += 1


def adder(k: int, art: str, barrier, stop, results) -> None:
    from anoclip.export.api import add_class

    _rounds("add", k, barrier, stop, results,
            lambda r: add_class(art, f"c{k}r{r}", text_cache=None, progress=False))


def calibrator(k: int, art: str, good: str, barrier, stop, results) -> None:
    from anoclip.runtime.calibration import calibrate
    from anoclip.runtime.detector import Detector

    def op(r: int) -> None:
        with Detector.load(art, backend="ort-cpu", threads=1) as det:
            calibrate(det, [good], CALIBRATED[k], quantile(r, k))

    _rounds("cal", k, barrier, stop, results, op)


def loader(art: str, stop, counts, failures) -> None:
    from anoclip.runtime.detector import Detector

    _quiet()
    first: list[str] = []
    while not stop.is_set():
        try:
            with Detector.load(art, backend="ort-cpu", threads=1):
                pass
            counts[0] += 1
        except Exception as err:  # noqa: BLE001
            counts[1] += 1
            if len(first) < 5:
                first.append(f"{type(err).__name__}: {err}")
    failures.put(first)  # once, small: a full pipe would block this process's exit


def check_round(art: Path, r: int) -> list[str]:
    """What round ``r`` lost: each missing class or stale calibration is one lost write."""
    from anoclip.runtime.detector import read_artifact
    from anoclip_core.errors import ArtifactError

    try:
        manifest, protos, cal, _banks = read_artifact(art, verify=True)
    except ArtifactError as err:
        return [f"round {r}: the artifact is inconsistent after the round: {err}"]
    lost = []
    for k in range(ADDERS):
        name = f"c{k}r{r}"
        if name not in manifest["text"]["classes"] or name not in protos:
            lost.append(f"round {r}: class {name} missing")
    for k, cls in enumerate(CALIBRATED):
        got = cal.get("classes", {}).get(cls, {}).get("quantile")
        if got != quantile(r, k):
            lost.append(f"round {r}: calibration of {cls} has quantile {got}, expected {quantile(r, k)}")
    return lost


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--min-loads", type=int, default=0)
    ap.add_argument("--max-rounds", type=int, default=1000, help="stop here even if --min-loads is not reached")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(HERE.parents[2]))
    _quiet()
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="anoclip-stress-") as tmp:
        art, good = build(Path(tmp))
        barrier = ctx.Barrier(ADDERS + len(CALIBRATED) + 1)
        stop, stop_loads = ctx.Event(), ctx.Event()
        results, failures = ctx.Queue(), ctx.Queue()
        counts = ctx.Array("l", 2)
        procs = [ctx.Process(target=adder, args=(k, str(art), barrier, stop, results)) for k in range(ADDERS)]
        procs += [ctx.Process(target=calibrator, args=(k, str(art), str(good), barrier, stop, results))
                  for k in range(len(CALIBRATED))]
        load_proc = ctx.Process(target=loader, args=(str(art), stop_loads, counts, failures))
        for p in [*procs, load_proc]:
            p.start()
        t0 = time.time()
        lost: list[str] = []
        writer_errors: list[str] = []
        r = 0
        while r < args.max_rounds and (r < args.rounds or counts[0] < args.min_loads):
            barrier.wait()
            barrier.wait()
            for _ in range(ADDERS + len(CALIBRATED)):
                kind, k, rr, err = results.get(timeout=600)
                if err:
                    writer_errors.append(f"{kind}{k} round {rr}: {err}")
            lost += check_round(art, r)
            r += 1
        stop.set()
        barrier.wait()
        stop_loads.set()
        alarms = failures.get(timeout=120)
        for p in [*procs, load_proc]:
            p.join(timeout=60)
            if p.is_alive():
                p.terminate()
    report = {"rounds": r, "writes": r * (ADDERS + len(CALIBRATED)), "lost_writes": len(lost),
              "writer_errors": len(writer_errors), "loads": counts[0], "false_alarms": counts[1],
              "seconds": round(time.time() - t0, 1)}
    for line in (lost + writer_errors + alarms)[:10]:
        print("  " + line.splitlines()[0])
    print(json.dumps(report))
    return 0 if not lost and not writer_errors and counts[1] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
