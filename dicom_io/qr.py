"""Query/retrieve SCU: find a patient's prior series at a PACS and retrieve one series.

Study Root Query/Retrieve Information Model (PS3.4 C.6.2): C-FIND at STUDY level (Patient ID,
Issuer of Patient ID, Modalities in Study, a Study Date range), then at SERIES level within each
study found; C-MOVE to an AE title the PACS knows (its sub-operations are C-STOREs from the
PACS to that AE, PS3.4 C.4.2), or C-GET, whose C-STORE sub-operations come back on our own
association (PS3.4 C.4.3; SCP/SCU Role Selection, PS3.7 D.3.3.4). As in scu.py, a peer that is
down or refuses is reported in the result, never raised: the caller owns the retry policy.
"""
from __future__ import annotations

import logging
import ssl
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date
from enum import IntEnum
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from .scp import (
    DEFAULT_TRANSFER_SYNTAXES,
    ENHANCED_MR_IMAGE_STORAGE,
    MR_IMAGE_STORAGE,
    ReceivedInstance,
    set_tcp_nodelay,
)
from .scu import Destination, _association_error, _make_ae
from .status import Status, StoreRefused

__all__ = [
    "FindResult", "QrStatus", "RetrieveReport", "describe_qr", "find_prior_series", "get_series",
    "move_series",
]

log = logging.getLogger(__name__)

FIND = StudyRootQueryRetrieveInformationModelFind
MOVE = StudyRootQueryRetrieveInformationModelMove
GET = StudyRootQueryRetrieveInformationModelGet
# What a C-GET for a prior MR may bring back (the node stores MR images only, scp.py).
MR_STORAGE = (MR_IMAGE_STORAGE, ENHANCED_MR_IMAGE_STORAGE)


class QrStatus(IntEnum):
    """C-FIND / C-MOVE / C-GET response statuses (PS3.4 C.4.1.1.4, C.4.2.1.5, C.4.3.1.4)."""

    SUCCESS = 0x0000
    PENDING = 0xFF00
    PENDING_WARNING = 0xFF01  # C-FIND: optional keys not supported
    CANCEL = 0xFE00
    # C-MOVE/C-GET: sub-operations complete, one or more failures or warnings.
    SUBOPS_COMPLETE_WITH_FAILURES = 0xB000
    OUT_OF_RESOURCES = 0xA700  # C-FIND
    OUT_OF_RESOURCES_MATCHES = 0xA701  # C-MOVE/C-GET: unable to calculate number of matches
    OUT_OF_RESOURCES_SUBOPS = 0xA702  # C-MOVE/C-GET: unable to perform sub-operations
    MOVE_DESTINATION_UNKNOWN = 0xA801
    IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    UNABLE_TO_PROCESS = 0xC000  # C000-CFFF
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    REFUSED_NOT_AUTHORIZED = 0x0124


def describe_qr(code: int) -> str:
    """A short text for a Q/R status, e.g. ``'MOVE_DESTINATION_UNKNOWN (0xA801)'``."""
    try:
        name = QrStatus(code).name
    except ValueError:
        name = "UNABLE_TO_PROCESS" if 0xC000 <= code <= 0xCFFF else "UNKNOWN"
    return f"{name} (0x{code:04X})"


def _pending(code: int) -> bool:
    return code in (QrStatus.PENDING, QrStatus.PENDING_WARNING)


@dataclass(frozen=True)
class FindResult:
    """Series-level identifiers of prior studies; ``error`` names what went wrong, if anything.

    Each series identifier also carries its study's Study Date (series level has none).
    """

    peer: Destination
    studies: tuple[Dataset, ...] = field(repr=False)
    series: tuple[Dataset, ...] = field(repr=False)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class RetrieveReport:
    """Outcome of one C-MOVE or C-GET of one series."""

    peer: Destination
    how: str  # "move" or "get"
    series_uid: str
    status: int | None  # the final response's status; None: no final response
    completed: int
    failed: int
    warning: int
    error: str | None

    @property
    def ok(self) -> bool:
        """Every sub-operation completed (a warning counts as stored, PS3.4 C.4.2.1.5)."""
        return self.error is None and self.status == QrStatus.SUCCESS and self.failed == 0

    def summary(self) -> str:
        counts = f"{self.completed} completed, {self.failed} failed, {self.warning} warning"
        if self.ok:
            return f"C-{self.how.upper()} of series {self.series_uid} from {self.peer}: {counts}"
        return f"C-{self.how.upper()} of series {self.series_uid} from {self.peer} failed: {self.error} ({counts})"


