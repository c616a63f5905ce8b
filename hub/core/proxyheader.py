"""The PROXY protocol header a load balancer puts before a connection's first byte.

Behind HAProxy (`send-proxy-v2`) or nginx's stream module (`proxy_protocol on`), every
connection reaches the hub from the balancer's address. The balancer then starts each
connection with a PROXY header (v1: one text line; v2: a binary block) naming the client's
address, so that the per-source cap on unauthenticated connections, the failed-handshake
guard, presence and the logs see the device, not the balancer.

Only peers in `proxy_protocol_from` may speak it, and from them it is required: a header
from anyone else is not trusted (it would let a stranger pick the address it is charged
to), and a connection from a balancer without one is refused.

The `proxy-protocol` library parses a header; this module finds where it ends (the
library's parser wants exactly the header's bytes) and bounds it: v1 lines are at most 107
bytes by the specification, a v2 block here at most `MAX_V2_BYTES` (HAProxy adds a few
TLVs; nothing legitimate comes near).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from proxyprotocol import ProxyProtocolIncompleteError
from proxyprotocol.result import is_ipv4, is_ipv6
from proxyprotocol.v1 import ProxyProtocolV1
from proxyprotocol.v2 import ProxyProtocolV2

V1_PREFIX = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED_BYTES = 16
MAX_V1_BYTES = 107
"""The v1 specification's bound on a header line, CRLF included."""
MAX_V2_BYTES = 2048

_V1 = ProxyProtocolV1()
_V2 = ProxyProtocolV2()

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ProxyHeaderError(ValueError):
    """The bytes are not a PROXY header this hub accepts; the message says why."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A complete header: its length in bytes and the client it names.

    `client` is None for a header that names nobody (v2 LOCAL, the balancer's own health
    check; v1 UNKNOWN): the connection is then the balancer's own.
    """

    length: int
    client: tuple[str, int] | None


def read_proxy_header(buffer: bytes) -> ProxyHeader | None:
    """The PROXY header at the start of `buffer`, or None while more bytes are needed.

    Raises `ProxyHeaderError` when the bytes cannot start a PROXY header, or it is longer
    than its version allows, or it does not parse.
    """
    if buffer[: len(V2_SIGNATURE)] == V2_SIGNATURE[: len(buffer)] and buffer[:1] == b"\r":
        return _read_v2(buffer)
    if buffer[: len(V1_PREFIX)] == V1_PREFIX[: len(buffer)] and buffer[:1] == b"P":
        return _read_v1(buffer)
    if not buffer:
        return None
    raise ProxyHeaderError("the connection does not start with a PROXY protocol header")


def _read_v1(buffer: bytes) -> ProxyHeader | None:
    end = buffer.find(b"\r\n", 0, MAX_V1_BYTES)
    if end < 0:
        if len(buffer) >= MAX_V1_BYTES:
            raise ProxyHeaderError(f"PROXY v1 header longer than {MAX_V1_BYTES} bytes")
        return None
    length = end + 2
    return ProxyHeader(length, _client(_V1, buffer[:length]))


def _read_v2(buffer: bytes) -> ProxyHeader | None:
    if len(buffer) < V2_FIXED_BYTES:
        return None
    length = V2_FIXED_BYTES + int.from_bytes(buffer[14:16], "big")
    if length > MAX_V2_BYTES:
        raise ProxyHeaderError(f"PROXY v2 header of {length} bytes, over {MAX_V2_BYTES}")
    if len(buffer) < length:
        return None
    return ProxyHeader(length, _client(_V2, buffer[:length]))


def _client(parser: ProxyProtocolV1 | ProxyProtocolV2, header: bytes) -> tuple[str, int] | None:
    try:
        result = parser.unpack(header)
    except ProxyProtocolIncompleteError:  # its length said complete: the block lies
        raise ProxyHeaderError("PROXY header shorter than its length says") from None
    except ValueError as exc:  # the library's syntax errors are ValueErrors too
        raise ProxyHeaderError(f"unreadable PROXY header: {exc}") from None
    if is_ipv4(result) or is_ipv6(result):
        host, port = result.source
        return str(host), int(port)
    return None  # LOCAL, UNKNOWN, or a unix socket: nobody to charge but the balancer


class TrustedProxies:
    """The peers whose connections start with a PROXY header (`proxy_protocol_from`)."""

    def __init__(self, networks: Iterable[str]) -> None:
        self._networks: tuple[Network, ...] = tuple(parse_networks(networks))

    def __bool__(self) -> bool:
        return bool(self._networks)

    def __contains__(self, host: object) -> bool:
        if not self._networks or not isinstance(host, str):
            return False
        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self._networks)


def parse_networks(texts: Iterable[str]) -> list[Network]:
    """Addresses or CIDR networks (`10.0.0.5`, `10.0.0.0/24`, `fd00::/8`); ValueError
    naming the first one that is neither."""
    networks: list[Network] = []
    for text in texts:
        try:
            networks.append(ipaddress.ip_network(text.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{text!r} is not an IP address or network like 10.0.0.0/24") from None
    return networks
