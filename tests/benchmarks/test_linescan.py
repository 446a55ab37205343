"""The line-scan section's logic with fake detectors on a fake clock (no timing of real work)."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from anoclip.benchmarks import linescan, stats


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeDetector:
    """``predict(strip, class, tile=True, batch=)`` costing ``cost`` fake seconds; logs its calls."""

    def __init__(self, name: str, cost: float, clock: Clock, log: list, backend: str = "ort-cpu") -> None:
        self.name, self.cost, self.clock, self.log = name, cost, clock, log
        self.backend_name, self.artifact_dir, self.precision = backend, "/art", "int8"
        self.closed = False

    def predict(self, strip, class_name, tile, batch):
        assert tile is True and class_name == "bottle"
        self.log.append(self.name)
        self.clock.now += self.cost
        return SimpleNamespace(tiles=5, timing={"total_ms": self.cost * 1000},
                               anomaly_map=np.zeros(strip.shape[:2], np.float32))

    def close(self) -> None:
        self.closed = True


@pytest.fixture()
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(stats.time, "perf_counter", c)
    monkeypatch.setattr(linescan, "GAP_S", 0.0)
    return c


def test_paired_speedup_is_the_median_of_per_round_ratios():
    from anoclip.benchmarks.stats import paired_ratio

    assert paired_ratio([2.0, 4.0, 6.0], [1.0, 1.0, 3.0]) == 2.0  # ratios 2, 4, 2
    assert paired_ratio([], []) is None


def test_openvino_gets_a_streams_variant_and_others_do_not(clock):
    log: list = []
    loads: list = []

    def load(art, **kw):
        loads.append((art, kw))
        return FakeDetector("ov-2s", 1.0, clock, log, "openvino")

    ov = SimpleNamespace(name="openvino-int8", detector=FakeDetector("ov", 1.5, clock, log, "openvino"))
    ort = SimpleNamespace(name="ort-cpu-int8", detector=FakeDetector("ort", 3.0, clock, log))
    runners, notes = linescan.strip_runners(ov, ort, cores=2, load=load)
    assert [(r.key, r.streams, r.owned) for r in runners] == [("fastest", 1, False), ("fastest_streams", 2, True),
                                                             ("baseline", 1, False)]
    assert loads == [("/art", {"backend": "openvino", "precision": "int8", "verify": False, "threads": 2,
                               "streams": 2})] and notes == []
    assert runners[1].label == "openvino-int8 (2 streams)"
    assert [r.key for r in linescan.strip_runners(ort, None, cores=2, load=load)[0]] == ["fastest"]
    assert [r.key for r in linescan.strip_runners(ov, None, cores=1, load=load)[0]] == ["fastest"]

    def broken(art, **kw):
        raise RuntimeError("no streams here")

    runners, notes = linescan.strip_runners(ov, ort, cores=2, load=broken)
    assert [r.key for r in runners] == ["fastest", "baseline"]
    assert notes == ["openvino-int8 with 2 streams not run: RuntimeError: no streams here"]


def test_strips_interleave_in_rotating_order_and_ratios_come_from_the_pairs(clock):
    log: list = []
    runners = [linescan.StripRunner("fastest", "openvino-int8", 1, FakeDetector("a", 1.5, clock, log, "openvino")),
               linescan.StripRunner("fastest_streams", "openvino-int8", 2, FakeDetector("b", 1.0, clock, log)),
               linescan.StripRunner("baseline", "ort-cpu-int8", 1, FakeDetector("c", 3.0, clock, log))]
    strip = np.zeros((64, 300, 3), np.uint8)
    out = linescan.measure_linescan(runners, strip, "bottle", rounds=1, batch=4)  # raised to MIN_ROUNDS = 3
    assert log == ["a", "b", "c"] + ["a", "b", "c", "b", "c", "a", "c", "a", "b"]  # warm-ups, then rotating rounds
    best, base = out["linescan"], out["linescan_baseline"]
    assert best["label"] == "openvino-int8 (2 streams)" and best["repeats"] == 3
    assert best["seconds_per_strip"]["p50_ms"] == pytest.approx(1000.0)
    assert best["speedup_vs_baseline_paired"] == pytest.approx(3.0)  # 3.0 s / 1.0 s every round
    assert best["speedup_vs_one_stream_paired"] == pytest.approx(1.5)
    assert out["linescan_variants"][0]["speedup_vs_baseline_paired"] == pytest.approx(2.0)
    assert base["strips_per_s"] == pytest.approx(1 / 3.0) and best["tiles_per_s"] == pytest.approx(5.0)
    assert best["map_shape"] == [64, 300] and best["strip"] == {"height": 64, "width": 300}


def test_no_baseline_reason_says_which_case():
    ort = SimpleNamespace(name="ort-cpu-int8")
    ov = SimpleNamespace(name="openvino-int8")
    assert "is ort-cpu-int8 itself" in linescan.no_baseline_reason("ort-cpu-int8", [ort, ov])
    assert "did not run" in linescan.no_baseline_reason("openvino-int8", [ov])
    assert "unavailable" in linescan.no_baseline_reason("openvino-int8", [ov, ort])


def _bound_results(**over):
    results = {"flops": {"dual_gflops": 50.0},
               "gemm_reduced": {"int8": {"gflops": 400.0}, "int8_onnxruntime": {"gflops": 500.0},
                                "int8_openvino": {"error": "x"}, "bf16": {"gflops": 900.0}},
               "linescan_baseline": {"backend": "ort-cpu-int8", "tiles_per_strip": 20,
                                     "seconds_per_strip": {"p50_ms": 6000.0}}}
    results.update(over)
    return results


def test_strip_bound_is_the_tiles_at_the_best_int8_rate():
    # 20 tiles x 50 GFLOP / 500 GOP/s (the best int8 rate; bf16 is not an int8 rate) = 2 s; baseline 6 s -> 3x
    bound = linescan.speedup_bound(_bound_results())
    assert bound["int8_peak_gops"] == 500.0 and bound["min_seconds_per_strip"] == pytest.approx(2.0)
    assert bound["baseline_seconds_per_strip"] == pytest.approx(6.0)
    assert bound["max_speedup_vs_baseline"] == pytest.approx(3.0)
    assert linescan.speedup_bound(_bound_results(linescan_baseline={"error": "not run"})) is None
    assert linescan.speedup_bound(_bound_results(gemm_reduced={"int8": {"skipped": "no VNNI"}})) is None
    assert linescan.speedup_bound(_bound_results(flops={})) is None


def _strip(backend: str, seconds: float) -> dict:
    return {"backend": backend, "label": backend, "streams": 1, "strip": {"width": 16384, "height": 1024},
            "call": "Detector.predict(strip, tile=True)", "tiles_per_strip": 20, "tile": 1024, "overlap": 256,
            "tile_batch": 4, "repeats": 3, "seconds_per_strip": {"p50_ms": seconds * 1000}, "strips_per_s": 1 / seconds,
            "megapixels_per_s": 16.8 / seconds, "tiles_per_s": 20 / seconds}


def test_report_states_the_strip_bound():
    from anoclip.benchmarks.report import _md_linescan

    results = _bound_results(linescan=dict(_strip("openvino-int8", 4.0), speedup_vs_baseline_paired=1.5),
                             linescan_baseline=_strip("ort-cpu-int8", 6.0))
    results["linescan_bound"] = linescan.speedup_bound(results)
    text = "\n".join(_md_linescan(results))
    assert ("Bound: at the best int8 GEMM rate of this run (500 GOP/s) the 20 tiles of 50.00 GFLOP take at least 2.00 s"
            in text)
    assert "no engine can run this strip more than **3.00x** faster than `ort-cpu-int8` (6.00 s)" in text


def _split_results(**over):
    fast, base = _strip("openvino-int8", 4.0), _strip("ort-cpu-int8", 6.0)
    streams = dict(_strip("openvino-int8", 3.9), streams=2, label="openvino-int8 (2 streams)")
    results = {"linescan_variants": [fast, streams], "linescan_baseline": base,
               "contenders": [{"name": "openvino-int8", "throughput": {"1": {"img_s": 4.0}, "4": {"img_s": 8.0}}},
                              {"name": "ort-cpu-int8", "throughput": {"4": {"img_s": 4.0}}}]}
    results.update(over)
    return results


def test_network_split_charges_the_tiles_at_each_engines_own_rate():
    # 20 tiles at 8 img/s = 2.5 s of the fast strip's 4 s (rest 1.5 s); 20 at 4 img/s = 5 s of 6 s (rest 1 s);
    # network-only ratio 5 / 2.5 = 2x; the 2-stream variant has no throughput of its own and is left out
    split = linescan.network_split(_split_results())
    assert [r["label"] for r in split["runners"]] == ["openvino-int8", "ort-cpu-int8"]
    fast, base = split["runners"]
    assert fast["network_s"] == pytest.approx(2.5) and fast["rest_s"] == pytest.approx(1.5)
    assert base["network_s"] == pytest.approx(5.0) and base["rest_s"] == pytest.approx(1.0)
    assert split["network_only_ratio"] == pytest.approx(2.0)
    assert linescan.network_split(_split_results(linescan_baseline={"error": "not run"})) is None
    assert linescan.network_split(_split_results(contenders=[])) is None


def test_report_states_the_network_split():
    from anoclip.benchmarks.report import _md_linescan

    results = _split_results(linescan=dict(_strip("openvino-int8", 4.0), speedup_vs_baseline_paired=1.5))
    results["linescan_network_split"] = linescan.network_split(results)
    text = "\n".join(_md_linescan(results))
    assert "`openvino-int8` 2.50 s of its 4.00 s (8.00 img/s at batch 4; the rest 1.50 s)" in text
    assert "`ort-cpu-int8` 5.00 s of its 6.00 s" in text and "**2.00x**" in text
