"""Two PET series of one study must not both come back as series 1001: the n-th job of a study
numbers its series from the configured ones plus n times their span (deterministic, stable
across restarts and re-sends of the same job)."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pydicom

from craft import received
from dipnode.node.server import Node
from dipnode.node.settings import Settings
from dipnode.node.jobs.rows import JobState
from dipnode.sim.dicom_study import new_study, write_pet_series


def _numbers(out: Path) -> set[int]:
    return {int(pydicom.dcmread(p, stop_before_pixels=True).SeriesNumber) for p in out.rglob("*.dcm")}


def test_two_pet_series_of_one_study_get_distinct_numbers(tmp_path: Path) -> None:
    settings = Settings(node={"port": 0, "allowed_calling_aets": ["*"]},
                        storage={"spool_dir": tmp_path / "spool", "database": tmp_path / "db.sqlite",
                                 "min_free_mb": 0},
                        series={"stable_age_s": 1.0},
                        method={"name": "gaussian", "preset": "tiny", "device": "cpu"})
    study = new_study("NUM-1", seed=2)
    vals = np.full((4, 8, 8), 1000.0)
    a = write_pet_series(vals, np.diag([2.0, 2.0, 2.0, 1.0]), tmp_path / "a", study=study, series_number=3)
    b = write_pet_series(vals, np.diag([2.0, 2.0, 2.0, 1.0]), tmp_path / "b", study=study, series_number=4,
                         description="PET Brain FDG late")
    node = Node(settings)
    try:
        for f in [*a, *b]:
            node.on_store(received(f.read_bytes()))
        deadline = time.monotonic() + 60
        while True:
            node.tick(time.time() + 10)
            jobs = node.store.jobs()
            if len(jobs) == 2 and all(j.state is JobState.DONE for j in jobs):
                break
            assert time.monotonic() < deadline, [(j.state, j.reason) for j in jobs]
            time.sleep(0.2)
        first, second = jobs
        assert _numbers(Path(first.output_dir)) == {1001}  # gaussian: the derived PET only
        assert _numbers(Path(second.output_dir)) == {1006}  # span of 1001..1005 is 5
    finally:
        node.stop()
