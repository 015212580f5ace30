"""The filesystem API (contract §4) end to end: official `sprites-py` SDK and raw httpx ->
real uvicorn on loopback -> `wisp.api.fs_routes` -> `wisp.filesystem` -> the confined fs
agent -> a real directory tree standing in for a sprite's root filesystem.

Escape attempts (absolute and relative symlinks, `..`, root-owned files, ids outside the
sprite's range) must fail, and the host files behind them must stay byte-for-byte untouched.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from sprites import SpritesClient
from sprites.exceptions import (
    DirectoryNotEmptyError,
    FileNotFoundError_,
    FilesystemError,
    IsADirectoryError_,
    PermissionError_,
)
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

import wisp.api.fs_routes as fs_routes_module
import wisp.filesystem as filesystem_module
from wisp import fs_agent
from wisp.api.fs_routes import fs_routes
from wisp.errors import FS_STATUS, SpriteNotFound, WispError
from wisp.filesystem import MAX_WRITE_BYTES, Filesystem, resolve_path
from wisp.runtime.base import SpriteHandle

TOKEN = "test-org/1/secret"
ROOT = 100000  # host uid of root inside the sprite
USER = 101000  # host uid of the sprite user (1000)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chroot, user namespaces)")


# ---------------------------------------------------------------------------------- server

class Server:
    """A real uvicorn server on a loopback port serving only the fs routes."""

    def __init__(self, fs: Filesystem) -> None:
        self.handles: dict[str, SpriteHandle] = {}

        async def resolve(name: str) -> SpriteHandle:
            try:
                return self.handles[name]
            except KeyError:
                raise SpriteNotFound(name) from None

        async def wisp_error(request: Request, exc: Exception) -> Response:
            assert isinstance(exc, WispError)
            return JSONResponse(exc.body(), status_code=exc.status)

        self.app = Starlette(routes=fs_routes(resolve, fs),
                             exception_handlers={WispError: wisp_error})
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning",
                                                    lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


@pytest.fixture(scope="module")
def agent_fs() -> Iterator[Filesystem]:
    fs = Filesystem(require_mount=False)
    yield fs
    pid = fs.agent_pid
    fs.close()
    if pid is not None:
        assert not Path(f"/proc/{pid}").exists(), "fs agent outlived close()"


@pytest.fixture(scope="module")
def server(agent_fs: Filesystem) -> Iterator[Server]:
    with Server(agent_fs) as srv:
        yield srv


# --------------------------------------------------------------------------------- rootfs

def _chown(path: Path, uid: int, gid: int | None = None) -> None:
    os.lchown(path, uid, uid if gid is None else gid)


def _mkdir(path: Path, uid: int, mode: int = 0o755) -> Path:
    path.mkdir()
    os.chmod(path, mode)
    _chown(path, uid)
    return path


def _file(path: Path, content: bytes, uid: int, mode: int = 0o644) -> Path:
    path.write_bytes(content)
    os.chmod(path, mode)
    _chown(path, uid)
    return path


class Sprite:
    """A fake sprite root on the host plus the SDK and httpx clients that reach it."""

    def __init__(self, server: Server, base: Path, name: str) -> None:
        self.name = name
        self.base = base
        self.root = base / "rootfs"
        self.host = base / "host"  # stands for the host: never reachable from the sprite
        r = self.root
        _mkdir(r, ROOT)
        etc = _mkdir(r / "etc", ROOT)
        _file(etc / "passwd", b"root:x:0:0:root:/root:/bin/sh\n"
              b"www-data:x:33:33:www-data:/var/www:/usr/sbin/nologin\n"
              b"sprite:x:1000:1000::/home/sprite:/bin/bash\n", ROOT)
        _file(etc / "group", b"root:x:0:\nwww-data:x:33:\nsprite:x:1000:\n", ROOT)
        _file(etc / "shadow", b"sprite-shadow\n", ROOT, 0o600)
        _mkdir(r / "home", ROOT)
        home = _mkdir(r / "home" / "sprite", USER)
        _mkdir(r / "opt", ROOT)
        _file(r / "root-only.txt", b"root secret\n", ROOT, 0o600)
        self.host.mkdir()
        self.host_secret = self.host / "secret.txt"
        self.host_secret.write_bytes(b"HOST SECRET\n")
        os.chmod(self.host_secret, 0o666)  # even world-writable: the sprite must not reach it
        for link, target in [("escape-shadow", "/../../../etc/shadow"),
                             ("escape-host", str(self.host_secret)),
                             ("up", "../../..")]:
            os.symlink(target, home / link)
            _chown(home / link, USER)
        self.handle = SpriteHandle(name=name, rootfs=r, agent_socket=base / "x")
        server.handles[name] = self.handle
        self.url = f"{server.url}/v1/sprites/{name}/fs"
        self.sdk = SpritesClient(TOKEN, base_url=server.url)
        self.http = httpx.Client(headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
        self.guarded = {p: _fingerprint(p) for p in
                        (self.host_secret, Path("/etc/shadow"), Path("/etc/passwd"))}

    def fs(self, working_dir: str = "/") -> Any:
        return self.sdk.sprite(self.name).filesystem(working_dir)

    def get(self, op: str, **params: Any) -> httpx.Response:
        return self.http.get(f"{self.url}/{op}", params=params)

    def post(self, op: str, body: Any) -> httpx.Response:
        return self.http.post(f"{self.url}/{op}", json=body)

    def put(self, data: bytes, **params: Any) -> httpx.Response:
        return self.http.put(f"{self.url}/write", params=params, content=data)

    def delete(self, **params: Any) -> httpx.Response:
        return self.http.delete(f"{self.url}/delete", params=params)

    def assert_host_untouched(self) -> None:
        for path, before in self.guarded.items():
            assert _fingerprint(path) == before, f"host file {path} changed"

    def close(self) -> None:
        self.http.close()
        self.sdk.close()


def _fingerprint(path: Path) -> tuple[str, int, int, int, int]:
    st = path.stat()
    return (hashlib.sha256(path.read_bytes()).hexdigest(), st.st_mtime_ns, st.st_uid,
            st.st_gid, st.st_mode)


@pytest.fixture
def sprite(server: Server, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Sprite]:
    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:60]
    s = Sprite(server, tmp_path, name)
    yield s
    s.close()
    s.assert_host_untouched()
    del server.handles[name]


def _owner(path: Path) -> tuple[int, int]:
    st = os.lstat(path)
    return st.st_uid, st.st_gid


def _err(resp: httpx.Response) -> tuple[int, str]:
    body = resp.json()
    assert set(body) <= {"error", "code", "path"} and isinstance(body["error"], str)
    return resp.status_code, body["code"]


# ------------------------------------------------------------------------- basic behaviour

def test_exported_members() -> None:
    """The modules' public surfaces are exactly what other modules are told to use."""
    assert filesystem_module.__all__ == ["Filesystem", "FileStream", "resolve_path",
                                         "MAX_WRITE_BYTES", "AGENT_PATH"]
    assert fs_routes_module.__all__ == ["fs_routes", "default_filesystem"]
    assert fs_agent.__all__ == ["ERRNO_CODES", "MAX_FRAME", "main"]


