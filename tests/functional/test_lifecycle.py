"""Idle sleep and wake (docs/lifecycle.md): an idle sprite goes warm (frozen by the kernel's
freezer, disk synced) and then cold (nothing left on the host), any call wakes it with its
files and processes, and activity or a task holds it awake. Short timers from the test's
server environment; every state is read from the kernel, not only from the API."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sprites import SpritesClient

from tests.framework.server import WispServer
from tests.functional.test_cli import wisp as run_cli

WARM_AFTER, COLD_AFTER = 1.5, 4.0


@pytest.fixture(scope="module")
def life_server(leak_check: Path) -> Iterator[WispServer]:
    srv = WispServer(leak_check / "lifecycle",
                     extra_env={"WISP_WARM_AFTER": str(WARM_AFTER),
                                "WISP_COLD_AFTER": str(COLD_AFTER), "WISP_WARM_POOL": "0"})
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def make(life_server: WispServer) -> Iterator[Callable[..., dict]]:  # type: ignore[type-arg]
    made: list[str] = []

    def create(name: str, **extra: object) -> dict:  # type: ignore[type-arg]
        r = life_server.api("POST", "/v1/sprites", json={"name": name, **extra})
        assert r.status_code == 201, r.text
        made.append(name)
        return r.json()  # type: ignore[no-any-return]

    yield create
    for name in made:
        life_server.api("DELETE", f"/v1/sprites/{name}")


def _client(srv: WispServer) -> SpritesClient:
    return SpritesClient(srv.token, base_url=srv.url)


def status(srv: WispServer, name: str) -> str:
    return _client(srv).get_sprite(name).status  # type: ignore[no-any-return]


def wait_status(srv: WispServer, name: str, want: str, timeout: float = 15) -> float:
    """Seconds until the sprite's status is `want`."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if status(srv, name) == want:
            return time.monotonic() - start
        time.sleep(0.1)
    raise AssertionError(f"{name} not {want} within {timeout} s (is {status(srv, name)})")


def sh(srv: WispServer, name: str, script: str) -> bytes:
    return _client(srv).sprite(name).command("sh", "-c", script).output()  # type: ignore[no-any-return]


def freezer_state(sprite_id: str) -> str:
    return Path(f"/sys/fs/cgroup/freezer/wisp/{sprite_id}/freezer.state").read_text().strip()


def host_traces(srv: WispServer, sprite_id: str) -> list[str]:
    """What the host holds for one sprite: processes of its container, mounts, loop
    devices on its disk image, its network namespace. Read from the kernel."""
    found = []
    cg = Path(f"/sys/fs/cgroup/freezer/wisp/{sprite_id}/cgroup.procs")
    if cg.exists() and cg.read_text().split():
        found.append(f"processes in {cg}")
    with open("/proc/self/mountinfo") as f:
        found += [line.split()[4] for line in f if sprite_id in line.split()[4]]
    for entry in Path("/sys/block").glob("loop*"):
        try:
            backing = (entry / "loop" / "backing_file").read_text()
        except OSError:
            continue
        if sprite_id in backing:
            found.append(f"/dev/{entry.name} -> {backing.strip()}")
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    found += [line for line in netns.splitlines() if sprite_id.removeprefix("sprite-")[:8]
              in line]
    return found


def test_idle_sprite_goes_warm_then_cold_and_a_call_wakes_it(life_server: WispServer,
                                                            make) -> None:  # type: ignore[no-untyped-def]
    sprite = make("idle")
    sh(life_server, "idle", "echo kept > /home/sprite/f")
    took = wait_status(life_server, "idle", "warm")
    assert took < WARM_AFTER + 3
    assert freezer_state(sprite["id"]) == "FROZEN"
    got = _client(life_server).get_sprite("idle")
    assert got.last_warming_at is not None
    # status stays running until the teardown is complete (a loop device can take up to
    # DETACH_WAIT = 10 s to let go: docs/storage.md)
    wait_status(life_server, "idle", "cold", timeout=COLD_AFTER + 25)
    assert host_traces(life_server, sprite["id"]) == []
    # an exec wakes it: files intact, status running
    assert sh(life_server, "idle", "cat /home/sprite/f") == b"kept\n"
    assert status(life_server, "idle") == "running"


