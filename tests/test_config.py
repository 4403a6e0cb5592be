"""Config parsing: every problem at once, each with its key path; the example configs parse."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from sam3stream.cli import main
from sam3stream.config import (
    BatchingConfig,
    CameraConfig,
    Config,
    EnginesConfig,
    JsonlSinkConfig,
    MqttSinkConfig,
    PromptsConfig,
    VideoSinkConfig,
    load_config,
    parse_config,
    sink_name,
    validate_config,
)
from sam3stream.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]

MINIMAL = """
[engines]
dir = "engines/x"

[prompts]
classes = ["person", "hand"]

[[cameras]]
name = "cam1"
url = "videos/a.mp4"
"""


def problems(text: str) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, source="t.toml", base_dir=Path("/base"))
    return dict(info.value.problems)


def test_minimal_config_gets_defaults_and_absolute_paths() -> None:
    config = parse_config(MINIMAL, source="t.toml", base_dir=Path("/base"))
    assert config.engines.dir == "/base/engines/x"
    assert config.engines.backend == "onnxruntime" and config.engines.device == "cpu"
    assert config.cameras[0].url == "/base/videos/a.mp4"
    assert config.cameras[0].effective_mode == "file"
    assert config.batching.max_batch == 8 and config.batching.max_wait_ms == 20
    assert config.prompts.threshold_list == [0.3, 0.3] and config.prompts.mask_wh is None
    assert config.lifecycle.drain_timeout_s == 10


def test_gelu_epilogue_is_timed_unless_the_config_pins_it() -> None:
    assert parse_config(MINIMAL, source="t.toml", base_dir=Path("/base")).engines.fused_gelu is None
    pinned = MINIMAL.replace('dir = "engines/x"', 'dir = "engines/x"\nfused_gelu = true')
    assert parse_config(pinned, source="t.toml", base_dir=Path("/base")).engines.fused_gelu is True
    found = problems(MINIMAL.replace('dir = "engines/x"', 'dir = "engines/x"\nfused_gelu = "auto"'))
    assert "engines.fused_gelu" in found


def test_unknown_key_is_reported_with_its_path() -> None:
    found = problems(MINIMAL + "foo = 1\n[batching]\nmax_wait = 3\n")
    assert found["cameras[0].foo"] == "unknown key"
    assert found["batching.max_wait"] == "unknown key"


def test_wrong_type_is_reported_with_its_path() -> None:
    found = problems(MINIMAL + 'fps = "fast"\n')
    assert "cameras[0].fps" in found and "str" in found["cameras[0].fps"]


def test_resolution_not_a_multiple_of_14() -> None:
    found = problems(
        MINIMAL.replace(
            'dir = "engines/x"', 'dir = "e"\n[engines.export]\nrandom = "tiny"\nresolution = 1000'
        )
    )
    message = found["engines.export.resolution"]
    assert "multiple of 14" in message and "994 or 1008" in message


def test_duplicate_camera_names() -> None:
    found = problems(MINIMAL + '[[cameras]]\nname = "cam1"\nurl = "rtsp://10.0.0.1/s"\n')
    assert "duplicate camera name 'cam1'" in found["cameras[1].name"]


def test_max_batch_below_one() -> None:
    found = problems(MINIMAL + "[batching]\nmax_batch = 0\n")
    assert ">= 1" in found["batching.max_batch"]


def test_every_problem_is_reported_at_once() -> None:
    text = """
[engines]
dir = "e"
backend = "cuda"
colour = "red"

[engines.export]
random = "tiny"
resolution = 500

[prompts]
classes = ["person", "person", ""]
thresholds = { dog = 0.5 }

[[cameras]]
name = "a b"
url = "ftp://host/x"

[[cameras]]
name = "ok"
url = "rtsp://10.0.0.2/s"
loop = true

[batching]
max_batch = 0

[[sinks]]
type = "mqtt"
host = "broker"
qos = 3

