"""Where the registry lives, from the `registry_url` setting: SQLite or PostgreSQL. Pure.

Empty means the SQLite file in the state directory (one host); `postgresql://USER@HOST:PORT/DB`
(libpq's spelling, TLS options in the query string: `?sslmode=verify-full`) means a
PostgreSQL database shared by every hub of a fleet. Anything else is refused here, when the
settings are read, with an error that names the setting, so no command gets as far as
guessing. Error messages never repeat a password the URL may hold.
"""

from __future__ import annotations

from urllib.parse import urlsplit

SCHEMES = ("postgresql", "postgres")
URL_FORM = "postgresql://USER@HOST:PORT/DB"


def check_registry_url(url: str) -> str:
    """`url` stripped, if empty or a usable PostgreSQL URL; ValueError saying why not."""
    url = url.strip()
    if not url:
        return url
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError for a port that is not a number in range
    except ValueError:
        raise ValueError(f"registry_url is not a URL of the form {URL_FORM}") from None
    if parts.scheme not in SCHEMES:
        raise ValueError(
            f"registry_url must be empty (SQLite in the state directory) or {URL_FORM}, "
            f"not a {parts.scheme or 'scheme-less'} URL"
        )
    missing = [
        what
        for what, value in (
            ("USER", parts.username),
            ("HOST", parts.hostname),
            ("DB", parts.path.lstrip("/")),
        )
        if not value
    ]
    if missing or "/" in parts.path.lstrip("/") or parts.fragment:
        raise ValueError(
            f"registry_url must have the form {URL_FORM}"
            + (f" (no {', '.join(missing)} given)" if missing else "")
        )
    del port
    return url


def has_password(url: str) -> bool:
    """Whether the URL carries a password (which belongs in ~/.pgpass instead)."""
    return bool(url) and urlsplit(url).password is not None


def display_url(url: str) -> str:
    """The URL as it may be shown in messages and logs: any password replaced by `***`.

    Split by hand, not by urlsplit: a password may hold an unencoded `/` or `@`, so the
    credentials end at the last `@` (masking too much is the safe mistake).
    """
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not sep or not at or ":" not in credentials:
        return url
    return f"{scheme}://{credentials.partition(':')[0]}:***@{host}"
