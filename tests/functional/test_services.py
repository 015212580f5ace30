"""Services through the official SDK and the raw API (contract §2.11, §5.2): supervised by
the sprite's init, restarted on a crash, started in `needs` order at every boot, logs in
/.sprite/logs/services."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from sprites.exceptions import APIError

from tests.framework.poll import wait_for
from tests.framework.server import WispServer

SLEEPER = ["-c", "echo up; exec sleep 1000"]


def sh(sprite, script: str) -> bytes:  # type: ignore[no-untyped-def]
    return sprite.command("sh", "-c", script).output()




def events(response) -> list[dict[str, Any]]:  # type: ignore[no-untyped-def]
    return [json.loads(line) for line in response.text.splitlines() if line.strip()]


def test_create_get_list(sprite) -> None:
    """PUT streams started, the output and complete (with the log files); the service is
    listed and got with a running state, and its definition echoes the request."""
    stream = list(sprite.create_service("web", "sh", SLEEPER, env={"APP": "x"},
                                        dir="/tmp", duration=1))
    types = [m.type for m in stream]
    assert types[0] == "started" and types[-1] == "complete", types
    assert "up\n" in "".join(m.data or "" for m in stream if m.type == "stdout")
    assert all(isinstance(m.timestamp, int) and m.timestamp > 1e12 for m in stream)
    assert stream[-1].log_files["combined"] == "/.sprite/logs/services/web.log"
    [svc] = sprite.list_services()
    assert (svc.name, svc.cmd, svc.args, svc.env, svc.dir) == ("web", "sh", SLEEPER,
                                                              {"APP": "x"}, "/tmp")
    assert svc.state.status == "running" and svc.state.pid > 1
    assert svc.state.restart_count == 0 and svc.state.started_at is not None
    got = sprite.get_service("web")
    assert got.state.pid == svc.state.pid
    # it runs as the sprite user, in its dir, with its env, in the workload cgroup
    pid = svc.state.pid
    out = sh(sprite, f"cat /proc/{pid}/environ | tr '\\0' '\\n' | grep APP; "
                     f"readlink /proc/{pid}/cwd; stat -c %u /proc/{pid}; "
                     f"cat /proc/{pid}/cgroup | grep -c workload")
    assert out.split() == [b"APP=x", b"/tmp", b"1000", out.split()[-1]]
    assert int(out.split()[-1]) >= 1


def test_crash_restarted_with_backoff(sprite) -> None:
    """A service that keeps dying is restarted by the sprite's init with a growing
    restart_count; between runs its state names the next restart."""
    stream = list(sprite.create_service("crash", "sh", ["-c", "echo boom; exit 3"],
                                        duration=5))
    assert stream[0].type == "started"
    assert stream[-1].type == "exit" and stream[-1].exit_code == 3
    seen_next = []

    def restarted() -> bool:
        st = sprite.get_service("crash").state
        if st.next_restart_at is not None:
            seen_next.append(st)
        return st.restart_count >= 3

    wait_for(restarted)
    assert seen_next and seen_next[0].status == "starting"
    assert "exited with code 3" in (seen_next[0].error or "")
    assert sh(sprite, "cat /.sprite/logs/services/crash.log").count(b"boom") >= 3


def test_stop_start_signal_delete(sprite, server: WispServer) -> None:
    """stop → stopped and 409 for a second stop or a signal; start → running; a TERM
    signal counts as a crash (restarted, restart_count 1); delete → 204 and 404 after,
    with the log file kept."""
    list(sprite.create_service("svc", "sh", SLEEPER, duration=0.2))
    pid0 = sprite.get_service("svc").state.pid
    stopped = list(sprite.stop_service("svc", timeout=5))
    assert [m.type for m in stopped] == ["stopping", "stopped", "complete"]
    assert stopped[1].exit_code == 128 + 15
    assert sprite.get_service("svc").state.status == "stopped"
    assert sh(sprite, f"test -e /proc/{pid0} && echo alive || echo gone") == b"gone\n"
    with pytest.raises(APIError) as e:
        sprite.stop_service("svc")
    assert e.value.status_code == 409
    base = f"/v1/sprites/{sprite.name}/services"
    r = server.api("POST", base + "/signal", json={"name": "svc", "signal": "TERM"})
    assert r.status_code == 409 and r.json()["error"] == "service_not_running"

    started = list(sprite.start_service("svc", duration=0.3))
    assert started[0].type == "started" and started[-1].type == "complete"
    pid1 = sprite.get_service("svc").state.pid
    assert pid1 != pid0
    sprite.signal_service("svc", "SIGTERM")
    wait_for(lambda: sprite.get_service("svc").state.pid not in (None, pid1))
    st = sprite.get_service("svc").state
    assert st.status == "running" and st.restart_count == 1

    r = server.api("POST", base + "/signal", json={"name": "svc", "signal": "SIGNOPE"},
                   validate_request=False)
    assert r.status_code == 400 and r.json()["error"] == "bad_request"
    r = server.api("POST", base + "/signal", json={"name": "ghost", "signal": "TERM"})
    assert r.status_code == 404 and r.json()["error"] == "service_not_found"

    assert server.api("DELETE", f"{base}/svc").status_code == 204
    assert server.api("GET", f"{base}/svc").status_code == 404
    assert server.api("DELETE", f"{base}/svc").status_code == 404
    assert sprite.list_services() == []
    assert b"up" in sh(sprite, "cat /.sprite/logs/services/svc.log")


def test_needs_order_at_boot_and_restore(sprite, server: WispServer) -> None:
    """At every boot (restart, restore) services start in `needs` order (forked in that
    order: increasing pids), an explicitly stopped one stays stopped, and a restore rewinds
    the definitions with the disk."""
    list(sprite.create_service("app", "sh", SLEEPER, needs=["db"], duration=0))
    list(sprite.create_service("db", "sh", SLEEPER, needs=["cache"], duration=0))
    list(sprite.create_service("cache", "sh", SLEEPER, duration=0))
    list(sprite.create_service("idle", "sh", SLEEPER, duration=0))
    list(sprite.stop_service("idle"))

    def pids() -> list[int]:
        by = {s.name: s.state for s in sprite.list_services()}
        assert by["idle"].status == "stopped"
        return [by[n].pid for n in ("cache", "db", "app")]

    r = server.api("POST", f"/v1/sprites/{sprite.name}/restart")
    assert r.status_code == 200
    after_restart = pids()
    assert after_restart == sorted(after_restart), after_restart

    list(sprite.create_checkpoint("services"))
    assert server.api("DELETE", f"/v1/sprites/{sprite.name}/services/app").status_code == 204
    list(sprite.create_service("extra", "sh", SLEEPER, duration=0))
    list(sprite.restore_checkpoint("v1"))
    names = sorted(s.name for s in sprite.list_services())
    assert names == ["app", "cache", "db", "idle"]
    after_restore = pids()
    assert after_restore == sorted(after_restore), after_restore
    assert b"extra" not in sh(sprite, "ps")


def test_fork_copies_definitions(sprite, client, server: WispServer) -> None:
    """A fork has its source's services and starts them at its first boot."""
    list(sprite.create_service("web", "sh", SLEEPER, duration=0))
    name = sprite.name + "-f"
    r = server.api("POST", f"/v1/sprites/{sprite.name}/fork", json={"name": name})
    assert r.status_code in (200, 201), r.text
    try:
        child = client.get_sprite(name)
        [svc] = child.list_services()
        assert svc.name == "web" and svc.state.status == "running"
    finally:
        server.api("DELETE", f"/v1/sprites/{name}")


