"""VM sprites (docs/vm.md) through the unmodified Python SDK, on real QEMU (TCG here):
a guest kernel of its own, exec with and without a TTY, files through the guest's fs
agent, and checkpoints that hold memory: a restore resumes a process counting in memory."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sprites import SpritesClient

from tests.framework.server import WispServer
from tests.functional.test_adoption import _session_ids, _start_detached
from tests.functional.test_js_sdk import run_js
from tests.unit import test_exec_sessions as scenarios


@pytest.fixture(scope="module")
def vm_server(leak_check: Path) -> Iterator[WispServer]:
    """New sprites run as VMs by default here (`WISP_RUNTIME=vm`), so the SDK's own create
    makes them; 256 MB guests keep TCG's memory snapshots small."""
    cfg = leak_check / "vm.toml"
    cfg.write_text("[sprites]\nmemory_mb = 256\n")
    srv = WispServer(leak_check / "vm", config_file=cfg, extra_env={"WISP_RUNTIME": "vm"})
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def vm(vm_server: WispServer) -> Iterator[object]:
    client = SpritesClient(vm_server.token, base_url=vm_server.url)
    name = f"vm-{int(time.time() * 1000) % 10**9}"
    sprite = client.create_sprite(name)
    yield sprite
    vm_server.api("DELETE", f"/v1/sprites/{name}")
    client.close()


def _sh(sprite, script: str) -> str:  # type: ignore[no-untyped-def]
    return sprite.command("sh", "-c", script).output().decode()


def _host_kernel() -> str:
    return Path("/proc/sys/kernel/osrelease").read_text().strip()


def test_vm_sprite_is_its_own_machine(vm, vm_server: WispServer) -> None:
    """The JSON names the driver and accelerator; inside runs the guest's kernel, not the
    host's, under the sprite's hostname; exec runs as the sprite user, with the sprite's
    init as PID 1 of its own namespace."""
    info = vm_server.api("GET", f"/v1/sprites/{vm.name}").json()
    assert info["runtime"] == "vm"
    kernel = _sh(vm, "uname -r").strip()
    assert kernel != _host_kernel() and kernel.startswith("6.1.")
    info = vm_server.api("GET", f"/v1/sprites/{vm.name}").json()
    assert info["accelerator"] in ("kvm", "tcg")
    assert _sh(vm, "hostname").strip() == vm.name
    assert _sh(vm, "id -u; cat /proc/1/cmdline | tr '\\0' ' '").split() == ["1000", "/.wisp/init"]


def test_exec_streams_and_exit_codes(vm) -> None:
    res = vm.run("sh", "-c", "echo out; echo err >&2; exit 7", capture_output=True)
    assert (res.returncode, res.stdout, res.stderr) == (7, b"out\n", b"err\n")
    big = vm.command("sh", "-c", "head -c 3000000 /dev/zero | tr '\\0' x").output()
    assert big == b"x" * 3_000_000


def test_tty_exec(vm) -> None:
    res = vm.run("sh", "-c", "tty; stty size", capture_output=True, tty=True,
                 tty_rows=33, tty_cols=101)
    out = res.stdout.decode()
    assert res.returncode == 0
    assert "/dev/pts/" in out and "33 101" in out


def test_files_through_the_guest(vm) -> None:
    """The fs API works on the guest's root: what it writes, exec reads, and back; a file
    it writes belongs to the sprite user (uid 1000 in the guest)."""
    fs = vm.filesystem("/home/sprite")
    fs.path("hello.txt").write_text("from the api\n")
    assert _sh(vm, "cat /home/sprite/hello.txt") == "from the api\n"
    assert _sh(vm, "stat -c %u /home/sprite/hello.txt").strip() == "1000"
    _sh(vm, "mkdir -p /home/sprite/d && echo inner > /home/sprite/d/f")
    assert fs.path("d/f").read_text() == "inner\n"
    assert "hello.txt" in fs.path(".").listdir()
    fs.path("hello.txt").unlink()
    assert not fs.path("hello.txt").exists()


