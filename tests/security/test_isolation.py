"""Break-out attempts from inside a sprite. Each must fail.

Sprites run in a user namespace (root inside = host uid 100000), their own pid, mount,
ipc, uts, cgroup and network namespaces, with Docker's default capabilities, a seccomp
filter and no host devices. The busybox tests run as the default `sprite` user; the Debian
tests use sudo to try the same as root inside the sprite.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sprites import SpritesClient

from tests.framework.server import WispServer


def sh(sprite, script: str) -> tuple[int, str]:  # type: ignore[no-untyped-def]
    r = sprite.run("sh", "-c", script, capture_output=True)
    return r.returncode, (r.stdout + r.stderr).decode(errors="replace")


def test_sprite_sees_only_itself(sprite) -> None:
    """Own pid namespace (init is ours), own hostname, only loopback, no host files."""
    code, out = sh(sprite, "cat /proc/1/cmdline")
    assert "/.wisp/init" in out
    code, out = sh(sprite, "ps -o pid,comm | wc -l")
    assert int(out.split()[-1]) < 10
    code, out = sh(sprite, "tail -n +3 /proc/net/dev | cut -d: -f1")
    assert out.split() == ["lo"]
    assert sh(sprite, "ls /sys")[1].strip() == ""
    code, out = sh(sprite, "ls /work /var/lib/wisp /root/.config 2>&1; true")
    assert "No such file" in out or "Permission denied" in out
    assert sh(sprite, "cat /proc/self/uid_map")[1].split() == ["0", "100000", "65536"]


def test_no_host_devices(sprite) -> None:
    """/dev holds only the safe default nodes; no disks, loops, kvm, fuse or memory."""
    code, out = sh(sprite, "ls /dev")
    names = set(out.split())
    assert not names & {"vda", "sda", "loop0", "loop-control", "kvm", "fuse", "mem", "kmsg"}
    assert {"null", "zero", "urandom", "tty"} <= names


def test_sprites_do_not_see_each_other(sprite_factory) -> None:
    """A file or process in one sprite is invisible to another."""
    a, b = sprite_factory("iso"), sprite_factory("iso")
    sh(a, "echo secret > /tmp/only-a; (sleep 777 &); true")
    assert "secret" not in sh(b, "cat /tmp/only-a 2>&1")[1]
    assert "sleep 777" not in sh(b, "ps")[1]


def test_processes_are_unprivileged_on_host(sprite, server: WispServer) -> None:
    """A sprite's processes have host uids in the mapped range, never 0."""
    sh(sprite, "(sleep 31337 &); true")
    uids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if (proc / "cmdline").read_bytes() != b"sleep\x0031337\x00":
                continue
            status = (proc / "status").read_text()
        except OSError:
            continue
        uids.append(int(next(line for line in status.splitlines()
                             if line.startswith("Uid:")).split()[1]))
    assert uids and all(u >= 100000 for u in uids), uids


def test_cgroup_limits_applied(sprite, server: WispServer) -> None:
    """Memory, CPU and pids limits are set on the sprite's cgroups (read from the host): on
    cgroup v1 the configured limits bind the workload cgroup that every exec'd process is
    in, and the sprite's own cgroup (the init agent's) adds only a small reserve."""
    sprite_id = server.api("GET", f"/v1/sprites/{sprite.name}").json()["id"]
    assert sh(sprite, "true")[0] == 0
    v1 = Path("/sys/fs/cgroup/memory/wisp") / sprite_id
    if v1.exists():
        pids = Path("/sys/fs/cgroup/pids/wisp") / sprite_id
        assert int((v1 / "workload" / "memory.limit_in_bytes").read_text()) == 1024 << 20
        assert (pids / "workload" / "pids.max").read_text().strip() == "2048"
        assert int((v1 / "memory.limit_in_bytes").read_text()) == (1024 + 64) << 20
        assert (pids / "pids.max").read_text().strip() == str(2048 + 32)
        quota = Path("/sys/fs/cgroup/cpu/wisp") / sprite_id / "cpu.cfs_quota_us"
        assert int(quota.read_text()) == 100000
        # a process started by exec is in the workload cgroup of every limiting hierarchy;
        # the sprite's own cgroup holds the init agent alone
        sh(sprite, "sleep 31338 >/dev/null 2>&1 &")
        for controller in ("pids", "memory", "cpu"):
            cgroup = Path("/sys/fs/cgroup") / controller / "wisp" / sprite_id
            deadline = time.monotonic() + 5  # a new zygote moves itself in the background
            while len((cgroup / "cgroup.procs").read_text().split()) != 1:
                assert time.monotonic() < deadline, controller
                time.sleep(0.05)
            assert (cgroup / "workload" / "cgroup.procs").read_text().split(), controller
        sh(sprite, "pkill -f 'sleep 31338' || kill $(pidof sleep)")
    else:
        v2 = Path("/sys/fs/cgroup/wisp") / sprite_id
        assert (v2 / "memory.max").read_text().strip() == str(1024 << 20)
        assert (v2 / "pids.max").read_text().strip() == "2048"


