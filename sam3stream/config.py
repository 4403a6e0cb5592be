"""The service configuration: one TOML file parsed into frozen msgspec Structs.

Validation reports every problem at once, each with the key path that caused it
(``cameras[2].url``, ``batching.max_batch``); unknown keys are errors. Validation
touches the file system only to read the config and resolve its paths (symlinks,
``~user``): whether a video file or an engine directory exists is the run's
business, not the config's. The exception: an MQTT sink's TLS files are loaded to
check them, since a file the sink cannot use would otherwise look like a broker
outage, retried forever.

Relative paths (engine directory, checkpoint, file cameras, sink outputs) are
resolved against the config file's directory while parsing, so the Structs only
ever hold absolute paths for them.
"""

from __future__ import annotations

import ipaddress
import math
import re
import tomllib
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, TypeAlias
from urllib.parse import urlsplit

import msgspec

from sam3stream.errors import ConfigError, ResolutionError
from sam3stream.resolution import check_resolution
from sam3stream.runtime.contract import MAX_CLASSES

__all__ = [
    "BatchingConfig",
    "CameraConfig",
    "Config",
    "EnginesConfig",
    "ExportConfig",
    "JsonlSinkConfig",
    "LifecycleConfig",
    "LoggingConfig",
    "MetricsConfig",
    "MqttSinkConfig",
    "OnFull",
    "PostprocessConfig",
    "PromptsConfig",
    "SinkConfig",
    "VideoSinkConfig",
    "load_config",
    "parse_config",
    "sink_name",
    "validate_config",
]

OnFull: TypeAlias = Literal["drop_oldest", "block"]
Positive = Annotated[float, msgspec.Meta(gt=0)]
NonNegative = Annotated[float, msgspec.Meta(ge=0)]
NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
Probability = Annotated[float, msgspec.Meta(ge=0, le=1)]
Fraction = Annotated[float, msgspec.Meta(ge=0, le=1)]  # of a frame's width or height

# Camera names become MQTT topic levels and file names.
CAMERA_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")
CameraName = Annotated[str, msgspec.Meta(pattern=CAMERA_NAME.pattern)]
NETWORK_SCHEMES = frozenset({"rtsp", "rtsps", "rtmp", "rtmps", "http", "https", "udp", "tcp", "srt"})


class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


# --------------------------------------------------------------------------- engines


class ExportConfig(_Section, frozen=True, kw_only=True):
    """How to make the engine directory when it does not exist yet (``[engines.export]``)."""

    random: Literal["tiny", "full"] | None = None  # random weights (tests, demos)
    checkpoint: str | None = None  # a SAM 3 checkpoint directory
    resolution: int = 1008
    queries: PositiveInt = 50
    seed: int = 0


class EnginesConfig(_Section, frozen=True, kw_only=True):
    dir: str
    backend: Literal["onnxruntime", "torch", "tensorrt", "fake"] = "onnxruntime"
    device: str = "cpu"  # cpu | cuda | cuda:N
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"  # torch only; the others ignore it
    overlap: bool = True  # torch only: decoder on a second CUDA stream (+5% frames/s, ~150 MiB)
    # torch only: the ViT's GELU in its GEMM's epilogue; unset: both forms timed at start.
    fused_gelu: bool | None = None
    # torch only: keep torch.compile's artifacts in <dir>/compile-cache, so that a start where
    # inductor's own cache is empty (a new container) loads kernels instead of generating them.
    compile_cache: bool = True
    export: ExportConfig | None = None


# --------------------------------------------------------------------------- prompts


class PromptsConfig(_Section, frozen=True, kw_only=True):
    classes: list[str]
    conf: Probability = 0.3
    thresholds: dict[str, Probability] = {}
    mask_size: tuple[int, int] | Literal["original"] = "original"  # [w, h] or the frame's own size

    def threshold(self, label: str) -> float:
        return self.thresholds.get(label, self.conf)

    @property
    def threshold_list(self) -> list[float]:
        """One threshold per class, in class order."""
        return [self.threshold(c) for c in self.classes]

    def camera_thresholds(self, camera: CameraConfig) -> list[float]:
        """One threshold per class for ``camera``: its own, else the prompts'; a class the camera
        does not report (``classes``) gets infinity, which no score reaches."""
        wanted = set(camera.classes or self.classes)
        return [
            camera.thresholds.get(c, self.threshold(c)) if c in wanted else math.inf for c in self.classes
        ]

    @property
    def mask_wh(self) -> tuple[int, int] | None:
        """Mask size for postprocessing: ``None`` means the original frame size."""
        return None if self.mask_size == "original" else self.mask_size


# --------------------------------------------------------------------------- cameras