def test_every_errno_maps_to_a_contract_code() -> None:
    """The agent's errno table only produces codes the contract (and FsError) knows."""
    assert set(fs_agent.ERRNO_CODES.values()) <= set(FS_STATUS)


def test_resolve_path_is_lexical_and_stays_absolute() -> None:
    """Relative paths join workingDir (default /home/sprite); `..` never climbs above `/`."""
    assert resolve_path("a/b", "/app", "/home/sprite") == "/app/a/b"
    assert resolve_path("a", None, "/home/sprite") == "/home/sprite/a"
    assert resolve_path("a", "", "/home/sprite") == "/home/sprite/a"
    assert resolve_path("../../../../etc", "/home/sprite", "/x") == "/etc"
    assert resolve_path("//x//y/", "/", "/") == "/x/y"
    assert resolve_path(".", "/app/", "/") == "/app"
    assert resolve_path("", "app", "/") == "/app"


def test_write_then_read_with_the_sdk(sprite: Sprite) -> None:
    """SDK write_text/read_text round-trip; the file lands in the sprite's root as the sprite
    user (host uid 101000) with the requested mode."""
    fs = sprite.fs()
    (fs / "home/sprite/hello.txt").write_text("hello sprite")
    assert (fs / "home/sprite/hello.txt").read_text() == "hello sprite"
    host = sprite.root / "home/sprite/hello.txt"
    assert host.read_text() == "hello sprite"
    assert _owner(host) == (USER, USER)
    assert stat.S_IMODE(host.stat().st_mode) == 0o644
    (fs / "home/sprite/hello.txt").write_bytes(b"secret", mode=0o600)
    assert stat.S_IMODE(host.stat().st_mode) == 0o600
    st = (fs / "home/sprite/hello.txt").stat()
    assert (st.name, st.path, st.size, st.mode, st.is_dir) == \
        ("hello.txt", "/home/sprite/hello.txt", 6, "0600", False)


def test_write_reply_and_mkdir_parents(sprite: Sprite) -> None:
    """The write reply is `{"path","size","mode"}`; mkdirParents (and its alias mkdir)
    creates every parent, without it only the immediate parent is made."""
    r = sprite.put(b"12345", path="a/b/c.txt", workingDir="/home/sprite", mode="0640",
                   mkdirParents="true")
    assert r.status_code == 200
    assert r.json() == {"path": "/home/sprite/a/b/c.txt", "size": 5, "mode": "0640"}
    r = sprite.put(b"", path="/home/sprite/x/y/z.txt", mkdir="true")
    assert r.status_code == 200 and (sprite.root / "home/sprite/x/y/z.txt").exists()
    r = sprite.put(b"", path="/home/sprite/p/q/r.txt", mkdirParents="false")
    assert _err(r) == (404, "ENOENT")
    r = sprite.put(b"", path="/home/sprite/p/.keep", mkdirParents="false")
    assert r.status_code == 200 and (sprite.root / "home/sprite/p").is_dir()
    assert _owner(sprite.root / "home/sprite/a/b") == (USER, USER)
    r = sprite.put(b"", path="/home/sprite/a")
    assert _err(r) == (400, "EISDIR")
    r = sprite.put(b"", path="/home/sprite/a/b/c.txt/d", mkdirParents="true")
    assert _err(r) == (400, "ENOTDIR")


