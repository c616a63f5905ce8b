"""The PROXY protocol header a balancer sends first (hub.core.proxyheader), byte by byte."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address

import pytest
from proxyprotocol.result import ProxyResultIPv4, ProxyResultIPv6, ProxyResultLocal
from proxyprotocol.v2 import ProxyProtocolV2

from hub.core.proxyheader import (
    MAX_V1_BYTES,
    MAX_V2_BYTES,
    ProxyHeader,
    ProxyHeaderError,
    TrustedProxies,
    parse_networks,
    read_proxy_header,
)

pytestmark = pytest.mark.unit

REQUEST = b"GET /v1/ws HTTP/1.1\r\nHost: hub\r\n\r\n"
V1_TCP4 = b"PROXY TCP4 192.0.2.7 198.51.100.1 40001 8765\r\n"
V1_TCP6 = b"PROXY TCP6 2001:db8::7 2001:db8::1 40001 8765\r\n"


def v2(result: ProxyResultIPv4 | ProxyResultIPv6 | ProxyResultLocal) -> bytes:
    """A v2 block as HAProxy's send-proxy-v2 makes it (the library's own packer)."""
    return ProxyProtocolV2().pack(result)


V2_TCP4 = v2(
    ProxyResultIPv4((IPv4Address("192.0.2.7"), 40001), (IPv4Address("198.51.100.1"), 8765))
)
V2_TCP6 = v2(
    ProxyResultIPv6((IPv6Address("2001:db8::7"), 40001), (IPv6Address("2001:db8::1"), 8765))
)


@pytest.mark.parametrize(
    ("header", "client"),
    [
        (V1_TCP4, ("192.0.2.7", 40001)),
        (V1_TCP6, ("2001:db8::7", 40001)),
        (b"PROXY UNKNOWN\r\n", None),
        (V2_TCP4, ("192.0.2.7", 40001)),
        (V2_TCP6, ("2001:db8::7", 40001)),
        (v2(ProxyResultLocal()), None),
    ],
    ids=["v1-tcp4", "v1-tcp6", "v1-unknown", "v2-tcp4", "v2-tcp6", "v2-local"],
)
def test_a_header_names_its_client_and_ends_where_the_request_begins(
    header: bytes, client: tuple[str, int] | None
) -> None:
    """Whole, and followed by the request in the same read: the length is the header's."""
    found = read_proxy_header(header + REQUEST)
    assert found == ProxyHeader(len(header), client)
    assert (header + REQUEST)[found.length :] == REQUEST


@pytest.mark.parametrize("header", [V1_TCP4, V2_TCP4], ids=["v1", "v2"])
def test_a_header_arriving_a_byte_at_a_time_is_complete_only_at_its_last_byte(
    header: bytes,
) -> None:
    """Every prefix asks for more; the whole header is read."""
    for end in range(len(header)):
        assert read_proxy_header(header[:end]) is None, end
    assert read_proxy_header(header) == ProxyHeader(len(header), ("192.0.2.7", 40001))


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (REQUEST, "does not start with a PROXY protocol header"),
        (b"\x16\x03\x01", "does not start"),  # a TLS ClientHello
        (b"PROXY TCP4 " + b"1" * MAX_V1_BYTES, f"longer than {MAX_V1_BYTES}"),
        (b"PROXY TCP4 999.0.2.7 198.51.100.1 1 2\r\n", "unreadable"),
        (b"PROXY TCP4 192.0.2.7 198.51.100.1 1\r\n", "unreadable"),
        (b"PROXY SCTP 192.0.2.7 198.51.100.1 1 2\r\n", "unreadable"),
        (V2_TCP4[:12] + b"\x31" + V2_TCP4[13:], "unreadable"),  # version 3
        (V2_TCP4[:14] + (MAX_V2_BYTES).to_bytes(2, "big"), f"over {MAX_V2_BYTES}"),
    ],
    ids=["http", "tls", "v1-long", "v1-bad-ip", "v1-short", "v1-family", "v2-version", "v2-long"],
)
def test_anything_else_is_refused_with_the_reason(data: bytes, why: str) -> None:
    """Not a header, an overlong one, or one that does not parse: the error says which."""
    with pytest.raises(ProxyHeaderError, match=why):
        read_proxy_header(data)


def test_nothing_yet_asks_for_more() -> None:
    """An empty read decides nothing."""
    assert read_proxy_header(b"") is None


def test_trusted_proxies_match_addresses_and_networks_only() -> None:
    """Listed hosts and networks are trusted, IPv4-mapped IPv6 as its IPv4; others are not."""
    trusted = TrustedProxies(["10.0.0.0/24", "192.0.2.9", "fd00::/8"])
    assert "10.0.0.77" in trusted
    assert "192.0.2.9" in trusted
    assert "::ffff:10.0.0.5" in trusted
    assert "fd12::1" in trusted
    assert "10.0.1.1" not in trusted
    assert "192.0.2.10" not in trusted
    assert "not-an-address" not in trusted
    assert None not in trusted
    assert not TrustedProxies([])
    assert "10.0.0.1" not in TrustedProxies([])


def test_a_bad_network_is_named() -> None:
    """The setting's validator says which entry is wrong."""
    with pytest.raises(ValueError, match=r"'10\.0\.0\.300/8' is not an IP address"):
        parse_networks(["10.0.0.0/8", "10.0.0.300/8"])
