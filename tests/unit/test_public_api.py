"""The package's public surface is deliberate: pinned here so a change to it is a choice."""

from __future__ import annotations

import importlib

import pytest

EXPECTED = {
    "wisp": ["__version__"],
    "wisp.errors": ["WispError", "BadRequest", "InvalidName", "Unauthorized", "NotFound",
                    "SpriteNotFound", "CheckpointNotFound", "SessionNotFound", "ServiceNotFound", "Conflict",
                    "ServiceNotRunning",
                    "SpriteExists", "Gone", "PayloadTooLarge", "QuotaExceeded",
                    "StorageUnavailable", "SpriteUnresponsive", "SystemError_", "FsError",
                    "FS_STATUS"],
    "wisp.images": ["Image", "ImageStore"],
    "wisp.ports": ["Ports", "Port", "Target", "Ending", "parse_proc_net", "parse_target",
                   "pump", "socket_owners", "POLL_INTERVAL", "CHUNK"],
}


@pytest.mark.parametrize("module", sorted(EXPECTED))
def test_exported_members(module: str) -> None:
    """Each module's __all__ is exactly the agreed list, and every name exists."""
    mod = importlib.import_module(module)
    assert sorted(mod.__all__) == sorted(EXPECTED[module])
    for name in mod.__all__:
        assert hasattr(mod, name), name


def test_every_error_maps_to_a_status() -> None:
    """Every WispError subclass has an HTTP status and a contract error code; a new branch
    of the tree cannot be added without them (the one translation table, §5 of the style)."""
    from wisp import errors

    def walk(cls: type) -> list[type]:
        return [cls] + [c for sub in cls.__subclasses__() for c in walk(sub)]

    for cls in walk(errors.WispError):
        assert 400 <= cls.status < 600, cls
        assert cls.code and cls.code == cls.code.lower(), cls
    assert {c.code for c in walk(errors.WispError)} >= {
        "sprite_not_found", "checkpoint_not_found", "unauthorized", "storage_unavailable"}
