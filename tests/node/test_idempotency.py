"""The same study sent twice gives no duplicate output series in the PACS; `dipnode rerun JOB`
gives a NEW series. Counted in a real Orthanc after the node is idle.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dipnode.node.jobs.rows import JobState
from dipnode.node.jobs.store import Store
from dipnode.sim.study import PhantomStudy, write_phantom_study
from nodeproc import NodeProcess, node_settings, wait_for
from peers import OrthancPeer, free_port, run_storescu, storescu_statuses, tiny_pet_files

pytestmark = [pytest.mark.network, pytest.mark.slow]


def _push(study: PhantomStudy, port: int) -> None:
    files = list(study.pet_files) + list(study.mr_files)
    result = run_storescu(files, port, aet="STORESCU", called="DIPNODE")
    assert result.returncode == 0 and set(storescu_statuses(result)) == {0}, result.stderr


def _jobs(db: Path):
    with Store.open(db) as store:
        return store.jobs()


def _idle(db: Path, n_jobs: int) -> bool:
    jobs = _jobs(db)
    return len(jobs) == n_jobs and all(j.state in (JobState.DONE, JobState.FAILED) for j in jobs)


def _in_study(orthanc: OrthancPeer, study: PhantomStudy) -> dict[str, int]:
    """Instances per Series Instance UID the PACS holds in the phantom's PET study."""
    out = {}
    for sid in orthanc.get("/series"):
        s = orthanc.get(f"/series/{sid}")
        parent = orthanc.get(f"/studies/{s['ParentStudy']}")["MainDicomTags"]["StudyInstanceUID"]
        if parent == study.pet_study.study_instance_uid:
            out[s["MainDicomTags"]["SeriesInstanceUID"]] = len(s["Instances"])
    return out


@pytest.mark.timeout(240)
def test_same_study_twice_no_duplicates_and_rerun_gives_new_series(tmp_path: Path) -> None:
    study = write_phantom_study(tmp_path / "study", voxel_mm=4.0, dose_fraction=0.1)
    n = len(study.pet_files)
    stable = 1.0
    with OrthancPeer(tmp_path / "orthanc") as orthanc:
        port = free_port()
        # Gaussian: the bookkeeping under test is the node's, not the fit's (one output series).
        cfg = node_settings(tmp_path, port=port, method={"name": "gaussian"},
                            series={"stable_age_s": stable, "check_interval_s": 0.2},
                            destinations=[{"ae_title": orthanc.aet, "host": "127.0.0.1",
                                           "port": orthanc.dicom_port}])
        db = tmp_path / "dipnode.sqlite"
        node = NodeProcess(cfg, port, tmp_path / "node.log")
        try:
            _push(study, port)
            wait_for(lambda: _idle(db, 1) and _in_study(orthanc, study), 120, "first job delivered")
            first = _in_study(orthanc, study)
            assert list(first.values()) == [n], first
            _push(study, port)  # the very same instances again
            # A marker series sent after the duplicates: once ITS job exists, the scheduler has
            # had every chance to re-open the duplicated series (it became stable earlier).
            marker = tiny_pet_files(tmp_path / "marker", n=3)
            result = run_storescu(marker, port, aet="STORESCU", called="DIPNODE")
            assert result.returncode == 0, result.stderr
            wait_for(lambda: _idle(db, 2), 120, "the marker's job finished and nothing else")
            assert _in_study(orthanc, study) == first, "a duplicate send produced new output"
            # An explicit re-run is a new job and a new output series.
            job_id = _jobs(db)[0].id
            out = subprocess.run([sys.executable, "-m", "dipnode.node.cli.main", "rerun", str(job_id),
                                  "--config", str(cfg)], capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stdout + out.stderr
            wait_for(lambda: _idle(db, 3) and sum(_in_study(orthanc, study).values()) == 2 * n,
                     120, "re-run delivered")
            after = _in_study(orthanc, study)
            assert set(first) < set(after) and len(after) == 2, after
            assert _jobs(db)[2].rerun_of == job_id
        finally:
            node.stop()
