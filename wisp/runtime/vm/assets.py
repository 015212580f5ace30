"""Boot assets of the QEMU microvm guest, built on the host from Debian packages.

A guest needs three things the host does not have ready-made:

* `vmlinux`: an uncompressed ELF kernel, because `qemu-system-x86_64 -M microvm` boots a
  kernel through PVH, which needs the ELF note of `vmlinux`, not the bzImage Debian ships.
  It is cut out of `linux-image-cloud-amd64`'s bzImage (an LZ4 payload), so the kernel is a
  signed, security-updated Debian build rather than one we compile.
* its modules: every virtio driver of that kernel is a module (ext4, tmpfs, devtmpfs and the
  socket families are built in), so the initramfs carries the few `.ko` files a guest needs
  plus an `order` file that lists them dependencies first, for plain `insmod`: the guest
  has no kmod and no modules.dep.
* `python.ext4`: a read-only ext4 image holding a Python 3.11 runtime (with its own glibc),
  attached as a second disk and mounted at `/tools`, so the guest agent can be Python
  whatever the sprite's root filesystem holds (busybox only, or a Debian without python3).

Every builder is idempotent (an asset that exists is done) and writes to a temporary name
that it renames into place last, so an interrupted build never leaves anything that a later
run would take for finished. Builders of one directory serialise on a lock file in it, so
`make install` and a test may run at the same time.

`python -m wisp.runtime.vm.assets` builds the kernel and the python image into `build_dir()`
(what `make vm` runs).
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import json
import mmap
import os
import platform
import re
import select
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    "AssetError",
    "BUSYBOX",
    "GUEST_MODULES",
    "GUEST_PYTHON",
    "GUEST_PYTHON_ENV",
    "GUEST_TOOLS",
    "KERNEL_PACKAGE",
    "PYTHON_PACKAGES",
    "QEMU",
    "build_dir",
    "build_initrd",
    "ensure_kernel",
    "ensure_python",
    "main",
    "probe_kvm",
    "tcg_kernel_args",
]

#: The QEMU binary every guest runs in (Debian package qemu-system-x86).
QEMU = "qemu-system-x86_64"
#: Debian's meta package of the cloud kernel: it depends on the current versioned image.
KERNEL_PACKAGE = "linux-image-cloud-amd64"
#: The modules a guest loads (file names with `-` or `_`, either way). Their dependencies are
#: added from each module's own `depends=` modinfo string, so this list only names leaves.
GUEST_MODULES: tuple[str, ...] = (
    "virtio_mmio", "virtio_blk", "virtio_net", "virtio_console", "overlay", "virtio_rng",
    "virtio_balloon",
)
#: Static busybox (package busybox-static): the initramfs's only program besides modules.
BUSYBOX = Path("/bin/busybox")

#: The python image's packages. glibc (libc6) is in it too: the initramfs has none, and a
#: sprite's root filesystem may have none or another version; the interpreter is patched to
#: use the image's own dynamic loader (see `_GUEST_LOADER`), so no guest library is used.
#: libffi8 (_ctypes), zlib1g (zlib) and libexpat1 (pyexpat) are what the interpreter and the
#: stdlib modules of `_REQUIRED_MODULES` need beyond glibc; `_check_libraries` proves it.
PYTHON_PACKAGES: tuple[str, ...] = (
    "python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib",
    "libc6", "libffi8", "zlib1g", "libexpat1",
)
#: Where the guest mounts python.ext4 (read-only). Baked into the interpreter's ELF
#: interpreter path and the compiled modules' file names, so it is not a free choice.
GUEST_TOOLS = "/tools"
#: The interpreter, when the image is mounted at GUEST_TOOLS.
GUEST_PYTHON = f"{GUEST_TOOLS}/usr/bin/python3.11"
#: The environment GUEST_PYTHON must run with. There is no wrapper script in the image: the
#: guest root may lack /bin/sh. LD_LIBRARY_PATH makes the interpreter use the image's glibc
#: and libraries; PYTHONHOME pins the stdlib to the image. The guest must NOT pass these two
#: on to the processes it starts for users: their programs would load the image's glibc.
GUEST_PYTHON_ENV: dict[str, str] = {
    "PYTHONHOME": f"{GUEST_TOOLS}/usr",
    "LD_LIBRARY_PATH": f"{GUEST_TOOLS}/lib/x86_64-linux-gnu:{GUEST_TOOLS}/usr/lib/x86_64-linux-gnu",
    # the image is read-only and ships compiled modules for all of its stdlib
    "PYTHONDONTWRITEBYTECODE": "1",
}

#: The ELF interpreter path written into the image's python3.11: a symlink at the image's
#: root to its own ld.so. It must not be longer than the original "/lib64/ld-linux-x86-64.so.2"
#: since it is patched in place.
_GUEST_LOADER = f"{GUEST_TOOLS}/ld.so"
_LOADER = "lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
_LIB_DIRS = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu")
_PYTHON = "usr/bin/python3.11"
_STDLIB = "usr/lib/python3.11"
#: Stdlib modules the guest agent relies on: each must import in the built image.
_REQUIRED_MODULES = ("_ctypes", "_socket", "select", "_posixsubprocess", "_json", "zlib",
                     "pyexpat", "_asyncio")
#: What a guest never needs: docs, locales, iconv modules (Python does not use gconv), test
#: suites, GUIs, pip bootstrap. Paths relative to the tree; globs allowed.
_PRUNE = (
    "usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/lintian", "usr/share/locale",
    "usr/share/binfmts", "usr/lib/x86_64-linux-gnu/gconv",
    f"{_STDLIB}/test", f"{_STDLIB}/idlelib", f"{_STDLIB}/tkinter", f"{_STDLIB}/ensurepip",
    f"{_STDLIB}/turtledemo", f"{_STDLIB}/turtle.py", f"{_STDLIB}/lib2to3/tests",
    f"{_STDLIB}/*/test", f"{_STDLIB}/*/tests",
    f"{_STDLIB}/lib-dynload/_test*.so", f"{_STDLIB}/lib-dynload/_ctypes_test*.so",
    f"{_STDLIB}/lib-dynload/xxlimited*.so", f"{_STDLIB}/lib-dynload/_xxtestfuzz*.so",
)
_MIN_IMAGE = 64 << 20

#: The probe guest prints this (computed in the guest, so an echo of the script is no match).
_PROBE_MARKER = b"WISP-KVM-PROBE 42"
_PROBE_INIT = b"""#!/bin/busybox sh
/bin/busybox echo "WISP-KVM-PROBE $((6 * 7))"
/bin/busybox poweroff -f
"""


class AssetError(RuntimeError):
    """A boot asset could not be built; the message says which step and why, in one line."""


def build_dir() -> Path:
    """`<repo>/build/vm`: beside build/wisp-init, removed by `make clean`."""
    return Path(__file__).resolve().parents[3] / "build" / "vm"


# --- helpers -------------------------------------------------------------------------------


def _run(cmd: Sequence[str | Path], *, cwd: Path | None = None,
         env: dict[str, str] | None = None) -> str:
    """Run a build tool; its stderr's last line becomes the AssetError, not a traceback."""
    args = [str(c) for c in cmd]
    res = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        lines = (res.stderr.strip() or res.stdout.strip() or f"exit {res.returncode}").splitlines()
        raise AssetError(f"{Path(args[0]).name} {' '.join(args[1:3])}: {lines[-1]}")
    return res.stdout


