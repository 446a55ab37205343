"""Per-call options of ``Detector.predict`` / ``predict_batch``: a misspelt one and a load-time one
(backend, precision, threads, streams, verify) are refused, not silently ignored."""
from __future__ import annotations

import numpy as np
import pytest
from rt_fakes import PatchMeanBackend, fake_detector

IMAGE = (np.random.default_rng(0).random((30, 40, 3)) * 255).astype(np.uint8)


@pytest.mark.parametrize("option,value", [("backend", "openvino"), ("streams", 2), ("threads", 1),
                                          ("precision", "int8"), ("verify", False)])
def test_load_time_options_are_refused_per_call(option, value):
    det = fake_detector(PatchMeanBackend())
    with pytest.raises(TypeError, match=rf"{option} cannot change per call: .*Detector.load\(artifact, {option}="):
        det.predict(IMAGE, "bottle", **{option: value})
    with pytest.raises(TypeError, match=f"{option} cannot change per call"):
        det.predict_batch([IMAGE], "bottle", **{option: value})


def test_misspelt_option_is_named_and_per_call_options_still_work():
    det = fake_detector(PatchMeanBackend())
    with pytest.raises(TypeError, match="unknown inference option.*: thresold"):
        det.predict(IMAGE, "bottle", thresold=0.3)
    res = det.predict(IMAGE, "bottle", threshold=0.25, min_area=2)
    assert res.ok and res.image_threshold == 0.25
