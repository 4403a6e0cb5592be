"""The table the demo prints at the end: per camera and in total, then where the outputs went."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sam3stream.config import Config, MqttSinkConfig, VideoSinkConfig
from sam3stream.demo.config import DemoLayout
from sam3stream.demo.run import RunOutcome
from sam3stream.metrics import percentile
from sam3stream.runtime.manifest import EngineManifest

__all__ = ["SummaryContext", "format_summary", "format_table"]

HEADERS = ("camera", "decoded", "processed", "dropped", "fps", "p50 ms", "p95 ms", "detections", "top labels")
LEFT = {0, 8}  # columns aligned left; the numbers align right


@dataclass(frozen=True, slots=True)
class SummaryContext:
    config: Config
    manifest: EngineManifest
    engine_dir: Path
    layout: DemoLayout
    seconds: float  # the time bound asked for
    random_model: bool
    thresholds: Mapping[str, float]  # measured per class (random model), else empty


def format_table(rows: Sequence[Sequence[str]], headers: Sequence[str] = HEADERS) -> list[str]:
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        out = [
            c.ljust(w) if i in LEFT else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(out).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return [line(headers), rule, *(line(r[: len(headers)]) for r in rows[:-1]), rule, line(rows[-1])]


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _top(labels: Counter[str]) -> str:
    return ", ".join(f"{label} {n}" for label, n in labels.most_common(3)) or "-"


def _rows(ctx: SummaryContext, outcome: RunOutcome) -> list[list[str]]:
    cams: Mapping[str, Any] = outcome.snapshot["cameras"]
    run_s = max(outcome.run_s, 1e-9)
    rows = []
    totals = Counter[str]()
    for cam in ctx.config.cameras:
        c = cams.get(cam.name, {})
        labels = outcome.labels.get(cam.name, Counter())
        totals.update(labels)
        processed = int(c.get("frames_processed", 0))
        rows.append(
            [
                cam.name,
                str(c.get("frames_decoded", 0)),
                str(processed),
                str(c.get("frames_dropped", 0)),
                f"{processed / run_s:.2f}",
                _ms(c.get("latency_ms_p50")),
                _ms(c.get("latency_ms_p95")),
                str(c.get("detections", 0)),
                _top(labels),
            ]
        )
    processed_all = sum(int(r[2]) for r in rows)
    rows.append(
        [
            "total",
            str(sum(int(r[1]) for r in rows)),
            str(processed_all),
            str(sum(int(r[3]) for r in rows)),
            f"{processed_all / run_s:.2f}",
            _ms(percentile(outcome.latencies_ms, 50)),
            _ms(percentile(outcome.latencies_ms, 95)),
            str(sum(int(r[7]) for r in rows)),
            _top(totals),
        ]
    )
    return rows


def _batches(snapshot: Mapping[str, Any]) -> str:
    batches: Mapping[str, Any] = snapshot["batches"]
    if not batches:
        return "batches: none ran"
    sizes = ", ".join(f"{b['count']} of {size}" for size, b in batches.items())
    count = sum(b["count"] for b in batches.values())
    stages: Counter[str] = Counter()
    for b in batches.values():
        for stage, ms in b["stage_ms"].items():
            stages[stage] += ms * b["count"]
    mean = ", ".join(f"{k} {v / count:.0f}" for k, v in stages.items() if k in ("vision", "decoder"))
    return f"batches: {sizes} frames" + (f"; mean ms per batch: {mean}" if mean else "")


def _status(ctx: SummaryContext, outcome: RunOutcome) -> list[str]:
    if outcome.drain_s is None:
        why = "until every clip ended"
    else:
        asked = "Ctrl-C" if outcome.stop_reason == "interrupt" else f"{ctx.seconds:g} s"
        why = f"{asked}, then {outcome.drain_s:.1f} s finishing the frames already queued"
    lines = [f"ran {outcome.run_s:.1f} s ({why}); {_batches(outcome.snapshot)}"]
    if outcome.drained is False:
        lines.append(
            f"the drain hit its {ctx.config.lifecycle.drain_timeout_s:g} s bound: "
            f"{outcome.in_flight} accepted frames got no result"
        )
    lines += [f"camera {name} failed: {error}" for name, error in outcome.camera_errors.items()]
    sinks: Mapping[str, Any] = outcome.snapshot["sinks"]
    lines += [
        f"sink {name}: {s['dropped']} results dropped, {s['errors']} errors (see the log)"
        for name, s in sinks.items()
        if s["dropped"] or s["errors"]
    ]
    return lines


def _model_note(ctx: SummaryContext) -> list[str]:
    if not ctx.random_model:
        return [f"model: {ctx.manifest.model.source}; conf {ctx.config.prompts.conf:g}"]
    measured = ", ".join(f"{k} {v:.5f}" for k, v in ctx.thresholds.items())
    return [
        f"model: {ctx.manifest.model.source}: RANDOM weights, so the detections mean nothing;",
        "  they exercise the plumbing (boxes and masks in the JSONL, boxes in the videos: drawn,",
        "  a random model's masks cover the whole frame). Every score sits near 0.25, so the",
        f"  per-class thresholds were measured to let a few queries through: {measured or 'none'}",
    ]


def _outputs(ctx: SummaryContext) -> list[str]:
    layout = ctx.layout
    masks = all(s.draw_masks for s in ctx.config.sinks if isinstance(s, VideoSinkConfig))
    lines = [
        "outputs:",
        f"  jsonl    {layout.jsonl}/<camera>.jsonl (one line per processed frame)",
        f"  video    {layout.video}/<camera>.mp4 (annotated{'' if masks else ', boxes only'})",
        f"  engines  {ctx.engine_dir}",
        f"  clips    {layout.clips}",
        f"  config   {layout.config} (replay: sam3stream run {layout.config})",
    ]
    for sink in ctx.config.sinks:
        if isinstance(sink, MqttSinkConfig):
            lines.append(f"  mqtt     {sink.host}:{sink.port} topics {sink.prefix}/<camera>/detections")
    return lines


def format_summary(ctx: SummaryContext, outcome: RunOutcome) -> str:
    m = ctx.manifest
    batch = f"batches of up to {ctx.config.batching.max_batch} (engines: {m.batch})"
    engine = f"{m.resolution}x{m.resolution}, {batch}"
    head = (
        f"sam3stream demo: {len(ctx.config.cameras)} cameras, onnxruntime on the CPU, "
        f"{engine}, prompts {', '.join(ctx.config.prompts.classes)}"
    )
    table = format_table(_rows(ctx, outcome))
    foot = ["fps: processed frames per second of the run; p50/p95: capture to result, end to end"]
    parts = [head, "", *table, "", *foot, *_status(ctx, outcome), *_model_note(ctx), "", *_outputs(ctx)]
    return "\n".join(parts)