@contextmanager
def _locked(out: Path) -> Iterator[None]:
    """Serialise the builders of one directory across processes (flock, freed on exit)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _clear_stale(out: Path, prefix: str) -> None:
    """Scratch of a build killed earlier (only ever called with the lock held)."""
    for p in out.glob(f"{prefix}*"):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def _download(packages: Sequence[str], dest: Path) -> list[Path]:
    """`apt-get download` into dest: the packages' .deb files, without installing them."""
    dest.mkdir(parents=True, exist_ok=True)
    _run(["apt-get", "download", "-q", *packages], cwd=dest)
    debs = []
    for p in packages:
        found = sorted(dest.glob(f"{p}_*.deb"))
        if not found:
            raise AssetError(f"apt-get download {p}: no .deb appeared")
        debs.append(found[0])
    return debs


def _kernel_version_package() -> str:
    """The versioned image package the meta package depends on, e.g.
    linux-image-6.1.0-57-cloud-amd64 (`apt-get download` does not follow dependencies)."""
    try:
        out = _run(["apt-cache", "depends", KERNEL_PACKAGE])
    except AssetError as e:
        raise AssetError(f"{e} (is `apt-get update` done?)") from None
    for line in out.splitlines():
        m = re.match(r"\s*Depends:\s*(linux-image-\S+)", line)
        if m:
            return m.group(1)
    raise AssetError(f"apt-cache depends {KERNEL_PACKAGE}: no linux-image dependency")


