import sqlite3
import threading
from pathlib import Path

import pytest

from dipnode.node.jobs.rows import DeliveryState, InstanceRecord, JobState, SeriesState, StoreError, TransitionError
from dipnode.node.jobs.schema import SCHEMA_VERSION
from dipnode.node.jobs.store import Store
from dipnode.models.params import DipParams


def inst(n: int, series: str = "1.2.3.1", study: str = "1.2.3", modality: str = "PT", **kw) -> InstanceRecord:
    return InstanceRecord(
        sop_instance_uid=f"{series}.{n}", sop_class_uid="1.2.840.10008.5.1.4.1.1.128",
        path=Path(f"/spool/{series}/{n}.dcm"), study_uid=study, series_uid=series, modality=modality,
        transfer_syntax="1.2.840.10008.1.2.1", patient_id="P1", **kw,
    )


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "node.sqlite") as s:
        yield s


def job_for(store: Store, series: str = "1.2.3.1", now: float = 0.0, **kw):
    if store.series(series) is None:
        store.record_instance(inst(1, series), now)
    return store.create_job(series, method="sdip", params=DipParams(alpha=0.6), now=now, **kw)


def test_schema_and_pragmas(tmp_path):
    with Store(tmp_path / "a.sqlite") as s:
        assert s.schema_version == SCHEMA_VERSION >= 2
        db = sqlite3.connect(tmp_path / "a.sqlite")
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"instances", "series", "jobs", "deliveries", "mr_passed_over", "fetches"} <= tables
        db.close()
        assert s._query("PRAGMA synchronous")[0][0] == 2  # FULL
        assert s._query("PRAGMA foreign_keys")[0][0] == 1


def test_newer_schema_is_refused(tmp_path):
    db = sqlite3.connect(tmp_path / "b.sqlite")
    db.execute("PRAGMA user_version = 99")
    db.close()
    with pytest.raises(StoreError, match=f"expected schema version <= {SCHEMA_VERSION}, got 99"):
        Store(tmp_path / "b.sqlite")


def test_record_instance_builds_series_and_duplicates_are_idempotent(store):
    assert store.record_instance(inst(1, expected_count=3, series_description="PET AC"), 10.0)
    assert store.record_instance(inst(2), 11.0)
    assert not store.record_instance(inst(2), 50.0)  # same SOP Instance UID again
    s = store.series("1.2.3.1")
    assert s.instance_count == 2 and s.expected_count == 3 and s.series_description == "PET AC"
    assert s.first_received_at == 10.0 and s.last_received_at == 11.0  # duplicate did not touch it
    assert s.state is SeriesState.RECEIVING and s.late_instances == 0
    assert store.series_instances("1.2.3.1") == [Path("/spool/1.2.3.1/1.dcm"), Path("/spool/1.2.3.1/2.dcm")]
    assert store.series("nope") is None


def test_record_instance_validates(store):
    with pytest.raises(StoreError, match="expected a non-empty series_uid"):
        store.record_instance(inst(1, series=""), 0.0)


def test_late_instance_reopens_complete_series(store):
    store.record_instance(inst(1), 0.0)
    assert store.mark_series_complete("1.2.3.1", 40.0)
    assert not store.mark_series_complete("1.2.3.1", 41.0)  # already complete
    assert not store.record_instance(inst(1), 45.0)  # a duplicate is not late
    assert store.series("1.2.3.1").state is SeriesState.COMPLETE
    assert store.record_instance(inst(2), 50.0)
    s = store.series("1.2.3.1")
    assert (s.state, s.late_instances, s.completed_at, s.instance_count) == (SeriesState.RECEIVING, 1, None, 2)


def test_mark_complete_is_guarded_by_instance_count(store):
    store.record_instance(inst(1), 0.0)
    store.record_instance(inst(2), 1.0)
    assert not store.mark_series_complete("1.2.3.1", 40.0, if_instance_count=1)
    assert store.mark_series_complete("1.2.3.1", 40.0, if_instance_count=2)


def test_a_pet_is_processed_once_unless_rerun(store):
    first = job_for(store)
    assert first.state is JobState.QUEUED and first.uid_seed == f"1.2.3.1/{first.id}"
    assert job_for(store).id == first.id
    again = job_for(store, rerun=True)
    assert again.id != first.id and again.rerun_of == first.id and again.uid_seed != first.uid_seed
    third = job_for(store, rerun=True)
    assert third.rerun_of == again.id
    assert job_for(store).id == third.id  # the latest is the PET's job now
    assert [j.id for j in store.jobs(pet_series_uid="1.2.3.1")] == [first.id, again.id, third.id]


def test_job_for_unknown_series_is_refused(store):
    with pytest.raises(StoreError, match="expected known series"):
        store.create_job("9.9", method="sdip", params=DipParams(), now=0.0)