class ZoneConfig(_Section, frozen=True, kw_only=True):
    """A named region of a camera's picture (``[[cameras.zones]]``)."""

    name: str
    polygon: list[tuple[Fraction, Fraction]]  # [x, y] vertices, fractions of the frame's width and height


class CameraConfig(_Section, frozen=True, kw_only=True):
    name: CameraName
    url: str  # a file path, or rtsp://, rtsps://, http(s)://
    mode: Literal["auto", "live", "file"] = "auto"
    fps: Positive | None = None  # live: sample down to it; file: pace to it (None = as fast as possible)
    loop: bool = False  # files only: start again at the end
    # Passed to av.open, which takes strings: numbers are written out (timeout = 5000000).
    options: dict[str, str | int | float] = {}  # e.g. rtsp_transport = "tcp"
    classes: list[str] = []  # only these of prompts.classes are reported (empty = all)
    thresholds: dict[str, Probability] = {}  # this camera's own, over prompts.thresholds and conf
    zones: list[ZoneConfig] = []  # each detection names the zones its anchor point is in
    zone_anchor: Literal["center", "bottom"] = "center"  # the box's centre or its bottom edge's middle
    only_in_zones: bool = False  # drop the detections that are in none of the zones

    @property
    def is_network(self) -> bool:
        return urlsplit(self.url).scheme.lower() in NETWORK_SCHEMES

    @property
    def effective_mode(self) -> Literal["live", "file"]:
        """``auto`` means file for a local path and live for anything on the network."""
        if self.mode == "auto":
            return "live" if self.is_network else "file"
        return self.mode


# --------------------------------------------------------------------------- batching


class BatchingConfig(_Section, frozen=True, kw_only=True):
    max_batch: PositiveInt = 8  # must also be <= the engine's batch (checked when it loads)
    max_wait_ms: NonNegative = 20.0  # flush a partial batch this long after its first frame
    camera_queue: PositiveInt = 4  # frames buffered per file camera (live cameras keep 1)
    # Formed batches waiting for the GPU worker, which already queues the next batch on the GPU
    # before it collects the last: 1 keeps it fed, and each more makes live results a batch older.
    batch_queue: PositiveInt = 1


# --------------------------------------------------------------------------- sinks


class _Sink(_Section, frozen=True, kw_only=True, tag_field="type"):
    name: str = ""  # for logs and metrics; defaults to "<type>-<index>"
    queue: PositiveInt = 256  # results buffered between the pipeline and this sink
    cameras: list[str] = []  # only these cameras (empty = all)


class JsonlSinkConfig(_Sink, frozen=True, kw_only=True, tag="jsonl"):
    """One JSON object per line, one file per camera: ``<path>/<camera>.jsonl``."""

    path: str  # a directory (created if missing)
    rotate_mb: Positive | None = None  # start ``<camera>.1.jsonl``, ``.2``, ... past this size
    on_full: OnFull = "block"  # a file is lossless: slow disks slow the pipeline down


TLS_FILE_KEYS = ("ca_file", "cert_file", "key_file")
# What to listen on, said wherever a listening host is refused (here and when binding).
LISTEN_HOSTS = '"0.0.0.0" listens on every interface, "127.0.0.1" on this host only'


class MqttSinkConfig(_Sink, frozen=True, kw_only=True, tag="mqtt"):
    """One message per frame on ``<prefix>/<camera>/detections``, stats on ``<prefix>/stats``."""

    host: str
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)] | None = None  # None: 8883 with tls, else 1883
    prefix: str = "sam3stream"
    qos: Literal[0, 1, 2] = 0
    client_id: str | None = None
    username: str | None = None
    password: str | None = None
    buffer: Annotated[int, msgspec.Meta(ge=0)] = 1000  # results kept while the broker is down
    stats_interval_s: NonNegative = 10.0  # 0 = no stats messages
    keepalive: Annotated[int, msgspec.Meta(ge=1)] = 60
    on_full: OnFull = "drop_oldest"  # only drop_oldest: a broker hiccup must never stall inference
    tls: bool = False
    ca_file: str | None = None  # PEM CA bundle the broker's certificate must chain to; None: the system's
    cert_file: str | None = None  # PEM client certificate, for brokers that require one
    key_file: str | None = None  # its PEM private key, unless it is in cert_file
    # Last resort: skip the check that the broker's certificate names ``host`` (a broker reached
    # by IP address with a certificate for a name). The certificate is still verified.
    tls_insecure: bool = False
    # At the first connection, delete the retained <prefix>/<camera>/status of cameras this sink
    # does not serve (removed from the config), which would otherwise stay "running" for good.
    clear_stale_status: bool = True

    @property
    def tls_files(self) -> dict[str, str | None]:
        """The TLS file keys and their values, given or not."""
        return {key: getattr(self, key) for key in TLS_FILE_KEYS}

    @property
    def broker_port(self) -> int:
        if self.port is not None:
            return self.port
        return 8883 if self.tls else 1883


