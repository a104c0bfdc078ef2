"""The database schema: migrations applied in order at open, tracked by ``PRAGMA user_version``.

Migrations are only ever appended (a database at version n gets n+1.. on open); a database from
a newer dipnode (a higher version) is refused rather than misread.
"""
from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

from dipnode.node.jobs.rows import StoreError

log = logging.getLogger(__name__)

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "migrate"]

MIGRATIONS: tuple[str, ...] = (
    # 1: initial schema.
    """
    CREATE TABLE series (
        series_uid TEXT PRIMARY KEY,
        study_uid TEXT NOT NULL,
        patient_id TEXT NOT NULL DEFAULT '',
        issuer TEXT NOT NULL DEFAULT '',
        modality TEXT NOT NULL,
        series_description TEXT NOT NULL DEFAULT '',
        frame_of_reference_uid TEXT NOT NULL DEFAULT '',
        mr_acquisition_type TEXT NOT NULL DEFAULT '',
        slice_thickness REAL,
        study_date TEXT NOT NULL DEFAULT '',
        series_date TEXT NOT NULL DEFAULT '',
        expected_count INTEGER,
        instance_count INTEGER NOT NULL DEFAULT 0,
        first_received_at REAL NOT NULL,
        last_received_at REAL NOT NULL,
        completed_at REAL,
        state TEXT NOT NULL CHECK (state IN ('receiving', 'complete')),
        late_instances INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX series_patient ON series (patient_id, issuer);
    CREATE INDEX series_study ON series (study_uid);
    CREATE INDEX series_state ON series (state);
    CREATE TABLE instances (
        sop_instance_uid TEXT PRIMARY KEY,
        sop_class_uid TEXT NOT NULL,
        path TEXT NOT NULL,
        study_uid TEXT NOT NULL,
        series_uid TEXT NOT NULL REFERENCES series (series_uid),
        patient_id TEXT NOT NULL DEFAULT '',
        issuer_of_patient_id TEXT NOT NULL DEFAULT '',
        modality TEXT NOT NULL,
        received_at REAL NOT NULL,
        transfer_syntax TEXT NOT NULL
    );
    CREATE INDEX instances_series ON instances (series_uid);
    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY,
        pet_series_uid TEXT NOT NULL REFERENCES series (series_uid),
        mr_series_uid TEXT REFERENCES series (series_uid),
        state TEXT NOT NULL,
        progress REAL NOT NULL DEFAULT 0 CHECK (progress BETWEEN 0 AND 1),
        reason TEXT,
        method TEXT NOT NULL,
        params_json TEXT NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        rerun_of INTEGER REFERENCES jobs (id),
        output_dir TEXT,
        uid_seed TEXT NOT NULL
    );
    -- A PET is processed once: only re-runs (rerun_of set) may add jobs for the same series.
    CREATE UNIQUE INDEX jobs_first_run ON jobs (pet_series_uid) WHERE rerun_of IS NULL;
    CREATE INDEX jobs_state ON jobs (state, id);
    CREATE TABLE deliveries (
        job_id INTEGER NOT NULL REFERENCES jobs (id),
        destination TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('pending', 'sent', 'dead')),
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL,
        last_error TEXT,
        UNIQUE (job_id, destination)
    );
    CREATE INDEX deliveries_due ON deliveries (state, next_attempt_at);
    """,
    # 2: series integrity: the first instance that disagreed with the series.
    """
    ALTER TABLE series ADD COLUMN conflict TEXT;
    """,
    # 3: MR choice and retrieval (issue 9). Header facts per series, kept up to date as
    # instances arrive (record_instance -> _record_mr_facts); the choice explained on the job;
    # MR series a job passed over (failed to load or register); retrievals from the PACS.
    """
    ALTER TABLE series ADD COLUMN image_type TEXT NOT NULL DEFAULT '';
    ALTER TABLE series ADD COLUMN orientation TEXT NOT NULL DEFAULT '';
    ALTER TABLE series ADD COLUMN orientations_mixed INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE series ADD COLUMN positions_repeated INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE instances ADD COLUMN position TEXT;
    CREATE INDEX instances_position ON instances (series_uid, position);
    ALTER TABLE jobs ADD COLUMN mr_choice TEXT;
    ALTER TABLE jobs ADD COLUMN no_mr INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE mr_passed_over (
        job_id INTEGER NOT NULL REFERENCES jobs (id),
        series_uid TEXT NOT NULL,
        reason TEXT NOT NULL,
        at REAL NOT NULL,
        PRIMARY KEY (job_id, series_uid)
    );
    CREATE TABLE fetches (
        job_id INTEGER PRIMARY KEY REFERENCES jobs (id),
        state TEXT NOT NULL CHECK (state IN ('query', 'retrieved', 'exhausted', 'failed')),
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL,
        source TEXT,
        study_uid TEXT,
        series_uid TEXT,
        note TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX fetches_due ON fetches (state, next_attempt_at);
    """,
    # 4: a job's parameters are read through the format they were written in
    # (models.params.PARAMS_VERSION); every row before this migration is format 1.
    """
    ALTER TABLE jobs ADD COLUMN params_version INTEGER NOT NULL DEFAULT 1;
    """,
    # 5: running for months (issue 13). Retention: a series whose received files are deleted
    # (or being deleted: its instance rows go last, node/retention.py) has purged_at; a job whose
    # results and thumbnails are deleted has outputs_purged_at. report_json: the job's trust
    # numbers, registration and timings (node/report, shown on the status page).
    """
    ALTER TABLE series ADD COLUMN purged_at REAL;
    ALTER TABLE jobs ADD COLUMN outputs_purged_at REAL;
    ALTER TABLE jobs ADD COLUMN report_json TEXT;
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)


def migrate(db: sqlite3.Connection, path: Path) -> None:
    """Bring the database (inside the caller's transaction) to SCHEMA_VERSION."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"database {str(path)!r}: expected schema version <= {SCHEMA_VERSION}, "
            f"got {version} (written by a newer dipnode)"
        )
    for n in range(version, SCHEMA_VERSION):
        for stmt in MIGRATIONS[n].split(";"):
            if stmt.strip():
                db.execute(stmt)
        log.info("database %s migrated to schema version %d", path, n + 1)
    # PRAGMA takes no parameters; the value is our own integer.
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