def test_services_come_back_after_cold_and_keep_their_pid_through_warm(
        life_server: WispServer, make) -> None:  # type: ignore[no-untyped-def]
    make("svc", lifecycle={"warm_after": WARM_AFTER, "cold_after": 0})
    r = life_server.api("PUT", "/v1/sprites/svc/services/ticker?duration=0",
                        json={"cmd": "sh", "args": ["-c", "cat /proc/sys/kernel/random/uuid "
                                                    "> /tmp/run-id; while :; do sleep 1; done"]})
    assert r.status_code == 200, r.text

    def state() -> dict:  # type: ignore[type-arg]
        got = life_server.api("GET", "/v1/sprites/svc/services/ticker")  # wakes it
        assert got.status_code == 200, got.text
        return got.json()["state"]  # type: ignore[no-any-return]

    first = state()
    assert first["status"] == "running"
    time.sleep(0.5)
    run_id = sh(life_server, "svc", "cat /tmp/run-id")
    wait_status(life_server, "svc", "warm")  # a running service does not hold it awake
    thawed = state()
    assert (thawed["status"], thawed["pid"]) == ("running", first["pid"])
    assert sh(life_server, "svc", "cat /tmp/run-id") == run_id  # thawed, not restarted
    r = life_server.api("POST", "/v1/sprites/svc/sleep", json={"state": "cold"})
    assert r.json()["status"] == "cold"
    # an exec wakes it: the service was started again at boot, a new process
    assert sh(life_server, "svc", "echo up") == b"up\n"
    deadline = time.monotonic() + 10
    while sh(life_server, "svc", "cat /tmp/run-id") == run_id:
        assert time.monotonic() < deadline, "the service did not start again after cold"
        time.sleep(0.2)
    assert state()["status"] == "running"


def test_warm_wake_resumes_the_same_processes(life_server: WispServer, make) -> None:  # type: ignore[no-untyped-def]
    sprite = make("resume", lifecycle={"warm_after": WARM_AFTER, "cold_after": 0})
    assert _client(life_server).get_sprite("resume").status in ("running", "cold")
    pid = sh(life_server, "resume",
             "setsid sh -c 'i=0; while :; do i=$((i+1)); echo $i > /tmp/tick; sleep 0.05; done' "
             ">/dev/null 2>&1 & echo $!").strip()
    wait_status(life_server, "resume", "warm")
    tick = sh(life_server, "resume", "cat /tmp/tick")  # this exec woke it
    assert status(life_server, "resume") == "running"
    assert freezer_state(sprite["id"]) == "THAWED"
    time.sleep(0.3)
    alive = sh(life_server, "resume", f"kill -0 {pid.decode()} && cat /tmp/tick")
    assert alive != tick, "the loop did not run on after the wake"
    # the override: cold_after 0 = never
    time.sleep(COLD_AFTER + 1)
    assert status(life_server, "resume") == "warm"


def test_a_running_exec_holds_the_sprite_awake(life_server: WispServer, make) -> None:  # type: ignore[no-untyped-def]
    make("busy")
    sh(life_server, "busy", "true")
    seen: list[str] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            seen.append(status(life_server, "busy"))
            time.sleep(0.2)

    t = threading.Thread(target=watch)
    t.start()
    try:
        sh(life_server, "busy", f"sleep {WARM_AFTER * 2 + 1}")
    finally:
        done.set()
        t.join()
    assert seen and set(seen) == {"running"}, seen
    wait_status(life_server, "busy", "warm")


def test_an_api_task_holds_it_and_release_lets_it_sleep(life_server: WispServer,
                                                       make) -> None:  # type: ignore[no-untyped-def]
    make("held")
    wait_status(life_server, "held", "warm")
    r = life_server.api("PUT", "/v1/sprites/held/tasks/agent", json={"ttl": "30s"})
    assert r.status_code == 200, r.text
    assert r.json()["name"] == "agent" and r.json()["source"] == "api"
    assert status(life_server, "held") == "running"  # setting a task woke it
    time.sleep(WARM_AFTER + 1.5)
    assert status(life_server, "held") == "running"
    tasks = life_server.api("GET", "/v1/sprites/held/tasks").json()
    assert [t["name"] for t in tasks] == ["agent"]
    assert life_server.api("DELETE", "/v1/sprites/held/tasks/agent").status_code == 204
    assert life_server.api("DELETE", "/v1/sprites/held/tasks/agent").status_code == 404
    wait_status(life_server, "held", "warm", timeout=WARM_AFTER + 3)


def test_an_expiring_task_lets_it_sleep(life_server: WispServer, make) -> None:  # type: ignore[no-untyped-def]
    make("expiry")
    life_server.api("PUT", "/v1/sprites/expiry/tasks/short", json={"ttl": 3})
    time.sleep(2)
    assert status(life_server, "expiry") == "running"
    took = wait_status(life_server, "expiry", "warm", timeout=8)
    assert took > 0.5  # not before the task's end + idle time


def test_a_task_file_inside_the_sprite_holds_it(life_server: WispServer, make) -> None:  # type: ignore[no-untyped-def]
    make("inside")
    sh(life_server, "inside", "echo 60 > /run/sprite/tasks/build")
    time.sleep(WARM_AFTER + 1.5)
    assert status(life_server, "inside") == "running"
    tasks = life_server.api("GET", "/v1/sprites/inside/tasks").json()
    assert [(t["name"], t["source"]) for t in tasks] == [("build", "sprite")]
    sh(life_server, "inside", "rm /run/sprite/tasks/build")
    wait_status(life_server, "inside", "warm", timeout=WARM_AFTER + 3)
    # gone with the run: a cold sprite starts with no task files
    r = life_server.api("POST", "/v1/sprites/inside/sleep", json={"state": "cold"})
    assert r.json()["status"] == "cold"
    assert sh(life_server, "inside", "ls /run/sprite/tasks | wc -l").strip() == b"0"


