"""Pre-processing overlapped with inference in ``Detector``: predict_batch / iter_predict, the tiler,
StripStream and the CLI give the same results bit for bit with prefetch on and off; a bad image
still fails alone; the next batch's pre-processing really runs while the backend is busy (events,
no timings); no thread is left behind when a generator is closed early or something raises."""
from __future__ import annotations

import json
import threading

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from rt_fakes import PatchMeanBackend, fake_detector

from anoclip.runtime.cli import infer_main
from anoclip.runtime.pipeline import Pipeline
from anoclip.runtime.tiler import StagedInfer, TileBatch, predict_tiled

WAIT_S = 30.0  # only reached when the overlap is missing


def _images(folder, n=7, seed=5):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = folder / f"im{i}.png"
        cv2.imwrite(str(p), cv2.GaussianBlur((rng.random((40 + 7 * i, 64 + 3 * i, 3)) * 255).astype(np.uint8),
                                             (5, 5), 0))
        paths.append(str(p))
    return paths


def _same(a, b):
    """Every observable of two result lists equal, maps bit for bit."""
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert (x.path, x.error, x.score, x.label, x.size, x.tiles, x.index, x.y0) == \
               (y.path, y.error, y.score, y.label, y.size, y.tiles, y.index, y.y0)
        assert (x.anomaly_map is None) == (y.anomaly_map is None)
        if x.anomaly_map is not None:
            assert x.anomaly_map.tobytes() == y.anomaly_map.tobytes()
        assert [r.to_dict() for r in x.regions] == [r.to_dict() for r in y.regions]


@pytest.fixture()
def mixed_inputs(tmp_path):
    """Good files, a corrupt file and a missing one mid-batch, and arrays."""
    paths = _images(tmp_path / "imgs")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    rng = np.random.default_rng(9)
    arrays = [(rng.random((50, 70, 3)) * 255).astype(np.uint8), rng.random((33, 45)).astype(np.float32)]
    return paths[:3] + [str(tmp_path / "bad.png"), str(tmp_path / "missing.png")] + arrays + paths[3:]


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_batch_results_identical_with_and_without_prefetch(tiny_detector, mixed_inputs, batch):
    off = tiny_detector.predict_batch(mixed_inputs, "bottle", batch=batch, prefetch=0)
    for depth in (1, 2):
        _same(off, tiny_detector.predict_batch(mixed_inputs, "bottle", batch=batch, prefetch=depth))
    # the bad image mid-batch fails alone; every other image has a result
    assert [i for i, r in enumerate(off) if not r.ok] == [3, 4]
    assert "cannot decode" in off[3].error and "not found" in off[4].error


ALONE_TOL = 1e-6  # ONNX Runtime's MLAS picks other GEMM blockings for other batch sizes on some CPUs
# (an AVX2 EPYC: 3e-8 on a score); a neighbour leaking in moves a score by the spread between images


def test_each_batch_result_equals_the_image_alone(tiny_detector, mixed_inputs):
    """Batch neighbours (and the prefetched next batch) do not change an image's result, beyond the
    engine's batch-size rounding, which is far below the difference between two images."""
    batched = tiny_detector.predict_batch(mixed_inputs, "bottle", batch=4)
    ok = [r for r in batched if r.ok]
    scores = sorted(r.score for r in ok)
    gaps = np.diff(scores)
    assert gaps.min() > 10 * ALONE_TOL  # the tolerance is below the signal
    for image, res in zip(mixed_inputs, batched, strict=True):
        if not res.ok:
            continue
        alone = tiny_detector.predict(image, "bottle")
        assert (res.path, res.error, res.label, res.size, res.tiles) == \
               (alone.path, alone.error, alone.label, alone.size, alone.tiles)
        assert abs(res.score - alone.score) <= ALONE_TOL
        assert np.abs(res.anomaly_map - alone.anomaly_map).max() <= ALONE_TOL


