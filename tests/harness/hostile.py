"""Hostile and buggy peers against a real `dipnode serve`: every attack, the node's answer, and
whether it kept serving (C-ECHO + a DCMTK storescu store) and restarted on the same spool
(``bench/hostile.py`` is its command line).

The node runs as a child process (nodeproc.NodeProcess) with small limits so that each attack
meets one: max_associations 6, max_associations_per_address 3, request_timeout_s 2,
max_instance_mb 2, Gaussian method (no fit in the way). After every attack: C-ECHO, a good
2-slice PET series stored with DCMTK storescu (from 127.0.0.1, as a scanner), then SIGTERM,
a fresh start on the same spool and database, and the same check again. Peers that must not
be mistaken for the scanner connect from other loopback addresses (127.0.0.2 ...).

``--rss``: ten associations at once, each from its own address, against a node with the
shipped limits (max_associations 10, max_instance_mb 64): (a) ten data sets of 96 MiB (cut
at 64 MiB and refused), (b) ten of 62 MiB (accepted: the largest legal instance), (c) ten
deflated ones of 62 MiB that do not compress (the worst accepted case: wire buffer, file
bytes and inflated copy), (d) ten deflate bombs (0.5 MB inflating to 512 MiB). The node's
VmRSS is sampled every 20 ms.

tests/node/test_hostile.py runs every attack as a test (same checks).
"""
from __future__ import annotations

import json
import os
import random
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian,
                         ImplicitVRLittleEndian, RLELossless, generate_uid)
from pynetdicom import AE, _config

from dipnode.dicom_io.intake import dataset_bytes
from dipnode.dicom_io.scu import Destination, echo
from dipnode.dicom_io.status import describe
from dipnode.node.jobs.store import Store
from dipnode.sim.crafted import associate_rq, deflate_bomb, file_bytes, pet_dataset, write_file
from harness.load import RssSampler
from harness.soak import _start_node, soak_settings
from nodeproc import NODE_AET, proc_status_kib
from peers import DCMTK_BIN, LOOPBACK, free_port

PET = "1.2.840.10008.5.1.4.1.1.128"
MIB = 1 << 20
ALLOWED = ["STORESCU", "SOAKECHO", "HOSTILE", "GOOD"]
LIMITS = {"max_associations": 6, "max_associations_per_address": 3, "request_timeout_s": 2.0,
          "max_instance_mb": 2, "idle_timeout_s": 20.0}


# -- the node under attack -------------------------------------------------------------------

class Target:
    """A running node and what the attacks need to reach it and check on it."""

    def __init__(self, workdir: Path, node_settings: dict[str, object] | None = None) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        node = {"allowed_calling_aets": ALLOWED, **LIMITS, **(node_settings or {})}
        self.config = soak_settings(self.workdir, self.port, method={"name": "gaussian", "preset": "tiny"},
                                    stable_age_s=1.0, extra={"node": node})
        self.database = self.workdir / "dipnode.sqlite"
        self.spool = self.workdir / "spool"
        self.log = self.workdir / "node.log"
        self.files = self.workdir / "files"
        self.files.mkdir(exist_ok=True)
        self._n = 0
        self.node = _start_node(self.config, self.port, self.log)

    def path(self, name: str) -> Path:
        self._n += 1
        return self.files / f"{self._n:04d}-{name}"

    def restart(self) -> bool:
        """SIGTERM, then a fresh start on the same spool and database; True when it answers."""
        if self.node.stop() != 0:
            return False
        try:
            self.node = _start_node(self.config, self.port, self.log)
        except (RuntimeError, TimeoutError):
            return False
        return True

    def stop(self) -> int:
        return self.node.stop()

    def good_store(self) -> bool:
        """A 2-slice PET series with DCMTK storescu from 127.0.0.1: both acknowledged."""
        study, series, frame = generate_uid(), generate_uid(), generate_uid()
        paths = []
        for z in (0.0, 2.0):
            ds = pet_dataset(StudyInstanceUID=study, SeriesInstanceUID=series, FrameOfReferenceUID=frame,
                             ImagePositionPatient=[0.0, 0.0, z])
            paths.append(write_file(self.path("good.dcm"), file_bytes(ds)))
        r = subprocess.run([str(Path(DCMTK_BIN) / "storescu"), "-v", "-aet", "GOOD", "-aec", NODE_AET,
                            LOOPBACK, str(self.port), *map(str, paths)],
                           capture_output=True, text=True, timeout=60,
                           env={**os.environ, "TCP_NODELAY": "1"})
        return r.returncode == 0 and (r.stdout + r.stderr).count("Received Store Response (Success)") == 2

    def serving(self) -> bool:
        return bool(echo(Destination(NODE_AET, LOOPBACK, self.port), calling_ae="SOAKECHO",
                         timeout_s=10).ok) and self.good_store()

    def indexed(self, sop_uid: str) -> bool:
        with Store.open_readonly(self.database) as store:
            return store.instance(sop_uid) is not None

    def jobs_of(self, series_uid: str) -> list[tuple[str, str | None]]:
        """(state, reason) of the jobs of a PET series, oldest first."""
        with Store.open_readonly(self.database) as store:
            return [(j.state.value, j.reason) for j in store.jobs(pet_series_uid=series_uid)]