class VideoSinkConfig(_Sink, frozen=True, kw_only=True, tag="video"):
    """Annotated video per camera: ``<dir>/<camera>.mp4``."""

    dir: str
    # None: each frame stamped with its stream time (variable rate; 100 ms apart where a frame
    # has none); a number: a constant rate.
    fps: Positive | None = None
    draw_masks: bool = True
    draw_boxes: bool = True
    codec: str = "libx264"
    every_n: PositiveInt = 1  # N > 1: also save every N-th result per camera as a PNG snapshot
    queue: PositiveInt = 32  # results hold full-size images here: keep it short
    on_full: OnFull = "block"


SinkConfig: TypeAlias = JsonlSinkConfig | MqttSinkConfig | VideoSinkConfig


def sink_name(index: int, sink: SinkConfig) -> str:
    """The name a sink is known by in logs and metrics."""
    return sink.name or f"{sink.__struct_config__.tag}-{index}"


# --------------------------------------------------------------------------- the rest


class PostprocessConfig(_Section, frozen=True, kw_only=True):
    # A batch's frames (masks resized and run-length encoded on the host) are spread over this
    # many threads; None: a quarter of the cores, 1 to 4. Threads share Python's lock.
    threads: PositiveInt | None = None
    # > 0: over this many processes instead, which scale with the cores (many masks per frame).
    # A program that embeds the pipeline must then guard its entry point (if __name__ == ...).
    processes: NonNegativeInt = 0
    # Resize, threshold and run-length encode kept masks on the GPU when the backend can (the
    # torch backend on CUDA); the host then only packs the runs. False: always on the host.
    device_masks: bool = True


class MetricsConfig(_Section, frozen=True, kw_only=True):
    interval_s: Positive = 10.0  # how often the reporter logs (and publishes) stats
    prometheus_port: Annotated[int, msgspec.Meta(ge=1, le=65535)] | None = None
    # Every interface by default, so a scraper on another host (or outside a container) reaches
    # it; "127.0.0.1" keeps /metrics on this host.
    prometheus_host: str = "0.0.0.0"


class LoggingConfig(_Section, frozen=True, kw_only=True):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["console", "json"] = "console"


class LifecycleConfig(_Section, frozen=True, kw_only=True):
    drain_timeout_s: NonNegative = 10.0  # stop: finish in-flight work and flush sinks within this
    stall_timeout_s: Positive = 10.0  # no frame for this long (downstream not full) => reconnect
    reconnect_base_s: Positive = 0.5  # backoff: uniform(0, min(cap, base * 2**attempt))
    reconnect_cap_s: Positive = 30.0


class Config(_Section, frozen=True, kw_only=True):
    engines: EnginesConfig
    prompts: PromptsConfig
    cameras: list[CameraConfig]
    batching: BatchingConfig = msgspec.field(default_factory=BatchingConfig)
    sinks: list[SinkConfig] = []
    postprocess: PostprocessConfig = msgspec.field(default_factory=PostprocessConfig)
    metrics: MetricsConfig = msgspec.field(default_factory=MetricsConfig)
    logging: LoggingConfig = msgspec.field(default_factory=LoggingConfig)
    lifecycle: LifecycleConfig = msgspec.field(default_factory=LifecycleConfig)

    @property
    def engine_dir(self) -> Path:
        return Path(self.engines.dir)

    def summary(self) -> str:
        return (
            f"{len(self.cameras)} cameras, {len(self.sinks)} sinks, "
            f"{len(self.prompts.classes)} classes, backend {self.engines.backend} on {self.engines.device}, "
            f"max_batch {self.batching.max_batch}"
        )


# --------------------------------------------------------------------------- loading


def load_config(path: str | Path) -> Config:
    """Read and validate a TOML config; raise ConfigError listing every problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        problem = f"cannot read the config file: {exc.strerror or exc}"
        raise ConfigError([("", problem)], source=str(path)) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([("", f"not UTF-8 text: {exc.reason}")], source=str(path)) from None
    return parse_config(text, source=str(path), base_dir=path.resolve().parent)


def parse_config(text: str, source: str = "<config>", base_dir: str | Path | None = None) -> Config:
    """Parse TOML text; relative paths resolve against ``base_dir`` (default: the working directory)."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # tomllib's message already ends in "(at line N, column M)".
        raise ConfigError([("", f"TOML syntax error: {exc}")], source=source) from None
    return _from_raw(raw, source, base_dir)


def validate_config(config: Config, base_dir: str | Path | None = None) -> Config:
    """A Config built in code, checked by the rules a config file goes through (msgspec Structs
    check nothing when constructed): every problem raised at once as a ConfigError with its key
    path; relative paths resolve against ``base_dir`` (default: the working directory)."""
    return _from_raw(msgspec.to_builtins(config), "<Config>", base_dir)


