"""TLS for DICOM associations: PS3.15 B.1 (Basic TLS Secure Transport Connection Profile) as
Python's ssl module implements it, TLS 1.2 or later (BCP 195: no SSL, no TLS 1.0/1.1).

The one place that pairs a certificate with its key and turns PEM files into contexts, for
the receiver (server side), the sender and the query/retrieve client (client side). Contexts
are built once by the caller, so an unreadable file fails where it is configured, not at the
first association.
"""
from __future__ import annotations

import ssl
from collections.abc import Callable
from pathlib import Path

from .errors import ConfigError

__all__ = ["TlsFileError", "check_cert_and_key", "client_context", "server_context"]


class TlsFileError(ConfigError):
    """A certificate, key or CA file that cannot be read or does not load.

    ``part`` says which: ``"cert_key"`` (the certificate chain and its key) or ``"ca"``.
    """

    def __init__(self, part: str, paths: tuple[Path, ...], reason: str) -> None:
        self.part, self.paths, self.reason = part, paths, reason
        shown = ", ".join(str(p) for p in paths)
        super().__init__(f"{part}: expected readable PEM file(s), got {shown} ({reason})")


def check_cert_and_key(cert: Path | None, key: Path | None,
                       names: tuple[str, str] = ("tls_cert", "tls_key")) -> None:
    """A certificate is only usable with its private key: both or neither (ConfigError)."""
    if (cert is None) != (key is None):
        raise ConfigError(f"{names[0]}, {names[1]}: expected both or neither, got "
                          f"{names[0]}={cert!r}, {names[1]}={key!r}")


def _load(part: str, action: Callable[[], object], *paths: Path) -> None:
    try:
        action()
    except (OSError, ssl.SSLError) as exc:
        raise TlsFileError(part, tuple(Path(p) for p in paths), str(exc)) from None


def server_context(cert: Path, key: Path, *, ca: Path | None = None,
                   require_client_cert: bool = False) -> ssl.SSLContext:
    """The receiver's context: our certificate; with ``ca`` a client certificate is checked
    when offered, and required with ``require_client_cert``."""
    if require_client_cert and ca is None:
        raise ConfigError("require_client_cert: expected a CA to check client certificates "
                          "against, got none")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load("cert_key", lambda: ctx.load_cert_chain(cert, key), cert, key)
    if ca is not None:
        _load("ca", lambda: ctx.load_verify_locations(cafile=str(ca)), ca)
        ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    return ctx


def client_context(*, ca: Path | None = None, cert: Path | None = None,
                   key: Path | None = None) -> ssl.SSLContext:
    """The sender's context: the peer is verified against ``ca`` (else the system's CAs) and
    its host name; ``cert`` and ``key`` are our client certificate for peers that ask."""
    check_cert_and_key(cert, key, ("cert", "key"))
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca is not None:
        _load("ca", lambda: ctx.load_verify_locations(cafile=str(ca)), ca)
    if cert is not None and key is not None:
        _load("cert_key", lambda: ctx.load_cert_chain(cert, key), cert, key)
    return ctx
