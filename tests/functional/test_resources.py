"""Resources policies (contract §2.12 `/policy/resources`, docs/resources.md) on a real
server: limits land in the sprite's cgroups at once and bind its processes, survive a
restart and a cold start, revert with DELETE; bad input is a 400, through the plain HTTP
client, the JS SDK and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sprites import SpritesClient

from tests.framework.server import REPO, WispServer
from tests.functional.test_js_sdk import run_js

CGROUP = Path("/sys/fs/cgroup")
#: The server's defaults: what a sprite without a policy gets, and what DELETE restores.
DEFAULT_MB, DEFAULT_CPUS = 384, 1.0
RESERVE_MB = 64  # wisp-init's reserve on top of the workload (wisp/runtime/container.py)


@pytest.fixture(scope="module")
def srv(leak_check: Path) -> Iterator[WispServer]:
    """A server of its own, so its restarts (cold starts) touch no other test."""
    if not (CGROUP / "memory" / "wisp").parent.is_dir():
        pytest.skip("needs cgroup v1 memory controller (the workload reserve is v1 only)")
    cfg = leak_check / "resources.toml"
    cfg.write_text(f"[sprites]\nmemory_mb = {DEFAULT_MB}\ncpus = {DEFAULT_CPUS}\n"
                   "warm_pool = 0\nstop_grace = 1.0\n")
    server = WispServer(leak_check / "resources", config_file=cfg)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def sdk(srv: WispServer) -> Iterator[SpritesClient]:
    """Per test: a server restart moves the server to another port."""
    c = SpritesClient(srv.token, base_url=srv.url)
    yield c
    c.close()


@pytest.fixture
def name(srv: WispServer, sdk: SpritesClient) -> Iterator[str]:
    sprite_name = f"res-{int(time.time() * 1000) % 10**9}-{os.urandom(2).hex()}"
    sdk.create_sprite(sprite_name)
    yield sprite_name
    srv.api("DELETE", f"/v1/sprites/{sprite_name}")


def _policy(srv: WispServer, name: str, method: str = "GET", body: object = None,
            status: int = 200) -> dict[str, Any]:
    kw: dict[str, Any] = {"json": body} if body is not None else {}
    r = srv.api(method, f"/v1/sprites/{name}/policy/resources", **kw)
    assert r.status_code == status, r.text
    value: dict[str, Any] = r.json()
    return value


def _cgroup(srv: WispServer, name: str) -> tuple[int, int, int]:
    """(workload memory MB, sprite cgroup memory MB, CPU quota in % of a CPU), read from
    the host's cgroup files of the sprite."""
    sprite_id = srv.api("GET", f"/v1/sprites/{name}").json()["id"]
    memory = CGROUP / "memory" / "wisp" / sprite_id
    cpu = CGROUP / "cpu" / "wisp" / sprite_id
    quota = int((cpu / "cpu.cfs_quota_us").read_text())
    period = int((cpu / "cpu.cfs_period_us").read_text())
    return (int((memory / "workload" / "memory.limit_in_bytes").read_text()) >> 20,
            int((memory / "memory.limit_in_bytes").read_text()) >> 20,
            round(quota * 100 / period))


def _status(srv: WispServer, name: str) -> str:
    return str(srv.api("GET", f"/v1/sprites/{name}").json()["status"])


def _run(sdk: SpritesClient, name: str, *argv: str) -> int:
    return sdk.sprite(name).run(*argv, timeout=60).returncode


def _alloc(sdk: SpritesClient, name: str, mb: int) -> int:
    """Exit code of a process in the sprite that fills `mb` MB of its own memory (busybox
    dd reads /dev/zero into one buffer of that size, touching every page)."""
    return _run(sdk, name, "dd", "if=/dev/zero", "of=/dev/null", f"bs={mb}M", "count=1")


def test_default_is_the_server_config(srv: WispServer, sdk: SpritesClient, name: str) -> None:
    """A sprite without a policy reports the server's memory_mb and cpus, marked default,
    and its cgroups hold them (with wisp-init's reserve on the sprite's cgroup)."""
    assert _policy(srv, name) == {
        "memory": {"limit_mb": DEFAULT_MB, "autoscale": True, "default": True},
        "cpu": {"limit_cpus": DEFAULT_CPUS, "default": True}}
    assert _run(sdk, name, "true") == 0
    assert _cgroup(srv, name) == (DEFAULT_MB, DEFAULT_MB + RESERVE_MB, 100)
    config = srv.api("GET", f"/v1/sprites/{name}").json()["config"]
    assert (config["ram_mb"], config["cpus"]) == (DEFAULT_MB, 1)