def test_logs_in_sprite_and_rotation(sprite) -> None:
    """stdout and stderr go to NAME.log (both) and NAME.stdout.log / NAME.stderr.log inside
    the sprite; past 1 MiB a file is rotated to FILE.1; the sprite user cannot write there,
    and /.sprite itself stays read-only."""
    script = "echo out; echo err >&2; head -c 1500000 /dev/zero | tr '\\0' a; exec sleep 1000"
    list(sprite.create_service("noisy", "sh", ["-c", script], duration=0))
    d = "/.sprite/logs/services"

    def rotated() -> bool:
        return sh(sprite, f"test -e {d}/noisy.log.1 && echo y || echo n") == b"y\n"

    wait_for(rotated)
    assert b"err" in sh(sprite, f"cat {d}/noisy.stderr.log")
    assert b"out" in sh(sprite, f"cat {d}/noisy.stdout.log {d}/noisy.stdout.log.1")
    sizes = sh(sprite, f"stat -c %s {d}/noisy.log {d}/noisy.log.1").split()
    assert all(int(s) <= 1 << 20 for s in sizes), sizes
    denied = sh(sprite, f"touch {d}/x 2>&1; touch /.sprite/x 2>&1; "
                        "touch /.sprite/logs/x 2>&1; echo done")
    assert denied.count(b"denied") + denied.count(b"Read-only") == 3, denied


def test_http_port_conflict(sprite, server: WispServer) -> None:
    """Only one service may own http_port: 409 with the documented message; the owner may
    change its own port."""
    list(sprite.create_service("a", "sh", SLEEPER, http_port=8000, duration=0))
    base = f"/v1/sprites/{sprite.name}/services"
    r = server.api("PUT", f"{base}/b", json={"cmd": "sh", "args": SLEEPER, "http_port": 8001})
    assert r.status_code == 409
    assert r.json() == {"error": "conflict",
                        "message": "another service already has an HTTP port configured"}
    r = server.api("PUT", f"{base}/a?duration=0", json={"cmd": "sh", "args": SLEEPER,
                                                        "http_port": 8002})
    assert r.status_code == 200
    assert sprite.get_service("a").http_port == 8002


