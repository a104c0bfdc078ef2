"""One job lifecycle: every state change is a named move of rows.MOVES, made through one checked
function; methods and parameters are stored typed and versioned (migration 4)."""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from dipnode.models.params import PARAMS_VERSION, DipParams, Method, preset
from dipnode.node.jobs.rows import (
    JOB_TRANSITIONS, MOVES, PLAIN_MOVES, InstanceRecord, JobState, Move, StoreError, TransitionError,
)
from dipnode.node.jobs.schema import MIGRATIONS, SCHEMA_VERSION
from dipnode.node.jobs.store import Store


def _series(store: Store, uid: str, modality: str = "PT") -> str:
    store.record_instance(InstanceRecord(
        sop_instance_uid=f"{uid}.1", sop_class_uid="1.2.840.10008.5.1.4.1.1.128", path=Path(f"/s/{uid}.dcm"),
        study_uid="1.2.3", series_uid=uid, modality=modality, transfer_syntax="1.2.840.10008.1.2.1",
        patient_id="P1"), 0.0)
    return uid


@pytest.fixture
def store(tmp_path: Path):
    with Store(tmp_path / "s.sqlite") as s:
        yield s


def test_the_table_lists_every_move_and_done_is_final() -> None:
    assert set(MOVES) == set(Move)
    assert JOB_TRANSITIONS[JobState.DONE] == frozenset()
    # Failed is final except for the re-send of a job that failed in delivery.
    assert JOB_TRANSITIONS[JobState.FAILED] == {JobState.SENDING}
    assert MOVES[Move.RESENT] == (frozenset({JobState.FAILED}), JobState.SENDING)
    assert MOVES[Move.MR_PASSED_OVER] == (frozenset({JobState.RUNNING}), JobState.WAITING_FOR_MR)
    assert MOVES[Move.RESTART_REQUEUED] == (frozenset({JobState.RUNNING}), JobState.QUEUED)
    assert MOVES[Move.SUPERSEDED][0] == {JobState.WAITING_FOR_MR, JobState.QUEUED}  # never a started job
    # Each plain move is the only one between its two states, so transition() can name it.
    pairs = [(s, MOVES[m][1]) for m in PLAIN_MOVES for s in MOVES[m][0]]
    assert len(pairs) == len(set(pairs))


def test_special_moves_only_through_their_own_methods(store: Store) -> None:
    job = store.create_job(_series(store, "1.1"), method=Method.SDIP, params=DipParams(), now=0.0)
    store.claim_next_queued(1.0)
    for move in (Move.RESTART_REQUEUED, Move.MR_PASSED_OVER, Move.RESENT, Move.DELIVERY_FAILED):
        with pytest.raises(TransitionError, match="its own store method"):
            store.transition(job.id, MOVES[move][1], 2.0, move=move, reason="x")
    # A running job cannot be superseded: its result would come second to the new one.
    with pytest.raises(TransitionError, match=r"running -> failed \(superseded\) is not allowed"):
        store.transition(job.id, JobState.FAILED, 2.0, move=Move.SUPERSEDED, reason="newer job")
    assert store.job(job.id).state is JobState.RUNNING
    store.pass_over_mr(job.id, "9.9", "registration failed", 3.0)
    back = store.job(job.id)
    assert (back.state, back.mr_series_uid, back.progress) == (JobState.WAITING_FOR_MR, None, 0.0)
    gone = store.transition(job.id, JobState.FAILED, 4.0, move=Move.SUPERSEDED, reason="superseded by job 2")
    assert gone.state is JobState.FAILED and gone.reason == "superseded by job 2"


def test_resend_only_takes_back_a_job_that_failed_in_delivery(store: Store) -> None:
    # Before: reset_dead wrote 'sending' over any failed job with raw SQL, a move the table
    # called final. Now it is Move.RESENT, and a job that failed in its fit stays failed.
    failed_fit = store.create_job(_series(store, "2.1"), method="sdip", params=DipParams(), now=0.0)
    store.claim_next_queued(1.0)
    store.transition(failed_fit.id, JobState.FAILED, 2.0, reason="DipDivergedError: loss is nan")
    assert store.reset_dead(failed_fit.id, 3.0) == 0
    assert store.job(failed_fit.id).state is JobState.FAILED
    with pytest.raises(TransitionError, match="failed -> sending is not allowed"):
        store.transition(failed_fit.id, JobState.SENDING, 4.0)