def test_sdk_mkdir_listdir_and_stat(sprite: Sprite) -> None:
    """The SDK's mkdir emulation (.keep write + delete), listdir, exists/is_dir/is_file,
    including the SDK quirk the contract says not to fix server-side."""
    fs = sprite.fs("/home/sprite")
    (fs / "proj").mkdir()
    (fs / "deep/er/est").mkdir(parents=True)
    (fs / "proj/b.txt").write_text("b")
    (fs / "proj/a.txt").write_text("a")
    assert (fs / "proj").listdir() == ["a.txt", "b.txt"]
    assert (fs / "deep/er/est").listdir() == []
    assert (fs / "proj").exists() and (fs / "proj/a.txt").is_file()
    # the contract's known SDK quirk (§4.2): stat of a directory is its first child's entry
    assert not (fs / "proj").is_dir() and (fs / "deep/er").is_dir()
    assert not (fs / "missing").exists()
    with pytest.raises(FileNotFoundError_):
        (fs / "missing").stat()
    with pytest.raises(FileNotFoundError_):
        (fs / "nope/x").mkdir()


def test_list_entries_and_default_working_dir(sprite: Sprite) -> None:
    """list answers the contract's entry objects; a missing workingDir means /home/sprite;
    a symlink is listed as itself; 404 bodies carry ENOENT and the path."""
    (sprite.root / "home/sprite/d").mkdir()
    _file(sprite.root / "home/sprite/f.txt", b"abc", USER, 0o640)
    r = sprite.get("list", path=".")
    assert r.status_code == 200
    body = r.json()
    assert body["path"] == "/home/sprite" and body["count"] == len(body["entries"]) == 5
    by_name = {e["name"]: e for e in body["entries"]}
    assert [e["name"] for e in body["entries"]] == sorted(by_name)
    f = by_name["f.txt"]
    assert f == {"name": "f.txt", "path": "/home/sprite/f.txt", "type": "file", "size": 3,
                 "mode": "0640", "modTime": f["modTime"], "isDir": False}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", f["modTime"])
    assert by_name["d"]["type"] == "directory" and by_name["d"]["isDir"] is True
    assert by_name["escape-host"]["type"] == "symlink"
    r = sprite.get("list", path="f.txt", workingDir="/home/sprite")
    assert r.json()["entries"] == [f] and r.json()["count"] == 1
    r = sprite.get("list", path="/home/sprite/d")
    assert r.json() == {"path": "/home/sprite/d", "entries": [], "count": 0}
    r = sprite.get("list", path="/nope")
    assert _err(r) == (404, "ENOENT") and r.json()["path"] == "/nope"


def test_recursive_list_and_pattern(sprite: Sprite) -> None:
    """recursive lists descendants named relative to the path (symlinks not followed);
    pattern filters by name, or by relative path when it contains a slash."""
    fs = sprite.fs("/home/sprite")
    for p in ("src/main.py", "src/lib/util.py", "src/lib/data.json", "README.md"):
        (fs / "tree" / p).write_text(p)
    r = sprite.get("list", path="/home/sprite/tree", recursive="true")
    names = [e["name"] for e in r.json()["entries"]]
    assert names == ["README.md", "src", "src/lib", "src/lib/data.json", "src/lib/util.py",
                     "src/main.py"]
    assert r.json()["entries"][3]["path"] == "/home/sprite/tree/src/lib/data.json"
    r = sprite.get("list", path="/home/sprite/tree", recursive="true", pattern="*.py")
    assert [e["name"] for e in r.json()["entries"]] == ["src/lib/util.py", "src/main.py"]
    r = sprite.get("list", path="/home/sprite/tree", recursive="true", pattern="src/*.py")
    assert [e["name"] for e in r.json()["entries"]] == ["src/lib/util.py", "src/main.py"]
    r = sprite.get("list", path="/home/sprite/tree", pattern="*.md")
    assert [e["name"] for e in r.json()["entries"]] == ["README.md"]
    r = sprite.get("list", path="/home/sprite", recursive="true")
    names = [e["name"] for e in r.json()["entries"]]
    assert "up" in names and not any(n.startswith("up/") for n in names)


def test_read_errors_map_to_sdk_exceptions(sprite: Sprite) -> None:
    """ENOENT -> 404, directory -> 400 EISDIR, unreadable -> 403 EACCES, as the SDK maps."""
    fs = sprite.fs()
    with pytest.raises(FileNotFoundError_):
        (fs / "nope").read_bytes()
    with pytest.raises(IsADirectoryError_):
        (fs / "home").read_bytes()
    with pytest.raises(PermissionError_):
        (fs / "root-only.txt").read_bytes()
    assert _err(sprite.get("read", path="/home")) == (400, "EISDIR")
    assert _err(sprite.get("read", path="/root-only.txt")) == (403, "EACCES")