def test_legal_transitions_walk_the_lifecycle(store):
    j = job_for(store, state=JobState.WAITING_FOR_MR)
    store.record_instance(inst(1, series="1.2.3.2", modality="MR"), 0.0)
    j = store.transition(j.id, JobState.QUEUED, 1.0, mr_series_uid="1.2.3.2")
    assert j.mr_series_uid == "1.2.3.2"
    j = store.transition(j.id, JobState.RUNNING, 2.0)
    assert j.attempts == 1
    j = store.transition(j.id, JobState.SENDING, 3.0, progress=0.9, output_dir="/out/1")
    assert (j.state, j.progress, j.output_dir, j.updated_at) == (JobState.SENDING, 0.9, "/out/1", 3.0)
    j = store.transition(j.id, JobState.DONE, 4.0)
    assert j.progress == 1.0 and j.state.terminal


@pytest.mark.parametrize("path,illegal", [
    ([], JobState.SENDING),  # QUEUED -> SENDING skips the work
    ([], JobState.DONE),
    ([JobState.RUNNING], JobState.DONE),
    ([JobState.FAILED], JobState.QUEUED),  # failed is final; a re-run is a new job
    ([JobState.RUNNING, JobState.SENDING, JobState.DONE], JobState.RUNNING),
])
def test_illegal_transitions_are_refused_and_change_nothing(store, path, illegal):
    j = job_for(store)
    for st in path:
        j = store.transition(j.id, st, 1.0, reason="x" if st is JobState.FAILED else None)
    with pytest.raises(TransitionError, match=f"{j.state.value} -> {illegal.value} is not allowed"):
        store.transition(j.id, illegal, 2.0, reason="r")
    assert store.job(j.id) == j


def test_transition_validation(store):
    j = job_for(store)
    with pytest.raises(StoreError, match="expected a reason"):
        store.transition(j.id, JobState.FAILED, 1.0)
    with pytest.raises(StoreError, match=r"expected progress in \[0, 1\], got 1.5"):
        store.transition(j.id, JobState.RUNNING, 1.0, progress=1.5)
    with pytest.raises(StoreError, match="expected an existing job id, got 999"):
        store.transition(999, JobState.RUNNING, 1.0)
    with pytest.raises(TransitionError, match="expected state 'running', got 'queued'"):
        store.transition(j.id, JobState.FAILED, 1.0, reason="x", expect=JobState.RUNNING)
    f = store.transition(j.id, JobState.FAILED, 1.0, reason="MR missing")
    assert f.reason == "MR missing"


def test_claim_is_atomic_across_threads_and_connections(tmp_path):
    path = tmp_path / "c.sqlite"
    with Store(path) as s:
        for i in range(40):
            s.record_instance(inst(1, series=f"1.2.3.{i + 10}"), 0.0)
            s.create_job(f"1.2.3.{i + 10}", method="sdip", params=DipParams(), now=0.0)
    stores = [Store(path) for _ in range(2)]  # two connections, as two processes would have
    claimed: list[int] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def worker(k: int) -> None:
        st = stores[k % 2]
        start.wait()
        while (j := st.claim_next_queued(1.0)) is not None:
            assert j.state is JobState.RUNNING
            with lock:
                claimed.append(j.id)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(claimed) == list(range(1, 41))  # every job once, none twice
    assert stores[0].claim_next_queued(2.0) is None
    assert {j.attempts for j in stores[0].jobs([JobState.RUNNING])} == {1}
    for st in stores:
        st.close()


def test_claim_takes_the_oldest_queued(store):
    a = job_for(store, "1.2.3.5")
    job_for(store, "1.2.3.6")
    assert store.claim_next_queued(5.0).id == a.id


def test_state_survives_close_and_reopen(tmp_path):
    path = tmp_path / "d.sqlite"
    with Store(path) as s:
        s.record_instance(inst(1, expected_count=2), 1.0)
        j = job_for(s)
        s.transition(j.id, JobState.RUNNING, 2.0)
        s.transition(j.id, JobState.SENDING, 3.0)
        s.add_deliveries(j.id, ["PACS@10.0.0.1:104"], 3.0)
    with Store(path) as s:
        assert s.series("1.2.3.1").expected_count == 2
        assert s.job(j.id).state is JobState.SENDING
        assert [d.destination for d in s.deliveries(j.id)] == ["PACS@10.0.0.1:104"]
        assert not s.record_instance(inst(1), 9.0)  # still a duplicate after a restart


