"""The sending side: C-STORE SCU and C-ECHO built on pynetdicom.

Presentation contexts are built from what is actually sent (PS3.8 7.1.1.13): for each SOP class
one context offering Explicit and Implicit VR Little Endian, and for each compressed or deflated
syntax in use a context offering exactly that syntax (pixels are never decompressed here). A
peer that is down or refuses is reported in the :class:`SendReport`, never raised: the caller
decides about retries.
"""

from __future__ import annotations

import logging
import re
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import Verification

from .errors import ConfigError
from .scp import set_tcp_nodelay
from .status import describe, is_stored
from .vr import check_ae_title

__all__ = [
    "MAX_CONTEXTS",
    "PARAMETRIC_MAP_STORAGE",
    "Destination",
    "EchoResult",
    "InstanceResult",
    "SendReport",
    "build_contexts",
    "echo",
    "send_files",
]

log = logging.getLogger(__name__)

# PS3.8 9.3.2.2: presentation context IDs are odd numbers 1-255, so at most 128 per association.
MAX_CONTEXTS = 128
# PS3.4 B.5; absent from pynetdicom's StoragePresentationContexts, so always named explicitly.
PARAMETRIC_MAP_STORAGE = "1.2.840.10008.5.1.4.1.1.30"
_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)

_DEST_RE = re.compile(r"^(?P<aet>[^@]+)@(?P<host>\[[0-9A-Fa-f:.]+\]|[^:@\[\]]+):(?P<port>\d+)$")


@dataclass(frozen=True)
class Destination:
    """A remote SCP: AE title, host, port."""

    ae_title: str
    host: str
    port: int

    def __post_init__(self) -> None:
        check_ae_title("ae_title", self.ae_title)
        if not self.host:
            raise ConfigError(f"host: expected a host name or address, got {self.host!r}")
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"port: expected 1-65535, got {self.port}")

    @classmethod
    def parse(cls, text: str) -> Destination:
        """Parse ``"AET@HOST:PORT"`` (IPv6 hosts in brackets: ``"AET@[::1]:104"``)."""
        match = _DEST_RE.match(text.strip()) if isinstance(text, str) else None
        if match is None:
            raise ConfigError(f"destination: expected 'AET@HOST:PORT', got {text!r}")
        host = match["host"].strip("[]")
        return cls(match["aet"], host, int(match["port"]))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class InstanceResult:
    """Outcome for one item. ``status`` is None when no C-STORE response came back."""

    path_or_uid: str
    sop_instance_uid: str
    status: int | None
    ok: bool
    message: str


@dataclass(frozen=True)
class SendReport:
    destination: Destination
    results: tuple[InstanceResult, ...]
    association_ok: bool
    error: str | None

    @property
    def all_ok(self) -> bool:
        return self.association_ok and all(r.ok for r in self.results)

    @property
    def n_ok(self) -> int:
        return sum(r.ok for r in self.results)

    @property
    def n_failed(self) -> int:
        return len(self.results) - self.n_ok


@dataclass(frozen=True)
class _Item:
    source: Path | Dataset
    label: str
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str


def _context_keys(sop_class: str, ts: str) -> set[tuple[str, tuple[str, ...]]]:
    # Uncompressed data may go in either little-endian syntax (pynetdicom converts);
    # compressed/deflated data needs its own syntax accepted.
    keys = {(sop_class, _UNCOMPRESSED)}
    if ts not in _UNCOMPRESSED:
        keys.add((sop_class, (ts,)))
    return keys


def build_contexts(pairs: Sequence[tuple[str, str]]) -> list[PresentationContext]:
    """Requested contexts for (SOP Class UID, Transfer Syntax UID) pairs, deduplicated."""
    keys: set[tuple[str, tuple[str, ...]]] = set()
    for sop_class, ts in pairs:
        keys |= _context_keys(sop_class, ts)
    if len(keys) > MAX_CONTEXTS:
        raise ValueError(
            f"pairs: need {len(keys)} presentation contexts, at most {MAX_CONTEXTS} fit one "
            "association (PS3.8 9.3.2.2)"
        )
    return [build_context(sop, list(tss)) for sop, tss in sorted(keys)]


def _describe_item(source: Path | str | Dataset) -> _Item:
    if isinstance(source, Dataset):
        meta = getattr(source, "file_meta", None)
        ts = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
        if ts is None:
            # PS3.10 7.1: the syntax lives in the file meta; we do not guess an encoding.
            raise AttributeError(
                f"dataset {source.get('SOPInstanceUID', '?')}: expected file_meta with "
                "(0002,0010) Transfer Syntax UID, got none"
            )
        return _Item(source, str(source.SOPInstanceUID), str(source.SOPClassUID),
                     str(source.SOPInstanceUID), str(ts))
    path = Path(source)
    meta = read_file_meta_info(path)
    return _Item(path, str(path), str(meta.MediaStorageSOPClassUID),
                 str(meta.MediaStorageSOPInstanceUID), str(meta.TransferSyntaxUID))