def _associate(ae: AE, peer: Destination, tls: ssl.SSLContext | None, **kw: Any) -> Any:
    handlers = [(evt.EVT_CONN_OPEN, set_tcp_nodelay), *kw.pop("evt_handlers", [])]
    return ae.associate(peer.host, peer.port, ae_title=peer.ae_title, evt_handlers=handlers,
                        tls_args=(tls, peer.host) if tls is not None else None, **kw)


def _count_taken_responses(assoc: Any) -> None:
    """Count the responses pynetdicom's association reactor takes from under a ``send_c_*``.

    pynetdicom 3.0's reactor polls the DIMSE queue in its own thread; ``send_c_find`` pauses it
    by clearing a checkpoint and waiting for a flag that the reactor sets just *before* it
    waits. When the reactor has already passed the checkpoint, the pause is not real: the
    reactor takes the next message, logs "Received unexpected C-FIND service message" and drops
    it (seen in this project's tests under load; pynetdicom issue #875 reports the same
    warning). A dropped pending response is a lost match, and the query would still end in
    Success. Counting what the reactor takes lets the caller know the answer is incomplete.
    """
    serve = assoc._serve_request
    assoc.dipnode_taken = 0

    def counting(msg: Any, context_id: int) -> None:
        if not msg.is_valid_request:  # a response: it was meant for the send_c_* waiting on it
            assoc.dipnode_taken += 1
        serve(msg, context_id)

    assoc._serve_request = counting


def _find(assoc: Any, query: Dataset, attempts: int = 3) -> tuple[list[Dataset], str | None]:
    """All matches of one C-FIND; (identifiers, error or None). Asked again when pynetdicom's
    reactor took one of its responses (:func:`_count_taken_responses`)."""
    for _ in range(attempts):
        taken = getattr(assoc, "dipnode_taken", 0)
        found, error = _find_once(assoc, query)
        if getattr(assoc, "dipnode_taken", 0) == taken or not assoc.is_established:
            return found, error
        log.warning("C-FIND: a response was lost to pynetdicom's association reactor; asking again")
    return found, f"C-FIND responses lost in pynetdicom {attempts} times in a row"


def _find_once(assoc: Any, query: Dataset) -> tuple[list[Dataset], str | None]:
    found: list[Dataset] = []
    final: int | None = None
    for status, identifier in assoc.send_c_find(query, FIND):
        if status is None or "Status" not in status:
            # Orthanc 1.10 answers a C-FIND from an AE title it does not know with a response
            # pynetdicom cannot read (an empty status): say what to check.
            calling = str(assoc.requestor.ae_title).strip()
            return found, (f"no valid C-FIND response (timed out, or refused: does the peer know "
                           f"and allow AE title {calling!r} to query?)")
        code = int(status.Status)
        if _pending(code):
            if identifier is None:  # pynetdicom could not decode it: a match we cannot see
                return found, "a C-FIND match could not be decoded"
            found.append(identifier)
            continue
        final = code
    if final is None:
        return found, "no final C-FIND response"
    if final != QrStatus.SUCCESS:
        return found, f"C-FIND refused: {describe_qr(final)}"
    return found, None


def _study_query(patient_id: str, issuer: str, modality: str,
                 dates: tuple[date, date] | None) -> Dataset:
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.PatientID = patient_id  # single value matching (PS3.4 C.2.2.2.1)
    if issuer:
        q.IssuerOfPatientID = issuer
    q.ModalitiesInStudy = modality
    # Range matching "YYYYMMDD-YYYYMMDD" (PS3.4 C.2.2.2.5).
    q.StudyDate = f"{dates[0]:%Y%m%d}-{dates[1]:%Y%m%d}" if dates else ""
    q.StudyInstanceUID = ""
    q.StudyDescription = ""
    q.AccessionNumber = ""
    return q


# Series-level return keys outside the Study Root model's series keys (PS3.4 C.6.2.1.2): an SCP
# may leave them empty or out; they only sharpen the ranking and are checked again on the
# series' own headers once retrieved. A PACS that refuses them gets the plain query instead.
_EXTRA_SERIES_KEYS = ("ImageType", "MRAcquisitionType", "SliceThickness")


