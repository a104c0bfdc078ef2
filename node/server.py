"""`dipnode serve`: the running node.

Threads: the receiver (pynetdicom's, one per association) only spools and indexes; one
scheduler thread completes series, matches PET to MR, starts jobs on the executor and
delivers results. All state lives in the store, so a restart resumes where it stopped.

One writer: the node takes an exclusive lock on its spool and its database (node/lock.py)
before it touches either; a second process on the same spool or database stops at once.
"""
from __future__ import annotations

import logging
import shutil
import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

from dipnode.dicom_io.intake import Header, dataset_bytes, read_received
from dipnode.dicom_io.logsafe import SafeValuesFilter, shown
from dipnode.dicom_io.provenance import software_version
from dipnode.dicom_io.scp import ReceivedInstance, start_receiver
from dipnode.dicom_io.scu import Destination as Peer
from dipnode.dicom_io.scu import send_files
from dipnode.dicom_io.status import Status, StoreRefused
from dipnode.node import pipeline, wire
from dipnode.node.completion import check_indexable, complete_due, instance_record
from dipnode.node.executor import ExecutorBusy, LocalExecutor
from dipnode.node.lock import WriterLock
from dipnode.node.matching import DecisionKind, MatchRules, decide, ineligible_reason
from dipnode.node.retrieval import Retriever
from dipnode.node.settings import Settings
from dipnode.node.spool import Spool
from dipnode.node.jobs.rows import (
    InstanceRecord, JobRow, JobState, KnownInstance, Move, SeriesRow, SeriesState, StoreError,
)
from dipnode.node.jobs.store import Store
from dipnode.node import admin, job_summary
from dipnode.node.http import HttpConfig, HttpServer
from dipnode.node.metrics import NodeMetrics
from dipnode.node.retention import Policy, Retention, SweepReport
from dipnode.node.status_page import JobView, PageView

log = logging.getLogger(__name__)


class Stopping(Exception):
    """Raised from a running fit's progress callback when the node is asked to stop."""


