"""Jobs on a real Ray cluster on loopback (a head and a worker node, `ray start` processes; a
custom resource stands in for the GPU), results checked in a real Orthanc.

- a Ray worker process killed mid-fit: Ray runs the job again, the PACS holds one set of
  result series;
- the node killed while its job runs on the cluster: the task ends with the node's driver,
  the restarted node submits the job again, one set of series;
- the cluster unreachable: jobs fail with the reason, or wait in the queue, per settings, and
  the node keeps receiving.

One cluster for the module (Ray's start is seconds); tiny networks on the 4 mm phantom.
"""
from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest

from dipnode.models.params import PRESETS, Method
from dipnode.node.jobs.pipeline import series_descriptions
from dipnode.node.jobs.rows import JobState
from dipnode.node.jobs.store import Store
from dipnode.node.server import Node
from dipnode.node.settings import SettingsError, load_settings
from dipnode.sim.study import PhantomStudy, write_phantom_study
from harness.ray_cluster import RayCluster
from nodeproc import NodeProcess, node_settings, wait_for, write_settings
from peers import LOOPBACK, OrthancPeer, free_port, run_echoscu, run_storescu, storescu_statuses, tiny_pet_files


GPU = "dipnode_gpu"
# Long enough to be killed in the middle on a busy 2-core machine, short enough for CI.
FIT = {"name": "sdip", "preset": "tiny", "device": "cpu", "epochs": 16}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    c = RayCluster(tmp_path_factory.mktemp("ray"), gpu_resource=GPU)
    try:
        c.start_head(cpus=1, gpus=0)  # the head schedules; the worker node has the "GPU"
        c.add_worker(cpus=1, gpus=1)
        c.wait_for(nodes=2, gpus=1)
    except BaseException:
        c.stop()
        raise
    yield c
    c.stop()


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> PhantomStudy:
    return write_phantom_study(tmp_path_factory.mktemp("study"), voxel_mm=4.0, dose_fraction=0.1)


def ray_workers(address: str, **over: object) -> dict[str, object]:
    return {"executor": "ray", "ray_address": address, "ray_node_ip": LOOPBACK, "gpu_resource": GPU,
            "gpus_per_job": 1.0, "cpus_per_job": 1.0, "ray_connect_timeout_s": 20.0, **over}


def _push(files: list[Path], port: int) -> None:
    result = run_storescu(files, port, aet="STORESCU", called="DIPNODE")
    assert result.returncode == 0 and set(storescu_statuses(result)) == {0}, result.stderr


def _results(orthanc: OrthancPeer, study: PhantomStudy) -> dict[str, int]:
    """Instances per Series Description of the node's series in the phantom's PET study."""
    out: dict[str, int] = {}
    for sid in orthanc.get("/series"):
        s = orthanc.get(f"/series/{sid}")
        parent = orthanc.get(f"/studies/{s['ParentStudy']}")["MainDicomTags"]["StudyInstanceUID"]
        desc = s["MainDicomTags"].get("SeriesDescription", "")
        if parent == study.pet_study.study_instance_uid and desc.startswith("dipnode"):
            assert desc not in out, f"two series named {desc!r}: a second set of results"
            out[desc] = len(s["Instances"])
    return out


def _one_set(study: PhantomStudy) -> dict[str, int]:
    """One job's series: the multi-frame maps are one instance, the others one per PET slice."""
    n = len(study.pet_files)
    names = series_descriptions("dipnode", Method.SDIP, PRESETS["tiny"])
    return {f"{names[role]} [RESEARCH]": (1 if role in ("map", "weight") else n)
            for role in ("pet", "map", "map-plain", "weight", "weight-plain")}


def _to(orthanc: OrthancPeer) -> list[dict[str, object]]:
    """[[destinations]]: the Orthanc of the test."""
    return [{"ae_title": orthanc.aet, "host": LOOPBACK, "port": orthanc.dicom_port}]


def _expect_one_set(orthanc: OrthancPeer, study: PhantomStudy) -> None:
    """One job's series arrive in Orthanc, and nothing more after them: one set, not two."""
    wait_for(lambda: _results(orthanc, study) == _one_set(study), 60, "results in Orthanc")
    time.sleep(2)
    assert _results(orthanc, study) == _one_set(study)


def _jobs(db: Path):
    try:
        with Store.open_readonly(db, busy_timeout_s=5) as store:
            return store.jobs()
    except Exception:  # noqa: BLE001 - not created yet, or busy: poll again
        return []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").exists() and " Z " not in Path(f"/proc/{pid}/stat").read_text()