# --- kernel --------------------------------------------------------------------------------


def _extract_vmlinux(bzimage: Path, dest: Path) -> None:
    """Decompress the ELF kernel out of a bzImage.

    The boot protocol header (>= 2.08) gives the payload's offset and length exactly; the
    kernel's build appends the uncompressed size as its last 4 bytes, which legacy-LZ4
    `lz4 -d` would take for a truncated frame, so they are cut off and used as a check.
    """
    data = bzimage.read_bytes()
    if data[0x202:0x206] != b"HdrS" or struct.unpack_from("<H", data, 0x206)[0] < 0x208:
        raise AssetError(f"{bzimage.name}: not a bzImage with a payload header")
    setup_sects = data[0x1F1] or 4
    offset, length = struct.unpack_from("<II", data, 0x248)
    start = (setup_sects + 1) * 512 + offset
    payload = data[start:start + length]
    if payload[:4] != b"\x02\x21\x4c\x18":
        raise AssetError(f"{bzimage.name}: payload is not legacy LZ4 ({payload[:4].hex()})")
    (size,) = struct.unpack("<I", payload[-4:])
    with open(dest, "wb") as f:
        res = subprocess.run(["lz4", "-d", "-c"], input=payload[:-4], stdout=f,
                             stderr=subprocess.PIPE)
    if res.returncode != 0:
        raise AssetError(f"lz4 -d: {res.stderr.decode(errors='replace').strip()}")
    with open(dest, "rb") as f:
        magic = f.read(4)
    if magic != b"\x7fELF" or dest.stat().st_size != size:
        raise AssetError(f"{bzimage.name}: decompressed kernel is not the expected ELF")


def _module_depends(ko: Path) -> list[str]:
    """The `depends=` string of a module's .modinfo section (names, comma separated)."""
    m = re.search(rb"(?:^|\x00)depends=([^\x00]*)\x00", ko.read_bytes())
    if m is None:
        return []
    return [d for d in m.group(1).decode().split(",") if d]


def _module_order(tree: Path, wanted: Sequence[str]) -> list[Path]:
    """The .ko files of `wanted` and everything they depend on, dependencies first."""
    index: dict[str, Path] = {}
    for ko in tree.rglob("*.ko"):
        index[ko.name[:-3].replace("-", "_")] = ko
    order: list[Path] = []
    state: dict[str, str] = {}

    def visit(name: str, chain: tuple[str, ...]) -> None:
        key = name.replace("-", "_")
        if state.get(key) == "done":
            return
        if state.get(key) == "visiting":
            raise AssetError(f"module dependency cycle: {' -> '.join((*chain, key))}")
        ko = index.get(key)
        if ko is None:
            raise AssetError(f"kernel module {key} not found (needed by "
                             f"{' -> '.join(chain) or 'GUEST_MODULES'})")
        state[key] = "visiting"
        for dep in _module_depends(ko):
            visit(dep, (*chain, key))
        state[key] = "done"
        order.append(ko)

    for name in wanted:
        visit(name, ())
    return order


def ensure_kernel(out: Path) -> tuple[Path, Path]:
    """`out/vmlinux` and `out/modules/` (GUEST_MODULES and their dependencies, flat, plus
    `order`: their file names in load order), from the Debian kernel package.

    Done when both exist. The modules directory is moved into place before vmlinux, so a
    present vmlinux means a complete modules directory beside it.
    """
    vmlinux, modules = out / "vmlinux", out / "modules"
    if vmlinux.is_file() and (modules / "order").is_file():
        return vmlinux, modules
    with _locked(out):
        if vmlinux.is_file() and (modules / "order").is_file():
            return vmlinux, modules
        _clear_stale(out, ".kernel-")
        scratch = Path(tempfile.mkdtemp(prefix=".kernel-", dir=out))
        try:
            (deb,) = _download([_kernel_version_package()], scratch / "debs")
            tree = scratch / "tree"
            _run(["dpkg-deb", "-x", deb, tree])
            images = sorted((tree / "boot").glob("vmlinuz-*"))
            versions = sorted((tree / "lib" / "modules").iterdir())
            if len(images) != 1 or len(versions) != 1:
                raise AssetError(f"{deb.name}: expected one vmlinuz and one module tree")
            new_vmlinux = scratch / "vmlinux"
            _extract_vmlinux(images[0], new_vmlinux)
            new_modules = scratch / "modules"
            new_modules.mkdir()
            names = []
            for ko in _module_order(versions[0] / "kernel", GUEST_MODULES):
                shutil.copyfile(ko, new_modules / ko.name)
                names.append(ko.name)
            (new_modules / "order").write_text("".join(f"{n}\n" for n in names))
            (new_modules / "release").write_text(versions[0].name + "\n")
            new_modules.chmod(0o755)
            if modules.exists():
                shutil.rmtree(modules)
            os.replace(new_modules, modules)
            os.replace(new_vmlinux, vmlinux)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return vmlinux, modules