COUNTER = ("sh -c 'i=0; while :; do i=$((i+1)); echo $i > /dev/shm/count; sleep 0.05; "
           "done' </dev/null >/dev/null 2>&1 & echo $!")


def _count(vm) -> int:  # type: ignore[no-untyped-def]
    return int(_sh(vm, "cat /dev/shm/count").strip())


def _wait_count_past(vm, n: int) -> int:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        c = _count(vm)
        if c > n:
            return c
        time.sleep(0.2)
    raise AssertionError(f"the counter did not pass {n}")


def test_checkpoint_with_memory_resumes_a_counting_process(vm, vm_server: WispServer
                                                           ) -> None:
    """A checkpoint holds memory and disk at one instant: after a restore the same process
    (same pid) counts on from where it was at the checkpoint, /dev/shm (a tmpfs: memory only)
    is back as it was, and a file written after the checkpoint is gone."""
    pid = int(_sh(vm, COUNTER).strip())
    _wait_count_past(vm, 3)
    _sh(vm, "echo before > /home/sprite/marker")
    messages = [m.data for m in vm.create_checkpoint("with memory")]
    at_checkpoint = _count(vm)
    cp = vm.list_checkpoints()[0].id
    assert any("memory" in (m or "") for m in messages)
    later = _wait_count_past(vm, at_checkpoint + 20)
    _sh(vm, "echo after > /home/sprite/marker; echo gone > /home/sprite/later")
    messages = [m.data for m in vm.restore_checkpoint(cp)]
    assert any("Resuming" in (m or "") for m in messages)
    resumed = _count(vm)
    # it did not start over (a reboot would have no /dev/shm/count at all) nor keep the later
    # state: it went on from (about) the checkpoint's count
    assert at_checkpoint - 5 <= resumed < later, (at_checkpoint, resumed, later)
    assert _wait_count_past(vm, resumed) > resumed
    assert _sh(vm, f"cat /proc/{pid}/cmdline | tr '\\0' ' '").startswith("sh -c i=0")
    assert _sh(vm, "cat /home/sprite/marker") == "before\n"
    assert _sh(vm, "ls /home/sprite/later 2>/dev/null; true") == ""
    _sh(vm, f"kill {pid}")


def test_filesystem_only_restore_boots_fresh(vm, vm_server: WispServer) -> None:
    """`?memory=false` restores the disk alone: the sprite boots, nothing of its old run."""
    _sh(vm, COUNTER)
    _wait_count_past(vm, 1)
    _sh(vm, "echo kept > /home/sprite/disk-only")
    list(vm.create_checkpoint("fs only"))
    cp_id = vm.list_checkpoints()[0].id
    r = vm_server.api("POST", f"/v1/sprites/{vm.name}/checkpoints/{cp_id}/restore?memory=false")
    assert r.status_code == 200, r.text
    assert "Starting sprite" in r.text
    assert _sh(vm, "cat /dev/shm/count 2>/dev/null; cat /home/sprite/disk-only") == "kept\n"


def test_memory_that_cannot_be_resumed_boots_the_checkpoint_disk(vm, vm_server: WispServer
                                                                 ) -> None:
    """A checkpoint whose memory file QEMU cannot load (its header damaged here; a
    snapshot of an older device layout is refused the same way): the restore says so and
    boots the checkpoint's disk; nothing of the later state is left."""
    _sh(vm, "echo at-checkpoint > /home/sprite/damaged; echo memory > /dev/shm/marker")
    list(vm.create_checkpoint("to damage"))
    cp = vm.list_checkpoints()[0].id
    _sh(vm, "echo later > /home/sprite/damaged")
    sprite_id = vm_server.api("GET", f"/v1/sprites/{vm.name}").json()["id"]
    mem = vm_server.data_dir / "mnt" / "sprites" / sprite_id / "checkpoints" / f"{cp}.mem"
    with open(mem, "r+b") as f:  # its header overwritten: not a stream QEMU can load
        f.write(b"\0" * 4096)
    messages = [m.data or "" for m in vm.restore_checkpoint(cp)]
    assert any("could not be resumed" in m for m in messages), messages
    assert _sh(vm, "cat /home/sprite/damaged") == "at-checkpoint\n"
    # booted, not resumed: what was only in memory is gone
    assert _sh(vm, "ls /dev/shm/marker 2>/dev/null; true") == ""