[[sinks]]
type = "kafka"
"""
    found = problems(text)
    assert set(found) == {
        "engines.backend",
        "engines.colour",
        "engines.export.resolution",
        "prompts.classes[1]",
        "prompts.classes[2]",
        "prompts.thresholds.dog",
        "cameras[0].name",
        "cameras[0].url",
        "cameras[1].loop",
        "batching.max_batch",
        "sinks[0].qos",
        "sinks[1].type",
    }
    assert found["sinks[0].qos"] == "must be one of 0, 1, 2, got 3"
    assert "'jsonl', 'mqtt', 'video'" in found["sinks[1].type"]


def test_missing_required_keys() -> None:
    found = problems('[engines]\nbackend = "fake"\n')
    assert found == {
        "engines.dir": "required key is missing",
        "prompts": "required key is missing",
        "cameras": "required key is missing",
    }


def test_toml_syntax_error_names_the_line() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(MINIMAL + "[[cameras]\n", source="t.toml")
    assert "line 11" in str(info.value) and str(info.value).startswith("t.toml: TOML syntax error")


def test_sinks_are_a_tagged_union_with_defaults() -> None:
    config = parse_config(
        MINIMAL
        + '[[sinks]]\ntype = "jsonl"\npath = "out"\n'
        + '[[sinks]]\ntype = "mqtt"\nhost = "b"\n'
        + '[[sinks]]\ntype = "video"\ndir = "v"\ncameras = ["cam1"]\n',
        base_dir=Path("/base"),
    )
    jsonl, mqtt, vid = config.sinks
    assert isinstance(jsonl, JsonlSinkConfig) and jsonl.path == "/base/out" and jsonl.on_full == "block"
    assert isinstance(mqtt, MqttSinkConfig) and mqtt.on_full == "drop_oldest"
    assert mqtt.port is None and mqtt.broker_port == 1883  # 8883 with tls
    assert isinstance(vid, VideoSinkConfig) and vid.dir == "/base/v" and vid.codec == "libx264"
    assert [sink_name(i, s) for i, s in enumerate(config.sinks)] == ["jsonl-0", "mqtt-1", "video-2"]


def test_sink_cameras_must_exist() -> None:
    found = problems(MINIMAL + '[[sinks]]\ntype = "video"\ndir = "v"\ncameras = ["nope"]\n')
    assert found == {"sinks[0].cameras[0]": "no camera is named 'nope'"}


def test_mqtt_sink_cannot_block() -> None:
    # MQTT drops the oldest results during a broker outage: "block" would promise a lossless sink.
    found = problems(MINIMAL + '[[sinks]]\ntype = "mqtt"\nhost = "b"\non_full = "block"\n')
    assert set(found) == {"sinks[0].on_full"}
    message = found["sinks[0].on_full"]
    assert "stall every camera" in message and '"drop_oldest"' in message and "jsonl" in message
    ok = parse_config(MINIMAL + '[[sinks]]\ntype = "mqtt"\nhost = "b"\non_full = "drop_oldest"\n')
    assert isinstance(ok.sinks[0], MqttSinkConfig) and ok.sinks[0].on_full == "drop_oldest"


def test_network_urls_are_live_and_kept_as_they_are() -> None:
    config = parse_config(MINIMAL.replace("videos/a.mp4", "rtsp://10.0.0.1:554/s"))
    assert config.cameras[0].url == "rtsp://10.0.0.1:554/s" and config.cameras[0].effective_mode == "live"


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_example_configs_parse(path: Path) -> None:
    config = load_config(path)
    assert len(config.cameras) == 8 and config.sinks


def test_validate_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.toml"
    good.write_text(MINIMAL)
    assert main(["validate", str(good)]) == 0
    assert capsys.readouterr().out.startswith("ok: 1 cameras, 0 sinks")
    bad = tmp_path / "bad.toml"
    bad.write_text(MINIMAL + "foo = 1\n[batching]\nmax_batch = 0\n")
    assert main(["validate", str(bad)]) == 2
    validated = capsys.readouterr()
    assert validated.out == ""
    assert validated.err.splitlines() == [
        f"{bad}: cameras[0].foo: unknown key",
        f"{bad}: batching.max_batch: expected `int` >= 1, got 0",
    ]
    # `run` reports the same problems the same way, before it opens anything.
    assert main(["run", str(bad)]) == 2
    assert capsys.readouterr().err == validated.err


def test_cameras_written_as_one_table_is_one_problem() -> None:
    found = problems(MINIMAL.replace("[[cameras]]", "[cameras]"))
    assert found == {"cameras": "write each entry as [[cameras]] (an array of tables), not [cameras]"}
    assert problems("cameras = []\n" + MINIMAL.split("[[cameras]]")[0]) == {
        "cameras": "give at least one [[cameras]] entry"
    }


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_config(tmp_path / "nope.toml")


def test_problems_inside_tables_name_their_key_and_choices_are_listed() -> None:
    found = problems(
        MINIMAL.replace(
            'classes = ["person", "hand"]',
            'classes = ["person", "hand"]\nmask_size = "orig"\n'
            "[prompts.thresholds]\nhand = 0.4\nperson = 1.5",
        )
    )
    assert "<= 1.0, got 1.5" in found["prompts.thresholds.person"]
    assert "prompts.thresholds.hand" not in found
    assert found["prompts.mask_size"] == "must be 'original' or [width, height], got 'orig'"


def test_more_classes_than_the_engines_take_is_a_problem() -> None:
    many = ", ".join(f'"c{i}"' for i in range(300))
    found = problems(MINIMAL.replace('classes = ["person", "hand"]', f"classes = [{many}]"))
    assert found["prompts.classes"].startswith("300 classes; at most 256")


def test_camera_options_take_numbers_but_not_booleans() -> None:
    config = parse_config(
        MINIMAL.replace(
            'url = "videos/a.mp4"',
            'url = "videos/a.mp4"\noptions = { timeout = 5000000, rtsp_transport = "tcp" }',
        ),
        source="t",
        base_dir=Path("/base"),
    )
    assert config.cameras[0].options == {"timeout": 5000000, "rtsp_transport": "tcp"}
    found = problems(
        MINIMAL.replace('url = "videos/a.mp4"', 'url = "videos/a.mp4"\noptions = { flag = true }')
    )
    assert "got `bool`" in found["cameras[0].options.flag"]


def test_a_config_built_in_code_gets_the_files_checks(tmp_path: Path) -> None:
    from sam3stream.stream.pipeline import Pipeline

    bad = Config(
        engines=EnginesConfig(dir="engines/x", backend="fake"),
        prompts=PromptsConfig(classes=["person", "person"], conf=5.0),
        cameras=[CameraConfig(name="door/1", url="a.mp4"), CameraConfig(name="door/1", url="b.mp4")],
        batching=BatchingConfig(max_batch=0),
    )  # msgspec checks none of this when the Structs are made
    with pytest.raises(ConfigError) as info:
        validate_config(bad)
    found = dict(info.value.problems)
    assert {"prompts.conf", "cameras[0].name", "cameras[1].name", "batching.max_batch"} <= set(found)
    assert "duplicate" in found["prompts.classes[1]"]
    with pytest.raises(ConfigError):  # the same checks before a Pipeline is made of it
        Pipeline(bad)
    good = Config(
        engines=EnginesConfig(dir="engines/x", backend="fake"),
        prompts=PromptsConfig(classes=["person"]),
        cameras=[CameraConfig(name="door", url="a.mp4")],
        sinks=[MqttSinkConfig(host="broker")],  # its optional TLS files come back as None
    )
    checked = validate_config(good, base_dir=str(tmp_path))  # a str is a folder too
    assert checked.cameras[0].url == str(tmp_path / "a.mp4")
    assert checked.engines.dir == str(tmp_path / "engines/x")
    assert validate_config(checked) == checked  # a checked config passes again unchanged


def test_two_sinks_of_one_kind_cannot_share_their_output() -> None:
    sinks = (
        '\n[[sinks]]\ntype = "jsonl"\npath = "out"\n'
        '\n[[sinks]]\ntype = "jsonl"\npath = "./out/../out"\n'  # the same folder, written otherwise
        '\n[[sinks]]\ntype = "video"\ndir = "out"\n'  # another kind: .mp4 beside .jsonl is fine
        '\n[[sinks]]\ntype = "video"\ndir = "out"\n'
    )
    assert problems(MINIMAL + sinks) == {
        "sinks[1].path": "sinks[0] already writes /base/out",
        "sinks[3].dir": "sinks[2] already writes /base/out",
    }


MQTT = '\n[[sinks]]\ntype = "mqtt"\nhost = "broker"\n'


def mqtt_sink(config: Config, i: int = 0) -> MqttSinkConfig:
    sink = config.sinks[i]
    assert isinstance(sink, MqttSinkConfig)
    return sink


def test_mqtt_tls_moves_the_default_port_and_a_given_port_wins() -> None:
    tls = mqtt_sink(parse_config(MINIMAL + MQTT + "tls = true\n"))
    assert tls.tls and tls.port is None and tls.broker_port == 8883
    given = mqtt_sink(parse_config(MINIMAL + MQTT + "tls = true\nport = 8884\n"))
    assert given.broker_port == 8884
    plain = mqtt_sink(parse_config(MINIMAL + MQTT + "port = 1884\n"))
    assert not plain.tls and plain.broker_port == 1884


@pytest.mark.parametrize(
    "lines",
    [
        'ca_file = "ca.pem"',
        'cert_file = "c.pem"',
        'cert_file = "c.pem"\nkey_file = "k.pem"',
        "tls_insecure = true",
    ],
)
def test_mqtt_tls_options_without_tls_are_refused(lines: str) -> None:
    # A left-over ca_file must not silently turn TLS on (nor be ignored) against a plain listener.
    found = problems(MINIMAL + MQTT + lines + "\n")
    keys = [f"sinks[0].{line.split(' = ')[0]}" for line in lines.splitlines()]
    assert found == dict.fromkeys(keys, "used only over TLS: set tls = true")


def test_mqtt_key_file_without_cert_file() -> None:
    found = problems(MINIMAL + MQTT + 'tls = true\nkey_file = "k.pem"\n')
    # Reported before any file is read: k.pem does not exist, and that is not the problem.
    assert found == {"sinks[0].key_file": "a client key needs its certificate: give cert_file too"}


def test_mqtt_ca_file_is_resolved_against_the_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import trustme

    (tmp_path / "certs").mkdir()
    trustme.CA().cert_pem.write_to_path(tmp_path / "certs" / "ca.pem")
    config_file = tmp_path / "sam3.toml"
    config_file.write_text(MINIMAL + MQTT + 'tls = true\nca_file = "certs/ca.pem"\n')
    monkeypatch.chdir(tmp_path / "certs")  # not the working directory: the config's folder
    sink = mqtt_sink(load_config(config_file))
    assert sink.ca_file == str((tmp_path / "certs" / "ca.pem").resolve())
    parsed = parse_config(config_file.read_text(), base_dir=tmp_path)
    assert mqtt_sink(parsed).ca_file == sink.ca_file


def test_mqtt_missing_ca_file_is_reported_at_its_key_naming_the_file() -> None:
    found = problems(MINIMAL + MQTT + 'tls = true\nca_file = "certs/nope.pem"\n')
    assert found == {"sinks[0].ca_file": "/base/certs/nope.pem does not exist"}


def test_two_mqtt_sinks_cannot_share_a_broker_and_prefix() -> None:
    # Each would publish every result twice and clear the other's camera status.
    twice = MINIMAL + MQTT + 'prefix = "site"\n' + MQTT + 'prefix = "site/"\nport = 1883\n'
    assert problems(twice) == {"sinks[1].prefix": "sinks[0] already publishes under 'site' on broker:1883"}
    apart = MINIMAL + MQTT + 'prefix = "site-a"\n' + MQTT + 'prefix = "site-b"\n'
    assert [mqtt_sink(parse_config(apart), i).prefix for i in (0, 1)] == ["site-a", "site-b"]
    other_port = MINIMAL + MQTT + 'prefix = "site"\n' + MQTT + 'prefix = "site"\nport = 1884\n'
    assert len(parse_config(other_port).sinks) == 2
    upper = MINIMAL + MQTT + 'prefix = "site"\n' + MQTT + 'prefix = "site"\n'
    upper = upper.replace('host = "broker"', 'host = "Broker"', 1)  # one host, however it is spelt
    assert list(problems(upper)) == ["sinks[1].prefix"]


@pytest.mark.parametrize("host", ["mqtt://broker", "broker:1883", "[::1]", " broker", "bro ker", "-broker"])
def test_a_broker_host_that_can_never_connect_is_named(host: str) -> None:
    found = problems(MINIMAL + MQTT.replace('"broker"', f'"{host}"'))
    assert list(found) == ["sinks[0].host"]
    assert found["sinks[0].host"].startswith(f"{host!r} is not a host name or IP address")
    assert found["sinks[0].host"].endswith('e.g. "broker.lan", and its port as port')


@pytest.mark.parametrize(
    ("first", "second", "same"),
    [
        ("localhost", "127.0.0.1", True),
        ("127.0.0.1", "::1", True),
        ("LocalHost.", "::1", True),
        ("::1", "0:0:0:0:0:0:0:1", True),
        ("::ffff:10.0.0.7", "10.0.0.7", True),
        ("10.0.0.7", "10.0.0.8", False),
        ("localhost", "10.0.0.7", False),
        ("127.0.0.1", "127.0.0.2", False),  # another loopback address can be another listener
        ("::ffff:127.0.0.1", "localhost", True),
        ("broker.example", "broker.example.", True),
    ],
)
def test_one_broker_is_recognised_however_its_host_is_written(first: str, second: str, same: bool) -> None:
    sink = '\n[[sinks]]\ntype = "mqtt"\nprefix = "site"\nhost = "{}"\n'
    two = MINIMAL + sink.format(first) + sink.format(second)
    if same:
        message = f"sinks[0] already publishes under 'site' on {first}:1883"
        assert problems(two) == {"sinks[1].prefix": message}
    else:
        assert [mqtt_sink(parse_config(two), i).host for i in (0, 1)] == [first, second]


def test_a_camera_names_only_prompted_classes_once_each() -> None:
    found = problems(MINIMAL + 'classes = ["person", "dog", "person"]\nthresholds = { cat = 0.5 }\n')
    known = "one of prompts.classes ('person', 'hand')"
    assert found == {
        "cameras[0].classes[1]": f"'dog' is not {known}",
        "cameras[0].classes[2]": "'person' is listed twice",
        "cameras[0].thresholds.cat": f"'cat' is not {known}",
    }


def test_a_camera_threshold_for_a_class_it_does_not_report_is_refused() -> None:
    found = problems(MINIMAL + 'classes = ["person"]\nthresholds = { hand = 0.5 }\n')
    assert list(found) == ["cameras[0].thresholds.hand"]
    assert "not one of this camera's classes" in found["cameras[0].thresholds.hand"]
    assert list(problems(MINIMAL + "thresholds = { hand = 1.5 }\n")) == ["cameras[0].thresholds.hand"]


def test_camera_thresholds_take_the_cameras_own_then_the_prompts() -> None:
    text = MINIMAL.replace('classes = ["person", "hand"]', 'classes = ["person", "hand", "cup"]\nconf = 0.3')
    text += "thresholds = { hand = 0.6 }\n[prompts.thresholds]\ncup = 0.4\nhand = 0.2\n"
    text += '[[cameras]]\nname = "cam2"\nurl = "b.mp4"\nclasses = ["cup", "hand"]\n'
    config = parse_config(text)
    cam1, cam2 = config.cameras
    assert config.prompts.camera_thresholds(cam1) == [0.3, 0.6, 0.4]
    assert config.prompts.camera_thresholds(cam2) == [math.inf, 0.2, 0.4]
    assert config.prompts.threshold_list == [0.3, 0.2, 0.4]  # the prompts' own are unchanged


ZONE = '[[cameras.zones]]\nname = "{}"\npolygon = {}\n'


def test_zone_problems_are_named_at_their_keys() -> None:
    found = problems(
        MINIMAL
        + ZONE.format("door", "[[0.1, 0.2], [0.5, 1.2], [0.3, 0.3]]")
        + ZONE.format(" ", "[[0, 0], [1, 1]]")
    )
    assert found == {
        "cameras[0].zones[0].polygon[1][1]": "expected `float` <= 1.0, got 1.2",
        "cameras[0].zones[1].name": "must not be empty",
        "cameras[0].zones[1].polygon": "2 points; a zone needs 3 or more ([x, y] fractions of the frame)",
    }


def test_broker_hosts_may_be_container_names() -> None:
    config = parse_config(MINIMAL + MQTT.replace('"broker"', '"mqtt_broker"'))
    assert mqtt_sink(config).host == "mqtt_broker"  # Docker's DNS resolves underscores


def test_a_zones_table_written_once_is_told_its_header() -> None:
    found = problems(MINIMAL + '[cameras.zones]\nname = "a"\npolygon = [[0, 0], [1, 0], [1, 1]]\n')
    assert found == {
        "cameras[0].zones": "write each entry as [[cameras.zones]] (an array of tables), not [cameras.zones]"
    }


def test_a_camera_class_is_checked_while_another_section_is_wrong() -> None:
    found = problems(MINIMAL + 'classes = ["dog"]\n' + '[[sinks]]\ntype = "carrier-pigeon"\n')
    assert set(found) == {"cameras[0].classes[0]", "sinks[0].type"}


def test_a_zone_name_with_spaces_around_it_is_refused() -> None:
    found = problems(MINIMAL + ZONE.format("dock ", "[[0, 0], [1, 0], [1, 1]]"))
    assert found == {"cameras[0].zones[0].name": "'dock ' starts or ends with spaces"}


def test_a_zone_with_no_inside_is_refused() -> None:
    for line in (
        "[[0, 0], [0.5, 0.5], [1, 1]]",
        "[[0.2, 0.2], [0.2, 0.2], [0.2, 0.2]]",
        "[[0, 1], [1, 1], [0.5, 1]]",
    ):
        found = problems(MINIMAL + ZONE.format("edge", line))
        assert found == {"cameras[0].zones[0].polygon": "its points are on one line: the zone has no inside"}
    bow_tie = "[[0, 0], [1, 1], [1, 0], [0, 1]]"  # no area as signed sums go, but an inside
    assert parse_config(MINIMAL + ZONE.format("tie", bow_tie)).cameras[0].zones[0].name == "tie"


def test_zone_names_are_unique_per_camera_and_only_in_zones_needs_zones() -> None:
    square = "[[0, 0], [1, 0], [1, 1]]"
    found = problems(MINIMAL + ZONE.format("door", square) + ZONE.format("door", square))
    assert found == {"cameras[0].zones[1].name": "duplicate zone name 'door' (also zones[0])"}
    found = problems(MINIMAL + "only_in_zones = true\n")
    assert list(found) == ["cameras[0].only_in_zones"]
    other_camera = '[[cameras]]\nname = "cam2"\nurl = "b.mp4"\n' + ZONE.format("door", square)
    config = parse_config(MINIMAL + ZONE.format("door", square) + other_camera)  # another camera's may match
    assert [[z.name for z in c.zones] for c in config.cameras] == [["door"], ["door"]]
