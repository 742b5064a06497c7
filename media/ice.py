"""Which local addresses WebRTC advertises, and which remote candidates it will use.

aiortc gathers host candidates through aioice, which asks ``aioice.ice.get_host_addresses``
for every interface address except 127.0.0.1, and offers no option to choose. A
gateway must choose: advertise only the interface clients can reach (or loopback in
tests), and never send connectivity checks to addresses a client merely claims to
have (a client could otherwise make the gateway send UDP to hosts inside its
network). This module is the one, small adapter for both; it changes process-wide
behaviour, which is what a gateway process wants.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

import aioice.ice

_original_get_host_addresses = aioice.ice.get_host_addresses
_host_addresses: tuple[str, ...] | None = None

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _configured_host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
    if _host_addresses is None:
        return _original_get_host_addresses(use_ipv4, use_ipv6)
    return [
        a
        for a in _host_addresses
        if (use_ipv4 and ipaddress.ip_address(a).version == 4) or (use_ipv6 and ipaddress.ip_address(a).version == 6)
    ]


def use_host_addresses(addresses: Sequence[str] | None) -> None:
    """Advertise exactly these local addresses (None: every interface, aioice's default)."""
    global _host_addresses
    if addresses is not None:
        for address in addresses:
            ipaddress.ip_address(address)  # raises ValueError on a typo
    _host_addresses = None if addresses is None else tuple(addresses)
    aioice.ice.get_host_addresses = _configured_host_addresses


def parse_networks(networks: Sequence[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(n, strict=False) for n in networks)


def candidate_allowed(host: str, networks: Sequence[Network]) -> bool:
    """May the gateway send to this remote candidate address? (Empty ``networks``: anything.)"""
    if not networks:
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False  # mDNS (.local) names and garbage: the gateway cannot resolve them anyway
    return any(address in network for network in networks)


def filter_sdp_candidates(sdp: str, networks: Sequence[Network]) -> tuple[str, int]:
    """Drop ``a=candidate`` lines whose address is outside ``networks``; return (sdp, dropped)."""
    if not networks:
        return sdp, 0
    kept: list[str] = []
    dropped = 0
    for line in sdp.splitlines():
        if line.startswith("a=candidate:"):
            parts = line.split()
            if len(parts) < 6 or not candidate_allowed(parts[4], networks):
                dropped += 1
                continue
        kept.append(line)
    return "\r\n".join(kept) + "\r\n", dropped
