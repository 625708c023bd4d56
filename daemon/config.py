"""Settings: config.toml plus IMGPIPE_<SECTION>_<KEY> environment overrides, frozen.

An unknown section, key or IMGPIPE_* variable is refused like a bad value, never silently ignored.

This module is the only place defaults live; config.toml documents the same values.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import math
import os
import socket
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, get_type_hints

from standardwebhooks import Webhook

ENV_PREFIX = "IMGPIPE_"
WORK_FOLDER = ".imgpipe-work"


class ConfigError(Exception):
    """A setting is missing, unknown or of the wrong type; the message names the key."""


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 5000
    public_url: str = ""  # empty: http://host:port
    tokens: tuple[str, ...] = ()


@dataclass(frozen=True)
class PathSettings:
    inbox: str = "inbox"
    outbox: str = "outbox"
    images: str = "compressed_images"
    database: str = "sqlite:///imgpipe.db"
    sqlite_synchronous: str = "normal"  # "full": commits survive a power cut too, at an fsync each
    work: str = ""  # empty: WORK_FOLDER beside a SQLite database file, else in the user's cache folder


@dataclass(frozen=True)
class LimitSettings:
    max_upload_bytes: int = 20 * 1024 * 1024
    max_rows: int = 20_000
    max_urls_per_row: int = 20
    max_cell_bytes: int = 64 * 1024
    max_url_length: int = 2048


@dataclass(frozen=True)
class InboxSettings:
    settle_seconds: float = 5.0  # the window, where leases are not available (see daemon.ingest.inbox)
    enabled: bool = True


@dataclass(frozen=True)
class DownloadSettings:
    concurrency: int = 16
    backlog: int = 64
    backlog_bytes: int = 256 * 1024 * 1024  # waiting bodies plus recycled files (daemon.stages.bodies)
    connect_timeout: float = 5.0
    total_timeout: float = 30.0
    max_redirects: int = 5
    max_bytes: int = 25 * 1024 * 1024
    attempts: int = 4
    backoff_base: float = 0.5
    backoff_max: float = 30.0


@dataclass(frozen=True)
class CompressSettings:
    quality: int = 50
    target_ratio: float = 0.0
    target_ssim: float = 0.0  # 0: off; else per image the lowest quality whose SSIM reaches it
    ssim: bool = True  # score every output (SSIM on luma against its decoded original)
    ssim_max_side: int = 256  # the luma is scored reduced to at most this many pixels a side; 0: full resolution
    optimize: bool = False
    progressive: bool = False
    jpeg_fast_path: bool = True  # JPEG in, JPEG out requantized without decoding where it can (daemon.stages.requantize)
    workers: int = 0  # 0: one per CPU
    pin_daemon: bool = True  # the daemon's own threads on one CPU, the workers on all (see daemon.tuning)
    max_pixels: int = 50_000_000
    job_timeout: float = 120.0  # seconds one image may run in a worker before the worker is killed


@dataclass(frozen=True)
class WebhookSettings:
    urls: tuple[str, ...] = ()
    secret: str = ""
    inbound_secret: str = ""
    timeout: float = 15.0
    retry_schedule: tuple[float, ...] = (5, 300, 1800, 7200, 18000, 36000, 36000)
    max_inbound_bytes: int = 1024 * 1024
    max_payload_bytes: int = 256 * 1024  # a larger request.completed body is sent without its products


@dataclass(frozen=True)
class NetworkSettings:
    allow_private: bool = False
    allow: tuple[str, ...] = ()
    loopback_only: bool = False  # refuse every target but loopback, before any DNS lookup (see daemon.network)


@dataclass(frozen=True)
class RetentionSettings:
    requests_days: float = 0.0  # 0: off; else finished requests older than this are deleted
    inbox_days: float = 0.0  # 0: off; else archived and rejected inbox files older than this are removed


@dataclass(frozen=True)
class StorageSettings:
    url: str = ""  # empty: images in paths.images; else s3://bucket/prefix (credentials: AWS_* variables only)
    endpoint: str = ""  # empty: AWS for the region; else an S3-compatible server's base URL
    region: str = ""  # empty: AWS_REGION / AWS_DEFAULT_REGION, else us-east-1
    public_url: str = ""  # base of output image URLs (the bucket's or a CDN's); empty: the daemon's /images/


@dataclass(frozen=True)
class ClusterSettings:
    node: str = ""  # empty: <host name>:<server.port>; unique among the daemons sharing one database
    lease_seconds: float = 15.0  # a claimed image passes to another daemon this long after its daemon stopped


@dataclass(frozen=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    paths: PathSettings = field(default_factory=PathSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    inbox: InboxSettings = field(default_factory=InboxSettings)
    download: DownloadSettings = field(default_factory=DownloadSettings)
    compress: CompressSettings = field(default_factory=CompressSettings)
    webhooks: WebhookSettings = field(default_factory=WebhookSettings)
    network: NetworkSettings = field(default_factory=NetworkSettings)
    retention: RetentionSettings = field(default_factory=RetentionSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    base_dir: Path = field(default_factory=Path.cwd)

    @property
    def public_url(self) -> str:
        return (self.server.public_url or f"http://{self.server.host}:{self.server.port}").rstrip("/")

    @property
    def images_url(self) -> str:
        """The base of output image URLs: a name appended after a slash is the image's URL."""
        return self.storage.public_url.rstrip("/") or f"{self.public_url}/images"

    def path(self, name: str) -> Path:
        """An absolute path from [paths]; relative ones are relative to the config file's folder."""
        if name == "work" and not self.paths.work:
            return self._default_work()
        return (self.base_dir / str(getattr(self.paths, name))).resolve()

    def _default_work(self) -> Path:
        """Working files stay out of the folders people serve and back up: beside a SQLite database file, else in
        the user's cache folder, named after the database so two daemons never share one."""
        prefix = "sqlite:///"
        url = self.database_url
        if url.startswith(prefix) and url != prefix + ":memory:":
            return Path(url[len(prefix):]).with_name(WORK_FOLDER)
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        # And after the node: two daemons of one database on one machine must not share one either.
        digest = hashlib.sha256(f"{url}|{self.node}".encode()).hexdigest()[:16]
        return (cache / "imgpipe" / f"work-{digest}").resolve()

    @property
    def node(self) -> str:
        """This daemon's name among those sharing its database (claims, the outbox of what it took in)."""
        return self.cluster.node or f"{socket.gethostname()}:{self.server.port}"

    @property
    def database_url(self) -> str:
        url = self.paths.database
        prefix = "sqlite:///"
        if url.startswith(prefix) and not url.startswith(prefix + "/") and url != prefix + ":memory:":
            return prefix + str((self.base_dir / url[len(prefix):]).resolve())
        return url


