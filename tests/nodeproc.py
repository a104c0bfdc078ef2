"""`dipnode serve` as a real process for tests: settings file, start, readiness, stop or kill."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from peers import free_port, run_echoscu

LOOPBACK = "127.0.0.1"


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return json.dumps(str(v))  # a JSON string is a valid TOML basic string


def write_settings(path: Path, sections: dict[str, dict[str, Any]],
                   destinations: list[dict[str, Any]] = (), sources: list[dict[str, Any]] = ()) -> Path:
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


def node_settings(workdir: Path, *, port: int, destinations: list[dict[str, Any]],
                  method: dict[str, Any] | None = None, sources: list[dict[str, Any]] = (),
                  **sections: dict[str, Any]) -> Path:
    """A settings file for a test node: loopback, quick completion, tiny preset."""
    base: dict[str, dict[str, Any]] = {
        "node": {"ae_title": "DIPNODE", "host": LOOPBACK, "port": port,
                 "allowed_calling_aets": ["STORESCU", "ECHOSCU", "DIPNODE"]},
        "storage": {"spool_dir": str(workdir / "spool"), "database": str(workdir / "dipnode.sqlite"),
                    "min_free_mb": 0},
        "series": {"stable_age_s": 3.0, "check_interval_s": 0.2},
        # mr_grace_s 0: these studies have one MR series; exam tests set their own grace.
        "matching": {"mr_wait_s": 60.0, "fallback": "fail", "mr_grace_s": 0.0},
        "method": {"name": "sdip", "preset": "tiny", "device": "cpu", **(method or {})},
        "sender": {"retries": 20, "backoff_s": 0.5, "backoff_max_s": 2.0, "timeout_s": 10.0},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return write_settings(workdir / "dipnode.toml", base, destinations, sources)


class NodeProcess:
    """`python -m dipnode.node.cli serve --config ...`, polled ready by a real C-ECHO."""

    def __init__(self, config: Path, port: int, log_path: Path, timeout_s: float = 60.0) -> None:
        self.config, self.port = config, port
        self._log = open(log_path, "ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dipnode.node.cli", "-v", "serve", "--config", str(config)],
            stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dipnode serve exited with {self.proc.returncode}; see {log_path}")
            if run_echoscu(port, aet="ECHOSCU", called="DIPNODE").returncode == 0:
                return
            time.sleep(0.2)
        self.kill()
        raise TimeoutError(f"dipnode serve not answering C-ECHO after {timeout_s} s; see {log_path}")

    def stop(self) -> int:
        """SIGTERM and wait: a clean stop."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL: a crash, nothing gets to clean up."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.3):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")


__all__ = ["NodeProcess", "node_settings", "wait_for", "free_port"]