def test_read_streams_large_files(sprite: Sprite) -> None:
    """A multi-MiB file streams back intact as application/octet-stream."""
    data = os.urandom(5 << 20)
    assert sprite.put(data, path="/home/sprite/big.bin").status_code == 200
    r = sprite.get("read", path="/home/sprite/big.bin")
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    assert r.content == data
    assert sprite.fs().path("/home/sprite/big.bin").read_bytes() == data


def test_write_over_16_mib_is_413(sprite: Sprite) -> None:
    """A body over 16 MiB is refused with 413 and an FS error body; nothing is created.
    Exactly 16 MiB is accepted."""
    r = sprite.put(b"\0" * (MAX_WRITE_BYTES + 1), path="/home/sprite/huge")
    assert r.status_code == 413 and r.json()["code"] == "EINVAL"
    assert not (sprite.root / "home/sprite/huge").exists()
    assert sprite.put(b"\0" * MAX_WRITE_BYTES, path="/home/sprite/huge").status_code == 200
    assert (sprite.root / "home/sprite/huge").stat().st_size == MAX_WRITE_BYTES


def test_delete(sprite: Sprite) -> None:
    """unlink/rmdir/rmtree through the SDK; the reply is 200 JSON; a non-empty directory
    needs recursive (400 ENOTEMPTY); the JSON-body form works; `/` is refused."""
    fs = sprite.fs("/home/sprite")
    (fs / "t/a/b.txt").write_text("x")
    (fs / "t/c.txt").write_text("x")
    (fs / "t/c.txt").unlink()
    (fs / "t/c.txt").unlink(missing_ok=True)
    with pytest.raises(FileNotFoundError_):
        (fs / "t/c.txt").unlink()
    with pytest.raises(DirectoryNotEmptyError):
        (fs / "t").rmdir()
    r = sprite.delete(path="t", workingDir="/home/sprite", recursive="true")
    assert r.status_code == 200 and r.json() == {"deleted": ["/home/sprite/t"], "count": 1}
    assert not (sprite.root / "home/sprite/t").exists()
    (fs / "j.txt").write_text("x")
    r = sprite.http.request("DELETE", f"{sprite.url}/delete",
                            json={"path": "j.txt", "workingDir": "/home/sprite"})
    assert r.status_code == 200 and not (sprite.root / "home/sprite/j.txt").exists()
    r = sprite.delete(path="/", recursive="true", asRoot="true")
    assert _err(r) == (403, "EPERM")
    r = sprite.delete(path="../../..", workingDir="/home", recursive="true", asRoot="true")
    assert _err(r) == (403, "EPERM")
    assert (sprite.root / "etc/passwd").exists()


def test_delete_a_symlink_removes_only_the_link(sprite: Sprite) -> None:
    """Deleting a symlink (even recursively) never touches what it points to."""
    r = sprite.delete(path="/home/sprite/up", recursive="true")
    assert r.status_code == 200
    r = sprite.delete(path="/home/sprite/escape-host", recursive="true")
    assert r.status_code == 200
    assert (sprite.root / "home/sprite").is_dir() and (sprite.root / "etc").is_dir()
    assert not os.path.lexists(sprite.root / "home/sprite/up")


def test_rename_and_replace(sprite: Sprite) -> None:
    """rename moves, replaces an existing file, answers {"source","dest"}; missing -> 404."""
    fs = sprite.fs("/home/sprite")
    (fs / "old.txt").write_text("v1")
    (fs / "other.txt").write_text("v2")
    (fs / "old.txt").rename("new.txt")
    assert (fs / "new.txt").read_text() == "v1" and not (fs / "old.txt").exists()
    (fs / "other.txt").replace(fs / "new.txt")
    assert (fs / "new.txt").read_text() == "v2"
    r = sprite.post("rename", {"source": "new.txt", "dest": "n2.txt",
                               "workingDir": "/home/sprite"})
    assert r.json() == {"source": "/home/sprite/new.txt", "dest": "/home/sprite/n2.txt"}
    assert _err(sprite.post("rename", {"source": "/nope", "dest": "/home/sprite/x"})) == \
        (404, "ENOENT")
    r = sprite.post("rename", {"source": "/home/sprite/n2.txt", "dest": "/etc/n2.txt"})
    assert _err(r) == (403, "EACCES")


