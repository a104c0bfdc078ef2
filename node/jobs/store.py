"""The node's durable state: received instances, series, jobs and deliveries in SQLite.

Row types and the job lifecycle's table of moves are in rows.py, the schema and its migrations
in schema.py; this module reads and writes them.

Durability: WAL journal with ``synchronous=FULL``, so a committed transaction survives a power
cut; foreign keys on. The schema is created or migrated at open using ``PRAGMA user_version``.

Threads: one connection guarded by a re-entrant lock, so a Store may be shared by the SCP's
handler threads, the completion loop, workers and the sender. Every write runs in one
``BEGIN IMMEDIATE`` transaction (the write lock is taken up front, so two processes on the
same file serialise instead of failing on a lock upgrade; ``busy_timeout`` makes them wait).

Time is passed in (``now``: seconds since the epoch) rather than read from the clock, which
keeps decisions reproducible and tests deterministic.

Series lifecycle (the rule completion.py applies): a series is ``receiving`` until complete;
a *new* instance arriving for a ``complete`` series is a late instance: it is counted in
``late_instances`` and re-opens the series (state back to ``receiving``, ``completed_at``
cleared), so it completes again by count or stable age and the pipeline then runs it anew.
A duplicate SOP Instance UID is idempotent and never late.

Series integrity: every instance of a series must agree with the series' first instance on
Patient ID, Issuer of Patient ID, Study Instance UID, Frame of Reference UID and Modality. The
first instance that does not is recorded in ``series.conflict`` (attribute names and the
instance's UID, never patient values); such a series is no MR prior for anyone and its PET
job fails (node/jobs/worker.py), whatever else arrives.
"""
from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Any

from dipnode.models.params import (PARAMS_VERSION, DipParams, Method, params_from_record, params_record,
                                   stored_method)
from dipnode.node.jobs.rows import (
    MOVES, DeliveryRow, DeliveryState, FetchRow, FetchState, InstanceRecord, JobRow, JobState,
    PLAIN_MOVES, KnownInstance, Move, ResumeReport, SeriesRow, SeriesState, StoreError,
    TransitionError, plain_move,
)
from dipnode.node.jobs.schema import SCHEMA_VERSION, migrate

log = logging.getLogger(__name__)

__all__ = ["Store"]