def test_runtime_field_at_create(vm_server: WispServer) -> None:
    """The create extension `runtime`: an unknown one is a 400; "container" on a server
    whose default is vm makes a container sprite (the host's kernel)."""
    r = vm_server.api("POST", "/v1/sprites", json={"name": "rt-bad", "runtime": "xen"},
                      validate_request=False)
    assert r.status_code == 400 and "runtime" in r.json()["message"]
    client = SpritesClient(vm_server.token, base_url=vm_server.url)
    try:  # the SDK's own `runtime` parameter carries the field
        box = client.create_sprite("rt-box", runtime="container")
        assert vm_server.api("GET", "/v1/sprites/rt-box").json()["runtime"] == "container"
        assert box.command("uname", "-r").output().decode().strip() == _host_kernel()
    finally:
        client.close()
        vm_server.api("DELETE", "/v1/sprites/rt-box")


def test_restart_keeps_what_was_written(vm, vm_server: WispServer) -> None:
    """A restart ends every process of the VM (it boots again) but loses nothing written
    just before, still in the guest's page cache: the guest syncs before QEMU ends."""
    pid = int(_sh(vm, COUNTER).strip())
    _sh(vm, "echo unsynced > /home/sprite/unsynced")
    r = vm_server.api("POST", f"/v1/sprites/{vm.name}/restart")
    assert r.status_code == 200, r.text
    assert _sh(vm, "cat /home/sprite/unsynced") == "unsynced\n"
    assert _sh(vm, f"ls /proc/{pid} >/dev/null 2>&1 && echo alive; cat /dev/shm/count "
                   "2>/dev/null; true") == ""


def test_guest_has_no_way_out(vm) -> None:
    """The agent NIC (QEMU user networking with restrict=on) is not in the sprite's network
    namespace in the guest: from the sprite, neither the relay (10.0.2.15:7000) nor the
    host side of that link (10.0.2.2, the sprite netns's loopback on the host) nor anything
    else answers. The control: the same probe reaches a listener of the sprite's own, on
    the very port the relay uses."""
    script = ("setsid nc -l -p 7000 -e true </dev/null >/dev/null 2>&1 & sleep 0.5; "
              "nc -w 2 127.0.0.1 7000 </dev/null >/dev/null 2>&1 && echo control-ok; "
              "for t in 10.0.2.15:7000 10.0.2.2:7000 10.0.2.2:22 10.0.2.3:53 198.51.100.1:80; "
              "do nc -w 2 ${t%:*} ${t#*:} </dev/null >/dev/null 2>&1 && echo open $t; done; "
              "echo done")
    assert _sh(vm, script) == "control-ok\ndone\n"
    assert "10.0.2." not in _sh(vm, "ip -o addr show")
    # and the relay still answers (nothing above broke the link)
    assert _sh(vm, "echo ok") == "ok\n"


def _hibernation_file(srv: WispServer, name: str) -> Path:
    sprite_id = srv.api("GET", f"/v1/sprites/{name}").json()["id"]
    return srv.data_dir / "mnt" / "sprites" / sprite_id / "hibernated.mem"


def _qemu_of(srv: WispServer) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if cmd.startswith(b"qemu-system") and str(srv.data_dir).encode() in cmd:
                pids.append(int(entry.name))
    return pids