# --- python image --------------------------------------------------------------------------


def _prune(tree: Path) -> None:
    for pattern in _PRUNE:
        for p in tree.glob(pattern):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()


def _relative_symlinks(tree: Path) -> None:
    """Absolute links (e.g. sitecustomize.py -> /etc/python3.11/...) would point into the
    guest's root, not the image: make them relative inside the tree, drop the dangling."""
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in (*dirnames, *filenames):
            link = Path(dirpath) / name
            if not link.is_symlink():
                continue
            target = os.readlink(link)
            if not target.startswith("/"):
                continue
            inside = tree / target.lstrip("/")
            link.unlink()
            if os.path.lexists(inside):
                link.symlink_to(os.path.relpath(inside, link.parent))


def _host_env(tree: Path) -> dict[str, str]:
    """Run the tree's interpreter on the host: its own loader, libraries and stdlib only."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LD_LIBRARY_PATH": ":".join(str(tree / d) for d in _LIB_DIRS),
        "PYTHONHOME": str(tree / "usr"),
        "PYTHONNOUSERSITE": "1",
        "LC_ALL": "C.UTF-8",
    }


def _check_libraries(tree: Path) -> None:
    """What `ldd` does, with the tree's loader: every library the interpreter and the
    required extension modules load must resolve inside the tree (not to the host's)."""
    loader = tree / _LOADER
    dynload = tree / _STDLIB / "lib-dynload"
    objects = [tree / _PYTHON]
    for mod in _REQUIRED_MODULES:
        objects += sorted(dynload.glob(f"{mod}.cpython-*.so"))  # else built into python
    for obj in objects:
        listing = _run([loader, "--list", obj], env=_host_env(tree))
        for line in listing.splitlines():
            if "=>" not in line:
                continue
            lib, _, where = (s.strip() for s in line.partition("=>"))
            path = where.split(" (")[0]
            if "not found" in where or not path.startswith(str(tree) + "/"):
                raise AssetError(f"{obj.name} needs {lib}, which no package of "
                                 f"PYTHON_PACKAGES provides (found: {where})")


def _compile_stdlib(tree: Path) -> None:
    """Debian compiles .pyc files at install time (py3compile), so the packages ship none,
    and a read-only image would make every guest start compile its imports again (seconds
    under TCG). Unchecked-hash pycs do not depend on the files' mtimes surviving mke2fs,
    and their recorded file names are the guest's (/tools/...)."""
    _run([tree / _LOADER, tree / _PYTHON, "-m", "compileall", "-q", "-j", "0",
          "-s", tree, "-p", GUEST_TOOLS, "--invalidation-mode", "unchecked-hash",
          tree / _STDLIB], env=_host_env(tree))


def _check_imports(tree: Path) -> None:
    code = f"import {', '.join(_REQUIRED_MODULES)}, asyncio, ctypes, json, socket"
    _run([tree / _LOADER, tree / _PYTHON, "-c", code], env=_host_env(tree))


def _patch_interpreter(binary: Path, loader: str) -> None:
    """Point an ELF executable's PT_INTERP at `loader`, in place: the path is padded with
    NULs to the old string's length, and the kernel reads it as a C string."""
    data = bytearray(binary.read_bytes())
    if data[:5] != b"\x7fELF\x02":
        raise AssetError(f"{binary.name}: not a 64-bit ELF")
    phoff = struct.unpack_from("<Q", data, 0x20)[0]
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        at = phoff + i * phentsize
        p_type = struct.unpack_from("<I", data, at)[0]
        if p_type != 3:  # PT_INTERP
            continue
        offset = struct.unpack_from("<Q", data, at + 8)[0]
        filesz = struct.unpack_from("<Q", data, at + 32)[0]
        new = loader.encode()
        if len(new) + 1 > filesz:
            raise AssetError(f"{binary.name}: {loader} longer than its ELF interpreter slot")
        data[offset:offset + filesz] = new.ljust(filesz, b"\0")
        mode = binary.stat().st_mode
        tmp = binary.with_name(binary.name + ".patched")
        tmp.write_bytes(bytes(data))
        tmp.chmod(stat.S_IMODE(mode))
        os.replace(tmp, binary)
        return
    raise AssetError(f"{binary.name}: no ELF interpreter to patch")


def _tree_bytes(tree: Path) -> int:
    total = 0
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in (*dirnames, *filenames):
            total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


def ensure_python(out: Path) -> Path:
    """`out/python.ext4`: a read-only ext4 image (label wisp-python, owner root) holding
    Python 3.11 from PYTHON_PACKAGES, to be mounted at GUEST_TOOLS and run as
    GUEST_PYTHON with GUEST_PYTHON_ENV. Done when it exists.

    Before the image is made, the tree's interpreter imports every module of
    `_REQUIRED_MODULES` on the host, using only the tree's loader and libraries.
    """
    image = out / "python.ext4"
    if image.is_file():
        return image
    with _locked(out):
        if image.is_file():
            return image
        _clear_stale(out, ".python-")
        scratch = Path(tempfile.mkdtemp(prefix=".python-", dir=out))
        try:
            debs = _download(PYTHON_PACKAGES, scratch / "debs")
            tree = scratch / "tree"
            tree.mkdir(mode=0o755)
            for deb in debs:
                _run(["dpkg-deb", "-x", deb, tree])
            tree.chmod(0o755)
            _prune(tree)
            _relative_symlinks(tree)
            _check_libraries(tree)
            _compile_stdlib(tree)
            _check_imports(tree)
            # last: from here on the interpreter only runs where the image is at /tools
            _patch_interpreter(tree / _PYTHON, _GUEST_LOADER)
            (tree / Path(_GUEST_LOADER).name).symlink_to(_LOADER)
            size = max(_MIN_IMAGE, _tree_bytes(tree) * 13 // 10)
            tmp = scratch / "python.ext4"
            _run(["mke2fs", "-q", "-t", "ext4", "-d", tree, "-L", "wisp-python",
                  # read-only: no journal to replay, no blocks reserved for root; 4 KiB
                  # blocks (mke2fs picks 1 KiB for a small fs), one page per block
                  "-O", "^has_journal", "-m", "0", "-b", "4096", "-E", "root_owner=0:0",
                  tmp, f"{-(-size // (1 << 20))}M"])
            os.replace(tmp, image)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return image


# --- initramfs -----------------------------------------------------------------------------


def _newc_header(ino: int, mode: int, size: int, name: bytes, nlink: int = 1,
                 rdev: tuple[int, int] = (0, 0)) -> bytes:
    fields = (ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev[0], rdev[1], len(name) + 1, 0)
    head = b"070701" + b"".join(b"%08X" % v for v in fields) + name + b"\0"
    return head + b"\0" * (-len(head) % 4)


def _write_newc(dest: Path, dirs: Sequence[str], files: dict[str, tuple[int, bytes]],
                devices: dict[str, tuple[int, int, int]]) -> None:
    """An uncompressed newc cpio (what the kernel unpacks as initramfs), written directly:
    owner root, mtime 0 (the same inputs give the same bytes)."""
    ino = 1
    with open(dest, "wb") as f:
        for d in dirs:
            f.write(_newc_header(ino, stat.S_IFDIR | 0o755, 0, d.encode(), nlink=2))
            ino += 1
        for path, (perm, rdev_major, rdev_minor) in devices.items():
            f.write(_newc_header(ino, stat.S_IFCHR | perm, 0, path.encode(),
                                 rdev=(rdev_major, rdev_minor)))
            ino += 1
        for path, (perm, data) in files.items():
            f.write(_newc_header(ino, stat.S_IFREG | perm, len(data), path.encode()))
            f.write(data + b"\0" * (-len(data) % 4))
            ino += 1
        f.write(_newc_header(0, 0, 0, b"TRAILER!!!", nlink=1))
        f.flush()
        os.fsync(f.fileno())


def build_initrd(out: Path, files: dict[str, Path | bytes],
                 modules_dir: Path | None) -> Path:
    """`out/initrd.cpio`: /bin/busybox, /lib/modules/* (every file of modules_dir: the .ko
    files and `order`), and each `files` entry at its guest path (key relative to /, e.g.
    "init"; a bytes value is the content). Mode 0755 for "init" and executable sources, else
    0644. Also /dev/console and empty /dev, /proc, /sys, /tmp, /run to mount on.

    Rebuilt only when its inputs changed: a manifest beside it records each input's guest
    path, mode and identity (host path, size and mtime, or a hash of the bytes), so a newer
    source, another set of files or a changed mode all count.
    """
    target = out / "initrd.cpio"
    manifest_path = out / "initrd.cpio.manifest.json"
    sources: dict[str, tuple[int, Path | bytes]] = {"bin/busybox": (0o755, BUSYBOX)}
    if modules_dir is not None:
        for f in sorted(modules_dir.iterdir()):
            if f.is_file():
                sources[f"lib/modules/{f.name}"] = (0o644, f)
    for key, src in files.items():
        path = key.strip("/")
        if not path or any(part in ("", ".", "..") for part in path.split("/")):
            raise ValueError(f"bad guest path {key!r}")
        executable = path == "init" or (isinstance(src, Path)
                                        and os.stat(src).st_mode & 0o111 != 0)
        sources[path] = (0o755 if executable else 0o644, src)

    manifest: dict[str, list[object]] = {}
    for path, (perm, src) in sorted(sources.items()):
        if isinstance(src, bytes):
            manifest[path] = [perm, "sha256", hashlib.sha256(src).hexdigest()]
        else:
            st = os.stat(src)
            manifest[path] = [perm, str(src), st.st_size, st.st_mtime_ns]
    try:
        if target.is_file() and json.loads(manifest_path.read_text()) == manifest:
            return target
    except (OSError, ValueError):
        pass

    dirs = {"dev", "proc", "sys", "tmp", "run", "bin", "lib", "lib/modules"}
    for path in sources:
        parts = path.split("/")[:-1]
        dirs.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))
    contents = {path: (perm, src if isinstance(src, bytes) else src.read_bytes())
                for path, (perm, src) in sorted(sources.items())}
    out.mkdir(parents=True, exist_ok=True)
    # the manifest goes first and comes back last: a crash in between means a rebuild
    manifest_path.unlink(missing_ok=True)
    tmp = out / f".initrd.cpio.{os.getpid()}.tmp"
    try:
        _write_newc(tmp, sorted(dirs), contents, {"dev/console": (0o600, 5, 1)})
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    tmp_manifest = out / f".initrd.cpio.manifest.{os.getpid()}.tmp"
    tmp_manifest.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp_manifest, manifest_path)
    return target


