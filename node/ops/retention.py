"""Retention: what the node deletes, when, and in which order, so that it runs for months.

Policy ([retention], node/settings.py): the received files of a series are deleted
``inputs_days`` after the last job that used them finished (``failed_days`` when that job
failed, so that someone can still look and re-run), a series no job used ``inputs_days`` after
its last instance arrived; a finished job's results (kept when it has no destination, or for a
re-send after a dead letter) and its status-page thumbnails ``outputs_days`` after it finished.
Never deleted: a series still receiving, a series a waiting, queued, running or sending job
uses, any series of the study or patient of a PET still waiting for its MR (matching may take
it), the results of an unfinished job.

Emergency: when the spool's free space falls below ``emergency_free_mb`` (above
``[storage] min_free_mb``, where C-STORE is refused) the same candidates go regardless of age,
oldest finished first, until free space is half as much again above the mark (so that one
sweep makes room for more than the next instance).

Order, so that a kill at any point leaves nothing half-done (docs/DESIGN.md "The durability
contract"): for a series, (1) one transaction marks it purged (from then on it is no MR prior
and cannot be re-run: it counts as deleted), (2) its files are deleted, (3) one transaction
deletes its instance rows. A kill after (1) leaves a marked series with some files and all its
rows; the next sweep, and every start before the spool is scanned for unindexed files, finishes
it (:meth:`Retention.finish_interrupted`). Results: mark the job first, then delete its files.
Index rows follow their files; a job's own row is history and stays.
"""
from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from dipnode.node.ingest.spool import fsync_dir
from dipnode.node.jobs.rows import JobRow, JobState, SeriesRow, SeriesState
from dipnode.node.jobs.store import Store

log = logging.getLogger(__name__)

__all__ = ["Candidate", "Policy", "Retention", "SweepReport", "plan"]

DAY_S = 86400.0
MB = 1024 * 1024


@dataclass(frozen=True)
class Policy:
    """Ages in days; ``emergency_free_bytes``: the free-space mark of the emergency sweep."""

    inputs_days: float = 7.0
    failed_days: float = 30.0
    outputs_days: float = 7.0
    emergency_free_bytes: int = 2 * 1024 * MB

    @property
    def emergency_target_bytes(self) -> int:
        """An emergency sweep deletes until this much is free (the mark and half again)."""
        return self.emergency_free_bytes * 3 // 2

    def __post_init__(self) -> None:
        for name in ("inputs_days", "failed_days", "outputs_days"):
            v = getattr(self, name)
            if not v > 0:
                raise ValueError(f"{name}: expected a number of days > 0, got {v!r}")
        if self.emergency_free_bytes < 0:
            raise ValueError(f"emergency_free_bytes: expected >= 0, got {self.emergency_free_bytes!r}")


@dataclass(frozen=True)
class Candidate:
    """Something retention may delete: a series' received files, or a job's results."""

    kind: str  # "inputs" or "outputs"
    key: str  # series UID, or job id as text
    finished_at: float  # when it stopped being needed (the age counts from here)
    due_at: float  # finished_at + its keep time
    why: str  # in words, for --dry-run and the log

    @property
    def job_id(self) -> int:
        return int(self.key)


@dataclass(frozen=True)
class SweepReport:
    kind: str  # "scheduled", "emergency", "dry-run"
    series: int
    instances: int
    outputs: int
    bytes_freed: int
    seconds: float
    free_bytes: int | None
    candidates: tuple[Candidate, ...] = ()


