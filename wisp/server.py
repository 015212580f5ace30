"""`wisp serve`: wire the parts together and run them under uvicorn.

Start order: host clean-up of what a crashed predecessor left → JuiceFS volume → recovery of
interrupted work → API. Stop order is the reverse: sessions → sprites (container, overlay,
ext4, loop) → volume (flushed). The first SIGINT/SIGTERM drains, a second one forces
(uvicorn's behaviour).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import secrets
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from wisp.config import Config, load_config

if TYPE_CHECKING:  # the real imports happen in build(), keeping `wisp --help` fast
    from starlette.applications import Starlette

    from wisp.checkpoints import Checkpoints
    from wisp.db import Store
    from wisp.exec.sessions import SessionRegistry
    from wisp.images import ImageStore
    from wisp.network import Network
    from wisp.policies import Policies
    from wisp.runtime.base import Runtime
    from wisp.sprites import Sprites
    from wisp.storage.juicefs import Volume
    from wisp.urls import SpriteUrls

__all__ = ["Services", "serve", "build", "ensure_token"]

log = logging.getLogger("wisp.server")


@dataclass
class Services:
    """Every long-lived part of a server, built once and shared by the routes."""

    config: Config
    token: str
    store: Store
    volume: Volume
    images: ImageStore
    runtime: Runtime
    sessions: SessionRegistry
    sprites: Sprites
    checkpoints: Checkpoints
    network: Network
    policies: Policies
    urls: SpriteUrls


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def ensure_token(config: Config) -> str:
    """WISP_TOKEN when set; else the token stored (0600) under the data dir, made once."""
    if config.token:
        return config.token
    path = config.data_dir / "token"
    if path.exists():
        token = path.read_text().strip()
        if token:
            return token
    token = secrets.token_hex(32)
    _write_private(path, token + "\n")
    return token


def build(config: Config) -> tuple[Services, Starlette]:
    """Make the services and the ASGI app (nothing touches the host until the lifespan)."""

    from wisp.api.app import build_app
    from wisp.api.fs_routes import fs_routes
    from wisp.api.lifecycle_routes import lifecycle_routes
    from wisp.api.openapi import openapi_routes
    from wisp.api.policy_routes import policy_routes
    from wisp.api.ports_routes import ports_routes
    from wisp.api.resources_routes import resources_routes
    from wisp.api.services_routes import services_routes
    from wisp.api.sprites_routes import sprite_routes
    from wisp.api.url_routes import url_routes
    from wisp.checkpoints import Checkpoints
    from wisp.db import Store
    from wisp.exec.routes import exec_routes
    from wisp.exec.sessions import SessionRegistry
    from wisp.images import ImageStore
    from wisp.lifecycle import Sleeper
    from wisp.network import Network
    from wisp.policies import Policies
    from wisp.ports import Ports
    from wisp.resources import Resources
    from wisp.runtime.container import ContainerRuntime
    from wisp.runtime.vm.driver import VMRuntime
    from wisp.services import SpriteServices
    from wisp.sprites import Sprites
    from wisp.storage.juicefs import Volume
    from wisp.storage.reclaim import Reclaimer
    from wisp.urls import SpriteUrls, UrlRouter

    token = ensure_token(config)
    store = Store(config.state_db)
    volume = Volume(config)
    images = ImageStore(config.images_dir)
    runtime = ContainerRuntime(config.runc_root, config.run_dir / "sprites")
    # On a tmpfs beside the agents' sockets: exec output outlives this process (a restart
    # adopts it, docs/exec.md) but not the host, like the sprites' processes.
    sessions = SessionRegistry(state_dir=runtime.host_dir / "sessions")
    network = Network(config.network, runtime.tag)
    vm = VMRuntime(config.run_dir / "sprites", runtime.host_dir / "vm", tag=runtime.tag)
    sprites = Sprites(config, store, volume, images, runtime, sessions, network, vm)
    volume.on_lost = sprites.storage_lost
    checkpoints = Checkpoints(sprites)
    policies = Policies(sprites)
    reclaimer = Reclaimer(volume, sprites.lock, config.storage.reclaim_interval)
    sleeper = Sleeper(sprites)
    urls = SpriteUrls(sprites, token, config.urls)
    svc = Services(config, token, store, volume, images, runtime, sessions, sprites,
                   checkpoints, network, policies, urls)

    keep = not config.stop_sprites

    async def startup() -> None:
        # Sprites an earlier server process left running are adopted, not torn down,
        # when their storage is still mounted and answering (docs/lifecycle.md).
        survivors = sprites.survivors() if keep and await volume.adoptable() else set()
        await sprites.clear_host(survivors)
        sessions.mount()  # after clear_host, which unmounts it unless sprites are kept
        networked = await network.start(survivors)
        await volume.start(adopt=keep)
        await sprites.recover()
        await sprites.adopt(survivors & networked)
        for lost in sorted(survivors - networked):  # its veth could not be kept
            await sprites.stop_one(lost)
        reclaimer.start()
        await urls.start()
        sleeper.start()

    async def shutdown() -> None:
        # Reverse order; each step runs even if the one before it failed (or never ran:
        # a start-up that failed half way is undone the same way), so the volume is
        # always flushed and unmounted last. With `keep` (the default) the sprites, their
        # mounts, network and sessions stay for the next server.
        steps = (sleeper.stop,
                 urls.stop,  # its sockets would pin stopped sprites' namespaces
                 sessions.detach_all if keep else sessions.close_all,
                 functools.partial(sprites.stop_all, keep=keep),
                 *(() if keep else (sprites.clear_host,)),  # what a cancelled start
                 functools.partial(network.stop, keep=keep),  # left half made
                 reclaimer.stop,  # a last pass for what the stopped sprites freed
                 functools.partial(volume.stop, keep=keep))
        for step in steps:
            try:
                await asyncio.shield(step())
            except BaseException:
                log.exception("shutdown step %s failed", getattr(
                    step, "__qualname__", getattr(step, "func", step)))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            await startup()
        except BaseException:
            await asyncio.shield(shutdown())
            store.close()
            raise
        log.info("wisp ready on %s", config.listen)
        try:
            yield
        finally:
            await shutdown()
            store.close()

    routes = [*sprite_routes(svc), *lifecycle_routes(sprites), *policy_routes(policies),
              *resources_routes(Resources(sprites)),
              *services_routes(SpriteServices(sprites)),
              *exec_routes(sprites.handle, sessions),
              *fs_routes(sprites.handle, storage=volume.require),
              *ports_routes(Ports(sprites)), *url_routes(urls), *openapi_routes()]
    app = build_app(routes, token, lifespan)
    # Outermost: URL traffic (by Host) never reaches the API's auth, routes or error bodies
    app.add_middleware(UrlRouter, proxy=urls.proxy)
    return svc, app


def _ensure_base_image(config: Config) -> None:
    from wisp.images import ImageStore

    images = ImageStore(config.images_dir)
    if images.latest(config.image) is not None:
        return
    from rich.console import Console

    console = Console(stderr=True)
    with console.status(f"building base image '{config.image}' (first run only)…") as status:
        def progress(line: str) -> None:
            status.update(f"building base image '{config.image}': {line[:100]}")

        if config.image == "busybox":
            images.build_busybox(config.image)
        else:
            images.build_debian(config.image, progress=progress)
    console.print(f"base image '{config.image}' ready")


def serve(data_dir: Path | None = None, listen: str | None = None,
          config_file: Path | None = None) -> None:
    import uvicorn

    from wisp.runtime.container import build_init

    if os.geteuid() != 0:
        sys.exit("wisp serve must run as root (it mounts disks and runs containers)")
    logging.basicConfig(level=os.environ.get("WISP_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = load_config(data_dir, listen, config_file)
    config.data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(config.data_dir, 0o711)
    build_init()
    _ensure_base_image(config)
    svc, app = build(config)
    host, port = config.listen_host_port
    api = f"http://{host}:{port}"
    import json

    from wisp.client import announce_server

    # This server's own endpoint file, then its context in the user's client.json (unless
    # WISP_NO_CLIENT_CONFIG=1) and the banner whose "Try:" line works as printed.
    _write_private(config.data_dir / "client.json",
                   json.dumps({"api": api, "token": svc.token}, indent=2) + "\n")
    print(announce_server(api, svc.token, config.data_dir), flush=True)
    # The websockets backend awaits each send, which exec's backpressure relies on; its
    # deprecation notice is about a future default, not a behaviour we depend on changing.
    import warnings

    warnings.filterwarnings("ignore", message=".*websockets. implementation is deprecated")
    # Connection limits (docs/security.md, "Limits"): header timeout, idle keep-alive and a
    # cap, on our h11 protocol. permessage-deflate is declined (the contract makes it
    # optional): compressing exec output on the event loop held a stream to ~30 MB/s.
    from wisp.api.limits import fit_fd_limit, http_protocol

    http = http_protocol(config.header_timeout, config.keep_alive_timeout,
                         fit_fd_limit(config.max_connections))
    # proxy_headers off: uvicorn would otherwise take any local client's X-Forwarded-For as
    # its address, and the URL proxy passes that address on to sprites (docs/urls.md).
    server = uvicorn.Server(uvicorn.Config(
        app, host=host, port=port, http=http, ws="websockets", log_level="warning",
        proxy_headers=False,
        ws_max_size=32 * 1024 * 1024, ws_ping_interval=20, ws_ping_timeout=60,
        ws_per_message_deflate=False, timeout_graceful_shutdown=10, lifespan="on"))
    # The port is taken before the start-up runs, not after it as uvicorn.run would: the
    # start-up starts JuiceFS, whose metrics listener falls back to a random port when its
    # own is busy, and once took ours (a test server's start failed "address already in
    # use"). Taken first, a busy port also fails before anything is mounted.
    sock = server.config.bind_socket()  # exits 3 with uvicorn's message if it cannot
    sock.listen(server.config.backlog)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if not server.started:
        sys.exit(3)  # uvicorn's STARTUP_FAILURE, as uvicorn.run exits
