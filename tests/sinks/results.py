"""Made-up FrameResults for sink tests."""

from __future__ import annotations

import numpy as np

from sam3stream import rle
from sam3stream.stream.frames import Detection, FrameResult, StageTimes


def make_result(
    seq: int, camera: str = "cam1", width: int = 64, height: int = 48, detections: int = 2
) -> FrameResult:
    rng = np.random.default_rng(seq)
    dets = []
    for i in range(detections):
        x0, y0 = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
        x1, y1 = x0 + width // 3, y0 + height // 3
        mask = np.zeros((height, width), dtype=bool)
        mask[y0:y1, x0:x1] = True
        dets.append(
            Detection(
                label=("person", "car")[i % 2],
                score=float(rng.random()),
                box=(x0 / width, y0 / height, x1 / width, y1 / height),
                box_px=(float(x0), float(y0), float(x1), float(y1)),
                mask=rle.encode(mask),
            )
        )
    return FrameResult(
        camera=camera,
        seq=seq,
        pts=seq * 3000,
        stream_time=seq / 30,
        capture_time=1_700_000_000.0 + seq / 30,
        width=width,
        height=height,
        detections=dets,
        timing=StageTimes(queue_wait=1.0, vision=20.0, end_to_end=35.0 + seq, batch_size=4),
    )