def test_tiled_results_identical_with_and_without_prefetch(tiny_detector, mixed_inputs):
    kw = dict(tile=True, tile_size=24, overlap=6, batch=3)
    off = tiny_detector.predict_batch(mixed_inputs, "bottle", prefetch=0, **kw)
    _same(off, tiny_detector.predict_batch(mixed_inputs, "bottle", prefetch=1, **kw))
    assert [i for i, r in enumerate(off) if not r.ok] == [3, 4] and all(r.tiles > 1 for r in off if r.ok)


@pytest.mark.parametrize("stitch", [True, False])
def test_stream_results_identical_with_and_without_prefetch(tiny_detector, stitch):
    rng = np.random.default_rng(2)
    scan = cv2.GaussianBlur((rng.random((260, 900, 3)) * 255).astype(np.uint8), (7, 7), 0)
    cuts = [0, 50, 130, 150, 260]
    out = {}
    for depth in (0, 1):
        s = tiny_detector.stream("bottle", stitch=stitch, batch=4, tile_size=64, prefetch=depth)
        res = [r for a, b in zip(cuts, cuts[1:], strict=False) for r in s.push(scan[a:b])] + s.flush()
        out[depth] = res
    assert len(out[0]) == len(cuts) - 1 and all(r.ok for r in out[0])
    _same(out[0], out[1])


def test_cli_no_prefetch_gives_the_same_lines(tiny_artifact, tmp_path):
    paths = _images(tmp_path / "imgs", 5)
    lines = {}
    for flag in ([], ["--no-prefetch"]):
        res = CliRunner().invoke(infer_main, [str(tiny_artifact), *paths, "--class", "carpet", "--batch", "2",
                                              "--backend", "ort-cpu", "--quiet", *flag])
        assert res.exit_code == 0, res.output
        lines[bool(flag)] = [{k: v for k, v in json.loads(ln).items() if k != "timing"}
                             for ln in res.stdout.splitlines() if ln.startswith("{")]
    assert len(lines[False]) == 5 and lines[False] == lines[True]


# overlap: the backend blocks in run() until the NEXT batch's pre-processing has happened ---------

class WaitingBackend(PatchMeanBackend):
    """Backend call number ``call`` (0: the first) says it started, then waits up to ``wait_s`` for
    ``go`` and records whether it came."""

    def __init__(self, wait_s: float, call: int = 0) -> None:
        super().__init__()
        self.started, self.go = threading.Event(), threading.Event()
        self.wait_s, self.call, self.saw = wait_s, call, []

    def run(self, pixels, prototypes, outputs=("patch_probs", "image_scores")):
        if self.calls == self.call:
            self.started.set()
            self.saw.append(self.go.wait(self.wait_s))
        return super().run(pixels, prototypes, outputs)


def _recording_detector(first_of_next: int, overlaps: bool):
    """A detector whose pre_process call number ``first_of_next`` (the first image or tile of the
    second batch) signals the blocked backend, but only once that backend call has started: so
    the signal proves the two ran at the same time (preparing ahead before ``run`` would not do)."""
    wait_s = WAIT_S if overlaps else 0.2
    det = fake_detector(WaitingBackend(wait_s))
    calls = [0]
    original = det.pre_process

    def pre_process(rgb):
        calls[0] += 1
        if calls[0] == first_of_next and det.backend.started.wait(wait_s):
            det.backend.go.set()
        return original(rgb)

    det.pre_process = pre_process
    # tiles: one counted pre_process per tile (the generic step), not the shared rows pass
    det.pre_process_windows = lambda tiles, order: Pipeline.pre_process_windows(det, tiles, order)
    return det


@pytest.mark.parametrize("prefetch", [1, 0])
def test_next_batch_is_pre_processed_while_the_backend_runs(prefetch):
    det = _recording_detector(first_of_next=4, overlaps=bool(prefetch))
    rng = np.random.default_rng(0)
    images = [(rng.random((30, 40, 3)) * 255).astype(np.uint8) for _ in range(9)]
    res = det.predict_batch(images, "bottle", batch=3, prefetch=prefetch)
    assert all(r.ok for r in res)
    assert det.backend.saw == [bool(prefetch)]


