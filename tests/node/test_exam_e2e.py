"""A real exam end to end: DCMTK storescu pushes a PET/CT study and an MR exam into Orthanc
(configured from the shipped deploy/orthanc.json and routing with the shipped
deploy/orthanc-route.lua), Orthanc routes to a running `dipnode serve`, the job uses the
sagittal 3D T1 and the results land in the PET's study in Orthanc. Then the same with only the
PET pushed while the MR exam already sits in Orthanc: the node fetches the T1 itself.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest

from dipnode.dicom_io.uids import derive_uid
from dipnode.node.jobs.rows import FetchState, JobState
from dipnode.node.jobs.store import Store
from dipnode.sim.exam import RealisticExam
from nodeproc import NodeProcess, node_settings, wait_for
from peers import OrthancPeer, free_port, run_storescu

pytestmark = [pytest.mark.network, pytest.mark.slow]

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
RESULTS = ("1001", "1002", "1003")  # derived PET, Parametric Map, plain map (settings' numbers)
# The tiny preset, shortened further: these tests are about which MR, not about the fit.
SHORT_FIT = {"epochs": 6, "sample_every": 1}


def shipped_orthanc(workdir: Path, node_port: int, *, lua: bool = True, dicom_port: int | None = None) -> OrthancPeer:
    """Orthanc run with deploy/orthanc.json and the shipped Lua file itself; only what a test
    must change is changed: loopback ports and storage, no HTTP login, a short StableAge, the
    node's address, and the scanner (DCMTK storescu) declared since the config refuses unknown
    senders (DicomAlwaysAllowStore false)."""
    cfg = json.loads((DEPLOY / "orthanc.json").read_text())
    aet, _host, _port = cfg["DicomModalities"]["dipnode"]
    cfg["DicomModalities"] = {"dipnode": [aet, "127.0.0.1", node_port], "scanner": ["STORESCU", "127.0.0.1", 104]}
    cfg.update(RemoteAccessAllowed=False, AuthenticationEnabled=False, StableAge=1)
    cfg.pop("RegisteredUsers", None)
    cfg["LuaScripts"] = [str(DEPLOY / "orthanc-route.lua")] if lua else []
    return OrthancPeer(workdir, aet=cfg["DicomAet"], overlay=cfg, dicom_port=dicom_port)


def push(files, orthanc: OrthancPeer) -> None:
    r = run_storescu(files, orthanc.dicom_port, aet="STORESCU", called=orthanc.aet, timeout_s=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]


def results_in_pet_study(orthanc: OrthancPeer, exam: RealisticExam) -> dict[str, int] | None:
    """Instances per result Series Number in the PET's study, once all three are complete."""
    have: dict[str, int] = {}
    for sid in orthanc.get("/series"):
        s = orthanc.get(f"/series/{sid}")
        number = s["MainDicomTags"].get("SeriesNumber", "")
        study = orthanc.get(f"/studies/{s['ParentStudy']}")["MainDicomTags"]["StudyInstanceUID"]
        if number in RESULTS and study == exam.pet_study.study_instance_uid:
            have[number] = len(s["Instances"])
    n = len(exam.pet_files)
    return have if have == {"1001": n, "1002": 1, "1003": n} else None


