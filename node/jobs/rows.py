"""What the store holds, as typed rows, and the job lifecycle as one table of named moves.

Rows are immutable snapshots read from the database; callers never see SQL or JSON. A job's
method and parameters come back typed (:class:`~dipnode.models.params.Method`,
:class:`~dipnode.models.params.DipParams`), read through the version they were written in.

The job lifecycle (docs/DESIGN.md "The durability contract"): every change of a job's state is
one of the :class:`Move` s in :data:`MOVES`, and the store applies each through one checked
function. The usual path is waiting_for_mr -> queued -> running -> sending -> done; failed
takes a reason. The special moves are listed here too rather than written as raw updates:
a restart re-queues running jobs, an unusable MR sends a running job back to choose again, a
newer job supersedes one not started, the deliveries settle a sending job, and a re-send
takes a job that failed in delivery back to sending. DONE is final; a re-run is a new job.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from dipnode.models.params import DipParams, Method

__all__ = [
    "DeliveryRow", "DeliveryState", "FetchRow", "FetchState", "InstanceRecord", "JobRow", "JobState",
    "JOB_TRANSITIONS", "KnownInstance", "MOVES", "Move", "ResumeReport", "SeriesRow", "SeriesState",
    "StoreError", "TransitionError",
]


class StoreError(ValueError):
    """A request the store cannot honour (unknown id, bad value, newer schema)."""


class TransitionError(StoreError):
    """A job state change that the job lifecycle does not allow."""


class SeriesState(str, Enum):
    RECEIVING = "receiving"
    COMPLETE = "complete"


class JobState(str, Enum):
    WAITING_FOR_MR = "waiting_for_mr"
    QUEUED = "queued"
    RUNNING = "running"
    SENDING = "sending"
    DONE = "done"
    FAILED = "failed"

    @property
    def terminal(self) -> bool:
        return self in (JobState.DONE, JobState.FAILED)


class Move(str, Enum):
    """Why a job changes state. :data:`MOVES` says from which states to which."""

    MATCHED = "matched"  # an MR chosen, none needed, or the Gaussian fallback: run it
    CLAIMED = "claimed"  # a worker takes the job (attempts + 1)
    RETURNED = "returned"  # the executor had no slot after all: back in the queue
    COMPUTED = "computed"  # outputs written: deliver them
    FAILED = "failed"  # with a reason, from any unfinished state
    # -- special moves, each made by its own store method (or named by the caller) --
    RESTART_REQUEUED = "restart_requeued"  # resume_after_restart: the work died with the process
    MR_PASSED_OVER = "mr_passed_over"  # pass_over_mr: the MR failed to load or register
    SUPERSEDED = "superseded"  # a newer job of the PET replaces one not started (late
    #                            instances re-opened the series, or a late MR arrived)
    DELIVERED = "delivered"  # every destination has the results (or there is none)
    DELIVERY_FAILED = "delivery_failed"  # delivery_result: no delivery pending, one is dead
    RESENT = "resent"  # reset_dead (`dipnode resend`): a job that failed in delivery sends again


_W, _Q, _R, _S, _D, _F = (JobState.WAITING_FOR_MR, JobState.QUEUED, JobState.RUNNING,
                          JobState.SENDING, JobState.DONE, JobState.FAILED)

#: move -> (the states it leaves from, the state it enters).
MOVES: dict[Move, tuple[frozenset[JobState], JobState]] = {
    Move.MATCHED: (frozenset({_W}), _Q),
    Move.CLAIMED: (frozenset({_Q}), _R),
    Move.RETURNED: (frozenset({_R}), _Q),
    Move.COMPUTED: (frozenset({_R}), _S),
    Move.FAILED: (frozenset({_W, _Q, _R, _S}), _F),
    Move.RESTART_REQUEUED: (frozenset({_R}), _Q),
    Move.MR_PASSED_OVER: (frozenset({_R}), _W),
    Move.SUPERSEDED: (frozenset({_W, _Q}), _F),
    Move.DELIVERED: (frozenset({_S}), _D),
    Move.DELIVERY_FAILED: (frozenset({_S}), _F),
    Move.RESENT: (frozenset({_F}), _S),
}

#: Moves Store.transition makes when asked for a state alone; the others are made by their own
#: store methods (claim_next_queued, resume_after_restart, pass_over_mr, delivery_result,
#: reset_dead) or named by the caller (SUPERSEDED), so that each keeps its own conditions.
PLAIN_MOVES: tuple[Move, ...] = (Move.MATCHED, Move.CLAIMED, Move.RETURNED, Move.COMPUTED,
                                 Move.FAILED, Move.DELIVERED)

#: Every state change the lifecycle allows, by any move: state -> states it may enter.
JOB_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    s: frozenset(target for sources, target in MOVES.values() if s in sources) for s in JobState
}


def plain_move(old: JobState, new: JobState) -> Move | None:
    """The plain move from ``old`` to ``new``, or None when there is none."""
    for move in PLAIN_MOVES:
        sources, target = MOVES[move]
        if old in sources and target is new:
            return move
    return None


class DeliveryState(str, Enum):
    PENDING = "pending"
    SENT = "sent"
    DEAD = "dead"


class FetchState(str, Enum):
    """A retrieval of a job's MR from the sources (node/jobs/retrieval.py)."""

    QUERY = "query"  # due: query the sources (or retry retrieving ``series_uid``)
    RETRIEVED = "retrieved"  # ``series_uid`` is in the index; matching takes it from there
    EXHAUSTED = "exhausted"  # no (further) eligible MR at any source
    FAILED = "failed"  # the sources failed beyond the retry policy

    @property
    def terminal(self) -> bool:
        return self in (FetchState.EXHAUSTED, FetchState.FAILED)