@pytest.mark.parametrize("prefetch", [1, 0])
def test_tiler_prepares_the_next_tiles_while_the_backend_runs(prefetch):
    det = _recording_detector(first_of_next=3, overlaps=bool(prefetch))
    strip = (np.random.default_rng(1).random((32, 200, 3)) * 255).astype(np.uint8)
    res = det.predict(strip, "bottle", tile=True, batch=2, prefetch=prefetch)  # 8 tiles of 32, 4 batches
    assert res.tiles > 2 and det.backend.saw == [bool(prefetch)]


@pytest.mark.parametrize("prefetch", [1, 0])
def test_strip_stream_prepares_the_next_tiles_while_the_backend_runs(prefetch):
    det = _recording_detector(first_of_next=3, overlaps=bool(prefetch))
    strip = (np.random.default_rng(1).random((32, 200, 3)) * 255).astype(np.uint8)
    s = det.stream("bottle", batch=2, prefetch=prefetch)
    res = s.push(strip) + s.flush()
    assert len(res) == 1 and res[0].ok and det.backend.saw == [bool(prefetch)]


def _meeting_backend(monkeypatch, module, prefetch: int, maps: str = "anomaly_map"):
    """A fake detector whose second backend call waits for the caller to be making the first
    batch's maps (``module.<maps>``, patched), and that map-making waits for the call to start:
    both happen only when the two run at the same time (events, no timings)."""
    backend = WaitingBackend(WAIT_S if prefetch else 0.2, call=1)
    original, first = getattr(module, maps), [True]

    def making_maps(*args):
        if first[0]:
            first[0] = False
            if backend.started.wait(backend.wait_s):
                backend.go.set()
        return original(*args)

    monkeypatch.setattr(module, maps, making_maps)
    return fake_detector(backend), backend


@pytest.mark.parametrize("prefetch", [1, 0])
@pytest.mark.parametrize("stream", [False, True])
def test_tiler_forwards_the_next_batch_while_the_caller_blends_this_one(monkeypatch, prefetch, stream):
    from anoclip.runtime import tiler

    det, backend = _meeting_backend(monkeypatch, tiler, prefetch, maps="add_weighted_map")
    strip = (np.random.default_rng(1).random((32, 200, 3)) * 255).astype(np.uint8)
    if stream:
        s = det.stream("bottle", batch=2, prefetch=prefetch)
        res = (s.push(strip) + s.flush())[0]
    else:
        res = det.predict(strip, "bottle", tile=True, batch=2, prefetch=prefetch)  # 8 tiles of 32, 4 batches
    assert res.ok and backend.saw == [bool(prefetch)]


@pytest.mark.parametrize("prefetch", [1, 0])
def test_batches_forward_the_next_batch_while_the_caller_post_processes_this_one(monkeypatch, prefetch):
    from anoclip.runtime import pipeline

    det, backend = _meeting_backend(monkeypatch, pipeline, prefetch)
    rng = np.random.default_rng(0)
    images = [(rng.random((30, 40, 3)) * 255).astype(np.uint8) for _ in range(6)]
    res = det.predict_batch(images, "bottle", batch=2, prefetch=prefetch)
    assert all(r.ok for r in res) and backend.saw == [bool(prefetch)]


def test_staged_infer_in_the_tiler_equals_the_plain_function():
    """A StagedInfer and the same two steps composed by hand give the same tiled map."""
    det = fake_detector(PatchMeanBackend())
    staged = det.tile_infer("bottle", prefetch=2)
    raw = (np.random.default_rng(4).random((48, 300, 3)) * 255).astype(np.uint8)
    a = predict_tiled(raw, staged, 48, 12, 2)
    b = predict_tiled(raw, lambda crops: staged.forward(staged.prepare(crops)), 48, 12, 2)
    assert a.anomaly_map.tobytes() == b.anomaly_map.tobytes() and a.score == b.score
    assert isinstance(staged, StagedInfer)


