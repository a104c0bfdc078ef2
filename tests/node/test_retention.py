"""Retention (node/retention.py): what goes when, what never goes, rows follow their files."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from dipnode.models.params import DipParams
from dipnode.node.jobs.rows import InstanceRecord, JobState, StoreError
from dipnode.node.jobs.store import Store
from dipnode.node.ops.retention import DAY_S, Policy, Retention, format_dry_run, plan
from dipnode.node.ingest.spool import Spool

T0 = 1_700_000_000.0
POLICY = Policy(inputs_days=7, failed_days=30, outputs_days=3, emergency_free_bytes=0)


class Site:
    """A real store and a real spool folder with files of a given size per instance."""

    def __init__(self, root: Path) -> None:
        self.spool = Spool(root / "spool", min_free_bytes=0)
        self.store = Store.open(root / "db.sqlite")
        self.n = 0

    def series(self, modality: str = "PT", *, study: str = "1.2.3", patient: str = "P1", n: int = 3,
               at: float = T0, size: int = 1000, complete: bool = True) -> str:
        self.n += 1
        uid = f"{study}.{self.n}"
        for i in range(n):
            sop = f"{uid}.{i + 1}"
            path = self.spool.path_for(study, uid, sop)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"x" * size)
            self.store.record_instance(InstanceRecord(
                sop_instance_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.128", path=path, study_uid=study,
                series_uid=uid, modality=modality, transfer_syntax="1.2.840.10008.1.2.1",
                patient_id=patient), at)
        if complete:
            self.store.mark_series_complete(uid, at)
        return uid

    def job(self, pet: str, mr: str | None = None, *, state: JobState = JobState.DONE, at: float = T0) -> int:
        job = self.store.create_job(pet, method="sdip" if mr else "gaussian", params=DipParams(),
                                    now=at, mr_series_uid=mr, state=JobState.QUEUED, rerun=True)
        path = {JobState.QUEUED: [], JobState.RUNNING: [JobState.RUNNING],
                JobState.SENDING: [JobState.RUNNING, JobState.SENDING],
                JobState.DONE: [JobState.RUNNING, JobState.SENDING, JobState.DONE],
                JobState.FAILED: [JobState.FAILED]}[state]
        for s in path:
            self.store.transition(job.id, s, at, reason="broke" if s is JobState.FAILED else None)
        return job.id

    def files(self, uid: str) -> list[Path]:
        return sorted(p for p in self.spool.instances.rglob("*.dcm") if p.parent.name == uid)


@pytest.fixture
def site(tmp_path: Path):
    s = Site(tmp_path)
    yield s
    s.store.close()


def keys(cands, kind="inputs"):
    return {c.key for c in cands if c.kind == kind}


def test_done_inputs_go_after_inputs_days_failed_after_failed_days(site: Site) -> None:
    pet, mr = site.series("PT"), site.series("MR")
    site.job(pet, mr, state=JobState.DONE, at=T0)
    failed_pet = site.series("PT", study="1.2.4", patient="P2")
    site.job(failed_pet, state=JobState.FAILED, at=T0)
    rows = lambda: (site.store.all_series(), site.store.jobs())  # noqa: E731
    assert keys(plan(*rows(), POLICY, T0 + 6.9 * DAY_S)) == set()
    assert keys(plan(*rows(), POLICY, T0 + 7.1 * DAY_S)) == {pet, mr}
    assert keys(plan(*rows(), POLICY, T0 + 30.1 * DAY_S)) == {pet, mr, failed_pet}


def test_nothing_an_unfinished_job_needs_ever_goes(site: Site) -> None:
    old = T0 - 365 * DAY_S
    for k, state in enumerate((JobState.QUEUED, JobState.RUNNING, JobState.SENDING)):
        pet, mr = site.series("PT", study=f"1.3.{k}", at=old), site.series("MR", study=f"1.3.{k}", at=old)
        site.job(pet, mr, state=state, at=old)
    # A PET waiting for its MR: every series of its study and of its patient stays.
    waiting_pet = site.series("PT", study="1.4", patient="PW", at=old)
    site.store.create_job(waiting_pet, method="sdip", params=DipParams(), now=old, state=JobState.WAITING_FOR_MR)
    same_patient_mr = site.series("MR", study="1.5", patient="PW", at=old)
    receiving = site.series("PT", study="1.6", patient="PR", at=old, complete=False)
    unused_mr = site.series("MR", study="1.7", patient="PU", at=old)
    for emergency in (False, True):
        cands = plan(site.store.all_series(), site.store.jobs(), POLICY, T0, emergency=emergency)
        assert keys(cands) == {unused_mr}, emergency
    assert same_patient_mr not in keys(cands) and receiving not in keys(cands)
    assert keys(cands, "outputs") == set()


def test_sweep_deletes_files_then_rows_and_logs_one_line(site: Site, caplog) -> None:
    pet, mr = site.series("PT"), site.series("MR")
    job = site.job(pet, mr, at=T0)
    unused = site.series("MR", study="1.9", patient="P9")
    kept = site.series("PT", study="1.8", patient="P8", at=T0 + 6 * DAY_S)
    site.job(kept, at=T0 + 6 * DAY_S)
    out = site.spool.root / "outputs" / f"job-{job}"
    out.mkdir(parents=True)
    (out / "a.dcm").write_bytes(b"y" * 500)
    # Results of a DONE job without destinations stay in its output_dir.
    site.store._db.execute("UPDATE jobs SET output_dir = ? WHERE id = ?", (str(out), job))
    thumbs = site.spool.root / "thumbnails"
    thumbs.mkdir()
    (thumbs / f"job-{job}.png").write_bytes(b"png")
    r = Retention(site.store, site.spool.root, POLICY)
    with caplog.at_level(logging.INFO, logger="dipnode.node.ops.retention"):
        report = r.sweep(T0 + 8 * DAY_S)
    assert [rec.message for rec in caplog.records if "retention sweep" in rec.message].__len__() == 1
    assert (report.series, report.instances, report.outputs) == (3, 9, 1)
    assert report.bytes_freed == 9 * 1000 + 500 + 3
    for uid in (pet, mr, unused):
        assert site.files(uid) == [] and site.store.series_instances(uid) == []
    assert not (site.spool.instances / "1.2.3").exists()  # empty study folder removed too
    assert site.store.series(pet).purged_at == T0 + 8 * DAY_S  # a job refers to it: the row stays
    assert site.store.series(unused) is None  # no job: the row goes with its files
    assert len(site.files(kept)) == 3
    j = site.store.job(job)
    assert j.state is JobState.DONE and j.outputs_purged_at is not None  # the job stays as history
    assert not out.exists() and not (thumbs / f"job-{job}.png").exists()
    # A purged series is nobody's MR prior any more.
    assert mr not in {s.series_uid for s in site.store.related_series("1.2.3", "P1", "")}
    assert r.sweep(T0 + 8 * DAY_S).series == 0  # nothing left to do


def test_dry_run_lists_and_deletes_nothing(site: Site) -> None:
    pet = site.series("PT", size=2048)
    site.job(pet, at=T0)
    r = Retention(site.store, site.spool.root, POLICY)
    report = r.dry_run(T0 + 8 * DAY_S)
    assert (report.series, report.instances, report.bytes_freed) == (1, 3, 3 * 2048)
    text = format_dry_run(report, site.store)
    assert pet in text and "would delete 1 series (3 instances)" in text
    assert len(site.files(pet)) == 3 and len(site.store.series_instances(pet)) == 3


def test_emergency_takes_the_oldest_finished_first_until_above_the_mark(site: Site) -> None:
    uids = []
    for k in range(4):
        uid = site.series("PT", study=f"2.{k}", patient=f"E{k}", size=10_000, at=T0 + k)
        site.job(uid, at=T0 + k)
        uids.append(uid)

    class Disk(Retention):
        # The disk's size is the one thing made up here: 100 kB, of which the spool's real
        # files are the used part.
        def free_bytes(self) -> int:
            used = sum(p.stat().st_size for p in site.spool.instances.rglob("*.dcm"))
            return 100_000 - used

    # Emergency below 44 kB free: a sweep deletes until 66 kB (the mark and half again) are free.
    r = Disk(site.store, site.spool.root, Policy(emergency_free_bytes=44_000))
    assert r.below_emergency_mark()  # 120 kB of files "on" a 100 kB disk
    assert r.sweep(T0 + 10).series == 0  # a scheduled sweep: all far younger than inputs_days
    report = r.sweep(T0 + 10, emergency=True)
    assert report.kind == "emergency" and report.series == 3
    assert [u for u in uids if not site.files(u)] == uids[:3]  # oldest first
    assert r.free_bytes() == 70_000  # stopped as soon as it was above 66 kB


def test_store_refuses_an_instance_of_a_series_being_purged_and_takes_it_after(site: Site) -> None:
    pet = site.series("PT")
    site.job(pet, at=T0)
    assert site.store.mark_series_purged(pet, T0 + 8 * DAY_S)
    again = InstanceRecord(sop_instance_uid=f"{pet}.99", sop_class_uid="1.2.840.10008.5.1.4.1.1.128",
                           path=site.spool.path_for("1.2.3", pet, f"{pet}.99"), study_uid="1.2.3",
                           series_uid=pet, modality="PT", transfer_syntax="1.2.840.10008.1.2.1",
                           patient_id="P1")
    with pytest.raises(StoreError, match="being deleted by retention"):
        site.store.record_instance(again, T0 + 8 * DAY_S)
    Retention(site.store, site.spool.root, POLICY).finish_interrupted()
    # Received anew after the purge: the series re-opens (a late instance) and is processed again.
    assert site.store.record_instance(again, T0 + 9 * DAY_S)
    s = site.store.series(pet)
    assert s.purged_at is None and s.instance_count == 1 and s.state.value == "receiving"


def test_mark_refuses_a_series_a_job_took_since_the_plan(site: Site) -> None:
    pet = site.series("PT")
    site.job(pet, at=T0)
    site.job(pet, state=JobState.QUEUED, at=T0 + 1)  # a re-run queued meanwhile
    assert not site.store.mark_series_purged(pet, T0 + 9 * DAY_S)


def test_policy_is_validated() -> None:
    with pytest.raises(ValueError, match="inputs_days: expected a number of days > 0, got 0"):
        Policy(inputs_days=0)