# --- KVM probe -----------------------------------------------------------------------------

_kvm_lock = threading.Lock()
_kvm_answer: bool | None = None


def _boot_until(cmd: Sequence[str], marker: bytes, timeout: float,
                fail: Sequence[bytes] = ()) -> bool:
    """Run QEMU until `marker` appears on its output (True), or it exits, prints one of
    `fail` or runs out of time (False). Its whole process group is killed on every path."""
    proc = subprocess.Popen(list(cmd), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    assert proc.stdout is not None
    seen = b""
    deadline = time.monotonic() + timeout
    try:
        fd = proc.stdout.fileno()
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                break
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            seen = (seen + chunk)[-65536:]
            if marker in seen:
                return True
            if any(f in seen for f in fail):
                return False
        return False
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        proc.stdout.close()


def probe_kvm(kernel: Path, initrd_dir_scratch: Path, timeout: float = 20.0) -> bool:
    """Whether a guest really runs under KVM here: /dev/kvm existing is not enough (nested
    or restricted hosts fail at the first instruction with "KVM internal error ... emulation
    failure"), so a tiny initramfs is booted with `-accel kvm` and must print a marker.

    The answer is cached for the process (the first call's kernel decides). Everything it
    makes goes into a temporary directory under `initrd_dir_scratch`, removed before it
    returns, and QEMU is killed on every path.
    """
    global _kvm_answer
    with _kvm_lock:
        if _kvm_answer is None:
            _kvm_answer = _probe_kvm(kernel, initrd_dir_scratch, timeout)
        return _kvm_answer


def _probe_kvm(kernel: Path, scratch_parent: Path, timeout: float) -> bool:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    scratch_parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".kvm-probe-", dir=scratch_parent))
    try:
        initrd = build_initrd(scratch, {"init": _PROBE_INIT}, None)
        cmd = [QEMU, "-M", "microvm,rtc=on", "-accel", "kvm", "-cpu", "host", "-m", "128",
               "-smp", "1", "-nodefaults", "-no-user-config", "-nographic",
               "-serial", "stdio", "-kernel", str(kernel), "-initrd", str(initrd),
               "-append", "console=ttyS0 quiet panic=-1", "-no-reboot"]
        return _boot_until(cmd, _PROBE_MARKER, timeout,
                           fail=(b"KVM internal error", b"failed to initialize kvm",
                                 b"Could not access KVM"))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# --- TCG -----------------------------------------------------------------------------------

