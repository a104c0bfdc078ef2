"""One writer per spool and database: a second `dipnode serve` refuses in one line, exits
non-zero and leaves the first node's running job alone (two real processes)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dipnode.node.jobs.rows import JobState
from dipnode.node.jobs.store import Store
from harness.soak import make_studies
from nodeproc import NodeProcess, node_settings, wait_for, write_settings
from peers import free_port, run_storescu

pytestmark = [pytest.mark.network, pytest.mark.slow]


def _serve(cfg: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dipnode.node.cli.main", "serve", "--config", str(cfg)],
                          capture_output=True, text=True, timeout=120)


def _job(db: Path):
    with Store.open(db) as store:
        jobs = store.jobs()
        return jobs[0] if jobs else None


@pytest.mark.timeout(300)
def test_second_serve_on_the_same_spool_or_database_refuses(tmp_path: Path) -> None:
    [study] = make_studies(tmp_path / "data", 1, slices=8, size=16)
    port = free_port()
    # A long fit so that the first node's job is RUNNING throughout.
    cfg = node_settings(tmp_path, port=port, method={"epochs": 2000},
                        destinations=[], series={"stable_age_s": 1.0, "check_interval_s": 0.2})
    db = tmp_path / "dipnode.sqlite"
    first = NodeProcess(cfg, port, tmp_path / "first.log")
    try:
        res = run_storescu([*study.pet_files, *study.mr_files], port, aet="STORESCU", called="DIPNODE")
        assert res.returncode == 0, res.stderr
        wait_for(lambda: (j := _job(db)) is not None and j.state is JobState.RUNNING, 120, "job running")
        before = _job(db)
        # The same settings (port taken too), then the same spool and database on another port.
        other_port = tmp_path / "other-port.toml"
        text = cfg.read_text().replace(f"port = {port}", f"port = {free_port()}")
        other_port.write_text(text)
        # Another database but the same spool, and the other way round.
        same_spool = write_settings(tmp_path / "same-spool.toml", {
            "node": {"host": "127.0.0.1", "port": free_port(), "allowed_calling_aets": ["*"]},
            "storage": {"spool_dir": str(tmp_path / "spool"), "database": str(tmp_path / "b.sqlite")}})
        same_db = write_settings(tmp_path / "same-db.toml", {
            "node": {"host": "127.0.0.1", "port": free_port(), "allowed_calling_aets": ["*"]},
            "storage": {"spool_dir": str(tmp_path / "spool-b"), "database": str(db)}})
        for second in (cfg, other_port, same_spool, same_db):
            out = _serve(second)
            assert out.returncode == 1, (second, out.stdout, out.stderr)
            lines = out.stderr.strip().splitlines()
            assert len(lines) == 1 and "already" in lines[0] and "pid" in lines[0], out.stderr
            assert "Traceback" not in out.stderr
        after = _job(db)
        # Untouched: still RUNNING, not re-queued (attempts unchanged), progress not reset.
        assert after.state is JobState.RUNNING and after.attempts == before.attempts
        assert after.progress >= before.progress
        assert not (tmp_path / "b.sqlite").exists() and not (tmp_path / "spool-b" / "instances").exists()
    finally:
        assert first.stop() == 0
    # Once the first has stopped, the lock is free again.
    again = NodeProcess(cfg, port, tmp_path / "again.log")
    assert again.stop() == 0
