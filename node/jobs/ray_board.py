"""The Ray actor that a job's task reports its progress to and the node's Ray driver polls
(node/jobs/ray_bridge.py). Its own module, importing nothing heavy: the actor's worker
process imports only this, so it starts in a moment even where torch takes seconds."""
from __future__ import annotations

from typing import Any

__all__ = ["ProgressBoard"]


class ProgressBoard:
    """A Ray actor (no CPU) that tasks report to and the bridge polls: job -> latest report.

    Each report carries the worker that made it; a new worker for a job counts one more
    attempt, so the node learns that a job was started again after its worker died."""

    def __init__(self) -> None:
        self._latest: dict[int, dict[str, Any]] = {}
        self._workers: dict[int, list[str]] = {}

    def report(self, job_id: int, info: dict[str, Any]) -> None:
        seen = self._workers.setdefault(job_id, [])
        if info["worker"] not in seen:
            seen.append(info["worker"])
        self._latest[job_id] = {**info, "attempt": len(seen), "workers": list(seen)}

    def take(self) -> dict[int, dict[str, Any]]:
        out, self._latest = self._latest, {}
        return out

    def forget(self, job_id: int) -> None:
        self._latest.pop(job_id, None)
        self._workers.pop(job_id, None)
