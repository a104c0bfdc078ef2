"""A series whose instances disagree on patient (ID, issuer), study, frame of reference or
modality is never processed: the index marks it at the first conflicting instance, its job
fails with a reason that names UIDs and attributes (never patient values), and the loader
refuses such a set again as defence in depth. Sent for real: nothing reaches the destination."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dipnode.dicom_io.errors import MixedSeriesError
from dipnode.dicom_io.series import load_volume, read_datasets
from dipnode.node.server import Node
from dipnode.node.settings import Settings
from dipnode.node.jobs.rows import InstanceRecord, JobState
from dipnode.node.jobs.store import Store
from dipnode.sim.dicom_study import new_study, write_pet_series
from nodeproc import NodeProcess, node_settings, wait_for
from peers import StorescpPeer, free_port, run_storescu, storescu_statuses

PET = "1.2.840.10008.5.1.4.1.1.128"
OTHER_ID, OTHER_NAME = "OTHER-7781", "Other^Patient"


def _rec(n: int, **kw) -> InstanceRecord:
    base = dict(sop_instance_uid=f"1.2.3.{n}", sop_class_uid=PET, path=Path(f"/x/{n}.dcm"),
                study_uid="1.2.3", series_uid="1.2.3.4", modality="PT",
                transfer_syntax="1.2.840.10008.1.2.1", patient_id="PAT-1",
                frame_of_reference_uid="1.2.3.5")
    base.update(kw)
    return InstanceRecord(**base)


@pytest.mark.parametrize(("change", "attribute"), [
    ({"patient_id": "PAT-2"}, "Patient ID"),
    ({"issuer_of_patient_id": "OTHER-HOSPITAL"}, "Issuer of Patient ID"),
    ({"study_uid": "1.2.3.99"}, "Study Instance UID"),
    ({"frame_of_reference_uid": "1.2.3.98"}, "Frame of Reference UID"),
    ({"modality": "CT"}, "Modality"),
])
def test_index_marks_the_series_at_the_first_conflict(tmp_path: Path, change, attribute) -> None:
    with Store.open(tmp_path / "db.sqlite") as store:
        store.record_instance(_rec(1), 0.0)
        assert store.series("1.2.3.4").conflict is None
        store.record_instance(_rec(2, **change), 1.0)
        store.record_instance(_rec(3, patient_id="PAT-3"), 2.0)  # a later one changes nothing
        row = store.series("1.2.3.4")
        assert row.instance_count == 3
        assert attribute in row.conflict and "1.2.3.2" in row.conflict
        assert "PAT-2" not in row.conflict and "PAT-3" not in row.conflict
        # An inconsistent series is no MR prior for anyone.
        assert store.related_series("1.2.3", "PAT-1", "") == []


def _two_patient_series(folder: Path) -> list[Path]:
    study = new_study("PAT-1", seed=5)
    vals = np.full((8, 8, 8), 1000.0)
    vals[:, 2:6, 2:6] = 5000.0
    files = write_pet_series(vals, np.diag([2.0, 2.0, 2.0, 1.0]), folder, study=study)
    for f in files[4:]:  # the upper half names another patient: same study, series, geometry
        ds = pydicom.dcmread(f)
        ds.PatientID, ds.PatientName = OTHER_ID, OTHER_NAME
        ds.save_as(f)
    return files


def test_loader_refuses_a_set_that_names_two_patients(tmp_path: Path) -> None:
    files = _two_patient_series(tmp_path / "pet")
    with pytest.raises(MixedSeriesError) as info:
        load_volume(read_datasets(files), modality="PT")
    text = str(info.value)
    assert "Patient ID" in text and OTHER_ID not in text and "PAT-1" not in text


def test_job_of_an_inconsistent_series_fails_with_the_reason(tmp_path: Path) -> None:
    settings = Settings(node={"port": 0, "allowed_calling_aets": ["*"]},
                        storage={"spool_dir": tmp_path / "spool", "database": tmp_path / "db.sqlite",
                                 "min_free_mb": 0},
                        method={"name": "gaussian", "preset": "tiny", "device": "cpu"})
    node = Node(settings)
    try:
        node.store.record_instance(_rec(1), 0.0)
        node.store.record_instance(_rec(2, patient_id="PAT-2"), 0.0)
        node.tick(100.0)
        [job] = node.store.jobs()
        assert job.state is JobState.FAILED
        assert "1.2.3.4" in job.reason and "Patient ID" in job.reason and "PAT-2" not in job.reason
    finally:
        node.stop()


@pytest.mark.network
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_two_patient_series_pushed_never_reaches_a_destination(tmp_path: Path) -> None:
    files = _two_patient_series(tmp_path / "pet")
    with StorescpPeer(tmp_path / "pacs") as pacs:
        port = free_port()
        cfg = node_settings(tmp_path, port=port, method={"name": "gaussian"},
                            series={"stable_age_s": 1.0, "check_interval_s": 0.2},
                            destinations=[{"ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.port}])
        log = tmp_path / "node.log"
        node = NodeProcess(cfg, port, log)
        try:
            res = run_storescu(files, port, aet="STORESCU", called="DIPNODE")
            assert res.returncode == 0 and storescu_statuses(res) == [0] * len(files)

            def failed():
                with Store.open(tmp_path / "dipnode.sqlite") as store:
                    jobs = store.jobs()
                    return jobs[0] if jobs and jobs[0].state is JobState.FAILED else None

            job = wait_for(failed, 60, "the job to fail")
            # A control series after it: once its job is done the scheduler had every chance.
            ok = write_pet_series(np.full((4, 8, 8), 100.0), np.diag([2.0, 2.0, 2.0, 1.0]),
                                  tmp_path / "ok", study=new_study("PAT-9", seed=1))
            assert run_storescu(ok, port, aet="STORESCU", called="DIPNODE").returncode == 0
            wait_for(lambda: len(pacs.files()) == len(ok), 60, "the control series' result")
        finally:
            node.stop()
        received = [pydicom.dcmread(f, stop_before_pixels=True) for f in pacs.files()]
        assert {str(ds.PatientID) for ds in received} == {"PAT-9"}  # nothing of the mixed series
    assert "Patient ID" in job.reason and str(pydicom.dcmread(files[0]).SeriesInstanceUID) in job.reason
    jobs = subprocess.run([sys.executable, "-m", "dipnode.node.cli.main", "jobs", "--all", "--config", str(cfg)],
                          capture_output=True, text=True, timeout=60)
    assert "Patient ID" in jobs.stdout
    text = log.read_text() + jobs.stdout + jobs.stderr
    for secret in (OTHER_ID, OTHER_NAME, "PAT-1", "Other", "SIM^"):
        assert secret not in text, secret