def plan(series: Iterable[SeriesRow], jobs: Iterable[JobRow], policy: Policy, now: float, *,
         emergency: bool = False) -> list[Candidate]:
    """What may go now (``emergency``: whatever may go at all, regardless of age), oldest
    finished first. Pure: reads rows, deletes nothing."""
    series = list(series)
    jobs = list(jobs)
    unfinished = [j for j in jobs if not j.state.terminal]
    protected: set[str] = set()
    for j in unfinished:
        protected.add(j.pet_series_uid)
        if j.mr_series_uid:
            protected.add(j.mr_series_uid)
    by_uid = {s.series_uid: s for s in series}
    # A PET waiting for its MR may take any series of its study or patient (node/matching.py).
    waiting = [by_uid[j.pet_series_uid] for j in unfinished
               if j.state is JobState.WAITING_FOR_MR and j.pet_series_uid in by_uid]
    studies = {p.study_uid for p in waiting}
    patients = {(p.patient_id, p.issuer) for p in waiting if p.patient_id}
    users: dict[str, list[JobRow]] = {}
    for j in jobs:
        users.setdefault(j.pet_series_uid, []).append(j)
        if j.mr_series_uid:
            users.setdefault(j.mr_series_uid, []).append(j)
    out: list[Candidate] = []
    for s in series:
        if (s.purged_at is not None or s.state is not SeriesState.COMPLETE or s.series_uid in protected
                or s.study_uid in studies or (s.patient_id and (s.patient_id, s.issuer) in patients)):
            continue
        used = users.get(s.series_uid, [])
        if used:
            latest = max(used, key=lambda j: j.id)
            finished = max([s.last_received_at, *(j.updated_at for j in used)])
            failed = latest.state is JobState.FAILED
            days = policy.failed_days if failed else policy.inputs_days
            why = (f"{s.modality} series, {len(used)} job(s), last job {latest.id} "
                   f"{latest.state.value}, keep {days:g} days")
        else:
            finished, days = s.last_received_at, policy.inputs_days
            why = f"{s.modality} series used by no job, keep {days:g} days"
        due = finished + days * DAY_S
        if emergency or due <= now:
            out.append(Candidate("inputs", s.series_uid, finished, due, why))
    for j in jobs:
        if not j.state.terminal or j.outputs_purged_at is not None:
            continue
        due = j.updated_at + policy.outputs_days * DAY_S
        if emergency or due <= now:
            out.append(Candidate("outputs", str(j.id), j.updated_at, due,
                                 f"results of job {j.id} ({j.state.value}), keep {policy.outputs_days:g} days"))
    out.sort(key=lambda c: (c.finished_at, c.kind, c.key))
    return out


def _remove_file(path: Path) -> int:
    """Delete one file; its size in bytes (0 when it was gone already). A hook for the
    kill test (tests/node/test_retention_kill.py), which stops a sweep between two files."""
    try:
        size = path.stat().st_size
        path.unlink()
    except FileNotFoundError:
        return 0
    return size


def _tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.is_dir() else 0


