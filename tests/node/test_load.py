"""Load on the running node: 8 concurrent associations x 112-slice PET series while a job runs
(tests/harness/load.py is the machinery; bench/load.py runs it at 64x64 or 128x128)."""
from __future__ import annotations

from pathlib import Path

import pytest

from harness import load

pytestmark = [pytest.mark.network, pytest.mark.slow]


@pytest.mark.timeout(120)
def test_eight_associations_of_112_slices_while_a_job_runs_lose_nothing(tmp_path: Path) -> None:
    # DCMTK storescu as the eight scanners (one process, one association each).
    r = load.run_load(tmp_path / "load", associations=8, slices=112, size=16, job_epochs=400,
                      sender="storescu", say=lambda _s: None)
    assert r.problems == (), "\n".join(r.problems[:20])
    assert r.sent == 8 * 112
    assert (r.acked, r.refused, r.lost) == (8 * 112, 0, 0)
    assert r.on_disk == r.indexed == 8 * 112
    assert r.max_overlap == 8  # the eight associations were open at the same time
    assert r.job_running_throughout
    # A coarse guard against runaway growth only: at 16x16 the fit that starts with the job
    # (~125 MiB) dominates; receiving itself adds ~2-5 MiB (bench/RELIABILITY.md, no-job runs).
    assert r.rss_peak_during_kib - r.rss_before_kib < 300 * 1024