def test_resume_after_restart(tmp_path):
    path = tmp_path / "e.sqlite"
    with Store(path) as s:
        running = job_for(s, "1.2.3.7")
        s.transition(running.id, JobState.RUNNING, 1.0, progress=0.5)
        sending = job_for(s, "1.2.3.8")
        s.transition(sending.id, JobState.RUNNING, 1.0)
        s.transition(sending.id, JobState.SENDING, 2.0)
        s.add_deliveries(sending.id, ["A@h:1", "B@h:2"], 2.0)
        s.delivery_result(sending.id, "A@h:1", 3.0, ok=False, error="refused", next_attempt_at=500.0)
        queued = job_for(s, "1.2.3.9")
    with Store(path) as s:  # the process restarted
        report = s.resume_after_restart(10.0)
        assert report.requeued == (running.id,) and report.sending == (sending.id,)
        assert report.deliveries_due == 2
        r = s.job(running.id)
        assert (r.state, r.progress, r.attempts) == (JobState.QUEUED, 0.0, 1)
        assert s.job(queued.id).state is JobState.QUEUED
        assert s.job(sending.id).state is JobState.SENDING
        assert {d.destination for d in s.due_deliveries(10.0)} == {"A@h:1", "B@h:2"}
        assert s.resume_after_restart(11.0).requeued == ()


def test_deliveries_retry_then_settle_the_job(store):
    j = job_for(store)
    store.transition(j.id, JobState.RUNNING, 1.0)
    store.add_deliveries(j.id, ["A@h:1", "B@h:2"], 2.0)
    assert store.due_deliveries(5.0) == []  # the job is not sending yet
    store.transition(j.id, JobState.SENDING, 3.0)
    store.add_deliveries(j.id, ["A@h:1"], 3.0)  # idempotent
    assert [d.destination for d in store.due_deliveries(3.0)] == ["A@h:1", "B@h:2"]
    assert store.due_deliveries(1.0) == []  # not due before next_attempt_at
    after = store.delivery_result(j.id, "A@h:1", 4.0, ok=False, error="timeout", next_attempt_at=9.0)
    assert after.state is JobState.SENDING
    assert [d.destination for d in store.due_deliveries(5.0)] == ["B@h:2"]
    assert store.delivery_result(j.id, "B@h:2", 5.0, ok=True).state is JobState.SENDING  # A pending
    done = store.delivery_result(j.id, "A@h:1", 9.5, ok=True)
    assert done.state is JobState.DONE
    a = [d for d in store.deliveries(j.id) if d.destination == "A@h:1"][0]
    assert (a.state, a.attempts) == (DeliveryState.SENT, 2)
    with pytest.raises(StoreError, match="expected a pending delivery"):
        store.delivery_result(j.id, "A@h:1", 10.0, ok=True)


def test_dead_delivery_fails_job_and_reset_dead_resends(store):
    j = job_for(store)
    store.transition(j.id, JobState.RUNNING, 1.0)
    store.transition(j.id, JobState.SENDING, 2.0)
    store.add_deliveries(j.id, ["A@h:1", "B@h:2"], 2.0)
    store.delivery_result(j.id, "A@h:1", 3.0, ok=True)
    failed = store.delivery_result(j.id, "B@h:2", 3.0, ok=False, error="association rejected")
    assert failed.state is JobState.FAILED and "B@h:2: association rejected" in failed.reason
    with pytest.raises(StoreError, match="expected an error message"):
        store.delivery_result(j.id, "B@h:2", 3.0, ok=False)
    assert store.reset_dead(j.id, 20.0) == 1
    j2 = store.job(j.id)
    assert j2.state is JobState.SENDING and j2.reason is None
    assert [d.destination for d in store.due_deliveries(20.0)] == ["B@h:2"]  # A is not re-sent
    assert store.delivery_result(j.id, "B@h:2", 21.0, ok=True).state is JobState.DONE
    assert store.reset_dead(j.id, 22.0) == 0


def test_open_creates_the_folder(tmp_path):
    with Store.open(tmp_path / "var" / "lib" / "db.sqlite") as s:
        assert s.schema_version == SCHEMA_VERSION


def test_a_read_only_store_reads_beside_the_writer_and_writes_nothing(tmp_path):
    # The soak/load harness and tools read the node's database through this, never raw SQL.
    path = tmp_path / "ro.sqlite"
    with pytest.raises(StoreError, match="expected an existing file"):
        Store.open_readonly(path)
    with Store(path) as writer:
        j = job_for(writer)
        with Store.open_readonly(path) as reader:
            assert reader.job(j.id) == j and reader.integrity_check() == "ok"
            assert reader.indexed_instances() == {"1.2.3.1.1": Path("/spool/1.2.3.1/1.dcm")}
            with pytest.raises(sqlite3.OperationalError, match="readonly"):
                reader.create_job("1.2.3.1", method="sdip", params=DipParams(), now=1.0, rerun=True)
            writer.transition(j.id, JobState.RUNNING, 2.0)  # the writer goes on meanwhile
            assert reader.job(j.id).state is JobState.RUNNING
