"""Fetching a prior MR from the PACS: query the sources, choose by matching's rules, retrieve.

The scheduler (server.Node._match) asks for a retrieval when a complete PET has no eligible MR
at hand (``Store.request_fetch``). The :class:`Retriever` works through due retrievals on its
own thread, so a slow or unreachable PACS never holds up receiving or scheduling:

1. C-FIND every source ([[sources]]) for the PET's Patient ID and issuer, MR studies within
   ``date_window_days`` of the PET's study date, then their MR series;
2. rank the series found with the same rules as pushed ones (matching.rank_mr on rows built
   from the identifiers), leaving out series already in the index (matching judges those on
   their own headers) and those the rules exclude;
3. C-MOVE the best one to this node (its storage SCP receives it) or C-GET it (the
   sub-operations go to ``on_store``, the SCP's own hand-off): either way the series enters
   the spool and the index like a pushed one, and completes by count or stable age.

State lives in the store's ``fetches`` table, one row per job: a restart resumes a retrieval
where it stood (a series half moved is moved again; instances already held are duplicates the
index ignores). A failed query or retrieval (source down, C-MOVE refused, partial) is retried
with exponential backoff ([retrieve] retries, backoff_s, backoff_max_s), then the retrieval is
FAILED with the reason, which the job's fallback (or failure) quotes.
"""
from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable
from datetime import timedelta

from dipnode.dicom_io import qr
from dipnode.dicom_io.scp import ReceivedInstance
from dipnode.dicom_io.scu import Destination as Peer
from dipnode.dicom_io.status import Status
from dipnode.node import wire
from dipnode.node.jobs.matching import MatchRules, describe_mr, parse_date, rank_mr, remote_candidate
from dipnode.node.settings import Settings, Source
from dipnode.node.jobs.rows import FetchRow, FetchState, JobState, SeriesRow
from dipnode.node.jobs.store import Store

log = logging.getLogger(__name__)

__all__ = ["Retriever"]