def test_copy(sprite: Sprite) -> None:
    """copy of a file and of a tree (symlinks copied as links), the reply shape, EISDIR
    without recursive, preserveAttrs keeps mode and mtime, no copying a tree into itself."""
    fs = sprite.fs("/home/sprite")
    (fs / "src/a.txt").write_text("aaaaa")
    (fs / "src/sub/b.txt").write_bytes(b"bb", mode=0o600)
    os.symlink("a.txt", sprite.root / "home/sprite/src/link")
    _chown(sprite.root / "home/sprite/src/link", USER)
    r = sprite.post("copy", {"source": "src/a.txt", "dest": "a2.txt",
                             "workingDir": "/home/sprite"})
    assert r.json() == {"copied": [{"source": "/home/sprite/src/a.txt",
                                    "dest": "/home/sprite/a2.txt"}],
                        "count": 1, "totalBytes": 5}
    (fs / "src").copy_to("dst")
    d = sprite.root / "home/sprite/dst"
    assert (d / "a.txt").read_text() == "aaaaa" and (d / "sub/b.txt").read_bytes() == b"bb"
    assert os.readlink(d / "link") == "a.txt"
    assert stat.S_IMODE((d / "sub/b.txt").stat().st_mode) == 0o600
    assert _owner(d / "sub/b.txt") == (USER, USER)
    r = sprite.post("copy", {"source": "/home/sprite/src", "dest": "/home/sprite/d3"})
    assert _err(r) == (400, "EISDIR")
    r = sprite.post("copy", {"source": "/home/sprite/src", "dest": "/home/sprite/src/in",
                             "recursive": True})
    assert _err(r) == (400, "EINVAL")
    old = sprite.root / "home/sprite/src/a.txt"
    os.utime(old, (1_000_000_000, 1_000_000_000))
    os.chmod(old, 0o751)
    r = sprite.post("copy", {"source": "/home/sprite/src/a.txt", "dest": "/home/sprite/p.txt",
                             "preserveAttrs": True})
    assert r.status_code == 200
    p = (sprite.root / "home/sprite/p.txt").stat()
    assert p.st_mtime == 1_000_000_000 and stat.S_IMODE(p.st_mode) == 0o751
    r = sprite.post("copy", {"source": "/home/sprite/src/link",
                             "dest": "/home/sprite/src/a.txt"})
    assert _err(r) == (400, "EINVAL")  # same file: copying would truncate the source
    assert old.read_text() == "aaaaa"


def test_chmod(sprite: Sprite) -> None:
    """chmod via SDK and raw (recursive, reply shape); a root-owned file is EPERM."""
    fs = sprite.fs("/home/sprite")
    (fs / "s.sh").write_text("#!/bin/sh\n")
    (fs / "s.sh").chmod(0o755)
    assert stat.S_IMODE((sprite.root / "home/sprite/s.sh").stat().st_mode) == 0o755
    (fs / "r/x/y.txt").write_text("y")
    r = sprite.post("chmod", {"path": "r", "workingDir": "/home/sprite", "mode": "0700",
                              "recursive": True})
    assert r.status_code == 200
    assert r.json() == {"affected": [{"path": p, "mode": "0700"} for p in
                                     ("/home/sprite/r", "/home/sprite/r/x",
                                      "/home/sprite/r/x/y.txt")], "count": 3}
    assert _err(sprite.post("chmod", {"path": "/root-only.txt", "mode": "0777"})) == \
        (403, "EPERM")
    assert stat.S_IMODE((sprite.root / "root-only.txt").stat().st_mode) == 0o600


def test_chown_by_number_and_name(sprite: Sprite) -> None:
    """chown (JS-only endpoint): names come from the sprite's /etc/passwd and /etc/group;
    ids are the sprite's own; only asRoot may give files away; recursive works."""
    (sprite.fs("/home/sprite") / "own/in.txt").write_text("x")
    own = sprite.root / "home/sprite/own"
    r = sprite.post("chown", {"path": "own", "workingDir": "/home/sprite", "uid": "www-data",
                              "gid": "www-data", "recursive": True, "asRoot": True})
    assert r.status_code == 200
    assert r.json() == {"affected": [{"path": "/home/sprite/own", "uid": 33, "gid": 33},
                                     {"path": "/home/sprite/own/in.txt", "uid": 33,
                                      "gid": 33}], "count": 2}
    assert _owner(own) == _owner(own / "in.txt") == (ROOT + 33, ROOT + 33)
    r = sprite.post("chown", {"path": "/home/sprite/own", "uid": 1000, "gid": "1000",
                              "asRoot": True})
    assert r.status_code == 200 and _owner(own) == (USER, USER)
    r = sprite.post("chown", {"path": "/home/sprite/own", "uid": 0})
    assert _err(r) == (403, "EPERM") and _owner(own) == (USER, USER)
    r = sprite.post("chown", {"path": "/home/sprite/own", "uid": "nobody-here", "asRoot": True})
    assert _err(r) == (400, "EINVAL")
    r = sprite.post("chown", {"path": "/home/sprite/own", "gid": "sprite"})
    assert r.status_code == 200 and r.json()["affected"][0]["gid"] == 1000
    assert _err(sprite.post("chown", {"path": "/home/sprite/own"})) == (400, "EINVAL")