#: x86-64 `rdtsc; shl rdx, 32; or rax, rdx; ret`: the host's time stamp counter.
_RDTSC_CODE = bytes.fromhex("0f31" "48c1e220" "4809d0" "c3")


@functools.cache
def _host_tsc_khz() -> int | None:
    """The host's TSC rate, measured against the raw monotonic clock for 100 ms (the kernel
    exposes it nowhere stable; /proc/cpuinfo's "cpu MHz" is the current clock speed)."""
    if platform.machine() != "x86_64":
        return None
    try:
        page = mmap.mmap(-1, mmap.PAGESIZE,
                         prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except OSError:  # W+X mappings refused by a hardened host
        return None
    try:
        page.write(_RDTSC_CODE)
        cell = ctypes.c_char.from_buffer(page)
        rdtsc = ctypes.CFUNCTYPE(ctypes.c_uint64)(ctypes.addressof(cell))
        rdtsc()  # the first call through ctypes is slow: not inside the measurement

        def stamp() -> tuple[int, int]:
            before = time.clock_gettime_ns(time.CLOCK_MONOTONIC_RAW)
            tsc = rdtsc()
            return tsc, (before + time.clock_gettime_ns(time.CLOCK_MONOTONIC_RAW)) // 2

        c0, t0 = stamp()
        time.sleep(0.1)
        c1, t1 = stamp()
        khz = (c1 - c0) * 1_000_000 // (t1 - t0)
        del cell  # the mapping cannot close while a ctypes object exports it
        return khz if khz > 0 else None
    finally:
        page.close()


def tcg_kernel_args() -> str:
    """Kernel command-line words a guest needs under TCG (`-accel tcg`).

    Under TCG the guest's TSC is the host's, but microvm has no HPET and no ACPI PM timer,
    so the guest kernel can only calibrate it against the PIT, whose emulation is too
    irregular on a loaded host: about half of the boots with two guests running on two
    CPUs marked the TSC unstable and then hung before init (no output at all). Telling it
    the rate (`tsc_early_khz`) made every boot of the same test succeed. Empty when the
    rate cannot be measured.
    """
    khz = _host_tsc_khz()
    return f"tsc_early_khz={khz}" if khz else ""


# --- command line --------------------------------------------------------------------------


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    return path.stat().st_size


def main() -> int:
    """Build the kernel, its modules and the python image into build_dir(); one line per
    asset with its size. Exit 1 with one line on failure (`make vm`)."""
    out = build_dir()
    try:
        started = time.monotonic()
        vmlinux, modules = ensure_kernel(out)
        kernel_s = time.monotonic() - started
        started = time.monotonic()
        python = ensure_python(out)
        python_s = time.monotonic() - started
    except (AssetError, OSError, subprocess.SubprocessError) as e:
        print(f"wisp vm assets: {e}", file=sys.stderr)
        return 1
    count = len((modules / "order").read_text().split())
    print(f"{vmlinux}: {_size(vmlinux) / 2**20:.1f} MiB ({kernel_s:.1f}s)")
    print(f"{modules}: {count} modules, {_size(modules) / 2**20:.1f} MiB")
    print(f"{python}: {_size(python) / 2**20:.1f} MiB ({python_s:.1f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