@pytest.mark.network
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_worker_killed_mid_fit_runs_again_and_the_pacs_gets_one_set(tmp_path, cluster, study):
    with OrthancPeer(tmp_path / "orthanc") as orthanc:
        port = free_port()
        cfg = node_settings(tmp_path, port=port, method=FIT, workers=ray_workers(cluster.address),
                            destinations=_to(orthanc))
        node = Node(load_settings(cfg))
        node.start()
        try:
            _push(list(study.pet_files) + list(study.mr_files), node.port)
            # Mid-fit: the job runs on a Ray worker that has reported an epoch.
            wait_for(lambda: [j for j in node.store.jobs() if j.state is JobState.RUNNING and j.progress > 0],
                     240, "the job fitting on the cluster")
            job = node.store.jobs()[0]
            first = node.worker.executor.attempts(job.id)
            assert len(first) == 1 and "Ray node" in first[0], first
            pid = int(first[0].split()[1])
            os.kill(pid, signal.SIGKILL)  # the worker process dies in the middle of the fit
            wait_for(lambda: node.store.job(job.id).state in (JobState.DONE, JobState.FAILED), 300,
                     "the job finished after its worker was killed")
            done = node.store.job(job.id)
            assert done.state is JobState.DONE, done.reason
            attempts = node.worker.executor.attempts(job.id)
            assert len(attempts) == 2 and attempts[0] == first[0] and f"pid {pid} " not in attempts[1], attempts
            _expect_one_set(orthanc, study)
            assert len(node.store.jobs()) == 1 and done.progress == 1.0
        finally:
            node.stop()


@pytest.mark.network
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_out_of_memory_on_a_ray_worker_takes_the_on_oom_path(tmp_path, cluster, study):
    # [workers] memory_limit_mb = 1 makes the fit on the Ray worker raise DipOutOfMemoryError for
    # real (as in tests/node/test_oom.py). It must come back to the node as that error, so that
    # on_oom applies as with the local executor, and the connection to the cluster survives it.
    port = free_port()
    cfg = node_settings(tmp_path, port=port, method=FIT, destinations=[],
                        workers=ray_workers(cluster.address, memory_limit_mb=1, on_oom="gaussian"))
    node = Node(load_settings(cfg))
    node.start()
    try:
        _push(list(study.pet_files) + list(study.mr_files), node.port)
        wait_for(lambda: [j for j in node.store.jobs() if j.state in (JobState.DONE, JobState.FAILED)],
                 240, "the job ended")
        job = node.store.jobs()[0]
        assert job.state is JobState.DONE, job.reason
        assert job.method is Method.GAUSSIAN
        assert "out of memory on cpu" in job.reason and "on_oom = gaussian" in job.reason, job.reason
        assert "no destinations configured" in job.reason  # delivery's note follows, not instead
        assert node.worker.executor.connected, node.worker.executor.reason
    finally:
        node.stop()


@pytest.mark.network
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_node_killed_while_its_job_runs_resubmits_on_restart(tmp_path, cluster, study):
    with OrthancPeer(tmp_path / "orthanc") as orthanc:
        port = free_port()
        cfg = node_settings(tmp_path, port=port, method=FIT, workers=ray_workers(cluster.address),
                            destinations=_to(orthanc))
        db, log = tmp_path / "dipnode.sqlite", tmp_path / "node.log"
        node = NodeProcess(cfg, port, log)
        try:
            _push(list(study.pet_files) + list(study.mr_files), port)
            wait_for(lambda: [j for j in _jobs(db) if j.state is JobState.RUNNING and j.progress > 0], 240,
                     "the job fitting on the cluster")
            running = re.findall(r"job (\d+) running on pid (\d+) ", log.read_text())
            assert running, log.read_text()[-3000:]
            worker_pid = int(running[-1][1])
            node.kill()  # SIGKILL: the node and (its pipe closing) its Ray driver go
            # Ray ends the tasks of a driver that is gone: the fit does not run on unowned.
            wait_for(lambda: not _alive(worker_pid), 60, f"Ray ending the orphaned task's worker {worker_pid}")
            assert [j.state for j in _jobs(db)] == [JobState.RUNNING]
            node = NodeProcess(cfg, port, log)  # the restart re-queues and submits it again
            wait_for(lambda: [j.state for j in _jobs(db)] in ([JobState.DONE], [JobState.FAILED]), 300,
                     "the resubmitted job finished")
            assert [j.state for j in _jobs(db)] == [JobState.DONE], _jobs(db)[0].reason
            assert _jobs(db)[0].attempts == 2  # claimed before the kill and after the restart
            _expect_one_set(orthanc, study)
        finally:
            node.stop()


