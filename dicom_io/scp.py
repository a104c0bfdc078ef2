"""The receiving side: a C-STORE / C-ECHO SCP built on pynetdicom.

The handler writes nothing itself: it wraps the bytes as received (PS3.10 file = preamble, file
meta from the presentation context, the encoded data set, never decoded and re-encoded) into a
:class:`ReceivedInstance`, hands it to ``on_store`` and answers with the status it returns.

Connection slots (no peer may hold the node): pynetdicom's own timers and counters are used
and set so that a connection costs a slot only while it does something useful:

- ARTIM (PS3.8 9.1.5): ``request_timeout_s`` is pynetdicom's ACSE timeout, which is both the
  DUL's ARTIM timer (a connection without an A-ASSOCIATE-RQ is closed when it expires) and how
  long an acceptor thread waits for that request; the socket's own timeout is the same until
  the request has arrived, so half a PDU cannot stall the reader either, then ``idle_timeout_s``.
- A peer that closes before asking: pynetdicom's DUL goes back to idle (AA-5) but its acceptor
  thread would wait out the ACSE timeout, holding a slot (``AE.maximum_associations`` counts
  live acceptor threads, ``AssociationServer.active_associations``). The EVT_CONN_CLOSE handler
  wakes that thread at once (it reads "no request" and ends).
- ``max_associations_per_address``: a request from an address that already has that many
  other connections open is rejected (A-ASSOCIATE-RJ, transient, local limit exceeded), and a
  connection beyond that number + 1 from one address, or beyond ``2 x max_associations`` in
  all, is closed when it is accepted (``verify_request``), before a thread is started. Both are
  counted the way pynetdicom counts slots (live acceptor threads), so one address cannot take
  every slot. TLS handshakes run in the connection's own thread with the request timeout,
  never in the accept loop.
- PDUs longer than we accept (our maximum PDU length, at least 1 MiB for A-ASSOCIATE-RQ) end
  the connection before their body is read; data-set fragments beyond ``max_instance_bytes``
  are dropped as they arrive and the C-STORE is answered INSTANCE_TOO_LARGE, so a peer cannot
  make the node buffer more than that per association.

Every refusal (association rejected, connection closed, instance refused) is one log line that
says why, with the peer's address; wire values in it go through :func:`logsafe.shown`.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.pdu import P_DATA_TF
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

from .errors import ConfigError
from .logsafe import shown
from .status import Status, StoreRefused, describe
from .vr import check_ae_title

__all__ = [
    "DEFAULT_SOP_CLASSES",
    "DEFAULT_TRANSFER_SYNTAXES",
    "ConfigError",
    "ReceivedInstance",
    "Receiver",
    "ReceiverConfig",
    "StoreRefused",
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

# PS3.5 A.1-A.2: the uncompressed syntaxes. Deflate (A.5) compresses the whole data set and is
# a compression like the others: accept_compressed=False means no inflation of any kind.
_NOT_COMPRESSED = frozenset({ExplicitVRLittleEndian, ImplicitVRLittleEndian})
MIB = 1 << 20
# What a healthy peer never exceeds: a command set is a few hundred bytes (PS3.7 E.1), an
# A-ASSOCIATE-RQ with a hundred presentation contexts some 20 kB.
_MAX_COMMAND_BYTES = 64 * 1024
_MIN_PDU_CAP = MIB

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
    # False keeps only Explicit and Implicit VR Little Endian of ``transfer_syntaxes`` (a site
    # that wants no decompression or inflation at all); peers then convert (PS3.5 10).
    accept_compressed: bool = True
    max_pdu_length: int = 65536  # 0 = unlimited (PS3.8 D.1)
    max_associations: int = 10
    # At most this many connections from one address at once (min'ed with max_associations).
    max_associations_per_address: int = 5
    idle_timeout_s: float = 60.0  # network and DIMSE timeouts of an established association
    # PS3.8 9.1.5 ARTIM: a connection that has not sent its A-ASSOCIATE-RQ in this time is closed.
    request_timeout_s: float = 5.0
    # Larger C-STORE data sets are refused (INSTANCE_TOO_LARGE) without being buffered.
    max_instance_bytes: int = 64 * MIB
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
        if self.max_associations_per_address < 1:
            raise ConfigError("max_associations_per_address: expected >= 1, got "
                              f"{self.max_associations_per_address}")
        for name in ("idle_timeout_s", "request_timeout_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 < value < float("inf")):
                raise ConfigError(f"{name}: expected a finite number > 0, got {value!r}")
        if self.max_instance_bytes < 4096:
            raise ConfigError(f"max_instance_bytes: expected >= 4096, got {self.max_instance_bytes}")

    @property
    def per_address_limit(self) -> int:
        return min(self.max_associations_per_address, self.max_associations)

    @property
    def max_connections(self) -> int:
        """Connections open at once (associations and those still to ask): a bound on threads."""
        return 2 * self.max_associations

    @property
    def pdu_cap(self) -> int:
        """The longest PDU read: our maximum PDU length (PS3.8 D.1), at least 1 MiB so that any
        A-ASSOCIATE-RQ fits; with no maximum (0), one instance and its headers."""
        limit = self.max_pdu_length or self.max_instance_bytes + 64 * 1024
        return max(limit, _MIN_PDU_CAP)

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


def _file_bytes(event: Event) -> bytes:
    """The PS3.10 file of a C-STORE request: preamble, file meta, the data set as received.

    What ``event.encoded_dataset(include_meta=True)`` returns, built from a view of
    pynetdicom's buffer: that method copies the data set twice (getvalue, then join), this once,
    so a received instance costs about two copies per association instead of three
    (bench/RELIABILITY.md, memory under hostile associations).
    """
    meta = DicomBytesIO()
    meta.is_little_endian, meta.is_implicit_VR = True, False
    write_file_meta_info(meta, event.file_meta, enforce_standard=True)
    with event.request.DataSet.getbuffer() as view:
        return b"".join((b"\x00" * 128, b"DICM", meta.getvalue(), view))


def set_tcp_nodelay(event: Event) -> None:
    """EVT_CONN_OPEN handler for both ends of an association."""
    # docs/DESIGN.md "Networking facts": without TCP_NODELAY Nagle + delayed ACK stall each DIMSE
    # reply ~40 ms; pynetdicom never sets it.
    sock = event.assoc.dul.socket.socket if event.assoc.dul.socket else None
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:  # socket already closed by the peer: nothing to tune
            log.debug("TCP_NODELAY not set: %s", exc)


@dataclass
class _Incoming:
    """The DIMSE message being received on one association (PDV bytes counted as they come)."""

    data_bytes: int = 0
    command_bytes: int = 0
    dropped: bool = False  # data-set fragments beyond max_instance_bytes were thrown away
    finished: tuple[bool, int] | None = None  # (dropped, size) once the last fragment came


# PS3.8 7.1.1.9 A-ASSOCIATE-RJ (source, diagnostic) as pynetdicom sends them, in words.
def _rejection(source: int | None, diagnostic: int | None, calling: str, called: str,
               config: ReceiverConfig) -> str:
    if (source, diagnostic) == (0x01, 0x03):
        return f"calling AE title {calling} not allowed (allowed_calling_aets)"
    if (source, diagnostic) == (0x01, 0x07):
        return f"called AE title {called} is not ours ({config.ae_title})"
    if (source, diagnostic) == (0x03, 0x02):
        return f"too many associations (max_associations = {config.max_associations})"
    if source == 0x02:
        return "user identity not accepted"
    return f"source {source}, diagnostic {diagnostic}"


class _Handlers:
    """Event handlers bound to one receiver; counts instances per association for the log."""

    def __init__(self, config: ReceiverConfig, on_store: OnStore,
                 on_status: Callable[[int], None] | None = None) -> None:
        self._config = config
        self._on_store = on_store
        self._on_status = on_status
        self._lock = threading.Lock()
        self._counts: dict[int, int] = {}
        self._opened: dict[int, float] = {}
        self._incoming: dict[int, _Incoming] = {}
        self._oversize: dict[tuple[int, int], int] = {}  # (assoc, message ID) -> bytes seen
        self.server: ThreadedAssociationServer | None = None  # set by start_receiver
        self._networks = (
            None if config.allowed_addresses is None
            else tuple(ipaddress.ip_network(a, strict=False) for a in config.allowed_addresses)
        )

    def bindings(self) -> list[tuple[Any, Callable[..., Any]]]:
        return [
            (evt.EVT_CONN_OPEN, self.conn_open),
            (evt.EVT_REQUESTED, self.requested),
            (evt.EVT_REJECTED, self.rejected),
            (evt.EVT_PDU_RECV, self.pdu_received),
            (evt.EVT_DIMSE_RECV, self.message_received),
            (evt.EVT_C_STORE, self.c_store),
            (evt.EVT_CONN_CLOSE, self.conn_close),
        ]

    @staticmethod
    def _calling(assoc: Any) -> str:
        calling = str(assoc.requestor.ae_title or "").strip()
        if not calling and assoc.requestor.primitive is not None:
            # Rejected before negotiation (our checks): the title is only in the request.
            calling = str(assoc.requestor.primitive.calling_ae_title or "").strip()
        return shown(calling, 32) if calling else "?"

    def conn_open(self, event: Event) -> None:
        set_tcp_nodelay(event)
        assoc = event.assoc
        with self._lock:
            self._counts[id(assoc)] = 0
            self._opened[id(assoc)] = time.monotonic()
            self._incoming[id(assoc)] = _Incoming()
        sock = assoc.dul.socket
        if sock is None:
            return
        if sock.socket is not None:
            # Until the A-ASSOCIATE-RQ is in, a read blocked mid-PDU ends with the request timer.
            sock.socket.settimeout(self._config.request_timeout_s)
        cap, address = self._config.pdu_cap, assoc.requestor.address
        read = sock.recv

        def bounded_recv(nr_bytes: int) -> bytearray:
            # pynetdicom reads a PDU's 6-byte header, then exactly its announced length: refuse
            # before reading (and buffering) a body longer than any PDU we accept.
            if nr_bytes > cap:
                log.warning("connection from %s closed: PDU of %d bytes announced, at most %d "
                            "accepted (max_pdu)", address, nr_bytes, cap)
                raise OSError(f"PDU of {nr_bytes} bytes exceeds {cap}")
            return read(nr_bytes)

        sock.recv = bounded_recv  # type: ignore[method-assign]

    def _address_allowed(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self._networks)

    def _reject(self, event: Event, reason: str, rsd: tuple[int, int, int]) -> None:
        # pynetdicom triggers EVT_REJECTED only for its own rejections: this one is logged here.
        log.warning("association from %s at %s rejected: %s", self._calling(event.assoc),
                    event.assoc.requestor.address, reason)
        event.assoc.acse.send_reject(*rsd)
        # As pynetdicom's own rejection does: wait until the DUL has sent the A-ASSOCIATE-RJ
        # before the server closes the socket, or the peer only sees a dropped connection.
        event.assoc.kill()

    def requested(self, event: Event) -> None:
        assoc = event.assoc
        address = assoc.requestor.address
        sock = assoc.dul.socket
        if sock is not None and sock.socket is not None:
            sock.socket.settimeout(self._config.idle_timeout_s)  # the request is in: ARTIM is done
        if self._config.closed:
            # PS3.8 7.1.1.9: rejected-permanent, service-user, calling AE title not recognised.
            self._reject(event, "node closed (allowed_calling_aets is empty)", (0x01, 0x01, 0x03))
        elif self._networks is not None and not self._address_allowed(address):
            # PS3.8 7.1.1.9: rejected-permanent, source service-user, no reason given (there
            # is no "address not allowed" diagnostic).
            self._reject(event, f"address {address} not allowed (allowed_addresses)", (0x01, 0x01, 0x01))
        elif self.server is not None:
            others = sum(1 for a in self.server.active_associations
                         if a is not assoc and a.requestor.address == address)
            if others >= self._config.per_address_limit:
                # PS3.8 7.1.1.9: rejected-transient, service-provider (presentation), local
                # limit exceeded: the peer may try again later.
                self._reject(event, f"too many associations from address {address} "
                             f"(max_associations_per_address = {self._config.per_address_limit})",
                             (0x02, 0x03, 0x02))

    def rejected(self, event: Event) -> None:
        """pynetdicom rejected the request (calling or called AE title, max_associations)."""
        assoc = event.assoc
        primitive = assoc.requestor.primitive
        rj = assoc.acceptor.primitive  # pynetdicom's send_reject keeps the A-ASSOCIATE-RJ here
        reason = _rejection(getattr(rj, "result_source", None), getattr(rj, "diagnostic", None),
                            self._calling(assoc),
                            shown(str(getattr(primitive, "called_ae_title", "") or "").strip(), 32),
                            self._config)
        log.warning("association from %s at %s rejected: %s", self._calling(assoc),
                    assoc.requestor.address, reason)

    def pdu_received(self, event: Event) -> None:
        """Count the PDV bytes of the message being received; drop data-set fragments beyond
        ``max_instance_bytes`` (the DIMSE layer then assembles at most that much)."""
        pdu = event.pdu
        if not isinstance(pdu, P_DATA_TF):
            return
        with self._lock:
            st = self._incoming.setdefault(id(event.assoc), _Incoming())
        for item in pdu.presentation_data_value_items:
            data = item.presentation_data_value or b""
            if not data:
                continue
            control = data[0]  # PS3.8 E.2: bit 0 command / data set, bit 1 last fragment
            if control & 0x01:
                st.command_bytes += len(data) - 1
                if st.command_bytes > _MAX_COMMAND_BYTES:
                    item.presentation_data_value = data[:1]  # the command is then undecodable
                continue
            st.data_bytes += len(data) - 1
            if st.data_bytes > self._config.max_instance_bytes:
                item.presentation_data_value = data[:1]  # keep the header: the last bit counts
                st.dropped = True
            if control & 0x02:
                st.finished = (st.dropped, st.data_bytes)
                st.data_bytes, st.dropped = 0, False

    def message_received(self, event: Event) -> None:
        """A whole DIMSE message is in: remember, by its Message ID, whether its data set was cut."""
        with self._lock:
            st = self._incoming.setdefault(id(event.assoc), _Incoming())
            finished, st.finished, st.command_bytes = st.finished, None, 0
            if finished is None or not finished[0]:
                return
            message_id = getattr(event.message.command_set, "MessageID", None)
            if message_id is not None:
                self._oversize[(id(event.assoc), int(message_id))] = finished[1]

    def c_store(self, event: Event) -> int:
        status = self._c_store(event)
        if self._on_status is not None:
            try:
                self._on_status(status)
            except Exception:  # noqa: BLE001 - counting never changes the answer
                log.exception("on_status failed")
        return status

    def _c_store(self, event: Event) -> int:
        assoc = event.assoc
        request = event.request
        calling = self._calling(assoc)
        with self._lock:
            oversize = self._oversize.pop((id(assoc), int(request.MessageID)), None)
        if oversize is not None:
            status = Status.INSTANCE_TOO_LARGE
            log.warning("C-STORE from %s at %s refused: %s: data set of %d bytes or more exceeds "
                        "max_instance_bytes (%d); nothing kept", calling, assoc.requestor.address,
                        describe(status), oversize, self._config.max_instance_bytes)
            return int(status)
        instance = ReceivedInstance(
            sop_class_uid=str(request.AffectedSOPClassUID),
            sop_instance_uid=str(request.AffectedSOPInstanceUID),
            transfer_syntax_uid=str(event.context.transfer_syntax),
            calling_ae=str(assoc.requestor.ae_title).strip(),
            peer_address=str(assoc.requestor.address),
            raw=_file_bytes(event),
        )
        # One warning/error line per failed instance names the peer and the reason; the
        # instance UID goes to debug only (STYLE: identifiers at debug level, never names).
        log.debug("C-STORE %s from %s", shown(instance.sop_instance_uid, 80), calling)
        try:
            status = Status(self._on_store(instance))
        except StoreRefused as exc:
            log.warning("C-STORE from %s refused: %s", calling, shown(exc, 400))
            return int(exc.status)
        except OSError as exc:
            # PS3.4 B.2.3: a full disk is "out of resources", the peer may retry later.
            status = (
                Status.OUT_OF_RESOURCES if exc.errno == errno.ENOSPC else Status.PROCESSING_FAILURE
            )
            log.error("C-STORE from %s failed: %s: %s", calling, status.name, shown(exc, 300))
            return int(status)
        except Exception as exc:  # noqa: BLE001 - the server must keep serving other peers
            log.error("C-STORE from %s failed in on_store: %s: %s", calling,
                      type(exc).__name__, shown(exc, 300))
            return int(Status.PROCESSING_FAILURE)
        if status == Status.SUCCESS:
            with self._lock:
                self._counts[id(assoc)] = self._counts.get(id(assoc), 0) + 1
        return int(status)

    def conn_close(self, event: Event) -> None:
        assoc = event.assoc
        key = id(assoc)
        with self._lock:
            count = self._counts.pop(key, 0)
            opened = self._opened.pop(key, None)
            self._incoming.pop(key, None)
            for k in [k for k in self._oversize if k[0] == key]:
                del self._oversize[k]
        if assoc.is_acceptor and assoc.requestor.primitive is None:
            # Closed before any A-ASSOCIATE-RQ: by the peer (DUL AA-5) or by the request timer
            # (AA-2). pynetdicom's acceptor thread would still wait out the ACSE timeout for the
            # request, holding a slot: wake it with "no request" so that it ends now.
            assoc.dul.to_user_queue.put(None)
            waited = time.monotonic() - opened if opened is not None else 0.0
            if waited >= self._config.request_timeout_s * 0.9:
                log.warning("connection from %s closed: no A-ASSOCIATE-RQ within request_timeout_s "
                            "(%.3g s, PS3.8 ARTIM)", assoc.requestor.address, self._config.request_timeout_s)
            else:
                log.info("connection from %s closed before any valid association request (closed by "
                         "the peer, or an undecodable PDU)", assoc.requestor.address)
            return
        if assoc.is_rejected:
            return  # the rejection has its own line (rejected())
        if assoc.is_aborted:
            outcome = "aborted"
        elif assoc.is_released:
            outcome = "released"
        else:
            # EVT_CONN_CLOSE fires before pynetdicom marks a peer's A-ABORT on the association:
            # a connection that ends without A-RELEASE is an abort (PS3.8 7.3-7.4) either way.
            outcome = "aborted (no release)"
        log.info(
            "association from %s at %s %s, %d instance(s) stored",
            self._calling(assoc),
            assoc.requestor.address,
            outcome,
            count,
        )


class _Server(ThreadedAssociationServer):
    """pynetdicom's threaded server with per-connection limits checked at accept time and the
    TLS handshake moved off the accept loop (see the module docstring)."""

    def __init__(self, *args: Any, config: ReceiverConfig, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._config = config
        self._pending: dict[str, int] = {}  # accepted, acceptor thread not started yet
        self._pending_lock = threading.Lock()

    def verify_request(self, request: Any, client_address: Any) -> bool:
        address = str(client_address[0])
        live = [a.requestor.address for a in self.active_associations]
        with self._pending_lock:
            pending_total = sum(self._pending.values())
            from_address = live.count(address) + self._pending.get(address, 0)
            if len(live) + pending_total >= self._config.max_connections:
                log.warning("connection from %s refused: %d connections open, at most %d "
                            "(2 x max_associations)", address, len(live) + pending_total,
                            self._config.max_connections)
                return False
            # One more than the limit gets through, so that a peer that asks is told why
            # (A-ASSOCIATE-RJ in requested()); beyond that, silent connections are closed here.
            if from_address > self._config.per_address_limit:
                log.warning("connection from %s refused: %d connections from this address already "
                            "open (max_associations_per_address = %d)", address, from_address,
                            self._config.per_address_limit)
                return False
            self._pending[address] = self._pending.get(address, 0) + 1
        return True

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        # The plain socket; a TLS handshake in the accept loop would let one silent client stop
        # every other connection (pynetdicom wraps here, with no timeout).
        assert self.socket is not None
        return self.socket.accept()

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        address = str(client_address[0])
        try:
            if self.ssl_context is not None:
                request.settimeout(self._config.request_timeout_s)
                try:
                    request = self.ssl_context.wrap_socket(request, server_side=True)
                except (OSError, ssl.SSLError) as exc:
                    log.warning("connection from %s closed: TLS handshake failed: %s", address,
                                shown(exc, 200))
                    self.shutdown_request(request)
                    return
            super().process_request_thread(request, client_address)
        finally:
            with self._pending_lock:
                left = self._pending.get(address, 1) - 1
                if left > 0:
                    self._pending[address] = left
                else:
                    self._pending.pop(address, None)


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
        if self._server in self._ae._servers:
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


def start_receiver(config: ReceiverConfig, on_store: OnStore,
                   on_status: Callable[[int], None] | None = None) -> Receiver:
    """Start a non-blocking SCP for ``config``; every C-STORE goes to ``on_store``, and the
    status answered to each (refusals before ``on_store`` included) to ``on_status``."""
    ae = AE(ae_title=config.ae_title)
    ae.maximum_pdu_size = config.max_pdu_length
    ae.maximum_associations = config.max_associations
    ae.network_timeout = config.idle_timeout_s
    ae.dimse_timeout = config.idle_timeout_s
    # The ACSE timeout is the DUL's ARTIM timer and the acceptor's wait for the request.
    ae.acse_timeout = config.request_timeout_s
    if config.allowed_calling_aets is not None:
        # pynetdicom answers A-ASSOCIATE-RJ "calling AE title not recognised" (PS3.8 7.1.1.9).
        ae.require_calling_aet = sorted(config.allowed_calling_aets)
    for sop_class in config.sop_classes:
        ae.add_supported_context(sop_class, list(config.offered_transfer_syntaxes))
    ae.add_supported_context(VERIFICATION, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])

    handlers = _Handlers(config, on_store, on_status)
    # AE.start_server(block=False) with our server class (AE.make_server's documented hook).
    server = ae.make_server((config.host, config.port), evt_handlers=handlers.bindings(),
                            ssl_context=config.tls, server_class=_Server, config=config)
    handlers.server = server
    thread = threading.Thread(target=server.serve_forever, name=f"dipnode-accept-{config.ae_title}",
                              daemon=True)
    thread.start()
    ae._servers.append(server)  # as start_server does: AssociationServer.shutdown removes it
    receiver = Receiver(server, ae)
    log.info("receiver %s listening on %s:%d", config.ae_title, receiver.host, receiver.port)
    return receiver