@pytest.mark.parametrize("method,op,params,body", [
    ("GET", "list", {"path": "/", "recursive": "maybe"}, None),
    ("GET", "list", {"path": "/", "asRoot": "2"}, None),
    ("GET", "list", {}, None),
    ("GET", "read", {"path": "/etc/passwd", "asRoot": "yesplease"}, None),
    ("PUT", "write", {"path": "/home/sprite/m", "mode": "0999"}, None),
    ("PUT", "write", {"path": "/home/sprite/m", "mode": "rwxr-xr-x"}, None),
    ("PUT", "write", {"path": "/home/sprite/m", "mode": "77777"}, None),
    ("PUT", "write", {"path": "/home/sprite/m", "mkdirParents": "sure"}, None),
    ("PUT", "write", {"path": "/home/sprite/m\x00x"}, None),
    ("DELETE", "delete", {"path": "/home/sprite/m", "recursive": "x"}, None),
    ("POST", "rename", {}, b"{not json"),
    ("POST", "rename", {}, b"[1, 2]"),
    ("POST", "rename", {}, b'{"source": 5, "dest": "/x"}'),
    ("POST", "copy", {}, b'{"source": "/a"}'),
    ("POST", "copy", {}, b'{"source": "/a", "dest": "/b", "recursive": "perhaps"}'),
    ("POST", "chmod", {}, b'{"path": "/home/sprite"}'),
    ("POST", "chmod", {}, b'{"path": "/home/sprite", "mode": "0o8"}'),
    ("POST", "chmod", {}, b'{"path": "/home/sprite", "mode": true}'),
    ("POST", "chown", {}, b'{"path": "/home/sprite", "uid": -1}'),
    ("POST", "chown", {}, b'{"path": "/home/sprite", "uid": "a:b"}'),
    ("POST", "chown", {}, b'{"path": "/home/sprite", "gid": [1]}'),
])
def test_bad_values_are_400_einval(sprite: Sprite, method: str, op: str,
                                   params: dict[str, str], body: bytes | None) -> None:
    """Malformed query values and bodies answer 400 with an EINVAL body, never a 500, and
    change nothing."""
    r = sprite.http.request(method, f"{sprite.url}/{op}", params=params, content=body,
                            headers={"Content-Type": "application/json"})
    assert _err(r) == (400, "EINVAL")
    assert not (sprite.root / "home/sprite/m").exists()


def test_special_files_are_refused_without_blocking(sprite: Sprite) -> None:
    """A FIFO is neither read nor written (which would block forever): 400 EINVAL at once."""
    fifo = sprite.root / "home/sprite/pipe"
    os.mkfifo(fifo)
    _chown(fifo, USER)
    start = time.monotonic()
    assert _err(sprite.get("read", path="/home/sprite/pipe")) == (400, "EINVAL")
    assert _err(sprite.put(b"x", path="/home/sprite/pipe")) == (400, "EINVAL")
    assert time.monotonic() - start < 5


# ------------------------------------------------------------------------ escape attempts

def test_absolute_symlink_resolves_inside_the_sprite(sprite: Sprite) -> None:
    """`/home/sprite/escape-shadow -> /../../../etc/shadow` is the sprite's own shadow:
    unreadable to the sprite user, and as root it is the sprite's content, not the host's."""
    assert _err(sprite.get("read", path="/home/sprite/escape-shadow")) == (403, "EACCES")
    r = sprite.get("read", path="/home/sprite/escape-shadow", asRoot="true")
    assert r.status_code == 200 and r.content == b"sprite-shadow\n"
    r = sprite.put(b"pwned", path="/home/sprite/escape-shadow")
    assert _err(r) == (403, "EACCES")
    assert (sprite.root / "etc/shadow").read_bytes() == b"sprite-shadow\n"


def test_symlink_to_a_host_path_never_reaches_the_host(sprite: Sprite) -> None:
    """A symlink naming a host path reads nothing from the host (404), and writing through
    it creates a file inside the sprite; the host file stays untouched."""
    assert _err(sprite.get("read", path="/home/sprite/escape-host")) == (404, "ENOENT")
    assert _err(sprite.get("read", path="/home/sprite/escape-host", asRoot="true")) == \
        (404, "ENOENT")
    r = sprite.post("copy", {"source": "/home/sprite/escape-host", "dest": "/home/sprite/c"})
    assert _err(r) == (404, "ENOENT")
    for as_root in ("false", "true"):  # the target's directory does not exist in the sprite
        r = sprite.put(b"pwned", path="/home/sprite/escape-host", mkdirParents="true",
                       asRoot=as_root)
        assert _err(r) == (404, "ENOENT")
    inside = sprite.root / str(sprite.host_secret).lstrip("/")
    r = sprite.put(b"", path=f"{sprite.host_secret.parent}/.keep", mkdirParents="true",
                   asRoot="true")
    assert r.status_code == 200
    r = sprite.put(b"pwned", path="/home/sprite/escape-host", asRoot="true")
    assert r.status_code == 200
    assert inside.read_bytes() == b"pwned"
    assert sprite.get("read", path="/home/sprite/escape-host").content == b"pwned"
    sprite.assert_host_untouched()


