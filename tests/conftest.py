"""Fixtures: one real Wisp server per session (busybox image), the official SDK as client,
a sprite factory, and a leak check that fails the run on anything left on the host."""

from __future__ import annotations

import itertools
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.framework.internet import Internet
from tests.framework.leaks import leaks
from tests.framework.replies import audit
from tests.framework.server import WispServer

BASE = Path(os.environ.get("WISP_TEST_BASE", f"/var/tmp/wisp-test-{os.getpid()}"))


@pytest.fixture(scope="session", autouse=True)
def leak_check() -> Iterator[Path]:
    """Torn down last: after every server stopped, nothing of ours may remain."""
    BASE.mkdir(parents=True, exist_ok=True)
    yield BASE
    found = {k: v for k, v in leaks(BASE).items() if v}
    assert not found, f"leaked after the test session: {found}"
    if os.environ.get("WISP_KEEP_TEST_DIR") != "1":
        shutil.rmtree(BASE, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def reply_audit(leak_check: Path, request: pytest.FixtureRequest) -> Iterator[None]:
    """Torn down before the leak check: no error reply any server sent in this session
    named a host path or carried a traceback (tests/framework/replies.py)."""
    yield
    seen, offending = audit(leak_check)
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"\nreply audit: {seen} error replies checked, "
                                f"{len(offending)} with a host path or a traceback")
    assert not offending, "error replies leaked host internals:\n" + "\n".join(offending[:20])


@pytest.fixture(scope="session")
def server(leak_check: Path) -> Iterator[WispServer]:
    srv = WispServer(leak_check / "main")
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def client(server: WispServer):  # type: ignore[no-untyped-def]
    from sprites import SpritesClient

    c = SpritesClient(server.token, base_url=server.url)
    yield c
    c.close()


_names = itertools.count()


@pytest.fixture
def sprite_factory(client, server: WispServer) -> Iterator[Callable[..., object]]:  # type: ignore[no-untyped-def]
    made: list[str] = []

    def make(prefix: str = "t", **kw: object):  # type: ignore[no-untyped-def]
        name = f"{prefix}-{int(time.time() * 1000) % 10**9}-{next(_names)}"
        made.append(name)
        return client.create_sprite(name, **kw)

    yield make
    for name in made:
        server.api("DELETE", f"/v1/sprites/{name}")


@pytest.fixture
def sprite(sprite_factory):  # type: ignore[no-untyped-def]
    return sprite_factory()


# -- network: a fake internet and a server whose uplink it is (tests/framework/internet.py)
@pytest.fixture(scope="module")
def internet() -> Iterator[Internet]:
    """Its guard must count 0 packets from sprites on any other way out at the end."""
    net = Internet()
    net.start()
    yield net
    leaked = net.leaked()
    net.stop()
    assert leaked == 0, f"{leaked} packets from sprites tried to leave by the real uplink"


def _on_internet(data_dir: Path, internet: Internet, image: str) -> Iterator[WispServer]:
    srv = WispServer(data_dir, image=image, extra_env={"WISP_UPLINK": internet.uplink,
                                                       "WISP_DNS_UPSTREAM": internet.GATEWAY})
    srv.start()
    yield srv
    srv.stop()


def _client(srv: WispServer):  # type: ignore[no-untyped-def]
    from sprites import SpritesClient

    c = SpritesClient(srv.token, base_url=srv.url)
    yield c
    c.close()


@pytest.fixture(scope="module")
def net_server(leak_check: Path, internet: Internet) -> Iterator[WispServer]:
    yield from _on_internet(leak_check / "network", internet, "busybox")


@pytest.fixture(scope="module")
def net_client(net_server: WispServer):  # type: ignore[no-untyped-def]
    yield from _client(net_server)


@pytest.fixture(scope="module")
def policy_server(leak_check: Path, internet: Internet) -> Iterator[WispServer]:
    """A server on the fake internet with the Debian image (curl, python3, sudo)."""
    yield from _on_internet(leak_check / "policy", internet, "debian")


@pytest.fixture(scope="module")
def policy_client(policy_server: WispServer):  # type: ignore[no-untyped-def]
    yield from _client(policy_server)


# -- sprite URLs: the Debian image (python3 runs the apps), a short wake bound so that the
# 502 test waits seconds, not the default 10 s (tests/functional/test_urls.py)
URL_WAKE_TIMEOUT = 6.0


@pytest.fixture(scope="session")
def url_server(leak_check: Path) -> Iterator[WispServer]:
    srv = WispServer(leak_check / "urls", image="debian",
                     extra_env={"WISP_URL_WAKE_TIMEOUT": str(URL_WAKE_TIMEOUT)})
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def url_client(url_server: WispServer):  # type: ignore[no-untyped-def]
    """Per test: a test may restart the server, which moves it to another port."""
    from sprites import SpritesClient

    c = SpritesClient(url_server.token, base_url=url_server.url)
    yield c
    c.close()


@pytest.fixture
def url_sprites(url_client, url_server: WispServer) -> Iterator[Callable[..., object]]:  # type: ignore[no-untyped-def]
    """A factory of sprites on the URL server, deleted after the test."""
    made: list[str] = []

    def make(prefix: str = "u", **kw: object):  # type: ignore[no-untyped-def]
        name = f"{prefix}-{int(time.time() * 1000) % 10**9}-{next(_names)}"
        made.append(name)
        return url_client.create_sprite(name, **kw)

    yield make
    for name in made:
        url_server.api("DELETE", f"/v1/sprites/{name}")