def _series_query(study_uid: str, modality: str, extra: bool) -> Dataset:
    q = Dataset()
    q.QueryRetrieveLevel = "SERIES"
    q.StudyInstanceUID = study_uid
    q.Modality = modality
    q.SeriesInstanceUID = ""
    q.SeriesDescription = ""
    q.SeriesNumber = ""
    q.SeriesDate = ""
    q.NumberOfSeriesRelatedInstances = ""
    if extra:
        for keyword in _EXTRA_SERIES_KEYS:
            setattr(q, keyword, "")
    return q


def find_prior_series(
    peer: Destination,
    *,
    patient_id: str,
    issuer: str = "",
    dates: tuple[date, date] | None = None,
    modality: str = "MR",
    calling_ae: str = "DIPNODE",
    tls: ssl.SSLContext | None = None,
    timeout_s: float = 60.0,
) -> FindResult:
    """The ``modality`` series of the patient's studies at ``peer`` within ``dates``.

    Matches the PACS returns are checked again here: a Patient ID that is not exactly ours
    (``*`` and ``?`` are wildcards in C-FIND, PS3.4 C.2.2.2.4) or an Issuer of Patient ID that
    differs from ours is dropped; an issuer the PACS leaves out is accepted (the retrieved
    headers are matched on Patient ID and issuer again before use).
    """
    if not patient_id:
        raise ValueError("patient_id: expected a non-empty Patient ID (an unidentified patient has no priors)")
    if dates is not None and dates[0] > dates[1]:
        raise ValueError(f"dates: expected (first, last) with first <= last, got {dates!r}")
    ae = _make_ae(calling_ae, timeout_s)
    ae.add_requested_context(FIND)
    assoc = _associate(ae, peer, tls)
    if not assoc.is_established:
        return FindResult(peer, (), (), _association_error(assoc, peer))
    _count_taken_responses(assoc)
    try:
        studies, error = _find(assoc, _study_query(patient_id, issuer, modality, dates))
        if error is not None:
            return FindResult(peer, (), (), f"study-level {error}")
        kept = [s for s in studies if str(s.get("PatientID", patient_id)) == patient_id
                and (not issuer or not str(s.get("IssuerOfPatientID", "") or "") or
                     str(s.IssuerOfPatientID) == issuer)]
        series: list[Dataset] = []
        for study in kept:
            uid = str(study.get("StudyInstanceUID", ""))
            if not uid:
                continue
            found, error = _find(assoc, _series_query(uid, modality, extra=True))
            if error is not None and assoc.is_established:
                log.info("series-level C-FIND with extra keys refused by %s (%s); plain query", peer, error)
                found, error = _find(assoc, _series_query(uid, modality, extra=False))
            if error is not None:
                return FindResult(peer, tuple(kept), tuple(series), f"series-level {error}")
            for s in found:
                if str(s.get("Modality", modality)) != modality or not s.get("SeriesInstanceUID"):
                    continue
                s.StudyInstanceUID = uid
                s.StudyDate = str(study.get("StudyDate", "") or "")
                series.append(s)
        log.info("C-FIND at %s: %d studies, %d %s series", peer, len(kept), len(series), modality)
        return FindResult(peer, tuple(kept), tuple(series))
    finally:
        if assoc.is_established:
            assoc.release()


