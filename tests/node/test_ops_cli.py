"""`dipnode purge` (--dry-run, a real sweep, refused while the node runs) and `dipnode health`
with the node's /healthz, as a PACS administrator runs them."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dipnode.models.params import DipParams
from dipnode.node.jobs.rows import JobState
from dipnode.node.ingest.lock import WriterLock
from nodeproc import NodeProcess, node_settings
from peers import free_port
from test_retention import Site


def dipnode(*args: str, env: dict | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dipnode.node.cli.main", *args], capture_output=True, text=True,
                          timeout=120, env=env)


def config_for(site: Site, path: Path) -> Path:
    path.write_text(f'[node]\nallowed_calling_aets = ["*"]\n[storage]\nspool_dir = "{site.spool.root}"\n'
                    f'database = "{site.store.path}"\nmin_free_mb = 0\n')
    return path


def test_purge_dry_run_then_purge(tmp_path: Path) -> None:
    site = Site(tmp_path)
    old_pet = site.series("PT")  # received and finished in 2023: long due
    site.job(old_pet)
    waiting = site.series("PT", study="1.5", patient="PW")
    site.store.create_job(waiting, method="sdip", params=DipParams(), now=0.0, state=JobState.WAITING_FOR_MR)
    cfg = config_for(site, tmp_path / "dipnode.toml")
    r = dipnode("purge", "--dry-run", "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    assert old_pet in r.stdout and waiting not in r.stdout
    assert "would delete 1 series (3 instances)" in r.stdout
    assert len(site.files(old_pet)) == 3  # nothing deleted
    # While a node holds the spool: refused, in one line.
    lock = WriterLock.for_node(site.spool.root, site.store.path)
    try:
        r = dipnode("purge", "--config", str(cfg))
    finally:
        lock.release()
    assert r.returncode == 1 and r.stderr.startswith("dipnode purge: error:") and "--dry-run" in r.stderr
    assert len(site.files(old_pet)) == 3
    r = dipnode("purge", "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("deleted 1 series (3 instances)")
    assert site.files(old_pet) == [] and len(site.files(waiting)) == 3
    site.store.close()


@pytest.mark.network
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_health_checks_healthz_too(tmp_path: Path, monkeypatch) -> None:
    # conftest gives every node HTTP port 0 through the environment; this one has a real port.
    monkeypatch.delenv("DIPNODE_HTTP__PORT")
    port, http_port = free_port(), free_port()
    cfg = node_settings(tmp_path, port=port, http={"port": http_port})
    node = NodeProcess(cfg, port, tmp_path / "node.log")
    try:
        r = dipnode("health", "--config", str(cfg))
        assert r.returncode == 0, r.stderr
        assert r.stdout.splitlines()[-1] == f"http://127.0.0.1:{http_port}/healthz: ok"
    finally:
        node.stop()
    # A node whose spool is below its mark answers C-ECHO but is not healthy.
    (tmp_path / "full").mkdir()
    cfg2 = node_settings(tmp_path / "full", port=port, http={"port": http_port},
                         storage={"min_free_mb": 1 << 40})
    node = NodeProcess(cfg2, port, tmp_path / "node2.log")
    try:
        r = dipnode("health", "--config", str(cfg2))
    finally:
        node.stop()
    assert r.returncode == 1
    assert r.stderr.startswith(f"dipnode health: error: http://127.0.0.1:{http_port}/healthz: 503: spool: ")
    assert "below the mark" in r.stderr
