"""Server configuration: one object, filled from defaults, an optional TOML file and env vars.

Embedded defaults need no external service: JuiceFS with SQLite metadata and a local
directory as its object store, all under the data dir. The TOML file switches the metadata
engine (Redis, PostgreSQL URL) and the object store (any S3 endpoint), and sets the limits
on connections (docs/security.md, "Limits"):

    [server]
    listen = "127.0.0.1:7770"
    header_timeout = 10.0     # seconds from connect to a complete request head
    keep_alive_timeout = 5.0  # seconds an idle keep-alive connection stays open
    max_connections = 1024    # open HTTP and WebSocket connections; more get 503 at once
    stop_sprites = false      # true: stopping the server stops every sprite, and a start
                              # clears what a killed server left (docs/lifecycle.md)

    [storage]
    metadata = "redis://127.0.0.1:6379/1"      # or postgres://..., sqlite3://...
    storage = "s3"                              # "file" (default) or "s3"
    bucket = "http://127.0.0.1:8333/wisp"
    access_key = "..."
    secret_key = "..."
    writeback = true          # default: false with "file", true with "s3"
    cache_size_mb = 10240     # default: 0 with "file" (no cache), 10240 with "s3"
    reclaim_interval = 10.0   # seconds between compactions of disks that deleted data; 0: off

    [sprites]
    image = "debian"          # base image for new sprites
    warm_pool = 1             # booted, unnamed sprites kept ready for creates
    runtime = "container"     # new sprites' driver: "container" or "vm" (docs/vm.md)
    stop_grace = 5.0          # seconds between SIGTERM and SIGKILL when the server stops
    warm_after = 30           # idle seconds before a sprite is frozen (warm); 0: never
    cold_after = 600          # idle seconds before it is stopped (cold); 0: never
    memory_mb = 1024
    cpus = 1.0
    pids = 2048

    [checkpoints]
    max_bytes = 107374182400  # all checkpoints of one sprite together

    [network]
    uplink = "auto"           # interface sprites' traffic leaves by; "none": loopback only
    subnet = "auto"           # sprite addresses, e.g. "10.213.0.0/16"
    dns_upstream = []         # resolvers asked for sprites; default: the host's resolv.conf

    [urls]
    domain = "localhost"      # sprite URLs are http://NAME.<domain>:<port>/ (docs/urls.md)
    wake_timeout = 10.0       # seconds a URL request waits for the sprite's port to answer

Env vars override the file: WISP_DATA_DIR, WISP_LISTEN, WISP_TOKEN, WISP_IMAGES_DIR,
WISP_IMAGE, WISP_WARM_POOL, WISP_STOP_GRACE, WISP_CHECKPOINT_MAX_BYTES, WISP_HEADER_TIMEOUT,
WISP_KEEP_ALIVE_TIMEOUT, WISP_MAX_CONNECTIONS, WISP_STOP_SPRITES (1/0), WISP_UPLINK, WISP_SUBNET,
WISP_DNS_UPSTREAM (comma separated), WISP_URL_DOMAIN, WISP_URL_WAKE_TIMEOUT.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from wisp.errors import BadRequest

__all__ = ["Config", "StorageConfig", "NetworkConfig", "UrlsConfig", "load_config",
           "DEFAULT_LISTEN", "DEFAULT_DATA_DIR"]

DEFAULT_LISTEN = "127.0.0.1:7770"
DEFAULT_DATA_DIR = Path("/var/lib/wisp")
GiB = 1 << 30


@dataclass
class StorageConfig:
    metadata: str | None = None  # None: sqlite3 file under the data dir
    storage: Literal["file", "s3"] = "file"
    bucket: str | None = None  # None: a directory under the data dir
    access_key: str | None = None
    secret_key: str | None = None
    #: JuiceFS's write-back staging and local cache. None: chosen by the object store (see
    #: `wisp.storage.juicefs.cache_options`): off and none for "file", whose chunks already
    #: lie on this disk, so a cache would only hold a second copy of every block; on and
    #: 10 GiB for "s3".
    writeback: bool | None = None
    cache_size_mb: int | None = None
    volume_name: str = "wisp"
    #: Seconds between passes that compact the disk images of running sprites which
    #: deleted data, so that JuiceFS frees the chunks (`wisp.storage.reclaim`); 0: never.
    reclaim_interval: float = 10.0


@dataclass
class NetworkConfig:
    #: The interface forwarded sprite traffic leaves by: "auto" (the interface of the
    #: host's default route), a name, or "none" (no egress: each sprite has loopback only).
    uplink: str = "auto"
    #: Where sprite addresses come from: "auto" (a free 10.x.0.0/16) or an IPv4 network.
    subnet: str = "auto"
    #: The servers Wisp's resolver asks for sprites, in order; empty: the host's
    #: /etc/resolv.conf nameservers.
    dns_upstream: list[str] = field(default_factory=list)


@dataclass
class UrlsConfig:
    #: Sprite URLs are `http://NAME.<domain>:<port>/` (and `PORT--NAME.<domain>` for another
    #: port). "localhost" needs no DNS: browsers and curl resolve every `*.localhost` to
    #: the loopback. Any other domain needs a wildcard DNS record pointing at this server.
    domain: str = "localhost"
    #: How long a URL request is held while the sprite boots and its port starts to answer;
    #: after that the client gets a 502 page.
    wake_timeout: float = 10.0


@dataclass
class Config:
    data_dir: Path = DEFAULT_DATA_DIR
    listen: str = DEFAULT_LISTEN
    token: str | None = None
    storage: StorageConfig = field(default_factory=StorageConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    urls: UrlsConfig = field(default_factory=UrlsConfig)
    image: str = "debian"
    memory_mb: int = 1024
    cpus: float = 1.0
    pids: int = 2048
    #: Sprites kept booted (disk mounted, init running) but unnamed, so a create can hand
    #: one out at once instead of booting; 0 turns it off.
    warm_pool: int = 1
    #: The driver of a sprite created without one: "container" (runc) or "vm" (QEMU
    #: microvm, whose checkpoints hold memory too). docs/vm.md.
    runtime: str = "container"
    #: When the server stops (or a sprite is upgraded), its processes get SIGTERM and this
    #: long to exit before SIGKILL, as a computer being shut down would give them.
    stop_grace: float = 5.0
    #: Seconds after a sprite's last activity before it goes warm (frozen in RAM, disk
    #: synced), and before it goes cold (processes ended, disk unmounted); 0 = never.
    #: docs/lifecycle.md; a sprite's `lifecycle` field overrides both.
    warm_after: float = 30.0
    cold_after: float = 600.0
    checkpoint_max_bytes: int = 100 * GiB
    #: A connection must deliver a complete request head this long after it opens, or
    #: after the first byte of its next request on a keep-alive connection, or it is closed
    #: (a slow or silent client cannot hold a socket). WebSockets are past their head.
    header_timeout: float = 10.0
    #: An idle keep-alive connection (between a response and the next request) is closed
    #: after this long.
    keep_alive_timeout: float = 5.0
    #: Open HTTP and WebSocket connections at once; one more is answered 503 and closed at
    #: once. Lowered at start if the process cannot have enough file descriptors.
    max_connections: int = 1024
    #: False (default): stopping or losing the server leaves running sprites running, and
    #: the next start adopts them. True: a stop ends every sprite and a start clears what a
    #: killed server left, as before sprites outlived their server.
    stop_sprites: bool = False
    org: str = "wisp"
    images_path: Path | None = None  # default: <data_dir>/images

    # Paths derived from the data dir; everything the server owns lives below it.
    @property
    def state_db(self) -> Path:
        return self.data_dir / "wisp.db"

    @property
    def volume_dir(self) -> Path:
        return self.data_dir / "volume"

    @property
    def mount_point(self) -> Path:
        return self.data_dir / "mnt"

    @property
    def run_dir(self) -> Path:
        return self.data_dir / "run"

    @property
    def images_dir(self) -> Path:
        return self.images_path or self.data_dir / "images"

    @property
    def runc_root(self) -> Path:
        return self.data_dir / "run" / "runc"

    @property
    def metadata_url(self) -> str:
        return self.storage.metadata or f"sqlite3://{self.volume_dir / 'meta.db'}"

    @property
    def bucket(self) -> str:
        return self.storage.bucket or str(self.volume_dir / "chunks") + "/"

    @property
    def listen_host_port(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        return host or "127.0.0.1", int(port)


def _section(doc: dict[str, Any], key: str) -> dict[str, Any]:
    value = doc.get(key, {})
    if not isinstance(value, dict):
        raise BadRequest(f"config: [{key}] must be a table")
    return value


def _addresses(what: str, value: Any) -> list[str]:
    """A list of IPv4 addresses (DNS servers are asked on port 53)."""
    import ipaddress

    if not isinstance(value, list):
        raise BadRequest(f"config: {what} must be a list of IPv4 addresses")
    try:
        return [str(ipaddress.IPv4Address(str(v).strip())) for v in value]
    except ValueError as exc:
        raise BadRequest(f"config: {what}: {exc}") from None


def _check_limits(cfg: Config) -> None:
    """The connection limits as numbers (from TOML or env text), each positive."""
    try:
        if any(isinstance(v, bool) for v in (cfg.header_timeout, cfg.keep_alive_timeout,
                                             cfg.max_connections)):
            raise ValueError
        if isinstance(cfg.max_connections, float):  # TOML 1024.0: a count is whole
            raise ValueError
        cfg.header_timeout = float(cfg.header_timeout)
        cfg.keep_alive_timeout = float(cfg.keep_alive_timeout)
        cfg.max_connections = int(cfg.max_connections)
    except (TypeError, ValueError):
        raise BadRequest("config: server.header_timeout and server.keep_alive_timeout must "
                         "be numbers of seconds, server.max_connections a whole number"
                         ) from None
    if not all(0 < t < math.inf for t in (cfg.header_timeout, cfg.keep_alive_timeout)) \
            or cfg.max_connections < 1:
        raise BadRequest("config: server.header_timeout, server.keep_alive_timeout and "
                         "server.max_connections must be greater than 0")


_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


def _check_urls(urls: UrlsConfig) -> None:
    """A domain of DNS labels (lowercase, no trailing dot, not an IP address: a sprite's
    name is put in front of it), and a wake timeout in seconds."""
    domain = urls.domain
    labels = domain.split(".") if isinstance(domain, str) else []
    if not labels or len(domain) > 190 or not all(_LABEL.fullmatch(x) for x in labels) \
            or labels[-1].isdigit():
        raise BadRequest(f"config: urls.domain {domain!r} must be a lowercase DNS name such "
                         "as 'localhost' or 'sprites.example.com'")
    try:
        if isinstance(urls.wake_timeout, bool):
            raise ValueError
        urls.wake_timeout = float(urls.wake_timeout)
    except (TypeError, ValueError):
        raise BadRequest("config: urls.wake_timeout must be a number of seconds") from None
    if not 0 < urls.wake_timeout < math.inf:
        raise BadRequest("config: urls.wake_timeout must be greater than 0")


def load_config(data_dir: Path | None = None, listen: str | None = None,
                config_file: Path | None = None) -> Config:
    """Defaults, then the TOML file, then env vars, then explicit arguments (strongest)."""
    cfg = Config()
    doc: dict[str, Any] = {}
    if config_file is not None:
        try:
            doc = tomllib.loads(Path(config_file).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise BadRequest(f"config file {config_file}: {exc}") from exc
    server = _section(doc, "server")
    storage = _section(doc, "storage")
    sprites = _section(doc, "sprites")
    checkpoints = _section(doc, "checkpoints")
    network = _section(doc, "network")
    urls = _section(doc, "urls")
    if "data_dir" in server:
        cfg.data_dir = Path(server["data_dir"])
    if "listen" in server:
        cfg.listen = str(server["listen"])
    if "images_dir" in server:
        cfg.images_path = Path(server["images_dir"])
    for key in ("header_timeout", "keep_alive_timeout", "max_connections"):
        if key in server:
            setattr(cfg, key, server[key])
    if "stop_sprites" in server:
        if not isinstance(server["stop_sprites"], bool):
            raise BadRequest("config: server.stop_sprites must be true or false")
        cfg.stop_sprites = server["stop_sprites"]
    for key in ("metadata", "storage", "bucket", "access_key", "secret_key", "writeback",
                "cache_size_mb", "volume_name", "reclaim_interval"):
        if key in storage:
            setattr(cfg.storage, key, storage[key])
    interval = cfg.storage.reclaim_interval
    if isinstance(interval, bool) or not isinstance(interval, int | float) or not (
            0 <= interval < math.inf):
        raise BadRequest("config: storage.reclaim_interval must be a number of seconds >= 0")
    cfg.storage.reclaim_interval = float(interval)
    if cfg.storage.storage not in ("file", "s3"):
        raise BadRequest("config: storage.storage must be 'file' or 's3'")
    if cfg.storage.storage == "s3" and not cfg.storage.bucket:
        raise BadRequest("config: storage.bucket (an S3 URL) is required with storage = 's3'")
    for key in ("image", "memory_mb", "cpus", "pids", "warm_pool", "stop_grace", "runtime"):
        if key in sprites:
            setattr(cfg, key, sprites[key])
    for key in ("warm_after", "cold_after"):
        if key in sprites:
            setattr(cfg, key, idle_seconds(f"sprites.{key}", sprites[key], "config: "))
    if "max_bytes" in checkpoints:
        cfg.checkpoint_max_bytes = int(checkpoints["max_bytes"])
    for key in ("uplink", "subnet"):
        if key in network:
            if not isinstance(network[key], str) or not network[key]:
                raise BadRequest(f"config: network.{key} must be a non-empty string")
            setattr(cfg.network, key, network[key])
    if "dns_upstream" in network:
        cfg.network.dns_upstream = _addresses("network.dns_upstream", network["dns_upstream"])
    for key in ("domain", "wake_timeout"):
        if key in urls:
            setattr(cfg.urls, key, urls[key])

    env = os.environ
    if env.get("WISP_DATA_DIR"):
        cfg.data_dir = Path(env["WISP_DATA_DIR"])
    if env.get("WISP_LISTEN"):
        cfg.listen = env["WISP_LISTEN"]
    if env.get("WISP_TOKEN"):
        cfg.token = env["WISP_TOKEN"]
    if env.get("WISP_IMAGES_DIR"):
        cfg.images_path = Path(env["WISP_IMAGES_DIR"])
    if env.get("WISP_IMAGE"):
        cfg.image = env["WISP_IMAGE"]
    if env.get("WISP_RUNTIME"):
        cfg.runtime = env["WISP_RUNTIME"]
    if cfg.runtime not in ("container", "vm"):
        raise BadRequest("config: sprites.runtime must be 'container' or 'vm'")
    if env.get("WISP_WARM_POOL"):
        cfg.warm_pool = int(env["WISP_WARM_POOL"])
    if env.get("WISP_STOP_SPRITES"):
        if env["WISP_STOP_SPRITES"] not in ("0", "1"):
            raise BadRequest("config: WISP_STOP_SPRITES must be 1 or 0")
        cfg.stop_sprites = env["WISP_STOP_SPRITES"] == "1"
    if env.get("WISP_STOP_GRACE"):
        cfg.stop_grace = float(env["WISP_STOP_GRACE"])
    for key in ("warm_after", "cold_after"):
        if env.get(f"WISP_{key.upper()}"):
            setattr(cfg, key, idle_seconds(f"WISP_{key.upper()}",
                                           _number(env[f"WISP_{key.upper()}"]), "config: "))
    if env.get("WISP_CHECKPOINT_MAX_BYTES"):
        cfg.checkpoint_max_bytes = int(env["WISP_CHECKPOINT_MAX_BYTES"])
    if env.get("WISP_UPLINK"):
        cfg.network.uplink = env["WISP_UPLINK"]
    if env.get("WISP_SUBNET"):
        cfg.network.subnet = env["WISP_SUBNET"]
    if env.get("WISP_DNS_UPSTREAM"):
        cfg.network.dns_upstream = _addresses("WISP_DNS_UPSTREAM",
                                              env["WISP_DNS_UPSTREAM"].split(","))
    for key in ("header_timeout", "keep_alive_timeout", "max_connections"):
        if env.get(f"WISP_{key.upper()}"):
            setattr(cfg, key, env[f"WISP_{key.upper()}"])
    _check_limits(cfg)
    for key in ("domain", "wake_timeout"):
        if env.get(f"WISP_URL_{key.upper()}"):
            setattr(cfg.urls, key, env[f"WISP_URL_{key.upper()}"])
    _check_urls(cfg.urls)

    if data_dir is not None:
        cfg.data_dir = Path(data_dir)
    if listen is not None:
        cfg.listen = listen
    cfg.data_dir = cfg.data_dir.absolute()
    try:
        _ = cfg.listen_host_port
    except ValueError:
        raise BadRequest(f"listen address {cfg.listen!r} is not HOST:PORT") from None
    return cfg


def _number(text: str) -> object:
    try:
        return float(text)
    except ValueError:
        return text


#: The longest idle timer accepted (a year): beyond it, use 0 (never).
MAX_IDLE_SECONDS = 365 * 24 * 3600.0


def idle_seconds(name: str, value: object, prefix: str = "") -> float:
    """A `warm_after` / `cold_after` value: seconds >= 0 (0 = never), bounded."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not (
            0 <= value <= MAX_IDLE_SECONDS):
        raise BadRequest(f"{prefix}{name} must be a number of seconds from 0 (never) to "
                         f"{int(MAX_IDLE_SECONDS)}")
    return float(value)
