"""The retriever against a real Orthanc as the PACS: choose the T1 of a real exam and C-MOVE or
C-GET it into the node's index; the retry policy when the PACS is down, holds no MR or refuses;
a restart resumes a retrieval without losing or duplicating it."""
from __future__ import annotations

import time
from pathlib import Path

import pydicom
import pytest

from dipnode.dicom_io.scp import start_receiver
from dipnode.dicom_io.status import Status, StoreRefused
from dipnode.node import wire
from dipnode.node.ingest.completion import instance_record
from dipnode.node.jobs.matching import DecisionKind, decide
from dipnode.node.jobs.retrieval import Retriever
from dipnode.node.server import Node
from dipnode.node.settings import Settings
from dipnode.node.jobs.rows import FetchState, JobState
from dipnode.sim.exam import RealisticExam
from dipnode.models.params import DipParams
from peers import OrthancPeer, free_port, run_storescu

pytestmark = [pytest.mark.network]


@pytest.fixture(scope="module")
def node_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def pacs(tmp_path_factory, realistic_exam: RealisticExam, node_port: int):
    """Orthanc holding the MR exam, knowing this node as DIPNODE (the shipped orthanc.json's name)."""
    overlay = {"DicomModalities": {"dipnode": ["DIPNODE", "127.0.0.1", node_port]}}
    with OrthancPeer(tmp_path_factory.mktemp("pacs"), overlay=overlay) as orthanc:
        r = run_storescu(realistic_exam.all_mr_files, orthanc.dicom_port, called="ORTHANC")
        assert r.returncode == 0, r.stdout + r.stderr
        yield orthanc


