"""Retention on a real full disk: `dipnode serve` with its spool on a 6 MB tmpfs (mounted in
a user and mount namespace of its own, so no privileges are needed) receives ten studies, far
more than the disk holds. Without retention the disk mark is reached and stores are refused
(0xA700); with it, the emergency sweep deletes the oldest finished inputs and results first and
every store is accepted."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dipnode.dicom_io.scu import Destination, echo
from dipnode.node.jobs.rows import JobState
from dipnode.node.jobs.store import Store
from dipnode.sim.crafted import pet_dataset
from nodeproc import NODE_AET, wait_for, write_settings
from peers import LOOPBACK, free_port, run_storescu, storescu_statuses

pytestmark = [pytest.mark.network, pytest.mark.slow, pytest.mark.timeout(600)]

DISK_MB, MIN_FREE_MB, EMERGENCY_MB = 6, 1, 2
N_STUDIES = 10


def write_study(folder: Path, k: int, slices: int = 16, side: int = 128) -> list[Path]:
    """A PET series of about 0.5 MB: ``slices`` slices of side x side, 16 bits."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    rng = np.random.default_rng(k)
    paths = []
    for i in range(slices):
        ds = pet_dataset(StudyInstanceUID=study, SeriesInstanceUID=series, FrameOfReferenceUID=frame,
                         PatientID=f"DISK-{k:03d}", InstanceNumber=i + 1, NumberOfSlices=slices,
                         ImagePositionPatient=[0.0, 0.0, 2.0 * i], Rows=side, Columns=side,
                         SeriesDescription="PET disk test",
                         PixelData=rng.integers(100, 2000, side * side, dtype=np.uint16).tobytes())
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


class SmallDiskNode:
    """`dipnode serve` whose spool is a DISK_MB tmpfs in its own mount namespace."""

    def __init__(self, workdir: Path, *, retention: bool) -> None:
        self.port = free_port()
        self.spool = workdir / "spool"
        self.spool.mkdir(parents=True)
        self.db = workdir / "dipnode.sqlite"
        cfg = write_settings(workdir / "dipnode.toml", {
            "node": {"ae_title": NODE_AET, "host": LOOPBACK, "port": self.port, "allowed_calling_aets": ["STORESCU", "ECHOSCU"]},
            "storage": {"spool_dir": self.spool, "database": self.db, "min_free_mb": MIN_FREE_MB},
            "series": {"stable_age_s": 1.0, "check_interval_s": 0.2},
            "method": {"name": "gaussian", "device": "cpu"},
            "retention": {"enabled": retention, "emergency_free_mb": EMERGENCY_MB},
        })
        unshare = shutil.which("unshare")
        assert unshare, "unshare (util-linux) is required"
        script = (f"mount -t tmpfs -o size={DISK_MB}m tmpfs {self.spool} && "
                  f"exec {sys.executable} -m dipnode.node.cli.main -v serve --config {cfg}")
        self.log = workdir / "node.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([unshare, "--user", "--map-root-user", "--mount", "sh", "-c", script],
                                         stdout=log, stderr=subprocess.STDOUT,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + 90
        while not echo(Destination(NODE_AET, LOOPBACK, self.port), calling_ae="ECHOSCU", timeout_s=5.0).ok:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            assert time.monotonic() < deadline, "node not answering"
            time.sleep(0.2)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def jobs(self) -> list:
        with Store.open_readonly(self.db) as s:
            return s.jobs()


def push_all(node: SmallDiskNode, studies: list[list[Path]]) -> list[list[int]]:
    """Push the studies one after the other, each once the previous one's job has finished."""
    statuses = []
    for k, files in enumerate(studies):
        st = storescu_statuses(run_storescu(files, node.port, called=NODE_AET))
        statuses.append(st)
        if st and all(s == 0 for s in st):
            wait_for(lambda: len(node.jobs()) > k and all(j.state.terminal for j in node.jobs()), 120,
                     f"job of study {k} finished")
    return statuses


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> list[list[Path]]:
    root = tmp_path_factory.mktemp("disk-studies")
    return [write_study(root / f"s{k}", k) for k in range(N_STUDIES)]


def test_without_retention_the_disk_mark_is_reached(studies, tmp_path: Path) -> None:
    node = SmallDiskNode(tmp_path, retention=False)
    try:
        statuses = push_all(node, studies)
    finally:
        node.stop()
    flat = [s for st in statuses for s in st]
    assert 0xA700 in flat, statuses  # out of resources: the 6 MB disk is full
    assert flat.index(0xA700) > 16  # the first studies fitted


def test_emergency_sweep_keeps_stores_accepted_on_a_full_disk(studies, tmp_path: Path) -> None:
    node = SmallDiskNode(tmp_path, retention=True)
    try:
        statuses = push_all(node, studies)
        jobs = node.jobs()
    finally:
        node.stop()
    assert statuses == [[0] * len(s) for s in studies]  # every instance of every study stored
    assert [j.state for j in jobs] == [JobState.DONE] * N_STUDIES
    log = node.log.read_text()
    assert "retention sweep (emergency)" in log
    with Store.open_readonly(node.db) as s:
        purged = [x for x in s.all_series() if x.purged_at is not None]
        kept = [x for x in s.all_series() if x.purged_at is None]
        # The oldest went first; the latest study is still there, whole.
        assert purged and kept and max(p.last_received_at for p in purged) <= min(k.last_received_at for k in kept)
        assert kept[-1].instance_count == 16 and len(s.series_instances(kept[-1].series_uid)) == 16
        assert all(s.series_instances(p.series_uid) == [] for p in purged)
        assert any(j.outputs_purged_at is not None for j in s.jobs())