@pytest.mark.network
@pytest.mark.timeout(180)
@pytest.mark.parametrize("policy", ["fail", "wait"])
def test_cluster_unreachable_fails_or_waits_and_the_node_keeps_receiving(tmp_path, policy):
    dead = f"{LOOPBACK}:{free_port()}"  # nothing listens there
    port = free_port()
    cfg = node_settings(tmp_path, port=port, method={"name": "gaussian"},
                        workers=ray_workers(dead, ray_unreachable=policy, ray_connect_timeout_s=2.0))
    node = Node(load_settings(cfg))
    node.start()
    try:
        _push(tiny_pet_files(tmp_path / "a", n=3), node.port)
        wait_for(lambda: node.store.jobs() and node.store.jobs()[0].state is not JobState.WAITING_FOR_MR, 60,
                 "the job matched")
        if policy == "fail":
            wait_for(lambda: node.store.jobs()[0].state is JobState.FAILED, 60, "the job failed")
            reason = node.store.jobs()[0].reason or ""
            assert f"Ray cluster at {dead} unavailable: no answer from the Ray head at {dead}" in reason, reason
        else:
            time.sleep(6)  # three connection attempts at least: the job waits, never claimed
            job = node.store.jobs()[0]
            assert job.state is JobState.QUEUED and job.attempts == 0, job
            assert node.worker.executor.free_slots() == 0 and "no answer from the Ray head" in node.worker.executor.reason
        # Receiving never depends on the cluster.
        assert run_echoscu(node.port, called="DIPNODE").returncode == 0
        _push(tiny_pet_files(tmp_path / "b", n=3), node.port)
        wait_for(lambda: len(node.store.jobs()) == 2, 60, "the second series' job")
    finally:
        node.stop()


@pytest.mark.network
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_cluster_lost_mid_job_waits_then_runs_when_it_is_back(tmp_path, cluster, study):
    # Last of the module's cluster tests: it kills the cluster and starts a new one.
    with OrthancPeer(tmp_path / "orthanc") as orthanc:
        port = free_port()
        cfg = node_settings(tmp_path, port=port, method=FIT, workers=ray_workers(cluster.address, ray_unreachable="wait",
                                                                                 ray_connect_timeout_s=5.0),
                            destinations=_to(orthanc))
        node = Node(load_settings(cfg))
        node.start()
        try:
            _push(list(study.pet_files) + list(study.mr_files), node.port)
            wait_for(lambda: [j for j in node.store.jobs() if j.state is JobState.RUNNING and j.progress > 0],
                     240, "the job fitting on the cluster")
            job = node.store.jobs()[0]
            for ray_node in cluster.nodes:  # the whole cluster goes, head first
                ray_node.kill()
            wait_for(lambda: node.store.job(job.id).state is JobState.QUEUED, 60, "the job back in the queue")
            # Which of Ray's paths notices first varies with timing: the head's port probe, the
            # driver ending, or a call to the progress actor failing (ActorUnavailableError).
            reason = node.worker.executor.reason
            assert ("stopped answering" in reason or "driver process ended" in reason
                    or f"the Ray cluster at {cluster.address} failed" in reason), reason
            # The node keeps receiving while the cluster is away.
            assert run_echoscu(node.port, called="DIPNODE").returncode == 0
            _push(tiny_pet_files(tmp_path / "meanwhile", n=3), node.port)
            time.sleep(3)
            assert node.store.job(job.id).state is JobState.QUEUED and node.worker.executor.free_slots() == 0
            cluster.stop()  # what the kill left, then a new cluster on the same address
            cluster.start_head(cpus=1, gpus=0)
            cluster.add_worker(cpus=1, gpus=1)
            cluster.wait_for(nodes=2, gpus=1)
            wait_for(lambda: node.store.job(job.id).state in (JobState.DONE, JobState.FAILED), 300,
                     "the job finished on the new cluster")
            assert node.store.job(job.id).state is JobState.DONE, node.store.job(job.id).reason
            assert node.store.job(job.id).attempts == 2
            _expect_one_set(orthanc, study)
        finally:
            node.stop()


def test_ray_settings_are_checked(tmp_path):
    base = {"node": {"allowed_calling_aets": ["PACS"]}}
    with pytest.raises(SettingsError, match=r"workers.ray_address: expected the Ray head's 'host:port' with "
                                            r"executor = \"ray\", got None"):
        load_settings(write_settings(tmp_path / "a.toml", {**base, "workers": {"executor": "ray"}}))
    with pytest.raises(SettingsError, match=r"workers.ray_address: .*'host:port', got 'ray-head'"):
        load_settings(write_settings(tmp_path / "b.toml", {**base, "workers": {"executor": "ray",
                                                                                "ray_address": "ray-head"}}))
    with pytest.raises(SettingsError, match=r"workers.gpu_resource: expected a Ray resource name"):
        load_settings(write_settings(tmp_path / "c.toml", {**base, "workers": {"gpu_resource": "CPU"}}))
    with pytest.raises(SettingsError, match=r"workers.ray_unreachable"):
        load_settings(write_settings(tmp_path / "d.toml", {**base, "workers": {"ray_unreachable": "retry"}}))
    ok = load_settings(write_settings(tmp_path / "e.toml", {**base, "workers": {
        "executor": "ray", "ray_address": "ray-head:6379", "gpu_resource": "a100", "gpus_per_job": 0.5}}))
    assert (ok.workers.executor, ok.workers.gpus_per_job, ok.workers.ray_retries) == ("ray", 0.5, 2)
    assert load_settings(write_settings(tmp_path / "f.toml", base)).workers.executor == "local"