def test_a_tile_batch_is_its_crops_and_prepares_like_them():
    """``TileBatch`` reads as the list of its crops (views of the stored array), and the detector's
    shared pre-processing of it equals pre-processing those crops one by one, bit for bit."""
    det = fake_detector(PatchMeanBackend())
    raw = (np.random.default_rng(5).random((120, 300, 3)) * 255).astype(np.uint8)
    tiles = TileBatch(raw, ((0, 0), (0, 90), (60, 200)), 60)
    crops = list(tiles)
    assert len(tiles) == 3 and all(np.shares_memory(c, raw) for c in crops)
    np.testing.assert_array_equal(crops[2], raw[60:120, 200:260])
    assert [c.shape for c in tiles[1:]] == [(60, 60, 3)] * 2
    staged = det.tile_infer("bottle", channel_order="BGR")
    np.testing.assert_array_equal(staged.prepare(tiles), staged.prepare(crops))


# no thread left behind ------------------------------------------------------------------------

def test_closing_iter_predict_early_leaves_no_thread(tiny_detector, mixed_inputs):
    before = threading.active_count()
    gen = tiny_detector.iter_predict(mixed_inputs * 3, "bottle", batch=2, prefetch=2)
    first = next(gen)
    assert first.ok and threading.active_count() > before  # the worker is preparing the next batches
    gen.close()
    assert threading.active_count() == before


class FailingBackend(PatchMeanBackend):
    def run(self, pixels, prototypes, outputs=("patch_probs", "image_scores")):
        if self.calls == 1:
            raise RuntimeError("device lost")
        return super().run(pixels, prototypes, outputs)


@pytest.mark.parametrize("tile", [False, True])
def test_a_backend_failure_mid_run_leaves_no_thread(tile):
    det = fake_detector(FailingBackend())
    rng = np.random.default_rng(0)
    images = [(rng.random((30, 90, 3)) * 255).astype(np.uint8) for _ in range(8)]
    before = threading.active_count()
    with pytest.raises(RuntimeError, match="device lost"):
        det.predict_batch(images, "bottle", batch=2, tile=tile)
    assert threading.active_count() == before


def test_a_failing_pre_process_surfaces_in_the_caller_and_leaves_no_thread():
    det = fake_detector(PatchMeanBackend())
    calls = [0]
    original = det.pre_process

    def pre_process(rgb):
        calls[0] += 1
        if calls[0] == 5:
            raise MemoryError("worker ran out")
        return original(rgb)

    det.pre_process = pre_process
    rng = np.random.default_rng(0)
    images = [(rng.random((30, 40, 3)) * 255).astype(np.uint8) for _ in range(9)]
    before = threading.active_count()
    got = []
    with pytest.raises(MemoryError, match="worker ran out"):
        for r in det.iter_predict(images, "bottle", batch=2):
            got.append(r)
    assert len(got) == 4 and all(r.ok for r in got)  # the two batches before the failing one
    assert threading.active_count() == before


@pytest.mark.parametrize("value", [-1, 5])
def test_prefetch_setting_out_of_range_is_a_clear_error(value):
    from anoclip.runtime import InferConfig
    from anoclip_core.errors import InputError

    with pytest.raises(InputError, match=f"prefetch must be between 0 \\(off\\) and 4 batches, got {value}"):
        InferConfig(class_name="bottle", prefetch=value)


@pytest.mark.parametrize("tile,prefetch", [(False, 1), (False, 0), (True, 1), (True, 0)])
def test_an_iterator_may_hand_every_image_in_one_reused_buffer(tile, prefetch):
    """A camera loop yields the same frame buffer each time: batches and read-ahead must not see
    the next frame in place of this one (expected: the same images as separate arrays)."""
    det = fake_detector(PatchMeanBackend())
    rng = np.random.default_rng(3)
    images = [(rng.random((48, 120, 3)) * 255).astype(np.uint8) for _ in range(7)]

    def camera():
        frame = np.empty_like(images[0])
        for im in images:
            frame[:] = im
            yield frame

    expected = det.predict_batch(images, "bottle", batch=3, tile=tile, prefetch=prefetch)
    got = det.predict_batch(camera(), "bottle", batch=3, tile=tile, prefetch=prefetch)
    assert len(got) == len(expected) == 7 and len({r.score for r in expected}) > 1
    for a, b in zip(expected, got, strict=True):
        assert a.anomaly_map.tobytes() == b.anomaly_map.tobytes() and a.score == b.score