def _from_raw(raw: dict[str, Any], source: str, base_dir: str | Path | None) -> Config:
    problems: list[tuple[str, str]] = []
    config = _convert(raw, Config, "", problems)
    problems.extend(_check_raw(raw))
    if problems or not isinstance(config, Config):
        raise ConfigError(problems, source=source)
    resolved = _resolve_paths(config, Path(base_dir or Path.cwd()).resolve(), problems)
    problems.extend(_shared_outputs(resolved))
    problems.extend(_tls_files(resolved, unresolved={key for key, _ in problems}))
    if problems:  # a path that cannot be resolved (a NUL byte, ~nosuchuser, a symlink loop)
        raise ConfigError(problems, source=source)
    return resolved


def _camera_prompts(prompted: list[str], i: int, cam: dict[str, Any]) -> Problems:
    """Camera ``i``'s classes and thresholds (raw TOML, types unchecked) name prompted classes:
    the decoder runs for prompts.classes only, so a camera can report fewer of them, never others."""
    known = f"one of prompts.classes ({', '.join(map(repr, prompted))})"
    classes = cam.get("classes")
    classes = [c for c in classes if isinstance(c, str)] if isinstance(classes, list) else []
    repeated = _repeats(classes)
    for j, label in enumerate(classes):
        if label not in prompted:
            yield f"cameras[{i}].classes[{j}]", f"{label!r} is not {known}"
        elif j in repeated:
            yield f"cameras[{i}].classes[{j}]", f"{label!r} is listed twice"
    thresholds = cam.get("thresholds")
    for label in thresholds if isinstance(thresholds, dict) else ():
        if label not in prompted:
            yield f"cameras[{i}].thresholds.{label}", f"{label!r} is not {known}"
        elif classes and label not in classes:
            why = "is not one of this camera's classes: it would never be reported"
            yield f"cameras[{i}].thresholds.{label}", f"{label!r} {why}"


def _shared_outputs(config: Config) -> Problems:
    """Two sinks of one kind writing into one place would write each result twice into the
    same files (JSONL) or fight over them (video), or, on one broker and prefix, publish every
    result twice and clear each other's camera status. Compared once paths are absolute."""
    first: dict[tuple[str, str], tuple[int, str]] = {}  # key -> (index, what it does there)
    for i, sink in enumerate(config.sinks):
        if isinstance(sink, JsonlSinkConfig):
            key, where, what = ("jsonl", sink.path), "path", f"writes {sink.path}"
        elif isinstance(sink, VideoSinkConfig):
            key, where, what = ("video", sink.dir), "dir", f"writes {sink.dir}"
        elif isinstance(sink, MqttSinkConfig):
            place, prefix = f"{sink.host}:{sink.broker_port}", sink.prefix.rstrip("/")
            key = ("mqtt", f"{_broker_host(sink.host)}:{sink.broker_port}/{prefix}")
            where, what = "prefix", f"publishes under {prefix!r} on {place}"
        else:
            continue
        if key in first:
            j, done = first[key]
            yield f"sinks[{i}].{where}", f"sinks[{j}] already {done}"
        else:
            first[key] = (i, what)


_LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})


def _broker_host(host: str) -> str:
    """One spelling per broker host, without asking DNS: names are not case-sensitive, an address
    has one canonical form (``::0:1`` is ``::1``), and localhost, 127.0.0.1 and ::1 are the
    broker on this machine (other loopback addresses can be other listeners)."""
    name = host.rstrip(".").lower()
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return "loopback" if name in _LOOPBACK else name
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return "loopback" if str(address) in _LOOPBACK else str(address)


def _tls_files(config: Config, unresolved: set[str]) -> Problems:
    """Each MQTT sink's TLS files loaded as the sink will load them: a file that is missing or not
    PEM is reported at its key now, not as connection failures retried forever."""
    from sam3stream.tls import TlsFileError, client_context

    for i, sink in enumerate(config.sinks):
        keys = {f"sinks[{i}].{k}" for k in TLS_FILE_KEYS}
        if isinstance(sink, MqttSinkConfig) and sink.tls and not keys & unresolved:
            try:
                client_context(sink.ca_file, sink.cert_file, sink.key_file, insecure=sink.tls_insecure)
            except TlsFileError as exc:
                yield f"sinks[{i}].{exc.key}", exc.message


# --------------------------------------------------------------------------- structure

_INVALID: Any = object()  # marks a subtree that failed; its problems are already recorded
_AT = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _sub(path: str, sub: str) -> str:
    """``path`` extended by a relative path from a rule: "", "[2]" or "name"."""
    if not sub:
        return path
    return path + sub if sub.startswith("[") else _join(path, sub)


