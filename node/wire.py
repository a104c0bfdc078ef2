"""The node's DICOM wire options from its settings: what the receiver and the sender get.

TLS contexts come from dicom_io/tls.py (PS3.15 B.1); they are built once, when the node starts,
so a missing or unreadable key fails the start-up with the settings key named, not the first
association. Each destination becomes a :class:`Route` (the peer and its TLS context) once, at
start: a delivery looks its route up by the label it is stored under, nothing is parsed back.
"""
from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass

from dipnode.dicom_io import tls
from dipnode.dicom_io.scp import ReceiverConfig
from dipnode.dicom_io.scu import Destination as Peer
from dipnode.dicom_io.tls import TlsFileError
from dipnode.node.settings import Settings, SettingsError

__all__ = ["Route", "client_tls", "destination_routes", "receiver_config", "receiver_tls", "sender_tls"]


def _contexts_error(section: str, exc: TlsFileError) -> SettingsError:
    key = f"{section}.tls_ca" if exc.part == "ca" else f"{section}.tls_cert/{section}.tls_key"
    shown = ", ".join(str(p) for p in exc.paths)
    return SettingsError(f"{key}: expected readable PEM file(s), got {shown} ({exc.reason})")


def receiver_tls(settings: Settings) -> ssl.SSLContext | None:
    """The server-side TLS context of [node], or None when tls_cert is unset (plain TCP)."""
    n = settings.node
    if n.tls_cert is None or n.tls_key is None:
        return None
    try:
        return tls.server_context(n.tls_cert, n.tls_key, ca=n.tls_ca,
                                  require_client_cert=n.tls_require_client_cert)
    except TlsFileError as exc:
        raise _contexts_error("node", exc) from None


def sender_tls(settings: Settings) -> ssl.SSLContext:
    """The client-side TLS context of [sender] (peer verified against tls_ca or system CAs)."""
    s = settings.sender
    try:
        return tls.client_context(ca=s.tls_ca, cert=s.tls_cert, key=s.tls_key)
    except TlsFileError as exc:
        raise _contexts_error("sender", exc) from None


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


def _uses_tls(settings: Settings, own: bool | None) -> bool:
    # A destination's or source's own tls overrides [sender] tls.
    return own if own is not None else settings.sender.tls


def client_tls(settings: Settings) -> ssl.SSLContext | None:
    """The one client-side context for every destination and source reached over TLS (None
    when none is): built once, at start."""
    peers = [*settings.destinations, *settings.sources]
    return sender_tls(settings) if any(_uses_tls(settings, p.tls) for p in peers) else None


@dataclass(frozen=True)
class Route:
    """Where a delivery goes: the peer, and the TLS context when it is reached over TLS."""

    peer: Peer
    tls: ssl.SSLContext | None


def destination_routes(settings: Settings, tls: ssl.SSLContext | None) -> dict[str, Route]:
    """Every ``[[destinations]]`` entry by the label its deliveries are stored under
    (``AET@HOST:PORT``), with its peer and TLS context; ``tls`` is :func:`client_tls`."""
    routes = {}
    for d in settings.destinations:
        ctx = tls if _uses_tls(settings, d.tls) else None
        if _uses_tls(settings, d.tls) and ctx is None:
            raise ValueError(f"destination_routes: destination {d.label} uses TLS, expected a client "
                             "context (client_tls), got None")
        routes[d.label] = Route(Peer(d.ae_title, d.host, d.port), ctx)
    return routes
