"""Base images (`wisp/images.py`): builds, imports, removal, and the contract every image
holds, checked on the real filesystem and, for busybox and Debian, inside a real runc
container that uses the sprite user namespace (container 0..65535 -> host 100000..165535).

Fast tests use tmp dirs. The Debian test reuses (or builds once) the shared image store
that the functional tests use too.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.framework.leaks import leaks
from tests.framework.server import IMAGES_DIR
from wisp import images
from wisp.errors import BadRequest, Conflict, InvalidName, NotFound, SystemError_
from wisp.images import Image, ImageStore
from wisp.runtime.base import ROOT_UID_BASE, SPRITE_UID

REPO = Path(__file__).resolve().parents[2]
HOST_ROOT = ROOT_UID_BASE
HOST_SPRITE = ROOT_UID_BASE + SPRITE_UID
#: A v2 file capability granting CAP_NET_RAW (what `setcap cap_net_raw+ep` writes).
NET_RAW_CAPS = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)
#: Docker's default set: enough for setuid sudo to switch users inside the sprite.
CAPS = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD",
        "CAP_NET_RAW", "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP",
        "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE"]


# ---- helpers ---------------------------------------------------------------------------------

@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "images")


def tmp_leftovers(store: ImageStore) -> list[str]:
    tmp = store.root / ".tmp"
    return sorted(p.name for p in tmp.iterdir()) if tmp.exists() else []


def passwd(image: Image) -> dict[str, list[str]]:
    rows = (image.rootfs / "etc/passwd").read_text().splitlines()
    return {r.split(":")[0]: r.split(":") for r in rows if r}


def group(image: Image) -> dict[str, list[str]]:
    rows = (image.rootfs / "etc/group").read_text().splitlines()
    return {r.split(":")[0]: r.split(":") for r in rows if r}


def assert_image_contract(store: ImageStore, image: Image) -> None:
    """Every invariant all images share, read from the disk."""
    root = image.rootfs
    assert image.rootfs == store.root / image.name / image.version / "rootfs"
    meta = json.loads((root.parent / "image.json").read_text())
    assert {k: meta[k] for k in ("name", "version", "created", "size_bytes", "source")} == {
        "name": image.name, "version": image.version, "created": image.created,
        "size_bytes": image.size_bytes, "source": image.source}
    assert time.strptime(image.created, "%Y-%m-%dT%H:%M:%SZ")
    assert image.size_bytes > 0
    for dirpath, dirnames, filenames in os.walk(root):
        for path in [dirpath] + [os.path.join(dirpath, n) for n in dirnames + filenames]:
            st = os.lstat(path)
            assert HOST_ROOT <= st.st_uid < HOST_ROOT + 65536, (path, st.st_uid)
            assert HOST_ROOT <= st.st_gid < HOST_ROOT + 65536, (path, st.st_gid)
            assert not (stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)), path
    users = passwd(image)
    assert users["root"][2:4] == ["0", "0"]
    shell = "/bin/bash" if os.path.lexists(root / "bin/bash") else "/bin/sh"
    assert users["sprite"][2:4] == ["1000", "1000"]
    assert users["sprite"][5:7] == ["/home/sprite", shell]
    assert [g for g in group(image).values() if g[2] == "1000"] == [["sprite", "x", "1000", ""]]
    home = os.lstat(root / "home/sprite")
    assert stat.S_ISDIR(home.st_mode) and (home.st_uid, home.st_gid) == (HOST_SPRITE,) * 2
    wisp = os.lstat(root / ".wisp")
    assert stat.S_ISDIR(wisp.st_mode) and wisp.st_uid == HOST_ROOT
    assert list((root / ".wisp").iterdir()) == []
    tmp = os.lstat(root / "tmp")
    assert stat.S_ISDIR(tmp.st_mode) and stat.S_IMODE(tmp.st_mode) == 0o1777
    for name in ("etc/hostname", "etc/resolv.conf"):
        assert stat.S_ISREG(os.lstat(root / name).st_mode), name
    assert os.lstat(root).st_uid == HOST_ROOT


@pytest.fixture
def run_in_sprite(leak_check: Path) -> Iterator[Callable[..., subprocess.CompletedProcess[str]]]:
    """Run a command in a real runc container on an overlay of the image, as a sprite is run:
    user namespace with the sprite mapping, new pid/net/ipc/uts/mount namespaces."""
    made: list[Path] = []

    def run(image: Image, script: str, uid: int = SPRITE_UID,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        # Under the session leak-check dir: world-traversable (runc's init runs as host
        # uid 100000 and must reach the rootfs), and leaks there fail the run.
        base = leak_check / f"images-{secrets.token_hex(4)}"
        upper, work, merged, bundle = (base / d for d in ("upper", "work", "merged", "bundle"))
        for d in (upper, work, merged, bundle):
            d.mkdir(parents=True)
        os.chown(upper, HOST_ROOT, HOST_ROOT)
        made.append(base)
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={image.rootfs},upperdir={upper},workdir={work}",
                        str(merged)], check=True, timeout=30)
        subprocess.run(["runc", "spec", "--bundle", str(bundle)], check=True, timeout=30)
        config = json.loads((bundle / "config.json").read_text())
        process = config["process"]
        process.update(terminal=False, args=["/bin/sh", "-c", script], noNewPrivileges=False,
                       user={"uid": uid, "gid": uid})
        sets = ("bounding", "effective", "permitted") if uid == 0 else ("bounding",)
        process["capabilities"] = {k: (CAPS if k in sets else []) for k in
                                   ("bounding", "effective", "permitted", "inheritable",
                                    "ambient")}
        config["root"] = {"path": str(merged), "readonly": False}
        config["hostname"] = "sprite"
        config["mounts"] = [m for m in config["mounts"] if m["destination"] != "/sys/fs/cgroup"]
        linux = config["linux"]
        linux["namespaces"].append({"type": "user"})
        mapping = [{"containerID": 0, "hostID": ROOT_UID_BASE, "size": 65536}]
        linux["uidMappings"] = linux["gidMappings"] = mapping
        (bundle / "config.json").write_text(json.dumps(config))
        cid = f"wisp-imgtest-{secrets.token_hex(4)}"
        runc = ["runc", "--root", str(base / "runc")]
        try:
            return subprocess.run(runc + ["run", "--bundle", str(bundle), cid],
                                  capture_output=True, text=True, timeout=timeout,
                                  stdin=subprocess.DEVNULL)
        finally:
            subprocess.run(runc + ["delete", "--force", cid], capture_output=True, timeout=30)

    yield run
    for base in made:
        subprocess.run(["umount", str(base / "merged")], capture_output=True, timeout=30)
        shutil.rmtree(base)


def make_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    mode: dict[str, Any] = {".tar": "w", ".gz": "w:gz", ".tgz": "w:gz", ".xz": "w:xz",
                            ".bz2": "w:bz2"}
    with tarfile.open(path, mode[path.suffix], format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes | None = b"", uid: int = 0,
           mode: int = 0o644, linkname: str = "",
           pax: dict[str, str] | None = None) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type, info.uid, info.gid, info.mode, info.linkname = kind, uid, uid, mode, linkname
    info.mtime = int(time.time())
    if pax:
        info.pax_headers = pax
    return info, (data if kind == tarfile.REGTYPE else None)


def d(name: str, uid: int = 0, mode: int = 0o755) -> tuple[tarfile.TarInfo, bytes | None]:
    return member(name, tarfile.DIRTYPE, None, uid, mode)


# ---- the public surface ------------------------------------------------------------------------

def test_public_surface_is_pinned() -> None:
    """Other modules may only rely on Image and ImageStore."""
    assert images.__all__ == ["Image", "ImageStore"]


# ---- busybox -----------------------------------------------------------------------------------

def test_busybox_build_holds_the_image_contract(store: ImageStore) -> None:
    """A busybox build is shifted, has the sprite user and one relative link per applet,
    and list/latest/get return the same image every time (also from a fresh store)."""
    image = store.build_busybox()
    assert_image_contract(store, image)
    assert (image.name, image.source) == ("busybox", "busybox")
    binary = os.lstat(image.rootfs / "bin/busybox")
    assert stat.S_ISREG(binary.st_mode) and stat.S_IMODE(binary.st_mode) == 0o755
    assert binary.st_uid == HOST_ROOT
    applets = subprocess.run(["/bin/busybox", "--list"], capture_output=True, text=True,
                             check=True, timeout=30).stdout.split()
    for applet in applets:
        if applet != "busybox":
            assert os.readlink(image.rootfs / "bin" / applet) == "busybox", applet
    for d_ in ("usr/bin", "sbin", "usr/sbin", "proc", "sys", "dev", "root", "run", "var"):
        assert (image.rootfs / d_).is_dir(), d_
    assert passwd(image)["sprite"][6] == "/bin/sh"
    assert store.list() == [image] == store.list()
    assert store.latest("busybox") == image == store.latest("busybox")
    assert store.get("busybox", image.version) == image
    assert ImageStore(store.root).list() == [image]
    assert store.latest("other") is None
    assert store.get("busybox", "20000101T000000Z-000000") is None
    assert tmp_leftovers(store) == []


def test_busybox_image_runs_as_the_sprite_user(store: ImageStore,
                                               run_in_sprite) -> None:  # type: ignore[no-untyped-def]
    """In a user-namespaced container the image's files belong to root, the process is
    `sprite` (1000) with its home, and /tmp is writable."""
    image = store.build_busybox()
    res = run_in_sprite(image, "id -u; id -g; whoami; echo $HOME; stat -c %u /; "
                               "stat -c %u:%g /home/sprite; touch /tmp/x && echo ok")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["1000", "1000", "sprite", "/home/sprite", "0", "1000:1000",
                                  "ok"]


def test_restrictive_umask_does_not_leak_into_images(store: ImageStore,
                                                      tmp_path: Path) -> None:
    """A server running with umask 077 still produces world-readable images: /etc/passwd,
    the rootfs, the sprite's home and every directory the build creates keep their modes."""
    archive = make_tar(tmp_path / "r.tar", [member("etc/os-release", data=b"ID=x\n")])
    old = os.umask(0o077)
    try:
        built = [store.build_busybox(), store.import_("tar", archive)]
    finally:
        os.umask(old)
    for image in built:
        for path, mode in (("", 0o755), ("etc", 0o755), ("etc/passwd", 0o644),
                           ("etc/group", 0o644), ("etc/hostname", 0o644), ("home", 0o755),
                           ("home/sprite", 0o755), (".wisp", 0o755)):
            assert stat.S_IMODE(os.lstat(image.rootfs / path).st_mode) == mode, (image, path)
        assert stat.S_IMODE(os.lstat(image.rootfs.parent).st_mode) == 0o755


