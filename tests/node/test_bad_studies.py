"""Bad studies through the real node end as FAILED jobs whose reason `dipnode jobs` shows,
and the node goes on serving. Also: the spool's free-space mark through the node's settings.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from dipnode.node.jobs.rows import JobState
from dipnode.node.jobs.store import Store
from dipnode.sim.study import PhantomStudy, write_phantom_study
from nodeproc import NodeProcess, node_settings, wait_for
from peers import free_port, run_echoscu, run_storescu, storescu_statuses, tiny_pet_files

pytestmark = [pytest.mark.network, pytest.mark.slow]


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> PhantomStudy:
    return write_phantom_study(tmp_path_factory.mktemp("study"), voxel_mm=4.0, dose_fraction=0.1)


def _variant(files: tuple[Path, ...], out: Path, noise: bool = False, **changes: object) -> list[Path]:
    """Copies of a series as a new series (new Series/SOP Instance UIDs), with changes;
    ``noise`` replaces the pixels by uniform noise of the same type."""
    out.mkdir(parents=True)
    series = generate_uid()
    rng = np.random.default_rng(7)
    paths = []
    for i, src in enumerate(files):
        ds = pydicom.dcmread(src)
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        for key, value in changes.items():
            setattr(ds, key, value)
        if noise:
            px = ds.pixel_array
            ds.PixelData = rng.integers(0, 1000, size=px.shape).astype(px.dtype).tobytes()
        path = out / f"{i:03d}.dcm"
        ds.save_as(path)
        paths.append(path)
    return paths


def _push(files: list[Path] | tuple[Path, ...], port: int, check: bool = True) -> list[int]:
    result = run_storescu(list(files), port, aet="STORESCU", called="DIPNODE")
    # storescu exits non-zero when any store failed; the statuses are what matter then.
    assert result.returncode == 0 or not check, result.stdout + result.stderr
    return storescu_statuses(result)


def _jobs(db: Path):
    with Store.open(db) as store:
        return store.jobs()


def _jobs_cli(cfg: Path) -> str:
    out = subprocess.run([sys.executable, "-m", "dipnode.node.cli.main", "jobs", "--all", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.timeout(360)
def test_bad_studies_fail_with_reasons_and_node_keeps_serving(study: PhantomStudy, tmp_path: Path) -> None:
    port = free_port()
    cfg = node_settings(tmp_path, port=port, destinations=[],
                        series={"stable_age_s": 1.0, "check_interval_s": 0.2},
                        matching={"mr_wait_s": 1.0, "fallback": "fail"})
    db = tmp_path / "dipnode.sqlite"
    node = NodeProcess(cfg, port, tmp_path / "node.log")
    try:
        # 1. PET without any MR.
        assert set(_push(study.pet_files, port)) == {0}
        wait_for(lambda: [j.state for j in _jobs(db)] == [JobState.FAILED], 60, "no-MR job failed")
        # 2. the MR arrives (its own study); then a one-slice PET and a CNTS PET of the patient.
        assert set(_push(study.mr_files, port)) == {0}
        one = _variant(study.pet_files[:1], tmp_path / "one")
        cnts = _variant(study.pet_files, tmp_path / "cnts", Units="CNTS")
        # 3. another patient whose only MR is noise in its own frame of reference.
        other = {"PatientID": "NOISE-0001", "StudyInstanceUID": generate_uid()}
        noise_mr = _variant(study.mr_files, tmp_path / "noise_mr", noise=True,
                            FrameOfReferenceUID=generate_uid(), PatientID="NOISE-0001",
                            StudyInstanceUID=generate_uid())
        noise_pet = _variant(study.pet_files, tmp_path / "noise_pet", **other)
        assert set(_push(noise_mr, port)) == {0}
        assert set(_push(one + cnts + noise_pet, port)) == {0}
        # Four jobs fail; the MR arriving after the first PET failed for lack of one re-runs it
        # (a fifth job, which has its MR and succeeds).
        wait_for(lambda: len(_jobs(db)) == 5 and all(j.state in (JobState.FAILED, JobState.DONE)
                                                     for j in _jobs(db)), 240, "four failed jobs and a re-run")
        failed = [j for j in _jobs(db) if j.state is JobState.FAILED]
        assert len(failed) == 4
        reasons = {j.pet_series_uid: j.reason or "" for j in failed}
        first_pet = str(pydicom.dcmread(study.pet_files[0], stop_before_pixels=True).SeriesInstanceUID)
        [rerun] = [j for j in _jobs(db) if j.rerun_of is not None]
        assert (rerun.pet_series_uid, rerun.state, rerun.no_mr) == (first_pet, JobState.DONE, False)
        assert rerun.mr_series_uid == str(pydicom.dcmread(study.mr_files[0], stop_before_pixels=True).SeriesInstanceUID)
        no_mr = reasons[first_pet]
        one_r = reasons[str(pydicom.dcmread(one[0], stop_before_pixels=True).SeriesInstanceUID)]
        cnts_r = reasons[str(pydicom.dcmread(cnts[0], stop_before_pixels=True).SeriesInstanceUID)]
        assert "MR" in no_mr, no_mr
        assert "slice" in one_r.lower() or ">= 2" in one_r or "at least 2" in one_r, one_r
        assert "CNTS" in cnts_r and "BQML" in cnts_r, cnts_r
        noise_r = reasons[str(pydicom.dcmread(noise_pet[0], stop_before_pixels=True).SeriesInstanceUID)]
        assert "AlignmentError" in noise_r, noise_r
        shown = _jobs_cli(cfg)
        assert shown.count("failed") >= 4 and "CNTS" in shown and "AlignmentError" in shown, shown
        # Still serving: C-ECHO and a good store.
        assert run_echoscu(port, aet="ECHOSCU", called="DIPNODE").returncode == 0
        assert set(_push(tiny_pet_files(tmp_path / "good", n=2), port)) == {0}
    finally:
        node.stop()


@pytest.mark.timeout(240)
def test_cuda_on_a_cpu_machine_fails_the_job_not_the_node(study: PhantomStudy, tmp_path: Path) -> None:
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the test is about a missing GPU")
    port = free_port()
    cfg = node_settings(tmp_path, port=port, destinations=[], method={"device": "cuda"},
                        series={"stable_age_s": 1.0, "check_interval_s": 0.2})
    db = tmp_path / "dipnode.sqlite"
    node = NodeProcess(cfg, port, tmp_path / "node.log")
    try:
        assert set(_push(study.pet_files + study.mr_files, port)) == {0}
        job = wait_for(lambda: [j for j in _jobs(db) if j.state is JobState.FAILED], 150, "job failed")[0]
        assert "cuda" in (job.reason or "").lower(), job.reason
        assert run_echoscu(port, aet="ECHOSCU", called="DIPNODE").returncode == 0
    finally:
        node.stop()


@pytest.mark.timeout(90)
def test_free_space_mark_refuses_out_of_resources(tmp_path: Path) -> None:
    port = free_port()
    cfg = node_settings(tmp_path, port=port, destinations=[], storage={"min_free_mb": 2**40})
    node = NodeProcess(cfg, port, tmp_path / "node.log")
    try:
        statuses = _push(tiny_pet_files(tmp_path / "src", n=2), port, check=False)
        # PS3.4 B.2.3 OUT_OF_RESOURCES; storescu stops sending after a refusal of that kind.
        assert statuses and set(statuses) == {0xA700}, statuses
        assert run_echoscu(port, aet="ECHOSCU", called="DIPNODE").returncode == 0
    finally:
        node.stop()
    assert "OUT_OF_RESOURCES" in (tmp_path / "node.log").read_text()
