"""Crash soak: SIGKILL a running `dipnode serve` at random moments while several senders stream
studies in and jobs run, restart it, and check after every kill that nothing acknowledged was
lost and nothing partial is taken for whole (``bench/crash_soak.py`` is its command line).

Checks after every kill (the node is down, so the files and the database are quiescent):
- every instance a sender saw acknowledged with success is in the spool at its final path AND
  in the store index - the node answers success only after both (ingest/receiver.py);
- SQLite's integrity check answers ``ok``;
- every indexed path lies under ``instances/``, parses with pydicom (pixels included) and holds
  the SOP Instance UID it is indexed under; every file under ``instances/`` parses whole and is
  named after its own SOP Instance UID (no temp or partial file is taken for a whole one).
At the end (no more kills, senders finished, node stopped cleanly) the same checks run, and
also: every instance was acknowledged, every job is DONE or FAILED with a reason, every PET
series has a job, and ``incoming/`` holds no temp file.

The database is read through a read-only Store, never with SQL of our own.
"""
from __future__ import annotations

import random
import re
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from dipnode.dicom_io.scu import Destination, send_files
from dipnode.models.params import Method
from dipnode.node.jobs.rows import JobRow, JobState
from dipnode.node.jobs.store import Store
from dipnode.sim.dicom_study import new_study, write_mr_series, write_pet_series
from nodeproc import NODE_AET, NodeProcess, job_states, node_settings
from peers import LOOPBACK, StorescpPeer, free_port

__all__ = ["SOAK_BASE", "CheckResult", "InstanceKey", "KillRecord", "Sender", "SoakResult", "SoakStudy",
           "check_state", "instance_key", "make_studies", "run_soak", "soak_settings", "spool_path", "table"]

TERMINAL = ("done", "failed")

# A soak/load node: loopback, any caller, quick completion.
SOAK_BASE: dict[str, dict[str, Any]] = {
    # Every sender here shares 127.0.0.1: the per-address limit is the node's whole limit.
    "node": {"ae_title": NODE_AET, "host": LOOPBACK, "allowed_calling_aets": ["*"],
             "max_associations_per_address": 10},
    "storage": {"min_free_mb": 0},
    "series": {"stable_age_s": 2.0, "check_interval_s": 0.2},
    # Long MR wait: the soak's kills come every few seconds, and an MR series needs a stable age
    # of uptime to complete, so a short wait would turn SDIP jobs into Gaussian fallbacks (the
    # wait itself does not count downtime).
    "matching": {"mr_wait_s": 600.0, "fallback": "gaussian"},
    "method": {"device": "cpu"},
    "sender": {"retries": 50, "backoff_s": 0.2, "backoff_max_s": 1.0, "timeout_s": 10.0},
}


def soak_settings(workdir: Path, port: int, *, method: dict[str, object],
                  destinations: Sequence[tuple[str, int]] = (), stable_age_s: float = 2.0,
                  extra: dict[str, dict[str, object]] | None = None) -> Path:
    """A settings file for a soak, load or hostile-peer node (nodeproc.node_settings, SOAK_BASE)."""
    sections: dict[str, dict[str, Any]] = {"series": {"stable_age_s": stable_age_s}}
    for name, values in (extra or {}).items():
        sections.setdefault(name, {}).update(values)
    return node_settings(workdir, port=port, method=method, base=SOAK_BASE,
                         destinations=[{"ae_title": aet, "host": LOOPBACK, "port": p} for aet, p in destinations],
                         **sections)


# -- test data -------------------------------------------------------------------------------

@dataclass(frozen=True)
class SoakStudy:
    """One synthetic study to push: its PET files (and MR files for the MR-conditioned methods)."""

    pet_files: tuple[Path, ...]
    mr_files: tuple[Path, ...]
    pet_series_uid: str

    @property
    def files(self) -> tuple[Path, ...]:
        return self.pet_files + self.mr_files