@pytest.mark.parametrize("path,body,query", [
    ("bad.name", {"cmd": "sh"}, ""),
    (" lead", {"cmd": "sh"}, ""),
    ("ok", {}, ""),
    ("ok", {"cmd": ""}, ""),
    ("ok", {"cmd": "sh", "args": "x"}, ""),
    ("ok", {"cmd": "sh", "needs": [1]}, ""),
    ("ok", {"cmd": "sh", "http_port": "80"}, ""),
    ("ok", {"cmd": "sh", "http_port": 70000}, ""),
    ("ok", {"cmd": "sh", "env": {"A": 1}}, ""),
    ("ok", {"cmd": "sh", "env": {"A=B": "1"}}, ""),
    ("ok", {"cmd": "sh", "dir": 5}, ""),
    ("ok", {"cmd": "sh\u0000"}, ""),
    ("ok", {"cmd": "sh", "needs": ["ok"]}, ""),
    ("ok", {"cmd": "sh"}, "?duration=abc"),
    ("ok", {"cmd": "sh"}, "?duration=-1s"),
    ("ok", [1, 2], ""),
    ("ok", {"cmd": "sh", "args": ["x" * 200_000]}, ""),
])
def test_bad_input_is_400(sprite, server: WispServer, path: str, body: object,
                          query: str) -> None:
    """Every malformed PUT is a 400 with the contract's error body, never a 500."""
    r = server.api("PUT", f"/v1/sprites/{sprite.name}/services/{path}{query}", json=body,
                   validate_request=False)
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "bad_request" and r.json()["message"]
    assert sprite.list_services() == []  # nothing refused was stored


def test_unknown_is_404(sprite, server: WispServer) -> None:
    """Unknown service (every endpoint) or sprite: 404 with its code."""
    base = f"/v1/sprites/{sprite.name}/services/nope"
    for method, path in [("GET", ""), ("DELETE", ""), ("POST", "/start"), ("POST", "/stop"),
                         ("POST", "/restart"), ("GET", "/logs")]:
        r = server.api(method, base + path)
        assert r.status_code == 404 and r.json()["error"] == "service_not_found", (method, path)
    r = server.api("GET", "/v1/sprites/no-such-sprite/services")
    assert r.status_code == 404 and r.json()["error"] == "sprite_not_found"


def test_durations_and_raw_events(sprite, server: WispServer) -> None:
    """Go and JS duration spellings and bare numbers are accepted; every event line has an
    integer millisecond timestamp; logs replay the last lines."""
    base = f"/v1/sprites/{sprite.name}/services"
    body = {"cmd": "sh", "args": ["-c", "for i in 1 2 3; do echo line$i; done; exec sleep 1000"]}
    for d in ("500ms", "1.5s", "0", "0.2"):
        r = server.api("PUT", f"{base}/ev?duration={d}", json=body)
        assert r.status_code == 200, (d, r.text)
        evs = events(r)
        assert evs[0]["type"] == "started" and evs[-1]["type"] == "complete"
        assert all(isinstance(e["timestamp"], int) for e in evs)
    r = server.api("GET", f"{base}/ev/logs?lines=2")
    evs = events(r)
    assert [e["data"] for e in evs if e["type"] == "stdout"] == ["line2\n", "line3\n"]
    assert evs[-1]["type"] == "complete"
    r = server.api("POST", f"{base}/ev/stop?timeout=1m30s")
    assert [e["type"] for e in events(r)] == ["stopping", "stopped", "complete"]


def test_cli(sprite, server: WispServer) -> None:
    """`wisp services create|list|logs|stop|start|delete` through the real CLI process."""
    from tests.functional.test_cli import wisp

    s = ("-s", sprite.name)
    r = wisp(server, "services", "create", *s, "--duration", "0.5", "--env", "WHO=cli",
             "web", "--", "sh", "-c", "echo hi $WHO; exec sleep 1000")
    assert r.returncode == 0, r.stderr
    assert b"hi cli" in r.stdout and b"started" in r.stderr
    listed = json.loads(wisp(server, "services", "list", *s, "--json").stdout)
    assert [x["name"] for x in listed] == ["web"] and listed[0]["state"]["status"] == "running"
    assert b"running" in wisp(server, "services", "list", *s).stdout
    r = wisp(server, "services", "logs", *s, "web")
    assert r.returncode == 0 and r.stdout == b"hi cli\n"
    r = wisp(server, "services", "stop", *s, "web")
    assert r.returncode == 0 and b"stopped" in r.stderr
    r = wisp(server, "services", "stop", *s, "web")
    assert r.returncode == 1 and b"not running" in r.stderr
    assert wisp(server, "services", "start", *s, "--duration", "0", "web").returncode == 0
    assert wisp(server, "services", "delete", *s, "web").returncode == 0
    assert json.loads(wisp(server, "services", "list", *s, "--json").stdout) == []