class Store:
    """The SQLite-backed index and job store. Use as a context manager or call close()."""

    def __init__(self, path: Path, *, busy_timeout_s: float = 30.0, readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self._lock = threading.RLock()
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, so a transaction is exactly
        # one method call. check_same_thread=False: the lock, not the thread, guards the connection.
        # Read-only: SQLite's own mode=ro, so a write fails in SQLite rather than by convention.
        target = f"file:{self.path}?mode=ro" if readonly else str(self.path)
        self._db = sqlite3.connect(target, timeout=busy_timeout_s, isolation_level=None,
                                   check_same_thread=False, uri=readonly)
        self._db.row_factory = sqlite3.Row
        if readonly:
            version = self.schema_version
            if version != SCHEMA_VERSION:
                self._db.close()
                raise StoreError(f"database {str(self.path)!r}: expected schema version {SCHEMA_VERSION} "
                                 f"to read it, got {version} (open it once with this dipnode's node)")
            return
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._migrate()

    @classmethod
    def open(cls, path: Path) -> "Store":
        """Open (creating its folder and schema if needed) the database at ``path``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return cls(path)

    @classmethod
    def open_readonly(cls, path: Path, *, busy_timeout_s: float = 30.0) -> "Store":
        """A view of an existing database for tools and checks (the soak harness, a second
        process while the node runs): no migration, and SQLite refuses every write."""
        if not Path(path).is_file():
            raise StoreError(f"database {str(path)!r}: expected an existing file to read")
        return cls(path, busy_timeout_s=busy_timeout_s, readonly=True)

    # -- plumbing ---------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def _migrate(self) -> None:
        with self._tx() as db:
            migrate(db, self.path)

    @property
    def schema_version(self) -> int:
        return int(self._query("PRAGMA user_version")[0][0])

    def integrity_check(self) -> str:
        """SQLite's ``PRAGMA integrity_check``: ``"ok"``, or what it found."""
        return "; ".join(str(r[0]) for r in self._query("PRAGMA integrity_check"))

    # -- instances and series ---------------------------------------------------------------

    def record_instance(self, inst: InstanceRecord, now: float) -> bool:
        """Index one stored instance and update its series; True if new, False if a duplicate.

        A duplicate SOP Instance UID changes nothing (a re-sent file is idempotent). A new
        instance for a complete series is late: it re-opens the series (see module docstring).
        """
        for name in ("sop_instance_uid", "series_uid", "study_uid", "modality"):
            if not getattr(inst, name):
                raise StoreError(f"record_instance: expected a non-empty {name}, got {getattr(inst, name)!r}")
        with self._tx() as db:
            known = db.execute(
                "SELECT series_uid FROM instances WHERE sop_instance_uid = ?", (inst.sop_instance_uid,)
            ).fetchone()
            if known is not None:
                if known[0] != inst.series_uid:
                    log.warning(
                        "SOP instance %s already indexed in series %s; ignored copy claims series %s",
                        inst.sop_instance_uid, known[0], inst.series_uid,
                    )
                return False
            series = db.execute("SELECT * FROM series WHERE series_uid = ?", (inst.series_uid,)).fetchone()
            if series is not None and series["purged_at"] is not None and db.execute(
                    "SELECT 1 FROM instances WHERE series_uid = ? LIMIT 1", (inst.series_uid,)).fetchone():
                # Retention is deleting this series right now (node/retention.py): refused, the
                # peer may send it again in a moment and it is then received anew.
                raise StoreError(f"record_instance: series {inst.series_uid} is being deleted by "
                                 "retention; send it again")
            if series is not None and series["conflict"] is None:
                differs = _identity_conflict(series, inst)
                if differs:
                    conflict = (f"instance {inst.sop_instance_uid} differs from the series' first "
                                f"instance in {', '.join(differs)}")
                    db.execute("UPDATE series SET conflict = ? WHERE series_uid = ?", (conflict, inst.series_uid))
                    log.warning("series %s is not one consistent series (%s): it will not be processed",
                                inst.series_uid, conflict)
            if series is None:
                db.execute(
                    "INSERT INTO series (series_uid, study_uid, patient_id, issuer, modality, series_description,"
                    " frame_of_reference_uid, mr_acquisition_type, slice_thickness, study_date, series_date,"
                    " expected_count, instance_count, first_received_at, last_received_at, state)"
                    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,1,?,?,'receiving')",
                    (inst.series_uid, inst.study_uid, inst.patient_id, inst.issuer_of_patient_id,
                     inst.modality, inst.series_description, inst.frame_of_reference_uid,
                     inst.mr_acquisition_type, inst.slice_thickness, inst.study_date, inst.series_date,
                     inst.expected_count, now, now),
                )
            else:
                late = series["state"] == SeriesState.COMPLETE.value
                if late:
                    log.info("late instance %s re-opens complete series %s", inst.sop_instance_uid, inst.series_uid)
                db.execute(
                    "UPDATE series SET instance_count = instance_count + 1,"
                    " last_received_at = max(last_received_at, ?),"
                    " expected_count = coalesce(expected_count, ?),"
                    " late_instances = late_instances + ?,"
                    " state = 'receiving', purged_at = NULL,"
                    " completed_at = CASE WHEN ? THEN NULL ELSE completed_at END"
                    " WHERE series_uid = ?",
                    (now, inst.expected_count, int(late), int(late), inst.series_uid),
                )
            db.execute(
                "INSERT INTO instances (sop_instance_uid, sop_class_uid, path, study_uid, series_uid, patient_id,"
                " issuer_of_patient_id, modality, received_at, transfer_syntax) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (inst.sop_instance_uid, inst.sop_class_uid, str(inst.path), inst.study_uid, inst.series_uid,
                 inst.patient_id, inst.issuer_of_patient_id, inst.modality, now, inst.transfer_syntax),
            )
            _record_mr_facts(db, inst)
        log.debug("indexed instance %s of series %s", inst.sop_instance_uid, inst.series_uid)
        return True

    def series(self, uid: str) -> SeriesRow | None:
        rows = self._query("SELECT * FROM series WHERE series_uid = ?", (uid,))
        return _series(rows[0]) if rows else None

    def instance(self, sop_instance_uid: str) -> KnownInstance | None:
        """The indexed instance with this SOP Instance UID, or None."""
        rows = self._query("SELECT sop_instance_uid, series_uid, path, transfer_syntax FROM instances"
                           " WHERE sop_instance_uid = ?", (sop_instance_uid,))
        if not rows:
            return None
        r = rows[0]
        return KnownInstance(r[0], r[1], Path(r[2]), r[3])

    def study_job_index(self, job_id: int) -> int:
        """How many jobs of the same study (any PET series of it, any state) precede ``job_id``:
        0 for the first. Jobs are never deleted, so the value is stable for a job."""
        rows = self._query(
            "SELECT count(*) FROM jobs j JOIN series s ON s.series_uid = j.pet_series_uid"
            " WHERE j.id < ? AND s.study_uid = (SELECT s2.study_uid FROM jobs j2"
            " JOIN series s2 ON s2.series_uid = j2.pet_series_uid WHERE j2.id = ?)",
            (job_id, job_id))
        return int(rows[0][0])

    def series_instances(self, uid: str) -> list[Path]:
        """Paths of the series' instances in arrival order (the loader sorts them spatially)."""
        rows = self._query("SELECT path FROM instances WHERE series_uid = ? ORDER BY received_at, rowid", (uid,))
        return [Path(r[0]) for r in rows]

    def indexed_paths(self) -> set[Path]:
        """Every instance path in the index (start-up uses it to find unindexed spool files)."""
        return {Path(r[0]) for r in self._query("SELECT path FROM instances")}

    def indexed_instances(self) -> dict[str, Path]:
        """Every indexed instance: SOP Instance UID -> spool path."""
        return {r[0]: Path(r[1]) for r in self._query("SELECT sop_instance_uid, path FROM instances")}

    def incomplete_series(self) -> list[SeriesRow]:
        rows = self._query("SELECT * FROM series WHERE state = 'receiving' ORDER BY first_received_at")
        return [_series(r) for r in rows]

    def related_series(self, study_uid: str, patient_id: str, issuer: str) -> list[SeriesRow]:
        """Series of the same study or of the same Patient ID and issuer (matching candidates).

        An empty Patient ID matches only within the study: an unidentified patient is nobody's.
        A series with a conflict (two patients, studies, ...) is nobody's either.
        """
        rows = self._query(
            "SELECT * FROM series WHERE (study_uid = ? OR (? != '' AND patient_id = ? AND issuer = ?))"
            " AND conflict IS NULL AND purged_at IS NULL ORDER BY first_received_at",
            (study_uid, patient_id, patient_id, issuer),
        )
        return [_series(r) for r in rows]

    def mark_series_complete(self, uid: str, at: float, *, if_instance_count: int | None = None) -> bool:
        """Mark a receiving series complete; False if it was not receiving or, with
        ``if_instance_count``, if an instance arrived since the caller looked (it is not stable)."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE series SET state = 'complete', completed_at = ?"
                " WHERE series_uid = ? AND state = 'receiving' AND (? IS NULL OR instance_count = ?)",
                (at, uid, if_instance_count, if_instance_count),
            )
            return cur.rowcount == 1

    # -- jobs -------------------------------------------------------------------------------

    def create_job(
        self,
        pet_series_uid: str,
        *,
        method: Method | str,
        params: DipParams,
        now: float,
        mr_series_uid: str | None = None,
        state: JobState = JobState.QUEUED,
        rerun: bool = False,
        output_dir: str | None = None,
        uid_seed: str | None = None,
    ) -> JobRow:
        """The job for a PET series: its latest existing job unless ``rerun``.

        A PET is processed once. With ``rerun=True`` a new job is created whose ``rerun_of`` is
        the latest job for that PET. ``uid_seed`` (default ``"<pet uid>/<job id>"``) feeds the
        deterministic output UIDs: a re-executed job reproduces its UIDs, a re-run does not.
        """
        if state not in (JobState.QUEUED, JobState.WAITING_FOR_MR):
            raise StoreError(f"create_job: expected state queued or waiting_for_mr, got {state.value!r}")
        method = _method(method, "create_job")
        params_json = _params_json(params, "create_job")
        with self._tx() as db:
            latest = db.execute(
                "SELECT * FROM jobs WHERE pet_series_uid = ? ORDER BY id DESC LIMIT 1", (pet_series_uid,)
            ).fetchone()
            if latest is not None and not rerun:
                return _job(latest)
            try:
                cur = db.execute(
                    "INSERT INTO jobs (pet_series_uid, mr_series_uid, state, method, params_json, params_version,"
                    " created_at, updated_at, rerun_of, output_dir, uid_seed) VALUES (?,?,?,?,?,?,?,?,?,?, '')",
                    (pet_series_uid, mr_series_uid, state.value, method.value, params_json, PARAMS_VERSION,
                     now, now, latest["id"] if latest is not None else None, output_dir),
                )
            except sqlite3.IntegrityError as e:
                raise StoreError(
                    f"create_job: expected known series for pet {pet_series_uid!r} / mr {mr_series_uid!r}: {e}"
                ) from None
            job_id = int(cur.lastrowid)  # type: ignore[arg-type]
            db.execute("UPDATE jobs SET uid_seed = ? WHERE id = ?", (uid_seed or f"{pet_series_uid}/{job_id}", job_id))
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        log.debug("job %d created for PET series %s (rerun_of=%s)", job_id, pet_series_uid, row["rerun_of"])
        return _job(row)

    def job(self, job_id: int) -> JobRow:
        rows = self._query("SELECT * FROM jobs WHERE id = ?", (job_id,))
        if not rows:
            raise StoreError(f"job: expected an existing job id, got {job_id!r}")
        return _job(rows[0])

    def jobs(self, states: Iterable[JobState] | None = None, *, pet_series_uid: str | None = None) -> list[JobRow]:
        sql, args = "SELECT * FROM jobs WHERE 1", []
        if states is not None:
            values = [JobState(s).value for s in states]
            sql += f" AND state IN ({','.join('?' * len(values))})"
            args += values
        if pet_series_uid is not None:
            sql += " AND pet_series_uid = ?"
            args.append(pet_series_uid)
        return [_job(r) for r in self._query(sql + " ORDER BY id", args)]

    def transition(
        self,
        job_id: int,
        new_state: JobState,
        now: float,
        *,
        move: Move | None = None,
        progress: float | None = None,
        reason: str | None = None,
        mr_series_uid: str | None = None,
        method: Method | None = None,
        params: DipParams | None = None,
        output_dir: str | None = None,
        expect: JobState | None = None,
    ) -> JobRow:
        """Move a job to ``new_state`` in one transaction, by ``move`` (default: the plain move
        between the two states, rows.PLAIN_MOVES), validated against the lifecycle table.

        FAILED requires a reason. Leaving WAITING_FOR_MR may set the MR and the method (a
        Gaussian fallback changes the method). ``expect`` guards against a concurrent change.
        """
        new_state = JobState(new_state)
        if move is not None and move not in (*PLAIN_MOVES, Move.SUPERSEDED):
            raise TransitionError(f"transition: move {move.value} is made by its own store method only")
        with self._tx() as db:
            row = self._move(db, job_id, now, move=move, new_state=new_state, expect=expect,
                             progress=progress, reason=reason, mr_series_uid=mr_series_uid,
                             method=method, params=params, output_dir=output_dir)
        return _job(row)

    def _move(self, db: sqlite3.Connection, job_id: int, now: float, *, move: Move | None,
              new_state: JobState | None = None, expect: JobState | None = None,
              progress: float | None = None, reason: str | None = None,
              mr_series_uid: str | None = None, clear_mr: bool = False,
              method: Method | None = None, params: DipParams | None = None,
              output_dir: str | None = None, caller: str = "transition") -> sqlite3.Row:
        """The one place a job's state changes (inside the caller's transaction): checks the
        move against rows.MOVES and writes the new state with what the move sets."""
        if progress is not None and not 0.0 <= progress <= 1.0:
            raise StoreError(f"{caller}: expected progress in [0, 1], got {progress!r}")
        row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise StoreError(f"{caller}: expected an existing job id, got {job_id!r}")
        old = JobState(row["state"])
        if expect is not None and old is not expect:
            raise TransitionError(f"job {job_id}: expected state {expect.value!r}, got {old.value!r}")
        if move is None:
            move = plain_move(old, new_state) if new_state is not None else None
            if move is None:
                allowed = sorted({MOVES[m][1].value for m in MOVES if old in MOVES[m][0]})
                raise TransitionError(f"job {job_id}: {old.value} -> {new_state.value if new_state else '?'} "
                                      f"is not allowed; expected one of {allowed}")
        sources, target = MOVES[move]
        if new_state is not None and new_state is not target:
            raise TransitionError(f"job {job_id}: move {move.value} enters {target.value}, not {new_state.value}")
        if old not in sources:
            raise TransitionError(f"job {job_id}: {old.value} -> {target.value} ({move.value}) is not allowed; "
                                  f"{move.value} leaves from {sorted(s.value for s in sources)}")
        if target is JobState.FAILED and not reason:
            raise StoreError(f"{caller}: expected a reason for the failed state, got none")
        if progress is None:
            # DONE is complete; back in the queue or choosing again the work restarts; a
            # claimed job starts at 0; otherwise keep it.
            progress = {JobState.DONE: 1.0, JobState.QUEUED: 0.0, JobState.WAITING_FOR_MR: 0.0,
                        JobState.RUNNING: 0.0}.get(target, row["progress"])
        db.execute(
            "UPDATE jobs SET state = ?, progress = ?, reason = CASE WHEN ? THEN NULL ELSE coalesce(?, reason) END,"
            " updated_at = ?, mr_series_uid = CASE WHEN ? THEN NULL ELSE coalesce(?, mr_series_uid) END,"
            " method = coalesce(?, method), params_json = coalesce(?, params_json),"
            " params_version = CASE WHEN ? IS NULL AND ? IS NULL THEN params_version ELSE ? END,"
            " output_dir = coalesce(?, output_dir), attempts = attempts + ? WHERE id = ?",
            (target.value, progress, move is Move.RESENT, reason, now, clear_mr, mr_series_uid,
             None if method is None else _method(method, caller).value,
             None if params is None else _params_json(params, caller),
             # a new method or parameters are written in today's format (a format-1 record
             # reads the same in format 2 but for what "sdip" names)
             None if method is None else 1, None if params is None else 1, PARAMS_VERSION,
             output_dir, int(move is Move.CLAIMED), job_id),
        )
        # `dipnode serve` logs one line per job transition (UIDs stay at debug level).
        log.info("job %d: %s -> %s (%s)%s", job_id, old.value, target.value, move.value,
                 f": {reason[:300]}" if reason and target is JobState.FAILED else "")
        return db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()

    def set_progress(self, job_id: int, progress: float, now: float) -> None:
        """Progress of a running job (no state change)."""
        if not 0.0 <= progress <= 1.0:
            raise StoreError(f"set_progress: expected progress in [0, 1], got {progress!r}")
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET progress = ?, updated_at = ? WHERE id = ? AND state = 'running'",
                (progress, now, job_id),
            )

    def claim_next_queued(self, now: float) -> JobRow | None:
        """Atomically move the oldest QUEUED job to RUNNING and return it (None if none)."""
        with self._tx() as db:
            row = db.execute("SELECT id FROM jobs WHERE state = 'queued' ORDER BY id LIMIT 1").fetchone()
            if row is None:
                return None
            out = self._move(db, row["id"], now, move=Move.CLAIMED, caller="claim_next_queued")
        return _job(out)

    def resume_after_restart(self, now: float) -> ResumeReport:
        """After a crash or restart: RUNNING jobs go back to QUEUED (their work was lost);
        SENDING jobs stay, and their pending deliveries are due now."""
        with self._tx() as db:
            running = [r[0] for r in db.execute("SELECT id FROM jobs WHERE state = 'running' ORDER BY id")]
            for job_id in running:
                self._move(db, job_id, now, move=Move.RESTART_REQUEUED, caller="resume_after_restart")
            requeued = tuple(running)
            sending = tuple(r[0] for r in db.execute("SELECT id FROM jobs WHERE state = 'sending' ORDER BY id"))
            due = db.execute(
                "UPDATE deliveries SET next_attempt_at = min(next_attempt_at, ?) WHERE state = 'pending'"
                " AND job_id IN (SELECT id FROM jobs WHERE state = 'sending')",
                (now,),
            ).rowcount
        if requeued:
            log.info("re-queued jobs interrupted by a restart: %s", list(requeued))
        return ResumeReport(requeued, sending, due)

    # -- deliveries -------------------------------------------------------------------------

    def add_deliveries(self, job_id: int, destinations: Iterable[str], now: float) -> list[DeliveryRow]:
        """One pending delivery per destination ("AET@HOST:PORT"), due now; existing ones kept."""
        dests = list(destinations)
        with self._tx() as db:
            for d in dests:
                try:
                    db.execute(
                        "INSERT OR IGNORE INTO deliveries (job_id, destination, state, next_attempt_at)"
                        " VALUES (?, ?, 'pending', ?)",
                        (job_id, d, now),
                    )
                except sqlite3.IntegrityError:
                    raise StoreError(f"add_deliveries: expected an existing job id, got {job_id!r}") from None
        return self.deliveries(job_id)

    def deliveries(self, job_id: int) -> list[DeliveryRow]:
        rows = self._query("SELECT * FROM deliveries WHERE job_id = ? ORDER BY destination", (job_id,))
        return [_delivery(r) for r in rows]

    def due_deliveries(self, now: float) -> list[DeliveryRow]:
        """Pending deliveries of SENDING jobs whose next attempt is due, oldest first."""
        rows = self._query(
            "SELECT d.* FROM deliveries d JOIN jobs j ON j.id = d.job_id WHERE d.state = 'pending'"
            " AND j.state = 'sending' AND d.next_attempt_at <= ? ORDER BY d.next_attempt_at, d.job_id",
            (now,),
        )
        return [_delivery(r) for r in rows]

    def delivery_result(
        self,
        job_id: int,
        destination: str,
        now: float,
        *,
        ok: bool,
        error: str | None = None,
        next_attempt_at: float | None = None,
    ) -> JobRow:
        """Record one send attempt: sent if ``ok``; else retried at ``next_attempt_at``, or dead
        when that is None (the sender gave up). Settles the job in the same transaction: once no
        delivery is pending a SENDING job becomes DONE (all sent) or FAILED (some dead)."""
        if not ok and not error:
            raise StoreError("delivery_result: expected an error message for a failed attempt, got none")
        if ok:
            state = DeliveryState.SENT
        else:
            state = DeliveryState.PENDING if next_attempt_at is not None else DeliveryState.DEAD
        with self._tx() as db:
            cur = db.execute(
                "UPDATE deliveries SET state = ?, attempts = attempts + 1, last_error = ?,"
                " next_attempt_at = coalesce(?, next_attempt_at) WHERE job_id = ? AND destination = ?"
                " AND state = 'pending'",
                (state.value, None if ok else error, next_attempt_at, job_id, destination),
            )
            if cur.rowcount != 1:
                raise StoreError(
                    f"delivery_result: expected a pending delivery {destination!r} of job {job_id}, found none"
                )
            self._settle(db, job_id, now)
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row)

    def _settle(self, db: sqlite3.Connection, job_id: int, now: float) -> None:
        job = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if job is None or job["state"] != JobState.SENDING.value:
            return
        counts = dict(db.execute(
            "SELECT state, count(*) FROM deliveries WHERE job_id = ? GROUP BY state", (job_id,)
        ).fetchall())
        if counts.get("pending", 0):
            return
        if counts.get("dead", 0):
            dead = [f"{r[0]}: {r[1]}" for r in db.execute(
                "SELECT destination, last_error FROM deliveries WHERE job_id = ? AND state = 'dead'"
                " ORDER BY destination",
                (job_id,),
            )]
            self._move(db, job_id, now, move=Move.DELIVERY_FAILED, reason="delivery failed: " + "; ".join(dead),
                       caller="delivery_result")
        else:
            self._move(db, job_id, now, move=Move.DELIVERED, caller="delivery_result")

    def reset_dead(self, job_id: int, now: float) -> int:
        """Re-send: dead deliveries become pending and due now (attempts restart at 0); a job
        that failed in delivery goes back to SENDING (Move.RESENT). Returns the number reset."""
        with self._tx() as db:
            n = db.execute(
                "UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_at = ?, last_error = NULL"
                " WHERE job_id = ? AND state = 'dead'",
                (now, job_id),
            ).rowcount
            row = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            # Dead deliveries exist only once a job was SENDING: a FAILED job with some failed in
            # delivery (a SENDING one still has others pending and settles by itself).
            if n and row is not None and row["state"] == JobState.FAILED.value:
                self._move(db, job_id, now, move=Move.RESENT, caller="reset_dead")
        return n

    # -- retention and reporting (migration 5; node/retention.py) ---------------------------

    def all_series(self) -> list[SeriesRow]:
        """Every series in the index, oldest first (retention plans over them)."""
        return [_series(r) for r in self._query("SELECT * FROM series ORDER BY first_received_at, series_uid")]

    def job_counts(self) -> dict[JobState, int]:
        """How many jobs are in each state (every state present, 0 where none)."""
        counts = dict.fromkeys(JobState, 0)
        for state, n in self._query("SELECT state, count(*) FROM jobs GROUP BY state"):
            counts[JobState(state)] = int(n)
        return counts

    def dead_letter_count(self) -> int:
        """Deliveries the sender gave up on, not yet re-sent."""
        return int(self._query("SELECT count(*) FROM deliveries WHERE state = 'dead'")[0][0])

    def mark_series_purged(self, uid: str, now: float) -> bool:
        """Retention's first step for a series, its intent: from this commit on the series
        counts as deleted (no MR prior, no re-run) although its files and instance rows still
        exist; :meth:`drop_purged_instances` removes the rows once the files are gone, and a
        sweep interrupted in between is finished by the next (:meth:`purging_series`).

        Only a complete series that no unfinished job uses is marked, checked in the same
        transaction; False when it is not (any more) eligible."""
        with self._tx() as db:
            n = db.execute(
                "UPDATE series SET purged_at = ? WHERE series_uid = ? AND purged_at IS NULL"
                " AND state = 'complete' AND NOT EXISTS (SELECT 1 FROM jobs j WHERE"
                " (j.pet_series_uid = series.series_uid OR j.mr_series_uid = series.series_uid)"
                " AND j.state NOT IN ('done', 'failed'))",
                (now, uid)).rowcount
        return n == 1

    def drop_purged_instances(self, uid: str) -> int:
        """Retention's last step for a series whose files are deleted: its instance rows go in
        one transaction. The series row stays (purged_at set, no instances) while a job refers
        to it, else it goes too. Returns the number of instance rows deleted."""
        with self._tx() as db:
            row = db.execute("SELECT purged_at FROM series WHERE series_uid = ?", (uid,)).fetchone()
            if row is None or row["purged_at"] is None:
                raise StoreError(f"drop_purged_instances: expected series {uid} marked purged, got "
                                 f"{'no such series' if row is None else 'a kept series'}")
            n = db.execute("DELETE FROM instances WHERE series_uid = ?", (uid,)).rowcount
            used = db.execute("SELECT 1 FROM jobs WHERE pet_series_uid = ? OR mr_series_uid = ? LIMIT 1",
                              (uid, uid)).fetchone()
            if used:
                db.execute("UPDATE series SET instance_count = 0, late_instances = 0 WHERE series_uid = ?", (uid,))
            else:
                db.execute("DELETE FROM series WHERE series_uid = ?", (uid,))
        return n

    def purging_series(self) -> list[str]:
        """Series marked purged whose instance rows remain: a sweep stopped between its steps."""
        return [r[0] for r in self._query(
            "SELECT s.series_uid FROM series s WHERE s.purged_at IS NOT NULL AND EXISTS"
            " (SELECT 1 FROM instances i WHERE i.series_uid = s.series_uid) ORDER BY s.purged_at")]

    def mark_outputs_purged(self, job_id: int, now: float) -> bool:
        """Retention's intent for a finished job's results: from this commit on they count as
        deleted (a re-send is refused), then the files go (node/retention.py). False when the
        job is not finished or already marked."""
        with self._tx() as db:
            n = db.execute("UPDATE jobs SET outputs_purged_at = ? WHERE id = ? AND outputs_purged_at IS NULL"
                           " AND state IN ('done', 'failed')", (now, job_id)).rowcount
        return n == 1

    def set_report(self, job_id: int, report: dict) -> None:
        """Store the job's trust numbers, registration and timings (JSON-safe values)."""
        text = json.dumps(report, sort_keys=True, allow_nan=False)
        with self._tx() as db:
            n = db.execute("UPDATE jobs SET report_json = ? WHERE id = ?", (text, job_id)).rowcount
        if n != 1:
            raise StoreError(f"set_report: expected an existing job id, got {job_id!r}")

    def check_writable(self) -> None:
        """Raise sqlite3.Error unless a write transaction can be taken now (health check)."""
        with self._tx():
            pass

    # -- MR choice and retrieval (migration 3) ----------------------------------------------

    def set_mr_choice(self, job_id: int, text: str, *, no_mr: bool, now: float) -> None:
        """Record why the job has this MR (or none) and which were passed over; ``no_mr``:
        it fell back or failed for lack of a usable MR (a late MR re-triggers such jobs)."""
        with self._tx() as db:
            n = db.execute("UPDATE jobs SET mr_choice = ?, no_mr = ?, updated_at = ? WHERE id = ?",
                           (text[:4000], int(no_mr), now, job_id)).rowcount
        if n != 1:
            raise StoreError(f"set_mr_choice: expected an existing job id, got {job_id!r}")

    def pass_over_mr(self, job_id: int, series_uid: str, reason: str, now: float) -> JobRow:
        """A RUNNING job's MR failed to load or register: remember it as passed over (with
        why) and put the job back to WAITING_FOR_MR without an MR, in one transaction."""
        if not reason:
            raise StoreError("pass_over_mr: expected a reason, got none")
        with self._tx() as db:
            row = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise StoreError(f"pass_over_mr: expected an existing job id, got {job_id!r}")
            if row["state"] != JobState.RUNNING.value:
                raise TransitionError(f"job {job_id}: expected state 'running' to pass over its MR, "
                                      f"got {row['state']!r}")
            db.execute("INSERT OR REPLACE INTO mr_passed_over (job_id, series_uid, reason, at) VALUES (?,?,?,?)",
                       (job_id, series_uid, reason[:2000], now))
            out = self._move(db, job_id, now, move=Move.MR_PASSED_OVER, clear_mr=True, caller="pass_over_mr")
        log.debug("job %d: MR %s passed over", job_id, series_uid)
        return _job(out)

    def passed_over(self, job_id: int) -> dict[str, str]:
        """MR series this job passed over, with why: {series UID: reason}."""
        rows = self._query("SELECT series_uid, reason FROM mr_passed_over WHERE job_id = ? ORDER BY at",
                           (job_id,))
        return {r[0]: r[1] for r in rows}

    def request_fetch(self, job_id: int, now: float) -> FetchRow:
        """Ask the retriever to query the sources for this job's MR (idempotent: an existing
        retrieval is returned unchanged)."""
        with self._tx() as db:
            try:
                db.execute("INSERT OR IGNORE INTO fetches (job_id, state, next_attempt_at, created_at, updated_at)"
                           " VALUES (?, 'query', ?, ?, ?)", (job_id, now, now, now))
            except sqlite3.IntegrityError:
                raise StoreError(f"request_fetch: expected an existing job id, got {job_id!r}") from None
            row = db.execute("SELECT * FROM fetches WHERE job_id = ?", (job_id,)).fetchone()
        return _fetch(row)

    def fetch(self, job_id: int) -> FetchRow | None:
        rows = self._query("SELECT * FROM fetches WHERE job_id = ?", (job_id,))
        return _fetch(rows[0]) if rows else None

    def due_fetches(self, now: float) -> list[FetchRow]:
        """Retrievals to work on now: state 'query', due, for jobs still waiting for an MR."""
        rows = self._query(
            "SELECT f.* FROM fetches f JOIN jobs j ON j.id = f.job_id WHERE f.state = 'query'"
            " AND f.next_attempt_at <= ? AND j.state = 'waiting_for_mr' ORDER BY f.next_attempt_at, f.job_id",
            (now,))
        return [_fetch(r) for r in rows]

    def update_fetch(self, job_id: int, now: float, *, state: FetchState, note: str,
                     attempts: int | None = None, next_attempt_at: float | None = None,
                     source: str | None = None, study_uid: str | None = None,
                     series_uid: str | None = None, clear_series: bool = False) -> FetchRow:
        """Record one step of a retrieval (the retriever's and matching's only write)."""
        state = FetchState(state)
        with self._tx() as db:
            n = db.execute(
                "UPDATE fetches SET state = ?, note = ?, attempts = coalesce(?, attempts),"
                " next_attempt_at = coalesce(?, next_attempt_at), updated_at = ?,"
                " source = CASE WHEN ? THEN NULL ELSE coalesce(?, source) END,"
                " study_uid = CASE WHEN ? THEN NULL ELSE coalesce(?, study_uid) END,"
                " series_uid = CASE WHEN ? THEN NULL ELSE coalesce(?, series_uid) END WHERE job_id = ?",
                (state.value, note[:4000], attempts, next_attempt_at, now, clear_series, source,
                 clear_series, study_uid, clear_series, series_uid, job_id)).rowcount
            if n != 1:
                raise StoreError(f"update_fetch: expected a retrieval for job {job_id!r}, found none")
            row = db.execute("SELECT * FROM fetches WHERE job_id = ?", (job_id,)).fetchone()
        return _fetch(row)

    def fetch_again(self, job_id: int, now: float, note: str) -> FetchRow:
        """The retrieved series is not usable (ineligible once its headers were seen, or passed
        over): query again now; series already in the index are not retrieved twice."""
        return self.update_fetch(job_id, now, state=FetchState.QUERY, note=note, attempts=0,
                                 next_attempt_at=now, clear_series=True)