def test_dotdot_and_relative_symlinks_stay_inside(sprite: Sprite) -> None:
    """`..` in path or workingDir, and a relative symlink climbing `../../..`, all end at the
    sprite's `/`: the host file next to the rootfs is never read or written."""
    rel = "host/secret.txt"  # rootfs/../host/secret.txt is the host file
    for params in ({"path": f"../../../../{rel}", "workingDir": "/home/sprite"},
                   {"path": rel, "workingDir": "/../../.."},
                   {"path": f"/home/sprite/up/{rel}"},
                   {"path": f"/home/sprite/up/../../{rel}"}):
        assert _err(sprite.get("read", **params)) == (404, "ENOENT"), params
        assert _err(sprite.get("list", **params)) == (404, "ENOENT"), params
    r = sprite.get("list", path="/home/sprite/up")  # a symlink to a directory lists it
    assert {e["name"] for e in r.json()["entries"]} == {"etc", "home", "opt", "root-only.txt"}
    r = sprite.put(b"pwned", path=f"/home/sprite/up/{rel}", mkdirParents="true")
    assert _err(r) == (403, "EACCES")
    r = sprite.put(b"pwned", path=f"/home/sprite/up/{rel}", mkdirParents="true", asRoot="true")
    assert r.status_code == 200
    assert (sprite.root / rel).read_bytes() == b"pwned"  # inside the sprite, owned by its root
    assert _owner(sprite.root / rel) == (ROOT, ROOT)
    r = sprite.delete(path=f"/home/sprite/up/{rel}", asRoot="true")
    assert r.status_code == 200
    r = sprite.post("rename", {"source": "/home/sprite/up/../../../../etc/passwd",
                               "dest": "/home/sprite/stolen"})
    assert _err(r) == (403, "EACCES")  # the sprite's /etc is root's, nothing moved
    sprite.assert_host_untouched()


def test_root_owned_files_need_as_root(sprite: Sprite) -> None:
    """The sprite user cannot overwrite, delete or chmod root's files (403), nor create in
    root's directories; with asRoot it can, and ownership stays with the sprite's root."""
    target = sprite.root / "root-only.txt"
    assert _err(sprite.put(b"pwned", path="/root-only.txt")) == (403, "EACCES")
    assert _err(sprite.delete(path="/root-only.txt")) == (403, "EACCES")
    assert _err(sprite.put(b"x", path="/opt/new.txt")) == (403, "EACCES")
    assert target.read_bytes() == b"root secret\n"
    r = sprite.put(b"by root", path="/root-only.txt", asRoot="true")
    assert r.status_code == 200 and r.json()["mode"] == "0600"
    assert target.read_bytes() == b"by root" and _owner(target) == (ROOT, ROOT)
    r = sprite.put(b"x", path="/opt/new.txt", asRoot="true")
    assert r.status_code == 200 and _owner(sprite.root / "opt/new.txt") == (ROOT, ROOT)
    r = sprite.get("read", path="/home/sprite/../../root-only.txt", asRoot="true")
    assert r.content == b"by root"


def test_as_root_is_confined_to_the_sprite_ids(sprite: Sprite) -> None:
    """asRoot is root of the sprite's user namespace, not of the host: a file owned by a host
    id outside the sprite's range stays unreadable and unwritable, and nothing can be given
    to an id outside the range."""
    foreign = _file(sprite.root / "host-owned.txt", b"host root's\n", 0, 0o600)
    assert _err(sprite.get("read", path="/host-owned.txt", asRoot="true")) == (403, "EACCES")
    assert _err(sprite.put(b"x", path="/host-owned.txt", asRoot="true")) == (403, "EACCES")
    assert _err(sprite.post("chmod", {"path": "/host-owned.txt", "mode": "0644",
                                      "asRoot": True})) == (403, "EPERM")
    assert foreign.read_bytes() == b"host root's\n" and _owner(foreign) == (0, 0)
    mine = sprite.root / "home/sprite/mine.txt"
    _file(mine, b"x", USER)
    for uid in (65536, 70000, 4294967294):
        r = sprite.post("chown", {"path": "/home/sprite/mine.txt", "uid": uid, "asRoot": True})
        assert _err(r) == (400, "EINVAL"), uid
    assert _owner(mine) == (USER, USER)


# ---------------------------------------------------------------------- agent lifecycle

def test_plain_directory_is_refused_when_a_mount_is_required(tmp_path: Path) -> None:
    """By default the agent refuses a sprite root that is not a mount point (a stopped
    sprite's empty mount directory), with 500 EIO, and creates nothing there. The refusal
    arrives whole even when the request body is still being sent (it used to be lost as
    "the fs agent ended without a reply" when the agent closed with the body unread)."""
    root = _mkdir(tmp_path / "rootfs", ROOT)
    fs = Filesystem()
    srv = Server(fs)
    srv.handles["plain"] = SpriteHandle(name="plain", rootfs=root, agent_socket=tmp_path / "x")
    try:
        with srv, httpx.Client(timeout=30) as http:
            for size in (1, 4 << 20):
                r = http.put(f"{srv.url}/v1/sprites/plain/fs/write",
                             params={"path": "/x", "asRoot": "true"}, content=b"x" * size)
                assert _err(r) == (500, "EIO") and "not mounted" in r.json()["error"], size
    finally:
        fs.close()
    assert list(root.iterdir()) == []