def make_studies(root: Path, count: int, *, slices: int = 16, size: int = 16,
                 with_mr: bool = True, seed: int = 0) -> list[SoakStudy]:
    """``count`` studies of one patient each: a ``slices`` x ``size`` x ``size`` PET (and MR)."""
    if count < 1 or slices < 2 or size < 4:
        raise ValueError(f"make_studies: expected count >= 1, slices >= 2, size >= 4, "
                         f"got {count}, {slices}, {size}")
    rng = np.random.default_rng(seed)
    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    out = []
    for i in range(count):
        study = new_study(f"SOAK{i:03d}", seed=f"{seed}-{i}")
        base = np.zeros((slices, size, size))
        c = size // 2
        base[:, c // 2:c + c // 2, c // 2:c + c // 2] = 4000.0  # a "brain" block
        pet = rng.poisson(base / 50.0 + 2.0) * 50.0
        pet_files = write_pet_series(pet, affine, root / f"study{i:03d}" / "pet", study=study)
        mr_files: list[Path] = []
        if with_mr:
            mr_files = write_mr_series(base + 100.0, affine, root / f"study{i:03d}" / "mr", study=study)
        uid = str(pydicom.dcmread(pet_files[0], stop_before_pixels=True).SeriesInstanceUID)
        out.append(SoakStudy(tuple(pet_files), tuple(mr_files), uid))
    return out


# -- senders ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class InstanceKey:
    sop_instance_uid: str
    study_uid: str
    series_uid: str


def instance_key(path: Path) -> InstanceKey:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return InstanceKey(str(ds.SOPInstanceUID), str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID))


class Sender(threading.Thread):
    """A scanner: pushes its groups of files (a study each) one after another, ``gap_s``
    apart (pynetdicom C-STORE SCU, one association per attempt), and re-sends whatever was not
    acknowledged until everything is, as a modality would.

    ``acked`` holds the instances this sender saw answered with a success status; ``refused``
    the non-success statuses (an instance refused while the node was up: never expected).
    """

    def __init__(self, name: str, groups: Sequence[Sequence[Path]], port: int, *, deadline_s: float,
                 gap_s: float = 0.0, retry_s: float = 0.3) -> None:
        super().__init__(name=name, daemon=True)
        self.groups = [list(g) for g in groups]
        self.files = [p for g in self.groups for p in g]
        self.keys = {str(p): instance_key(p) for p in self.files}
        self.destination = Destination(NODE_AET, LOOPBACK, port)
        self.deadline = time.monotonic() + deadline_s
        self.cancel = threading.Event()  # set by the soak when it ends early
        self.gap_s, self.retry_s = gap_s, retry_s
        self._lock = threading.Lock()
        self._acked: set[InstanceKey] = set()
        self.refused: list[tuple[str, int]] = []
        self.attempts = 0
        self.lost_associations = 0

    def acked(self) -> set[InstanceKey]:
        with self._lock:
            return set(self._acked)

    @property
    def finished(self) -> bool:
        return len(self.acked()) == len(self.files)

    def run(self) -> None:
        for i, group in enumerate(self.groups):
            if self.gap_s and i and self.cancel.wait(self.gap_s):
                return  # cancelled; otherwise the next study comes later, overlapping jobs
            self._send(group)

    def _send(self, files: list[Path]) -> None:
        pending = list(files)
        while pending and time.monotonic() < self.deadline and not self.cancel.is_set():
            self.attempts += 1
            report = send_files(pending, self.destination, calling_ae=self.name[:16], timeout_s=10.0)
            ok_labels = set()
            for r in report.results:
                if r.ok:
                    ok_labels.add(r.path_or_uid)
                elif r.status is not None:
                    self.refused.append((r.sop_instance_uid, r.status))
            with self._lock:
                self._acked.update(self.keys[p] for p in ok_labels)
            if not report.association_ok:
                self.lost_associations += 1
            pending = [p for p in pending if str(p) not in ok_labels]
            if pending:
                self.cancel.wait(self.retry_s)  # the node is down or restarting: try again shortly


# -- checks ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class CheckResult:
    acked: int
    on_disk: int  # acknowledged instances found at their final spool path
    indexed: int  # acknowledged instances found in the index
    index_rows: int
    integrity: str
    jobs: dict[str, int]
    problems: tuple[str, ...]


def spool_path(spool: Path, k: InstanceKey) -> Path:
    """Where the spool keeps an instance (node/ingest/spool.py's layout)."""
    return spool / "instances" / k.study_uid / k.series_uid / f"{k.sop_instance_uid}.dcm"