def test_newest_version_comes_first(store: ImageStore) -> None:
    """Versions sort by creation time, names a-z; latest() is the newest build."""
    first = store.build_busybox()
    second = store.build_busybox()
    other = store.build_busybox("aaa")
    assert first.version < second.version
    assert store.list() == [other, second, first]
    assert store.latest("busybox") == second


# ---- imports ---------------------------------------------------------------------------------

def make_source_dir(src: Path) -> None:
    """A small rootfs with what an imported image may hold: setuid and capability
    binaries, hard links, a device node, overlay xattrs, a user already holding uid 1000."""
    for sub in ("etc", "bin", "dev", "home/ubuntu", "opaque", "tmp"):
        (src / sub).mkdir(parents=True)
    os.chmod(src / "tmp", 0o755)
    (src / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/bash\n"
                                    "ubuntu:x:1000:1000::/home/ubuntu:/bin/bash\n")
    (src / "etc/group").write_text("root:x:0:\nubuntu:x:1000:\n")
    (src / "bin/bash").write_text("#!fake\n")
    (src / "bin/tool").write_text("setuid")
    os.chmod(src / "bin/tool", 0o4755)
    (src / "bin/ping").write_text("caps")
    os.setxattr(src / "bin/ping", "security.capability", NET_RAW_CAPS)
    (src / "bin/a").write_text("linked")
    os.link(src / "bin/a", src / "bin/b")
    (src / "home/ubuntu/f").write_text("mine")
    os.chown(src / "home/ubuntu", 1000, 1000)
    os.chown(src / "home/ubuntu/f", 1000, 1000)
    os.mknod(src / "dev/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.setxattr(src / "opaque", "trusted.overlay.opaque", b"y")
    os.symlink("/run/systemd/resolve/stub-resolv.conf", src / "etc/resolv.conf")
    os.symlink("/usr/share/zoneinfo/UTC", src / "etc/localtime")


def test_import_directory_shifts_owners_and_keeps_privileges(store: ImageStore,
                                                             tmp_path: Path) -> None:
    """Importing a directory shifts every owner once (hard links too), keeps setuid bits
    and file capabilities, drops device nodes and overlay xattrs, makes uid 1000 `sprite`,
    and leaves the source untouched."""
    src = tmp_path / "src"
    make_source_dir(src)
    image = store.import_("imported", src)
    assert_image_contract(store, image)
    root = image.rootfs
    assert image.source == f"import {src}"
    tool = os.lstat(root / "bin/tool")
    assert tool.st_uid == HOST_ROOT and stat.S_IMODE(tool.st_mode) == 0o4755
    assert os.getxattr(root / "bin/ping", "security.capability") == NET_RAW_CAPS
    a, b = os.lstat(root / "bin/a"), os.lstat(root / "bin/b")
    assert a.st_ino == b.st_ino and a.st_uid == HOST_ROOT
    assert os.lstat(root / "home/ubuntu/f").st_uid == HOST_SPRITE
    assert not os.path.lexists(root / "dev/null")
    assert "trusted.overlay.opaque" not in os.listxattr(root / "opaque")
    assert os.readlink(root / "etc/localtime") == "/usr/share/zoneinfo/UTC"
    assert "ubuntu" not in passwd(image) and "ubuntu" not in group(image)
    assert passwd(image)["sprite"][6] == "/bin/bash"
    assert not (root / "etc/sudoers.d").exists()  # no sudo installed, no sudoers
    # the source is exactly as it was
    assert os.lstat(src / "bin/tool").st_uid == 0
    assert stat.S_IMODE(os.lstat(src / "bin/tool").st_mode) == 0o4755
    assert os.lstat(src / "home/ubuntu/f").st_uid == 1000
    assert stat.S_ISCHR(os.lstat(src / "dev/null").st_mode)
    assert "sprite" not in (src / "etc/passwd").read_text()
    assert tmp_leftovers(store) == []


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz", ".tgz", ".tar.xz", ".tar.bz2"])
def test_import_tarball(store: ImageStore, tmp_path: Path, suffix: str) -> None:
    """A tarball (as `docker export` writes it) is extracted with numeric owners, modes and
    capabilities, then shifted; with sudo installed the sprite user gets sudo."""
    archive = make_tar(tmp_path / f"rootfs{suffix}", [
        d("./"), d("etc"), d("usr"), d("usr/bin"), d("usr/lib"), d("home"),
        d("home/dev", uid=1000),
        member("etc/passwd", data=b"root:x:0:0:root:/root:/bin/sh\n"),
        member("etc/group", data=b"root:x:0:\nsudo:x:27:\n"),
        member("etc/shadow", data=b"root:*:19000:0:99999:7:::\n", mode=0o640),
        member("usr/bin/sudo", data=b"sudo", mode=0o4755),
        member("usr/bin/ping", data=b"ping", mode=0o755,
               pax={"SCHILY.xattr.security.capability": NET_RAW_CAPS.decode("latin-1")}),
        member("home/dev/notes", data=b"hi", uid=1000),
        member("lib", tarfile.SYMTYPE, linkname="usr/lib"),
        member("usr/bin/sudoedit", tarfile.LNKTYPE, linkname="usr/bin/sudo"),
        member("etc/mtab", tarfile.SYMTYPE, linkname="/proc/self/mounts"),
    ])
    image = store.import_("fromtar", archive)
    assert_image_contract(store, image)
    root = image.rootfs
    sudo = os.lstat(root / "usr/bin/sudo")
    assert sudo.st_uid == HOST_ROOT and stat.S_IMODE(sudo.st_mode) == 0o4755
    assert os.lstat(root / "usr/bin/sudoedit").st_ino == sudo.st_ino
    assert os.getxattr(root / "usr/bin/ping", "security.capability") == NET_RAW_CAPS
    assert os.lstat(root / "home/dev/notes").st_uid == HOST_SPRITE
    assert os.readlink(root / "lib") == "usr/lib"
    assert os.readlink(root / "etc/mtab") == "/proc/self/mounts"
    sudoers = os.lstat(root / "etc/sudoers.d/sprite")
    assert stat.S_IMODE(sudoers.st_mode) == 0o440 and sudoers.st_uid == HOST_ROOT
    assert (root / "etc/sudoers.d/sprite").read_text() == "sprite ALL=(ALL:ALL) NOPASSWD: ALL\n"
    assert group(image)["sudo"][3] == "sprite"
    shadow = (root / "etc/shadow").read_text().splitlines()
    assert shadow[-1] == "sprite:*:::::::"
    assert stat.S_IMODE(os.lstat(root / "etc/shadow").st_mode) == 0o640


ESCAPES: dict[str, list[tuple[tarfile.TarInfo, bytes | None]]] = {
    "dotdot": [member("../evil", data=b"x")],
    "dotdot-inside": [d("a"), member("a/../../evil", data=b"x")],
    "absolute": [member("/OUTSIDE/evil", data=b"x")],
    "through-symlink": [member("link", tarfile.SYMTYPE, linkname="/OUTSIDE"),
                        member("link/evil", data=b"x")],
    "through-relative-symlink": [member("up", tarfile.SYMTYPE, linkname="../.."),
                                 member("up/evil", data=b"x")],
    "hardlink-dotdot": [member("h", tarfile.LNKTYPE, linkname="../evil")],
    "hardlink-absolute": [member("h", tarfile.LNKTYPE, linkname="/OUTSIDE/victim")],
    "hardlink-through-symlink": [member("s", tarfile.SYMTYPE, linkname="/OUTSIDE"),
                                 member("h", tarfile.LNKTYPE, linkname="s/victim")],
    "unmappable-uid": [member("f", data=b"x", uid=70000)],
    "root-not-dir": [member(".", tarfile.SYMTYPE, linkname="/OUTSIDE")],
}


@pytest.mark.parametrize("case", sorted(ESCAPES))
def test_import_refuses_escaping_archives(store: ImageStore, tmp_path: Path, case: str) -> None:
    """A tar member that is absolute, climbs with `..`, writes or hard-links through a
    symlink, or carries an unmappable id is refused before anything is written: nothing
    appears outside, no version is published, no build directory is left."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_text("untouched")
    fixed = []
    for info, data in ESCAPES[case]:
        info = info.replace(name=info.name.replace("/OUTSIDE", str(outside)),
                            linkname=info.linkname.replace("/OUTSIDE", str(outside)))
        fixed.append((info, data))
    archive = make_tar(tmp_path / "evil.tar.gz", fixed)
    with pytest.raises(BadRequest):
        store.import_("evil", archive)
    assert sorted(p.name for p in outside.iterdir()) == ["victim"]
    assert (outside / "victim").read_text() == "untouched"
    assert not (tmp_path / "evil").exists() and not (store.root / "evil").exists()
    assert store.list() == [] and tmp_leftovers(store) == []


def test_import_refuses_already_shifted_directory(store: ImageStore, tmp_path: Path) -> None:
    """A directory whose owners are outside 0..65535 (e.g. an image rootfs that is already
    shifted) is refused after copying, and the partial copy is deleted."""
    src = tmp_path / "src"
    (src / "etc").mkdir(parents=True)
    os.chown(src / "etc", HOST_ROOT, HOST_ROOT)
    with pytest.raises(BadRequest, match="100000"):
        store.import_("shifted", src)
    assert store.list() == [] and tmp_leftovers(store) == []


def test_import_refuses_bad_sources(store: ImageStore, tmp_path: Path) -> None:
    """Missing paths, non-tar files, corrupt archives, empty archives and a directory
    that contains the store itself are bad requests."""
    (tmp_path / "x.zip").write_bytes(b"PK\x03\x04")
    (tmp_path / "broken.tar.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    make_tar(tmp_path / "empty.tar", [])
    for source in (tmp_path / "missing", tmp_path / "x.zip", tmp_path / "broken.tar.gz",
                   tmp_path / "empty.tar", tmp_path):
        with pytest.raises(BadRequest):
            store.import_("bad", source)
    assert store.list() == [] and tmp_leftovers(store) == []


def test_import_never_writes_through_image_symlinks(store: ImageStore, tmp_path: Path) -> None:
    """An image whose /etc, /home, /tmp and /.wisp are absolute symlinks to host
    directories gets its fix-ups inside the image; the host directories stay untouched."""
    host = Path(tempfile.mkdtemp(prefix="wisp-imgtest-host-", dir="/var/tmp"))
    try:
        for sub in ("etc", "home", "tmp", "wisp"):
            (host / sub).mkdir(parents=True)
            (host / sub / "keep").write_text("host file")
        os.chmod(host / "tmp", 0o700)
        src = tmp_path / "src"
        src.mkdir()
        for link, target in (("etc", "etc"), ("home", "home"), ("tmp", "tmp"),
                             (".wisp", "wisp")):
            os.symlink(host / target, src / link)
        image = store.import_("links", src)
        for sub in ("etc", "home", "tmp", "wisp"):
            assert sorted(p.name for p in (host / sub).iterdir()) == ["keep"], sub
            assert os.lstat(host / sub).st_uid == 0, sub
        assert stat.S_IMODE(os.lstat(host / "tmp").st_mode) == 0o700
        # inside the image the links dangle: they became real directories
        assert "sprite:x:1000:1000" in (image.rootfs / "etc/passwd").read_text()
        assert not (image.rootfs / "etc").is_symlink()
        assert (image.rootfs / ".wisp").is_dir() and not (image.rootfs / ".wisp").is_symlink()
    finally:
        shutil.rmtree(host)


def test_import_follows_symlinks_that_stay_inside(store: ImageStore, tmp_path: Path) -> None:
    """Symlinks that resolve inside the image (even absolute ones, as a chroot sees them)
    are followed: the fix-ups land in the directories they point to and the links stay."""
    src = tmp_path / "src"
    (src / "sysroot/etc").mkdir(parents=True)
    (src / "var/home").mkdir(parents=True)
    (src / "sysroot/etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    os.symlink("/sysroot/etc", src / "etc")
    os.symlink("var/home", src / "home")
    os.symlink("/.wisp-mounts", src / ".wisp")  # dangles: replaced by a real directory
    image = store.import_("inside", src)
    assert os.readlink(image.rootfs / "etc") == "/sysroot/etc"
    assert os.readlink(image.rootfs / "home") == "var/home"
    assert "sprite:x:1000" in (image.rootfs / "sysroot/etc/passwd").read_text()
    assert os.lstat(image.rootfs / "var/home/sprite").st_uid == HOST_SPRITE
    assert (image.rootfs / "sysroot/etc/hostname").read_text() == "sprite\n"


def test_import_replaces_special_files_where_config_belongs(store: ImageStore,
                                                           tmp_path: Path) -> None:
    """A FIFO at /etc/passwd (reading it would hang the build) and a directory at
    /etc/hostname are replaced by regular files."""
    src = tmp_path / "src"
    (src / "etc/hostname").mkdir(parents=True)
    os.mkfifo(src / "etc/passwd")
    image = store.import_("special", src)
    assert_image_contract(store, image)
    assert stat.S_ISREG(os.lstat(image.rootfs / "etc/passwd").st_mode)
    assert (image.rootfs / "etc/hostname").read_text() == "sprite\n"


def test_import_refuses_a_self_looping_etc(store: ImageStore, tmp_path: Path) -> None:
    """`/etc -> /etc` loops inside the image (and would be the host's /etc if followed on
    the host): the import is refused and the host's /etc/passwd is not touched."""
    before = os.stat("/etc/passwd")
    src = tmp_path / "src"
    src.mkdir()
    os.symlink("/etc", src / "etc")
    with pytest.raises(BadRequest, match="symlinks"):
        store.import_("loop", src)
    after = os.stat("/etc/passwd")
    assert (after.st_ino, after.st_mtime_ns, after.st_uid) == (
        before.st_ino, before.st_mtime_ns, before.st_uid)
    assert store.list() == [] and tmp_leftovers(store) == []


# ---- removal ---------------------------------------------------------------------------------

def test_remove(store: ImageStore) -> None:
    """remove() deletes exactly one version; the last one takes its name dir along; an
    unknown version is NotFound."""
    old = store.build_busybox()
    new = store.build_busybox()
    store.remove("busybox", old.version)
    assert store.list() == [new]
    assert not old.rootfs.parent.exists()
    with pytest.raises(NotFound):
        store.remove("busybox", old.version)
    with pytest.raises(NotFound):
        store.remove("busybox", "not-a-version")
    store.remove("busybox", new.version)
    assert store.list() == [] and not (store.root / "busybox").exists()
    assert tmp_leftovers(store) == []


def test_remove_refuses_an_image_under_a_mounted_overlay(store: ImageStore,
                                                         tmp_path: Path) -> None:
    """While an overlay uses the rootfs as its lower layer, remove() is a Conflict."""
    image = store.build_busybox()
    upper, work, merged = (tmp_path / n for n in ("upper", "work", "merged"))
    for p in (upper, work, merged):
        p.mkdir()
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={image.rootfs},upperdir={upper},workdir={work}", str(merged)],
                   check=True, timeout=30)
    try:
        with pytest.raises(Conflict):
            store.remove(image.name, image.version)
        assert store.list() == [image]
    finally:
        subprocess.run(["umount", str(merged)], check=True, timeout=30)
    store.remove(image.name, image.version)
    assert store.list() == []


