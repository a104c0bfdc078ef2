"""`dipnode serve` as a real process, for tests and the bench harness: its settings file, start,
readiness, stop or kill, and a read-only look at its database.

    from nodeproc import NodeProcess, node_settings, wait_for, write_settings

- ``write_settings(path, sections, destinations=(), sources=())``: the one TOML writer.
- ``node_settings(workdir, *, port, destinations=(), method=None, sources=(), base=TEST_BASE,
  **sections)``: a settings file for a node on loopback; ``base`` is the profile (TEST_BASE:
  quick completion, tiny preset, a few named callers; the soak has its own), ``sections``
  override single keys.
- ``NodeProcess(config, port, log_path)``: started and polled ready by a real C-ECHO; ``.stop()`` (SIGTERM, returns the exit status), ``.kill()`` (SIGKILL: a crash),
  ``.pid``, ``.ready_s``, ``.peak_rss_kib()``.
- ``job_states(database)``: the state of every job, read through a read-only Store (empty
  while the database does not exist yet or cannot be read).
- ``wait_for(predicate, timeout_s, what)``: poll until truthy.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dipnode.dicom_io.scu import Destination, echo
from peers import LOOPBACK, free_port

NODE_AET = "DIPNODE"

#: The tests' node: loopback, quick completion, the tiny preset on the CPU, named callers.
TEST_BASE: dict[str, dict[str, Any]] = {
    "node": {"ae_title": NODE_AET, "host": LOOPBACK, "allowed_calling_aets": ["STORESCU", "ECHOSCU", NODE_AET]},
    "storage": {"min_free_mb": 0},
    "series": {"stable_age_s": 3.0, "check_interval_s": 0.2},
    # mr_grace_s 0: these studies have one MR series; exam tests set their own grace.
    "matching": {"mr_wait_s": 60.0, "fallback": "fail", "mr_grace_s": 0.0},
    "method": {"name": "sdip", "preset": "tiny", "device": "cpu"},
    "sender": {"retries": 20, "backoff_s": 0.5, "backoff_max_s": 2.0, "timeout_s": 10.0},
}


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, Path):
        return json.dumps(str(v))
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return json.dumps(str(v))  # a JSON string is a valid TOML basic string


def write_settings(path: Path, sections: dict[str, dict[str, Any]],
                   destinations: Sequence[dict[str, Any]] = (), sources: Sequence[dict[str, Any]] = ()) -> Path:
    """Write ``sections`` ([name] tables) and the [[destinations]] / [[sources]] arrays as TOML."""
    lines: list[str] = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
        lines.append("")
    for table, rows in (("destinations", destinations), ("sources", sources)):
        for d in rows:
            lines.append(f"[[{table}]]")
            lines += [f"{k} = {toml_value(v)}" for k, v in d.items()]
            lines.append("")
    path.write_text("\n".join(lines))
    return path


def node_settings(workdir: Path, *, port: int, destinations: Sequence[dict[str, Any]] = (),
                  method: dict[str, Any] | None = None, sources: Sequence[dict[str, Any]] = (),
                  base: dict[str, dict[str, Any]] = TEST_BASE, **sections: dict[str, Any]) -> Path:
    """``workdir/dipnode.toml`` for a node on ``port`` with its spool and database in ``workdir``:
    the ``base`` profile, then ``method`` and ``sections`` key by key."""
    settings = {name: dict(values) for name, values in base.items()}
    settings.setdefault("node", {})["port"] = port
    settings.setdefault("storage", {}).update(spool_dir=str(workdir / "spool"),
                                              database=str(workdir / "dipnode.sqlite"))
    settings.setdefault("method", {}).update(method or {})
    for name, values in sections.items():
        settings.setdefault(name, {}).update(values)
    return write_settings(workdir / "dipnode.toml", settings, destinations, sources)


class NodeProcess:
    """`python -m dipnode.node.cli.main serve --config ...`, polled ready by a real C-ECHO."""

    def __init__(self, config: Path, port: int, log_path: Path, timeout_s: float = 90.0, *,
                 echo_aet: str = "ECHOSCU", verbosity: str = "-v") -> None:
        self.config, self.port = config, port
        self.started_s = time.monotonic()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TCP_NODELAY": "1"}
        with open(log_path, "ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dipnode.node.cli.main", verbosity, "serve", "--config", str(config)],
                stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dipnode serve exited with {self.proc.returncode}; see {log_path}")
            # pynetdicom's C-ECHO: bounded by its ACSE/DIMSE timeouts and never raises (DCMTK
            # echoscu's association timeout is 30 s, too long for a node busy with hostile peers).
            if echo(Destination(NODE_AET, LOOPBACK, port), calling_ae=echo_aet, timeout_s=5.0).ok:
                self.ready_s = time.monotonic() - self.started_s
                return
            time.sleep(0.1)  # polling interval while the process imports torch and binds
        self.kill()
        raise TimeoutError(f"dipnode serve not answering C-ECHO after {timeout_s} s; see {log_path}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def peak_rss_kib(self) -> int | None:
        """VmHWM (peak resident set) of the node process, from /proc; None once it exited."""
        return proc_status_kib(self.proc.pid, "VmHWM")

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM and wait (a clean stop); SIGKILL if it does not exit in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        return int(self.proc.returncode)

    def kill(self) -> None:
        """SIGKILL: a crash, nothing gets to clean up."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def proc_status_kib(pid: int, field_name: str = "VmRSS") -> int | None:
    """A memory field of /proc/<pid>/status in KiB (VmRSS, VmHWM); None once the process exited."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def job_states(database: Path) -> list[str]:
    """Every job's state (``"running"``, ...), read while the node runs; [] when unreadable."""
    import sqlite3

    from dipnode.node.jobs.rows import StoreError
    from dipnode.node.jobs.store import Store

    if not Path(database).exists():
        return []
    try:
        with Store.open_readonly(database, busy_timeout_s=2.0) as store:
            return [j.state.value for j in store.jobs()]
    except (sqlite3.Error, StoreError):
        return []


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.3):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")


__all__ = ["NODE_AET", "TEST_BASE", "NodeProcess", "free_port", "job_states", "node_settings",
           "proc_status_kib", "toml_value", "wait_for", "write_settings"]