def test_sleep_forces_a_state_and_calls_during_it_wait(life_server: WispServer,
                                                      make) -> None:  # type: ignore[no-untyped-def]
    sprite = make("forced", lifecycle={"warm_after": 0, "cold_after": 0})
    sh(life_server, "forced", "echo x > /home/sprite/x")
    r = life_server.api("POST", "/v1/sprites/forced/sleep")
    assert r.status_code == 200 and r.json()["status"] == "warm"
    assert freezer_state(sprite["id"]) == "FROZEN"
    # several calls at once on a warm sprite: all wake it, none is refused
    outs: list[bytes] = []
    threads = [threading.Thread(target=lambda: outs.append(sh(life_server, "forced",
                                                              "cat /home/sprite/x")))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outs == [b"x\n"] * 4
    r = life_server.api("POST", "/v1/sprites/forced/sleep", json={"state": "cold"})
    assert r.json()["status"] == "cold"
    assert host_traces(life_server, sprite["id"]) == []
    # a cold sprite stays cold when told to go warm
    assert life_server.api("POST", "/v1/sprites/forced/sleep").json()["status"] == "cold"
    # timers 0 = never: it stays running once woken
    sh(life_server, "forced", "true")
    time.sleep(WARM_AFTER + 1)
    assert status(life_server, "forced") == "running"
    # the override is shown, and can be dropped back to the server's
    got = life_server.api("GET", "/v1/sprites/forced").json()
    assert got["lifecycle"] == {"warm_after": 0, "cold_after": 0}
    r = life_server.api("PUT", "/v1/sprites/forced", json={"lifecycle": None})
    assert r.json()["lifecycle"] == {"warm_after": WARM_AFTER, "cold_after": COLD_AFTER}


def test_cli_sleep_and_tasks(life_server: WispServer, make) -> None:  # type: ignore[no-untyped-def]
    make("cli", lifecycle={"warm_after": 0, "cold_after": 0})

    def wisp(*args: str) -> str:
        res = run_cli(life_server, *args)
        assert res.returncode == 0, res.stderr
        return res.stdout.decode()

    assert "is warm" in wisp("sleep", "cli")
    assert "is cold" in wisp("sleep", "cli", "--cold")
    assert "holds until" in wisp("tasks", "hold", "job", "-s", "cli", "--ttl", "5m")
    assert status(life_server, "cli") == "running"
    assert "job" in wisp("tasks", "list", "cli")
    assert "released" in wisp("tasks", "release", "job", "-s", "cli")


@pytest.mark.parametrize("method,path,body", [
    ("PUT", "/v1/sprites/bad/tasks/t", {"ttl": 0}),
    ("PUT", "/v1/sprites/bad/tasks/t", {"ttl": 7200}),
    ("PUT", "/v1/sprites/bad/tasks/t", {"ttl": "soon"}),
    ("PUT", "/v1/sprites/bad/tasks/t", {"ttl": True}),
    ("PUT", "/v1/sprites/bad/tasks/t", {}),
    ("PUT", "/v1/sprites/bad/tasks/-x", {"ttl": 5}),
    ("POST", "/v1/sprites/bad/sleep", {"state": "hot"}),
    ("PUT", "/v1/sprites/bad", {"lifecycle": {"warm_after": -1}}),
    ("PUT", "/v1/sprites/bad", {"lifecycle": {"warm_after": "1"}}),
    ("PUT", "/v1/sprites/bad", {"lifecycle": {"sleep_after": 1}}),
    ("PUT", "/v1/sprites/bad", {"lifecycle": [1]}),
])
def test_bad_input_is_a_400(life_server: WispServer, make, method: str, path: str,  # type: ignore[no-untyped-def]
                            body: dict) -> None:  # type: ignore[type-arg]
    if status_code(life_server, "bad") == 404:
        make("bad", lifecycle={"warm_after": 0, "cold_after": 0})
    r = life_server.api(method, path, json=body, validate_request=False)
    assert r.status_code == 400, r.text
    assert r.json()["error"]


def status_code(srv: WispServer, name: str) -> int:
    return srv.api("GET", f"/v1/sprites/{name}").status_code


def test_unknown_sprite_is_a_404(life_server: WispServer) -> None:
    assert life_server.api("POST", "/v1/sprites/nosuch/sleep").status_code == 404
    assert life_server.api("GET", "/v1/sprites/nosuch/tasks").status_code == 404
    assert life_server.api("PUT", "/v1/sprites/nosuch/tasks/t",
                           json={"ttl": 5}).status_code == 404