# ---- names -----------------------------------------------------------------------------------

BAD_NAMES = ["", "Debian", "-x", ".x", "_x", "a/b", "..", "a b", "a" * 64, "é", "abc\n"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_invalid_names_are_refused(store: ImageStore, tmp_path: Path, name: str) -> None:
    """Every entry point refuses a name outside ^[a-z0-9][a-z0-9._-]{0,62}$ with
    InvalidName, before touching the disk."""
    calls: list[Callable[[], object]] = [
        lambda: store.build_busybox(name),
        lambda: store.build_debian(name),
        lambda: store.import_(name, tmp_path),
        lambda: store.latest(name),
        lambda: store.get(name, "20260101T000000Z-000000"),
        lambda: store.remove(name, "20260101T000000Z-000000"),
    ]
    for call in calls:
        with pytest.raises(InvalidName):
            call()
    assert not store.root.exists()


def test_longest_and_shortest_names_are_accepted(store: ImageStore) -> None:
    """Names of 1 and 63 characters with . _ - inside are valid."""
    for name in ("a", "0", "a" * 63, "x.y_z-1"):
        assert store.build_busybox(name).name == name
    assert len(store.list()) == 4


# ---- interrupted and failed builds -----------------------------------------------------------

CHILD_BUILD = """
import sys, time
from pathlib import Path
from wisp.images import ImageStore

def hold(line):
    if line.startswith("shifting"):  # mid-build: copied and configured, not published
        Path(sys.argv[3]).write_text("holding")
        time.sleep(600)

ImageStore(Path(sys.argv[1])).import_("victim", Path(sys.argv[2]), progress=hold)
"""


def test_killed_build_leaves_no_version(store: ImageStore, tmp_path: Path) -> None:
    """A build whose process is SIGKILLed mid-way publishes nothing. While it is alive,
    a concurrent build leaves its directory alone (its lock is held); once it is dead,
    the next build deletes what it left."""
    src = tmp_path / "src"
    make_source_dir(src)
    marker = tmp_path / "marker"
    child = subprocess.Popen([sys.executable, "-c", CHILD_BUILD, str(store.root), str(src),
                              str(marker)], env={**os.environ, "PYTHONPATH": str(REPO)},
                             stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert child.poll() is None, "the build child exited early"
            assert time.monotonic() < deadline, "the build child never reached mid-build"
            time.sleep(0.05)
        in_flight = tmp_leftovers(store)
        assert len(in_flight) == 2  # <id> and <id>.lock
        store.build_busybox()  # concurrent build: must not touch the live one
        assert set(in_flight) <= set(tmp_leftovers(store))
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    assert [i.name for i in store.list()] == ["busybox"]
    assert store.latest("victim") is None and not (store.root / "victim").exists()
    assert tmp_leftovers(store) == in_flight  # stale, until the next build
    store.build_busybox()
    assert tmp_leftovers(store) == []
    assert [i.name for i in store.list()] == ["busybox", "busybox"]


def test_failed_debootstrap_leaves_nothing(store: ImageStore) -> None:
    """When debootstrap fails (an unreachable mirror) the error is a SystemError_ naming
    it, its output went to `progress`, and nothing is left behind."""
    lines: list[str] = []
    with pytest.raises(SystemError_, match="debootstrap"):
        store.build_debian(mirror="http://127.0.0.1:9/debian", progress=lines.append)
    assert lines
    assert store.list() == [] and tmp_leftovers(store) == []


def test_build_aborted_from_progress_kills_the_tool(store: ImageStore) -> None:
    """An exception raised by the progress callback (a client that went away, Ctrl-C in
    the CLI) aborts the build: it propagates unchanged, debootstrap and its helpers are
    killed, and nothing is left behind."""
    class Abort(Exception):
        pass

    def abort(line: str) -> None:
        if not line.startswith("debootstrap "):  # the first line from debootstrap itself
            raise Abort(line)

    with pytest.raises(Abort):
        store.build_debian(mirror="http://127.0.0.1:9/debian", progress=abort)
    assert leaks(store.root)["processes"] == []
    assert store.list() == [] and tmp_leftovers(store) == []


def test_debian_arguments_are_checked(store: ImageStore) -> None:
    """A bad suite or a mirror that is not a URL is refused before debootstrap runs."""
    for kwargs in ({"suite": "../x"}, {"suite": "--foreign"}, {"suite": "bookworm\n"},
                   {"mirror": "--no-check-gpg"}, {"mirror": "ftp://x/debian"},
                   {"mirror": "http://x/debian\n"}):
        with pytest.raises(BadRequest):
            store.build_debian(**kwargs)  # type: ignore[arg-type]
    assert store.list() == []


# ---- Debian --------------------------------------------------------------------------------

@pytest.mark.debian
def test_debian_image(run_in_sprite) -> None:  # type: ignore[no-untyped-def]
    """The debootstrap image holds the contract, gives `sprite` passwordless sudo, has no
    apt caches, and works as a container rootfs: bash, sudo, python3, git, curl and ping
    run as the sprite user in the user namespace. Built once per machine, then reused."""
    store = ImageStore(IMAGES_DIR)
    image = store.latest("debian") or store.build_debian()
    assert_image_contract(store, image)
    root = image.rootfs
    assert image.source == "debootstrap bookworm"
    assert passwd(image)["sprite"][6] == "/bin/bash"
    assert "sprite" in group(image)["sudo"][3].split(",")
    sudoers = os.lstat(root / "etc/sudoers.d/sprite")
    assert stat.S_IMODE(sudoers.st_mode) == 0o440 and sudoers.st_uid == HOST_ROOT
    sudo = os.lstat(root / "usr/bin/sudo")
    assert sudo.st_uid == HOST_ROOT and sudo.st_mode & stat.S_ISUID
    assert list((root / "var/cache/apt/archives").glob("*.deb")) == []
    assert list((root / "var/lib/apt/lists").iterdir()) == []
    assert (root / "etc/resolv.conf").read_text() == ""
    assert (root / "etc/hostname").read_text() == "sprite\n"
    assert (root / "home/sprite/.bashrc").is_file()
    ping = root / "usr/bin/ping"  # cap_net_raw survives the shift (else it needs setuid)
    assert "security.capability" in os.listxattr(ping) or os.lstat(ping).st_mode & stat.S_ISUID
    res = run_in_sprite(image, "set -e; whoami; echo $HOME; sudo -n id -u; "
                               "python3 -c 'print(6 * 7)'; git --version >/dev/null; "
                               "curl --version >/dev/null; ping -c1 -W2 127.0.0.1 >/dev/null; "
                               "bash -c 'echo bash'; sudo -n touch /root/x; echo done",
                        timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.split() == ["sprite", "/home/sprite", "0", "42", "bash", "done"]