@dataclass(frozen=True)
class InstanceRecord:
    """What the SCP knows about one stored instance, from its header (no pixels)."""

    sop_instance_uid: str
    sop_class_uid: str
    path: Path
    study_uid: str
    series_uid: str
    modality: str
    transfer_syntax: str
    patient_id: str = ""
    issuer_of_patient_id: str = ""
    series_description: str = ""
    frame_of_reference_uid: str = ""
    mr_acquisition_type: str = ""  # (0018,0023): "2D" / "3D"
    slice_thickness: float | None = None
    study_date: str = ""  # DA, YYYYMMDD
    series_date: str = ""
    # From completion.expected_count(): PET Number of Slices (x time slices / gates),
    # else Images in Acquisition; None where the header does not say.
    expected_count: int | None = None
    # Header facts for MR choice (matching.py), recorded per series as instances arrive:
    image_type: str = ""  # Image Type (0008,0008) values joined by "\\"
    orientation: tuple[float, ...] | None = None  # Image Orientation (Patient), 6 cosines
    position: tuple[float, float, float] | None = None  # Image Position (Patient), mm


@dataclass(frozen=True)
class SeriesRow:
    series_uid: str
    study_uid: str
    patient_id: str
    issuer: str
    modality: str
    series_description: str
    frame_of_reference_uid: str
    mr_acquisition_type: str
    slice_thickness: float | None
    study_date: str
    series_date: str
    expected_count: int | None
    instance_count: int
    first_received_at: float
    last_received_at: float
    completed_at: float | None
    state: SeriesState
    late_instances: int
    # Header facts (migration 3): the first instance's Image Type; whether instances carry
    # more than one Image Orientation (a localizer) or repeat a position (b-values, echoes).
    image_type: str = ""
    orientations_mixed: bool = False
    positions_repeated: bool = False
    # The first instance that disagreed with the series (store.py docstring), or None.
    conflict: str | None = None
    # Migration 5: when retention deleted the series' files (node/retention.py); None while
    # they are kept. A series re-sent after that is received anew and clears it.
    purged_at: float | None = None


@dataclass(frozen=True)
class KnownInstance:
    """An indexed instance: where it is and which series it belongs to."""

    sop_instance_uid: str
    series_uid: str
    path: Path
    transfer_syntax: str


@dataclass(frozen=True)
class JobRow:
    id: int
    pet_series_uid: str
    mr_series_uid: str | None
    state: JobState
    progress: float
    reason: str | None
    method: Method
    params: DipParams
    created_at: float
    updated_at: float
    attempts: int
    rerun_of: int | None
    output_dir: str | None
    uid_seed: str
    # Migration 2: why this MR was chosen and which were passed over (matching.py explains);
    # no_mr: the job fell back or failed for lack of a usable MR (a late MR re-triggers it).
    mr_choice: str | None = None
    no_mr: bool = False
    # Migration 5: when retention deleted the job's results and thumbnails (None: not yet);
    # report: trust numbers, registration and timings (node/report.py), None until computed.
    outputs_purged_at: float | None = None
    report: dict | None = None


@dataclass(frozen=True)
class DeliveryRow:
    job_id: int
    destination: str  # "AET@HOST:PORT", the key of the node's routes (node/wire.py)
    state: DeliveryState
    attempts: int
    next_attempt_at: float
    last_error: str | None


@dataclass(frozen=True)
class FetchRow:
    job_id: int
    state: FetchState
    attempts: int
    next_attempt_at: float
    source: str | None  # "AET@HOST:PORT" of the source holding series_uid
    study_uid: str | None
    series_uid: str | None  # the series being (or last) retrieved
    note: str | None  # what happened last, in words (the job's reason quotes it)
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class ResumeReport:
    """What resume_after_restart changed: jobs put back in the queue, jobs still sending."""

    requeued: tuple[int, ...]
    sending: tuple[int, ...]
    deliveries_due: int
