"""The device port's TLS context, from the `tls_cert` and `tls_key` settings."""

from __future__ import annotations

import logging
import ssl

from hub.errors import ConfigError
from hub.options import ListenOptions

log = logging.getLogger("hub.server")


def tls_context(listen: ListenOptions) -> ssl.SSLContext | None:
    """The server TLS context for `tls_cert`/`tls_key`, or None to serve plain ws://."""
    if listen.tls_cert is None or listen.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(listen.tls_cert, listen.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"cannot use TLS certificate {listen.tls_cert} with key {listen.tls_key}: "
            f"{getattr(exc, 'strerror', None) or exc}"
        ) from None
    if listen.tls_key.stat().st_mode & 0o077:
        log.warning("TLS key %s is readable by other users: chmod 600 it", listen.tls_key)
    return context
