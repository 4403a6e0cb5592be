from __future__ import annotations

from pathlib import Path

from sam3stream.config import JsonlSinkConfig, MqttSinkConfig, VideoSinkConfig
from sam3stream.sinks import Sink, make_sink
from sam3stream.sinks.jsonl import JsonlSink
from sam3stream.sinks.mqtt import MqttSink
from sam3stream.sinks.video import VideoSink


def test_make_sink_builds_each_kind_from_its_config(tmp_path: Path) -> None:
    jsonl = make_sink(JsonlSinkConfig(path=str(tmp_path), rotate_mb=5))
    mqtt = make_sink(MqttSinkConfig(host="broker", qos=1, buffer=7, name="bus"))
    video = make_sink(VideoSinkConfig(dir=str(tmp_path), on_full="drop_oldest"), name="rec")

    assert isinstance(jsonl, JsonlSink) and jsonl.name == "jsonl" and jsonl.lossless
    assert isinstance(mqtt, MqttSink) and mqtt.name == "bus" and not mqtt.lossless
    assert (mqtt.host, mqtt.port, mqtt.qos, mqtt.buffer) == ("broker", 1883, 1, 7)
    assert isinstance(video, VideoSink) and video.name == "rec" and not video.lossless
    assert [s.wants_images for s in (jsonl, mqtt, video)] == [False, False, True]
    assert all(isinstance(s, Sink) for s in (jsonl, mqtt, video))


def test_mqtt_sink_is_never_lossless() -> None:
    # Config rejects on_full = "block" for MQTT; a config built in code must not make the sink claim it.
    sink = make_sink(MqttSinkConfig(host="broker", on_full="block"))
    assert isinstance(sink, MqttSink) and not sink.lossless