# -- raw peers ---------------------------------------------------------------------------------

def _sock(t: Target, source: str = LOOPBACK) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((source, 0))
    s.connect((LOOPBACK, t.port))
    return s


def _closed_now(s: socket.socket) -> bool:
    """Whether the node has closed ``s`` (without waiting)."""
    s.setblocking(False)
    try:
        while True:
            if not s.recv(65536):
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        s.setblocking(True)


def _closed_after(s: socket.socket, limit_s: float) -> float | None:
    """Seconds until the node closed ``s`` (EOF or reset), None if still open after limit_s."""
    t0 = time.monotonic()
    s.settimeout(limit_s)
    try:
        while s.recv(65536):
            pass
    except socket.timeout:
        return None
    except OSError:
        pass
    return time.monotonic() - t0


@contextmanager
def raw_sending() -> Iterator[None]:
    """pynetdicom sends a file's data set as its bytes are (no decode and re-encode)."""
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        yield
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old


def store_raw(t: Target, paths: Sequence[Path], syntax: str = ExplicitVRLittleEndian, *,
              calling: str = "HOSTILE", source: str = LOOPBACK) -> list[int | str]:
    """C-STORE files as their bytes are, on one association: each status, or what went wrong."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(PET, [syntax])
    with raw_sending():
        assoc = ae.associate(LOOPBACK, t.port, ae_title=NODE_AET, bind_address=(source, 0))
        if not assoc.is_established:
            return ["rejected" if assoc.is_rejected else "no association"]
        out: list[int | str] = []
        try:
            for p in paths:
                rsp = assoc.send_c_store(p)
                out.append(int(rsp.Status) if "Status" in rsp else "no response")
        finally:
            assoc.release()
    return out


@dataclass(frozen=True)
class Outcome:
    answer: str
    as_expected: bool


def _statuses(codes: Sequence[int | str]) -> str:
    return ", ".join(describe(c) if isinstance(c, int) else c for c in codes)


def _pdu(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBL", kind, 0, len(body)) + body


# -- the attacks -----------------------------------------------------------------------------

def silent_connections(t: Target) -> Outcome:
    t0 = time.monotonic()
    socks = [_sock(t, "127.0.0.2") for _ in range(12)]
    try:
        time.sleep(0.5)
        quick = [_closed_now(s) for s in socks]
        during = t.good_store()  # a scanner from another address gets through meanwhile
        for s, q in zip(socks, quick):
            if not q:
                _closed_after(s, 10.0)
        held_for = time.monotonic() - t0
    finally:
        for s in socks:
            s.close()
    at_once = sum(quick)
    held = int(LIMITS["max_associations_per_address"]) + 1
    return Outcome(f"{at_once} closed at once (per-address limit), the other {12 - at_once} within "
                   f"{held_for:.1f} s (request timer {LIMITS['request_timeout_s']:g} s); storescu stored "
                   f"meanwhile: {during}",
                   at_once == 12 - held and held_for < LIMITS["request_timeout_s"] + 2 and during)


def connect_and_close(t: Target) -> Outcome:
    for _ in range(100):
        _sock(t, "127.0.0.3").close()
    t0 = time.monotonic()
    ok = echo(Destination(NODE_AET, LOOPBACK, t.port), calling_ae="SOAKECHO", timeout_s=5).ok
    took = time.monotonic() - t0
    return Outcome(f"100 bare connect-and-close: slots free at once (C-ECHO answered in {took:.2f} s)",
                   bool(ok) and took < 1.5)


def half_pdu(t: Target) -> Outcome:
    s = _sock(t, "127.0.0.4")
    try:
        s.sendall(struct.pack(">BBL", 0x01, 0, 200) + b"\x00\x01" + bytes(8))
        took = _closed_after(s, 15.0)
    finally:
        s.close()
    return Outcome(f"closed after {took:.1f} s (request timer)" if took is not None else "still open",
                   took is not None and took < LIMITS["request_timeout_s"] + 2)


def huge_pdu(t: Target) -> Outcome:
    s = _sock(t, "127.0.0.4")
    try:
        s.sendall(struct.pack(">BBL", 0x01, 0, 0xFFFFFFFF) + bytes(4096))
        took = _closed_after(s, 10.0)
    finally:
        s.close()
    return Outcome(f"closed after {took:.2f} s, body never read" if took is not None else "still open",
                   took is not None and took < 1.0)


def random_bytes(t: Target) -> Outcome:
    rng = random.Random(16)
    s = _sock(t, "127.0.0.4")
    try:
        try:
            s.sendall(bytes(rng.getrandbits(8) for _ in range(65536)))
        except OSError:
            pass  # closed while we were still sending: that is the answer
        took = _closed_after(s, 10.0)
    finally:
        s.close()
    return Outcome("closed" + (f" after {took:.2f} s" if took is not None else " (never)"),
                   took is not None and took < 3.0)


def pdata_before_request(t: Target) -> Outcome:
    s = _sock(t, "127.0.0.4")
    try:
        pdv = struct.pack(">LB", 2 + 4, 1) + b"\x03" + bytes(4)
        s.sendall(_pdu(0x04, pdv))
        reply = b""
        s.settimeout(5)
        try:
            reply = s.recv(64)
        except OSError:
            pass
        took = _closed_after(s, 10.0)
    finally:
        s.close()
    kind = {0x07: "A-ABORT", 0x03: "A-ASSOCIATE-RJ"}.get(reply[0] if reply else -1, "nothing")
    return Outcome(f"{kind}, connection closed", took is not None)


def control_bytes_in_ae_title(t: Target) -> Outcome:
    s = _sock(t, "127.0.0.4")
    try:
        s.sendall(associate_rq(b"DIPNODE", b"EVIL\x00\x01\x1b[2J"))
        s.settimeout(5)
        try:
            reply = s.recv(64)
        except OSError:
            reply = b""
        took = _closed_after(s, 10.0)
    finally:
        s.close()
    kind = {0x07: "A-ABORT", 0x03: "A-ASSOCIATE-RJ", 0x02: "A-ASSOCIATE-AC"}.get(reply[0] if reply else -1, "nothing")
    return Outcome(f"{kind} (undecodable request), connection closed", kind != "A-ASSOCIATE-AC" and took is not None)


def unknown_calling_ae(t: Target) -> Outcome:
    ae = AE(ae_title="INTRUDER")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate(LOOPBACK, t.port, ae_title=NODE_AET, bind_address=("127.0.0.5", 0))
    rejected = assoc.is_rejected
    if assoc.is_established:
        assoc.release()
    logged = "calling AE title INTRUDER not allowed" in t.log.read_text(errors="replace")
    return Outcome(f"A-ASSOCIATE-RJ (calling AE title not recognised); reason logged: {logged}",
                   rejected and logged)


def _associate_many(t: Target, n: int, sources: Sequence[str]) -> list[object]:
    out = []
    for i in range(n):
        ae = AE(ae_title="HOSTILE")
        ae.add_requested_context("1.2.840.10008.1.1")
        out.append(ae.associate(LOOPBACK, t.port, ae_title=NODE_AET,
                                bind_address=(sources[i % len(sources)], 0)))
    return out


def _one_over_the_limit(t: Target, limit: int, addresses: list[str], reason: str) -> tuple[int, bool, bool]:
    """limit + 1 associations from ``addresses``: (how many were accepted, whether the last was
    rejected, whether ``reason`` is in the node's log)."""
    assocs = _associate_many(t, limit + 1, addresses)
    try:
        up = sum(a.is_established for a in assocs)
        rejected = assocs[-1].is_rejected
    finally:
        for a in assocs:
            if a.is_established:
                a.release()
    return up, rejected, reason in t.log.read_text(errors="replace")


def too_many_from_one_address(t: Target) -> Outcome:
    limit = int(LIMITS["max_associations_per_address"])
    up, rejected, logged = _one_over_the_limit(t, limit, ["127.0.0.6"],
                                               "too many associations from address 127.0.0.6")
    return Outcome(f"{up} accepted, the next rejected (A-ASSOCIATE-RJ transient, local limit "
                   f"exceeded); reason logged: {logged}", up == limit and rejected and logged)


def too_many_in_all(t: Target) -> Outcome:
    n = int(LIMITS["max_associations"])
    up, rejected, logged = _one_over_the_limit(t, n, [f"127.0.1.{i}" for i in range(1, n + 2)],
                                               f"too many associations (max_associations = {n})")
    return Outcome(f"{up} accepted, the next rejected; reason logged: {logged}", up == n and rejected and logged)


def _one(t: Target, raw: bytes, syntax: str = ExplicitVRLittleEndian, name: str = "x.dcm") -> list[int | str]:
    return store_raw(t, [write_file(t.path(name), raw)], syntax, source="127.0.0.7")


def _refused_with(t: Target, codes: list[int | str], status: int, sop_uid: str) -> Outcome:
    stored = t.indexed(sop_uid)
    return Outcome(f"{_statuses(codes)}; stored: {stored}", codes == [status] and not stored)


def oversized_instance(t: Target) -> Outcome:
    ds = pet_dataset(Rows=1254, Columns=1254)  # 3 MiB of pixels, limit 2 MiB
    ds.PixelData = bytes(1254 * 1254 * 2)
    return _refused_with(t, _one(t, file_bytes(ds)), 0xA701, str(ds.SOPInstanceUID))


def deflate_bomb_attack(t: Target) -> Outcome:
    raw = deflate_bomb(512 * MIB)
    codes = _one(t, raw, DeflatedExplicitVRLittleEndian)
    out = _refused_with(t, codes, 0xA702, "")
    return Outcome(f"{len(raw) // 1024} kB inflating to 512 MiB: {out.answer}", out.as_expected)


def declared_pixels_too_large(t: Target) -> Outcome:
    ds = pet_dataset(Rows=65535, Columns=65535)  # 8 GiB once decoded; 128 bytes sent
    return _refused_with(t, _one(t, file_bytes(ds)), 0xA701, str(ds.SOPInstanceUID))


def implicit_under_explicit(t: Target) -> Outcome:
    ds = pet_dataset()
    raw = file_bytes(ds, ExplicitVRLittleEndian, encode_as=ImplicitVRLittleEndian)
    return _refused_with(t, _one(t, raw), 0xC001, str(ds.SOPInstanceUID))


def native_pixels_under_rle(t: Target) -> Outcome:
    ds = pet_dataset()
    raw = file_bytes(ds, RLELossless, encode_as=ExplicitVRLittleEndian)
    return _refused_with(t, _one(t, raw, RLELossless), 0xC001, str(ds.SOPInstanceUID))


def multi_valued_patient_id(t: Target) -> Outcome:
    ds = pet_dataset()
    ds.PatientID = ["A1", "B2"]
    return _refused_with(t, _one(t, file_bytes(ds)), 0xA900, str(ds.SOPInstanceUID))


def missing_modality(t: Target) -> Outcome:
    ds = pet_dataset(Modality=None)
    return _refused_with(t, _one(t, file_bytes(ds)), 0xC000, str(ds.SOPInstanceUID))


def huge_uid_with_nul(t: Target) -> Outcome:
    ds = pet_dataset(StudyInstanceUID="1." + "2" * 10000 + "\x00")
    out = _refused_with(t, _one(t, file_bytes(ds)), 0xC000, str(ds.SOPInstanceUID))
    return Outcome(out.answer + "; log line cut and escaped", out.as_expected and _log_clean(t))


def resent_other_content(t: Target) -> Outcome:
    ds = pet_dataset()
    first = _one(t, file_bytes(ds))
    ds.PixelData = bytes(128)
    second = _one(t, file_bytes(ds))
    return Outcome(f"first {_statuses(first)}, then {_statuses(second)} (first copy kept)",
                   first == [0] and second == [0x0111])


def resent_other_series(t: Target) -> Outcome:
    ds = pet_dataset()
    first = _one(t, file_bytes(ds))
    ds.SeriesInstanceUID = generate_uid()
    second = _one(t, file_bytes(ds))
    return Outcome(f"first {_statuses(first)}, then {_statuses(second)}; other series indexed: "
                   f"{bool(t.jobs_of(str(ds.SeriesInstanceUID)))}", first == [0] and second == [0x0111])


def resent_identical(t: Target) -> Outcome:
    raw = file_bytes(pet_dataset())
    codes = _one(t, raw) + _one(t, raw)
    return Outcome(f"{_statuses(codes)} (idempotent)", codes == [0, 0])


def two_patient_series(t: Target) -> Outcome:
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    raws = [file_bytes(pet_dataset(StudyInstanceUID=study, SeriesInstanceUID=series, FrameOfReferenceUID=frame,
                                   ImagePositionPatient=[0.0, 0.0, 2.0 * z],
                                   PatientID="PAT-A" if z < 2 else "PAT-B")) for z in range(4)]
    codes = store_raw(t, [write_file(t.path("mix.dcm"), r) for r in raws], source="127.0.0.7")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not any(s == "failed" for s, _ in t.jobs_of(series)):
        time.sleep(0.2)
    jobs = t.jobs_of(series)
    failed = [r for s, r in jobs if s == "failed"]
    ok = codes == [0] * 4 and len(jobs) == 1 and bool(failed) and "Patient ID" in (failed[0] or "")
    reason = failed[0] or "" if failed else str(jobs)
    shown_reason = reason[reason.find("differs"):] if "differs" in reason else reason[:80]
    return Outcome(f"stored ({_statuses(codes[:1])} x4); job failed: ...{shown_reason}", ok)


def abort_mid_data_set(t: Target) -> Outcome:
    ds = pet_dataset(Rows=4096, Columns=4096)
    ds.PixelData = bytes(4096 * 4096 * 2)  # 32 MiB: cut at 2 MiB while it streams
    path = write_file(t.path("abort.dcm"), file_bytes(ds))
    ae = AE(ae_title="HOSTILE")
    ae.add_requested_context(PET, [ExplicitVRLittleEndian])
    with raw_sending():
        assoc = ae.associate(LOOPBACK, t.port, ae_title=NODE_AET, bind_address=("127.0.0.8", 0))
        sender = threading.Thread(target=lambda: assoc.send_c_store(path), daemon=True)
        sender.start()
        time.sleep(0.2)
        assoc.abort()
        sender.join(timeout=30)
    return Outcome(f"A-ABORT mid data set: stored: {t.indexed(str(ds.SOPInstanceUID))}",
                   not t.indexed(str(ds.SOPInstanceUID)))


def mutate(raw: bytes, rng: random.Random) -> bytes:
    """A random mutation of the data set (the file meta is left alone: the sender reads it):
    bytes flipped or replaced, NULs, values cut, lengths made absurd."""
    buf = bytearray(raw)
    start = len(raw) - len(dataset_bytes(raw))
    for _ in range(rng.randint(1, 4)):
        at = rng.randrange(start, len(buf) - 1)
        kind = rng.choice(["flip", "byte", "nul", "length", "truncate"])
        if kind == "flip":
            buf[at] ^= 1 << rng.randrange(8)
        elif kind == "byte":
            buf[at] = rng.randrange(256)
        elif kind == "nul":
            buf[at] = 0
        elif kind == "length":
            value = rng.choice([1, 3, 0x7FFF, 0xFFFF, 0xFFFFFFF0, 0xFFFFFFFF])
            width = rng.choice([2, 4])
            buf[at:at + width] = value.to_bytes(4, "little")[:width]
        else:
            del buf[max(at, start + 64):]
    return bytes(buf)


def mutated_headers(t: Target, n: int = 100, seed: int = 16) -> Outcome:
    rng = random.Random(seed)
    counts: dict[str, int] = {}
    acked_not_indexed = 0
    for i in range(n):
        ds = pet_dataset()
        raw = mutate(file_bytes(ds), rng)
        codes = store_raw(t, [write_file(t.path(f"fuzz{i}.dcm"), raw)], source="127.0.0.9")
        key = _statuses(codes)
        counts[key] = counts.get(key, 0) + 1
        if codes == [0] and not t.indexed(str(ds.SOPInstanceUID)):
            acked_not_indexed += 1
    summary = "; ".join(f"{k}: {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
    answered = all("no response" not in k and "no association" not in k for k in counts)
    return Outcome(f"{n} mutated headers: {summary}; acknowledged but not indexed: {acked_not_indexed}",
                   answered and acked_not_indexed == 0)


def _log_clean(t: Target) -> bool:
    data = t.log.read_bytes()
    return b"\x00" not in data and b"\x1b" not in data and max(map(len, data.splitlines()), default=0) < 2000


ATTACKS: dict[str, Callable[[Target], Outcome]] = {
    "12 silent connections from one address": silent_connections,
    "100 bare connect-and-close": connect_and_close,
    "half a PDU, then silence": half_pdu,
    "PDU header announcing 4 GiB": huge_pdu,
    "64 KiB of random bytes": random_bytes,
    "P-DATA-TF before any A-ASSOCIATE-RQ": pdata_before_request,
    "NUL and ESC in the calling AE title": control_bytes_in_ae_title,
    "calling AE title not allowed": unknown_calling_ae,
    "one more association than allowed from one address": too_many_from_one_address,
    "one more association than max_associations": too_many_in_all,
    "instance over max_instance_mb (3 MiB, limit 2)": oversized_instance,
    "deflate bomb": deflate_bomb_attack,
    "Rows x Columns declaring 8 GiB of pixels": declared_pixels_too_large,
    "implicit VR data on an Explicit VR context": implicit_under_explicit,
    "native pixel data on an RLE Lossless context": native_pixels_under_rle,
    "multi-valued Patient ID": multi_valued_patient_id,
    "no Modality": missing_modality,
    "10 000-character UID with a NUL byte": huge_uid_with_nul,
    "same SOP Instance UID, other pixels": resent_other_content,
    "same SOP Instance UID, another series": resent_other_series,
    "same instance twice": resent_identical,
    "one series naming two patients": two_patient_series,
    "A-ABORT in the middle of a data set": abort_mid_data_set,
    "100 randomly mutated headers": mutated_headers,
}


@dataclass(frozen=True)
class Row:
    attack: str
    answer: str
    as_expected: bool
    kept_serving: bool
    restarted: bool


def run_attack(t: Target, name: str, attack: Callable[[Target], Outcome]) -> Row:
    outcome = attack(t)
    serving = t.serving()
    restarted = t.restart() and t.serving()
    return Row(name, outcome.answer, outcome.as_expected, serving, restarted)


def run(out: Path, names: Sequence[str] | None = None, say: Callable[[str], None] = print) -> tuple[list[Row], bool]:
    t = Target(out)
    rows = []
    try:
        for name in names or list(ATTACKS):
            row = run_attack(t, name, ATTACKS[name])
            say(f"{name}: {row.answer} | expected {row.as_expected} | serving {row.kept_serving} | "
                f"restarted {row.restarted}")
            rows.append(row)
    finally:
        t.stop()
    return rows, _log_clean(t)


def table(rows: Sequence[Row]) -> str:
    lines = ["| attack | answer | as expected | kept serving | restarted |", "|---|---|---|---|---|"]
    for r in rows:
        yes = {True: "yes", False: "**no**"}
        lines.append(f"| {r.attack} | {r.answer.replace('|', '/')} | {yes[r.as_expected]} | "
                     f"{yes[r.kept_serving]} | {yes[r.restarted]} |")
    return "\n".join(lines)


# -- memory under ten hostile associations at once ---------------------------------------------

def _big(path: Path, rows: int) -> Path:
    ds = pet_dataset(Rows=rows, Columns=rows)
    ds.PixelData = b""
    raw = file_bytes(ds)
    # Pixel Data is the last element: write it with its real length, the zeros streamed.
    n = rows * rows * 2
    head = raw[: raw.rindex(b"\xe0\x7f\x10\x00")]
    with open(path, "wb") as f:
        f.write(head + b"\xe0\x7f\x10\x00OW\x00\x00" + struct.pack("<I", n))
        chunk = bytes(MIB)
        left = n
        while left:
            f.write(chunk[: min(left, MIB)])
            left -= min(left, MIB)
    return path


RSS_KINDS = ("oversized", "largest accepted", "largest deflated", "deflate bomb")


def measure_rss(out: Path, kind: str, n: int = 10, say: Callable[[str], None] = print) -> dict[str, object]:
    """Peak VmRSS of a node with the shipped limits while ``n`` peers send at once."""
    t = Target(out / kind, {"max_associations": 10, "max_associations_per_address": 5,
                            "request_timeout_s": 5.0, "max_instance_mb": 64, "idle_timeout_s": 60.0})
    try:
        if kind == "oversized":
            path, syntax = _big(out / "oversized.dcm", 7094), ExplicitVRLittleEndian  # 96 MiB
        elif kind == "largest accepted":
            path, syntax = _big(out / "largest.dcm", 5700), ExplicitVRLittleEndian  # 62 MiB
        elif kind == "deflate bomb":
            path, syntax = write_file(out / "bomb.dcm", deflate_bomb(512 * MIB)), DeflatedExplicitVRLittleEndian
        elif kind == "largest deflated":
            # Noise does not compress: ~62 MiB on the wire that inflate to ~62 MiB (three copies).
            ds = pet_dataset(Rows=5700, Columns=5700)
            ds.PixelData = np.random.default_rng(0).integers(0, 2**16, 5700 * 5700, dtype=np.uint16).tobytes()
            path = write_file(out / "largest-deflated.dcm", file_bytes(ds, DeflatedExplicitVRLittleEndian))
            syntax = DeflatedExplicitVRLittleEndian
        else:
            raise ValueError(f"measure_rss: kind expected one of {RSS_KINDS}, got {kind!r}")
        time.sleep(1.0)
        before = proc_status_kib(t.node.pid) or 0
        sampler = RssSampler(t.node.pid)
        sampler.start()
        results: list[list[int | str]] = [[] for _ in range(n)]
        barrier = threading.Barrier(n)

        def push(i: int) -> None:
            barrier.wait()
            results[i] = store_raw(t, [path], syntax, source=f"127.0.2.{i + 1}")

        t0 = time.monotonic()
        threads = [threading.Thread(target=push, args=(i,)) for i in range(n)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.monotonic() - t0
        peak = sampler.stop()
        serving = t.serving()
    finally:
        t.stop()
    row = {"kind": kind, "associations": n, "instance_bytes": path.stat().st_size,
           "statuses": _statuses([c for r in results for c in r]), "wall_s": round(wall, 1),
           "rss_before_mib": round(before / 1024, 1), "rss_peak_mib": round(peak / 1024, 1),
           "growth_mib": round((peak - before) / 1024, 1), "kept_serving": serving}
    say(json.dumps(row))
    return row