# -- header facts for MR choice (migration 3) ---------------------------------------------------

# The loader's tolerance for "one orientation" (dicom_io/series.py): a series that it would refuse
# for its orientations is flagged here already, before anyone tries to load it.
_ORIENTATION_TOL = 1e-4


def _position_key(position: tuple[float, float, float]) -> str:
    # 0.01 mm, the loader's duplicate-position tolerance; "+ 0.0" folds -0.00 into 0.00.
    return "\\".join(f"{round(float(v), 2) + 0.0:.2f}" for v in position)


def _record_mr_facts(db: sqlite3.Connection, inst: InstanceRecord) -> None:
    """Keep the series' header facts current with one more (new) instance: cheap, indexed.

    Orientations are compared with the series' first; a position already held by another
    instance of the series marks it as repeating positions (DWI b-values, multi-echo, phases).
    """
    row = db.execute("SELECT image_type, orientation FROM series WHERE series_uid = ?",
                     (inst.series_uid,)).fetchone()
    updates: dict[str, Any] = {}
    if inst.image_type and not row["image_type"]:
        updates["image_type"] = inst.image_type
    if inst.orientation is not None:
        if not row["orientation"]:
            updates["orientation"] = json.dumps([float(v) for v in inst.orientation])
        else:
            first = json.loads(row["orientation"])
            if len(first) != len(inst.orientation) or max(
                    abs(a - float(b)) for a, b in zip(first, inst.orientation)) > _ORIENTATION_TOL:
                updates["orientations_mixed"] = 1
    if inst.position is not None:
        key = _position_key(inst.position)
        db.execute("UPDATE instances SET position = ? WHERE sop_instance_uid = ?", (key, inst.sop_instance_uid))
        if db.execute("SELECT 1 FROM instances WHERE series_uid = ? AND position = ? AND sop_instance_uid != ?"
                      " LIMIT 1", (inst.series_uid, key, inst.sop_instance_uid)).fetchone():
            updates["positions_repeated"] = 1
    if updates:
        # Column names come from the literal keys above, never from input.
        db.execute(f"UPDATE series SET {', '.join(f'{k} = ?' for k in updates)} WHERE series_uid = ?",
                   (*updates.values(), inst.series_uid))


