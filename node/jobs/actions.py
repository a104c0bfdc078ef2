"""What an operator asks of a node's jobs: a QA re-run, a re-send. The command line
(`dipnode rerun`, `dipnode resend`) and the status page's administrator buttons both call
these, so both refuse the same way (inputs or results deleted by retention, nothing dead)."""
from __future__ import annotations

import time
from datetime import datetime

from dipnode.models.params import Method, resolve_params
from dipnode.node.jobs.rows import JobState
from dipnode.node.jobs.store import Store

__all__ = ["request_rerun", "request_resend"]


def request_rerun(store: Store, job_id: int, *, method: str | None = None,
                  preset_name: str | None = None, overrides: dict[str, object] | None = None) -> int:
    """Queue a new job for the same PET (new output series), with other parameters if given."""
    old = store.job(job_id)
    for role, uid in (("PET", old.pet_series_uid), ("MR", old.mr_series_uid)):
        series = store.series(uid) if uid else None
        if series is not None and series.purged_at is not None:
            raise ValueError(f"job {job_id}: its {role} series {uid} was deleted by retention on "
                             f"{datetime.fromtimestamp(series.purged_at):%Y-%m-%d %H:%M}; send the study again")
    chosen = Method(method or old.method)
    params = resolve_params(preset_name=preset_name, base=old.params,
                            overrides=overrides or {}, method=chosen)
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
