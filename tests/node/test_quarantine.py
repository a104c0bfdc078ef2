"""Start-up never dies on what it finds in the spool: files it cannot index are moved to a
quarantine folder, logged and counted (``dipnode jobs`` says so), and the node serves."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from craft import file_bytes, pet_dataset, write_file
from nodeproc import NodeProcess, node_settings
from peers import free_port, run_storescu, storescu_statuses, tiny_pet_files

pytestmark = [pytest.mark.network, pytest.mark.slow]


def _plant(spool: Path) -> tuple[Path, list[Path]]:
    """One valid orphan (a crash between rename and index) and four files no index can take."""
    inst = spool / "instances"
    good_ds = pet_dataset()
    good = write_file(inst / good_ds.StudyInstanceUID / good_ds.SeriesInstanceUID
                      / f"{good_ds.SOPInstanceUID}.dcm", file_bytes(good_ds))
    bad = []
    no_modality = pet_dataset(Modality=None)
    bad.append(write_file(inst / no_modality.StudyInstanceUID / no_modality.SeriesInstanceUID
                          / f"{no_modality.SOPInstanceUID}.dcm", file_bytes(no_modality)))
    bad.append(write_file(inst / "1.2.3" / "1.2.3.4" / "1.2.3.4.5.dcm", b"not DICOM at all" * 10))
    trunc = pet_dataset()
    bad.append(write_file(inst / trunc.StudyInstanceUID / trunc.SeriesInstanceUID
                          / f"{trunc.SOPInstanceUID}.dcm", file_bytes(trunc)[:200]))
    # A second copy of the good instance under another series folder: its UID is taken.
    bad.append(write_file(inst / good_ds.StudyInstanceUID / "1.2.3.9"
                          / f"{good_ds.SOPInstanceUID}.dcm", file_bytes(good_ds)))
    return good, bad


@pytest.mark.timeout(180)
def test_start_up_quarantines_what_it_cannot_index_and_keeps_serving(tmp_path: Path) -> None:
    port = free_port()
    cfg = node_settings(tmp_path, port=port, destinations=[])
    spool = tmp_path / "spool"
    good, bad = _plant(spool)
    log = tmp_path / "node.log"
    node = NodeProcess(cfg, port, log)  # before the fix: serve exited at start-up
    try:
        files = tiny_pet_files(tmp_path / "src", n=2)
        res = run_storescu(files, port, aet="STORESCU", called="DIPNODE")
        assert res.returncode == 0 and storescu_statuses(res) == [0, 0], res.stdout + res.stderr
    finally:
        assert node.stop() == 0
    quarantine = spool / "quarantine"
    moved = sorted(p for p in quarantine.rglob("*") if p.is_file())
    assert len(moved) == len(bad) and not any(p.exists() for p in bad)
    assert good.exists()
    text = log.read_text()
    assert text.count("quarantined") >= len(bad)
    jobs = subprocess.run([sys.executable, "-m", "dipnode.node.cli.main", "jobs", "--config", str(cfg)],
                          capture_output=True, text=True, timeout=60)
    assert jobs.returncode == 0, jobs.stderr
    assert f"quarantined: {len(bad)} files in {quarantine}" in jobs.stdout
    # Restartable on the same spool: nothing left to trip over, the same count shown.
    node = NodeProcess(cfg, port, log)
    assert node.stop() == 0
    assert len([p for p in quarantine.rglob("*") if p.is_file()]) == len(bad)
