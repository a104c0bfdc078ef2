"""Series completion: when has a series arrived in full?

DICOM has no "end of series" message, and an association may carry part of a series, several
series or one instance each (PS3.7 §9.1.1 C-STORE is per instance), so the end of an
association is never taken as the end of a series. A receiving series is complete when either

1. it holds at least the expected number of instances (see :func:`expected_count`), or
2. no new instance has arrived for ``stable_age_s`` (each new instance restarts the clock).

Late instances (a new SOP instance for a complete series) re-open the series in the store
(node/jobs/store.py); the series then completes again by the same rules and is reported with
``rerun=True``: the pipeline creates a new job for a PET (``create_job(..., rerun=True)``,
with fresh output UIDs) rather than silently keeping a result computed from a partial series.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dipnode.node.jobs.rows import InstanceRecord, SeriesRow
from dipnode.node.jobs.store import Store

log = logging.getLogger(__name__)

__all__ = [
    "CompletedSeries", "check_indexable", "complete_due", "due_for_completion", "expected_count",
    "instance_record", "is_due",
]

# An SQLite INTEGER is 64-bit; any count beyond IS's range (PS3.5 6.2: -2^31..2^31-1) is
# malformed anyway and is treated as absent, like any other malformed count.
_COUNT_MAX = 2**31 - 1


def expected_count(
    modality: str,
    *,
    number_of_slices: int | None = None,
    images_in_acquisition: int | None = None,
    series_type: str = "",
    number_of_time_slices: int | None = None,
    number_of_rr_intervals: int | None = None,
    number_of_time_slots: int | None = None,
) -> int | None:
    """The number of instances a series should hold, or None where the header does not say.

    PET: Number of Slices (0054,0081) per frame; a DYNAMIC series has that many per time slice
    (0054,0101) and a GATED one per R-R interval (0054,0061) and time slot (0054,0071)
    (PS3.3 C.8.9.4.1.9 Image Index). Otherwise Images in Acquisition (0020,1002), which
    counts the images of one acquisition: a fair bound for a single-acquisition brain MR.
    """
    if modality == "PT" and number_of_slices:
        if not isinstance(number_of_slices, int) or number_of_slices < 1:
            raise ValueError(f"number_of_slices: expected an integer >= 1, got {number_of_slices!r}")
        kind = series_type.split("\\")[0].strip().upper()
        factor = 1
        if kind == "DYNAMIC":
            factor = number_of_time_slices or 1
        elif kind == "GATED":
            factor = (number_of_rr_intervals or 1) * (number_of_time_slots or 1)
        return number_of_slices * factor
    if images_in_acquisition:
        if not isinstance(images_in_acquisition, int) or images_in_acquisition < 1:
            raise ValueError(f"images_in_acquisition: expected an integer >= 1, got {images_in_acquisition!r}")
        return images_in_acquisition
    return None


def _int(ds: Any, keyword: str) -> int | None:
    v = getattr(ds, keyword, None)
    try:
        n = int(v) if v not in (None, "") else None
    except (TypeError, ValueError, OverflowError):
        return None  # a malformed count is treated as absent: completion falls back to stable age
    return n if n is not None and 1 <= n <= _COUNT_MAX else None


def _first(value: Any) -> str:
    """Value 1 of a possibly multi-valued string (pydicom's MultiValue is a Sequence)."""
    if value is None:
        return ""
    if isinstance(value, Sequence) and not isinstance(value, str):
        return str(value[0]) if len(value) else ""
    return str(value)


def instance_record(ds: Any, path: Path, transfer_syntax: str) -> InstanceRecord:
    """The store's record of one received instance from its header (a pydicom Dataset without
    pixels; attributes are read by keyword, so any object with those attributes works)."""

    def text(keyword: str) -> str:
        v = getattr(ds, keyword, None)
        if v is None:
            return ""
        if isinstance(v, Sequence) and not isinstance(v, (str, bytes)):
            # A multi-valued string is indexed in its DICOM form (PS3.5 6.4: values separated
            # by backslash), never as Python list text. (A multi-valued Patient ID never gets
            # here: dicom_io.intake refuses it.)
            return "\\".join(str(x).strip() for x in v)
        return str(v).strip()

    modality = text("Modality")
    series_type = getattr(ds, "SeriesType", None)
    thickness = getattr(ds, "SliceThickness", None)
    try:
        slice_thickness = float(thickness) if thickness not in (None, "") else None
    except (TypeError, ValueError):
        slice_thickness = None
    return InstanceRecord(
        sop_instance_uid=text("SOPInstanceUID"),
        sop_class_uid=text("SOPClassUID"),
        path=Path(path),
        study_uid=text("StudyInstanceUID"),
        series_uid=text("SeriesInstanceUID"),
        modality=modality,
        transfer_syntax=transfer_syntax,
        patient_id=text("PatientID"),
        issuer_of_patient_id=text("IssuerOfPatientID"),
        series_description=text("SeriesDescription"),
        frame_of_reference_uid=text("FrameOfReferenceUID"),
        mr_acquisition_type=text("MRAcquisitionType"),
        slice_thickness=slice_thickness,
        study_date=text("StudyDate"),
        series_date=text("SeriesDate"),
        expected_count=expected_count(
            modality,
            number_of_slices=_int(ds, "NumberOfSlices"),
            images_in_acquisition=_int(ds, "ImagesInAcquisition"),
            # Series Type (0054,1000) is multi-valued CS: value 1 is STATIC/DYNAMIC/GATED/WHOLE BODY.
            series_type=_first(series_type),
            number_of_time_slices=_int(ds, "NumberOfTimeSlices"),
            number_of_rr_intervals=_int(ds, "NumberOfRRIntervals"),
            number_of_time_slots=_int(ds, "NumberOfTimeSlots"),
        ),
        image_type="\\".join(str(v).strip() for v in _values(getattr(ds, "ImageType", None))),
        orientation=_floats(ds, "ImageOrientationPatient", 6),
        position=_floats(ds, "ImagePositionPatient", 3),  # type: ignore[arg-type]
    )


def check_indexable(record: InstanceRecord) -> None:
    """Raise ValueError naming the attribute when the index cannot take ``record``: checked
    before an instance is written, so that a refusal leaves nothing behind."""
    for attr, keyword, tag in (("sop_instance_uid", "SOP Instance UID", "(0008,0018)"),
                               ("series_uid", "Series Instance UID", "(0020,000E)"),
                               ("study_uid", "Study Instance UID", "(0020,000D)"),
                               ("modality", "Modality", "(0008,0060)")):
        if not getattr(record, attr):
            raise ValueError(f"{keyword} {tag}: expected a value, got none")


def _values(value: Any) -> list[Any]:
    if value is None or value == "":
        return []
    if isinstance(value, Sequence) and not isinstance(value, str):
        return list(value)
    return [value]


def _floats(ds: Any, keyword: str, n: int) -> tuple[float, ...] | None:
    """A multi-valued DS as floats, or None when absent or malformed (matching's header facts
    then stay unknown; the loader reports the real problem if the series is ever used)."""
    try:
        values = tuple(float(v) for v in _values(getattr(ds, keyword, None)))
    except (TypeError, ValueError):
        return None
    return values if len(values) == n else None


@dataclass(frozen=True)
class CompletedSeries:
    """A series that has just become complete, and why."""

    series: SeriesRow
    by_count: bool  # reached expected_count (else: stable for stable_age_s)
    short: bool  # fewer instances than expected (completed by age): the loader must check
    rerun: bool  # completed again after late instances re-opened it


def is_due(s: SeriesRow, now: float, stable_age_s: float, listening_since: float | None = None) -> bool:
    """Complete by count, or by ``stable_age_s`` without a new instance while we listened.

    ``listening_since`` (when this process started receiving): the stable clock does not run
    while the node was down, because a sender cannot deliver to a node that is not there. A
    series cut off by a crash or a restart must not complete by age the moment the node comes
    back (it would run on a partial series, then again as a re-run when the rest arrives).
    """
    if s.expected_count is not None and s.instance_count >= s.expected_count:
        return True
    since = s.last_received_at if listening_since is None else max(s.last_received_at, listening_since)
    return now - since >= stable_age_s


def due_for_completion(store: Store, now: float, stable_age_s: float,
                       listening_since: float | None = None) -> list[str]:
    """UIDs of receiving series that are complete by count or by stable age at ``now``
    (see :func:`is_due` for ``listening_since``)."""
    if not stable_age_s > 0:
        raise ValueError(f"stable_age_s: expected a number > 0, got {stable_age_s!r}")
    return [s.series_uid for s in store.incomplete_series()
            if is_due(s, now, stable_age_s, listening_since)]


def complete_due(store: Store, now: float, stable_age_s: float,
                 listening_since: float | None = None) -> list[CompletedSeries]:
    """Mark every due series complete and report them. A series that received an instance
    between the check and the mark is left receiving (the store compares instance counts)."""
    done: list[CompletedSeries] = []
    for uid in due_for_completion(store, now, stable_age_s, listening_since):
        before = store.series(uid)
        if before is None or not store.mark_series_complete(uid, now, if_instance_count=before.instance_count):
            continue
        after = store.series(uid)
        if after is None:
            continue
        by_count = after.expected_count is not None and after.instance_count >= after.expected_count
        short = after.expected_count is not None and after.instance_count < after.expected_count
        done.append(CompletedSeries(after, by_count, short, rerun=after.late_instances > 0))
        log.debug(
            "series %s complete: %d instances (expected %s) by %s%s", uid, after.instance_count,
            after.expected_count, "count" if by_count else "stable age",
            ", re-opened by late instances" if after.late_instances else "",
        )
    return done