def _batches(items: list[_Item]) -> list[list[_Item]]:
    # Greedy packing so that each association requests at most MAX_CONTEXTS contexts.
    batches: list[list[_Item]] = []
    current: list[_Item] = []
    keys: set[tuple[str, tuple[str, ...]]] = set()
    for item in items:
        need = _context_keys(item.sop_class_uid, item.transfer_syntax_uid)
        if current and len(keys | need) > MAX_CONTEXTS:
            batches.append(current)
            current, keys = [], set()
        current.append(item)
        keys |= need
    if current:
        batches.append(current)
    return batches


def _make_ae(calling_ae: str, timeout_s: float) -> AE:
    check_ae_title("calling_ae", calling_ae)
    if not timeout_s > 0:
        raise ConfigError(f"timeout_s: expected > 0, got {timeout_s}")
    ae = AE(ae_title=calling_ae)
    ae.network_timeout = timeout_s
    ae.acse_timeout = timeout_s
    ae.dimse_timeout = timeout_s
    ae.connection_timeout = timeout_s
    return ae


def _association_error(assoc: object, destination: Destination) -> str:
    if getattr(assoc, "is_rejected", False):
        rj = assoc.acceptor.primitive  # type: ignore[attr-defined]
        reason = getattr(rj, "reason_str", None) or (
            f"result {rj.result}, source {rj.result_source}, diagnostic {rj.diagnostic}"
        )
        return f"association rejected by {destination}: {reason}"
    if getattr(assoc, "is_aborted", False):
        return f"association with {destination} aborted (peer down, refused or not DICOM)"
    return f"association with {destination} not established (peer unreachable or timed out)"


def _address_error(exc: OSError, destination: Destination) -> str:
    """An unresolvable host name is a peer that cannot be reached, not a crash."""
    return (f"association with {destination} not established: cannot resolve or use host "
            f"{destination.host!r} ({exc.strerror or exc})")


def _tls_args(
    tls: ssl.SSLContext | None, destination: Destination
) -> tuple[ssl.SSLContext, str] | None:
    return (tls, destination.host) if tls is not None else None


def send_files(
    items: Sequence[Path | str | Dataset],
    destination: Destination,
    *,
    calling_ae: str = "DIPNODE",
    tls: ssl.SSLContext | None = None,
    timeout_s: float = 30.0,
    progress: Callable[[int, int], None] | None = None,
) -> SendReport:
    """C-STORE every item (file path or Dataset with file meta) to ``destination``.

    ``progress(done, total)`` is called after each instance. One association per batch of at
    most 128 presentation contexts (normally one in all).
    """
    results: list[InstanceResult] = []
    described: list[_Item] = []
    for source in items:
        try:
            described.append(_describe_item(source))
        except InvalidDicomError:
            # pydicom's own text tells a programmer to pass force=True; the user needs to know
            # that this file is not a DICOM file (PS3.10 7.1: preamble, "DICM", file meta).
            results.append(InstanceResult(str(source), "", None, False,
                                          "not a DICOM file (no DICOM file meta information, "
                                          "PS3.10 7.1)"))
        except OSError as exc:
            results.append(InstanceResult(str(source), "", None, False,
                                          f"cannot read the file: {exc.strerror or exc}"))
        except AttributeError as exc:
            results.append(InstanceResult(str(source), "", None, False, str(exc)))
    total = len(results) + len(described)
    ae = _make_ae(calling_ae, timeout_s)
    association_ok = True
    error: str | None = None
    done = len(results)

    def one_done(_result: InstanceResult) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    for batch in _batches(described):
        outcome: dict[int, InstanceResult] = {}  # by position in the batch
        todo = list(range(len(batch)))
        for attempt in range(1 + LOST_RESPONSE_RETRIES):
            sent, batch_error, aborted = _send_batch(
                ae, [batch[i] for i in todo], destination, tls, one_done if attempt == 0 else None)
            outcome.update(zip(todo, sent))
            # A store with no response on an association that then aborted may be a response
            # pynetdicom's reactor thread took off the queue before send_c_store could (a race
            # seen under CPU load, pynetdicom issue #850): C-STORE is idempotent, so those
            # instances go again, once, on a fresh association.
            lost = [i for i in todo if outcome[i].status is None]
            if not (aborted and lost):
                break
            log.warning("association with %s aborted with %d instance(s) unanswered; "
                        "sending them again (attempt %d)", destination, len(lost), attempt + 2)
            todo = lost
        if batch_error is not None:
            association_ok = False
            error = batch_error
        results.extend(outcome[i] for i in range(len(batch)))
    report = SendReport(destination, tuple(results), association_ok, error)
    log.info("sent to %s: %d ok, %d failed", destination, report.n_ok, report.n_failed)
    return report


