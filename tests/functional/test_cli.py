"""The `wisp` CLI end to end against the real server, run as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.framework.server import REPO, WispServer


def wisp(server: WispServer, *args: str, cwd: Path | None = None,
         input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WISP_")}
    env.update(WISP_API=server.url, WISP_TOKEN=server.token, PYTHONPATH=str(REPO),
               XDG_CONFIG_HOME=str(cwd or REPO / ".no-config"))
    return subprocess.run([sys.executable, "-m", "wisp.cli", *args], cwd=cwd or REPO, env=env,
                          input=input, capture_output=True, timeout=120)


@pytest.fixture
def cli_sprite(server: WispServer):  # type: ignore[no-untyped-def]
    name = f"cli-{os.getpid() % 10000}-{os.urandom(2).hex()}"
    r = wisp(server, "create", name)
    assert r.returncode == 0, r.stderr
    yield name
    wisp(server, "destroy", name, "--yes")


def test_create_list_show_destroy(server: WispServer, cli_sprite: str) -> None:
    """create → list (table and --json) → show → destroy → show fails with exit 1."""
    r = wisp(server, "list")
    assert r.returncode == 0 and cli_sprite in r.stdout.decode()
    listed = json.loads(wisp(server, "list", "--json").stdout)
    assert cli_sprite in [s["name"] for s in listed]
    shown = json.loads(wisp(server, "show", cli_sprite, "--json").stdout)
    assert shown["name"] == cli_sprite
    assert wisp(server, "destroy", cli_sprite, "--yes").returncode == 0
    r = wisp(server, "show", cli_sprite)
    assert r.returncode == 1 and b"not found" in r.stderr


def test_exec_streams_and_exit_code(server: WispServer, cli_sprite: str) -> None:
    """exec forwards stdin, keeps stdout and stderr apart and exits with the remote code."""
    r = wisp(server, "exec", "-s", cli_sprite, "--", "sh", "-c", "cat; echo err >&2; exit 3",
             input=b"piped input\n")
    assert r.returncode == 3
    assert r.stdout == b"piped input\n" and r.stderr == b"err\n"


def test_use_checkpoint_restore_fork(server: WispServer, cli_sprite: str, tmp_path: Path) -> None:
    """`use` selects the sprite for a directory; checkpoint, restore and fork work from it."""
    assert wisp(server, "use", cli_sprite, cwd=tmp_path).returncode == 0
    assert wisp(server, "exec", "--", "sh", "-c", "echo one > /home/sprite/f",
                cwd=tmp_path).returncode == 0
    r = wisp(server, "checkpoint", "create", "--comment", "cli", cwd=tmp_path)
    assert r.returncode == 0 and b"v1" in r.stdout, r.stderr
    cps = json.loads(wisp(server, "checkpoint", "list", "--json", cwd=tmp_path).stdout)
    assert [c["id"] for c in cps] == ["v1", "v0"]
    wisp(server, "exec", "--", "sh", "-c", "echo two > /home/sprite/f", cwd=tmp_path)
    assert wisp(server, "restore", "v1", cwd=tmp_path).returncode == 0
    r = wisp(server, "exec", "--", "cat", "/home/sprite/f", cwd=tmp_path)
    assert r.stdout == b"one\n"
    fork = f"{cli_sprite}-f"
    try:
        assert wisp(server, "fork", cli_sprite, fork, "--checkpoint", "v0").returncode == 0
        r = wisp(server, "exec", "-s", fork, "--", "ls", "/home/sprite")
        assert r.returncode == 0 and r.stdout == b""
    finally:
        wisp(server, "destroy", fork, "--yes")
    assert wisp(server, "checkpoint", "delete", "v1", cwd=tmp_path).returncode == 1  # in use


def test_bad_token_is_an_error(server: WispServer) -> None:
    """A wrong token is reported as an error with exit code 1, not a traceback."""
    env_server = WispServer.__new__(WispServer)
    env_server.__dict__.update(server.__dict__, token="wrong")
    r = wisp(env_server, "list")
    assert r.returncode == 1 and b"error:" in r.stderr and b"Traceback" not in r.stderr


def test_restart_ends_processes_and_keeps_disk(server: WispServer, cli_sprite: str) -> None:
    """`wisp restart` (POST /v1/sprites/{name}/restart) ends every process in the sprite,
    keeps its disk, and the sprite runs commands again right after; `-s` works too."""
    r = wisp(server, "exec", "-s", cli_sprite, "--", "sh", "-c",
             "echo kept > /home/sprite/f; setsid sleep 1000 </dev/null >/dev/null 2>&1 &")
    assert r.returncode == 0, r.stderr
    alive = wisp(server, "exec", "-s", cli_sprite, "--", "sh", "-c", "pgrep -x sleep || ps")
    assert b"sleep" in alive.stdout or alive.stdout.strip().isdigit(), alive.stdout
    r = wisp(server, "restart", cli_sprite, "--json")
    assert r.returncode == 0, r.stderr
    reply = json.loads(r.stdout)
    assert reply["sprite_name"] == cli_sprite and isinstance(reply["machine_id"], str)
    r = wisp(server, "exec", "-s", cli_sprite, "--", "sh", "-c",
             "cat /home/sprite/f; ps -o comm | grep -cx sleep")
    assert r.returncode == 1 and r.stdout == b"kept\n0\n", (r.stdout, r.stderr)
    r = wisp(server, "restart", "-s", cli_sprite)
    assert r.returncode == 0 and cli_sprite.encode() in r.stdout, r.stderr


def _cli_env(config_home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WISP_")}
    env.update(HOME=str(config_home), XDG_CONFIG_HOME=str(config_home / "config"),
               PYTHONPATH=str(REPO), **extra)
    return env


def test_second_serve_keeps_the_first_as_current(leak_check: Path, tmp_path: Path) -> None:
    """Two `wisp serve` on two data dirs both register a context in client.json; the
    second does not take "current" from the first, the CLI reaches each one by name, and
    after the second stops the CLI (no flags) still reaches the first. The first server's
    printed "Try:" command works exactly as printed."""
    home = tmp_path / "home"
    env = {"WISP_NO_CLIENT_CONFIG": "", "HOME": str(home),
           "XDG_CONFIG_HOME": str(home / "config")}
    first = WispServer(leak_check / "ctx-first", extra_env=env)
    second = WispServer(leak_check / "ctx-second", extra_env=env)
    first.start()
    try:
        second.start()
        try:
            saved = json.loads((home / "config" / "wisp" / "client.json").read_text())
            assert saved["current"] == "ctx-first"
            assert {n: c["api"] for n, c in saved["contexts"].items()} == {
                "ctx-first": first.url, "ctx-second": second.url}
            cli_env = _cli_env(home)

            def wisp_ctx(*args: str) -> subprocess.CompletedProcess[bytes]:
                return subprocess.run([sys.executable, "-m", "wisp.cli", *args], env=cli_env,
                                      cwd=tmp_path, capture_output=True, timeout=120)

            assert wisp_ctx("create", "on-second", "--context", "ctx-second").returncode == 2
            r = wisp_ctx("--context", "ctx-second", "create", "on-second")
            assert r.returncode == 0, r.stderr
            assert b"on-second" not in wisp_ctx("list").stdout
        finally:
            second.stop()
        r = wisp_ctx("list")
        assert r.returncode == 0, r.stderr
        r = wisp_ctx("--context", "ctx-second", "list")
        assert r.returncode == 1 and r.stderr.startswith(b"error: cannot reach"), r.stderr
        banner = first.log.read_text()
        try_line = next(line for line in banner.splitlines() if line.startswith("Try:"))
        r = subprocess.run(["bash", "-c", try_line.removeprefix("Try:").strip()], env=cli_env,
                           cwd=tmp_path, capture_output=True, timeout=120)
        assert r.returncode == 0 and r.stdout.startswith(b"created sprite hello\nLinux"), r
    finally:
        first.stop()


def test_policy_verbs(server: WispServer, cli_sprite: str, tmp_path: Path) -> None:
    """policy allow / deny edit the rules one name at a time; set takes a file or stdin;
    get shows them (and --json the contract's body); clear opens egress again."""
    assert b"egress is open" in wisp(server, "policy", "get", "-s", cli_sprite).stdout
    r = wisp(server, "policy", "allow", "-s", cli_sprite, "web.test", "*.web.test")
    assert r.returncode == 0, r.stderr
    assert wisp(server, "policy", "deny", "-s", cli_sprite, "web.test").returncode == 0
    got = json.loads(wisp(server, "policy", "get", "-s", cli_sprite, "--json").stdout)
    assert got == {"rules": [{"domain": "*.web.test", "action": "allow"},
                             {"domain": "web.test", "action": "deny"}]}
    text = wisp(server, "policy", "get", "-s", cli_sprite).stdout.decode()
    assert "deny   web.test" in text and "allow  *.web.test" in text
    (tmp_path / "p.json").write_text('{"rules": [{"include": "defaults"}]}')
    assert wisp(server, "policy", "set", "-s", cli_sprite, str(tmp_path / "p.json")
                ).returncode == 0
    assert b"include defaults" in wisp(server, "policy", "get", "-s", cli_sprite).stdout
    r = wisp(server, "policy", "set", "-s", cli_sprite, input=b'[{"domain": "a..b"}]')
    assert r.returncode == 1 and b"rules[0]" in r.stderr
    assert wisp(server, "policy", "clear", "-s", cli_sprite).returncode == 0
    assert json.loads(wisp(server, "policy", "get", "-s", cli_sprite, "--json").stdout) == \
        {"rules": []}