def test_set_applies_live_and_binds_processes(srv: WispServer, sdk: SpritesClient,
                                              name: str) -> None:
    """On a running sprite the new limit is in its cgroups when the POST returns, nothing
    restarted (a background process lives on), and it binds: a process filling more than
    the limit is OOM-killed (137), one under it runs; raising it again lets the big one run."""
    assert _run(sdk, name, "sh", "-c", "sleep 1000 >/dev/null 2>&1 &") == 0
    assert _alloc(sdk, name, 200) == 0  # fits the default 384 MB
    got = _policy(srv, name, "POST", {"memory": {"limit_mb": 128, "autoscale": True}})
    assert got["memory"] == {"limit_mb": 128, "autoscale": True, "default": False}
    assert got["cpu"]["default"] is True  # untouched
    assert _cgroup(srv, name) == (128, 128 + RESERVE_MB, 100)
    assert _run(sdk, name, "pidof", "sleep") == 0, "the sprite was restarted"
    assert _alloc(sdk, name, 200) == 137
    assert _alloc(sdk, name, 64) == 0
    _policy(srv, name, "POST", {"memory": {"limit_mb": 320}})
    assert _cgroup(srv, name)[:2] == (320, 320 + RESERVE_MB)
    assert _alloc(sdk, name, 200) == 0
    assert _run(sdk, name, "pidof", "sleep") == 0
    config = srv.api("GET", f"/v1/sprites/{name}").json()["config"]
    assert config["ram_mb"] == 320


def test_cpu_extension_sets_the_quota(srv: WispServer, sdk: SpritesClient, name: str) -> None:
    """`cpu.limit_cpus` is the CFS quota of the sprite's cgroup; a POST naming only cpu
    keeps the memory limit, `null` reverts only that resource."""
    _run(sdk, name, "true")
    _policy(srv, name, "POST", {"memory": {"limit_mb": 256}})
    got = _policy(srv, name, "POST", {"cpu": {"limit_cpus": 0.5}})
    assert got["cpu"] == {"limit_cpus": 0.5, "default": False}
    assert got["memory"]["limit_mb"] == 256
    assert _cgroup(srv, name) == (256, 256 + RESERVE_MB, 50)
    got = _policy(srv, name, "POST", {"memory": None})
    assert got["memory"]["default"] is True and got["cpu"]["limit_cpus"] == 0.5
    assert _cgroup(srv, name) == (DEFAULT_MB, DEFAULT_MB + RESERVE_MB, 50)


def test_lowering_below_what_cannot_be_reclaimed_is_409(srv: WispServer, sdk: SpritesClient,
                                                        name: str) -> None:
    """With 150 MB in the sprite's tmpfs (no swap: the kernel cannot reclaim it), a limit
    of 100 MB is refused with 409 `conflict` and nothing changes; once the file is gone
    the same POST succeeds."""
    _policy(srv, name, "POST", {"memory": {"limit_mb": 256}})
    assert _run(sdk, name, "dd", "if=/dev/zero", "of=/dev/shm/fill", "bs=1M",
                "count=150") == 0
    r = srv.api("POST", f"/v1/sprites/{name}/policy/resources",
                json={"memory": {"limit_mb": 100}})
    assert r.status_code == 409 and r.json()["error"] == "conflict", r.text
    assert "nothing changed" in r.json()["message"]
    assert _cgroup(srv, name)[:2] == (256, 256 + RESERVE_MB)
    assert _policy(srv, name)["memory"]["limit_mb"] == 256
    assert _run(sdk, name, "rm", "/dev/shm/fill") == 0
    assert _policy(srv, name, "POST", {"memory": {"limit_mb": 100}})["memory"]["limit_mb"] \
        == 100
    assert _cgroup(srv, name)[:2] == (100, 100 + RESERVE_MB)


def test_persists_across_restart_and_cold_start(srv: WispServer, name: str) -> None:
    """The policy is applied again by POST /restart and by the start after a server
    restart; while the sprite is cold a GET or POST does not wake it and a POST there is
    applied at its next start; DELETE reverts to the defaults, live."""
    sdk = SpritesClient(srv.token, base_url=srv.url)
    sdk.sprite(name).run("true")
    _policy(srv, name, "POST", {"memory": {"limit_mb": 200}, "cpu": {"limit_cpus": 0.5}})
    r = srv.api("POST", f"/v1/sprites/{name}/restart", timeout=60)
    assert r.status_code == 200, r.text
    assert _cgroup(srv, name) == (200, 200 + RESERVE_MB, 50)
    sdk.close()

    srv.restart()  # every sprite is cold after it
    sdk = SpritesClient(srv.token, base_url=srv.url)
    assert _status(srv, name) == "cold"
    assert _policy(srv, name)["memory"]["limit_mb"] == 200
    assert _policy(srv, name, "POST", {"memory": {"limit_mb": 160}})["cpu"]["limit_cpus"] \
        == 0.5
    assert _status(srv, name) == "cold", "setting a cold sprite's limits woke it"
    sdk.sprite(name).run("true")
    assert _cgroup(srv, name) == (160, 160 + RESERVE_MB, 50)
    assert _alloc(sdk, name, 200) == 137

    got = _policy(srv, name, "DELETE")
    assert got == {"memory": {"limit_mb": DEFAULT_MB, "autoscale": True, "default": True},
                   "cpu": {"limit_cpus": DEFAULT_CPUS, "default": True}}
    assert _cgroup(srv, name) == (DEFAULT_MB, DEFAULT_MB + RESERVE_MB, 100)
    assert _alloc(sdk, name, 200) == 0
    sdk.close()