def _series_identifier(study_uid: str, series_uid: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "SERIES"  # PS3.4 C.4.2.2.1: unique keys down to the level
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    return ds


def _collect(peer: Destination, how: str, series_uid: str,
             responses: Iterator[tuple[Dataset | None, Dataset | None]]) -> RetrieveReport:
    """Follow C-MOVE / C-GET responses to the final one (PS3.4 C.4.2.1.5)."""
    completed = failed = warning = 0
    final: int | None = None
    for status, _identifier in responses:
        if status is None or "Status" not in status:
            break
        code = int(status.Status)
        # Counters only grow. Orthanc 1.10 stops a C-MOVE at the first refused sub-operation and
        # answers 0xC000 with every counter 0, so the pending responses' counts are kept.
        completed = max(completed, int(status.get("NumberOfCompletedSuboperations", 0) or 0))
        failed = max(failed, int(status.get("NumberOfFailedSuboperations", 0) or 0))
        warning = max(warning, int(status.get("NumberOfWarningSuboperations", 0) or 0))
        if not _pending(code):
            final = code
    if final is None:
        error: str | None = f"no final C-{how.upper()} response (timeout or abort)"
    elif final == QrStatus.SUCCESS and failed == 0:
        error = None
    elif final in (QrStatus.SUCCESS, QrStatus.SUBOPS_COMPLETE_WITH_FAILURES) or completed:
        error = (f"partial: {completed} sub-operation(s) completed, {failed} failed, then "
                 f"{describe_qr(final)}")
    else:
        error = f"refused: {describe_qr(final)}"
    report = RetrieveReport(peer, how, series_uid, final, completed, failed, warning, error)
    log.info("%s", report.summary())
    return report


def move_series(
    peer: Destination,
    study_uid: str,
    series_uid: str,
    destination_ae: str,
    *,
    calling_ae: str = "DIPNODE",
    tls: ssl.SSLContext | None = None,
    timeout_s: float = 60.0,
) -> RetrieveReport:
    """C-MOVE one series from ``peer`` to ``destination_ae`` (an AE title the peer knows).

    Returns once the peer's final response came (its sub-operations are then done: the
    instances are at the destination), or the association failed.
    """
    ae = _make_ae(calling_ae, timeout_s)
    ae.add_requested_context(MOVE)
    assoc = _associate(ae, peer, tls)
    if not assoc.is_established:
        return RetrieveReport(peer, "move", series_uid, None, 0, 0, 0, _association_error(assoc, peer))
    try:
        return _collect(peer, "move", series_uid,
                        assoc.send_c_move(_series_identifier(study_uid, series_uid), destination_ae, MOVE))
    finally:
        if assoc.is_established:
            assoc.release()


def _store_handler(on_store: Callable[[ReceivedInstance], Status]) -> Callable[[Event], int]:
    """EVT_C_STORE for C-GET sub-operations: the same hand-off as the storage SCP's."""

    def handle(event: Event) -> int:
        assoc = event.assoc
        instance = ReceivedInstance(
            sop_class_uid=str(event.request.AffectedSOPClassUID),
            sop_instance_uid=str(event.request.AffectedSOPInstanceUID),
            transfer_syntax_uid=str(event.context.transfer_syntax),
            calling_ae=str(assoc.acceptor.ae_title).strip(),  # the PACS we associated with
            peer_address=str(assoc.acceptor.address),
            raw=event.encoded_dataset(include_meta=True),
        )
        try:
            return int(Status(on_store(instance)))
        except StoreRefused as exc:
            log.warning("C-GET sub-operation from %s refused: %s", instance.calling_ae, exc)
            return int(exc.status)
        except Exception as exc:  # noqa: BLE001 - answer the peer; the report counts the failure
            log.error("C-GET sub-operation from %s failed: %s: %s", instance.calling_ae,
                      type(exc).__name__, exc)
            return int(Status.PROCESSING_FAILURE)

    return handle


def get_series(
    peer: Destination,
    study_uid: str,
    series_uid: str,
    on_store: Callable[[ReceivedInstance], Status],
    *,
    sop_classes: Sequence[str] = MR_STORAGE,
    transfer_syntaxes: Sequence[str] = DEFAULT_TRANSFER_SYNTAXES,
    calling_ae: str = "DIPNODE",
    tls: ssl.SSLContext | None = None,
    timeout_s: float = 60.0,
) -> RetrieveReport:
    """C-GET one series from ``peer``; each instance goes to ``on_store`` as the SCP's would.

    We propose the storage SOP classes with the SCP role (PS3.7 D.3.3.4) so the peer can send
    the sub-operations back on this association.
    """
    ae = _make_ae(calling_ae, timeout_s)
    ae.add_requested_context(GET)
    for sop_class in sop_classes:
        ae.add_requested_context(sop_class, list(transfer_syntaxes))
    roles = [build_role(sop_class, scp_role=True) for sop_class in sop_classes]
    assoc = _associate(ae, peer, tls, ext_neg=roles,
                       evt_handlers=[(evt.EVT_C_STORE, _store_handler(on_store))])
    if not assoc.is_established:
        return RetrieveReport(peer, "get", series_uid, None, 0, 0, 0, _association_error(assoc, peer))
    try:
        return _collect(peer, "get", series_uid,
                        assoc.send_c_get(_series_identifier(study_uid, series_uid), GET))
    finally:
        if assoc.is_established:
            assoc.release()