def test_method_and_parameters_come_back_typed(store: Store) -> None:
    params = preset("fast").replace(alpha=1.25, seed=3)
    job = store.create_job(_series(store, "3.1"), method=Method.CDIP, params=params, now=0.0,
                           state=JobState.WAITING_FOR_MR)
    assert job.method is Method.CDIP and job.params == params
    fallback = store.transition(job.id, JobState.QUEUED, 1.0, method=Method.GAUSSIAN)
    assert fallback.method is Method.GAUSSIAN and fallback.params == params
    with pytest.raises(StoreError, match="expected a method in"):
        store.create_job(_series(store, "3.2"), method="wavelets", params=params, now=0.0)
    with pytest.raises(StoreError, match="expected DipParams"):
        store.create_job(_series(store, "3.3"), method="sdip", params={"alpha": 0.6}, now=0.0)  # type: ignore[arg-type]


def test_parameters_of_a_newer_format_are_refused_not_misread(tmp_path: Path) -> None:
    path = tmp_path / "newer.sqlite"
    with Store(path) as s:
        job = s.create_job(_series(s, "4.1"), method="sdip", params=DipParams(), now=0.0)
    db = sqlite3.connect(path)
    db.execute("UPDATE jobs SET params_version = ? WHERE id = ?", (PARAMS_VERSION + 1, job.id))
    db.commit()
    db.close()
    with Store(path) as s, pytest.raises(StoreError, match=f"job {job.id}: .*format 1 to {PARAMS_VERSION}"):
        s.job(job.id)


def test_a_version_3_database_migrates_and_its_jobs_read_as_they_ran(tmp_path: Path) -> None:
    path = tmp_path / "v3.sqlite"
    db = sqlite3.connect(path)
    for script in MIGRATIONS[:3]:
        db.executescript(script)
    db.execute("INSERT INTO series (series_uid, study_uid, modality, first_received_at, last_received_at, state)"
               " VALUES ('1.2.3.1', '1.2.3', 'PT', 0, 0, 'complete')")
    ran = preset("tiny").replace(alpha=0.9)
    db.execute("INSERT INTO jobs (pet_series_uid, state, method, params_json, created_at, updated_at, uid_seed)"
               " VALUES ('1.2.3.1', 'done', 'gaussian', ?, 0, 0, 'x')", (json.dumps(ran.as_dict()),))
    db.execute("PRAGMA user_version = 3")
    db.commit()
    db.close()
    with Store(path) as store:
        assert store.schema_version == SCHEMA_VERSION >= 4
        [job] = store.jobs()
        assert (job.method, job.params, job.state) == (Method.GAUSSIAN, ran, JobState.DONE)
    db = sqlite3.connect(path)
    assert db.execute("SELECT params_version FROM jobs").fetchone()[0] == 1
    db.close()


def test_a_format_1_sdip_job_reads_back_as_the_papers_method(tmp_path: Path) -> None:
    # Parameters format 1 predates the data-consistency guard: its "sdip" was the paper's
    # method, which is "sdip-paper" now; a format-2 "sdip" job stays the guarded one.
    path = tmp_path / "f1.sqlite"
    with Store(path) as s:
        old = s.create_job(_series(s, "5.1"), method="sdip", params=DipParams(), now=0.0)
        new = s.create_job(_series(s, "5.2"), method="sdip", params=DipParams(), now=0.0)
    db = sqlite3.connect(path)
    db.execute("UPDATE jobs SET params_version = 1 WHERE id = ?", (old.id,))
    db.commit()
    db.close()
    with Store(path) as s:
        assert s.job(old.id).method is Method.SDIP_PAPER
        assert s.job(new.id).method is Method.SDIP