class Retriever:
    """Works through due retrievals; ``step`` does one pass (tests call it directly)."""

    def __init__(self, settings: Settings, store: Store,
                 on_store: Callable[[ReceivedInstance], Status], *,
                 tls: ssl.SSLContext | None = None) -> None:
        """tls: the node's client context (wire.client_tls), shared with its deliveries; when
        not given it is built here, once, so unreadable certificates fail the start with the
        key named."""
        self.settings = settings
        self.store = store
        self._on_store = on_store
        self._tls: ssl.SSLContext | None = tls if tls is not None else wire.client_tls(settings)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def _uses_tls(self, source: Source) -> bool:
        return source.tls if source.tls is not None else self.settings.sender.tls

    # -- thread --------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="dipnode-retriever", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        """Stop after the current step; a retrieval cut short is simply done again at the next
        start (its state is in the store, instances already received are duplicates)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)

    def _loop(self) -> None:
        interval = self.settings.series.check_interval_s
        while not self._stop.is_set():
            try:
                self.step(time.time())
            except Exception:  # the node keeps serving; the trace says what broke
                log.exception("retrieval step failed")
            self._wake.wait(interval)
            self._wake.clear()

    # -- one pass ------------------------------------------------------------------------
    def step(self, now: float) -> int:
        """Work on every due retrieval once; returns how many were worked on."""
        due = self.store.due_fetches(now)
        for f in due:
            if self._stop.is_set():
                break
            self._work(f)
        return len(due)

    def _source(self, label: str | None) -> Source | None:
        return next((s for s in self.settings.sources if s.label == label), None)

    def _peer(self, source: Source) -> Peer:
        return Peer(source.ae_title, source.host, source.port)

    def _options(self, source: Source) -> dict[str, object]:
        return {"calling_ae": self.settings.calling_ae, "timeout_s": self.settings.retrieve.timeout_s,
                "tls": self._tls if self._uses_tls(source) else None}

    def _work(self, f: FetchRow) -> None:
        job = self.store.job(f.job_id)
        if job.state is not JobState.WAITING_FOR_MR:
            return
        pet = self.store.series(job.pet_series_uid)
        if pet is None:
            self.store.update_fetch(f.job_id, time.time(), state=FetchState.FAILED,
                                    note="the PET series is no longer in the index")
            return
        source = self._source(f.source)
        if f.series_uid is None or f.study_uid is None or source is None:
            picked = self._choose(f, pet)
            if picked is None:
                return
            source, row, note = picked
            study_uid, series_uid = row.study_uid, row.series_uid
            self.store.update_fetch(f.job_id, time.time(), state=FetchState.QUERY, note=note,
                                    source=source.label, study_uid=study_uid, series_uid=series_uid)
        else:
            study_uid, series_uid, note = f.study_uid, f.series_uid, f"retried {f.series_uid} at {source.label}"
        self._retrieve(f, source, study_uid, series_uid, note)

    def _choose(self, f: FetchRow, pet: SeriesRow) -> tuple[Source, SeriesRow, str] | None:
        """Query every source and rank what they hold; None when nothing is to be retrieved
        (the retrieval is then EXHAUSTED, or retried / FAILED when a source did not answer)."""
        now = time.time()
        if not pet.patient_id:
            self.store.update_fetch(f.job_id, now, state=FetchState.EXHAUSTED,
                                    note="the PET has no Patient ID: no prior study can be matched")
            return None
        pet_date = parse_date(pet.study_date)
        if pet_date is None:
            self.store.update_fetch(f.job_id, now, state=FetchState.EXHAUSTED,
                                    note=f"the PET's Study Date is unknown ({pet.study_date!r}): no date window to query")
            return None
        window = timedelta(days=self.settings.matching.date_window_days)
        rules = MatchRules.from_settings(self.settings)
        rows: list[SeriesRow] = []
        where: dict[str, Source] = {}
        errors: list[str] = []
        for source in self.settings.sources:
            found = qr.find_prior_series(self._peer(source), patient_id=pet.patient_id, issuer=pet.issuer,
                                         dates=(pet_date - window, pet_date + window), modality="MR",
                                         **self._options(source))
            if not found.ok:
                errors.append(f"{source.label}: {found.error}")
                continue
            for identifier in found.series:
                row = remote_candidate(identifier, pet.patient_id, pet.issuer)
                if row.series_uid in where or self.store.series(row.series_uid) is not None:
                    continue  # held by an earlier source, or already here (matching judges it)
                where[row.series_uid] = source
                rows.append(row)
        report = rank_mr(pet, rows, rules)
        rejected = "; ".join(f"{uid} {where[uid].label}: {why}" for uid, why in report.rejected)
        if report.chosen is None:
            note = f"no eligible MR at {', '.join(s.label for s in self.settings.sources)}"
            note += f" ({len(rows)} new MR series found" + (f"; passed over: {rejected}" if rejected else "") + ")"
            if errors:
                self._retry_or_fail(f, note + "; unanswered: " + "; ".join(errors))
            else:
                self.store.update_fetch(f.job_id, now, state=FetchState.EXHAUSTED, note=note)
                log.info("job %d: %s", f.job_id, note)
            return None
        chosen = report.chosen
        note = f"chose {describe_mr(pet, chosen)} at {where[chosen.series_uid].label}"
        if rejected:
            note += f"; passed over: {rejected}"
        log.info("job %d: %s", f.job_id, note)
        return where[chosen.series_uid], chosen, note

    def _retrieve(self, f: FetchRow, source: Source, study_uid: str, series_uid: str, note: str) -> None:
        peer = self._peer(source)
        if source.retrieve == "get":
            report = qr.get_series(peer, study_uid, series_uid, self._on_store, **self._options(source))  # type: ignore[arg-type]
        else:
            report = qr.move_series(peer, study_uid, series_uid,
                                    source.move_destination or self.settings.node.ae_title,
                                    **self._options(source))  # type: ignore[arg-type]
        arrived = self.store.series(series_uid)
        if report.ok and arrived is not None:
            self.store.update_fetch(f.job_id, time.time(), state=FetchState.RETRIEVED, attempts=0,
                                    note=f"{note}; {report.summary()}")
            log.info("job %d: retrieved MR %s (%d instances here)", f.job_id, series_uid, arrived.instance_count)
            return
        error = report.summary() if not report.ok else (
            f"{report.summary()}, yet no instance of it arrived here: does {source.label} know this "
            f"node's AE title {source.move_destination or self.settings.node.ae_title!r} with its host and port?")
        self._retry_or_fail(f, error)

    def _retry_or_fail(self, f: FetchRow, error: str) -> None:
        r = self.settings.retrieve
        attempts = f.attempts + 1
        now = time.time()
        if attempts <= r.retries:
            delay = min(r.backoff_s * 2 ** (attempts - 1), r.backoff_max_s)
            self.store.update_fetch(f.job_id, now, state=FetchState.QUERY, attempts=attempts,
                                    next_attempt_at=now + delay,
                                    note=f"{error} (attempt {attempts} of {r.retries + 1}; next in {delay:g} s)")
            log.warning("job %d: retrieval attempt %d failed: %s", f.job_id, attempts, error)
        else:
            self.store.update_fetch(f.job_id, now, state=FetchState.FAILED, attempts=attempts,
                                    note=f"{error} (gave up after {attempts} attempts)")
            log.warning("job %d: retrieval gave up after %d attempts: %s", f.job_id, attempts, error)