SECTION_TYPES: dict[str, type] = {name: kind for name, kind in get_type_hints(Settings).items() if name != "base_dir"}


def _env_name(section: str, key: str) -> str:
    return f"{ENV_PREFIX}{section}_{key}".upper()


def _unknown(label: str, kind: str, name: str, candidates: Mapping[str, str], listing: str) -> ConfigError:
    """`label` names no known `kind`: offer the spelling of the candidate closest to `name`, else `listing`."""
    close = difflib.get_close_matches(name, list(candidates), n=1)
    return ConfigError(f"{label}: unknown {kind}; " + (f"did you mean {candidates[close[0]]}?" if close else listing))


def _keys_of(section: str) -> str:
    return f"valid keys of [{section}]: " + ", ".join(f.name for f in fields(SECTION_TYPES[section]))


def _sections() -> str:
    return "valid sections: " + ", ".join(f"[{name}]" for name in SECTION_TYPES)


def _coerce(key: str, kind: Any, value: Any) -> Any:
    """Turn a TOML or environment value into the setting's type, or say which key is wrong."""
    from_env = isinstance(value, str)
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if from_env and value.strip().lower() in {"1", "true", "yes", "on"}:
                return True
            if from_env and value.strip().lower() in {"0", "false", "no", "off"}:
                return False
            raise ValueError
        if kind is int:
            if isinstance(value, bool | float):  # int(5000.7) would silently truncate
                raise ValueError
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if kind is str:
            if not isinstance(value, str):
                raise ValueError
            return value
        if kind in (tuple[str, ...], tuple[float, ...]):
            item = str if kind == tuple[str, ...] else float
            items = [v.strip() for v in value.split(",") if v.strip()] if from_env else value
            if not isinstance(items, list | tuple) or (from_env and value and not items):
                # Blanks or bare commas are a slip, not an empty list: for server.tokens it would turn auth off.
                raise ValueError
            return tuple(_coerce(key, item, v) for v in items)
    except (TypeError, ValueError):
        pass
    expected = getattr(kind, "__name__", str(kind)).replace("tuple", "list")
    raise ConfigError(f"config key {key}: expected {expected}, got {value!r}")


