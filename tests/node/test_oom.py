"""A fit out of memory through the real node: [workers] on_oom decides, and the node goes on.

The out-of-memory error is produced for real on this CPU-only machine by ``[workers]
memory_limit_mb = 1``: the fit estimates its peak (models/dip.py ``fit_memory_bytes``), finds
it above the limit and raises, as ``torch.OutOfMemoryError``'s cause, the same
``DipOutOfMemoryError`` that a full GPU raises from its allocator. Nothing is mocked: the
node process, the push (DCMTK storescu) and the fits are what a user runs. What this cannot
show on a CPU is the GPU allocator itself running out; there the same path is taken.
"""
from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest

from dipnode.node.jobs.rows import JobState
from dipnode.node.jobs.store import Store
from dipnode.sim.study import PhantomStudy, write_phantom_study
from nodeproc import NodeProcess, node_settings, wait_for
from peers import free_port, run_echoscu, run_storescu

pytestmark = [pytest.mark.network, pytest.mark.slow]


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> PhantomStudy:
    return write_phantom_study(tmp_path_factory.mktemp("study"), voxel_mm=4.0, dose_fraction=0.1)


def _jobs(db: Path):
    with Store.open(db) as store:
        return store.jobs()


def _run(study: PhantomStudy, tmp_path: Path, on_oom: str, final: JobState):
    port = free_port()
    # The tiny preset cut to 4 epochs: the fit that runs after the fallback is not the point.
    cfg = node_settings(tmp_path, port=port, destinations=[],
                        method={"epochs": 4, "sample_from": 2, "sample_every": 1},
                        series={"stable_age_s": 1.0, "check_interval_s": 0.2},
                        workers={"memory_limit_mb": 1, "on_oom": on_oom})
    db = tmp_path / "dipnode.sqlite"
    node = NodeProcess(cfg, port, tmp_path / "node.log")
    try:
        pushed = run_storescu(list(study.pet_files + study.mr_files), port, aet="STORESCU", called="DIPNODE")
        assert pushed.returncode == 0, pushed.stdout + pushed.stderr
        job = wait_for(lambda: [j for j in _jobs(db) if j.state is final], 400, f"job {final.value}")[0]
        assert run_echoscu(port, aet="ECHOSCU", called="DIPNODE").returncode == 0  # still serving
    finally:
        node.stop()
    return job, (tmp_path / "node.log").read_text(errors="replace")


@pytest.mark.timeout(500)
def test_on_oom_fail_ends_the_job_with_the_reason(study: PhantomStudy, tmp_path: Path) -> None:
    job, _ = _run(study, tmp_path, "fail", JobState.FAILED)
    assert "out of memory on cpu" in job.reason and "memory_limit_mb = 1" in job.reason, job.reason
    assert "on_oom" in job.reason  # the reason says what to change


@pytest.mark.timeout(500)
def test_on_oom_gaussian_sends_the_gaussian_result(study: PhantomStudy, tmp_path: Path) -> None:
    job, log = _run(study, tmp_path, "gaussian", JobState.DONE)
    assert job.method.value == "gaussian"
    assert "OSEM + Gaussian instead (on_oom = gaussian)" in log
    pet = sorted(Path(job.output_dir).rglob("*.dcm"))
    assert len(pet) == len(study.pet_files)  # the derived PET; a Gaussian has no maps
    ds = pydicom.dcmread(pet[0], stop_before_pixels=True)
    assert "gaussian" in ds.SeriesDescription.lower() and "Gaussian" in ds.DerivationDescription


@pytest.mark.timeout(500)
def test_on_oom_cpu_runs_the_fit_again_without_the_limit(study: PhantomStudy, tmp_path: Path) -> None:
    job, log = _run(study, tmp_path, "cpu", JobState.DONE)
    assert job.method.value == "sdip"
    assert job.params.device == "cpu" and job.params.memory_limit_mb == 0
    assert "ran on the CPU instead (on_oom = cpu)" in log
    files = list(Path(job.output_dir).rglob("*.dcm"))
    classes = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID) for p in files}
    assert "1.2.840.10008.5.1.4.1.1.30" in classes  # Parametric Map: the SDIP's stability map
    assert len(files) > len(study.pet_files)
