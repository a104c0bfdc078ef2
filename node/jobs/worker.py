"""The worker: from complete series to finished jobs. A complete series (node/ingest/completion.py
says which) makes a job (a PET) or re-triggers jobs that lacked an MR (an MR); one scheduling
step matches waiting jobs (PET to MR, or a fetch of a prior MR) and starts queued jobs on the
executor; a job runs the pipeline and hands its results to delivery. All state is in the
store, so a restart resumes where it stopped."""
from __future__ import annotations

import functools
import logging
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

from dipnode.models.denoise import DipOutOfMemoryError
from dipnode.models.params import DipParams, Method
from dipnode.node.jobs import pipeline, summary
from dipnode.node.jobs.executor import ClusterUnavailable, Executor, ExecutorBusy, LocalExecutor
from dipnode.node.jobs.rows import JobRow, JobState, Move, SeriesRow, SeriesState
from dipnode.node.jobs.store import Store
from dipnode.node.jobs.matching import DecisionKind, MatchRules, decide, ineligible_reason
from dipnode.node.jobs.retrieval import Retriever
from dipnode.node.settings import Settings

log = logging.getLogger(__name__)

__all__ = ["Runner", "Stopping", "Worker"]

#: What runs one job: :func:`node.pipeline.run` (a caller such as the demo may wrap it).
Runner = Callable[..., pipeline.PipelineResult]


def executor_for(settings: Settings) -> Executor:
    """The executor ``[workers] executor`` names: "local" (threads of this process) or "ray"
    (a Ray cluster, node/jobs/ray_executor.py; Ray itself is imported only by its driver)."""
    if settings.workers.executor == "ray":
        from dipnode.node.jobs.ray_executor import RayExecutor

        return RayExecutor.from_settings(settings.workers)
    return LocalExecutor(settings.workers.max_concurrent_jobs)


class Stopping(Exception):
    """Raised from a running fit's progress callback when the node is asked to stop."""


