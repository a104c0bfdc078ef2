"""The store's MR-choice state: header facts per series, passed-over MR, retrievals, migration."""
from __future__ import annotations

import sqlite3
from pathlib import Path

import pydicom
import pytest

from dipnode.node.ingest.completion import instance_record
from dipnode.node.jobs.rows import FetchState, InstanceRecord, JobState, StoreError, TransitionError
from dipnode.node.jobs.schema import MIGRATIONS, SCHEMA_VERSION
from dipnode.node.jobs.store import Store
from dipnode.sim.exam import MR_SERIES
from dipnode.models.params import DipParams


def index(store: Store, paths, now: float = 1.0) -> None:
    for p in paths:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        store.record_instance(instance_record(ds, p, str(ds.file_meta.TransferSyntaxUID)), now)


def test_header_facts_of_a_real_exam_are_recorded_as_instances_arrive(tmp_path, realistic_exam):
    ex = realistic_exam
    with Store(tmp_path / "s.sqlite") as store:
        index(store, ex.all_mr_files)
        facts = {name: store.series(ex.mr_series_uids[name]) for name in MR_SERIES}
    assert facts["localizer"].orientations_mixed and not facts["localizer"].positions_repeated
    assert facts["dwi"].positions_repeated and not facts["dwi"].orientations_mixed
    assert facts["adc"].image_type == "DERIVED\\PRIMARY\\DIFFUSION\\ADC"
    for name in ("t2", "adc", "t1"):
        assert not facts[name].orientations_mixed and not facts[name].positions_repeated, name
    assert facts["t1"].image_type == "ORIGINAL\\PRIMARY\\M\\ND\\NORM"
    assert facts["t1"].mr_acquisition_type == "3D"


def test_first_instances_decide_nothing_and_a_duplicate_is_not_a_repeat(tmp_path, realistic_exam):
    dwi = list(realistic_exam.mr_files["dwi"])
    half = len(dwi) // 2  # b = 0 first, then b = 1000 at the same positions
    with Store(tmp_path / "s.sqlite") as store:
        uid = realistic_exam.mr_series_uids["dwi"]
        index(store, dwi[:half])
        index(store, dwi[:half])  # re-sent: duplicates change nothing
        assert not store.series(uid).positions_repeated
        index(store, dwi[half:half + 1])
        assert store.series(uid).positions_repeated


def _inst(n: int, series: str = "1.2.3.1", **kw) -> InstanceRecord:
    return InstanceRecord(sop_instance_uid=f"{series}.{n}", sop_class_uid="1.2.840.10008.5.1.4.1.1.128",
                          path=Path(f"/spool/{n}.dcm"), study_uid="1.2.3", series_uid=series, modality="PT",
                          transfer_syntax="1.2.840.10008.1.2.1", patient_id="P1", **kw)


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "node.sqlite") as s:
        s.record_instance(_inst(1), 0.0)
        yield s


def test_pass_over_puts_a_running_job_back_to_choose_again(store):
    job = store.create_job("1.2.3.1", method="sdip", params=DipParams(), now=0.0, mr_series_uid=None)
    with pytest.raises(TransitionError, match="expected state 'running'"):
        store.pass_over_mr(job.id, "9.9", "AlignmentError: bad", 1.0)
    store.claim_next_queued(1.0)
    back = store.pass_over_mr(job.id, "9.9", "MR unusable: AlignmentError: bad", 2.0)
    assert back.state is JobState.WAITING_FOR_MR and back.mr_series_uid is None and back.progress == 0
    assert store.passed_over(job.id) == {"9.9": "MR unusable: AlignmentError: bad"}
    store.set_mr_choice(job.id, "no MR: ...; fallback to Gaussian", no_mr=True, now=3.0)
    assert store.job(job.id).no_mr and store.job(job.id).mr_choice.startswith("no MR")


def test_a_retrieval_is_one_row_per_job_and_only_due_while_the_job_waits(store):
    job = store.create_job("1.2.3.1", method="sdip", params=DipParams(), now=0.0, state=JobState.WAITING_FOR_MR)
    first = store.request_fetch(job.id, 10.0)
    again = store.request_fetch(job.id, 20.0)  # idempotent: a restart or a second tick
    assert first == again and first.state is FetchState.QUERY and first.next_attempt_at == 10.0
    assert [f.job_id for f in store.due_fetches(10.0)] == [job.id] and store.due_fetches(9.0) == []
    store.update_fetch(job.id, 11.0, state=FetchState.QUERY, note="refused (attempt 1)", attempts=1,
                       next_attempt_at=41.0, source="PACS@h:104", study_uid="1.2", series_uid="1.2.5")
    assert store.due_fetches(40.0) == []
    f = store.update_fetch(job.id, 42.0, state=FetchState.RETRIEVED, note="ok", attempts=0)
    assert (f.series_uid, f.source, f.attempts) == ("1.2.5", "PACS@h:104", 0)
    f = store.fetch_again(job.id, 50.0, "retrieved MR not usable")
    assert f.state is FetchState.QUERY and f.series_uid is None and f.source is None
    store.transition(job.id, JobState.QUEUED, 51.0)
    assert store.due_fetches(100.0) == []  # the job has its MR: nothing to fetch
    with pytest.raises(StoreError, match="existing job id"):
        store.request_fetch(999, 1.0)


def test_a_version_1_database_migrates_and_keeps_its_rows(tmp_path):
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript(MIGRATIONS[0])
    db.execute("INSERT INTO series (series_uid, study_uid, modality, first_received_at, last_received_at, state)"
               " VALUES ('1.2.3.1', '1.2.3', 'MR', 0, 0, 'complete')")
    db.execute("INSERT INTO jobs (pet_series_uid, state, method, params_json, created_at, updated_at, uid_seed)"
               " VALUES ('1.2.3.1', 'done', 'sdip', '{}', 0, 0, 'x')")
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()
    with Store(path) as store:
        assert store.schema_version == SCHEMA_VERSION
        s = store.series("1.2.3.1")
        assert (s.image_type, s.orientations_mixed, s.positions_repeated) == ("", False, False)
        j = store.jobs()[0]
        assert (j.mr_choice, j.no_mr) == (None, False)
        assert store.fetch(j.id) is None and store.passed_over(j.id) == {}


def test_dipnode_jobs_shows_the_choice_and_a_retrieval_under_way(store):
    from dipnode.node.cli.admin import jobs_table

    job = store.create_job("1.2.3.1", method="sdip", params=DipParams(), now=0.0, state=JobState.WAITING_FOR_MR)
    store.request_fetch(job.id, 1.0)
    store.update_fetch(job.id, 2.0, state=FetchState.QUERY, attempts=1, next_attempt_at=30.0,
                       note="association with PACS@h:104 aborted (peer down, refused or not DICOM) (attempt 1 of 4)")
    table = jobs_table(store)
    assert "retrieval from the PACS (query): association with PACS@h:104 aborted" in table
    store.set_mr_choice(job.id, "chose MR 1.2.5 't1_mprage_sag' (other study 3 days earlier, 3D, 1 mm)",
                        no_mr=False, now=3.0)
    store.transition(job.id, JobState.QUEUED, 3.0, mr_series_uid="1.2.3.1")
    table = jobs_table(store)
    assert "MR: chose MR 1.2.5 't1_mprage_sag'" in table and "retrieval from the PACS" not in table