def node_config(tmp_path: Path, port: int, orthanc: OrthancPeer, sources=(), **sections):
    return node_settings(
        tmp_path, port=port, method=SHORT_FIT,
        destinations=[{"ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}],
        # Only the PACS may call: nothing reaches the node but what Orthanc routes or moves.
        node={"allowed_calling_aets": ["ORTHANC", "ECHOSCU"]},
        series={"stable_age_s": 2.0, "check_interval_s": 0.2}, sources=sources,
        **sections)


def jobs(db: Path):
    with Store.open(db) as store:
        return store.jobs()


def dipnode_jobs(cfg: Path) -> str:
    r = subprocess.run([sys.executable, "-m", "dipnode.node.cli.main", "jobs", "--all", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.timeout(400)
def test_orthanc_routes_the_exam_and_the_node_uses_the_sagittal_t1(tmp_path: Path, realistic_exam) -> None:
    ex = realistic_exam
    port = free_port()
    with shipped_orthanc(tmp_path / "orthanc", port) as orthanc:
        cfg = node_config(tmp_path, port, orthanc,
                          matching={"mr_wait_s": 120.0, "mr_grace_s": 15.0, "fallback": "fail"})
        node = NodeProcess(cfg, port, tmp_path / "node.log")
        try:
            push([*ex.pet_files, *ex.ct_files], orthanc)  # the PET/CT, today
            push(ex.all_mr_files, orthanc)  # the MR exam from 3 days earlier, in acquisition order
            wait_for(lambda: results_in_pet_study(orthanc, ex), 300, "SDIP results in the PET's study")
            wait_for(lambda: [j.state for j in jobs(tmp_path / "dipnode.sqlite")] == [JobState.DONE], 30, "job done")
            table = dipnode_jobs(cfg)
            store_jobs = orthanc.get("/jobs?expand")
        finally:
            node.stop()
    [job] = jobs(tmp_path / "dipnode.sqlite")
    t1 = ex.mr_series_uids["t1"]
    assert job.mr_series_uid == t1 and job.method == "sdip" and not job.no_mr
    assert job.mr_choice.startswith(f"chose MR {t1} 't1_mprage_sag_p2_iso' (other study 3 days earlier, 3D, 3 mm)")
    for name, why in (("localizer", "matches exclusion"), ("dwi", "DIFFUSION is excluded"),
                      ("adc", "DERIVED is excluded")):
        assert ex.mr_series_uids[name] in job.mr_choice and why in job.mr_choice, name
    assert f"ranked lower: {ex.mr_series_uids['t2']} 't2_tse_tra'" in job.mr_choice
    assert f"MR: chose MR {t1}" in table  # `dipnode jobs` shows the choice
    with Store.open(tmp_path / "dipnode.sqlite") as store:
        # Everything the node holds came through the Lua routing: PET and all five MR series, no CT.
        held = {uid for uid in [ex.pet_series_uid, *ex.mr_series_uids.values()] if store.series(uid)}
        assert held == {ex.pet_series_uid, *ex.mr_series_uids.values()}
        assert store.series(ex.mr_series_uids["localizer"]).orientations_mixed
        assert store.series(ex.mr_series_uids["dwi"]).positions_repeated
    # Orthanc sent each routed series as one asynchronous store job, all successful.
    routed = [j for j in store_jobs if j["Type"] == "DicomModalityStore"]
    assert len(routed) == 6 and {j["State"] for j in routed} == {"Success"}


@pytest.mark.timeout(400)
def test_only_the_pet_is_pushed_and_the_node_fetches_the_t1_from_orthanc(tmp_path: Path, realistic_exam) -> None:
    ex = realistic_exam
    port, pacs_port = free_port(), free_port()
    # The MR exam was acquired days ago and sits in the PACS (stored before routing was set up).
    with shipped_orthanc(tmp_path / "orthanc", port, lua=False, dicom_port=pacs_port) as orthanc:
        push(ex.all_mr_files, orthanc)
    with shipped_orthanc(tmp_path / "orthanc", port, dicom_port=pacs_port) as orthanc:
        cfg = node_config(tmp_path, port, orthanc,
                          matching={"mr_wait_s": 120.0, "mr_grace_s": 15.0, "fallback": "fail"},
                          retrieve={"query_delay_s": 1.0, "retries": 2, "backoff_s": 1.0, "timeout_s": 20.0},
                          sources=[{"ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs_port,
                                    "retrieve": "move"}])
        node = NodeProcess(cfg, port, tmp_path / "node.log")
        try:
            push([*ex.pet_files, *ex.ct_files], orthanc)  # today's PET/CT only
            wait_for(lambda: results_in_pet_study(orthanc, ex), 300, "SDIP results in the PET's study")
            wait_for(lambda: [j.state for j in jobs(tmp_path / "dipnode.sqlite")] == [JobState.DONE], 30, "job done")
        finally:
            node.stop()
    t1 = ex.mr_series_uids["t1"]
    with Store.open(tmp_path / "dipnode.sqlite") as store:
        [job] = store.jobs()
        fetch = store.fetch(job.id)
        held = [name for name, uid in ex.mr_series_uids.items() if store.series(uid)]
    assert job.mr_series_uid == t1 and job.state is JobState.DONE
    assert fetch.state is FetchState.RETRIEVED and fetch.series_uid == t1
    assert held == ["t1"]  # only the chosen series was moved; the rest stayed in the PACS
    assert f"chose {t1} 't1_mprage_sag_p2_iso'" in fetch.note and "C-MOVE of series" in fetch.note


def direct_config(tmp_path: Path, port: int, **matching):
    """A node the scanner pushes to directly (STORESCU), results kept on disk (no destination)."""
    return node_settings(tmp_path, port=port, destinations=[], method=SHORT_FIT,
                         series={"stable_age_s": 2.0, "check_interval_s": 0.2}, matching=matching)


def push_to_node(files, port: int) -> None:
    r = run_storescu(files, port, aet="STORESCU", called="DIPNODE", timeout_s=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]


def settled(db: Path, n: int) -> bool:
    js = jobs(db)
    return len(js) == n and all(j.state in (JobState.DONE, JobState.FAILED) for j in js)


@pytest.mark.timeout(400)
def test_an_mr_that_fails_to_register_is_passed_over_for_the_next(tmp_path: Path, exam_with_bad_t1) -> None:
    ex = exam_with_bad_t1  # its T1 is noise: registration refuses it
    port = free_port()
    cfg = direct_config(tmp_path, port, mr_wait_s=60.0, mr_grace_s=5.0, fallback="fail")
    node = NodeProcess(cfg, port, tmp_path / "node.log")
    try:
        push_to_node([*ex.pet_files, *ex.all_mr_files], port)
        wait_for(lambda: settled(tmp_path / "dipnode.sqlite", 1), 300, "the job to settle")
        table = dipnode_jobs(cfg)
    finally:
        node.stop()
    with Store.open(tmp_path / "dipnode.sqlite") as store:
        [job] = store.jobs()
        passed = store.passed_over(job.id)
    t1, t2 = ex.mr_series_uids["t1"], ex.mr_series_uids["t2"]
    assert job.state is JobState.DONE and job.mr_series_uid == t2, job.reason  # never failed
    assert list(passed) == [t1] and "AlignmentError" in passed[t1]
    assert job.mr_choice.startswith(f"chose MR {t2} 't2_tse_tra'")
    assert f"{t1} 't1_mprage_sag_p2_iso': failed in this job: MR unusable: AlignmentError" in job.mr_choice
    assert f"MR: chose MR {t2}" in table


def _copy_series(files, out: Path, tag: str) -> list[Path]:
    """The same images as a new series (new UIDs): a repeat acquisition."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, f in enumerate(files):
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = derive_uid("copy", tag, str(ds.SeriesInstanceUID))
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = derive_uid("copy", tag, str(i))
        ds.SeriesNumber = 6
        ds.save_as(out / f"{i:04d}.dcm", enforce_file_format=True)
        paths.append(out / f"{i:04d}.dcm")
    return paths


@pytest.mark.timeout(500)
def test_a_late_mr_reruns_the_job_that_fell_back_and_only_that_one(tmp_path: Path, realistic_exam) -> None:
    ex = realistic_exam
    port = free_port()
    db = tmp_path / "dipnode.sqlite"
    cfg = direct_config(tmp_path, port, mr_wait_s=1.0, mr_grace_s=5.0, fallback="gaussian")
    node = NodeProcess(cfg, port, tmp_path / "node.log")
    try:
        push_to_node(ex.pet_files, port)  # the PET alone: no MR within mr_wait_s
        wait_for(lambda: settled(db, 1), 120, "the Gaussian fallback")
        [first] = jobs(db)
        assert first.method == "gaussian" and first.no_mr and first.state is JobState.DONE
        push_to_node(ex.all_mr_files, port)  # the MR exam arrives late
        wait_for(lambda: settled(db, 2), 300, "the re-run with the MR")
        second = jobs(db)[1]
        assert (second.rerun_of, second.method, second.mr_series_uid) == (first.id, "sdip", ex.mr_series_uids["t1"])
        assert second.state is JobState.DONE and not second.no_mr
        # Another MR series of the patient now re-triggers nothing: the latest job had its MR.
        repeat = _copy_series(ex.mr_files["t1"], tmp_path / "repeat", "t1-repeat")
        push_to_node(repeat, port)
        repeat_uid = str(pydicom.dcmread(repeat[0], stop_before_pixels=True).SeriesInstanceUID)

        def repeat_complete() -> bool:
            with Store.open(db) as store:
                s = store.series(repeat_uid)
                return s is not None and s.state.value == "complete"

        wait_for(repeat_complete, 60, "the repeated T1 to complete")
        # The re-trigger is decided in the scheduler step that completes the series; an absence
        # can only be checked after it: five scheduler intervals.
        time.sleep(1.0)
    finally:
        node.stop()
    assert len(jobs(db)) == 2