def _type_name(value: object) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "a table",
    }.get(type(value), type(value).__name__)


def _literal_choices(tp: Any) -> list[Any] | None:
    """The allowed values of a Literal (or optional Literal) field, else None."""
    if typing.get_origin(tp) is Literal:
        return list(typing.get_args(tp))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if all(typing.get_origin(a) is Literal or a is type(None) for a in args):
            return [v for a in args if a is not type(None) for v in typing.get_args(a)]
    return None


def _union_literals(tp: Any) -> list[Any]:
    """The Literal values inside a union of a Literal and other types (mask_size's "original")."""
    if typing.get_origin(tp) not in (typing.Union, types.UnionType):
        return []
    return [v for a in typing.get_args(tp) if typing.get_origin(a) is Literal for v in typing.get_args(a)]


def _leaf(value: object, tp: Any, path: str, problems: list[tuple[str, str]]) -> Any:
    """Convert a value that holds no Structs; msgspec's error path is appended to ours."""
    if typing.get_origin(tp) is dict and typing.get_args(tp)[0] is str and isinstance(value, dict):
        # Item by item, so that a problem names its key (msgspec's path says only "[...]"). TOML
        # keys are strings already.
        item_type = typing.get_args(tp)[1]
        items = {k: _leaf(v, item_type, f"{path}.{k}", problems) for k, v in value.items()}
        return _INVALID if any(v is _INVALID for v in items.values()) else items
    try:
        return msgspec.convert(value, tp)
    except msgspec.ValidationError as exc:
        match = _AT.match(str(exc))
        assert match is not None
        msg, sub = match.group("msg"), match.group("path") or ""
        choices = _literal_choices(tp)
        if choices is not None and not sub:
            msg = f"must be one of {', '.join(repr(c) for c in choices)}, got {value!r}"
        elif msg.startswith("Invalid enum value") and (named := _union_literals(tp)):
            msg = f"must be {' or '.join(repr(c) for c in named)} or [width, height], got {value!r}"
        elif CAMERA_NAME.pattern in msg:
            msg = f"use only letters, digits, '_' and '-' (it becomes an MQTT topic level), got {value!r}"
        else:
            msg = f"{msg[0].lower()}{msg[1:]}"
            msg += "" if "got" in msg else f", got {_at_path(value, sub)!r}"
        problems.append((path + sub, msg))
        return _INVALID


def _at_path(value: object, sub: str) -> object:
    """The part of ``value`` that msgspec's error path ``sub`` (``[1][0]``, ``.key``) names."""
    for index, key in re.findall(r"\[(\d+)\]|\.(\w+)", sub):
        if index and isinstance(value, list) and int(index) < len(value):
            value = value[int(index)]
        elif key and isinstance(value, dict) and key in value:
            value = value[key]
        else:
            break
    return value


def _struct_args(tp: Any) -> list[type[msgspec.Struct]] | None:
    """The Struct types inside ``tp`` (a Struct, an optional Struct or a union of Structs)."""
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        return [tp]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if args and all(isinstance(a, type) and issubclass(a, msgspec.Struct) for a in args):
            return args
    return None


def _convert(value: object, tp: Any, path: str, problems: list[tuple[str, str]]) -> Any:
    """Like msgspec.convert, but walks into Structs and lists of Structs to find every problem."""
    structs = _struct_args(tp)
    if structs is not None:
        if value is None and type(None) in typing.get_args(tp):
            return None
        if len(structs) > 1:
            return _convert_tagged(value, structs, path, problems)
        return _convert_struct(value, structs[0], path, problems)
    if typing.get_origin(tp) is list and _struct_args(typing.get_args(tp)[0]) is not None:
        if isinstance(value, dict):
            # The usual slip: [cameras] written once where each camera needs [[cameras]].
            header = re.sub(r"\[\d+\]", "", path)  # TOML headers name tables, not entries
            problems.append((path, f"write each entry as [[{header}]] (an array of tables), not [{header}]"))
            return _INVALID
        if not isinstance(value, list):
            problems.append((path, f"expected an array of tables, got {_type_name(value)}"))
            return _INVALID
        items = [_convert(v, typing.get_args(tp)[0], _join(path, i), problems) for i, v in enumerate(value)]
        return _INVALID if any(i is _INVALID for i in items) else items
    return _leaf(value, tp, path, problems)


def _convert_tagged(
    value: object, structs: list[type[msgspec.Struct]], path: str, problems: list[tuple[str, str]]
) -> Any:
    by_tag = {s.__struct_config__.tag: s for s in structs}
    field = structs[0].__struct_config__.tag_field or "type"
    if not isinstance(value, dict):
        problems.append((path, f"expected a table, got {_type_name(value)}"))
        return _INVALID
    tag = value.get(field)
    if tag not in by_tag:
        choices = ", ".join(repr(t) for t in by_tag)
        got = "nothing" if tag is None else repr(tag)
        problems.append((_join(path, field), f"must be one of {choices}, got {got}"))
        return _INVALID
    return _convert_struct({k: v for k, v in value.items() if k != field}, by_tag[tag], path, problems)


