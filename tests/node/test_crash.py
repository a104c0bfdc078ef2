"""Crash safety of the running node: SIGKILL `dipnode serve` while senders stream studies in
and jobs run, restart it, and check that nothing acknowledged is lost (tests/harness/soak.py is
the machinery; bench/soak.py runs the same with 20+ kills)."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
from dipnode.models.params import DipParams
from harness import soak
from peers import free_port



@pytest.mark.network
@pytest.mark.slow
@pytest.mark.timeout(170)
def test_kills_lose_no_acknowledged_instance_and_jobs_settle(tmp_path: Path) -> None:
    # 2 senders x 2 studies each (PET + MR, 16 slices of 16x16), the second study 2 s after
    # the first; 4 SIGKILLs at seeded moments, some while receiving, some inside a job.
    r = soak.run_soak(tmp_path / "soak", kills=4, seed=3, studies=4, senders=2,
                            epochs=4, gap_s=2.0, final_timeout_s=120.0, say=lambda _s: None)
    assert r.problems == (), "\n".join(r.problems[:20])
    assert len(r.kill_log) == 4
    assert r.sent == 4 * 32
    assert r.acked == r.on_disk == r.indexed == r.index_rows == r.sent
    # Every PET has a done job (run_soak reports one without as a problem); a job superseded by
    # a re-run (late instances after a completion by stable age) is failed with its reason.
    assert r.jobs_done >= 4 and r.jobs_other == 0 and r.pet_series_without_job == 0
    # Every done job's results reached the PACS once (deterministic UIDs: a job re-run after a
    # kill overwrites its own outputs rather than adding a second result series).
    assert r.pacs_files == r.pacs_expected == r.jobs_done * (3 * 16 + 2)


def test_check_state_finds_a_partial_file_and_a_lost_instance(tmp_path: Path) -> None:
    """The checker itself must be able to fail: a truncated spool file and an acknowledged
    instance missing from the index are both reported."""
    from dipnode.node.jobs.rows import InstanceRecord
    from dipnode.node.jobs.store import Store

    study = soak.make_studies(tmp_path / "data", 1, slices=3, size=8, with_mr=False)[0]
    spool = tmp_path / "spool"
    db = tmp_path / "db.sqlite"
    keys = [soak.instance_key(p) for p in study.pet_files]
    with Store.open(db) as store:
        for k, src in zip(keys, study.pet_files):
            dst = soak.spool_path(spool, k)
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(src.read_bytes())
        for k in keys[:2]:  # the third acknowledged instance never reached the index
            store.record_instance(InstanceRecord(k.sop_instance_uid, "1.2", soak.spool_path(spool, k),
                                                 k.study_uid, k.series_uid, "PT", "1.2.840.10008.1.2.1"), 0.0)
    good = soak.check_state(spool, db, set(keys[:2]))
    assert good.problems == () and good.on_disk == good.indexed == 2
    partial = soak.spool_path(spool, keys[1])
    partial.write_bytes(partial.read_bytes()[:-40])  # a torn write taken for a whole file
    bad = soak.check_state(spool, db, set(keys))
    text = "\n".join(bad.problems)
    assert f"acknowledged {keys[2].sop_instance_uid} missing from the index" in text
    assert "truncated" in text or "unreadable" in text
    assert bad.indexed == 2 and bad.on_disk == 3


def _job_left_sending(tmp_path: Path, outputs: list[Path]) -> tuple[Path, int]:
    """A database as a SIGKILL leaves it between `_run_job`'s SENDING transition and the
    deliveries it adds next: the job is SENDING with its results on disk and no delivery."""
    from dipnode.node.jobs.rows import InstanceRecord, JobState
    from dipnode.node.jobs.store import Store

    db = tmp_path / "dipnode.sqlite"
    with Store.open(db) as store:
        store.record_instance(InstanceRecord("1.2.3.1", "1.2.840.10008.5.1.4.1.1.128",
                                             tmp_path / "x.dcm", "1.2.3", "1.2.3.4", "PT", "1.2.840.10008.1.2.1"), 0.0)
        job = store.create_job("1.2.3.4", method="gaussian", params=DipParams(), now=0.0)
        assert store.claim_next_queued(1.0).id == job.id
        store.transition(job.id, JobState.SENDING, 2.0, output_dir=str(outputs[0].parent))
        assert store.deliveries(job.id) == []
    return db, job.id


def _settings(tmp_path: Path, destinations: list[tuple[str, int]]):
    from dipnode.node.settings import load_settings

    cfg = soak.soak_settings(tmp_path, free_port(), method={"name": "gaussian"},
                                  destinations=destinations)
    return load_settings(cfg)


@pytest.mark.network
@pytest.mark.timeout(60)
def test_job_killed_between_sending_and_its_deliveries_is_delivered_at_start(tmp_path: Path) -> None:
    from dipnode.node.server import Node
    from dipnode.node.jobs.rows import JobState
    from dipnode.node.jobs.store import Store
    from peers import StorescpPeer, tiny_pet_files

    outputs = tiny_pet_files(tmp_path / "spool" / "outputs" / "job-1", n=3)
    db, job_id = _job_left_sending(tmp_path, outputs)
    with StorescpPeer(tmp_path / "pacs") as pacs:
        node = Node(_settings(tmp_path, [(pacs.aet, pacs.port)]))
        node.start()
        try:
            deadline = time.monotonic() + 30
            while node.store.job(job_id).state is JobState.SENDING:
                assert time.monotonic() < deadline, "job still SENDING after 30 s"
                time.sleep(0.1)
        finally:
            node.stop()
        assert len(pacs.files()) == 3
    with Store.open(db) as store:
        assert store.job(job_id).state is JobState.DONE
        assert [d.state.value for d in store.deliveries(job_id)] == ["sent"]


@pytest.mark.network
@pytest.mark.timeout(60)
def test_job_killed_between_sending_and_done_without_destinations_is_done_at_start(tmp_path: Path) -> None:
    from dipnode.node.server import Node
    from dipnode.node.jobs.rows import JobState
    from dipnode.node.jobs.store import Store
    from peers import tiny_pet_files

    outputs = tiny_pet_files(tmp_path / "spool" / "outputs" / "job-1", n=2)
    db, job_id = _job_left_sending(tmp_path, outputs)
    node = Node(_settings(tmp_path, []))
    node.start()
    node.stop()
    with Store.open(db) as store:
        job = store.job(job_id)
        assert job.state is JobState.DONE and "no destinations" in (job.reason or "")


def _pet_record(tmp_path: Path, n: int):
    from dipnode.node.jobs.rows import InstanceRecord

    return InstanceRecord(f"1.2.3.{n}", "1.2.840.10008.5.1.4.1.1.128", tmp_path / f"{n}.dcm",
                          "1.2.3", "1.2.3.4", "PT", "1.2.840.10008.1.2.1", patient_id="P1")


def test_stable_age_does_not_count_the_time_the_node_was_down(tmp_path: Path) -> None:
    from dipnode.node.ingest.completion import complete_due
    from dipnode.node.jobs.store import Store

    with Store.open(tmp_path / "db.sqlite") as store:
        store.record_instance(_pet_record(tmp_path, 1), 0.0)  # then the node was down until t=100
        assert complete_due(store, 101.0, 30.0, listening_since=100.0) == []
        assert complete_due(store, 129.0, 30.0, listening_since=100.0) == []
        [done] = complete_due(store, 130.0, 30.0, listening_since=100.0)
        assert done.series.instance_count == 1


@pytest.mark.timeout(60)
def test_rerun_supersedes_the_job_that_has_not_started(tmp_path: Path) -> None:
    from dipnode.node.server import Node
    from dipnode.node.settings import load_settings
    from dipnode.node.jobs.rows import JobState

    # Port 0: the node is never started here (tick() by hand), nothing listens.
    cfg = soak.soak_settings(tmp_path, 0, method={"name": "sdip", "preset": "tiny"})
    node = Node(load_settings(cfg))  # not started: tick() by hand, no receiver
    try:
        node.store.record_instance(_pet_record(tmp_path, 1), 0.0)
        node.tick(10.0)  # complete by stable age (2 s): job 1 waits for an MR
        [first] = node.store.jobs()
        assert first.state is JobState.WAITING_FOR_MR
        node.store.record_instance(_pet_record(tmp_path, 2), 11.0)  # late: re-opens the series
        node.tick(20.0)
        first, second = node.store.jobs()
        assert second.rerun_of == first.id and second.state is JobState.WAITING_FOR_MR
        assert first.state is JobState.FAILED and f"superseded by job {second.id}" in first.reason
    finally:
        node.stop()
