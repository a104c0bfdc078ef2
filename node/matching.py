"""PET/MR pairing: which MR conditions the DIP for a PET, and what to do when there is none.

Eligible MR, for a PET series:
- same Study Instance UID (a PET/MR scanner, or both sent in one study), with the same
  Patient ID and issuer where both carry one; or
- another study of the same Patient ID (0010,0020) and Issuer of Patient ID (0010,0021),
  Patient ID not empty, study dates at most ``date_window_days`` apart (both must be known);
- complete (a receiving MR is waited for, not used half-arrived);
- with ``require_3d``: MR Acquisition Type (0018,0023) is 3D.

Ranking among the eligible, best first: same study; more description patterns matched
(3D T1: T1/MPRAGE/SPGR/BRAVO/3D); MR Acquisition Type 3D; finest slices (smallest Slice
Thickness, unknown last); most recent (study date, series date, arrival); then Series UID so
that the choice is deterministic.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date
from enum import Enum
from typing import TYPE_CHECKING

from dipnode.models.params import Method
from dipnode.node.store import SeriesRow, SeriesState

if TYPE_CHECKING:
    from dipnode.node.settings import Settings

__all__ = ["Decision", "DecisionKind", "MatchReport", "MatchRules", "choose_mr", "decide", "rank_mr"]


@dataclass(frozen=True)
class MatchRules:
    date_window_days: int = 30
    patterns: tuple[re.Pattern[str], ...] = ()
    require_3d: bool = False

    @classmethod
    def from_settings(cls, settings: "Settings") -> "MatchRules":
        m = settings.matching
        return cls(
            date_window_days=m.date_window_days,
            patterns=tuple(re.compile(p, re.IGNORECASE) for p in m.mr_description_patterns),
            require_3d=m.require_3d,
        )


@dataclass(frozen=True)
class MatchReport:
    chosen: SeriesRow | None
    rejected: tuple[tuple[str, str], ...]  # (series UID, why)
    waiting_for: tuple[str, ...]  # eligible MR series still arriving


def _date(da: str) -> date | None:
    try:
        return date(int(da[0:4]), int(da[4:6]), int(da[6:8])) if len(da) == 8 else None
    except ValueError:
        return None


def _why_not(pet: SeriesRow, mr: SeriesRow, rules: MatchRules) -> str | None:
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
        pd, md = _date(pet.study_date), _date(mr.study_date)
        if pd is None or md is None:
            return f"another study and a study date is unknown (PET {pet.study_date!r}, MR {mr.study_date!r})"
        if abs((pd - md).days) > rules.date_window_days:
            return f"another study {abs((pd - md).days)} days apart (window {rules.date_window_days})"
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


def rank_mr(pet: SeriesRow, candidates: list[SeriesRow], rules: MatchRules) -> MatchReport:
    """The best eligible complete MR for ``pet``, with the reason each other candidate was not."""
    eligible: list[SeriesRow] = []
    rejected: list[tuple[str, str]] = []
    waiting: list[str] = []
    for c in candidates:
        if c.series_uid == pet.series_uid or c.modality != "MR":
            continue  # the PET itself and other modalities are not candidates at all
        why = _why_not(pet, c, rules)
        if why is not None:
            rejected.append((c.series_uid, why))
        elif c.state is not SeriesState.COMPLETE:
            waiting.append(c.series_uid)
        else:
            eligible.append(c)
    chosen = max(eligible, key=lambda c: _rank_key(pet, c, rules)) if eligible else None
    return MatchReport(chosen, tuple(rejected), tuple(waiting))


def choose_mr(pet: SeriesRow, candidates: list[SeriesRow], rules: MatchRules) -> SeriesRow | None:
    return rank_mr(pet, candidates, rules).chosen


class DecisionKind(str, Enum):
    PAIR = "pair"  # run the configured method with this MR
    NO_MR_NEEDED = "no_mr_needed"  # the configured method is the Gaussian baseline
    WAIT = "wait"  # keep waiting for an MR
    FALLBACK = "fallback"  # run the Gaussian baseline instead
    FAIL = "fail"


@dataclass(frozen=True)
class Decision:
    kind: DecisionKind
    method: Method | None  # what to run (None for WAIT and FAIL)
    mr: SeriesRow | None = None
    reason: str = ""
    wait_until: float | None = None  # for WAIT: when the fallback applies


def decide(pet: SeriesRow, candidates: list[SeriesRow], now: float, settings: "Settings", *,
           method: Method | None = None, listening_since: float | None = None) -> Decision:
    """What to do with a complete PET now, honouring ``mr_wait_s`` and ``fallback``.

    method: the job's method (a QA re-run may differ from the node's); default the settings'.
    listening_since: when this process started receiving; the wait does not count the node's
    downtime (an MR cannot arrive while the node is down).
    The wait runs from the PET's completion. An eligible MR still arriving keeps the PET
    waiting even past ``mr_wait_s``, for at most another ``mr_wait_s``, since its arrival
    shows the MR is on its way.
    """
    method = method or settings.method.name
    if not method.needs_mr:
        return Decision(DecisionKind.NO_MR_NEEDED, method, reason=f"method {method.value} needs no MR")
    report = rank_mr(pet, candidates, MatchRules.from_settings(settings))
    if report.chosen is not None:
        mr = report.chosen
        return Decision(DecisionKind.PAIR, method, mr, reason=(
            f"MR series {mr.series_uid} ({'same study' if mr.study_uid == pet.study_uid else 'other study'}, "
            f"{mr.series_description!r})"
        ))
    wait_s = settings.matching.mr_wait_s
    since = pet.completed_at if pet.completed_at is not None else pet.last_received_at
    if listening_since is not None:
        since = max(since, listening_since)
    deadline = since + wait_s * (2 if report.waiting_for else 1)
    if now < deadline:
        why = f"MR series {list(report.waiting_for)} still arriving" if report.waiting_for else "no eligible MR yet"
        return Decision(DecisionKind.WAIT, None, reason=why, wait_until=deadline)
    why = f"no eligible MR within mr_wait_s={wait_s:g} s"
    if report.rejected:
        why += "; rejected: " + "; ".join(f"{uid}: {r}" for uid, r in report.rejected)
    if report.waiting_for:
        why += f"; still incomplete: {list(report.waiting_for)}"
    if settings.matching.fallback == "gaussian":
        return Decision(DecisionKind.FALLBACK, Method.GAUSSIAN, reason=why + "; fallback to Gaussian")
    return Decision(DecisionKind.FAIL, None, reason=why)
