"""The status page: server-rendered HTML that refreshes itself (``<meta http-equiv=refresh>``),
no JavaScript. Failures and dead letters first, then jobs in progress, then finished ones.

Every value from the store (descriptions come from the wire) is escaped with
``html.escape``; nothing here reads or writes anything but the view it is given.
"""
from __future__ import annotations

import html
import time
from dataclasses import dataclass
from datetime import datetime

from dipnode.node.jobs.rows import DeliveryRow, DeliveryState, JobRow, JobState, SeriesRow

__all__ = ["JobView", "PageView", "render"]


@dataclass(frozen=True)
class JobView:
    job: JobRow
    pet: SeriesRow | None
    mr: SeriesRow | None
    deliveries: tuple[DeliveryRow, ...]
    has_thumbnail: bool

    @property
    def dead(self) -> tuple[DeliveryRow, ...]:
        return tuple(d for d in self.deliveries if d.state is DeliveryState.DEAD)


@dataclass(frozen=True)
class PageView:
    ae_title: str
    version: str
    counts: dict[JobState, int]
    dead_letters: int
    spool_free_bytes: int | None
    refuse_below_bytes: int
    emergency_below_bytes: int | None
    last_sweep: str | None
    jobs: tuple[JobView, ...]
    refresh_s: int
    # Set when the request is an administrator's: (field name, {job id: token}) for the forms.
    admin_csrf: dict[int, str] | None = None


_E = html.escape

_CSS = """
body{font:14px system-ui,sans-serif;margin:1.2em;color:#222}
h1{font-size:1.3em;margin:0 0 .3em}h2{font-size:1.1em;margin:1.2em 0 .4em;border-bottom:1px solid #ccc}
.summary span{display:inline-block;margin-right:1.2em}
table{border-collapse:collapse;width:100%}td,th{text-align:left;vertical-align:top;padding:.35em .5em;border-bottom:1px solid #eee;overflow-wrap:anywhere}
th{background:#f4f4f4;font-weight:600;white-space:nowrap;overflow-wrap:normal}td.method{min-width:110px}
.state{font-weight:600;padding:.1em .4em;border-radius:3px}
.failed{background:#fdd;color:#900}.done{background:#dfd;color:#060}.running,.sending{background:#def;color:#036}
.queued,.waiting_for_mr{background:#ffd;color:#640}
.small{font-size:.85em;color:#555}.reason{color:#900}
img.thumb{width:310px;height:auto;border:1px solid #ddd}td.thumbs{min-width:316px}
td.trust{min-width:230px}td.series{min-width:190px}td.trust td{padding:.1em .4em}.uid{word-break:break-all;font-size:.8em;color:#666}
.note{color:#444;font-size:.9em}
form{display:inline}button{margin:.2em .3em 0 0}
"""


def _when(t: float | None) -> str:
    return "" if t is None else datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")


def _mb(b: int | None) -> str:
    return "?" if b is None else f"{b / 1048576:,.0f} MB"


def _date(da: str) -> str:
    return f"{da[:4]}-{da[4:6]}-{da[6:8]}" if len(da) == 8 and da.isdigit() else (da or "no date")


def _series(s: SeriesRow | None, uid: str | None) -> str:
    if uid is None:
        return "none"
    if s is None:
        return f"<span class=uid>{_E(uid)}</span>"
    desc = s.series_description or "(no description)"
    purged = " <span class=small>(files deleted by retention)</span>" if s.purged_at is not None else ""
    return (f"{_E(desc)} <span class=small>{_E(_date(s.series_date or s.study_date))}, "
            f"{s.instance_count} images</span>{purged}<br><span class=uid>{_E(uid)}</span>")


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:+.1f} %"


def _trust(report: dict | None) -> str:
    if not report:
        return "<span class=small>not computed yet</span>"
    t = report.get("trust") or {}
    measured = t.get("measured_fraction")
    reg = report.get("registration")
    if reg is None:
        reg_text = "no MR"
    else:
        metric = reg.get("metric")
        reg_text = _E(str(reg.get("method"))) + ("" if metric is None else f", Mattes MI {metric:.3f}")
        if reg.get("overlap_fraction") is not None:
            reg_text += f", overlap {100 * reg['overlap_fraction']:.0f} %"
    timings = report.get("timings") or {}
    times = ", ".join(f"{_E(k)} {v:.1f} s" for k, v in timings.items() if k in ("job", "fit", "total"))
    return ("<table>"
            f"<tr><td>brain voxels from measured data</td><td>{'n/a' if measured is None else f'{100 * measured:.0f} %'}</td></tr>"
            f"<tr><td>mean change, brain</td><td>{_pct(t.get('mean_change'))}</td></tr>"
            f"<tr><td>mean change, hottest 1 %</td><td>{_pct(t.get('hot_change'))}</td></tr>"
            f"<tr><td>registration</td><td>{reg_text}</td></tr>"
            f"<tr><td>timings</td><td>{times or 'n/a'}</td></tr></table>")