def check_state(spool: Path, database: Path, acked: set[InstanceKey], *,
                parse_all: bool = True) -> CheckResult:
    """Check the spool and the index against what senders saw acknowledged (node not running)."""
    problems: list[str] = []
    with Store.open_readonly(database) as store:
        integrity = store.integrity_check()
        rows = store.indexed_instances()
        all_jobs = store.jobs()
    if integrity != "ok":
        problems.append(f"integrity_check: {integrity}")
    jobs = dict(Counter(j.state.value for j in all_jobs))
    problems += [f"job {j.id} failed without a reason" for j in all_jobs
                 if j.state is JobState.FAILED and not j.reason]
    on_disk = indexed = 0
    for k in acked:
        if spool_path(spool, k).is_file():
            on_disk += 1
        else:
            problems.append(f"acknowledged {k.sop_instance_uid} missing from the spool")
        if k.sop_instance_uid in rows:
            indexed += 1
        else:
            problems.append(f"acknowledged {k.sop_instance_uid} missing from the index")
    instances_root = (spool / "instances").resolve()
    acked_uids = {k.sop_instance_uid for k in acked}
    for uid, p in rows.items():
        if instances_root not in p.resolve().parents or p.suffix != ".dcm":
            problems.append(f"indexed {uid} at {p}: not a final spool name")
            continue
        if not parse_all and uid not in acked_uids:
            continue
        problems += _check_file(p, uid)
    if parse_all:
        indexed_paths = {str(p) for p in rows.values()}
        for p in (spool / "instances").rglob("*"):
            if p.is_file() and str(p) not in indexed_paths:
                # A whole file whose index row never committed (killed between the spool and
                # the index): allowed, the sender saw no success; it must still be whole.
                problems += _check_file(p, p.stem)
    return CheckResult(len(acked), on_disk, indexed, len(rows), integrity, jobs, tuple(problems))


def _check_file(path: Path, uid: str) -> list[str]:
    try:
        ds = pydicom.dcmread(path)
        _ = ds.PixelData  # read to the end: a truncated file fails here
        n = int(ds.Rows) * int(ds.Columns) * int(ds.BitsAllocated) // 8 * int(getattr(ds, "NumberOfFrames", 1) or 1)
        if len(ds.PixelData) < n:
            return [f"{path}: pixel data truncated ({len(ds.PixelData)} < {n} bytes)"]
    except Exception as exc:  # noqa: BLE001 - any parse failure is the finding
        return [f"{path}: unreadable: {type(exc).__name__}: {exc}"]
    if str(ds.SOPInstanceUID) != uid:
        return [f"{path}: holds SOP Instance UID {ds.SOPInstanceUID}, indexed as {uid}"]
    return []


def jobs_of(database: Path) -> list[JobRow]:
    """Every job, oldest first (read-only)."""
    with Store.open_readonly(database) as store:
        return store.jobs()


# -- the soak --------------------------------------------------------------------------------

@dataclass(frozen=True)
class KillRecord:
    n: int
    phase: str  # what was going on: receiving and/or job states at the moment of the kill
    after_s: float  # seconds after the node answered C-ECHO
    acked: int
    on_disk: int
    indexed: int
    problems: int


@dataclass(frozen=True)
class SoakResult:
    kills: int
    seed: int
    studies: int
    sent: int  # distinct instances the senders had to deliver
    acked: int
    on_disk: int
    indexed: int
    index_rows: int
    jobs_done: int
    jobs_failed: int
    jobs_other: int
    pet_series_without_job: int
    temp_files_removed: int  # partial files found in incoming/ and deleted at restarts
    kills_during_job: int  # kills while a job was RUNNING or SENDING
    kills_while_receiving: int
    pacs_files: int  # distinct result instances the PACS holds (-1: no PACS)
    pacs_expected: int
    restarts_ready_s: tuple[float, ...]
    elapsed_s: float
    kill_log: tuple[KillRecord, ...]
    problems: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return not self.problems