class Worker:
    """Schedules and runs jobs. ``step(now)`` is one scheduling pass (the node's scheduler
    thread calls it; tests call it by hand).

    hand_over(job_id, out_dir, now): gives a SENDING job to delivery.
    run: runs one job's pipeline (default :func:`node.pipeline.run`).
    thumbnails: where each computed job's thumbnails go (``job-N.png``; None: none made).
    on_queued(seconds waited for the MR), on_computed(method, seconds): for the metrics.
    """

    def __init__(self, settings: Settings, store: Store, outputs: Path, *,
                 hand_over: Callable[[int, str, float], None], stopping: threading.Event,
                 retriever: Retriever | None = None, run: Runner = pipeline.run,
                 thumbnails: Path | None = None, on_queued: Callable[[float], None] | None = None,
                 on_computed: Callable[[str, float], None] | None = None) -> None:
        self.settings = settings
        self.store = store
        self.outputs = outputs
        self.executor = executor_for(settings)  # threads here, or a Ray cluster
        self.retriever = retriever
        self.listening_since: float | None = None  # set when the receiver listens
        self._hand_over = hand_over
        self._stopping = stopping
        self._run = run
        self.thumbnails = thumbnails
        self._on_queued = on_queued
        self._on_computed = on_computed

    # -- one scheduling step ---------------------------------------------------------------
    def series_complete(self, series: SeriesRow, now: float, *, rerun: bool) -> None:
        """A series just became complete (``rerun``: re-opened by late instances)."""
        log.info("series %s complete (%s, %d instances%s)", series.series_uid, series.modality,
                 series.instance_count, ", re-opened by late instances" if rerun else "")
        if series.modality == "PT":
            self._new_job(series.series_uid, now, rerun=rerun)
        elif series.modality == "MR":
            self.retrigger(series, now)

    def step(self, now: float) -> None:
        """Match the waiting jobs, then start queued jobs while the executor has room."""
        for job in self.store.jobs([JobState.WAITING_FOR_MR]):
            self._match(job, now)
        while self.executor.free_slots() > 0 and not self._stopping.is_set():
            job = self.store.claim_next_queued(now)
            if job is None:
                break
            try:
                self.executor.submit(job.id, lambda job=job: self._run_job(job))
            except ExecutorBusy:  # cannot happen with free slots; put it back rather than lose it
                self.store.transition(job.id, JobState.QUEUED, now)
                break

    def shutdown(self) -> None:
        """Wait for running jobs (a fit stops at its next epoch once ``stopping`` is set)."""
        self.executor.shutdown(wait=True)

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
                          listening_since=self.listening_since,
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
        if self._on_queued is not None:
            self._on_queued(max(0.0, now - job.created_at))
        self.store.transition(job.id, JobState.QUEUED, now, method=method,
                              mr_series_uid=decision.mr.series_uid if decision.mr else None,
                              reason=decision.reason or None)
        log.info("job %d queued: %s%s", job.id, method.value,
                 f" with MR {decision.mr.series_uid}" if decision.mr else "")

    def retrigger(self, mr: SeriesRow, now: float) -> None:
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

    # -- a job on a worker thread ----------------------------------------------------------
    def _run_job(self, job: JobRow) -> None:
        out_dir = self.outputs / f"job-{job.id}"
        shutil.rmtree(out_dir, ignore_errors=True)  # a resumed job starts its outputs afresh
        last = [0.0]
        method, params, fallback = job.method, job.params, None

        def progress(epoch: int, epochs: int, loss: float) -> None:
            if self._stopping.is_set():
                raise Stopping  # leave the job RUNNING: the next start resumes it
            t = time.monotonic()
            if t - last[0] >= 2.0 or epoch == epochs:  # at most one write every 2 s
                last[0] = t
                self.store.set_progress(job.id, epoch / epochs, time.time())

        try:
            options = pipeline.OutputOptions.from_settings(
                self.settings.output, study_job_index=self.store.study_job_index(job.id), uid_seed=job.uid_seed)
            pet_paths = self.store.series_instances(job.pet_series_uid)
            mr_paths = self.store.series_instances(job.mr_series_uid) if job.mr_series_uid else None
            log.info("job %d running: %s on PET %s", job.id, job.method.value, job.pet_series_uid)
            compute = functools.partial(self.executor.compute, job.id)
            started = time.monotonic()
            try:
                result = self._run(pet_paths, mr_paths, out_dir, method=method, params=params,
                                   options=options, progress=progress, compute=compute)
            except DipOutOfMemoryError as oom:
                method, params, fallback = self._after_oom(job.id, oom, method, params)
                shutil.rmtree(out_dir, ignore_errors=True)
                result = self._run(pet_paths, mr_paths, out_dir, method=method, params=params,
                                   options=options, progress=progress, compute=compute)
        except Stopping:
            log.info("job %d interrupted by the stop; it resumes at the next start", job.id)
            return
        except ClusterUnavailable as exc:
            if self._stopping.is_set():
                return
            if exc.requeue:  # [workers] ray_unreachable = "wait": back in the queue, run later
                # (the reason keeps the MR choice; the log says why it waits)
                self.store.transition(job.id, JobState.QUEUED, time.time(), progress=0.0)
                log.warning("job %d back in the queue: %s", job.id, exc.reason)
            else:
                self.store.transition(job.id, JobState.FAILED, time.time(), reason=exc.reason[:2000])
                log.error("job %d failed: %s", job.id, exc.reason)
            return
        except pipeline.MrUnusableError as exc:
            if self._stopping.is_set():
                return
            # Never a failed job while another MR may serve: pass this one over, choose again.
            self.store.pass_over_mr(job.id, job.mr_series_uid or "", str(exc), time.time())
            log.warning("job %d: MR %s passed over (%s); choosing again", job.id, job.mr_series_uid, exc)
            return
        except Exception as exc:  # any failure ends this job with its reason, never the node
            if self._stopping.is_set():
                return
            reason = f"{type(exc).__name__}: {exc}"
            log.error("job %d failed: %s", job.id, reason)
            self.store.transition(job.id, JobState.FAILED, time.time(), reason=reason[:2000])
            return
        if self._stopping.is_set():  # stopping: leave it RUNNING, the next start resumes it
            return
        self._summarise(job.id, result, time.monotonic() - started)
        now = time.time()
        self.store.transition(job.id, JobState.SENDING, now, progress=1.0, output_dir=str(out_dir),
                              reason=fallback, method=method if fallback else None,
                              params=params if fallback else None)
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
            instead = "ran on the CPU instead (on_oom = cpu)"
        else:
            method = Method.GAUSSIAN
            instead = "OSEM + Gaussian instead (on_oom = gaussian)"
        # The outcome first: the log shortens long values, and the error is the long part.
        log.warning("job %d out of memory: %s; %s", job_id, instead, oom)
        return method, params, f"{oom}; {instead}"[:2000]

    def _summarise(self, job_id: int, result: pipeline.PipelineResult, seconds: float) -> None:
        """Trust numbers, registration and timings into the job, one log line, thumbnails for
        the status page (node/jobs/summary.py). Never fails the job: its results are written."""
        if self._on_computed is not None:
            self._on_computed(result.method.value, seconds)
        try:
            numbers = summary.summary(result, seconds)
            self.store.set_report(job_id, numbers)
            log.info("%s", summary.summary_line(job_id, numbers))
            if self.thumbnails is not None:
                summary.write_thumbnails(result, self.thumbnails / f"job-{job_id}.png")
        except Exception:  # noqa: BLE001 - the page lacks a number; the results stand
            log.exception("job %d: trust numbers or thumbnails could not be made", job_id)
