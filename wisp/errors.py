"""One error tree for the whole server; each branch maps to one HTTP status and one
contract error body (docs/sprites-api.md §1.2).

    WispError                       500  internal_error
    ├── BadRequest                  400  bad_request
    │   └── InvalidName             400  invalid_name
    ├── Unauthorized                401  unauthorized
    ├── NotFound                    404  not_found
    │   ├── SpriteNotFound          404  sprite_not_found
    │   ├── CheckpointNotFound      404  checkpoint_not_found
    │   ├── SessionNotFound         404  session_not_found
    │   └── ServiceNotFound         404  service_not_found
    ├── Conflict                    409  conflict
    │   ├── ServiceNotRunning       409  service_not_running
    │   └── SpriteExists            400  sprite_exists   (the docs say 400 for duplicates)
    ├── Gone                        410  gone            (session already exited)
    ├── PayloadTooLarge             413  payload_too_large
    ├── QuotaExceeded               507  checkpoint_quota_exceeded
    ├── StorageUnavailable          503  storage_unavailable (JuiceFS is down)
    ├── SpriteUnresponsive          503  sprite_unresponsive (its init agent does not answer)
    └── SystemError_                500  system_error    (a host command failed)

    FsError (separate: the /fs/* body shape {"error","code","path"})

Lower layers raise these (or `SystemError_` from `wisp.system.run`), the API turns them into
bodies in one place (`wisp.api.app`), so nothing crosses the wire as a traceback. A reply
carries `public_message`: for most errors that is the message itself, but a
`SystemError_`'s message (a command line, its stderr, host paths) goes only to the server
log, and the client is told which step failed.
"""

from __future__ import annotations

import errno as _errno
from typing import Any

__all__ = [
    "WispError",
    "BadRequest",
    "InvalidName",
    "Unauthorized",
    "NotFound",
    "SpriteNotFound",
    "CheckpointNotFound",
    "SessionNotFound",
    "ServiceNotFound",
    "Conflict",
    "ServiceNotRunning",
    "SpriteExists",
    "Gone",
    "PayloadTooLarge",
    "QuotaExceeded",
    "StorageUnavailable",
    "SpriteUnresponsive",
    "SystemError_",
    "FsError",
    "FS_STATUS",
]


class WispError(Exception):
    """Base of every error the API reports; `code` is the contract's machine code."""

    status = 500
    code = "internal_error"

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.extra = extra

    @property
    def public_message(self) -> str:
        """What a client is told; `message` may say more, for the log."""
        return self.message

    def body(self) -> dict[str, Any]:
        return {"error": self.code, "message": self.public_message, **self.extra}


class BadRequest(WispError):
    """The request is malformed: bad JSON, bad field types, bad query values."""

    status = 400
    code = "bad_request"


class InvalidName(BadRequest):
    """A sprite or checkpoint name that does not fit the name rules."""

    code = "invalid_name"


class Unauthorized(WispError):
    """Missing or wrong bearer token. The message never says which."""

    status = 401
    code = "unauthorized"


class NotFound(WispError):
    status = 404
    code = "not_found"


class SpriteNotFound(NotFound):
    code = "sprite_not_found"

    def __init__(self, name: str) -> None:
        super().__init__(f"sprite '{name}' not found")


class CheckpointNotFound(NotFound):
    code = "checkpoint_not_found"

    def __init__(self, sprite: str, checkpoint: str) -> None:
        super().__init__(f"checkpoint '{checkpoint}' of sprite '{sprite}' not found")


class SessionNotFound(NotFound):
    code = "session_not_found"

    def __init__(self, session: str) -> None:
        super().__init__(f"exec session '{session}' not found")


class Conflict(WispError):
    """The sprite is in a state where the action is not legal (e.g. a restore is running)."""

    status = 409
    code = "conflict"


class ServiceNotFound(NotFound):
    code = "service_not_found"

    def __init__(self, service: str) -> None:
        super().__init__(f"service '{service}' not found")


class ServiceNotRunning(Conflict):
    """Stopping or signalling a service that has no process."""

    code = "service_not_running"

    def __init__(self, service: str) -> None:
        super().__init__(f"service '{service}' is not running")


class SpriteExists(Conflict):
    """Creating a sprite whose name is taken; the Sprites docs answer 400 here."""

    status = 400
    code = "sprite_exists"

    def __init__(self, name: str) -> None:
        super().__init__(f"sprite '{name}' already exists")


class Gone(WispError):
    """The exec session already exited (kill answers 410)."""

    status = 410
    code = "gone"


class PayloadTooLarge(WispError):
    status = 413
    code = "payload_too_large"


class QuotaExceeded(WispError):
    """A new checkpoint would push the sprite's checkpoints past their byte budget."""

    status = 507
    code = "checkpoint_quota_exceeded"


class StorageUnavailable(WispError):
    """JuiceFS is not mounted (crashed or restarting): no sprite can run until it is back."""

    status = 503
    code = "storage_unavailable"


class SpriteUnresponsive(WispError):
    """The sprite runs but its init agent cannot start a process (it does not answer, or
    cannot fork). `POST /v1/sprites/{name}/restart` is the way out; the message says so."""

    status = 503
    code = "sprite_unresponsive"


class SystemError_(WispError):
    """A host command or operation (runc, mount, juicefs, mkfs) failed.

    `message` is for the server log: the command line, its stderr, host paths. Clients get
    `public`, which names the step that failed and nothing of the host."""

    status = 500
    code = "system_error"

    def __init__(self, message: str, *, public: str | None = None, **extra: Any) -> None:
        super().__init__(message, **extra)
        self.public = public or "a host operation failed (details are in the server log)"

    @property
    def public_message(self) -> str:
        return self.public


# errno name -> HTTP status for the filesystem API (contract §1.2 b)
FS_STATUS: dict[str, int] = {
    "ENOENT": 404,
    "EACCES": 403,
    "EPERM": 403,
    "EISDIR": 400,
    "ENOTDIR": 400,
    "ENOTEMPTY": 400,
    "EEXIST": 400,
    "EINVAL": 400,
    "EIO": 500,
}


class FsError(Exception):
    """A filesystem API error, reported with the errno-coded body of contract §1.2 (b)."""

    def __init__(self, code: str, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.code = code if code in FS_STATUS else "EIO"
        self.message = message
        self.path = path

    @property
    def status(self) -> int:
        return FS_STATUS[self.code]

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"error": self.message, "code": self.code}
        if self.path is not None:
            out["path"] = self.path
        return out

    @classmethod
    def from_errno(cls, err: int, op: str, path: str) -> FsError:
        name = _errno.errorcode.get(err, "EIO")
        return cls(name, f"{op} {path}: {_os_strerror(err)}", path)


def _os_strerror(err: int) -> str:
    import os

    return os.strerror(err).lower()