def run_soak(out: Path, *, kills: int, seed: int, studies: int, senders: int = 3,
             slices: int = 16, size: int = 16, method: str = "sdip", epochs: int = 12,
             gap_s: float = 10.0, pacs: bool = True,
             final_timeout_s: float = 300.0, say: Callable[[str], None] = print) -> SoakResult:
    """Stream ``studies`` studies from ``senders`` threads, SIGKILL the node ``kills`` times at
    seeded random moments, restart it each time, then let everything finish and check."""
    if kills < 0 or studies < 1 or senders < 1:
        raise ValueError(f"run_soak: expected kills >= 0, studies >= 1, senders >= 1, "
                         f"got {kills}, {studies}, {senders}")
    rng = random.Random(seed)
    t0 = time.monotonic()
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    data = make_studies(out / "data", studies, slices=slices, size=size,
                        with_mr=method != "gaussian", seed=seed)
    port = free_port()
    sink = StorescpPeer(out / "pacs", aet="PACS") if pacs else None
    # tiny preset: a few L-BFGS epochs of a 2-level U-Net: a job runs ~seconds, kills land in it.
    cfg = soak_settings(out, port, method={"name": method, "preset": "tiny", "epochs": epochs},
                        destinations=[(sink.aet, sink.port)] if sink else ())
    spool, database, log_path = out / "spool", out / "dipnode.sqlite", out / "node.log"
    # Studies are dealt to senders round-robin; each sender starts a little later than the one
    # before so that receiving overlaps running jobs across several kill cycles.
    per_sender: list[list[tuple[Path, ...]]] = [[] for _ in range(senders)]
    for i, st in enumerate(data):
        per_sender[i % senders].append(st.files)
    deadline = 60.0 + 15.0 * kills + final_timeout_s
    threads = [Sender(f"SCANNER{i}", groups, port, deadline_s=deadline, gap_s=gap_s)
               for i, groups in enumerate(per_sender) if groups]
    all_keys = {k for t in threads for k in t.keys.values()}
    node: NodeProcess | None = None
    try:
        node = _start_node(cfg, port, log_path)
        ready = [node.ready_s]
        for t in threads:
            t.start()

        def acked() -> set[InstanceKey]:
            return set().union(*(t.acked() for t in threads))

        problems: list[str] = []
        kill_log: list[KillRecord] = []
        for n in range(1, kills + 1):
            receiving = not all(t.finished for t in threads)
            if receiving and rng.random() < 0.6:
                wait = rng.uniform(0.05, 2.0)  # somewhere in the middle of the stream
            else:
                # Wait for a job to be running (or sending), then kill somewhere inside it.
                until = time.monotonic() + 8.0
                while time.monotonic() < until and not {"running", "sending"} & set(job_states(database)):
                    time.sleep(0.05)
                # Up to 4 s: long enough, some of the time, for series to complete by stable age
                # (2 s of uptime; completion.is_due does not count downtime) and jobs to finish.
                wait = rng.uniform(0.0, 4.0)
            time.sleep(wait)
            states = sorted(set(job_states(database)) - set(TERMINAL))
            phase = ("receiving" if not all(t.finished for t in threads) else "idle-net") + \
                ("+" + "/".join(states) if states else "")
            after = time.monotonic() - node.started_s - node.ready_s
            node.kill()
            check = check_state(spool, database, acked())
            problems += [f"kill {n}: {p}" for p in check.problems]
            kill_log.append(KillRecord(n, phase, round(after, 2), check.acked, check.on_disk,
                                       check.indexed, len(check.problems)))
            say(f"kill {n:3d} [{phase:28s}] acked {check.acked:5d} on disk {check.on_disk:5d} "
                f"indexed {check.indexed:5d} problems {len(check.problems)}")
            node = _start_node(cfg, port, log_path)
            ready.append(node.ready_s)

        # No more kills: let the senders finish and every job settle.
        for t in threads:
            t.join(timeout=max(1.0, final_timeout_s - (time.monotonic() - t0)))
        n_pet = studies

        def settled() -> bool:
            states = job_states(database)
            return len(states) >= n_pet and all(s in TERMINAL for s in states)

        until = time.monotonic() + final_timeout_s
        while time.monotonic() < until and not settled():
            time.sleep(0.3)
        if not settled():
            problems.append(f"jobs not settled after {final_timeout_s} s: {sorted(job_states(database))}")
        rc = node.stop()
        if rc != 0:
            problems.append(f"clean stop exited with {rc}")
    except BaseException:
        # Leave nothing behind: no node, no PACS, no sender still retrying in the background.
        for t in threads:
            t.cancel.set()
        if node is not None:
            node.kill()
        if sink is not None:
            sink.stop()
        raise
    pacs_files = -1
    if sink is not None:
        sink.stop()
        pacs_files = len(sink.files())
    final_acked = acked()
    check = check_state(spool, database, final_acked)
    problems += [f"final: {p}" for p in check.problems]
    if final_acked != all_keys:
        problems.append(f"final: {len(all_keys - final_acked)} instances never acknowledged")
    for t in threads:
        problems += [f"{t.name}: {uid} refused with status 0x{st:04X}" for uid, st in t.refused]
    leftovers = list((spool / "incoming").glob("*"))
    if leftovers:
        problems.append(f"final: {len(leftovers)} temp files left in incoming/")
    jobs = jobs_of(database)
    with_job = {j.pet_series_uid for j in jobs}
    missing = [st.pet_series_uid for st in data if st.pet_series_uid not in with_job]
    problems += [f"final: PET series {uid} has no job" for uid in missing]
    with_done = {j.pet_series_uid for j in jobs if j.state is JobState.DONE}
    problems += [f"final: PET series {st.pet_series_uid} has no done job" for st in data
                 if st.pet_series_uid in with_job and st.pet_series_uid not in with_done]
    done = sum(1 for j in jobs if j.state is JobState.DONE)
    failed = sum(1 for j in jobs if j.state is JobState.FAILED)
    # Each done job delivers a derived PET and a plain stability map per slice plus its
    # Parametric Map; the blending methods (sdip, sdip-paper) add the data weight, plain per
    # slice and as a Parametric Map. Output UIDs are per job, so a job re-executed after a
    # kill overwrites its own files. The Gaussian baseline writes the derived PET only.
    per_job = {Method.GAUSSIAN: slices, Method.CDIP: 2 * slices + 1}
    pacs_expected = sum(per_job.get(j.method, 3 * slices + 2) for j in jobs if j.state is JobState.DONE)
    if sink is not None and pacs_files != pacs_expected:
        problems.append(f"final: PACS holds {pacs_files} result instances, expected {pacs_expected}")
    removed = sum(int(m) for m in re.findall(r"recovered: (\d+) partial files removed",
                                              log_path.read_text(errors="replace")))
    for j in jobs:
        if j.state is JobState.FAILED:
            say(f"job {j.id} failed: {j.reason}")
    return SoakResult(
        kills=kills, seed=seed, studies=studies, sent=len(all_keys), acked=check.acked,
        on_disk=check.on_disk, indexed=check.indexed, index_rows=check.index_rows,
        jobs_done=done, jobs_failed=failed, jobs_other=len(jobs) - done - failed,
        pet_series_without_job=len(missing), temp_files_removed=removed,
        kills_during_job=sum(1 for k in kill_log if "running" in k.phase or "sending" in k.phase),
        kills_while_receiving=sum(1 for k in kill_log if k.phase.startswith("receiving")),
        pacs_files=pacs_files, pacs_expected=pacs_expected, restarts_ready_s=tuple(round(r, 2) for r in ready),
        elapsed_s=round(time.monotonic() - t0, 1), kill_log=tuple(kill_log), problems=tuple(problems))


