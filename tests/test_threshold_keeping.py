"""The tools pick the threshold that gives random weights a chosen number of detections per
frame: the postprocessing load of a real model."""

from __future__ import annotations

import numpy as np

from sam3stream.bench_child import threshold_keeping


def test_threshold_keeps_about_the_asked_detections_per_frame() -> None:
    scores = np.random.default_rng(0).random((8, 4, 50), dtype=np.float32)
    for per_frame in (1, 2.5, 5, 40):
        conf = threshold_keeping(scores, per_frame)
        assert (scores >= conf).sum() == round(per_frame * 8)


def test_threshold_for_more_than_every_query_keeps_them_all() -> None:
    scores = np.random.default_rng(1).random((2, 4, 50), dtype=np.float32)
    assert threshold_keeping(scores, 1000) == scores.min()
