"""The admin token: generated once when WISP_TOKEN is unset, stored 0600, stable."""

from __future__ import annotations

import json
import stat
from pathlib import Path

from tests.framework.server import WispServer


def test_generated_token_is_private_and_stable(leak_check: Path) -> None:
    """Without WISP_TOKEN the server makes a random token, stores it (and the client config
    with it) readable by root only, keeps it across restarts, and accepts only it."""
    srv = WispServer(leak_check / "token")
    srv.generated_token = True
    srv.start()
    try:
        token_file = srv.data_dir / "token"
        first = token_file.read_text().strip()
        assert len(first) >= 32 and first != "test-token"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        client_json = srv.data_dir / "client.json"
        assert stat.S_IMODE(client_json.stat().st_mode) == 0o600
        assert json.loads(client_json.read_text())["token"] == first
        assert srv.api("GET", "/v1/sprites").status_code == 200
        assert srv.api("GET", "/v1/sprites",
                       headers={"Authorization": "Bearer test-token"}).status_code == 401
        srv.restart()
        assert token_file.read_text().strip() == first
        assert srv.api("GET", "/v1/sprites").status_code == 200
    finally:
        srv.stop()
