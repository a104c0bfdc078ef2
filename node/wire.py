"""The node's DICOM wire options from its settings: what the receiver and the sender get.

TLS follows PS3.15 B.1 (Basic TLS Secure Transport Connection Profile) as Python's ssl module
implements it: TLS 1.2 or later, certificates checked against the configured CA. Contexts are
built once, when the node starts, so a missing or unreadable key fails the start-up with the
settings key named, not the first association.
"""
from __future__ import annotations

import ipaddress
import ssl
from pathlib import Path
from typing import Any

from dipnode.dicom_io.scp import ReceiverConfig
from dipnode.node.settings import Settings, SettingsError

__all__ = ["receiver_config", "receiver_tls", "sender_options", "sender_tls"]


def _load(key: str, action: Any, *paths: Path) -> None:
    try:
        action()
    except (OSError, ssl.SSLError) as exc:
        shown = ", ".join(str(p) for p in paths)
        raise SettingsError(f"{key}: expected readable PEM file(s), got {shown} ({exc})") from None


def receiver_tls(settings: Settings) -> ssl.SSLContext | None:
    """The server-side TLS context of [node], or None when tls_cert is unset (plain TCP)."""
    n = settings.node
    if n.tls_cert is None or n.tls_key is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # PS3.15 B.1 / BCP 195: no SSL, no TLS 1.0/1.1
    _load("node.tls_cert/node.tls_key",
          lambda: ctx.load_cert_chain(n.tls_cert, n.tls_key), n.tls_cert, n.tls_key)
    if n.tls_ca is not None:
        _load("node.tls_ca", lambda: ctx.load_verify_locations(cafile=str(n.tls_ca)), n.tls_ca)
        # With a CA but no requirement a client certificate is checked when offered.
        ctx.verify_mode = ssl.CERT_REQUIRED if n.tls_require_client_cert else ssl.CERT_OPTIONAL
    return ctx


def sender_tls(settings: Settings) -> ssl.SSLContext:
    """The client-side TLS context of [sender] (peer verified against tls_ca or system CAs)."""
    s = settings.sender
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if s.tls_ca is not None:
        _load("sender.tls_ca", lambda: ctx.load_verify_locations(cafile=str(s.tls_ca)), s.tls_ca)
    if s.tls_cert is not None and s.tls_key is not None:
        _load("sender.tls_cert/sender.tls_key",
              lambda: ctx.load_cert_chain(s.tls_cert, s.tls_key), s.tls_cert, s.tls_key)
    return ctx


def _networks(addresses: list[str]) -> frozenset[str] | None:
    # Settings accept addresses and CIDR networks; the receiver gets them normalised.
    if not addresses:
        return None
    return frozenset(str(ipaddress.ip_network(a, strict=False)) for a in addresses)


def receiver_config(settings: Settings, tls: ssl.SSLContext | None = None) -> ReceiverConfig:
    """The receiver's configuration; ``tls`` defaults to :func:`receiver_tls` of ``settings``."""
    n = settings.node
    return ReceiverConfig(
        ae_title=n.ae_title, host=n.host, port=n.port,
        # An empty list closes the node (settings doc); the receiver wants None or a non-empty set.
        allowed_calling_aets=(None if n.accepts_any_caller() or not n.allowed_calling_aets
                              else frozenset(n.allowed_calling_aets)),
        closed=not n.allowed_calling_aets,
        allowed_addresses=_networks(n.allowed_addresses),
        max_pdu_length=n.max_pdu, max_associations=n.max_associations,
        max_associations_per_address=n.max_associations_per_address,
        idle_timeout_s=n.idle_timeout_s, request_timeout_s=n.request_timeout_s,
        max_instance_bytes=n.max_instance_mb * 1024 * 1024, accept_compressed=n.accept_compressed,
        tls=tls if tls is not None else receiver_tls(settings),
    )


def destination_uses_tls(settings: Settings, label: str | None) -> bool:
    """Whether the destination ``label`` (``AET@HOST:PORT``) is sent to over TLS."""
    for d in settings.destinations:
        if d.label == label and d.tls is not None:
            return d.tls
    return settings.sender.tls


def sender_options(settings: Settings, destination: str | None = None) -> dict[str, Any]:
    """Keyword arguments for dicom_io.scu.send_files besides the files and the destination.

    ``destination`` is the destination's label; its ``tls`` (else [sender] tls) picks TLS.
    """
    options: dict[str, Any] = {"calling_ae": settings.calling_ae,
                               "timeout_s": settings.sender.timeout_s}
    if destination_uses_tls(settings, destination):
        options["tls"] = sender_tls(settings)
    return options
