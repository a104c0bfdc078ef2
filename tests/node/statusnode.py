"""A running node with jobs in several states, for the tests of its HTTP port (status page,
metrics, admin actions) and the headless-Chromium test.

One real job goes the whole way: DCMTK storescu pushes the 4 mm phantom's PET and MR, the
node runs SDIP (tiny preset) and sends the results to DCMTK storescp: done, with trust numbers
and thumbnails. Beside it, rows in the same SQLite database put other jobs in the states a
page must show (failed with a reason, a dead letter, waiting for the MR, running).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from dipnode.models.params import DipParams
from dipnode.node.jobs.rows import InstanceRecord, JobState
from dipnode.node.server import Node
from dipnode.node.settings import Settings
from dipnode.sim.study import PhantomStudy, write_phantom_study
from nodeproc import wait_for
from peers import StorescpPeer, run_storescu, storescu_statuses

ADMIN_TOKEN = "admin-token-for-tests-0123"


@dataclass
class StatusNode:
    node: Node
    study: PhantomStudy
    pacs: StorescpPeer
    done_job: int
    failed_job: int
    dead_job: int
    waiting_job: int
    running_job: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.node.http.port}"


def _series(node: Node, uid: str, modality: str, description: str, study: str, patient: str) -> str:
    node.store.record_instance(InstanceRecord(
        sop_instance_uid=f"{uid}.1", sop_class_uid="1.2.840.10008.5.1.4.1.1.128",
        path=Path("/nonexistent") / f"{uid}.dcm", study_uid=study, series_uid=uid, modality=modality,
        transfer_syntax="1.2.840.10008.1.2.1", patient_id=patient, series_description=description,
        series_date="20261127"), time.time())
    node.store.mark_series_complete(uid, time.time())
    return uid


def start_status_node(workdir: Path) -> StatusNode:
    study = write_phantom_study(workdir / "study", voxel_mm=4.0, dose_fraction=0.1)
    pacs = StorescpPeer(workdir / "pacs")
    settings = Settings(
        node={"port": 0, "allowed_calling_aets": ["STORESCU"]},
        storage={"spool_dir": workdir / "spool", "database": workdir / "db.sqlite", "min_free_mb": 0},
        series={"stable_age_s": 1.0, "check_interval_s": 0.2},
        matching={"mr_wait_s": 3600.0, "fallback": "fail", "mr_grace_s": 0.0},
        method={"name": "sdip", "preset": "tiny", "device": "cpu"},
        destinations=[{"ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.port}],
        sender={"retries": 0},
        http={"port": 0, "admin_token": ADMIN_TOKEN, "refresh_s": 30},
    )
    node = Node(settings)
    node.start()
    try:
        files = list(study.pet_files) + list(study.mr_files)
        result = run_storescu(files, node.port)
        assert storescu_statuses(result) == [0] * len(files), result.stdout[-2000:]
        done = wait_for(lambda: [j for j in node.store.jobs() if j.state is JobState.DONE], 600, "the job done")[0]
        s = node.store
        now = time.time()
        # A failed job (its MR would not register), a dead letter, one waiting, one running;
        # under the store's lock, so that the node's scheduler cannot claim one in between.
        s._lock.acquire()
        failed_pet = _series(node, "2.25.901", "PT", "PET Brain FDG (failed)", "2.25.90", "P-F")
        failed = s.create_job(failed_pet, method="sdip", params=DipParams(), now=now, state=JobState.QUEUED)
        s.transition(failed.id, JobState.FAILED, now, reason="MR unusable: AlignmentError: Mattes MI -0.12 "
                     "after registration is poorer than the threshold -0.30")
        dead_pet = _series(node, "2.25.911", "PT", "PET Brain FDG (PACS refused)", "2.25.91", "P-D")
        dead = s.create_job(dead_pet, method="gaussian", params=DipParams(), now=now, state=JobState.QUEUED)
        s.transition(dead.id, JobState.RUNNING, now)
        s.transition(dead.id, JobState.SENDING, now)
        label = settings.destinations[0].label
        s.add_deliveries(dead.id, [label], now)
        s.delivery_result(dead.id, label, now, ok=False, error="association rejected: called AE title not "
                          "recognised", next_attempt_at=None)
        waiting_pet = _series(node, "2.25.921", "PT", "PET Brain FDG (waiting)", "2.25.92", "P-W")
        waiting = s.create_job(waiting_pet, method="sdip", params=DipParams(), now=now,
                               state=JobState.WAITING_FOR_MR)
        running_pet = _series(node, "2.25.931", "PT", "PET Brain FDG (running)", "2.25.93", "P-R")
        running = s.create_job(running_pet, method="sdip", params=DipParams(), now=now, state=JobState.QUEUED)
        # Claimed by hand: the node's scheduler only claims queued jobs, so it stays running.
        s._db.execute("UPDATE jobs SET state = 'running', progress = 0.4 WHERE id = ?", (running.id,))
        s._lock.release()
        return StatusNode(node, study, pacs, done.id, failed.id, dead.id, waiting.id, running.id)
    except BaseException:
        node.stop()
        pacs.stop()
        raise
