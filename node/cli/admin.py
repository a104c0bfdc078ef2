"""What an operator asks of a node's store: the jobs table, the quarantine line; a QA re-run
and a re-send are node/jobs/actions.py (the status page asks them too)."""
from __future__ import annotations

from datetime import datetime
from pathlib import Path

from dipnode.node.jobs.rows import JobState
from dipnode.node.jobs.actions import request_rerun, request_resend  # noqa: F401 - the CLI's
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
    (node/ingest/receiver.py index_orphans); None when there are none."""
    folder = Path(spool_dir) / "quarantine"
    n = sum(1 for p in folder.iterdir() if p.is_file()) if folder.is_dir() else 0
    if not n:
        return None
    return (f"quarantined: {n} files in {folder} (spool files that could not be indexed at "
            "start-up; see the node's log for each reason)")
