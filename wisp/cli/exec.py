"""`wisp exec` and `wisp console`: run a command in a sprite over the exec WebSocket.

Framing is the contract's (docs/sprites-api.md §3.1): non-TTY binary frames carry a
stream byte (0 stdin, 1 stdout, 2 stderr, 3 exit, 4 stdin EOF); TTY frames are raw
terminal bytes, the exit arrives as `{"type":"exit"}` and/or the close code.

Threads: the main thread receives and writes output; one daemon thread reads local stdin
and sends it. Signal handlers (SIGWINCH resize, forwarded SIGINT/TERM/HUP/QUIT) never
call the connection themselves: a handler runs in the main thread at an arbitrary point,
possibly while it holds the connection's lock, so each one hands its message to a short
thread instead.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import IO, TYPE_CHECKING, Any, cast

import click

from wisp.cli.common import State, fail, resolve_sprite, sprite_option

if TYPE_CHECKING:
    from websockets.sync.client import ClientConnection

__all__ = ["exec_", "console", "run_session", "CONSOLE_CMD"]

STDIN, STDOUT, STDERR, EXIT, STDIN_EOF = 0, 1, 2, 3, 4
CHUNK = 32 * 1024
#: A login shell: bash when the image has it, else sh. `exec bash -l || exec sh` would not
#: work (a non-interactive sh exits when `exec` fails) and `2>/dev/null` on the bash line
#: would silence bash's prompt, which goes to stderr.
CONSOLE_CMD = ("sh", "-c",
               "if command -v bash >/dev/null 2>&1; then exec bash -l; else exec sh -l; fi")
#: After this many Ctrl-C presses that were forwarded to the sprite, give up locally.
FORCE_QUIT_AFTER = 3
#: Exit status when the connection drops before the command's exit code arrived (as ssh).
LOST_CONNECTION = 255


def _parse_env(ctx: click.Context, param: click.Parameter,
               values: tuple[str, ...]) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", ctx=ctx, param=param)
        env[key] = value
    return env


def _send_later(ws: ClientConnection, message: str | bytes) -> None:
    """Send from a fresh thread (safe to call from a signal handler)."""
    def run() -> None:
        try:
            ws.send(message)
        except Exception:  # the session is ending; the main loop reports that
            pass
    threading.Thread(target=run, daemon=True).start()


def _terminal_size(stream: IO[bytes]) -> tuple[int, int] | None:
    try:
        size = os.get_terminal_size(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return None
    return size.lines, size.columns


def _binary(stream: Any) -> IO[bytes]:
    return cast("IO[bytes]", getattr(stream, "buffer", stream))


def _isatty(stream: IO[Any]) -> bool:
    try:
        return stream.isatty()
    except (ValueError, AttributeError):
        return False


def _fileno(stream: IO[Any]) -> int | None:
    try:
        return stream.fileno()
    except (OSError, ValueError, AttributeError):
        return None


@contextmanager
def _raw_terminal(fd: int) -> Iterator[None]:
    """Put the local terminal in raw mode so keystrokes (Ctrl-C too) go to the sprite."""
    import termios
    import tty

    saved = termios.tcgetattr(fd)
    tty.setraw(fd)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


@contextmanager
def _signal_handlers(handlers: dict[int, Any]) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may install handlers; run without them
        return
    saved = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def _forward_signals(ws: ClientConnection) -> dict[int, Any]:
    presses = {"count": 0}

    def handler(signum: int, frame: Any) -> None:
        if signum == signal.SIGINT:
            presses["count"] += 1
            if presses["count"] >= FORCE_QUIT_AFTER:
                raise KeyboardInterrupt
        name = signal.Signals(signum).name.removeprefix("SIG")
        _send_later(ws, json.dumps({"type": "signal", "signal": name}))

    return {s: handler for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)}


def _resize_handler(ws: ClientConnection, out: IO[bytes]) -> dict[int, Any]:
    def handler(signum: int, frame: Any) -> None:
        size = _terminal_size(out)
        if size is not None:
            rows, cols = size
            _send_later(ws, json.dumps({"type": "resize", "rows": rows, "cols": cols}))

    return {signal.SIGWINCH: handler}


def _pump_stdin(ws: ClientConnection, stdin: IO[bytes], *, framed: bool) -> None:
    """Send local stdin until EOF. Reads what is available (read1 / os.read), so an
    interactive pipe is forwarded line by line, not when a 32 KiB buffer fills up.
    A stdin that fails to read counts as EOF, so the remote side is never left waiting."""
    fd = _fileno(stdin) if _isatty(stdin) else None
    read1 = getattr(stdin, "read1", None)
    while True:
        try:
            if fd is not None:
                chunk = os.read(fd, CHUNK)
            elif read1 is not None:
                chunk = read1(CHUNK)
            else:
                chunk = stdin.read(CHUNK)
        except (OSError, ValueError):
            chunk = b""
        try:
            if not chunk:
                if framed:
                    ws.send(bytes([STDIN_EOF]))
                return
            ws.send(bytes([STDIN]) + chunk if framed else chunk)
        except Exception:  # the connection is gone; the main loop reports why
            return


class _Lost(Exception):
    """The connection ended without an exit status; reported once the terminal is back
    in cooked mode (a message printed in raw mode would lose its carriage return).
    `mid_line`: the last output went to a terminal and did not end its line (a shell
    prompt, say), so the error must start on a new line."""

    def __init__(self, message: str, mid_line: bool) -> None:
        super().__init__(message)
        self.mid_line = mid_line


def _receive(ws: ClientConnection, out: IO[bytes], err: IO[bytes], tty: bool) -> int:
    """Write output until the exit status arrives; return it."""
    from websockets.exceptions import ConnectionClosed

    from wisp.client import ProtocolError

    remote_tty = tty
    terminals = {id(s) for s in (out, err) if _isatty(s)}
    mid_line = False

    def write(stream: IO[bytes], data: bytes) -> None:
        nonlocal mid_line
        stream.write(data)
        stream.flush()
        if data and id(stream) in terminals:
            mid_line = not data.endswith(b"\n")

    try:
        for message in ws:
            if isinstance(message, str):
                try:
                    event = json.loads(message)
                except json.JSONDecodeError:
                    continue
                if not isinstance(event, dict):
                    continue
                if event.get("type") == "session_info" and "tty" in event:
                    remote_tty = bool(event["tty"])  # the server's word wins (contract)
                elif event.get("type") == "exit":
                    try:
                        return int(event.get("exit_code", 0)) & 0xFF
                    except (TypeError, ValueError):
                        raise ProtocolError(f"bad exit message {message!r}") from None
                continue
            if remote_tty:
                write(out, message)
                continue
            if not message:
                continue
            stream, payload = message[0], message[1:]
            if stream == STDOUT:
                write(out, payload)
            elif stream == STDERR:
                write(err, payload)
            elif stream == EXIT:
                return payload[0] if payload else 0
    except ConnectionClosed:
        pass
    close = ws.close_code
    if remote_tty and close == 1000:
        return 0
    if remote_tty and close is not None and 4000 <= close <= 4255:
        return close - 4000
    reason = f" ({ws.close_reason})" if ws.close_reason else ""
    raise _Lost(f"connection closed before the command's exit status "
                f"(close code {close}{reason})", mid_line)


def run_session(state: State, sprite: str, cmd: Sequence[str], *, tty: bool,
                workdir: str | None, env: dict[str, str]) -> int:
    """Run CMD in SPRITE with the local stdio attached; return the remote exit code."""
    # Looked up now, not at import: click's test runner swaps sys.std* per invocation.
    stdin, out, err = _binary(sys.stdin), _binary(sys.stdout), _binary(sys.stderr)
    local_tty = _isatty(stdin)
    # Non-TTY: forward stdin only when it is a pipe or file (a keyboard would make every
    # command wait for Ctrl-D). TTY: keystrokes always go to the remote terminal.
    # A closed stdin (`<&-`) makes sys.stdin None: nothing to forward.
    forward = sys.stdin is not None and (tty or not local_tty)
    size = _terminal_size(out) if tty else None
    ws = state.client().connect_exec(
        sprite, list(cmd), tty=tty, stdin=forward, dir=workdir, env=env,
        rows=size[0] if size else None, cols=size[1] if size else None)
    try:
        return _attach(ws, stdin, out, err, tty=tty, local_tty=local_tty, forward=forward)
    except _Lost as exc:
        if exc.mid_line and _isatty(err):
            err.write(b"\n")  # the error line must not continue the remote's last line
            err.flush()
        fail(str(exc), LOST_CONNECTION)
    except BrokenPipeError:
        # The local reader went away (`wisp exec ... | head`): stop quietly, like a
        # program killed by SIGPIPE, and keep Python from complaining at exit.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        except (OSError, ValueError):
            pass
        return 128 + signal.SIGPIPE


def _attach(ws: ClientConnection, stdin: IO[bytes], out: IO[bytes], err: IO[bytes], *,
            tty: bool, local_tty: bool, forward: bool) -> int:
    from websockets.exceptions import ConnectionClosed

    advertised = ws.response.headers.get("X-Sprite-Capabilities") if ws.response else None
    capabilities = {c.strip() for c in (advertised or "").split(",")}
    with ExitStack() as stack:
        stack.callback(ws.close)
        handlers: dict[int, Any] = {}
        if tty:
            handlers.update(_resize_handler(ws, out))
            stdin_fd = _fileno(stdin)
            if local_tty and stdin_fd is not None:
                stack.enter_context(_raw_terminal(stdin_fd))
        elif "signal" in capabilities:
            handlers.update(_forward_signals(ws))
        stack.enter_context(_signal_handlers(handlers))
        if forward:
            threading.Thread(target=_pump_stdin, args=(ws, stdin),
                             kwargs={"framed": not tty}, daemon=True).start()
        elif not tty:  # (in TTY mode 0x04 would be a Ctrl-D keystroke)
            try:
                ws.send(bytes([STDIN_EOF]))
            except ConnectionClosed:
                pass  # already over (a short command, or lost): _receive says which
        return _receive(ws, out, err, tty)


@click.command("exec", context_settings={"allow_interspersed_args": False})
@sprite_option
@click.option("-t", "--tty", is_flag=True, help="Allocate a terminal in the sprite.")
@click.option("--dir", "workdir", metavar="DIR", envvar="WISP_EXEC_DIR",
              help="Working directory in the sprite [default: /home/sprite].")
@click.option("-e", "--env", "env", multiple=True, metavar="K=V", callback=_parse_env,
              help="Environment variable (repeatable).")
@click.argument("cmd", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_obj
def exec_(state: State, sprite: str | None, tty: bool, workdir: str | None,
          env: dict[str, str], cmd: tuple[str, ...]) -> None:
    """Run CMD in a sprite; exits with CMD's exit code.

    Options end at the first word of CMD, so `wisp exec ls -la` works; `--` is accepted.
    Without --tty, stdout and stderr stay separate and a piped stdin is forwarded."""
    code = run_session(state, resolve_sprite(sprite), cmd, tty=tty, workdir=workdir, env=env)
    raise click.exceptions.Exit(code)


@click.command(context_settings={"allow_interspersed_args": False})
@sprite_option
@click.option("--dir", "workdir", metavar="DIR", envvar="WISP_CONSOLE_DIR",
              help="Working directory in the sprite.")
@click.option("-e", "--env", "env", multiple=True, metavar="K=V", callback=_parse_env,
              help="Environment variable (repeatable).")
@click.argument("cmd", nargs=-1, type=click.UNPROCESSED)
@click.pass_obj
def console(state: State, sprite: str | None, workdir: str | None, env: dict[str, str],
            cmd: tuple[str, ...]) -> None:
    """Open an interactive terminal in a sprite [default CMD: a login shell]."""
    env = {"TERM": os.environ.get("TERM") or "xterm-256color", **env}
    code = run_session(state, resolve_sprite(sprite), cmd or CONSOLE_CMD, tty=True,
                       workdir=workdir, env=env)
    raise click.exceptions.Exit(code)
