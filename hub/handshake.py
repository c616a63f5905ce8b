"""Reading what a device asks for in its opening handshake. Pure: no sockets here."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

from hub.errors import HubError
from schemas.codes import DEFAULT_PRECISION, QUERY_PRECISIONS, WEBSOCKET_PATH


@dataclass(frozen=True, slots=True)
class Handshake:
    """What the handshake established about a connection."""

    device_id: str
    ns_per_unit: int


class HandshakeRefused(HubError):
    """The handshake is answered with `status` instead of an upgrade."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def read_credentials(path: str, headers: Mapping[str, str]) -> tuple[str, int]:
    """The token and the precision (ns per unit) a handshake asks for; pure, raises refusals."""
    url = urlsplit(path)
    if url.path != WEBSOCKET_PATH:
        raise HandshakeRefused(
            HTTPStatus.NOT_FOUND, f"no such path; devices connect to {WEBSOCKET_PATH}"
        )
    try:
        query = parse_qs(url.query, keep_blank_values=True, strict_parsing=bool(url.query))
    except ValueError:
        raise HandshakeRefused(HTTPStatus.BAD_REQUEST, "malformed query string") from None
    for name, values in query.items():
        if len(values) > 1:
            raise HandshakeRefused(
                HTTPStatus.BAD_REQUEST, f"query parameter {name!r} given twice"[:120]
            )
    precision = query.get("precision", [DEFAULT_PRECISION])[0]
    if precision not in QUERY_PRECISIONS:
        raise HandshakeRefused(
            HTTPStatus.BAD_REQUEST, "precision must be one of: " + ", ".join(QUERY_PRECISIONS)
        )
    query_token = query.get("token", [None])[0]
    header_token = None
    if (authorization := headers.get("Authorization")) is not None:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise HandshakeRefused(HTTPStatus.UNAUTHORIZED, "invalid or missing token")
        header_token = value.strip()
    if query_token is not None and header_token is not None and query_token != header_token:
        raise HandshakeRefused(
            HTTPStatus.BAD_REQUEST, "the token query parameter and the Authorization header differ"
        )
    token = header_token or query_token
    if not token:
        raise HandshakeRefused(HTTPStatus.UNAUTHORIZED, "invalid or missing token")
    return token, QUERY_PRECISIONS[precision]
