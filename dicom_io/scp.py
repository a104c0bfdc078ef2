"""The receiving side: a C-STORE / C-ECHO SCP built on pynetdicom.

The handler writes nothing itself: it wraps the bytes as received (PS3.10 file = preamble, file
meta from the presentation context, the encoded data set, never decoded and re-encoded) into a
:class:`ReceivedInstance`, hands it to ``on_store`` and answers with the status it returns.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from .status import Status, StoreRefused

__all__ = [
    "DEFAULT_SOP_CLASSES",
    "DEFAULT_TRANSFER_SYNTAXES",
    "ConfigError",
    "ReceivedInstance",
    "Receiver",
    "ReceiverConfig",
    "StoreRefused",
    "check_ae_title",
    "set_tcp_nodelay",
    "start_receiver",
]

log = logging.getLogger(__name__)

PET_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.128"
ENHANCED_PET_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.130"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"
VERIFICATION = str(Verification)

# What a PET/MR post-processing node should accept; Parametric Map Storage is not here on
# purpose (the node produces maps, it does not consume them) - pass sop_classes to add it.
DEFAULT_SOP_CLASSES: tuple[str, ...] = (
    PET_IMAGE_STORAGE,
    ENHANCED_PET_IMAGE_STORAGE,
    MR_IMAGE_STORAGE,
    ENHANCED_MR_IMAGE_STORAGE,
)

# PS3.5 Annex A: uncompressed first (what we prefer to receive), then the lossless and lossy
# compressed syntaxes scanners and PACS commonly use. The spool keeps bytes as received.
DEFAULT_TRANSFER_SYNTAXES: tuple[str, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEG2000,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEGLosslessSV1,
    RLELossless,
)

# PS3.5 A.1-A.5: syntaxes whose pixel data are native (deflate compresses the whole stream).
_NOT_COMPRESSED = frozenset(
    {ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian}
)

# PS3.8 9.3.2.1 / 9.3.3.2: AE titles are 1-16 characters of the default repertoire, no backslash.
_AE_MAX = 16


class ConfigError(ValueError):
    """A receiver or destination setting is out of range; the message names it."""


def check_ae_title(name: str, value: str) -> None:
    """Raise ConfigError naming ``name`` unless ``value`` is a usable AE title."""
    stripped = value.strip()
    if not stripped or len(stripped) > _AE_MAX or "\\" in value or not value.isascii():
        raise ConfigError(
            f"{name}: expected 1-{_AE_MAX} ASCII characters without backslash "
            f"(PS3.5 6.2 AE VR), got {value!r}"
        )


@dataclass(frozen=True)
class ReceiverConfig:
    """Settings of the listening SCP. ``port=0`` lets the OS pick a free port."""

    ae_title: str = "DIPNODE"
    host: str = "127.0.0.1"
    port: int = 11112
    allowed_calling_aets: frozenset[str] | None = None
    # None: any peer address. Items are addresses or CIDR networks ("10.0.0.0/8").
    allowed_addresses: frozenset[str] | None = None
    # A configured but closed node: every association is rejected (settings' empty list).
    closed: bool = False
    sop_classes: tuple[str, ...] = DEFAULT_SOP_CLASSES  # Verification is always added
    transfer_syntaxes: tuple[str, ...] = DEFAULT_TRANSFER_SYNTAXES
    # False keeps only the native / deflated syntaxes of ``transfer_syntaxes`` (for a site that
    # wants no pixel decoding at all); peers then convert before sending (PS3.5 10).
    accept_compressed: bool = True
    max_pdu_length: int = 65536  # 0 = unlimited (PS3.8 D.1)
    max_associations: int = 10
    idle_timeout_s: float = 60.0  # network, DIMSE and ACSE timeouts
    tls: ssl.SSLContext | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        check_ae_title("ae_title", self.ae_title)
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port: expected 0-65535, got {self.port}")
        if self.allowed_calling_aets is not None:
            if not isinstance(self.allowed_calling_aets, frozenset) or not self.allowed_calling_aets:
                raise ConfigError(
                    "allowed_calling_aets: expected None or a non-empty frozenset, "
                    f"got {self.allowed_calling_aets!r}"
                )
            for aet in self.allowed_calling_aets:
                check_ae_title("allowed_calling_aets", aet)
        if self.allowed_addresses is not None and (
            not isinstance(self.allowed_addresses, frozenset) or not self.allowed_addresses
        ):
            raise ConfigError(
                "allowed_addresses: expected None or a non-empty frozenset, "
                f"got {self.allowed_addresses!r}"
            )
        for item in self.allowed_addresses or ():
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ConfigError(
                    f"allowed_addresses: expected IP addresses or CIDR networks, got {item!r}"
                ) from None
        if not self.sop_classes:
            raise ConfigError("sop_classes: expected at least one SOP Class UID, got none")
        if not self.offered_transfer_syntaxes:
            raise ConfigError(
                "transfer_syntaxes: expected at least one"
                + ("" if self.accept_compressed else " uncompressed (accept_compressed=False)")
                + f", got {self.transfer_syntaxes!r}"
            )
        # PS3.8 D.1: the maximum length is 0 (unlimited) or at least the PDV header overhead.
        if self.max_pdu_length != 0 and self.max_pdu_length < 4096:
            raise ConfigError(
                f"max_pdu_length: expected 0 (unlimited) or >= 4096, got {self.max_pdu_length}"
            )
        if self.max_associations < 1:
            raise ConfigError(f"max_associations: expected >= 1, got {self.max_associations}")
        if not self.idle_timeout_s > 0:
            raise ConfigError(f"idle_timeout_s: expected > 0, got {self.idle_timeout_s}")


    @property
    def offered_transfer_syntaxes(self) -> tuple[str, ...]:
        """The syntaxes actually offered, after ``accept_compressed``."""
        if self.accept_compressed:
            return tuple(self.transfer_syntaxes)
        return tuple(ts for ts in self.transfer_syntaxes if ts in _NOT_COMPRESSED)


@dataclass(frozen=True)
class ReceivedInstance:
    """One instance as received. ``raw`` is a complete PS3.10 file (preamble, meta, data set)."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    calling_ae: str
    peer_address: str
    raw: bytes = field(repr=False)