# What every instance of a series must share with its first one (module docstring).
_IDENTITY = (("patient_id", "patient_id", "Patient ID"), ("issuer", "issuer_of_patient_id", "Issuer of Patient ID"),
             ("study_uid", "study_uid", "Study Instance UID"),
             ("frame_of_reference_uid", "frame_of_reference_uid", "Frame of Reference UID"),
             ("modality", "modality", "Modality"))


def _identity_conflict(series: sqlite3.Row, inst: InstanceRecord) -> list[str]:
    return [name for column, attr, name in _IDENTITY if series[column] != getattr(inst, attr)]


def _series(r: sqlite3.Row) -> SeriesRow:
    v = {f.name: r[f.name] for f in fields(SeriesRow)}
    v["state"] = SeriesState(v["state"])
    v["orientations_mixed"] = bool(v["orientations_mixed"])
    v["positions_repeated"] = bool(v["positions_repeated"])
    return SeriesRow(**v)


def _method(method: Method | str, caller: str) -> Method:
    try:
        return Method(method)
    except ValueError:
        raise StoreError(f"{caller}: expected a method in {[m.value for m in Method]}, got {method!r}") from None


def _params_json(params: DipParams, caller: str) -> str:
    if not isinstance(params, DipParams):
        raise StoreError(f"{caller}: expected DipParams, got {type(params).__name__}")
    return json.dumps(params_record(params), sort_keys=True)


def _job(r: sqlite3.Row) -> JobRow:
    try:
        method = stored_method(r["method"], r["params_version"])
        params = params_from_record(json.loads(r["params_json"]), r["params_version"])
    except ValueError as exc:
        raise StoreError(f"job {r['id']}: its method or parameters cannot be read ({exc})") from None
    v = {f.name: r[f.name] for f in fields(JobRow) if f.name not in ("method", "params", "report")}
    v["report"] = json.loads(r["report_json"]) if r["report_json"] else None
    v["state"] = JobState(v["state"])
    v["no_mr"] = bool(v["no_mr"])
    return JobRow(**v, method=method, params=params)


def _fetch(r: sqlite3.Row) -> FetchRow:
    v = {f.name: r[f.name] for f in fields(FetchRow)}
    v["state"] = FetchState(v["state"])
    return FetchRow(**v)


def _delivery(r: sqlite3.Row) -> DeliveryRow:
    v = {f.name: r[f.name] for f in fields(DeliveryRow)}
    v["state"] = DeliveryState(v["state"])
    return DeliveryRow(**v)