def _convert_struct(
    value: object, tp: type[msgspec.Struct], path: str, problems: list[tuple[str, str]]
) -> Any:
    if not isinstance(value, dict):
        problems.append((path, f"expected a table, got {_type_name(value)}"))
        return _INVALID
    fields = {f.encode_name: f for f in msgspec.structs.fields(tp)}
    hints = typing.get_type_hints(tp, include_extras=True)
    ok = True
    args: dict[str, Any] = {}
    for key, item in value.items():
        if key not in fields:
            problems.append((_join(path, key), "unknown key"))
            ok = False
            continue
        converted = _convert(item, hints[fields[key].name], _join(path, key), problems)
        field_check = _FIELD_CHECKS.get((tp, key))
        if converted is not _INVALID and field_check is not None:
            bad = [(_sub(_join(path, key), sub), msg) for sub, msg in field_check(converted)]
            problems.extend(bad)
            converted = _INVALID if bad else converted
        ok = ok and converted is not _INVALID
        args[fields[key].name] = converted
    for key, field in fields.items():
        if field.required and key not in value:
            problems.append((_join(path, key), "required key is missing"))
            ok = False
    if not ok:
        return _INVALID
    result = tp(**args)
    check = _CHECKS.get(tp)
    bad = [(_sub(path, sub), msg) for sub, msg in check(result)] if check else []
    problems.extend(bad)
    return _INVALID if bad else result


# --------------------------------------------------------------------------- meaning
# Rules beyond a value's type. Field rules see one converted value (so they run even
# when a sibling field is broken); struct rules relate the fields of one section;
# both yield (path relative to what they see, message). Rules across sections read
# the raw TOML, so that they also run when another part of the file failed.

Problems = Iterator[tuple[str, str]]


def _not_empty(value: str) -> Problems:
    if not value.strip():
        yield "", "must not be empty"


def _not_empty_if_given(value: str | None) -> Problems:
    # None (not given) comes through too when a Config built in code is checked again.
    if value is not None:
        yield from _not_empty(value)


def _device(value: str) -> Problems:
    if not DEVICE.match(value):
        yield "", f"must be cpu, cuda or cuda:N, got {value!r}"


def _resolution(value: int) -> Problems:
    try:
        check_resolution(value, key="resolution")
    except ResolutionError as exc:
        yield "", str(exc).removeprefix("resolution: ")


def _classes(classes: list[str]) -> Problems:
    if not classes:
        yield "", "give at least one class"
    if len(classes) > MAX_CLASSES:
        yield "", f"{len(classes)} classes; at most {MAX_CLASSES} (each runs the decoder on every frame)"
    repeated = _repeats(classes)
    for i, label in enumerate(classes):
        if not label.strip():
            yield f"[{i}]", "must not be empty"
        elif i in repeated:
            yield f"[{i}]", f"duplicate class {label!r}"


def _mask_size(value: tuple[int, int] | str) -> Problems:
    if not isinstance(value, str) and min(value) < 1:
        yield "", f"width and height must be >= 1, got {list(value)}"


def _camera_url(url: str) -> Problems:
    if not url.strip():
        yield "", "must not be empty"
        return
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    # A one-letter "scheme" is a Windows drive letter (C:/videos/a.mp4).
    if len(scheme) > 1 and scheme != "file" and scheme not in NETWORK_SCHEMES:
        allowed = ", ".join(sorted(NETWORK_SCHEMES))
        yield "", f"unsupported scheme {scheme!r}: use a file path or one of {allowed}"
    elif scheme in NETWORK_SCHEMES and not parts.hostname:
        yield "", f"{url!r} has no host"


def _mqtt_prefix(prefix: str) -> Problems:
    if not prefix or any(c in prefix for c in "+#"):
        yield "", "must be a non-empty MQTT topic without wildcards (+, #)"


def _mqtt_on_full(on_full: str) -> Problems:
    # The sink never makes the pipeline wait: its own buffer drops the oldest results during a
    # broker outage, so "block" would promise a lossless sink it cannot be.
    if on_full == "block":
        why = "MQTT cannot be lossless: waiting out a broker outage would stall every camera"
        instead = (
            'use "drop_oldest" (the default), raise "buffer" to ride out longer outages, '
            "and add a jsonl sink for a lossless record"
        )
        yield "", f"{why}; {instead}"


# Underscores too: container names (mqtt_broker) resolve in Docker's and Compose's DNS.
_LABEL = r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)"
_HOST_NAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*\.?$")