# -- as root inside the sprite (Debian image, sudo) ---------------------------------------

@pytest.fixture(scope="module")
def debian(leak_check: Path) -> Iterator[SpritesClient]:
    srv = WispServer(leak_check / "debian", image="debian")
    srv.start()
    c = SpritesClient(srv.token, base_url=srv.url)
    s = c.create_sprite("deb")
    yield s
    srv.api("DELETE", "/v1/sprites/deb")
    srv.stop()


ROOT_ATTEMPTS = [
    ("mount tmpfs", "sudo mount -t tmpfs none /mnt"),
    ("new user namespace", "sudo unshare -U -r true"),
    ("unshare mount ns", "unshare -Ur true"),
    ("raw disk via mknod", "sudo mknod /tmp/vda b 254 0 && sudo head -c 512 /tmp/vda"),
    ("kernel memory", "sudo head -c 16 /proc/kcore | od | grep -v '^0000000$' | head -c 1 | grep ."),
    ("sysrq", "echo h | sudo tee /proc/sysrq-trigger"),
    ("write /sys", "echo 1 | sudo tee /sys/kernel/mm/ksm/run"),
    ("load module", "sudo modprobe dummy || sudo insmod /nonexistent.ko"),
    ("set host time", "sudo date -s '2001-01-01'"),
    ("reach the host's API port", "curl -sS -m 3 http://127.0.0.1:7770/"),
    ("host loop devices", "sudo losetup -f"),
]


@pytest.mark.debian
@pytest.mark.parametrize("what,script", ROOT_ATTEMPTS, ids=[a[0] for a in ROOT_ATTEMPTS])
def test_root_in_sprite_cannot_break_out(debian, what: str, script: str) -> None:
    """Root inside the sprite (via sudo) tries something only host root could do: it fails."""
    assert sh(debian, "sudo id -u")[1].strip() == "0"
    code, out = sh(debian, script)
    assert code != 0, f"{what} succeeded: {out}"


@pytest.mark.debian
def test_debian_developer_tools(debian) -> None:
    """The default image is a developer's computer: the tools are there and work."""
    code, out = sh(debian, "python3 -c 'print(2+2)'; git --version; curl --version | head -1; "
                           "ps --version; ip -V; less --version | head -1; sudo -n true && echo sudo-ok")
    assert code == 0, out
    assert out.startswith("4\n") and "git version" in out and "sudo-ok" in out
    assert sh(debian, "pwd")[1].strip() == "/home/sprite"
    assert sh(debian, "whoami")[1].strip() == "sprite"


def test_open_file_limit_is_the_sprites_own(sprite) -> None:
    """The server raises its own open-file limit for its connections; a sprite still gets
    the usual soft limit of 1024, not the server's."""
    code, out = sh(sprite, "ulimit -n")
    assert code == 0 and out.strip() == "1024", out


def test_mount_table_names_no_host_path(sprite, server: WispServer) -> None:
    """The sprite's /proc/mounts and /proc/self/mountinfo show no host path: not the data
    dir (its disk and overlay dirs), not the images dir, not the repository (the init
    binary), not /run/wisp (the agent's socket dir)."""
    import os

    from tests.framework.server import IMAGES_DIR, REPO

    code, out = sh(sprite, "cat /proc/mounts /proc/self/mountinfo")
    assert code == 0 and "overlay" in out, out
    for host_path in (os.path.realpath(server.data_dir), os.path.realpath(IMAGES_DIR),
                      str(REPO), "/run/wisp", "/var/lib/wisp"):
        assert host_path not in out, f"{host_path} visible in the sprite:\n{out}"
