"""A retention sweep killed (SIGKILL) at any point leaves nothing half-done: every series is
whole (files and rows) or marked purged, and the next start finishes the marked ones."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dipnode.node.jobs.store import Store
from dipnode.node.ops.retention import DAY_S, Policy, Retention
from test_retention import T0, Site

HERE = Path(__file__).resolve().parent.parent


def check_whole_or_marked(site: Site, uids: list[str]) -> dict[str, str]:
    """Each series: "whole" (kept: every indexed file there, 3 of them) or "marked" (purged_at
    set: counts as deleted). Anything else is a half-done sweep."""
    out = {}
    for uid in uids:
        s = site.store.series(uid)
        if s is None:
            out[uid] = "gone"
            continue
        rows = site.store.series_instances(uid)
        if s.purged_at is None:
            assert len(rows) == 3 and all(p.exists() for p in rows) and len(site.files(uid)) == 3, uid
            out[uid] = "whole"
        else:
            out[uid] = "marked"
    return out


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("point", ["file:0", "file:1", "file:4", "drop:0", "drop:1"])
def test_kill_mid_sweep_leaves_nothing_half_done(tmp_path: Path, point: str) -> None:
    site = Site(tmp_path)
    uids = []
    for k in range(3):
        uid = site.series("PT", study=f"3.{k}", patient=f"K{k}", at=T0 + k)
        site.job(uid, at=T0 + k)
        uids.append(uid)
    site.store.close()
    env = dict(os.environ, PYTHONPATH=str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    child = subprocess.Popen(
        [sys.executable, "-m", "harness.retention_child", str(tmp_path / "db.sqlite"),
         str(site.spool.root), str(T0 + 10 * DAY_S), point],
        stdout=subprocess.PIPE, text=True, env=env, cwd=HERE)
    try:
        assert child.stdout.readline().strip() == "paused"
        child.send_signal(signal.SIGKILL)  # mid-sweep: between two of its steps
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    site.store = Store.open(tmp_path / "db.sqlite")
    assert site.store.integrity_check() == "ok"
    states = check_whole_or_marked(site, uids)
    assert "marked" in states.values(), states  # it was killed in the middle of a series
    # The next start finishes what the killed sweep began, before anything else looks at it.
    assert Retention(site.store, site.spool.root, Policy()).finish_interrupted() >= 1
    for uid, state in states.items():
        if state == "whole":
            assert len(site.files(uid)) == 3 and len(site.store.series_instances(uid)) == 3
        else:
            assert site.files(uid) == [] and site.store.series_instances(uid) == []
    site.store.close()