def _host_problem(host: str, hint: str) -> Problems:
    # Whether the name resolves is only known when connecting or binding; this catches what
    # never can: a URL, a host:port, brackets, stray spaces.
    if not host.strip():
        yield "", f"must not be empty: {hint}"
        return
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not _HOST_NAME.match(host):
            yield "", f"{host!r} is not a host name or IP address (no scheme, port or brackets); {hint}"


def _listen_host(host: str) -> Problems:
    yield from _host_problem(host, LISTEN_HOSTS)


def _broker_host_name(host: str) -> Problems:
    hint = 'give the broker\'s name or address, e.g. "broker.lan", and its port as port'
    yield from _host_problem(host, hint)


_FIELD_CHECKS: dict[tuple[type[Any], str], Callable[[Any], Problems]] = {
    (EnginesConfig, "dir"): _not_empty,
    (EnginesConfig, "device"): _device,
    (ExportConfig, "resolution"): _resolution,
    (PromptsConfig, "classes"): _classes,
    (PromptsConfig, "mask_size"): _mask_size,
    (CameraConfig, "url"): _camera_url,
    (MqttSinkConfig, "host"): _broker_host_name,
    (MqttSinkConfig, "prefix"): _mqtt_prefix,
    (MqttSinkConfig, "on_full"): _mqtt_on_full,
    (MqttSinkConfig, "ca_file"): _not_empty_if_given,
    (MqttSinkConfig, "cert_file"): _not_empty_if_given,
    (MqttSinkConfig, "key_file"): _not_empty_if_given,
    (JsonlSinkConfig, "path"): _not_empty,
    (VideoSinkConfig, "dir"): _not_empty,
    (MetricsConfig, "prometheus_host"): _listen_host,
}


def _check_engines(engines: EnginesConfig) -> Problems:
    if engines.backend == "tensorrt" and engines.device == "cpu":
        yield "device", "the tensorrt backend needs a cuda device"


def _check_export(export: ExportConfig) -> Problems:
    if (export.random is None) == (export.checkpoint is None):
        yield "", 'give exactly one of random = "tiny" | "full" or checkpoint = "path"'


def _check_camera(cam: CameraConfig) -> Problems:
    if cam.loop and cam.effective_mode == "live":
        yield "loop", 'only file cameras can loop (set mode = "file" or drop loop)'
    if cam.only_in_zones and not cam.zones:
        yield "only_in_zones", "give the camera's [[cameras.zones]]: with none it would report nothing"
    for j, first in _repeats([zone.name for zone in cam.zones]).items():
        yield f"zones[{j}].name", f"duplicate zone name {cam.zones[j].name!r} (also zones[{first}])"


def _check_zone(zone: ZoneConfig) -> Problems:
    if not zone.name.strip():
        yield "name", "must not be empty"
    elif zone.name != zone.name.strip():  # "dock " and "dock" would read as one zone and be two
        yield "name", f"{zone.name!r} starts or ends with spaces"
    points = zone.polygon
    if len(points) < 3:
        yield "polygon", f"{len(points)} points; a zone needs 3 or more ([x, y] fractions of the frame)"
    elif _on_one_line(points):
        yield "polygon", "its points are on one line: the zone has no inside"


def _on_one_line(points: list[tuple[float, float]]) -> bool:
    (x0, y0), rest = points[0], points[1:]
    far = max(rest, key=lambda p: abs(p[0] - x0) + abs(p[1] - y0))  # a second point, not the first
    dx, dy = far[0] - x0, far[1] - y0
    return all(abs(dx * (y - y0) - dy * (x - x0)) < 1e-12 for x, y in rest)


def _check_mqtt(sink: MqttSinkConfig) -> Problems:
    # TLS is switched on by ``tls`` alone, never implied by a file key: it also moves the default
    # port, and a left-over ca_file must not turn TLS on against a plain listener.
    if not sink.tls:
        for key, path in sink.tls_files.items():
            if path is not None:
                yield key, "used only over TLS: set tls = true"
        if sink.tls_insecure:
            yield "tls_insecure", "used only over TLS: set tls = true"
    if sink.key_file is not None and sink.cert_file is None:
        yield "key_file", "a client key needs its certificate: give cert_file too"


def _check_lifecycle(life: LifecycleConfig) -> Problems:
    if life.reconnect_base_s > life.reconnect_cap_s:
        yield "reconnect_base_s", "must not exceed reconnect_cap_s"


_CHECKS: dict[type[Any], Callable[[Any], Problems]] = {
    EnginesConfig: _check_engines,
    ExportConfig: _check_export,
    CameraConfig: _check_camera,
    ZoneConfig: _check_zone,
    MqttSinkConfig: _check_mqtt,
    LifecycleConfig: _check_lifecycle,
}