def test_fork_keeps_the_policy(srv: WispServer, name: str) -> None:
    """A fork starts with its source's limits (they are the sprite's, like its disk)."""
    _policy(srv, name, "POST", {"memory": {"limit_mb": 192}})
    fork = f"{name}-f"
    r = srv.api("POST", f"/v1/sprites/{name}/fork", json={"name": fork}, timeout=120)
    assert r.status_code in (200, 201), r.text
    try:
        assert _policy(srv, fork)["memory"] == {"limit_mb": 192, "autoscale": True,
                                                "default": False}
    finally:
        srv.api("DELETE", f"/v1/sprites/{fork}")


@pytest.mark.parametrize("body", [
    {}, {"memory": {"limit_mb": 32}}, {"memory": {"limit_mb": 10**9}},
    {"memory": {"limit_mb": "512"}}, {"memory": {"limit_mb": 512.5}},
    {"memory": {"limit_mb": 512, "autoscale": False}}, {"memory": {"limitMB": 512}},
    {"memroy": {"limit_mb": 512}}, {"cpu": {"limit_cpus": 0}},
    {"cpu": {"limit_cpus": 100000}}, [], "text",
])
def test_bad_input_is_400(srv: WispServer, name: str, body: object) -> None:
    """Each malformed or out-of-bounds body is a 400 with the contract's error body, and
    the sprite's policy is unchanged."""
    r = srv.api("POST", f"/v1/sprites/{name}/policy/resources", json=body,
                validate_request=False)
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "bad_request" and r.json()["message"]
    assert _policy(srv, name)["memory"]["default"] is True


def test_not_json_unknown_sprite_and_auth(srv: WispServer, name: str) -> None:
    """Not JSON: 400. Unknown sprite: 404 for all three methods. No token: 401."""
    r = srv.api("POST", f"/v1/sprites/{name}/policy/resources", content=b"{nope",
                headers={"Content-Type": "application/json"}, validate_request=False)
    assert r.status_code == 400 and r.json()["error"] == "bad_request"
    for method, body in (("GET", None), ("POST", {"memory": {"limit_mb": 256}}),
                         ("DELETE", None)):
        kw: dict[str, Any] = {"json": body} if body is not None else {}
        r = srv.api(method, "/v1/sprites/no-such-sprite/policy/resources", **kw)
        assert r.status_code == 404 and r.json()["error"] == "sprite_not_found", r.text
        r = srv.api(method, f"/v1/sprites/{name}/policy/resources",
                    headers={"Authorization": "Bearer wrong"}, **kw)
        assert r.status_code == 401
    assert _policy(srv, name)["memory"]["default"] is True


def test_js_sdk_resources_calls(srv: WispServer, name: str) -> None:
    """@fly/sprites' getResourcesPolicy, updateResourcesPolicy and deleteResourcesPolicy
    work unmodified, and the limit binds a process the SDK runs (tests/js/resources.mjs)."""
    lines = run_js(srv, "resources.mjs", WISP_SPRITE=name, DEFAULT_MB=str(DEFAULT_MB))
    assert lines[-1] == "ok delete"
    assert _cgroup(srv, name)[:2] == (DEFAULT_MB, DEFAULT_MB + RESERVE_MB)


def _wisp(srv: WispServer, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WISP_")}
    env.update(WISP_API=srv.url, WISP_TOKEN=srv.token, PYTHONPATH=str(REPO),
               XDG_CONFIG_HOME=str(REPO / ".no-config"))
    return subprocess.run([sys.executable, "-m", "wisp.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_get_set_clear(srv: WispServer, name: str) -> None:
    """`wisp resources set --memory --cpus` applies both, `get` shows them (text and
    --json), `clear` reverts; a bad value exits 1 with the server's message."""
    r = _wisp(srv, "resources", "set", "-s", name, "--memory", "256", "--cpus", "0.5")
    assert r.returncode == 0, r.stderr
    assert "256 MB" in r.stdout and "0.5 CPUs" in r.stdout
    got = json.loads(_wisp(srv, "resources", "get", "-s", name, "--json").stdout)
    assert (got["memory"]["limit_mb"], got["cpu"]["limit_cpus"]) == (256, 0.5)
    assert "set for this sprite" in _wisp(srv, "resources", "get", "-s", name).stdout
    r = _wisp(srv, "resources", "set", "-s", name, "--memory", "1")
    assert r.returncode == 1 and "memory.limit_mb must be between" in r.stderr
    assert _wisp(srv, "resources", "set", "-s", name).returncode == 1
    r = _wisp(srv, "resources", "clear", "-s", name)
    assert r.returncode == 0 and f"{DEFAULT_MB} MB  (server default)" in r.stdout