def test_cold_sleep_hibernates_and_wakes_with_its_processes(vm, vm_server: WispServer
                                                            ) -> None:
    """A VM sprite going cold writes its memory to the volume and ends QEMU; the next call
    resumes it: the same process counts on, and the memory file is gone again."""
    pid = int(_sh(vm, COUNTER).strip())
    before = _wait_count_past(vm, 2)
    r = vm_server.api("POST", f"/v1/sprites/{vm.name}/sleep", json={"state": "cold"})
    assert r.status_code == 200 and r.json()["status"] == "cold", r.text
    assert _hibernation_file(vm_server, vm.name).exists()
    assert _qemu_of(vm_server) == []
    time.sleep(2)  # asleep, nothing counts
    woke = _count(vm)
    assert before <= woke < before + 25, (before, woke)
    assert _wait_count_past(vm, woke) > woke
    assert _sh(vm, f"cat /proc/{pid}/cmdline | tr '\\0' ' '").startswith("sh -c i=0")
    assert not _hibernation_file(vm_server, vm.name).exists()
    _sh(vm, f"kill {pid}")


def test_server_restarts_kill_no_vm_process(vm, vm_server: WispServer) -> None:
    """A server stop with `stop_sprites` hibernates a VM sprite and the next server wakes
    it from memory; a stop that keeps sprites (the product's default) leaves QEMU running
    and the next server adopts it, with a detached exec session. The same process counts
    on after both."""
    pid = int(_sh(vm, COUNTER).strip())
    c = _wait_count_past(vm, 2)
    hibernated = _hibernation_file(vm_server, vm.name)
    vm_server.stop()  # this module's server was started with stop_sprites
    assert _qemu_of(vm_server) == []
    vm_server.stop_sprites = False
    try:
        vm_server.start()
        assert vm_server.api("GET", f"/v1/sprites/{vm.name}").json()["status"] == "cold"
        assert hibernated.exists()  # (on the volume, mounted again)
        c = _wait_count_past(vm, c)
        assert _sh(vm, f"cat /proc/{pid}/cmdline | tr '\\0' ' '").startswith("sh -c i=0")
        qemu = _qemu_of(vm_server)
        assert len(qemu) == 1
        sid = asyncio.run(_start_detached(
            vm_server, vm.name, "i=0; while [ $i -lt 100 ]; do echo tick $i; i=$((i+1)); "
                                "sleep 0.05; done; echo done"))
        vm_server.stop()  # keeps sprites: QEMU runs on, and the session with it
        assert _qemu_of(vm_server) == qemu
        vm_server.start()
        info = vm_server.api("GET", f"/v1/sprites/{vm.name}").json()
        assert info["status"] == "running" and _qemu_of(vm_server) == qemu
        # the detached session was adopted: an attach replays what it printed, in order,
        # to its end. Unlike a container's, output crossing the relay at the moment the
        # server stops can be lost (it is in the server's own pipe or in flight; CI run
        # 215 lost one line of 100): a known gap, docs/vm.md "Not yet".
        assert sid in _session_ids(vm_server, vm.name)
        out = vm.attach_session(sid, timeout=120).output().decode()
        assert out.endswith("done\n")
        ticks = [int(n) for n in re.findall(r"tick (\d+)", out)]
        assert ticks == sorted(set(ticks)) and ticks[0] == 0 and ticks[-1] == 99
        assert len(ticks) >= 90, ticks
        assert _wait_count_past(vm, c) > c
        assert _sh(vm, f"cat /proc/{pid}/cmdline | tr '\\0' ' '").startswith("sh -c i=0")
        _sh(vm, f"kill {pid}")
    finally:  # back to this module's way of stopping (the fixture's last stop)
        vm_server.stop()
        vm_server.stop_sprites = True
        vm_server.start()


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_freed_guest_memory_returns_to_the_host(vm, vm_server: WispServer) -> None:
    """Free page reporting: 160 MB the guest writes grow QEMU's resident memory; once the
    guest frees them, QEMU discards the pages it reported and the host has them back."""
    _sh(vm, "rm -f /dev/shm/fill; sync")  # (and running: a test before may stop it)
    sprite_id = vm_server.api("GET", f"/v1/sprites/{vm.name}").json()["id"]
    pid = next(p for p in _qemu_of(vm_server)
               if sprite_id.encode() in Path(f"/proc/{p}/cmdline").read_bytes())
    base = _rss_mb(pid)
    _sh(vm, "yes xxxxxxxxxxxxxxx | head -c 167772160 > /dev/shm/fill")
    filled = _rss_mb(pid)
    assert filled - base >= 120, (base, filled)  # the control: the pages did land
    _sh(vm, "rm /dev/shm/fill")
    deadline = time.monotonic() + 60
    while _rss_mb(pid) > filled - 100:
        assert time.monotonic() < deadline, (base, filled, _rss_mb(pid))
        time.sleep(0.5)