def test_js_sdk_restart_and_logs(server: WispServer) -> None:
    """The JS SDK's calls only it has: restartService (stop then start events, a new pid)
    and getServiceLogs (buffered lines, then complete) — tests/js/services.mjs."""
    from tests.functional.test_js_sdk import run_js

    assert run_js(server, "services.mjs")[-1] == "ok delete"


def test_put_replaces_a_running_service(sprite) -> None:
    """PUT on a running service ends the old process and streams the new one's start (not
    the old one's exit); restart_count starts again at 0."""
    list(sprite.create_service("web", "sh", ["-c", "echo v1; exec sleep 1000"], duration=0))
    old = sprite.get_service("web").state.pid
    stream = list(sprite.create_service("web", "sh", ["-c", "echo v2; exec sleep 1000"],
                                        duration=1))
    assert [m.type for m in stream if m.type != "stdout"] == ["started", "complete"]
    assert "v2\n" in "".join(m.data or "" for m in stream if m.type == "stdout")
    st = sprite.get_service("web").state
    assert st.pid != old and st.status == "running" and st.restart_count == 0
    assert sprite.get_service("web").args == ["-c", "echo v2; exec sleep 1000"]


def test_sprite_url_reaches_the_http_port_service(sprite, server: WispServer) -> None:
    """The sprite's URL with no port goes to the service with `http_port` instead of 8080;
    `PORT--NAME` still names a port explicitly."""
    from tests.framework.urls import host, url_get

    script = ("mkdir -p /tmp/www && echo from-service > /tmp/www/index.html && "
              "exec httpd -f -p 127.0.0.1:8000 -h /tmp/www")
    list(sprite.create_service("web", "sh", ["-c", script], http_port=8000, duration=0.5))
    r = url_get(server, host(server, sprite.name), "/index.html", token=server.token)
    assert r.status_code == 200 and r.text == "from-service\n", r.text
    r = url_get(server, host(server, sprite.name, 8000), "/index.html", token=server.token)
    assert r.status_code == 200 and r.text == "from-service\n"


def test_services_come_back_after_a_cold_start(leak_check) -> None:  # type: ignore[no-untyped-def]
    """A server restart leaves every sprite cold; the first call boots the sprite and its
    services come back in `needs` order, the explicitly stopped one stays stopped, and the
    log files written before are still there."""
    from sprites import SpritesClient

    srv = WispServer(leak_check / "services-cold")
    srv.start()
    try:
        with SpritesClient(srv.token, base_url=srv.url) as c:
            s = c.create_sprite("cold")
            list(s.create_service("app", "sh", SLEEPER, needs=["db"], duration=0))
            list(s.create_service("db", "sh", SLEEPER, duration=0))
            list(s.create_service("off", "sh", SLEEPER, duration=0))
            list(s.stop_service("off"))
        srv.restart()
        assert srv.api("GET", "/v1/sprites/cold").json()["status"] == "cold"
        with SpritesClient(srv.token, base_url=srv.url) as c:
            s = c.get_sprite("cold")
            by = {x.name: x.state for x in s.list_services()}
            assert by["db"].status == by["app"].status == "running"
            assert by["db"].pid < by["app"].pid
            assert by["off"].status == "stopped"
            assert sh(s, "cat /.sprite/logs/services/app.log").count(b"up\n") == 2
            c.delete_sprite("cold")
    finally:
        srv.stop()


def test_logs_follow_new_output(sprite, server: WispServer) -> None:
    """logs?lines=0&duration=D replays nothing and streams what the service writes during
    D, then complete."""
    body = {"cmd": "sh", "args": ["-c", "while :; do echo tick; sleep 0.2; done"]}
    base = f"/v1/sprites/{sprite.name}/services"
    assert server.api("PUT", f"{base}/ticker?duration=0", json=body).status_code == 200
    t = time.monotonic()
    evs = events(server.api("GET", f"{base}/ticker/logs?lines=0&duration=1.2s"))
    assert 1.1 < time.monotonic() - t < 5
    ticks = "".join(e["data"] for e in evs if e["type"] == "stdout").count("tick")
    assert ticks >= 3, evs
    assert evs[-1]["type"] == "complete"