OnStore = Callable[[ReceivedInstance], Status]


def set_tcp_nodelay(event: Event) -> None:
    """EVT_CONN_OPEN handler for both ends of an association."""
    # DESIGN.md "Networking facts": without TCP_NODELAY Nagle + delayed ACK stall each DIMSE
    # reply ~40 ms; pynetdicom never sets it.
    sock = event.assoc.dul.socket.socket if event.assoc.dul.socket else None
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:  # socket already closed by the peer: nothing to tune
            log.debug("TCP_NODELAY not set: %s", exc)


class _Handlers:
    """Event handlers bound to one receiver; counts instances per association for the log."""

    def __init__(self, config: ReceiverConfig, on_store: OnStore) -> None:
        self._config = config
        self._on_store = on_store
        self._lock = threading.Lock()
        self._counts: dict[int, int] = {}
        self._networks = (
            None if config.allowed_addresses is None
            else tuple(ipaddress.ip_network(a, strict=False) for a in config.allowed_addresses)
        )

    def bindings(self) -> list[tuple[Any, Callable[..., Any]]]:
        return [
            (evt.EVT_CONN_OPEN, self.conn_open),
            (evt.EVT_REQUESTED, self.requested),
            (evt.EVT_C_STORE, self.c_store),
            (evt.EVT_CONN_CLOSE, self.conn_close),
        ]

    def conn_open(self, event: Event) -> None:
        set_tcp_nodelay(event)
        with self._lock:
            self._counts[id(event.assoc)] = 0

    def _address_allowed(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self._networks)

    def requested(self, event: Event) -> None:
        address = event.assoc.requestor.address
        if self._config.closed:
            # PS3.8 7.1.1.9: rejected-permanent, service-user, calling AE title not recognised.
            event.assoc.acse.send_reject(0x01, 0x01, 0x03)
            event.assoc.kill()
        elif self._networks is not None and not self._address_allowed(address):
            # PS3.8 7.1.1.9: rejected-permanent, source service-user, no reason given (there
            # is no "address not allowed" diagnostic).
            event.assoc.acse.send_reject(0x01, 0x01, 0x01)
            # As pynetdicom's own rejection does: wait until the DUL has sent the A-ASSOCIATE-RJ
            # before the server closes the socket, or the peer only sees a dropped connection.
            event.assoc.kill()

    def c_store(self, event: Event) -> int:
        assoc = event.assoc
        request = event.request
        instance = ReceivedInstance(
            sop_class_uid=str(request.AffectedSOPClassUID),
            sop_instance_uid=str(request.AffectedSOPInstanceUID),
            transfer_syntax_uid=str(event.context.transfer_syntax),
            calling_ae=str(assoc.requestor.ae_title).strip(),
            peer_address=str(assoc.requestor.address),
            raw=event.encoded_dataset(include_meta=True),
        )
        # One warning/error line per failed instance names the peer and the reason; the
        # instance UID goes to debug only (STYLE: identifiers at debug level, never names).
        log.debug("C-STORE %s from %s", instance.sop_instance_uid, instance.calling_ae)
        try:
            status = Status(self._on_store(instance))
        except StoreRefused as exc:
            log.warning("C-STORE from %s refused: %s", instance.calling_ae, exc)
            return int(exc.status)
        except OSError as exc:
            # PS3.4 B.2.3: a full disk is "out of resources", the peer may retry later.
            status = (
                Status.OUT_OF_RESOURCES if exc.errno == errno.ENOSPC else Status.PROCESSING_FAILURE
            )
            log.error("C-STORE from %s failed: %s: %s", instance.calling_ae, status.name, exc)
            return int(status)
        except Exception as exc:  # noqa: BLE001 - the server must keep serving other peers
            log.error(
                "C-STORE from %s failed in on_store: %s: %s",
                instance.calling_ae,
                type(exc).__name__,
                exc,
            )
            return int(Status.PROCESSING_FAILURE)
        if status == Status.SUCCESS:
            with self._lock:
                self._counts[id(assoc)] = self._counts.get(id(assoc), 0) + 1
        return int(status)

    def conn_close(self, event: Event) -> None:
        assoc = event.assoc
        with self._lock:
            count = self._counts.pop(id(assoc), 0)
        if assoc.is_rejected:
            outcome = "rejected"
        elif assoc.is_aborted:
            outcome = "aborted"
        elif assoc.is_released:
            outcome = "released"
        else:
            # EVT_CONN_CLOSE fires before pynetdicom marks a peer's A-ABORT on the association:
            # a connection that ends without A-RELEASE is an abort (PS3.8 7.3-7.4) either way.
            outcome = "aborted (no release)"
        calling = str(assoc.requestor.ae_title).strip()
        if not calling and assoc.requestor.primitive is not None:
            # Rejected before negotiation (address check): the title is only in the request.
            calling = str(assoc.requestor.primitive.calling_ae_title).strip()
        log.info(
            "association from %s at %s %s, %d instance(s) stored",
            calling or "?",
            assoc.requestor.address,
            outcome,
            count,
        )