def test_services_run_in_the_guest(vm, vm_server: WispServer) -> None:
    """A service defined through sprites-py runs in the guest: its start streams its output
    (read from the guest's log files through its fs agent), it survives a cold sleep (the
    same process: memory), and after a restart (a boot) it is started again from its
    stored definition."""
    stream = list(vm.create_service("tick", "sh", ["-c", "echo hello-svc; exec sleep 1000"],
                                    duration=1))
    assert "hello-svc\n" in "".join(m.data or "" for m in stream if m.type == "stdout")
    state = vm.get_service("tick").state
    assert state.status == "running" and state.pid > 0
    r = vm_server.api("GET", f"/v1/sprites/{vm.name}/services/tick/logs?lines=5")
    events = [json.loads(line) for line in r.text.splitlines() if line.strip()]
    assert [e["data"] for e in events if e["type"] == "stdout"] == ["hello-svc\n"]
    assert events[-1]["type"] == "complete"
    r = vm_server.api("POST", f"/v1/sprites/{vm.name}/sleep", json={"state": "cold"})
    assert r.status_code < 300, r.text
    assert vm.get_service("tick").state.pid == state.pid
    r = vm_server.api("POST", f"/v1/sprites/{vm.name}/restart")
    assert r.status_code < 300, r.text
    deadline = time.monotonic() + 30
    while (again := vm.get_service("tick").state).status != "running":
        assert time.monotonic() < deadline, again
        time.sleep(0.2)
    # "running" is reported from the spawn on: its `sh` execs `sleep` a moment later (an
    # exec in progress even reads as an empty cmdline; CI run 219)
    while not _sh(vm, f"cat /proc/{again.pid}/cmdline | tr '\\0' ' '").startswith("sleep 1000"):
        assert time.monotonic() < deadline, again
        time.sleep(0.2)
    vm.delete_service("tick")
    assert vm.list_services() == []


def test_js_sdk_services_on_a_vm(vm_server: WispServer) -> None:
    """tests/js/services.mjs (createService, restartService, getServiceLogs, delete)
    against a server whose sprites are VMs."""
    assert run_js(vm_server, "services.mjs", timeout=600)[-1] == "ok delete"


# -- the SDK scenarios the container sprites pass (contract §6.1-§6.3), on a VM -------------
SDK_SCENARIOS = [scenarios.test_echo, scenarios.test_default_dir_is_home,
                 scenarios.test_env_on_top_of_defaults, scenarios.test_dir,
                 scenarios.test_exit_code, scenarios.test_stdin_pipe, scenarios.test_tty,
                 scenarios.test_no_tty, scenarios.test_tty_size,
                 scenarios.test_stdout_stderr_separate, scenarios.test_command_not_found,
                 scenarios.test_concurrent_commands]


@pytest.mark.parametrize("scenario", SDK_SCENARIOS, ids=lambda f: f.__name__[5:])
def test_sdk_scenario(vm, scenario) -> None:  # type: ignore[no-untyped-def]
    """Each exec scenario of sprites-py that a container sprite passes
    (tests/unit/test_exec_sessions.py), run as it is on the VM sprite."""
    scenario(vm)


def test_js_sdk_acceptance_on_a_vm(vm_server: WispServer) -> None:
    """The JS SDK's own integration scenarios (tests/js/acceptance.mjs: exec, TTY, HTTP
    exec, files, checkpoint + restore, list, delete) against a server whose sprites are
    VMs."""
    assert run_js(vm_server, "acceptance.mjs", timeout=600)[-1] == "ok delete"
