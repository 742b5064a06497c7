"""Which candidates the gateway advertises and accepts."""

from __future__ import annotations

import aioice.ice
import pytest

from media import ice

LOOPBACK = ice.parse_networks(["127.0.0.0/8"])


def test_host_addresses_are_configurable() -> None:
    ice.use_host_addresses(["127.0.0.1", "::1"])
    assert aioice.ice.get_host_addresses(use_ipv4=True, use_ipv6=False) == ["127.0.0.1"]
    assert aioice.ice.get_host_addresses(use_ipv4=True, use_ipv6=True) == ["127.0.0.1", "::1"]
    with pytest.raises(ValueError, match="does not appear to be an IPv4 or IPv6 address"):
        ice.use_host_addresses(["not-an-address"])
    ice.use_host_addresses(["127.0.0.1"])  # what the rest of the suite uses


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("127.0.0.1", True),
        ("127.9.9.9", True),
        ("10.0.0.1", False),
        ("192.0.2.2", False),
        ("abcd.local", False),
        ("::1", False),
    ],
)
def test_candidate_allowed(host: str, allowed: bool) -> None:
    assert ice.candidate_allowed(host, LOOPBACK) is allowed
    assert ice.candidate_allowed(host, ()) is True


def test_sdp_candidates_outside_the_networks_are_dropped() -> None:
    sdp = (
        "\r\n".join(
            [
                "v=0",
                "a=candidate:1 1 udp 2130706431 127.0.0.1 5000 typ host",
                "a=candidate:2 1 udp 2130706431 10.1.2.3 5000 typ host",
                "a=candidate:3 1 udp 2130706431 3f1c.local 5000 typ host",
                "a=candidate:broken",
                "a=end-of-candidates",
            ]
        )
        + "\r\n"
    )
    filtered, dropped = ice.filter_sdp_candidates(sdp, LOOPBACK)
    assert dropped == 3
    assert "127.0.0.1" in filtered and "10.1.2.3" not in filtered and "a=end-of-candidates" in filtered
    assert ice.filter_sdp_candidates(sdp, ()) == (sdp, 0)
