"""The OCI runtime spec Wisp hands to runc for each sprite.

Wisp's containers have no VM around them, so the spec isolates more than the published
Sprites design: a user namespace (root inside is host uid 100000), Docker's default
capability set (held only inside that namespace), a seccomp filter that closes the syscalls
used to reach the kernel's larger attack surface (new user namespaces, mounts, modules, BPF,
keyrings), no host devices, masked /proc paths, and cgroup limits on memory, CPU and pids.
"""

from __future__ import annotations

import resource
from pathlib import Path
from typing import Any

from wisp.runtime.base import ID_RANGE, ROOT_UID_BASE, Limits

__all__ = ["make_spec", "CAPABILITIES", "SECCOMP_DENIED"]

CAPABILITIES = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
]

#: Denied with EPERM. Each is either privileged-only (so denying costs nothing) or a door to
#: kernel code a sandbox has no business reaching.
SECCOMP_DENIED = [
    "acct", "add_key", "bpf", "clock_adjtime", "clock_settime", "delete_module",
    "finit_module", "fsconfig", "fsmount", "fsopen", "fspick", "init_module", "ioperm",
    "iopl", "kcmp", "kexec_file_load", "kexec_load", "keyctl", "lookup_dcookie", "mount",
    "mount_setattr", "move_mount", "name_to_handle_at", "open_by_handle_at", "open_tree",
    "perf_event_open", "pivot_root", "quotactl", "reboot", "request_key", "setns",
    "settimeofday", "swapoff", "swapon", "syslog", "umount2", "unshare", "userfaultfd",
    "vhangup",
]

CLONE_NEWUSER = 0x10000000


def _nofile_hard() -> int:
    """The host's hard open-file limit, at most 524288 (systemd's default): raising a hard
    limit needs CAP_SYS_RESOURCE, which some hosts do not give root."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return 524288 if hard == resource.RLIM_INFINITY else min(hard, 524288)


def _seccomp() -> dict[str, Any]:
    return {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": [
            {"names": SECCOMP_DENIED, "action": "SCMP_ACT_ERRNO", "errnoRet": 1},
            # clone3 passes its flags in memory seccomp cannot read: make libc fall back.
            {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38},
            {"names": ["clone"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1,
             "args": [{"index": 0, "value": CLONE_NEWUSER, "valueTwo": CLONE_NEWUSER,
                       "op": "SCMP_CMP_MASKED_EQ"}]},
        ],
    }


def make_spec(*, hostname: str, rootfs: Path, init_binary: Path, agent_dir: Path,
              hosts_file: Path, netns: Path, cgroup_path: str,
              limits: Limits, resolv_conf: Path | None = None,
              info_dir: Path | None = None) -> dict[str, Any]:
    """The config.json for one sprite; PID 1 is the Wisp init agent."""
    quota_period = 100_000
    spec: dict[str, Any] = {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": ["/.wisp/init"],
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "cwd": "/",
            "capabilities": {k: CAPABILITIES for k in ("bounding", "effective", "permitted")},
            # The server raises its own open-file limit for its connections; a sprite gets
            # a computer's usual one instead, whatever the server did.
            "rlimits": [{"type": "RLIMIT_NOFILE", "soft": min(1024, _nofile_hard()),
                         "hard": _nofile_hard()}],
            # sudo inside the sprite must work; root inside is unprivileged on the host.
            "noNewPrivileges": False,
        },
        "root": {"path": str(rootfs), "readonly": False},
        "hostname": hostname,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=262144k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            # A fresh sysfs needs a network namespace owned by the sprite's user namespace,
            # and the host's /sys would show host devices: give an empty read-only /sys.
            {"destination": "/sys", "type": "tmpfs", "source": "sysfs-empty",
             "options": ["nosuid", "noexec", "nodev", "ro", "size=4k", "mode=555"]},
            # Generated, so `sudo` and friends resolve the sprite's own hostname.
            {"destination": "/etc/hosts", "type": "none", "source": str(hosts_file),
             "options": ["bind", "ro", "nosuid", "nodev", "noexec"]},
            *([{"destination": "/etc/resolv.conf", "type": "none", "source": str(resolv_conf),
                 "options": ["bind", "ro", "nosuid", "nodev", "noexec"]}]
              if resolv_conf is not None else []),
            # What Wisp tells the sprite about itself (its egress policy): on its disk, so
            # checkpoints hold it, and read-only, so the sprite cannot change it.
            *([{"destination": "/.sprite", "type": "none", "source": str(info_dir),
                "options": ["bind", "ro", "nosuid", "nodev", "noexec"]}]
              if info_dir is not None else []),
            # ... but for its logs dir (services' logs, written by init as the sprite's
            # root; docs/services.md): a separate writable bind, so /.sprite stays read-only.
            *([{"destination": "/.sprite/logs", "type": "none", "source": str(info_dir / "logs"),
                "options": ["bind", "rw", "nosuid", "nodev", "noexec"]}]
              if info_dir is not None else []),
            # Keep-awake task files (docs/lifecycle.md): any process may write one; small,
            # charged to the sprite's memory, and gone with its run as a task should be.
            {"destination": "/run/sprite/tasks", "type": "tmpfs", "source": "tasks",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=64k",
                         "nr_inodes=512"]},
            {"destination": "/.wisp/init", "type": "none", "source": str(init_binary),
             "options": ["bind", "ro", "nosuid", "nodev"]},
            {"destination": "/.wisp/run", "type": "none", "source": str(agent_dir),
             "options": ["bind", "rw", "nosuid", "nodev", "noexec"]},
        ],
        "linux": {
            "uidMappings": [{"containerID": 0, "hostID": ROOT_UID_BASE, "size": ID_RANGE}],
            "gidMappings": [{"containerID": 0, "hostID": ROOT_UID_BASE, "size": ID_RANGE}],
            "namespaces": [
                {"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
                {"type": "user"}, {"type": "cgroup"},
                {"type": "network", "path": str(netns)},
            ],
            "cgroupsPath": cgroup_path,
            "resources": {
                "devices": [{"allow": False, "access": "rwm"}],
                "memory": {"limit": limits.memory_mb * 1024 * 1024},
                "cpu": {"quota": int(limits.cpus * quota_period), "period": quota_period},
                "pids": {"limit": limits.pids},
            },
            "maskedPaths": [
                "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi",
                "/sys/firmware", "/sys/devices/virtual/powercap",
            ],
            "readonlyPaths": [
                "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger",
            ],
            "seccomp": _seccomp(),
        },
    }
    return spec
