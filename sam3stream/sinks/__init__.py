"""Result sinks: JSONL files, MQTT, annotated video."""

from sam3stream.sinks.base import Sink, make_sink

__all__ = ["Sink", "make_sink"]