class Retention:
    """Sweeps of one node's spool and index; thread-safe (one sweep at a time)."""

    def __init__(self, store: Store, spool_root: Path, policy: Policy, *,
                 outputs_dir: Path | None = None, thumbnails_dir: Path | None = None,
                 on_sweep: Callable[[SweepReport], None] | None = None) -> None:
        self.store = store
        self.spool_root = Path(spool_root)
        self.instances_dir = self.spool_root / "instances"
        self.outputs_dir = Path(outputs_dir) if outputs_dir else self.spool_root / "outputs"
        self.thumbnails_dir = Path(thumbnails_dir) if thumbnails_dir else self.spool_root / "thumbnails"
        self.policy = policy
        self._on_sweep = on_sweep
        self._lock = threading.Lock()
        self._stuck = False  # below the emergency mark with nothing to delete (warned once)

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.spool_root).free

    def below_emergency_mark(self) -> bool:
        return self.free_bytes() < self.policy.emergency_free_bytes

    # -- the sweeps ------------------------------------------------------------------------
    def dry_run(self, now: float | None = None, *, emergency: bool = False) -> SweepReport:
        """What a sweep would delete now, with sizes; deletes nothing."""
        now = time.time() if now is None else now
        cands = plan(self.store.all_series(), self.store.jobs(), self.policy, now, emergency=emergency)
        n_inst = size = 0
        for c in cands:
            if c.kind == "inputs":
                paths = self.store.series_instances(c.key)
                n_inst += len(paths)
                size += sum(p.stat().st_size for p in paths if p.exists())
            else:
                size += self._outputs_bytes(self.store.job(c.job_id))
        return SweepReport("dry-run", sum(c.kind == "inputs" for c in cands), n_inst,
                           sum(c.kind == "outputs" for c in cands), size, 0.0, self.free_bytes(),
                           tuple(cands))

    def sweep(self, now: float | None = None, *, emergency: bool = False) -> SweepReport:
        """Delete what is due (``emergency``: the oldest finished first until free space is
        above the emergency mark). Logs one line. Finishes interrupted sweeps first."""
        with self._lock:
            t0 = time.monotonic()
            now = time.time() if now is None else now
            series = instances = outputs = freed = 0
            for uid in self.store.purging_series():
                n, b = self._purge_series_files(uid)
                instances += n
                freed += b
                series += 1
            for c in plan(self.store.all_series(), self.store.jobs(), self.policy, now, emergency=emergency):
                if emergency and self.free_bytes() >= self.policy.emergency_target_bytes:
                    break
                if c.kind == "inputs":
                    if not self.store.mark_series_purged(c.key, now):
                        continue  # a job took it since the plan was made
                    n, b = self._purge_series_files(c.key)
                    series += 1
                    instances += n
                    freed += b
                else:
                    job = self.store.job(c.job_id)
                    if not self.store.mark_outputs_purged(job.id, now):
                        continue
                    freed += self._purge_outputs(job)
                    outputs += 1
            free = self.free_bytes()
            report = SweepReport("emergency" if emergency else "scheduled", series, instances, outputs,
                                 freed, time.monotonic() - t0, free)
        log.info("retention sweep (%s): deleted %d series (%d instances) and the results of %d jobs, "
                 "%.1f MB freed in %.2f s; spool free %.0f MB%s", report.kind, series, instances, outputs,
                 freed / MB, report.seconds, free / MB,
                 "" if not emergency or free >= self.policy.emergency_free_bytes
                 else f", still below the emergency mark {self.policy.emergency_free_bytes / MB:.0f} MB "
                      "(nothing finished left to delete)")
        if self._on_sweep is not None:
            self._on_sweep(report)
        return report

    def emergency(self) -> SweepReport | None:
        """The emergency sweep when the spool is below its emergency mark and something
        finished may go; None otherwise. With nothing to delete it warns once (until something
        could be deleted again) rather than sweeping, and logging, at every call."""
        if not self.below_emergency_mark():
            self._stuck = False
            return None
        if not self.store.purging_series() and not plan(
                self.store.all_series(), self.store.jobs(), self.policy, time.time(), emergency=True):
            if not self._stuck:
                log.warning("spool free %.0f MB is below the emergency mark %.0f MB and nothing finished "
                            "can be deleted: C-STORE is refused below [storage] min_free_mb",
                            self.free_bytes() / MB, self.policy.emergency_free_bytes / MB)
                self._stuck = True
            return None
        self._stuck = False
        return self.sweep(emergency=True)

    def finish_interrupted(self) -> int:
        """Complete the series a killed sweep left marked (call at start-up, before the spool
        is scanned for unindexed files); returns how many. Results marked purged whose folder
        remains are deleted too."""
        with self._lock:
            uids = self.store.purging_series()
            for uid in uids:
                self._purge_series_files(uid)
            for job in self.store.jobs([JobState.DONE, JobState.FAILED]):
                if job.outputs_purged_at is not None:
                    self._purge_outputs(job)
        if uids:
            log.info("retention: finished deleting %d series that an interrupted sweep had begun", len(uids))
        return len(uids)

    # -- the steps -------------------------------------------------------------------------
    def _purge_series_files(self, uid: str) -> tuple[int, int]:
        """Steps 2 and 3 for a series marked purged: files, then rows. Idempotent."""
        paths = self.store.series_instances(uid)
        freed = 0
        folders = set()
        for path in paths:
            freed += _remove_file(path)
            folders.add(path.parent)
        for folder in folders:
            self._remove_empty_folders(folder)
        n = self.store.drop_purged_instances(uid)
        return n, freed

    def _remove_empty_folders(self, folder: Path) -> None:
        # The series folder, then its study folder, each only when empty; the parent of each
        # removed entry is fsync'd so the deletion survives a power cut.
        for path in (folder, folder.parent):
            if path == self.instances_dir or not path.is_relative_to(self.instances_dir):
                return
            try:
                fsync_dir(path)
                path.rmdir()
            except FileNotFoundError:
                continue
            except OSError:  # not empty: another series of the study, or a file just arriving
                return
            fsync_dir(path.parent)

    def _outputs_paths(self, job: JobRow) -> list[Path]:
        paths = [self.thumbnails_dir / f"job-{job.id}.png"]
        if job.output_dir:
            out = Path(job.output_dir)
            # Only a folder of ours: a job row never names another place, but a row is data.
            if out.is_relative_to(self.outputs_dir):
                paths.append(out)
        return paths

    def _outputs_bytes(self, job: JobRow) -> int:
        return sum(_tree_bytes(p) if p.is_dir() else (p.stat().st_size if p.is_file() else 0)
                   for p in self._outputs_paths(job))

    def _purge_outputs(self, job: JobRow) -> int:
        freed = 0
        for p in self._outputs_paths(job):
            if p.is_dir():
                freed += _tree_bytes(p)
                shutil.rmtree(p, ignore_errors=True)
            elif p.is_file():
                freed += _remove_file(p)
        return freed


def format_dry_run(report: SweepReport, store: Store) -> str:
    """`dipnode purge --dry-run`: one line per candidate, then the totals."""
    lines = [f"{'WHAT':<8} {'FINISHED':<19}  {'DUE':<19}  SERIES / JOB"]
    for c in report.candidates:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(c.finished_at))
        due = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(c.due_at))
        lines.append(f"{c.kind:<8} {when:<19}  {due:<19}  {c.key if c.kind == 'inputs' else 'job ' + c.key}: {c.why}")
    if len(lines) == 1:
        lines.append("(nothing is due)")
    free = "" if report.free_bytes is None else f"; spool free {report.free_bytes / MB:.0f} MB"
    lines.append(f"would delete {report.series} series ({report.instances} instances) and the results of "
                 f"{report.outputs} jobs: {report.bytes_freed / MB:.1f} MB{free}")
    return "\n".join(lines)