def test_overlay_root_and_rename_of_a_lower_directory(tmp_path: Path) -> None:
    """On a real overlay mount (what a sprite's root is) the default, mount-requiring
    Filesystem works, and renaming a directory from the lower layer (EXDEV from overlayfs)
    falls back to copy + delete like `mv`."""
    lower, upper, work, merged = (tmp_path / n for n in ("lower", "upper", "work", "merged"))
    for d in (lower, upper, work, merged):
        d.mkdir()
    _chown(lower, ROOT)
    _chown(upper, ROOT)
    _mkdir(lower / "home", ROOT)
    _mkdir(lower / "home/sprite", USER)
    _mkdir(lower / "home/sprite/proj", USER)
    _file(lower / "home/sprite/proj/f.txt", b"lower data", USER, 0o640)
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={lower},upperdir={upper},workdir={work},redirect_dir=off",
                    str(merged)], check=True, timeout=30)
    fs = Filesystem()
    try:
        srv = Server(fs)
        srv.handles["ov"] = SpriteHandle(name="ov", rootfs=merged, agent_socket=tmp_path / "x")
        with srv:
            client = SpritesClient(TOKEN, base_url=srv.url)
            home = client.sprite("ov").filesystem("/home/sprite")
            (home / "proj").rename("moved")
            assert (home / "moved/f.txt").read_text() == "lower data"
            assert not (home / "proj").exists()
            st = (merged / "home/sprite/moved/f.txt").stat()
            assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (USER, 0o640)
            client.close()
    finally:
        fs.close()
        subprocess.run(["umount", str(merged)], check=True, timeout=30)
    assert (lower / "home/sprite/proj/f.txt").read_bytes() == b"lower data"


def test_agent_restarts_after_it_dies(tmp_path: Path) -> None:
    """If the fork server is killed, the next operation starts a new one; close() ends it."""
    root = _mkdir(tmp_path / "rootfs", ROOT)
    handle = SpriteHandle(name="r", rootfs=root, agent_socket=tmp_path / "x")
    fs = Filesystem(require_mount=False)

    async def probe() -> dict[str, Any]:
        return await fs.list(handle, "/")

    try:
        assert asyncio.run(probe())["count"] == 0
        first = fs.agent_pid
        assert first is not None
        os.kill(first, 9)
        deadline = time.monotonic() + 5
        while fs.agent_pid is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert asyncio.run(probe())["count"] == 0
        second = fs.agent_pid
        assert second not in (None, first)
    finally:
        fs.close()
    assert not Path(f"/proc/{second}").exists()


def test_unknown_sprite_is_not_an_fs_error(server: Server) -> None:
    """`resolve` errors propagate to the app's WispError handler; the routes shape only
    FsError themselves."""
    with httpx.Client(timeout=30) as http:
        r = http.get(f"{server.url}/v1/sprites/ghost/fs/list", params={"path": "/"})
    assert r.status_code == 404 and r.json()["error"] == "sprite_not_found"


def test_sdk_error_messages_are_go_style(sprite: Sprite) -> None:
    """Error text reads `op path: reason` (what the SDKs substring-match on)."""
    with pytest.raises(FilesystemError):
        sprite.fs().path("/nope").read_bytes()
    r = sprite.get("read", path="/nope")
    assert r.json() == {"error": "open /nope: no such file or directory", "code": "ENOENT",
                        "path": "/nope"}


def test_worker_identity_and_capabilities(sprite: Sprite, agent_fs: Filesystem) -> None:
    """The worker is the sprite user with no capabilities at all, or (asRoot) the sprite's
    root with only the five file capabilities; both have no_new_privs, no path-based
    importer, and see the sprite's root as `/`."""
    user = asyncio.run(agent_fs.identity(sprite.handle))
    assert (user["uid"], user["gid"], user["groups"]) == ([1000] * 3, [1000] * 3, [1000])
    assert user["capEffective"] == user["capPermitted"] == user["capBounding"] == 0
    root = asyncio.run(agent_fs.identity(sprite.handle, as_root=True))
    assert (root["uid"], root["gid"], root["groups"]) == ([0] * 3, [0] * 3, [0])
    file_caps = 0b11111  # chown, dac_override, dac_read_search, fowner, fsetid
    assert root["capEffective"] == root["capPermitted"] == root["capBounding"] == file_caps
    for ident in (user, root):
        assert ident["capInheritable"] == 0 and ident["noNewPrivs"] is True
        assert ident["importers"] == ["BuiltinImporter", "FrozenImporter"]
        assert ident["root"] == ["etc", "home", "opt", "root-only.txt"]


def test_agent_ends_when_its_server_is_killed(tmp_path: Path) -> None:
    """The fork server needs no cleanup from a crashed server: SIGKILL of the process that
    started it closes the control socket and the agent exits by itself."""
    root = _mkdir(tmp_path / "rootfs", ROOT)
    script = (
        "import asyncio, sys, time\n"
        "from pathlib import Path\n"
        "from wisp.filesystem import Filesystem\n"
        "from wisp.runtime.base import SpriteHandle\n"
        f"h = SpriteHandle(name='k', rootfs=Path({str(root)!r}), agent_socket=Path('/x'))\n"
        "fs = Filesystem(require_mount=False)\n"
        "asyncio.run(fs.list(h, '/'))\n"
        "print(fs.agent_pid, flush=True)\n"
        "time.sleep(60)\n")
    repo = Path(filesystem_module.__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    with subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                          env=env) as proc:
        try:
            assert proc.stdout is not None
            agent = int(proc.stdout.readline())
        finally:
            proc.kill()
            proc.wait(timeout=10)
    deadline = time.monotonic() + 10
    while _alive(agent):
        assert time.monotonic() < deadline, "fs agent survived its server"
        time.sleep(0.02)


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper that is not ours counts as ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"