class Node:
    """The service: receive, assemble, match, denoise, send back."""

    def __init__(self, settings: Settings, *,
                 observer: Callable[[int, pipeline.PipelineResult], None] | None = None,
                 snapshot_epochs: tuple[int, ...] = ()) -> None:
        """observer: called with (job id, result) after each job's pipeline (the demo's report
        reads the fit from it); snapshot_epochs: DIP outputs to keep for trade-off curves."""
        # Before anything else: nothing of another node's spool or database is touched.
        self._lock = WriterLock.for_node(settings.storage.spool_dir, settings.storage.database)
        try:
            self.settings = settings
            self._observer = observer
            self._snapshot_epochs = snapshot_epochs
            self.store = Store.open(settings.storage.database)
            self.spool = Spool(settings.storage.spool_dir,
                               min_free_bytes=settings.storage.min_free_mb * 1024 * 1024,
                               max_instance_bytes=settings.node.max_instance_mb * 1024 * 1024)
        except BaseException:
            self._lock.release()
            raise
        # Stores of one SOP Instance UID are serialised (the re-send policy reads, then writes).
        self._uid_locks = [threading.Lock() for _ in range(64)]
        self.quarantined_at_start = 0
        self.outputs = Path(settings.storage.spool_dir) / "outputs"
        self.executor = LocalExecutor(settings.workers.max_concurrent_jobs)
        self._stop = threading.Event()
        self._receiver = None
        self._scheduler: threading.Thread | None = None
        self._listening_since: float | None = None  # set by start()
        # Prior MR from the PACS ([[sources]]); its thread starts once the receiver listens
        # (a C-MOVE's sub-operations come to the receiver).
        self.retriever = Retriever(settings, self.store, self.on_store) if settings.sources else None
        # Running for months: metrics, retention, the HTTP port (status page, /metrics, /healthz).
        self.metrics = NodeMetrics(lambda: self.store, settings.storage.spool_dir)
        self.registry = self.metrics.registry
        self.thumbnails = Path(settings.storage.spool_dir) / "thumbnails"
        r = settings.retention
        self.retention = Retention(
            self.store, settings.storage.spool_dir,
            Policy(inputs_days=r.inputs_days, failed_days=r.failed_days, outputs_days=r.outputs_days,
                   emergency_free_bytes=settings.emergency_free_mb * 1024 * 1024),
            outputs_dir=self.outputs, thumbnails_dir=self.thumbnails,
            on_sweep=self._swept) if r.enabled else None
        self._next_sweep = 0.0
        self._last_sweep: str | None = None
        h = settings.http
        self.http = HttpServer(HttpConfig(host=h.host, port=h.port, token=h.token, admin_token=h.admin_token,
                                          refresh_s=h.refresh_s), self) if h.enabled else None

    # -- receiving: spool before success, then index ---------------------------------------
    def on_store(self, instance: ReceivedInstance) -> Status:
        """Keep one received instance: SUCCESS means durable (fsync'd) AND indexed; anything
        else raises (StoreRefused with the status to answer) and leaves nothing behind.

        A re-sent SOP Instance UID (policy, also in README "Receiving"):

        - the same data-set bytes in the same transfer syntax: idempotent, SUCCESS, nothing is
          written (debug log);
        - other bytes (other pixels, other attributes, or the same instance re-encoded in another
          transfer syntax) under the same series: refused DUPLICATE_SOP_INSTANCE (0x0111), the
          first copy is kept, because a job may already have used it and an instance must never
          change under a finished result; the refusal line names both UIDs (WARNING). A
          corrected instance needs a new SOP Instance UID (PS3.3 C.12.1.1.1);
        - the same UID under another series: refused DUPLICATE_SOP_INSTANCE, never acknowledged
          and dropped (UIDs are unique, PS3.5 9.1: one of the two is wrong);
        - the UID is indexed but its file is gone from the spool: written again.
        """
        header = self.spool.parse(instance)  # StoreRefused for what must not be kept
        ds = header.dataset
        path = self.spool.path_for(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                                   str(ds.SOPInstanceUID))
        record = instance_record(ds, path, header.transfer_syntax)
        try:
            check_indexable(record)  # refused before anything is written
        except ValueError as exc:
            raise StoreRefused(Status.CANNOT_UNDERSTAND, str(exc)) from None
        uid = record.sop_instance_uid
        with self._uid_locks[hash(uid) % len(self._uid_locks)]:
            known = self.store.instance(uid)
            if known is not None:
                self._check_resent(instance, header, record, known, path)
                if known.path.exists():
                    log.debug("instance %s of series %s re-sent identical: nothing to do",
                              uid, record.series_uid)
                    return Status.SUCCESS
                log.warning("instance %s is indexed but its file %s is gone: written again", uid, known.path)
            stored = self._spool_store(instance, header)  # durable before we answer
            try:
                new = self.store.record_instance(record, time.time())
            except BaseException:
                if known is None:
                    self.spool.discard(stored.path)  # not indexed: not kept
                raise
        log.debug("stored %s (series %s)%s", uid, record.series_uid, "" if new else " again")
        return Status.SUCCESS

    def _spool_store(self, instance: ReceivedInstance, header: Header):
        """Spool.store, with retention's emergency sweep first when the spool is at its mark:
        stores are refused only when nothing finished is left to delete."""
        try:
            return self.spool.store(instance, header)
        except StoreRefused as exc:
            if exc.status != Status.OUT_OF_RESOURCES or self.retention is None:
                raise
        self.retention.emergency()
        return self.spool.store(instance, header)

    def _swept(self, report: SweepReport) -> None:
        self.metrics.swept(report)
        self._last_sweep = (f"{time.strftime('%Y-%m-%d %H:%M:%S')} ({report.kind}): {report.series} series, "
                            f"{report.outputs} results, {report.bytes_freed / 1048576:.1f} MB")

    def _check_resent(self, instance: ReceivedInstance, header: Header, record: InstanceRecord,
                      known: KnownInstance, path: Path) -> None:
        """Raise StoreRefused unless ``instance`` is the indexed one again (see on_store)."""
        uid = record.sop_instance_uid
        if known.series_uid != record.series_uid or known.path != path:
            where = (f"series {record.series_uid}" if known.series_uid != record.series_uid
                     else f"study {record.study_uid}")
            raise StoreRefused(Status.DUPLICATE_SOP_INSTANCE,
                               f"SOP instance {uid} re-sent under {where} is already stored in series "
                               f"{known.series_uid} of study {known.path.parent.parent.name}; refused, "
                               "the first copy is kept")
        if not known.path.exists():
            return
        if known.transfer_syntax != header.transfer_syntax:
            raise StoreRefused(Status.DUPLICATE_SOP_INSTANCE,
                               f"SOP instance {uid} of series {record.series_uid} re-sent in transfer syntax "
                               f"{header.transfer_syntax}, stored in {known.transfer_syntax}; refused, "
                               "the first copy is kept")
        if dataset_bytes(known.path.read_bytes()) != memoryview(instance.raw)[header.data_offset:]:
            raise StoreRefused(Status.DUPLICATE_SOP_INSTANCE,
                               f"SOP instance {uid} of series {record.series_uid} re-sent with different "
                               "content; refused, the first copy is kept (a result may have used it)")

    # -- life cycle ------------------------------------------------------------------------
    def start(self) -> None:
        removed = self.spool.recover()
        if self.retention is not None:
            # A sweep killed between its steps is finished before the spool is scanned for
            # unindexed files (node/retention.py): its files are never indexed again.
            self.retention.finish_interrupted()
        self.index_orphans()
        now = time.time()
        resumed = self.store.resume_after_restart(now)
        if removed or resumed.requeued or resumed.sending:
            log.info("recovered: %d partial files removed, jobs requeued %s, sending %s",
                     removed, list(resumed.requeued), list(resumed.sending))
        for job_id in resumed.sending:
            if not self.store.deliveries(job_id):
                # Killed between the SENDING transition and its deliveries (two transactions
                # in _run_job): without this the job would wait for a delivery that never comes.
                log.info("job %d was sending with no deliveries recorded: handing it over now", job_id)
                self._hand_over(job_id, self.store.job(job_id).output_dir or "", now)
        self._receiver = start_receiver(wire.receiver_config(self.settings), self.on_store,
                                        self.metrics.stored)
        # Series interrupted by the downtime get a full stable age from now (completion.is_due).
        self._listening_since = time.time()
        self._scheduler = threading.Thread(target=self._loop, name="dipnode-scheduler", daemon=True)
        self._scheduler.start()
        if self.retriever is not None:
            self.retriever.start()
        if self.http is not None:
            self.http.start()
        log.info("dipnode %s listening as %s on %s:%d", software_version(),
                 self.settings.node.ae_title, self.settings.node.host, self.port)

    def index_orphans(self) -> int:
        """Index whole spool files that the index lacks: a kill between the spool's rename and
        the index write leaves one (the sender saw no success and may never re-send it).

        A file that cannot be indexed (unreadable, refused by today's checks, named after other
        UIDs than it holds, a second copy of an indexed instance) never stops the start: it is
        moved to the spool's quarantine folder, logged and counted (``dipnode jobs`` shows the
        count). Returns the number of files indexed.
        """
        known = self.store.indexed_paths()
        found = quarantined = 0
        for path in sorted(self.spool.instances.rglob("*.dcm")):
            if path in known:
                continue
            try:
                self._index_orphan(path)
                found += 1
            except (StoreRefused, ValueError, OverflowError, OSError, sqlite3.IntegrityError) as exc:
                reason = exc.reason if isinstance(exc, StoreRefused) else f"{type(exc).__name__}: {exc}"
                try:
                    target = self.spool.quarantine(path)
                except OSError as move:
                    log.error("spool file %s cannot be indexed (%s) nor quarantined (%s); left in place",
                              path, shown(reason, 300), move)
                    continue
                quarantined += 1
                log.warning("spool file %s cannot be indexed (%s): quarantined as %s",
                            path, shown(reason, 300), target)
        if found:
            log.info("indexed %d spool files the index lacked (stored before a crash)", found)
        self.quarantined_at_start = quarantined
        total = len(self.spool.quarantined())
        if total:
            log.warning("quarantined: %d files in %s (%d moved at this start-up); they are kept for a "
                        "person to look at and are not processed", total, self.spool.quarantine_dir, quarantined)
        return found

    def _index_orphan(self, path: Path) -> None:
        header = read_received(path.read_bytes(), None, max_bytes=self.spool.max_instance_bytes)
        ds = header.dataset
        record = instance_record(ds, path, header.transfer_syntax)
        check_indexable(record)
        expected = self.spool.path_for(record.study_uid, record.series_uid, record.sop_instance_uid)
        if expected != path:
            raise ValueError(f"file name does not match the UIDs it holds (they name {expected})")
        existing = self.store.instance(record.sop_instance_uid)
        if existing is not None:
            raise StoreError(f"SOP Instance UID already indexed at {existing.path}")
        self.store.record_instance(record, time.time())

    @property
    def port(self) -> int:
        return self._receiver.port if self._receiver else self.settings.node.port

    def stop(self) -> None:
        """Stop receiving and scheduling; a running fit stops at its next epoch and stays
        RUNNING in the store, so the next start re-queues it."""
        self._stop.set()
        if self.http is not None:
            self.http.stop()
        if self.retriever is not None:
            self.retriever.stop()
        if self._receiver is not None:
            self._receiver.stop()
        if self._scheduler is not None:
            self._scheduler.join(timeout=60)
        self.executor.shutdown(wait=True)
        self.store.close()
        self._lock.release()

    def _loop(self) -> None:
        interval = self.settings.series.check_interval_s
        while not self._stop.is_set():
            try:
                self.tick(time.time())
            except Exception:  # the node keeps serving; the trace says what broke
                log.exception("scheduler step failed")
            self._stop.wait(interval)

    # -- one scheduling step ---------------------------------------------------------------
    def tick(self, now: float) -> None:
        for done in complete_due(self.store, now, self.settings.series.stable_age_s,
                                 self._listening_since):
            s = done.series
            log.info("series %s complete (%s, %d instances%s)", s.series_uid, s.modality,
                     s.instance_count, ", re-opened by late instances" if done.rerun else "")
            self.metrics.series_completed.labels(modality=s.modality).inc()
            if s.modality == "PT":
                self._new_job(s.series_uid, now, rerun=done.rerun)
            elif s.modality == "MR":
                self._retrigger(s, now)
        for job in self.store.jobs([JobState.WAITING_FOR_MR]):
            self._match(job, now)
        while self.executor.free_slots() > 0 and not self._stop.is_set():
            job = self.store.claim_next_queued(now)
            if job is None:
                break
            try:
                self.executor.submit(job.id, lambda job=job: self._run_job(job))
            except ExecutorBusy:  # cannot happen with free slots; put it back rather than lose it
                self.store.transition(job.id, JobState.QUEUED, now)
                break
        self._deliver(now)
        self._retain(now)

    def _retain(self, now: float) -> None:
        """Retention: the scheduled sweep every sweep_interval_s, and the emergency sweep as
        soon as the spool falls below its emergency mark."""
        if self.retention is None:
            return
        self.retention.emergency()
        if now >= self._next_sweep:
            self._next_sweep = now + self.settings.retention.sweep_interval_s
            self.retention.sweep(now)

    def _new_job(self, pet_uid: str, now: float, *, rerun: bool) -> None:
        m = self.settings.method
        job = self.store.create_job(pet_uid, method=m.name, params=self.settings.dip_params(), now=now,
                                    state=JobState.WAITING_FOR_MR, rerun=rerun)
        log.info("job %d for PET series %s: %s", job.id, pet_uid, job.state.value)
        pet = self.store.series(pet_uid)
        if pet is not None and pet.conflict and job.state is JobState.WAITING_FOR_MR:
            # Two patients (or studies, frames of reference, modalities) in one series: never
            # processed. The reason names UIDs and attributes only (node/jobs/store.py).
            reason = f"series {pet_uid} is not one consistent series: {pet.conflict}; not processed"
            job = self.store.transition(job.id, JobState.FAILED, now, reason=reason)
            log.warning("job %d failed: %s", job.id, reason)
        if rerun:
            # An earlier job of this PET that has not started yet would compute the same
            # series again and send a second result with other UIDs: the re-run replaces it.
            # (Only this scheduler thread claims jobs, so none of these can start meanwhile.)
            for old in self.store.jobs([JobState.WAITING_FOR_MR, JobState.QUEUED], pet_series_uid=pet_uid):
                if old.id != job.id:
                    self.store.transition(old.id, JobState.FAILED, now, move=Move.SUPERSEDED, expect=old.state,
                                          reason=f"superseded by job {job.id}: late instances re-opened the series")
                    log.info("job %d superseded by job %d", old.id, job.id)

    def _match(self, job: JobRow, now: float) -> None:
        pet = self.store.series(job.pet_series_uid)
        if pet is None:
            self.store.transition(job.id, JobState.FAILED, now, reason="PET series vanished from the index")
            return
        candidates = self.store.related_series(pet.study_uid, pet.patient_id, pet.issuer)
        fetch = self.store.fetch(job.id) if self.retriever is not None else None
        decision = decide(pet, candidates, now, self.settings, method=job.method,
                          listening_since=self._listening_since,
                          passed_over=self.store.passed_over(job.id), fetch=fetch)
        if decision.kind is DecisionKind.WAIT:
            return
        if decision.kind is DecisionKind.FETCH:
            if fetch is None:
                self.store.request_fetch(job.id, now)
            else:
                self.store.fetch_again(job.id, now, decision.reason)
            log.info("job %d: %s", job.id, decision.reason)
            if self.retriever is not None:
                self.retriever.wake()
            return
        no_mr = decision.kind in (DecisionKind.FALLBACK, DecisionKind.FAIL)
        self.store.set_mr_choice(job.id, decision.choice, no_mr=no_mr, now=now)
        if decision.kind is DecisionKind.FAIL:
            self.store.transition(job.id, JobState.FAILED, now, reason=decision.reason)
            log.warning("job %d failed: %s", job.id, decision.reason)
            return
        method = decision.method or job.method  # the job's, or Gaussian as a fallback
        self.metrics.mr_wait_seconds.observe(max(0.0, now - job.created_at))
        self.store.transition(job.id, JobState.QUEUED, now, method=method,
                              mr_series_uid=decision.mr.series_uid if decision.mr else None,
                              reason=decision.reason or None)
        log.info("job %d queued: %s%s", job.id, method.value,
                 f" with MR {decision.mr.series_uid}" if decision.mr else "")

    def _retrigger(self, mr: SeriesRow, now: float) -> None:
        """A complete MR re-triggers the PETs of its patient whose latest job fell back or failed
        for lack of a usable MR (a new job, new output series); jobs that had a proper MR, and
        jobs still waiting (they will see this MR anyway), are left alone."""
        if not self.settings.method.name.needs_mr:
            return
        rules = MatchRules.from_settings(self.settings)
        for pet in self.store.related_series(mr.study_uid, mr.patient_id, mr.issuer):
            if pet.modality != "PT" or pet.state is not SeriesState.COMPLETE:
                continue
            jobs = self.store.jobs(pet_series_uid=pet.series_uid)
            if not jobs or not jobs[-1].no_mr or jobs[-1].state is JobState.WAITING_FOR_MR:
                continue
            why = ineligible_reason(pet, mr, rules)
            if why is not None:
                log.debug("MR %s does not re-trigger PET %s: %s", mr.series_uid, pet.series_uid, why)
                continue
            old = jobs[-1]
            job = self.store.create_job(pet.series_uid, method=self.settings.method.name,
                                        params=self.settings.dip_params(), now=now,
                                        state=JobState.WAITING_FOR_MR, rerun=True)
            log.info("MR %s arrived late: job %d re-runs PET %s (job %d had no MR: %s)", mr.series_uid,
                     job.id, pet.series_uid, old.id, old.state.value)
            if old.state is JobState.QUEUED:
                # Not started: its Gaussian result would only come second to the real one.
                self.store.transition(old.id, JobState.FAILED, now, move=Move.SUPERSEDED, expect=JobState.QUEUED,
                                      reason=f"superseded by job {job.id}: an MR arrived ({mr.series_uid})")

    # -- a job on a worker -----------------------------------------------------------------
    def _run_job(self, job: JobRow) -> None:
        out_dir = self.outputs / f"job-{job.id}"
        shutil.rmtree(out_dir, ignore_errors=True)  # a resumed job starts its outputs afresh
        params, method = job.params, job.method
        last = [0.0]

        def progress(epoch: int, epochs: int, loss: float) -> None:
            if self._stop.is_set():
                raise Stopping  # leave the job RUNNING: the next start resumes it
            t = time.monotonic()
            if t - last[0] >= 2.0 or epoch == epochs:  # at most one write every 2 s
                last[0] = t
                self.store.set_progress(job.id, epoch / epochs, time.time())

        o = self.settings.output
        pet_no, map_no, plain_no = output_series_numbers(
            (o.series_number_pet or 0, o.series_number_map or 0, o.series_number_map_plain or 0),
            self.store.study_job_index(job.id))
        options = pipeline.OutputOptions(
            series_number_pet=pet_no, series_number_map=map_no, series_number_map_plain=plain_no,
            description_prefix=o.description_prefix, research=o.research, uid_seed=job.uid_seed)
        try:
            pet_paths = self.store.series_instances(job.pet_series_uid)
            mr_paths = self.store.series_instances(job.mr_series_uid) if job.mr_series_uid else None
            log.info("job %d running: %s on PET %s", job.id, method.value, job.pet_series_uid)
            started = time.monotonic()
            result = pipeline.run(pet_paths, mr_paths, out_dir, method=method, params=params,
                                  options=options, progress=progress,
                                  snapshot_epochs=self._snapshot_epochs)
        except Stopping:
            log.info("job %d interrupted by the stop; it resumes at the next start", job.id)
            return
        except pipeline.MrUnusableError as exc:
            if self._stop.is_set():
                return
            # Never a failed job while another MR may serve: pass this one over, choose again.
            self.store.pass_over_mr(job.id, job.mr_series_uid or "", str(exc), time.time())
            log.warning("job %d: MR %s passed over (%s); choosing again", job.id, job.mr_series_uid, exc)
            return
        except Exception as exc:  # any failure ends this job with its reason, never the node
            if self._stop.is_set():
                return
            reason = f"{type(exc).__name__}: {exc}"
            log.error("job %d failed: %s", job.id, reason)
            self.store.transition(job.id, JobState.FAILED, time.time(), reason=reason[:2000])
            return
        if self._stop.is_set():  # stopping: leave it RUNNING, the next start resumes it
            return
        if self._observer is not None:
            self._observer(job.id, result)
        self._summarise(job.id, result, time.monotonic() - started)
        now = time.time()
        self.store.transition(job.id, JobState.SENDING, now, progress=1.0, output_dir=str(out_dir))
        self._hand_over(job.id, str(out_dir), now)

    def _summarise(self, job_id: int, result: pipeline.PipelineResult, seconds: float) -> None:
        """Trust numbers, registration and timings into the job, one log line, thumbnails for
        the status page. Never fails the job: its results are already written."""
        self.metrics.fit_seconds.labels(method=result.method.value).observe(seconds)
        try:
            summary = job_summary.summary(result, seconds)
            self.store.set_report(job_id, summary)
            log.info("%s", job_summary.summary_line(job_id, summary))
            job_summary.write_thumbnails(result, self.thumbnails / f"job-{job_id}.png")
        except Exception:  # noqa: BLE001 - the page lacks a number; the results stand
            log.exception("job %d: trust numbers or thumbnails could not be made", job_id)

    def _hand_over(self, job_id: int, out_dir: str, now: float) -> None:
        """A SENDING job gets one pending delivery per destination, or is DONE without any."""
        dests = [d.label for d in self.settings.destinations]
        if dests:
            self.store.add_deliveries(job_id, dests, now)
        else:
            self.store.transition(job_id, JobState.DONE, now, reason="no destinations configured; "
                                  f"results kept in {out_dir}")

    # -- delivery with retries -------------------------------------------------------------
    def _deliver(self, now: float) -> None:
        s = self.settings.sender
        for d in self.store.due_deliveries(now):
            if self._stop.is_set():
                return
            job = self.store.job(d.job_id)
            files = sorted(Path(job.output_dir).rglob("*.dcm")) if job.output_dir else []
            if not files or job.outputs_purged_at is not None:
                self.store.delivery_result(d.job_id, d.destination, now, ok=False, next_attempt_at=None,
                                           error="results missing on disk" if job.outputs_purged_at is None
                                           else "results deleted by retention")
                self.metrics.dead_letters_total.inc()
                continue
            t0 = time.monotonic()
            report = send_files(files, Peer.parse(d.destination), **wire.sender_options(self.settings, d.destination))
            self.metrics.send_seconds.observe(time.monotonic() - t0)
            ok = report.all_ok
            error = None if ok else (report.error or f"{report.n_failed} instances refused")
            attempts = d.attempts + 1
            retry_at = None
            if not ok and attempts <= s.retries:
                retry_at = time.time() + min(s.backoff_s * 2 ** (attempts - 1), s.backoff_max_s)
            row = self.store.delivery_result(d.job_id, d.destination, time.time(), ok=ok,
                                             error=error, next_attempt_at=retry_at)
            if not ok:
                (self.metrics.sender_retries if retry_at else self.metrics.dead_letters_total).inc()
            log.info("job %d -> %s: %s%s", d.job_id, d.destination,
                     "delivered" if ok else f"failed ({error})",
                     "" if ok or retry_at else ", gave up (dead letter)")
            if row.state is JobState.DONE and row.output_dir:
                shutil.rmtree(row.output_dir, ignore_errors=True)  # every destination has it


    # -- what the HTTP port asks (node/http.py Site) ------------------------------------------
    def health(self) -> dict[str, str | None]:
        """/healthz: each check -> None when fine, else why not."""
        checks: dict[str, str | None] = {}
        try:
            self.store.check_writable()
            checks["database"] = None
        except (sqlite3.Error, StoreError) as exc:
            checks["database"] = f"not writable: {exc}"
        try:
            free = shutil.disk_usage(self.spool.root).free
            checks["spool"] = (None if free >= self.spool.min_free_bytes else
                               f"{free // 1048576} MB free, below the mark of {self.spool.min_free_bytes // 1048576} MB")
        except OSError as exc:
            checks["spool"] = f"unreadable: {exc}"
        alive = self._scheduler is not None and self._scheduler.is_alive() and not self._stop.is_set()
        checks["workers"] = None if alive else "the scheduler is not running"
        return checks

    def page_view(self, admin_csrf: Callable[[int], str] | None) -> PageView:
        jobs = self.store.jobs()
        unfinished = [j for j in jobs if not j.state.terminal]
        finished = [j for j in jobs if j.state.terminal][-200:]  # the page shows the latest 200
        series: dict[str, SeriesRow | None] = {}

        def one(uid: str | None) -> SeriesRow | None:
            if uid is None:
                return None
            if uid not in series:
                series[uid] = self.store.series(uid)
            return series[uid]

        views = tuple(JobView(j, one(j.pet_series_uid), one(j.mr_series_uid), tuple(self.store.deliveries(j.id)),
                              (self.thumbnails / f"job-{j.id}.png").is_file())
                      for j in (*finished, *unfinished))
        try:
            free: int | None = shutil.disk_usage(self.spool.root).free
        except OSError:
            free = None
        return PageView(
            ae_title=self.settings.node.ae_title, version=f"dipnode {software_version()}",
            counts=self.store.job_counts(), dead_letters=self.store.dead_letter_count(),
            spool_free_bytes=free, refuse_below_bytes=self.spool.min_free_bytes,
            emergency_below_bytes=(self.retention.policy.emergency_free_bytes if self.retention else None),
            last_sweep=self._last_sweep, jobs=views, refresh_s=self.settings.http.refresh_s,
            admin_csrf=None if admin_csrf is None else {v.job.id: admin_csrf(v.job.id) for v in views})

    def thumbnail(self, job_id: int) -> Path | None:
        path = self.thumbnails / f"job-{job_id}.png"
        return path if path.is_file() else None

    def rerun(self, job_id: int) -> str:
        new = admin.request_rerun(self.store, self.settings, job_id, method=None, preset_name=None, overrides={})
        return f"job {new} queued (re-run of job {job_id})"

    def resend(self, job_id: int) -> str:
        n = admin.request_resend(self.store, job_id)
        return f"job {job_id}: {n} deliveries queued again"


