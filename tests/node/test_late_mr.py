"""A late MR re-triggers the PET jobs that fell back or failed for lack of one, and only those."""
from __future__ import annotations

import pydicom
import pytest

from dipnode.node.ingest.completion import instance_record
from dipnode.node.server import Node
from dipnode.node.settings import Settings
from dipnode.node.jobs.rows import JobState
from dipnode.sim.exam import RealisticExam
from dipnode.models.params import DipParams


@pytest.fixture
def node(tmp_path, realistic_exam: RealisticExam):
    s = Settings(node={"allowed_calling_aets": ["*"], "port": 0},
                 storage={"spool_dir": str(tmp_path / "spool"), "database": str(tmp_path / "db.sqlite"),
                          "min_free_mb": 0})
    n = Node(s)  # not started: the scheduler's steps are called by hand
    for paths in (realistic_exam.pet_files, *realistic_exam.mr_files.values()):
        for p in paths:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
            n.store.record_instance(instance_record(ds, p, str(ds.file_meta.TransferSyntaxUID)), 0.0)
    for uid in (realistic_exam.pet_series_uid, *realistic_exam.mr_series_uids.values()):
        n.store.mark_series_complete(uid, 1.0)
    yield n
    n.store.close()


def _job(node: Node, exam: RealisticExam, state: JobState, *, no_mr: bool, method: str = "gaussian"):
    job = node.store.create_job(exam.pet_series_uid, method=method, params=DipParams(), now=2.0,
                                state=JobState.WAITING_FOR_MR, rerun=bool(node.store.jobs()))
    node.store.set_mr_choice(job.id, "no MR: ..." if no_mr else "chose MR ...", no_mr=no_mr, now=2.0)
    if state is not JobState.WAITING_FOR_MR:
        node.store.transition(job.id, JobState.QUEUED if state is not JobState.FAILED else JobState.FAILED,
                              2.0, reason="no eligible MR within mr_wait_s" if state is JobState.FAILED else None)
    return node.store.job(job.id)


def test_a_failed_job_is_rerun_once_by_an_eligible_mr(node, realistic_exam) -> None:
    ex = realistic_exam
    failed = _job(node, ex, JobState.FAILED, no_mr=True, method="sdip")
    node.worker.retrigger(node.store.series(ex.mr_series_uids["localizer"]), 3.0)  # never a prior
    assert len(node.store.jobs()) == 1
    node.worker.retrigger(node.store.series(ex.mr_series_uids["t1"]), 3.0)
    jobs = node.store.jobs()
    assert len(jobs) == 2 and jobs[1].rerun_of == failed.id and jobs[1].state is JobState.WAITING_FOR_MR
    assert jobs[1].method == "sdip" and not jobs[1].no_mr
    node.worker.retrigger(node.store.series(ex.mr_series_uids["t2"]), 4.0)  # the rerun is waiting: nothing
    assert len(node.store.jobs()) == 2


def test_a_queued_fallback_is_superseded_and_a_proper_job_left_alone(node, realistic_exam) -> None:
    ex = realistic_exam
    queued = _job(node, ex, JobState.QUEUED, no_mr=True)
    node.worker.retrigger(node.store.series(ex.mr_series_uids["t2"]), 3.0)
    old, new = node.store.jobs()
    assert old.id == queued.id and old.state is JobState.FAILED and "superseded by job" in old.reason
    assert new.rerun_of == queued.id
    # The re-run gets its MR and is queued: a later MR changes nothing.
    node.store.set_mr_choice(new.id, "chose MR ...", no_mr=False, now=5.0)
    node.store.transition(new.id, JobState.QUEUED, 5.0, mr_series_uid=ex.mr_series_uids["t1"])
    node.worker.retrigger(node.store.series(ex.mr_series_uids["t1"]), 6.0)
    assert len(node.store.jobs()) == 2