def settings(tmp_path: Path, port: int, pacs_port: int, **source) -> Settings:
    return Settings(
        node={"ae_title": "DIPNODE", "host": "127.0.0.1", "port": port, "allowed_calling_aets": ["ORTHANC"]},
        storage={"spool_dir": str(tmp_path / "spool"), "database": str(tmp_path / "db.sqlite"), "min_free_mb": 0},
        matching={"mr_wait_s": 0, "fallback": "gaussian"},
        sources=[{"ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs_port, **source}],
        retrieve={"retries": 1, "backoff_s": 0.5, "backoff_max_s": 1.0, "timeout_s": 10})


def waiting_job(node: Node, exam: RealisticExam) -> int:
    """Index the PET as the receiver would, and give it a job waiting for an MR."""
    for p in exam.pet_files:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        node.store.record_instance(instance_record(ds, p, str(ds.file_meta.TransferSyntaxUID)), 0.0)
    node.store.mark_series_complete(exam.pet_series_uid, 1.0)
    job = node.store.create_job(exam.pet_series_uid, method="sdip", params=DipParams(), now=1.0,
                                state=JobState.WAITING_FOR_MR)
    node.store.request_fetch(job.id, 1.0)
    return job.id


@pytest.mark.parametrize("how", ["move", "get"])
def test_retriever_fetches_the_t1_of_the_exam(tmp_path, pacs, node_port, realistic_exam, how) -> None:
    s = settings(tmp_path, node_port, pacs.dicom_port, retrieve=how)
    node = Node(s)
    receiver = start_receiver(wire.receiver_config(s), node.on_store)  # C-MOVE's sub-operations land here
    try:
        job_id = waiting_job(node, realistic_exam)
        assert Retriever(s, node.store, node.on_store).step(time.time()) == 1
        f = node.store.fetch(job_id)
        assert f.state is FetchState.RETRIEVED, f.note
        t1 = realistic_exam.mr_series_uids["t1"]
        assert f.series_uid == t1 and f.study_uid == realistic_exam.mr_study.study_instance_uid
        # Only the T1 came: the other series were passed over on their C-FIND answers.
        mr = [uid for uid in realistic_exam.mr_series_uids.values() if node.store.series(uid) is not None]
        assert mr == [t1]
        assert node.store.series(t1).instance_count == len(realistic_exam.mr_files["t1"])
        assert f"chose {t1} 't1_mprage_sag_p2_iso' (other study 3 days earlier, 3D, 3 mm)" in f.note
        for name in ("localizer", "dwi", "adc"):
            assert realistic_exam.mr_series_uids[name] in f.note, name  # passed over, with why
        assert "DERIVED is excluded" in f.note and "ranked" not in f.note
        assert f"C-{how.upper()} of series {t1}" in f.note
    finally:
        receiver.stop()
        node.stop()


def test_source_down_is_retried_then_the_job_falls_back_with_the_reason(tmp_path, node_port, realistic_exam) -> None:
    s = settings(tmp_path, node_port, free_port())  # nothing listens there
    node = Node(s)
    try:
        job_id = waiting_job(node, realistic_exam)
        retriever = Retriever(s, node.store, node.on_store)
        retriever.step(time.time())
        f = node.store.fetch(job_id)
        assert f.state is FetchState.QUERY and f.attempts == 1 and "attempt 1 of 2" in f.note
        assert "peer down" in f.note and f.next_attempt_at > time.time()
        assert retriever.step(time.time()) == 0  # not due before the backoff
        retriever.step(f.next_attempt_at + 0.01)
        f = node.store.fetch(job_id)
        assert f.state is FetchState.FAILED and "gave up after 2 attempts" in f.note
        pet = node.store.series(realistic_exam.pet_series_uid)
        d = decide(pet, [], time.time(), s, fetch=f)
        assert d.kind is DecisionKind.FALLBACK and "sources: unanswered" not in d.reason
        assert "peer down" in d.reason and d.reason.endswith("fallback to Gaussian")
    finally:
        node.stop()


@pytest.mark.slow
def test_no_mr_at_the_source_exhausts_the_retrieval(tmp_path, node_port, realistic_exam, exam_with_bad_t1) -> None:
    # A PACS holding only another patient's exam; it does not know the node at first.
    with OrthancPeer(tmp_path / "other") as orthanc:
        r = run_storescu(exam_with_bad_t1.all_mr_files[:3], orthanc.dicom_port, called="ORTHANC")
        assert r.returncode == 0
        s = settings(tmp_path, node_port, orthanc.dicom_port)
        node = Node(s)
        try:
            job_id = waiting_job(node, realistic_exam)
            Retriever(s, node.store, node.on_store).step(time.time())
            f = node.store.fetch(job_id)
            assert f.state is FetchState.QUERY and f.attempts == 1
            assert "does the peer know and allow AE title 'DIPNODE' to query?" in f.note
        finally:
            node.stop()
    overlay = {"DicomModalities": {"dipnode": ["DIPNODE", "127.0.0.1", node_port]}}
    with OrthancPeer(tmp_path / "other", overlay=overlay) as orthanc:  # the same storage, now it does
        s = settings(tmp_path, node_port, orthanc.dicom_port)
        node = Node(s)
        try:
            node.store.update_fetch(job_id, time.time(), state=FetchState.QUERY, note="", next_attempt_at=0)
            Retriever(s, node.store, node.on_store).step(time.time())
            f = node.store.fetch(job_id)
            assert f.state is FetchState.EXHAUSTED, f.note
            assert f.note == f"no eligible MR at ORTHANC@127.0.0.1:{orthanc.dicom_port} (0 new MR series found)"
        finally:
            node.stop()


def test_a_refused_move_is_retried_then_fails(tmp_path, pacs, node_port, realistic_exam) -> None:
    s = settings(tmp_path, node_port, pacs.dicom_port, move_destination="NOBODY")  # unknown to the PACS
    node = Node(s)
    try:
        job_id = waiting_job(node, realistic_exam)
        retriever = Retriever(s, node.store, node.on_store)
        retriever.step(time.time())
        first = node.store.fetch(job_id)
        assert first.state is FetchState.QUERY and "refused: UNABLE_TO_PROCESS (0xC000)" in first.note
        assert first.series_uid == realistic_exam.mr_series_uids["t1"]  # the retry moves the same series
        retriever.step(first.next_attempt_at + 0.01)
        f = node.store.fetch(job_id)
        assert f.state is FetchState.FAILED and "gave up after 2 attempts" in f.note
        assert node.store.series(realistic_exam.mr_series_uids["t1"]) is None
    finally:
        node.stop()


def test_a_restart_resumes_the_retrieval_without_duplicating_it(tmp_path, pacs, node_port, realistic_exam) -> None:
    down = settings(tmp_path, node_port, free_port())
    node = Node(down)
    job_id = waiting_job(node, realistic_exam)
    Retriever(down, node.store, node.on_store).step(time.time())
    assert node.store.fetch(job_id).attempts == 1
    node.stop()  # the node stops; the PACS comes back at another address in the settings
    up = settings(tmp_path, node_port, pacs.dicom_port)
    node = Node(up)
    receiver = start_receiver(wire.receiver_config(up), node.on_store)
    try:
        retriever = Retriever(up, node.store, node.on_store)
        f = node.store.fetch(job_id)
        assert f.state is FetchState.QUERY and f.attempts == 1  # kept across the restart
        retriever.step(f.next_attempt_at + 0.01)
        f = node.store.fetch(job_id)
        assert f.state is FetchState.RETRIEVED and f.series_uid == realistic_exam.mr_series_uids["t1"]
        n = node.store.series(f.series_uid).instance_count
        node.store.request_fetch(job_id, time.time())  # asked again: the same retrieval, not a new one
        assert retriever.step(time.time() + 100) == 0 and node.store.series(f.series_uid).instance_count == n
    finally:
        receiver.stop()
        node.stop()


def test_a_partial_move_is_retried_and_the_retry_completes_the_series(tmp_path, pacs, node_port,
                                                                      realistic_exam) -> None:
    s = settings(tmp_path, node_port, pacs.dicom_port)
    node = Node(s)
    refuse = [True]
    seen = [0]

    def flaky_on_store(instance):
        # The node's own receive path, with every 10th instance refused while ``refuse`` holds
        # (a full disk for a moment): the PACS's C-MOVE stops part way.
        seen[0] += 1
        if refuse[0] and seen[0] % 10 == 0:
            raise StoreRefused(Status.OUT_OF_RESOURCES, "spool full for a moment")
        return node.on_store(instance)

    receiver = start_receiver(wire.receiver_config(s), flaky_on_store)
    try:
        job_id = waiting_job(node, realistic_exam)
        retriever = Retriever(s, node.store, node.on_store)
        retriever.step(time.time())
        f = node.store.fetch(job_id)
        t1 = realistic_exam.mr_series_uids["t1"]
        assert f.state is FetchState.QUERY and f.attempts == 1 and "partial: 9 sub-operation(s) completed" in f.note
        assert node.store.series(t1).instance_count == 9  # kept: the retry only adds the rest
        refuse[0] = False
        retriever.step(f.next_attempt_at + 0.01)
        f = node.store.fetch(job_id)
        assert f.state is FetchState.RETRIEVED and f.series_uid == t1
        assert node.store.series(t1).instance_count == len(realistic_exam.mr_files["t1"])
    finally:
        receiver.stop()
        node.stop()
