"""What an operator asks of a node's store: the jobs table, a QA re-run, a re-send."""
from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path

from dipnode.models.params import Method, resolve_params
from dipnode.node.settings import Settings
from dipnode.node.jobs.rows import JobState
from dipnode.node.jobs.store import Store


def jobs_table(store: Store, *, include_done: bool = False) -> str:
    """One line per job: id, state, progress, method, PET series, reason; newest last."""
    rows = store.jobs()
    if not include_done:
        rows = [j for j in rows if j.state is not JobState.DONE]
    header = f"{'JOB':>5}  {'STATE':<15} {'PROG':>5}  {'METHOD':<8} {'UPDATED':<19}  PET SERIES / REASON"
    lines = [header]
    for j in rows:
        when = datetime.fromtimestamp(j.updated_at).strftime("%Y-%m-%d %H:%M:%S")
        line = (f"{j.id:>5}  {j.state.value:<15} {j.progress * 100:>4.0f}%  {j.method.value:<8} {when:<19}  "
                f"{j.pet_series_uid}")
        if j.rerun_of is not None:
            line += f" (re-run of {j.rerun_of})"
        lines.append(line)
        dead = [d for d in store.deliveries(j.id) if d.state.value == "dead"]
        if j.reason:
            lines.append(f"{'':>7}reason: {j.reason}")
        if j.mr_choice:  # why this MR (or none), which were passed over and why
            lines.append(f"{'':>7}MR: {j.mr_choice}")
        fetch = store.fetch(j.id)
        if fetch is not None and (j.state is JobState.WAITING_FOR_MR or not j.mr_choice):
            lines.append(f"{'':>7}retrieval from the PACS ({fetch.state.value}): {fetch.note or 'query due'}")
        for d in dead:
            lines.append(f"{'':>7}dead letter: {d.destination} after {d.attempts} attempts: "
                         f"{d.last_error} (dipnode resend {j.id})")
    if len(lines) == 1:
        lines.append("(no jobs)" if include_done else "(no unfinished jobs; --all shows done ones)")
    return "\n".join(lines)


def quarantine_line(spool_dir: Path) -> str | None:
    """"quarantined: N files in DIR" when start-up moved spool files it could not index there
    (node/server.py index_orphans); None when there are none."""
    folder = Path(spool_dir) / "quarantine"
    n = sum(1 for p in folder.iterdir() if p.is_file()) if folder.is_dir() else 0
    if not n:
        return None
    return (f"quarantined: {n} files in {folder} (spool files that could not be indexed at "
            "start-up; see the node's log for each reason)")


def request_rerun(store: Store, settings: Settings, job_id: int, *, method: str | None,
                  preset_name: str | None, overrides: dict[str, object]) -> int:
    """Queue a new job for the same PET (new output series), with other parameters if given."""
    old = store.job(job_id)
    for role, uid in (("PET", old.pet_series_uid), ("MR", old.mr_series_uid)):
        series = store.series(uid) if uid else None
        if series is not None and series.purged_at is not None:
            raise ValueError(f"job {job_id}: its {role} series {uid} was deleted by retention on "
                             f"{datetime.fromtimestamp(series.purged_at):%Y-%m-%d %H:%M}; send the study again")
    chosen = Method(method or old.method)
    params = resolve_params(preset_name=preset_name, base=old.params,
                            overrides=overrides, method=chosen)
    needs_wait = chosen.needs_mr and old.mr_series_uid is None
    job = store.create_job(old.pet_series_uid, method=chosen, params=params,
                           now=time.time(), mr_series_uid=old.mr_series_uid, rerun=True,
                           state=JobState.WAITING_FOR_MR if needs_wait else JobState.QUEUED)
    return job.id


def request_resend(store: Store, job_id: int) -> int:
    """Make a job's dead deliveries pending again; returns how many."""
    job = store.job(job_id)  # a clear error for an unknown job
    if job.outputs_purged_at is not None:
        raise ValueError(f"job {job_id}: its results were deleted by retention on "
                         f"{datetime.fromtimestamp(job.outputs_purged_at):%Y-%m-%d %H:%M}; "
                         f"re-run it instead (dipnode rerun {job_id})")
    n = store.reset_dead(job_id, time.time())
    if n == 0:
        raise ValueError(f"job {job_id} has no dead deliveries to re-send")
    return n
