"""Studies per hour on a Ray cluster with 1 and 2 GPU workers, and the node's own ceiling.

    .venv/bin/python bench/scale.py --studies 4 --preset tiny --out /tmp/scale

Part 1, the cluster: a real Ray cluster on this machine (tests/harness/ray_cluster.py: a head
with no job resources and K worker nodes of 1 CPU and 1 stand-in "GPU" each); the 4 mm brain
phantom's PET and MR go to the RayExecutor as the node sends them (node/jobs/compute.py:
alignment + SDIP fit + blend) ``--studies`` times, K at a time, after one warm-up job per
worker (its first job imports torch). Studies per hour = studies / wall time.

Part 2, the node without the GPU work: an in-process node with the local executor and the
Gaussian method (the computation takes milliseconds), ``--node-studies`` copies of the
phantom PET (new UIDs) pushed with DCMTK storescu, results sent to a DCMTK storescp: the
time per study of everything the node itself does (receive, fsync, SQLite, completion,
reading the series, encoding and writing DICOM, sending).

Prints one JSON object (also ``OUT/result.json``) with the machine's load average before,
during and after, then a human summary. Figures and the capacity model: bench/SCALE.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pydicom

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from harness.ray_cluster import RayCluster  # noqa: E402
from nodeproc import node_settings  # noqa: E402
from peers import LOOPBACK, StorescpPeer, free_port, run_storescu  # noqa: E402

from dipnode.dicom_io.uids import derive_uid  # noqa: E402
from dipnode.models.params import PRESETS, Method  # noqa: E402
from dipnode.node.jobs.compute import ComputeRequest  # noqa: E402
from dipnode.node.jobs.ray_bridge import BridgeConfig  # noqa: E402
from dipnode.node.jobs.ray_executor import RayExecutor  # noqa: E402
from dipnode.node.jobs.rows import JobState  # noqa: E402
from dipnode.node.jobs.pipeline import load_single_series  # noqa: E402
from dipnode.node.server import Node  # noqa: E402
from dipnode.node.settings import load_settings  # noqa: E402
from dipnode.sim.study import write_phantom_study  # noqa: E402

GPU = "dipnode_gpu"


class LoadSampler:
    """The 1-minute load average every few seconds while a part runs (the machine is shared)."""

    def __init__(self, every_s: float = 5.0) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every_s,), daemon=True)

    def _run(self, every_s: float) -> None:
        while not self._stop.is_set():
            self.samples.append(os.getloadavg()[0])
            self._stop.wait(every_s)

    def __enter__(self) -> "LoadSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict[str, float]:
        s = self.samples or [float("nan")]
        return {"min": min(s), "mean": round(sum(s) / len(s), 2), "max": max(s)}


def cluster_part(work: Path, request: ComputeRequest, workers: int, studies: int) -> dict[str, object]:
    cluster = RayCluster(work / f"ray-{workers}", gpu_resource=GPU)
    t_start = time.monotonic()
    try:
        cluster.start_head(cpus=1, gpus=0)
        for _ in range(workers):
            cluster.add_worker(cpus=1, gpus=1)
        cluster.wait_for(nodes=workers + 1, gpus=workers)
        up_s = time.monotonic() - t_start
        ex = RayExecutor(BridgeConfig(cluster.address, LOOPBACK, 1.0, GPU, 1.0, 2, 30.0), max_concurrent=workers)
        try:
            with ThreadPoolExecutor(workers) as pool:
                t = time.monotonic()  # warm-up: one job per worker process (torch import, first fit)
                list(pool.map(lambda i: ex.compute(10_000 + i, request), range(workers)))
                warm_s = time.monotonic() - t
                with LoadSampler() as load:
                    t = time.monotonic()
                    results = list(pool.map(lambda i: ex.compute(i, request), range(studies)))
                    wall = time.monotonic() - t
        finally:
            ex.shutdown()
    finally:
        cluster.stop()
    per_study = [r.seconds for r in results]
    return {"workers": workers, "studies": studies, "wall_s": round(wall, 1),
            "studies_per_hour": round(studies / wall * 3600, 1),
            "per_study_worker_s": [round(s, 1) for s in per_study],
            "fit_s": [round(r.denoised.timings.get("fit", float("nan")), 1) for r in results],
            "distinct_worker_processes": len({r.worker for r in results}),
            "cluster_start_s": round(up_s, 1), "warm_up_s": round(warm_s, 1), "load": load.summary()}


def copies(pet_files: Sequence[Path], out: Path, n: int) -> list[list[Path]]:
    """``n`` copies of a PET series, each a new patient, study, series and instances."""
    series: list[list[Path]] = []
    for i in range(n):
        folder = out / f"copy{i:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for f in pet_files:
            ds = pydicom.dcmread(f)
            for attr in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
                setattr(ds, attr, derive_uid("bench-scale", str(i), getattr(ds, attr)))
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.PatientID = f"SCALE{i:04d}"
            path = folder / f.name
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
        series.append(paths)
    return series


def node_part(work: Path, pet_files: Sequence[Path], studies: int) -> dict[str, object]:
    batches = copies(pet_files, work / "copies", studies)
    with StorescpPeer(work / "pacs") as pacs:
        port = free_port()
        (work / "node").mkdir(parents=True, exist_ok=True)
        cfg = node_settings(work / "node", port=port, method={"name": "gaussian"},
                            series={"stable_age_s": 2.0, "check_interval_s": 0.2},
                            destinations=[{"ae_title": pacs.aet, "host": LOOPBACK, "port": pacs.port}])
        node = Node(load_settings(cfg))
        node.start()
        try:
            with LoadSampler() as load:
                t0 = time.monotonic()
                for files in batches:
                    r = run_storescu(files, node.port, aet="STORESCU", called="DIPNODE")
                    if r.returncode != 0:
                        raise RuntimeError(r.stderr)
                received = time.monotonic() - t0
                while True:
                    jobs = node.store.jobs()
                    if len(jobs) == studies and all(j.state is JobState.DONE for j in jobs):
                        break
                    if any(j.state is JobState.FAILED for j in jobs):
                        raise RuntimeError([j.reason for j in jobs if j.reason])
                    time.sleep(0.1)
                wall = time.monotonic() - t0
        finally:
            node.stop()
        sent = len(pacs.files())
    n_inst = sum(len(b) for b in batches)
    return {"studies": studies, "instances": n_inst, "sent_instances": sent,
            "receive_s": round(received, 1), "instances_per_s_received": round(n_inst / received, 1),
            "wall_s": round(wall, 1), "node_s_per_study": round(wall / studies, 2),
            "studies_per_hour_node_only": round(studies / wall * 3600, 1), "load": load.summary()}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--studies", type=int, default=4, help="timed jobs per cluster size")
    p.add_argument("--workers", type=int, nargs="*", default=[1, 2], help="cluster sizes; none: skip part 1")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--epochs", type=int, default=None, help="override the preset's epochs")
    p.add_argument("--device", default="cpu", help="where the workers fit (cpu, cuda): on a GPU host")
    p.add_argument("--node-studies", type=int, default=10, help="studies for the node-only part; 0 skips it")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    load_before = os.getloadavg()
    study = write_phantom_study(a.out / "study", voxel_mm=4.0, dose_fraction=0.1)
    pet, mr = load_single_series(study.pet_files, "PT"), load_single_series(study.mr_files, "MR")
    params = PRESETS[a.preset].replace(device=a.device)
    if a.epochs:
        params = params.replace(epochs=a.epochs, sample_from=a.epochs // 2)
    request = ComputeRequest(pet=pet.values, pet_affine=pet.geometry.affine,
                             pet_frame_of_reference=pet.frame_of_reference_uid, spacing=pet.geometry.spacing,
                             method=Method.SDIP, params=params, mr=mr.values, mr_affine=mr.geometry.affine,
                             mr_frame_of_reference=mr.frame_of_reference_uid)
    result: dict[str, object] = {
        "command": " ".join(["bench/scale.py", *(argv if argv is not None else sys.argv[1:])]),
        "cpus": os.cpu_count(), "load_before": [round(x, 2) for x in load_before],
        "preset": a.preset, "epochs": params.epochs, "pet_shape": list(pet.values.shape),
        "mr_shape": list(mr.values.shape), "cluster": [], "node": None}
    for k in a.workers:
        result["cluster"].append(cluster_part(a.out, request, k, a.studies))  # type: ignore[union-attr]
        print(json.dumps(result["cluster"][-1]), flush=True)  # type: ignore[index]
    if a.node_studies:
        result["node"] = node_part(a.out, study.pet_files, a.node_studies)
    result["load_after"] = [round(x, 2) for x in os.getloadavg()]
    (a.out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    for c in result["cluster"]:  # type: ignore[union-attr]
        print(f"{c['workers']} worker(s): {c['studies_per_hour']} studies/h ({c['studies']} in {c['wall_s']} s; "
              f"per study on a worker {c['per_study_worker_s']} s; load {c['load']})")
    if result["node"]:
        n = result["node"]
        print(f"node alone (Gaussian): {n['node_s_per_study']} s per study, {n['studies_per_hour_node_only']} "
              f"studies/h; received {n['instances_per_s_received']} instances/s; load {n['load']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