def output_series_numbers(configured: tuple[int, int, int], study_job_index: int) -> tuple[int, int, int]:
    """Series Numbers for the n-th job of a study (n = ``study_job_index``, from 0).

    Two PET series of one study (or a re-run) must not come back under one number: the n-th
    job adds n times the span of the configured numbers (highest - lowest + 1) to each, so the
    blocks never overlap - with the defaults 1001-1003, then 1004-1006, ... Unset (0) stays 0.
    The index counts every job of the study in job order, so a job's numbers never change.
    """
    used = [n for n in configured if n]
    span = max(used) - min(used) + 1
    offset = study_job_index * span
    return tuple(n + offset if n else 0 for n in configured)  # type: ignore[return-value]


def serve(settings: Settings) -> int:
    """Run until SIGTERM or SIGINT; a stop leaves unfinished jobs to resume at the next start.

    Raises node.lock.NodeLocked when another node holds the spool or the database."""
    for handler in logging.getLogger().handlers:
        # Values from the wire reach the log escaped and cut, wherever they are logged.
        handler.addFilter(SafeValuesFilter())
    node = Node(settings)
    stopping = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping", signum)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    node.start()
    print(f"dipnode listening as {settings.node.ae_title} on {settings.node.host}:{node.port}",
          flush=True)
    stopping.wait()
    node.stop()
    return 0