def _check_raw(raw: dict[str, Any]) -> Problems:
    """Rules across keys: unique camera and sink names, sinks naming cameras, thresholds and
    cameras' classes naming prompted classes."""
    prompts = raw.get("prompts")
    classes = prompts.get("classes") if isinstance(prompts, dict) else None
    prompted = classes if isinstance(classes, list) and all(isinstance(c, str) for c in classes) else None
    if isinstance(prompts, dict) and isinstance(prompts.get("thresholds"), dict):
        for label in prompts["thresholds"]:
            if prompted is not None and label not in prompted:
                yield f"prompts.thresholds.{label}", f"{label!r} is not one of prompts.classes"
    cameras = raw.get("cameras")
    if isinstance(cameras, list) and not cameras:  # not a list: _convert has said so
        yield "cameras", "give at least one [[cameras]] entry"
    cameras = cameras if isinstance(cameras, list) else []
    names = [cam.get("name") if isinstance(cam, dict) else None for cam in cameras]
    repeated = _repeats(names)
    for i, cam in enumerate(cameras):
        if isinstance(cam, dict) and prompted is not None:
            yield from _camera_prompts(prompted, i, cam)
        if i in repeated:
            yield f"cameras[{i}].name", f"duplicate camera name {names[i]!r} (also cameras[{repeated[i]}])"
    sinks = raw.get("sinks")
    sinks = sinks if isinstance(sinks, list) else []
    sink_names = [
        (sink.get("name") or f"{sink.get('type')}-{i}") if isinstance(sink, dict) else None
        for i, sink in enumerate(sinks)
    ]
    repeated = _repeats(sink_names)
    known = {name for name in names if isinstance(name, str)}
    for i, sink in enumerate(sinks):
        if not isinstance(sink, dict):
            continue
        if i in repeated:
            yield f"sinks[{i}].name", f"duplicate sink name {sink_names[i]!r} (also sinks[{repeated[i]}])"
        wanted = sink.get("cameras")
        for j, cam_name in enumerate(wanted if isinstance(wanted, list) else []):
            if isinstance(cam_name, str) and cam_name not in known:
                yield f"sinks[{i}].cameras[{j}]", f"no camera is named {cam_name!r}"


def _repeats(names: Sequence[object]) -> dict[int, int]:
    """The index of each name seen before (strings only) -> the index where it first appeared."""
    first: dict[str, int] = {}
    repeated: dict[int, int] = {}
    for i, name in enumerate(names):
        if isinstance(name, str):
            if name in first:
                repeated[i] = first[name]
            else:
                first[name] = i
    return repeated


def _resolve_paths(config: Config, base: Path, problems: list[tuple[str, str]]) -> Config:
    """Make the path keys absolute; a path that cannot be resolved is a problem at its key."""

    def resolve(p: str, key: str) -> str:
        if not p:
            return p
        try:
            return str((base / Path(p).expanduser()).resolve())
        except (ValueError, OSError, RuntimeError) as exc:
            # A NUL byte (ValueError), "~nosuchuser" or a symlink loop (RuntimeError), an OS limit.
            problems.append((key, f"not a usable path: {exc}"))
            return p

    engines = config.engines
    export = engines.export
    if export is not None and export.checkpoint:
        export = msgspec.structs.replace(
            export, checkpoint=resolve(export.checkpoint, "engines.export.checkpoint")
        )
    engines = msgspec.structs.replace(engines, dir=resolve(engines.dir, "engines.dir"), export=export)

    cameras = []
    for i, cam in enumerate(config.cameras):
        scheme = urlsplit(cam.url).scheme.lower()
        if scheme == "file":
            cam = msgspec.structs.replace(cam, url=resolve(urlsplit(cam.url).path, f"cameras[{i}].url"))
        elif not cam.is_network and len(scheme) <= 1:
            cam = msgspec.structs.replace(cam, url=resolve(cam.url, f"cameras[{i}].url"))
        cameras.append(cam)

    sinks: list[SinkConfig] = []
    for i, sink in enumerate(config.sinks):
        if isinstance(sink, JsonlSinkConfig):
            sink = msgspec.structs.replace(sink, path=resolve(sink.path, f"sinks[{i}].path"))
        elif isinstance(sink, VideoSinkConfig):
            sink = msgspec.structs.replace(sink, dir=resolve(sink.dir, f"sinks[{i}].dir"))
        elif isinstance(sink, MqttSinkConfig):
            files = sink.tls_files
            resolved = {k: resolve(p, f"sinks[{i}].{k}") for k, p in files.items() if p is not None}
            sink = msgspec.structs.replace(sink, **resolved)
        sinks.append(sink)
    return msgspec.structs.replace(config, engines=engines, cameras=cameras, sinks=sinks)