def table(r: SoakResult) -> str:
    rows = [
        ("kills survived", f"{r.kills}"),
        ("  while receiving / during a job", f"{r.kills_while_receiving} / {r.kills_during_job}"),
        ("temp files removed at restarts", f"{r.temp_files_removed}"),
        ("instances sent (distinct)", f"{r.sent}"),
        ("acknowledged (success)", f"{r.acked}"),
        ("acknowledged and on disk", f"{r.on_disk}"),
        ("acknowledged and indexed", f"{r.indexed}"),
        ("index rows", f"{r.index_rows}"),
        ("jobs done / failed / other", f"{r.jobs_done} / {r.jobs_failed} / {r.jobs_other}"),
        ("PET series without a job", f"{r.pet_series_without_job}"),
        ("PACS result files / expected", f"{r.pacs_files} / {r.pacs_expected}"),
        ("restart to C-ECHO (median s)", f"{sorted(r.restarts_ready_s)[len(r.restarts_ready_s) // 2]:.2f}"),
        ("problems", f"{len(r.problems)}"),
        ("elapsed (s)", f"{r.elapsed_s}"),
    ]
    w = max(len(a) for a, _ in rows)
    return "\n".join(f"| {a:<{w}} | {b:>15} |" for a, b in rows)




def _start_node(config: Path, port: int, log_path: Path) -> NodeProcess:
    # The soak's own C-ECHO title; SOAK_NODE_VERBOSITY=-vv logs UIDs (debug) for a post-mortem.
    import os

    return NodeProcess(config, port, log_path, echo_aet="SOAKECHO",
                       verbosity=os.environ.get("SOAK_NODE_VERBOSITY", "-v"))
