"""Reading what a device asks for in its opening handshake. Pure: no sockets here."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

from hub.errors import HubError
from schemas.codes import DEFAULT_PRECISION, QUERY_PRECISIONS, WEBSOCKET_PATH

MAX_TOKEN_CHARS = 256


@dataclass(frozen=True, slots=True)
class Handshake:
    """What the handshake established about a connection."""

    device_id: str
    ns_per_unit: int
    token_hash: str = ""
    expires_at: float | None = None
    """When the token stops working: set for a rotated-out token in its grace period."""
    epoch: int = 0
    """The handshake's claim of the device's connection (`Claim.epoch`; 0: unclaimed)."""


class HandshakeRefused(HubError):
    """The handshake is answered with `status` (and `Retry-After`, if set) instead of an upgrade.

    `message` goes back to the client, so it never holds the token.
    """

    def __init__(self, status: HTTPStatus, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after


def read_credentials(
    path: str, headers: Mapping[str, str], allowed_origins: Collection[str] = ()
) -> tuple[str, int]:
    """The token and the precision (ns per unit) a handshake asks for; pure, raises refusals.

    The checks run in the contract's order (clarification 6): path (404), query string and
    `precision` (400), the token's form and header/query agreement (400), its presence
    (401). An `Origin` header is checked only when the operator configured an allowlist
    (`allowed_origins`, "*" allowing any): our tokens are not ambient credentials, and
    device libraries such as uwebsockets send `Origin: http://localhost`.
    """
    url = urlsplit(path)
    if url.path != WEBSOCKET_PATH:
        raise HandshakeRefused(
            HTTPStatus.NOT_FOUND, f"no such path; devices connect to {WEBSOCKET_PATH}"
        )
    origin = _single(headers, "Origin")
    if (
        allowed_origins
        and origin is not None
        and origin not in allowed_origins
        and "*" not in allowed_origins
    ):
        raise HandshakeRefused(HTTPStatus.FORBIDDEN, "this Origin is not allowed")
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
    if (authorization := _single(headers, "Authorization")) is not None:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise HandshakeRefused(HTTPStatus.UNAUTHORIZED, "invalid or missing token")
        header_token = value.strip()
    if query_token is not None and header_token is not None and query_token != header_token:
        raise HandshakeRefused(
            HTTPStatus.BAD_REQUEST, "the token query parameter and the Authorization header differ"
        )
    token = header_token or query_token
    if token is not None and len(token) > MAX_TOKEN_CHARS:
        # Bounded before it is hashed; hub tokens are 48 characters.
        raise HandshakeRefused(HTTPStatus.BAD_REQUEST, "the token is too long to be one")
    if not token:
        raise HandshakeRefused(HTTPStatus.UNAUTHORIZED, "invalid or missing token")
    return token, QUERY_PRECISIONS[precision]


def _single(headers: Mapping[str, str], name: str) -> str | None:
    """The header's value; 400 if it is given twice (websockets raises a LookupError then)."""
    try:
        return headers.get(name)
    except LookupError:
        raise HandshakeRefused(HTTPStatus.BAD_REQUEST, f"header {name} given twice") from None
