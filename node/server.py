"""`dipnode serve`: the running node.

Threads: the receiver (pynetdicom's, one per association) only spools and indexes; one
scheduler thread completes series, matches PET to MR, starts jobs on the executor and
delivers results. All state lives in the store, so a restart resumes where it stopped.
"""
from __future__ import annotations

import logging
import shutil
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

from dipnode.dicom_io.scp import ReceivedInstance, start_receiver
from dipnode.dicom_io.scu import Destination as Peer
from dipnode.dicom_io.scu import send_files
from dipnode.dicom_io.status import Status, StoreRefused
from dipnode.models.denoise import DipOutOfMemoryError
from dipnode.models.params import DipParams, Method
from dipnode.node import pipeline, wire
from dipnode.node.completion import complete_due, instance_record
from dipnode.node.executor import ExecutorBusy, LocalExecutor
from dipnode.node.matching import DecisionKind, decide
from dipnode.node.settings import Settings
from dipnode.node.spool import Spool, read_header
from dipnode.node.store import JobRow, JobState, Store

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
        self.settings = settings
        self._observer = observer
        self._snapshot_epochs = snapshot_epochs
        self.store = Store.open(settings.storage.database)
        self.spool = Spool(settings.storage.spool_dir,
                           min_free_bytes=settings.storage.min_free_mb * 1024 * 1024)
        self.outputs = Path(settings.storage.spool_dir) / "outputs"
        self.executor = LocalExecutor(settings.workers.max_concurrent_jobs)
        self._stop = threading.Event()
        self._receiver = None
        self._scheduler: threading.Thread | None = None
        self._listening_since: float | None = None  # set by start()

    # -- receiving: spool before success, then index ---------------------------------------
    def on_store(self, instance: ReceivedInstance) -> Status:
        stored = self.spool.store(instance)  # durable before we answer; raises StoreRefused
        record = instance_record(stored.header, stored.path, instance.transfer_syntax_uid)
        new = self.store.record_instance(record, time.time())
        log.debug("stored %s (series %s)%s", instance.sop_instance_uid, record.series_uid,
                  "" if new else " again (duplicate)")
        return Status.SUCCESS

    # -- life cycle ------------------------------------------------------------------------
    def start(self) -> None:
        removed = self.spool.recover()
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
        self._receiver = start_receiver(wire.receiver_config(self.settings), self.on_store)
        # Series interrupted by the downtime get a full stable age from now (completion.is_due).
        self._listening_since = time.time()
        self._scheduler = threading.Thread(target=self._loop, name="dipnode-scheduler", daemon=True)
        self._scheduler.start()
        log.info("dipnode %s listening as %s on %s:%d", pipeline.software_version(),
                 self.settings.node.ae_title, self.settings.node.host, self.port)

    def index_orphans(self) -> int:
        """Index whole spool files that the index lacks: a kill between the spool's rename and
        the index write leaves one (the sender saw no success and may never re-send it)."""
        known = self.store.indexed_paths()
        found = 0
        for path in sorted(self.spool.instances.rglob("*.dcm")):
            if path in known:
                continue
            try:
                header = read_header(path.read_bytes())
                ts = str(header.file_meta.TransferSyntaxUID)
            except (StoreRefused, OSError, AttributeError) as exc:
                log.warning("spool file %s is not indexable (%s); left in place", path, exc)
                continue
            self.store.record_instance(instance_record(header, path, ts), time.time())
            found += 1
        if found:
            log.info("indexed %d spool files the index lacked (stored before a crash)", found)
        return found

    @property
    def port(self) -> int:
        return self._receiver.port if self._receiver else self.settings.node.port

    def stop(self) -> None:
        """Stop receiving and scheduling; a running fit stops at its next epoch and stays
        RUNNING in the store, so the next start re-queues it."""
        self._stop.set()
        if self._receiver is not None:
            self._receiver.stop()
        if self._scheduler is not None:
            self._scheduler.join(timeout=60)
        self.executor.shutdown(wait=True)
        self.store.close()

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
            if s.modality == "PT":
                self._new_job(s.series_uid, now, rerun=done.rerun)
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

    def _new_job(self, pet_uid: str, now: float, *, rerun: bool) -> None:
        m = self.settings.method
        job = self.store.create_job(pet_uid, method=m.name.value,
                                    params=self.settings.dip_params().as_dict(), now=now,
                                    state=JobState.WAITING_FOR_MR, rerun=rerun)
        log.info("job %d for PET series %s: %s", job.id, pet_uid, job.state.value)
        if rerun:
            # An earlier job of this PET that has not started yet would compute the same
            # series again and send a second result with other UIDs: the re-run replaces it.
            # (Only this scheduler thread claims jobs, so none of these can start meanwhile.)
            for old in self.store.jobs([JobState.WAITING_FOR_MR, JobState.QUEUED], pet_series_uid=pet_uid):
                if old.id != job.id:
                    self.store.transition(old.id, JobState.FAILED, now, expect=old.state,
                                          reason=f"superseded by job {job.id}: late instances re-opened the series")
                    log.info("job %d superseded by job %d", old.id, job.id)

    def _match(self, job: JobRow, now: float) -> None:
        pet = self.store.series(job.pet_series_uid)
        if pet is None:
            self.store.transition(job.id, JobState.FAILED, now, reason="PET series vanished from the index")
            return
        candidates = self.store.related_series(pet.study_uid, pet.patient_id, pet.issuer)
        decision = decide(pet, candidates, now, self.settings, method=Method(job.method),
                          listening_since=self._listening_since)
        if decision.kind is DecisionKind.WAIT:
            return
        if decision.kind is DecisionKind.FAIL:
            self.store.transition(job.id, JobState.FAILED, now, reason=decision.reason)
            log.warning("job %d failed: %s", job.id, decision.reason)
            return
        method = decision.method or Method(job.method)  # the job's, or Gaussian as a fallback
        self.store.transition(job.id, JobState.QUEUED, now, method=method.value,
                              mr_series_uid=decision.mr.series_uid if decision.mr else None,
                              reason=decision.reason or None)
        log.info("job %d queued: %s%s", job.id, method.value,
                 f" with MR {decision.mr.series_uid}" if decision.mr else "")

    # -- a job on a worker -----------------------------------------------------------------
    def _run_job(self, job: JobRow) -> None:
        out_dir = self.outputs / f"job-{job.id}"
        shutil.rmtree(out_dir, ignore_errors=True)  # a resumed job starts its outputs afresh
        params = DipParams(**job.params)
        method = Method(job.method)
        last = [0.0]

        def progress(epoch: int, epochs: int, loss: float) -> None:
            if self._stop.is_set():
                raise Stopping  # leave the job RUNNING: the next start resumes it
            t = time.monotonic()
            if t - last[0] >= 2.0 or epoch == epochs:  # at most one write every 2 s
                last[0] = t
                self.store.set_progress(job.id, epoch / epochs, time.time())

        o = self.settings.output
        options = pipeline.OutputOptions(
            series_number_pet=o.series_number_pet or 0, series_number_map=o.series_number_map or 0,
            series_number_map_plain=o.series_number_map_plain or 0,
            series_number_weight=o.series_number_weight or 0,
            series_number_weight_plain=o.series_number_weight_plain or 0,
            description_prefix=o.description_prefix, research=o.research, uid_seed=job.uid_seed)
        fallback: str | None = None
        try:
            pet_paths = self.store.series_instances(job.pet_series_uid)
            mr_paths = self.store.series_instances(job.mr_series_uid) if job.mr_series_uid else None
            log.info("job %d running: %s on PET %s", job.id, method.value, job.pet_series_uid)
            try:
                result = pipeline.run(pet_paths, mr_paths, out_dir, method=method, params=params,
                                      options=options, progress=progress,
                                      snapshot_epochs=self._snapshot_epochs)
            except DipOutOfMemoryError as oom:
                method, params, fallback = self._after_oom(job.id, oom, method, params)
                shutil.rmtree(out_dir, ignore_errors=True)
                result = pipeline.run(pet_paths, mr_paths, out_dir, method=method, params=params,
                                      options=options, progress=progress,
                                      snapshot_epochs=self._snapshot_epochs)
        except Stopping:
            log.info("job %d interrupted by the stop; it resumes at the next start", job.id)
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
        now = time.time()
        self.store.transition(job.id, JobState.SENDING, now, progress=1.0, output_dir=str(out_dir),
                              reason=fallback, method=method.value,
                              params=params.as_dict() if fallback else None)
        self._hand_over(job.id, str(out_dir), now)

    def _after_oom(self, job_id: int, oom: DipOutOfMemoryError, method: Method,
                   params: DipParams) -> tuple[Method, DipParams, str]:
        """[workers] on_oom: re-raise ("fail": the job fails with the reason), or the method and
        parameters to run the job again with, and the note its record keeps."""
        policy = self.settings.workers.on_oom
        if policy == "fail":
            raise oom
        if policy == "cpu":
            # No memory limit on the host; the rest of the method is unchanged (same seed and
            # schedule), so the result is the one the device would have given, only slower.
            params = params.replace(device="cpu", memory_limit_mb=0)
            note = f"{oom}; ran on the CPU instead (on_oom = cpu)"
        else:
            method = Method.GAUSSIAN
            note = f"{oom}; OSEM + Gaussian instead (on_oom = gaussian)"
        log.warning("job %d: %s", job_id, note)
        return method, params, note[:2000]

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
            if not files:
                self.store.delivery_result(d.job_id, d.destination, now, ok=False,
                                           error="results missing on disk", next_attempt_at=None)
                continue
            report = send_files(files, Peer.parse(d.destination), **wire.sender_options(self.settings, d.destination))
            ok = report.all_ok
            error = None if ok else (report.error or f"{report.n_failed} instances refused")
            attempts = d.attempts + 1
            retry_at = None
            if not ok and attempts <= s.retries:
                retry_at = time.time() + min(s.backoff_s * 2 ** (attempts - 1), s.backoff_max_s)
            row = self.store.delivery_result(d.job_id, d.destination, time.time(), ok=ok,
                                             error=error, next_attempt_at=retry_at)
            log.info("job %d -> %s: %s%s", d.job_id, d.destination,
                     "delivered" if ok else f"failed ({error})",
                     "" if ok or retry_at else ", gave up (dead letter)")
            if row.state is JobState.DONE and row.output_dir:
                shutil.rmtree(row.output_dir, ignore_errors=True)  # every destination has it


def serve(settings: Settings) -> int:
    """Run until SIGTERM or SIGINT; a stop leaves unfinished jobs to resume at the next start."""
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
