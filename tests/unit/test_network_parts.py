"""The network package's pure parts: address slots, the firewall text (checked by the real
`nft -c`), and the [network] config section."""

from __future__ import annotations

import ipaddress
import subprocess
from pathlib import Path

import pytest

from wisp.config import load_config
from wisp.errors import BadRequest, SystemError_
from wisp.network.addresses import SlotPool, parse_subnet
from wisp.network.firewall import ruleset


def test_slots_are_point_to_point_pairs_round_robin() -> None:
    """Slot n is (2n, 2n+1); a released slot is not handed out again at once; a full pool
    is a clear error."""
    pool = SlotPool(ipaddress.IPv4Network("10.9.0.0/29"))
    a, b = pool.take(), pool.take()
    assert (str(a.host), str(a.sprite)) == ("10.9.0.0", "10.9.0.1")
    assert (str(b.host), str(b.sprite)) == ("10.9.0.2", "10.9.0.3")
    pool.release(a.slot)
    assert pool.take().slot == 2
    assert pool.take().slot == 3
    assert pool.take().slot == 0  # wrapped around to the released one
    with pytest.raises(SystemError_, match="no free"):
        pool.take()


@pytest.mark.parametrize("text", ["10.0.0.1/16", "10.0.0.0/30", "10.0.0.0/7", "nope", "::/64"])
def test_bad_subnets_refused(text: str) -> None:
    with pytest.raises(BadRequest):
        parse_subnet(text)


def test_ruleset_is_valid_nft() -> None:
    """The generated table parses with the real nft (check mode: nothing is loaded)."""
    text = ruleset("0123456789", "w012345", ipaddress.IPv4Network("10.213.0.0/16"), "eth0",
                   5353)
    res = subprocess.run(["nft", "-c", "-f", "-"], input=text.encode(), capture_output=True)
    assert res.returncode == 0, res.stderr.decode()
    assert 'oifname != "eth0" counter drop' in text
    assert "th dport 53 redirect to :5353" in text


def test_network_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """[network] from TOML, env over file, and wrong types refused."""
    monkeypatch.delenv("WISP_UPLINK", raising=False)
    monkeypatch.delenv("WISP_SUBNET", raising=False)
    f = tmp_path / "c.toml"
    f.write_text('[network]\nuplink = "eth9"\nsubnet = "10.50.0.0/16"\n')
    cfg = load_config(tmp_path, config_file=f)
    assert (cfg.network.uplink, cfg.network.subnet) == ("eth9", "10.50.0.0/16")
    monkeypatch.setenv("WISP_UPLINK", "none")
    assert load_config(tmp_path, config_file=f).network.uplink == "none"
    f.write_text("[network]\nuplink = 3\n")
    with pytest.raises(BadRequest, match="network.uplink"):
        load_config(tmp_path, config_file=f)
    assert load_config(tmp_path).network.subnet == "auto"
