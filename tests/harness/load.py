"""Load: many concurrent associations, each a whole PET series, into a node that runs a job
(``bench/load.py`` is its command line).

A small PET/MR study goes in first and the bench waits until its job is RUNNING (the fit is
long: the tiny preset with many epochs); then ``--associations`` senders each open ONE
association at the same moment (a barrier) and push a ``--slices``-slice PET series of
``--size`` x ``--size`` pixels. Senders are DCMTK storescu processes (the scanner of the
real peers, docs/DESIGN.md "Real peers and test data") or, with ``--sender pynetdicom``,
pynetdicom SCU threads in this process: those lose C-STORE responses under CPU load (the response is logged as received by
the association's reader thread, yet send_c_store times out), see bench/RELIABILITY.md. Checked: every instance answered with success (none refused,
none lost), every one on disk and in the index (harness.soak.check_state), the
associations really overlapped, the job stayed RUNNING throughout. Measured: wall time and
instances/s, the node's resident memory sampled from /proc/<pid>/status (VmRSS every 20 ms)
before and during the load, and its VmHWM (peak RSS of the process lifetime).

Why memory is bounded: pynetdicom assembles one C-STORE data set at a time per association
(the P-DATA fragments of the current message), the handler hands those bytes to the spool,
which writes and fsyncs them before answering, and the reference is dropped: the receive side
holds O(associations x instance size), never a series. The limit on associations
([node] max_associations, default 10) therefore bounds receive memory.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dipnode.dicom_io.scu import Destination, send_files
from dipnode.sim.dicom_study import new_study, write_pet_series
from harness.soak import _start_node, check_state, instance_key, make_studies, soak_settings
from nodeproc import NODE_AET, job_states, proc_status_kib
from peers import DCMTK_BIN, free_port

__all__ = ["LoadResult", "RssSampler", "run_load", "table"]


class RssSampler(threading.Thread):
    """Samples a process's VmRSS until stopped; ``peak_kib`` is the largest sample."""

    def __init__(self, pid: int, every_s: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.pid, self.every_s = pid, every_s
        self.peak_kib = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            v = proc_status_kib(self.pid)
            if v is not None:
                self.peak_kib = max(self.peak_kib, v)
            self._stop_event.wait(self.every_s)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return self.peak_kib


@dataclass(frozen=True)
class LoadResult:
    associations: int
    slices: int
    size: int
    instance_bytes: int
    sent: int
    acked: int
    refused: int
    lost: int  # sent but neither acknowledged nor refused
    on_disk: int
    indexed: int
    max_overlap: int  # associations open at the same moment
    wall_s: float
    per_s: float
    job_running_throughout: bool
    rss_before_kib: int
    rss_peak_during_kib: int
    vm_hwm_kib: int
    problems: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return not self.problems


def _series(root: Path, n: int, slices: int, size: int) -> list[list[Path]]:
    rng = np.random.default_rng(7)
    out = []
    for i in range(n):
        vol = rng.gamma(2.0, 500.0, size=(slices, size, size))
        out.append(write_pet_series(vol, np.diag([2.0, 2.0, 2.0, 1.0]), root / f"load{i:02d}",
                                    study=new_study(f"LOAD{i:02d}", seed=i)))
    return out


@dataclass(frozen=True)
class _Outcome:
    """What one sender saw: acknowledged file paths, refused count, association error."""

    ok_paths: tuple[str, ...]
    refused: int


def _push_pynetdicom(files: list[Path], dest: Destination, aet: str) -> _Outcome:
    # One association per sender: every file is PET Image Storage, one presentation context.
    r = send_files(files, dest, calling_ae=aet, timeout_s=60.0)
    return _Outcome(tuple(x.path_or_uid for x in r.results if x.ok),
                    sum(1 for x in r.results if x.status is not None and not x.ok))


_DCMTK_RSP = re.compile(r"Received Store Response \((\w+)")


def _push_storescu(files: list[Path], dest: Destination, aet: str) -> _Outcome:
    # DCMTK storescu, one process and one association per sender; -v prints one
    # "Received Store Response (Success)" per acknowledged instance, in order.
    cmd = [shutil.which("storescu", path=DCMTK_BIN) or "storescu", "-v", "-aet", aet, "-aec", dest.ae_title,
           "-to", "60", "-ta", "60", "-td", "60", dest.host, str(dest.port), *map(str, files)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TCP_NODELAY": "1"})
    statuses = _DCMTK_RSP.findall(done.stdout + done.stderr)
    ok = [str(f) for f, st in zip(files, statuses) if st == "Success"]
    return _Outcome(tuple(ok), sum(1 for st in statuses if st != "Success"))


def run_load(out: Path, *, associations: int = 8, slices: int = 112, size: int = 64,
             job_epochs: int = 400, sender: str = "storescu",
             say: Callable[[str], None] = print) -> LoadResult:
    if associations < 1 or slices < 1:
        raise ValueError(f"run_load: expected associations >= 1 and slices >= 1, got {associations}, {slices}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    background = make_studies(out / "background", 1, slices=16, size=16)[0] if job_epochs else None
    series = _series(out / "load", associations, slices, size)
    port = free_port()
    # 3 s: the background MR (no expected count) completes by stable age; PET by count.
    cfg = soak_settings(out, port, stable_age_s=3.0,
                        method={"name": "sdip", "preset": "tiny", "epochs": max(job_epochs, 4)})
    database, spool = out / "dipnode.sqlite", out / "spool"
    say(f"data written in {time.monotonic() - t_start:.1f} s")
    node = _start_node(cfg, port, out / "node.log")
    say(f"node answering C-ECHO after {node.ready_s:.1f} s")
    problems: list[str] = []
    try:
        dest = Destination(NODE_AET, "127.0.0.1", port)
        running_before = False
        if background is not None:  # job_epochs=0: no job, receiving alone (a memory baseline)
            bg = send_files(background.files, dest, calling_ae="BACKGROUND")
            if not bg.all_ok:
                problems.append(f"background study not stored: {bg.error}")
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and "running" not in job_states(database):
                time.sleep(0.1)
            running_before = "running" in job_states(database)
        say(f"background job running: {running_before} ({time.monotonic() - t_start:.1f} s)")
        rss_before = proc_status_kib(node.pid) or 0
        sampler = RssSampler(node.pid)
        sampler.start()
        barrier = threading.Barrier(associations)
        spans: list[tuple[float, float]] = [(0.0, 0.0)] * associations
        reports: list[_Outcome] = [_Outcome((), 0)] * associations
        push_one = _push_storescu if sender == "storescu" else _push_pynetdicom

        def push(i: int) -> None:
            barrier.wait()
            t = time.monotonic()
            reports[i] = push_one(series[i], dest, f"LOAD{i:02d}")
            spans[i] = (t, time.monotonic())

        threads = [threading.Thread(target=push, args=(i,)) for i in range(associations)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.monotonic() - t0
        peak_during = sampler.stop()
        running_after = "running" in job_states(database)
        vm_hwm = proc_status_kib(node.pid, "VmHWM") or 0
    finally:
        rc = node.stop()
    if rc != 0:
        problems.append(f"clean stop exited with {rc}")
    say(f"load {wall:.1f} s, node stopped ({time.monotonic() - t_start:.1f} s)")
    sent = associations * slices
    acked = sum(len(r.ok_paths) for r in reports)
    refused = sum(r.refused for r in reports)
    lost = sent - acked - refused
    if refused:
        problems.append(f"{refused} instances refused")
    if lost:
        problems.append(f"{lost} instances lost (no response)")
    keys = {instance_key(p) for s in series for p in s}
    acked_keys = {instance_key(Path(p)) for r in reports for p in r.ok_paths}
    check = check_state(spool, database, acked_keys, parse_all=False)
    problems += list(check.problems)
    if acked_keys != keys:
        problems.append(f"{len(keys - acked_keys)} instances not acknowledged")
    # Largest number of associations open at once, from the senders' own clocks.
    events = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans])
    overlap = best = 0
    for _, d in events:
        overlap += d
        best = max(best, overlap)
    released = len(re.findall(rf"association from LOAD\d\d at \S+ released, {slices} instance",
                              (out / "node.log").read_text(errors="replace")))
    if released != associations:
        problems.append(f"node log: {released} of {associations} load associations released with "
                        f"{slices} instances stored")
    if job_epochs and not (running_before and running_after):
        problems.append(f"background job not RUNNING throughout (before {running_before}, after {running_after})")
    return LoadResult(
        associations=associations, slices=slices, size=size,
        instance_bytes=series[0][0].stat().st_size, sent=sent, acked=acked, refused=refused,
        lost=lost, on_disk=check.on_disk, indexed=check.indexed, max_overlap=best,
        wall_s=round(wall, 2), per_s=round(sent / wall, 1),
        job_running_throughout=running_before and running_after, rss_before_kib=rss_before,
        rss_peak_during_kib=peak_during, vm_hwm_kib=vm_hwm, problems=tuple(problems))


def table(r: LoadResult) -> str:
    rows = [
        ("associations x slices (size)", f"{r.associations} x {r.slices} ({r.size}x{r.size})"),
        ("instance file size (bytes)", f"{r.instance_bytes}"),
        ("sent / acknowledged", f"{r.sent} / {r.acked}"),
        ("refused / lost", f"{r.refused} / {r.lost}"),
        ("on disk / indexed", f"{r.on_disk} / {r.indexed}"),
        ("max associations open at once", f"{r.max_overlap}"),
        ("job RUNNING throughout", f"{r.job_running_throughout}"),
        ("wall (s) / instances per s", f"{r.wall_s} / {r.per_s}"),
        ("RSS before load (MiB)", f"{r.rss_before_kib / 1024:.1f}"),
        ("RSS peak during load (MiB)", f"{r.rss_peak_during_kib / 1024:.1f}"),
        ("VmHWM, process lifetime (MiB)", f"{r.vm_hwm_kib / 1024:.1f}"),
        ("problems", f"{len(r.problems)}"),
    ]
    w = max(len(a) for a, _ in rows)
    return "\n".join(f"| {a:<{w}} | {b:>22} |" for a, b in rows)
