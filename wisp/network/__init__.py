"""Sprites on the network: namespaces, veth pairs, addresses and the host firewall.

Every runtime driver gets its sprite's network namespace from here (`Network.attach`);
see docs/network.md.
"""

from wisp.network.dial import DialError
from wisp.network.network import Attachment, Network, NetworkConfig

__all__ = ["Attachment", "DialError", "Network", "NetworkConfig"]