def _section(name: str, cls: type, table: Mapping[str, Any], env: Mapping[str, str]) -> Any:
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    for key in table:
        if key not in known:
            raise _unknown(f"config key {name}.{key}", "setting", key, {k: f"{name}.{k}" for k in known},
                           _keys_of(name))
    values: dict[str, Any] = {}
    for f in fields(cls):
        key = f"{name}.{f.name}"
        variable = _env_name(name, f.name)
        if variable in env:
            values[f.name] = _coerce(variable, hints[f.name], env[variable])
        elif f.name in table:
            values[f.name] = _coerce(key, hints[f.name], table[f.name])
    settings = cls(**values)
    _check(name, settings)
    return settings


# A timeout of 0 means none at all to aiohttp: a stalled origin or listener would hold its slot for ever.
ABOVE_ZERO = frozenset({("download", "connect_timeout"), ("download", "total_timeout"), ("webhooks", "timeout"),
                        ("compress", "job_timeout"), ("cluster", "lease_seconds")})


def _check(name: str, section: Any) -> None:
    """Range checks that a type alone cannot express."""
    for f in fields(section):
        value = getattr(section, f.name)
        for number in value if isinstance(value, tuple) else (value,):
            if isinstance(number, float) and not math.isfinite(number):
                raise ConfigError(f"config key {name}.{f.name}: must be a finite number, got {number!r}")
        if isinstance(value, int | float) and not isinstance(value, bool) and value < 0:
            raise ConfigError(f"config key {name}.{f.name}: must not be negative, got {value!r}")
        if (name, f.name) in ABOVE_ZERO and value <= 0:
            raise ConfigError(f"config key {name}.{f.name}: must be above 0 seconds, got {value!r}")
    if name == "compress" and not 1 <= section.quality <= 95:
        raise ConfigError(f"config key compress.quality: must be 1..95, got {section.quality}")
    if name == "compress" and not 0 <= section.target_ratio < 1:
        raise ConfigError(f"config key compress.target_ratio: must be 0 (off) or below 1, got {section.target_ratio}")
    if name == "compress":
        _check_targets(section)
    if name == "paths" and section.sqlite_synchronous not in ("normal", "full"):
        raise ConfigError(f"config key paths.sqlite_synchronous: must be \"normal\" or \"full\", "
                          f"got {section.sqlite_synchronous!r}")
    if name == "server" and not 1 <= section.port <= 65535:
        # 0 would bind a random port, which every URL the daemon hands out (from public_url) would not name.
        raise ConfigError(f"config key server.port: must be 1..65535, got {section.port}")
    if name == "server" and any(not token.strip() for token in section.tokens):
        raise ConfigError("config key server.tokens: an empty token would let in anyone who sends "
                          "'Authorization: Bearer' with nothing after it")
    if name == "download" and section.concurrency < 1:
        raise ConfigError(f"config key download.concurrency: must be at least 1, got {section.concurrency}")
    if name == "download" and section.backlog < 1:
        raise ConfigError(f"config key download.backlog: must be at least 1, got {section.backlog}")
    if name == "download" and section.backlog_bytes < 1:
        raise ConfigError(f"config key download.backlog_bytes: must be at least 1, got {section.backlog_bytes}")
    if name == "download" and section.attempts < 1:
        raise ConfigError(f"config key download.attempts: must be at least 1, got {section.attempts}")
    if name == "storage":
        _check_storage(section)
    if name == "webhooks" and section.max_payload_bytes < 1:
        raise ConfigError(f"config key webhooks.max_payload_bytes: must be at least 1, got {section.max_payload_bytes}")


def _check_targets(compress: CompressSettings) -> None:
    if not 0 <= compress.target_ssim <= 1:
        raise ConfigError(f"config key compress.target_ssim: must be 0 (off) or up to 1, got {compress.target_ssim}")
    if compress.target_ssim and compress.target_ratio:
        raise ConfigError("config keys compress.target_ssim and compress.target_ratio: set one or the other; each "
                          "chooses the quality of every image by itself")
    if compress.target_ssim and not compress.ssim:
        raise ConfigError("config key compress.target_ssim: needs compress.ssim = true (the target is a score)")