def _params(job: JobRow) -> str:
    p = job.params
    if job.method.value == "gaussian":
        return f"FWHM {p.fwhm_voxels:g} voxels"
    text = f"{p.epochs} epochs, m {p.sample_from}, M {p.sample_every}, seed {p.seed}"
    if job.method.value == "sdip":
        text = f"α {p.alpha:g}, " + text
    return text


def _row(v: JobView, csrf: dict[int, str] | None) -> str:
    j = v.job
    # A failed job's reason is the failure; a finished one's says what it ran with.
    reason = (f"<div class={'reason' if j.state is JobState.FAILED else 'note'}>{_E(j.reason)}</div>"
              if j.reason else "")
    dead = "".join(f"<div class=reason>dead letter: {_E(d.destination)} after {d.attempts} attempts: "
                   f"{_E(d.last_error or '')}</div>" for d in v.dead)
    choice = f"<div class=note>why this MR: {_E(j.mr_choice)}</div>" if j.mr_choice else ""
    thumb = (f'<img class=thumb alt="job {j.id}: OSEM, output, data weight" src="jobs/{j.id}/thumbnail.png">'
             if v.has_thumbnail else "")
    actions = ""
    if csrf is not None and j.id in csrf:
        token = _E(csrf[j.id])
        if j.state.terminal:
            actions += (f'<form method=post action="jobs/{j.id}/rerun"><input type=hidden name=csrf '
                        f'value="{token}"><button type=submit>re-run</button></form>')
        if v.dead:
            actions += (f'<form method=post action="jobs/{j.id}/resend"><input type=hidden name=csrf '
                        f'value="{token}"><button type=submit>re-send</button></form>')
    rerun = f" <span class=small>(re-run of {j.rerun_of})</span>" if j.rerun_of else ""
    return (f"<tr id=job-{j.id}><td>{j.id}{rerun}</td>"
            f"<td><span class='state {j.state.value}'>{j.state.value}</span> "
            f"{100 * j.progress:.0f} %<div class=small>{_E(_when(j.updated_at))}</div>{reason}{dead}{actions}</td>"
            f"<td class=series>{_series(v.pet, j.pet_series_uid)}</td>"
            f"<td class=series>{_series(v.mr, j.mr_series_uid)}{choice}</td>"
            f"<td class=method>{_E(j.method.value)}<div class=small>{_E(_params(j))}</div></td>"
            f"<td class=trust>{_trust(j.report)}</td><td class=thumbs>{thumb}</td></tr>")


_HEAD = ("<tr><th>job</th><th>state</th><th>PET</th><th>MR</th><th>method</th>"
         "<th>trust numbers</th><th>OSEM · output · data weight</th></tr>")


def _table(title: str, rows: list[JobView], csrf: dict[int, str] | None, empty: str) -> str:
    body = "".join(_row(v, csrf) for v in rows) or f"<tr><td colspan=7 class=small>{_E(empty)}</td></tr>"
    return f"<h2>{_E(title)} ({len(rows)})</h2><table>{_HEAD}{body}</table>"


def render(view: PageView) -> str:
    attention = [v for v in view.jobs if v.job.state is JobState.FAILED or v.dead]
    active = [v for v in view.jobs if not v.job.state.terminal and not v.dead]
    done = [v for v in view.jobs if v.job.state is JobState.DONE and not v.dead]
    active.sort(key=lambda v: v.job.id)
    done.sort(key=lambda v: -v.job.id)
    attention.sort(key=lambda v: -v.job.id)
    counts = " ".join(f"<span>{_E(s.value)}: <b>{n}</b></span>" for s, n in view.counts.items())
    emergency = "" if view.emergency_below_bytes is None else f", emergency sweep below {_mb(view.emergency_below_bytes)}"
    sweep = f"<span>last retention sweep: {_E(view.last_sweep)}</span>" if view.last_sweep else ""
    admin = "<span><b>administrator</b></span>" if view.admin_csrf is not None else ""
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f'<meta http-equiv="refresh" content="{int(view.refresh_s)}">'
        f"<title>dipnode {_E(view.ae_title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>dipnode {_E(view.ae_title)}</h1>"
        f"<div class=summary>{counts}<span>dead letters: <b>{view.dead_letters}</b></span>"
        f"<span>spool free: <b>{_mb(view.spool_free_bytes)}</b> (C-STORE refused below "
        f"{_mb(view.refuse_below_bytes)}{emergency})</span>{sweep}{admin}</div>"
        f"<div class=small>{_E(view.version)}; page made {_E(_when(time.time()))}, refreshes every "
        f"{int(view.refresh_s)} s. Research software, not a medical device.</div>"
        + _table("Needs attention: failed jobs and dead letters", attention, view.admin_csrf, "none")
        + _table("In progress", active, view.admin_csrf, "no unfinished jobs")
        + _table("Done (latest first)", done, view.admin_csrf, "no finished jobs yet")
        + "</body></html>"
    )
