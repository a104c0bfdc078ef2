"""PET/MR pairing: which MR conditions the DIP for a PET, and what to do when there is none.

Eligible MR, for a PET series:
- same Study Instance UID (a PET/MR scanner, or both sent in one study), with the same
  Patient ID and issuer where both carry one; or
- another study of the same Patient ID (0010,0020) and Issuer of Patient ID (0010,0021),
  Patient ID not empty, study dates at most ``date_window_days`` apart (both must be known);
- a volume acquired as such: never a localizer, a diffusion series or its maps, a reformat
  or a projection. Excluded by Image Type (0008,0008) values (``mr_exclude_image_types``:
  value 1 DERIVED, value 2 SECONDARY, vendor terms LOCALIZER, DIFFUSION, ADC, MPR ...), by
  Series Description (``mr_exclude_patterns``), and by header facts the index records as
  instances arrive: several Image Orientations in one series (a 3-plane localizer) or
  instances at the same position (several b-values, echoes or phases);
- not passed over by this job (it failed to load or to register);
- complete (a receiving MR is waited for, not used half-arrived);
- with ``require_3d``: MR Acquisition Type (0018,0023) is 3D.
Any orientation is accepted (a sagittal or coronal 3D T1 is registered like an axial one).

Ranking among the eligible, best first: same study; more description patterns matched
(3D T1: T1/MPRAGE/SPGR/BRAVO/3D); MR Acquisition Type 3D; finest slices (smallest Slice
Thickness, unknown last); most recent (study date, series date, arrival); then Series UID so
that the choice is deterministic. The same rules rank series found at a PACS by C-FIND
(:func:`remote_candidate` builds their rows from the identifiers).

Timing: after the first MR series of an exam arrives, the best complete one is taken only once
``mr_grace_s`` has passed and no better-ranked series of it is still arriving. With no eligible
MR at hand, the sources ([[sources]]) are queried ``query_delay_s`` after the PET completed;
the fallback applies once ``mr_wait_s`` has passed and no retrieval is under way.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date
from enum import Enum
from typing import TYPE_CHECKING, Any

from dipnode.models.params import Method
from dipnode.node.jobs.rows import FetchRow, FetchState, SeriesRow, SeriesState

if TYPE_CHECKING:
    from dipnode.node.settings import Settings

__all__ = [
    "Decision", "DecisionKind", "MatchReport", "MatchRules", "choose_mr", "decide", "describe_mr",
    "ineligible_reason", "parse_date", "rank_mr", "remote_candidate",
]


@dataclass(frozen=True)
class MatchRules:
    date_window_days: int = 30
    patterns: tuple[re.Pattern[str], ...] = ()
    require_3d: bool = False
    exclude_patterns: tuple[re.Pattern[str], ...] = ()
    exclude_image_types: frozenset[str] = frozenset()

    @classmethod
    def from_settings(cls, settings: "Settings") -> "MatchRules":
        m = settings.matching
        return cls(
            date_window_days=m.date_window_days,
            patterns=tuple(re.compile(p, re.IGNORECASE) for p in m.mr_description_patterns),
            require_3d=m.require_3d,
            exclude_patterns=tuple(re.compile(p, re.IGNORECASE) for p in m.mr_exclude_patterns),
            exclude_image_types=frozenset(m.mr_exclude_image_types),
        )


@dataclass(frozen=True)
class MatchReport:
    chosen: SeriesRow | None
    rejected: tuple[tuple[str, str], ...]  # (series UID, why) for every MR that is not eligible
    waiting_for: tuple[str, ...]  # eligible MR series still arriving
    ranked: tuple[SeriesRow, ...] = ()  # eligible complete series, best first
    arriving: tuple[SeriesRow, ...] = ()  # eligible series still arriving


def parse_date(da: str) -> date | None:
    try:
        return date(int(da[0:4]), int(da[4:6]), int(da[6:8])) if len(da) == 8 else None
    except ValueError:
        return None


def ineligible_reason(pet: SeriesRow, mr: SeriesRow, rules: MatchRules) -> str | None:
    """None if ``mr`` may condition ``pet`` (completeness aside), else the reason it may not."""
    if mr.modality != "MR":
        return f"modality {mr.modality!r} is not MR"
    same_patient = pet.patient_id != "" and mr.patient_id == pet.patient_id and mr.issuer == pet.issuer
    if mr.study_uid == pet.study_uid:
        if pet.patient_id and mr.patient_id and not same_patient:
            return f"same study but Patient ID/issuer differ ({mr.patient_id!r}/{mr.issuer!r})"
    else:
        if not same_patient:
            return "another study of a different (or unidentified) patient"
        pd, md = parse_date(pet.study_date), parse_date(mr.study_date)
        if pd is None or md is None:
            return f"another study and a study date is unknown (PET {pet.study_date!r}, MR {mr.study_date!r})"
        if abs((pd - md).days) > rules.date_window_days:
            return f"another study {abs((pd - md).days)} days apart (window {rules.date_window_days})"
    values = [v.strip().upper() for v in mr.image_type.split("\\")] if mr.image_type else []
    hit = [v for v in values if v in rules.exclude_image_types]
    if hit:
        return f"Image Type {mr.image_type} ({hit[0]} is excluded: not an acquired volume)"
    for p in rules.exclude_patterns:
        if p.search(mr.series_description):
            return f"Series Description {mr.series_description!r} matches exclusion {p.pattern!r}"
    if mr.orientations_mixed:
        return "several Image Orientations in one series (a localizer, not one volume)"
    if mr.positions_repeated:
        return "instances repeat slice positions (several b-values, echoes or phases in one series)"
    if rules.require_3d and mr.mr_acquisition_type.upper() != "3D":
        return f"MR Acquisition Type {mr.mr_acquisition_type!r} is not 3D (require_3d)"
    return None


def _rank_key(pet: SeriesRow, mr: SeriesRow, rules: MatchRules) -> tuple:
    desc = mr.series_description
    return (
        mr.study_uid == pet.study_uid,
        sum(1 for p in rules.patterns if p.search(desc)),
        mr.mr_acquisition_type.upper() == "3D",
        -(mr.slice_thickness if mr.slice_thickness else float("inf")),
        mr.study_date, mr.series_date, mr.last_received_at,
        mr.series_uid,
    )


def rank_mr(pet: SeriesRow, candidates: list[SeriesRow], rules: MatchRules,
            passed_over: dict[str, str] | None = None) -> MatchReport:
    """The best eligible complete MR for ``pet``, with the reason each other candidate was not.

    passed_over: series this job already tried and gave up (failed to load or register), by UID.
    """
    passed_over = passed_over or {}
    eligible: list[SeriesRow] = []
    arriving: list[SeriesRow] = []
    rejected: list[tuple[str, str]] = []
    for c in candidates:
        if c.series_uid == pet.series_uid or c.modality != "MR":
            continue  # the PET itself and other modalities are not candidates at all
        why = ineligible_reason(pet, c, rules)
        if why is None and c.series_uid in passed_over:
            why = f"failed in this job: {passed_over[c.series_uid]}"
        if why is not None:
            rejected.append((c.series_uid, why))
        elif c.state is not SeriesState.COMPLETE:
            arriving.append(c)
        else:
            eligible.append(c)
    ranked = sorted(eligible, key=lambda c: _rank_key(pet, c, rules), reverse=True)
    arriving.sort(key=lambda c: _rank_key(pet, c, rules), reverse=True)
    return MatchReport(ranked[0] if ranked else None, tuple(rejected),
                       tuple(c.series_uid for c in arriving), tuple(ranked), tuple(arriving))


def choose_mr(pet: SeriesRow, candidates: list[SeriesRow], rules: MatchRules) -> SeriesRow | None:
    return rank_mr(pet, candidates, rules).chosen


def remote_candidate(identifier: Any, patient_id: str, issuer: str, study_date: str = "") -> SeriesRow:
    """A candidate row for a series a source answered a series-level C-FIND with.

    ``identifier`` is the pydicom Dataset of the C-FIND response; attributes the source left
    out are unknown (empty), which ranks them last and excludes nothing by itself: header
    facts are checked again on the series' own headers once it is retrieved. The row is
    COMPLETE: it is whole at the source.
    """
    def text(keyword: str) -> str:
        v = identifier.get(keyword, "")
        if v is None:
            return ""
        if not isinstance(v, str) and hasattr(v, "__iter__"):
            return "\\".join(str(x).strip() for x in v)
        return str(v).strip()

    try:
        thickness = float(text("SliceThickness")) if text("SliceThickness") else None
    except ValueError:
        thickness = None
    try:
        count = int(text("NumberOfSeriesRelatedInstances") or 0)
    except ValueError:
        count = 0
    return SeriesRow(
        series_uid=text("SeriesInstanceUID"), study_uid=text("StudyInstanceUID"),
        patient_id=patient_id, issuer=issuer, modality=text("Modality") or "MR",
        series_description=text("SeriesDescription"), frame_of_reference_uid="",
        mr_acquisition_type=text("MRAcquisitionType"), slice_thickness=thickness,
        study_date=text("StudyDate") or study_date, series_date=text("SeriesDate"),
        expected_count=count or None, instance_count=count, first_received_at=0.0,
        last_received_at=0.0, completed_at=0.0, state=SeriesState.COMPLETE, late_instances=0,
        image_type=text("ImageType"),
    )


def describe_mr(pet: SeriesRow, mr: SeriesRow) -> str:
    """``UID 'description' (same study | other study N days earlier, 3D, 1 mm)``."""
    where = "same study"
    if mr.study_uid != pet.study_uid:
        pd, md = parse_date(pet.study_date), parse_date(mr.study_date)
        where = "other study" if pd is None or md is None else (
            f"other study {abs((pd - md).days)} days {'earlier' if md <= pd else 'later'}")
    facts = [where]
    if mr.mr_acquisition_type:
        facts.append(mr.mr_acquisition_type)
    if mr.slice_thickness:
        facts.append(f"{mr.slice_thickness:g} mm")
    return f"{mr.series_uid} {mr.series_description!r} ({', '.join(facts)})"


def _explain(pet: SeriesRow, report: MatchReport, candidates: list[SeriesRow]) -> str:
    """Which MR series were passed over and why, and which eligible ones ranked lower."""
    by_uid = {c.series_uid: c for c in candidates}
    parts = []
    if report.rejected:
        parts.append("passed over: " + "; ".join(
            f"{uid} {by_uid[uid].series_description!r}: {why}" if uid in by_uid else f"{uid}: {why}"
            for uid, why in report.rejected))
    lower = report.ranked[1:] if report.chosen is not None else report.ranked
    if lower:
        parts.append("ranked lower: " + "; ".join(describe_mr(pet, c) for c in lower))
    return "; ".join(parts)


class DecisionKind(str, Enum):
    PAIR = "pair"  # run the configured method with this MR
    NO_MR_NEEDED = "no_mr_needed"  # the configured method is the Gaussian baseline
    WAIT = "wait"  # keep waiting for an MR
    FETCH = "fetch"  # ask the sources: a first query, or again after an unusable retrieval
    FALLBACK = "fallback"  # run the Gaussian baseline instead
    FAIL = "fail"


@dataclass(frozen=True)
class Decision:
    kind: DecisionKind
    method: Method | None  # what to run (None for WAIT, FETCH and FAIL)
    mr: SeriesRow | None = None
    reason: str = ""
    wait_until: float | None = None  # for WAIT: when the state may change by time alone
    choice: str = ""  # for PAIR, FALLBACK, FAIL: why this MR (or none), what was passed over


def decide(pet: SeriesRow, candidates: list[SeriesRow], now: float, settings: "Settings", *,
           method: Method | None = None, listening_since: float | None = None,
           passed_over: dict[str, str] | None = None, fetch: FetchRow | None = None) -> Decision:
    """What to do with a complete PET now, honouring the grace period, the sources,
    ``mr_wait_s`` and ``fallback``.

    method: the job's method (a QA re-run may differ from the node's); default the settings'.
    listening_since: when this process started receiving; the wait does not count the node's
    downtime (an MR cannot arrive while the node is down).
    passed_over: MR series this job gave up (failed to load or register), with why.
    fetch: this job's retrieval from the sources, if one was requested.
    The wait runs from the PET's completion. An eligible MR still arriving keeps the PET
    waiting even past ``mr_wait_s``, for at most another ``mr_wait_s``, since its arrival
    shows the MR is on its way; so does a retrieval under way (bounded by its retry policy).
    """
    method = method or settings.method.name
    if not method.needs_mr:
        return Decision(DecisionKind.NO_MR_NEEDED, method, reason=f"method {method.value} needs no MR",
                        choice=f"no MR: method {method.value} needs none")
    rules = MatchRules.from_settings(settings)
    report = rank_mr(pet, candidates, rules, passed_over)
    if report.chosen is not None:
        mr = report.chosen
        best = _rank_key(pet, mr, rules)
        better = [c for c in report.arriving if _rank_key(pet, c, rules) > best]
        if better:
            return Decision(DecisionKind.WAIT, None, reason=(
                f"better-ranked MR {[c.series_uid for c in better]} still arriving"))
        exam_start = min((c.first_received_at for c in candidates
                          if c.modality == "MR" and c.study_uid == mr.study_uid), default=mr.first_received_at)
        if listening_since is not None:
            exam_start = max(exam_start, listening_since)
        grace_end = exam_start + settings.matching.mr_grace_s
        # A series retrieved from a source was already chosen from its whole exam there.
        fetched = fetch is not None and fetch.state is FetchState.RETRIEVED and fetch.series_uid == mr.series_uid
        if now < grace_end and not fetched:
            return Decision(DecisionKind.WAIT, None, wait_until=grace_end, reason=(
                f"MR {mr.series_uid} ready; mr_grace_s={settings.matching.mr_grace_s:g} s for a "
                "better-ranked series of the exam"))
        rest = _explain(pet, report, candidates)
        return Decision(DecisionKind.PAIR, method, mr, reason=(
            f"MR series {mr.series_uid} ({'same study' if mr.study_uid == pet.study_uid else 'other study'}, "
            f"{mr.series_description!r})"),
            choice=f"chose MR {describe_mr(pet, mr)}: best ranked of {len(report.ranked)} eligible"
                   + (f"; {rest}" if rest else ""))
    wait_s = settings.matching.mr_wait_s
    since = pet.completed_at if pet.completed_at is not None else pet.last_received_at
    if listening_since is not None:
        since = max(since, listening_since)
    deadline = since + wait_s * (2 if report.waiting_for else 1)
    if report.waiting_for and now < deadline:
        return Decision(DecisionKind.WAIT, None, wait_until=deadline,
                        reason=f"MR series {list(report.waiting_for)} still arriving")
    fetch_note = ""
    if settings.sources:
        if fetch is None:
            start = since + settings.retrieve.query_delay_s
            if now < start:
                return Decision(DecisionKind.WAIT, None, wait_until=start,
                                reason="no eligible MR at hand yet; the sources are queried at query_delay_s")
            return Decision(DecisionKind.FETCH, None, reason="no eligible MR at hand: querying the sources")
        if fetch.state is FetchState.QUERY:
            return Decision(DecisionKind.WAIT, None, reason=f"retrieving from the sources: {fetch.note or 'query due'}")
        if fetch.state is FetchState.RETRIEVED:
            uid = fetch.series_uid
            if uid in report.waiting_for:  # retrieved: completes by count or stable age
                return Decision(DecisionKind.WAIT, None, reason=f"retrieved MR {uid} completing")
            why = dict(report.rejected).get(uid or "", "not in the index")
            return Decision(DecisionKind.FETCH, None,
                            reason=f"retrieved MR {uid} is not usable ({why}); querying the sources again")
        fetch_note = f"; sources: {fetch.note}" if fetch.note else ""
    if now < deadline:
        return Decision(DecisionKind.WAIT, None, reason="no eligible MR yet", wait_until=deadline)
    why = f"no eligible MR within mr_wait_s={wait_s:g} s"
    if report.rejected:
        why += "; rejected: " + "; ".join(f"{uid}: {r}" for uid, r in report.rejected)
    if report.waiting_for:
        why += f"; still incomplete: {list(report.waiting_for)}"
    why += fetch_note
    choice = "no MR: " + why
    if settings.matching.fallback == "gaussian":
        return Decision(DecisionKind.FALLBACK, Method.GAUSSIAN, reason=why + "; fallback to Gaussian",
                        choice=choice + "; fallback to Gaussian")
    return Decision(DecisionKind.FAIL, None, reason=why, choice=choice)