def _check_storage(storage: StorageSettings) -> None:
    """A store the daemon could never write to is refused at start, not found out image by image."""
    if not storage.url:
        for key in ("endpoint", "region", "public_url"):
            if getattr(storage, key):
                raise ConfigError(f"config key storage.{key}: set storage.url too (without it images stay in "
                                  "paths.images)")
        return
    bucket = storage.url.removeprefix("s3://").split("/", 1)[0]
    if not storage.url.startswith("s3://") or not bucket:
        raise ConfigError(f"config key storage.url: expected s3://bucket or s3://bucket/prefix, got {storage.url!r}")
    for key in ("endpoint", "public_url"):
        value = getattr(storage, key)
        if value and not value.startswith(("http://", "https://")):
            raise ConfigError(f"config key storage.{key}: expected an http:// or https:// URL, got {value!r}")


def _check_environment(env: Mapping[str, str]) -> None:
    """Refuse an IMGPIPE_* variable that names no setting, as an unknown key in the file is refused: a typo
    such as IMGPIPE_COMPRESS_QUALTY would otherwise leave the default in force without a word."""
    valid = {_env_name(section, f.name): (section, f.name) for section, kind in SECTION_TYPES.items()
             for f in fields(kind)}
    for variable in sorted(env):
        if not variable.startswith(ENV_PREFIX) or variable in valid:
            continue
        rest = variable[len(ENV_PREFIX):].upper()  # IMGPIPE_compress_quality is offered its right spelling
        section = next((s for s in SECTION_TYPES if rest.startswith(f"{s.upper()}_")), None)
        if section is None:  # compared without the prefix that every name shares
            candidates = {name[len(ENV_PREFIX):]: name for name in valid}
        else:
            rest = rest[len(section) + 1:]
            candidates = {key.upper(): name for name, (s, key) in valid.items() if s == section}
        listing = _keys_of(section) if section else f"names are {ENV_PREFIX}<SECTION>_<KEY>; {_sections()}"
        raise _unknown(f"config key {variable}", "setting", rest, candidates, listing)


def load_settings(path: Path | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Read `path` (default ./config.toml if present), then apply environment overrides."""
    env = os.environ if env is None else env
    table: dict[str, Any] = {}
    base_dir = Path.cwd()
    if path is None and Path("config.toml").exists():
        path = Path("config.toml")
    if path is not None:
        try:
            table = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {path}: not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path}: {exc}") from None
        base_dir = Path(path).resolve().parent
    for name in table:
        if name not in SECTION_TYPES:
            raise _unknown(f"config section [{name}]", "section", name, {s: f"[{s}]" for s in SECTION_TYPES},
                           _sections())
    _check_environment(env)
    sections = {name: _section(name, cls, table.get(name, {}), env) for name, cls in SECTION_TYPES.items()}
    settings = Settings(**sections, base_dir=base_dir)
    _check_listeners(settings)
    _check_secrets(settings.webhooks)
    return settings


def _check_secrets(webhooks: WebhookSettings) -> None:
    """A secret that cannot sign or verify is refused at start: otherwise every delivery would fail before its
    first attempt, and every notification in would be turned away, for as long as the daemon ran."""
    for key in ("secret", "inbound_secret"):
        if value := getattr(webhooks, key):
            try:
                Webhook(value)
            except Exception as exc:  # binascii.Error, EmptyWebhookSecretError...
                raise ConfigError(f"config key webhooks.{key}: not a usable secret ({exc or type(exc).__name__}); "
                                  "expected 'whsec_' and base64, e.g. 'whsec_' + the output of openssl rand -base64 24"
                                  ) from None


def _check_listeners(settings: Settings) -> None:
    """A configured listener the daemon could never deliver to is refused at start, not retried for days."""
    # Imported here: both modules import this one for their own settings.
    from daemon.ingest.csvfile import check_url
    from daemon.network import AddressPolicy

    policy = AddressPolicy(settings.network)
    for url in settings.webhooks.urls:
        if reason := check_url(url, settings.limits) or policy.url_refusal(url):
            raise ConfigError(f"config key webhooks.urls: {reason}")


def replace(settings: Settings, **sections: Mapping[str, Any]) -> Settings:
    """A copy with some keys of some sections changed (tests and the bench use this)."""
    changed = {name: dataclasses.replace(getattr(settings, name), **values) for name, values in sections.items()}
    return dataclasses.replace(settings, **changed)