class Receiver:
    """A running SCP. Use as a context manager or call :meth:`stop`."""

    def __init__(self, server: ThreadedAssociationServer, ae: AE) -> None:
        self._server = server
        self._ae = ae

    @property
    def port(self) -> int:
        """The port actually bound (useful with ``ReceiverConfig(port=0)``)."""
        return int(self._server.server_address[1])

    @property
    def host(self) -> str:
        return str(self._server.server_address[0])

    def stop(self) -> None:
        """Stop listening and close open associations; idempotent."""
        self._server.shutdown()

    def __enter__(self) -> Receiver:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def start_receiver(config: ReceiverConfig, on_store: OnStore) -> Receiver:
    """Start a non-blocking SCP for ``config``; every C-STORE goes to ``on_store``."""
    ae = AE(ae_title=config.ae_title)
    ae.maximum_pdu_size = config.max_pdu_length
    ae.maximum_associations = config.max_associations
    ae.network_timeout = config.idle_timeout_s
    ae.dimse_timeout = config.idle_timeout_s
    ae.acse_timeout = config.idle_timeout_s
    if config.allowed_calling_aets is not None:
        # pynetdicom answers A-ASSOCIATE-RJ "calling AE title not recognised" (PS3.8 7.1.1.9).
        ae.require_calling_aet = sorted(config.allowed_calling_aets)
    for sop_class in config.sop_classes:
        ae.add_supported_context(sop_class, list(config.offered_transfer_syntaxes))
    ae.add_supported_context(VERIFICATION, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])

    handlers = _Handlers(config, on_store)
    server = ae.start_server(
        (config.host, config.port),
        block=False,
        evt_handlers=handlers.bindings(),
        ssl_context=config.tls,
    )
    if server is None:  # block=False always returns the server; guard the type
        raise RuntimeError("pynetdicom start_server(block=False) returned no server")
    receiver = Receiver(server, ae)
    log.info("receiver %s listening on %s:%d", config.ae_title, receiver.host, receiver.port)
    return receiver