LOST_RESPONSE_RETRIES = 1


def _send_batch(ae: AE, batch: list[_Item], destination: Destination, tls: ssl.SSLContext | None,
                on_result: Callable[[InstanceResult], None] | None,
                ) -> tuple[list[InstanceResult], str | None, bool]:
    """One association for one batch: (a result per item, error or None, aborted during
    transfer)."""
    contexts = build_contexts([(i.sop_class_uid, i.transfer_syntax_uid) for i in batch])
    error: str | None = None
    try:
        assoc = ae.associate(
            destination.host,
            destination.port,
            contexts=contexts,
            ae_title=destination.ae_title,
            evt_handlers=[(evt.EVT_CONN_OPEN, set_tcp_nodelay)],
            tls_args=_tls_args(tls, destination),
        )
    except OSError as exc:  # pynetdicom resolves the host name before connecting
        assoc, error = None, _address_error(exc, destination)
    if assoc is None or not assoc.is_established:
        error = error or _association_error(assoc, destination)
        log.warning("%s", error)
        failed = [InstanceResult(i.label, i.sop_instance_uid, None, False, error) for i in batch]
        for r in failed:
            if on_result is not None:
                on_result(r)
        return failed, error, False
    results: list[InstanceResult] = []
    try:
        for item in batch:
            results.append(_store_one(assoc, item))
            if on_result is not None:
                on_result(results[-1])
    finally:
        if assoc.is_established:
            assoc.release()
    if assoc.is_aborted:
        return results, f"association with {destination} aborted during transfer", True
    return results, None, False


def _store_one(assoc: object, item: _Item) -> InstanceResult:
    if not assoc.is_established:  # type: ignore[attr-defined]
        return InstanceResult(item.label, item.sop_instance_uid, None, False,
                              "association lost before this instance was sent")
    try:
        rsp = assoc.send_c_store(item.source)  # type: ignore[attr-defined]
    except (ValueError, AttributeError, OSError, RuntimeError, InvalidDicomError) as exc:
        # RuntimeError: the association dropped between the check above and the send.
        # No accepted context for this SOP class / transfer syntax, or an unencodable data set.
        return InstanceResult(item.label, item.sop_instance_uid, None, False,
                              f"not sent: {exc}")
    code = rsp.get("Status") if rsp is not None else None
    if code is None:
        return InstanceResult(item.label, item.sop_instance_uid, None, False,
                              "no C-STORE response (timeout, abort or invalid response)")
    code = int(code)
    comment = str(rsp.get("ErrorComment", "")) if "ErrorComment" in rsp else ""
    message = describe(code) + (f": {comment}" if comment else "")
    return InstanceResult(item.label, item.sop_instance_uid, code, is_stored(code), message)


@dataclass(frozen=True)
class EchoResult:
    ok: bool
    message: str

    def __bool__(self) -> bool:
        return self.ok


def echo(
    destination: Destination,
    calling_ae: str = "DIPNODE",
    tls: ssl.SSLContext | None = None,
    timeout_s: float = 10.0,
) -> EchoResult:
    """C-ECHO ``destination`` (PS3.4 Annex A). Truthy when the peer answered SUCCESS."""
    ae = _make_ae(calling_ae, timeout_s)
    ae.add_requested_context(Verification)
    try:
        assoc = ae.associate(
            destination.host,
            destination.port,
            ae_title=destination.ae_title,
            evt_handlers=[(evt.EVT_CONN_OPEN, set_tcp_nodelay)],
            tls_args=_tls_args(tls, destination),
        )
    except OSError as exc:  # pynetdicom resolves the host name before connecting
        return EchoResult(False, _address_error(exc, destination))
    if not assoc.is_established:
        return EchoResult(False, _association_error(assoc, destination))
    try:
        rsp = assoc.send_c_echo()
    finally:
        if assoc.is_established:
            assoc.release()
    code = rsp.get("Status") if rsp is not None else None
    if code is None:
        return EchoResult(False, "no C-ECHO response")
    return EchoResult(int(code) == 0, describe(int(code)))
