"""Real DICOM peers for tests: free ports, Orthanc, DCMTK storescp / storescu / echoscu.

Import from a test module (pyproject puts tests/ on the path) with::

    from peers import OrthancPeer, StorescpPeer, free_port, run_echoscu, run_storescu

API (keep it small):
- ``dciodvfy_errors(path) -> list[str]``: dciodvfy's Error/Abort lines for one file.
- ``free_port() -> int``: a TCP port the OS just reported free on 127.0.0.1.
- ``OrthancPeer(workdir, aet="ORTHANC", dicom_port=None)``: context manager; ``.dicom_port``,
  ``.http_port``, ``.aet``, ``.get(path) -> JSON``, ``.get_bytes(path)``, ``.instance_count()``,
  ``.stop()``.
- ``StorescpPeer(outdir, aet="STORESCP")``: context manager; ``.port``, ``.aet``,
  ``.files() -> list[Path]``, ``.stop()``.
- ``run_storescu(files, port, aet="STORESCU", called="ANY-SCP", extra=()) -> CompletedProcess``.
- ``storescu_statuses(result) -> list[int]``: C-STORE response statuses storescu printed.
- ``run_echoscu(port, aet="ECHOSCU", called="ANY-SCP") -> CompletedProcess``.
- ``tiny_pet_files(folder, n=3, transfer_syntax=ExplicitVRLittleEndian) -> list[Path]``: n
  8x8 PET Image Storage files of one series (for wire tests, not for numerics).

Every process gets ``TCP_NODELAY=1`` (Debian's DCMTK and Orthanc only set it when asked,
docs/DESIGN.md "Networking facts"); readiness is polled, never slept for; stop() waits for the PID
because Orthanc frees its DICOM port only when it has exited. DCMTK storescp and Orthanc 1.10
listen on all interfaces (neither has a bind-address option); tests only talk to 127.0.0.1.
A test whose peer is not installed fails (``require(tool)``): CI installs every peer.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dipnode.sim.crafted import pet_dataset

ORTHANC = "/usr/sbin/Orthanc"
LOOPBACK = "127.0.0.1"


def _env() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1"}


# pynetdicom installs Python apps named echoscu, storescu, storescp... into the virtual
# environment's bin, which comes first on PATH in an activated venv (.ci/run): DCMTK's tools
# are therefore looked up in DCMTK's own folder, never on PATH.
DCMTK_BIN = os.environ.get("DCMTK_BIN", "/usr/bin")
DCMTK_TOOLS = frozenset({"echoscu", "storescu", "storescp", "dcmdump", "findscu", "movescu"})


def require(tool: str) -> str:
    """Path of ``tool``; a missing peer FAILS the test (CI installs every peer: no silent skip)."""
    if tool in DCMTK_TOOLS:
        path = shutil.which(tool, path=DCMTK_BIN)
    else:
        path = shutil.which(tool) or (tool if os.path.isfile(tool) else None)
    if path is None:
        pytest.fail(f"{tool} not installed: .ci/run installs dcmtk, orthanc and dicom3tools")
    return path


def dciodvfy_errors(path: Path) -> list[str]:
    """dicom3tools' dciodvfy on one file: its "Error" lines (and an "Abort"), warnings ignored."""
    proc = subprocess.run([require("dciodvfy"), str(path)], capture_output=True, text=True,
                          timeout=60)
    return [ln for ln in (proc.stdout + proc.stderr).splitlines()
            if ln.startswith(("Error", "Abort"))]


def free_port() -> int:
    """A port free on loopback right now (bind to 0, read it back, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def _poll(predicate: Any, timeout_s: float, what: str,
          proc: subprocess.Popen[bytes] | None) -> None:
    deadline = time.monotonic() + timeout_s
    delay = 0.01
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before becoming ready")
        if predicate():
            return
        time.sleep(delay)  # polling interval, growing; not a fixed wait for readiness
        delay = min(delay * 2, 0.2)
    raise TimeoutError(f"{what} not ready after {timeout_s} s")


def _stop(proc: subprocess.Popen[bytes] | None, timeout_s: float = 10.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout_s)


def run_echoscu(port: int, aet: str = "ECHOSCU", called: str = "ANY-SCP",
                timeout_s: float = 10.0) -> subprocess.CompletedProcess[str]:
    """One C-ECHO with DCMTK echoscu to 127.0.0.1:port; returncode 0 means success."""
    return subprocess.run(
        [require("echoscu"), "-aet", aet, "-aec", called, "-to", str(int(timeout_s)),
         LOOPBACK, str(port)],
        capture_output=True, text=True, env=_env(), timeout=timeout_s + 5,
    )


def run_storescu(files: Iterable[Path], port: int, aet: str = "STORESCU",
                 called: str = "ANY-SCP", extra: Sequence[str] = (),
                 timeout_s: float = 30.0) -> subprocess.CompletedProcess[str]:
    """DCMTK storescu (debug output) pushing ``files`` to 127.0.0.1:port.

    Non-zero returncode: the association failed; per-instance statuses: ``storescu_statuses``.
    """
    cmd = [require("storescu"), "-d", "-aet", aet, "-aec", called, *extra, LOOPBACK, str(port),
           *[str(f) for f in files]]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=timeout_s)


_STATUS_RE = re.compile(r"DIMSE Status\s*:\s*0x([0-9A-Fa-f]{4})")


def storescu_statuses(result: subprocess.CompletedProcess[str]) -> list[int]:
    """The C-STORE response statuses, in order, from ``run_storescu``'s debug output."""
    return [int(h, 16) for h in _STATUS_RE.findall(result.stdout + result.stderr)]


class StorescpPeer:
    """DCMTK storescp on a free port writing what it receives, as received, to ``outdir``."""

    def __init__(self, outdir: Path, aet: str = "STORESCP", timeout_s: float = 10.0) -> None:
        self.outdir = Path(outdir)
        self.outdir.mkdir(parents=True, exist_ok=True)
        self.aet = aet
        self.port = free_port()
        self._log = open(self.outdir.parent / f"storescp-{self.port}.log", "wb")
        self._proc: subprocess.Popen[bytes] | None = subprocess.Popen(
            # +xa: accept all syntaxes it knows; +B: write bytes as received.
            [require("storescp"), "-aet", aet, "+xa", "+B", "-od", str(self.outdir),
             str(self.port)],
            stdout=self._log, stderr=subprocess.STDOUT, env=_env(),
        )
        try:
            _poll(lambda: run_echoscu(self.port, called=aet).returncode == 0, timeout_s,
                  "storescp", self._proc)
        except BaseException:
            self.stop()
            raise

    def files(self) -> list[Path]:
        return sorted(p for p in self.outdir.iterdir() if p.is_file())

    def stop(self) -> None:
        _stop(self._proc)
        self._proc = None
        self._log.close()

    def __enter__(self) -> StorescpPeer:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class OrthancPeer:
    """Orthanc with its own config, storage folder and free DICOM/HTTP ports."""

    def __init__(self, workdir: Path, aet: str = "ORTHANC", timeout_s: float = 20.0,
                 dicom_port: int | None = None, overlay: dict[str, Any] | None = None) -> None:
        """overlay: settings laid over the test defaults (e.g. a shipped orthanc.json with
        its "LuaScripts" and "DicomModalities"); the storage folder and ports stay the peer's."""
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.aet = aet
        self.dicom_port = dicom_port or free_port()
        self.http_port = free_port()
        config = {
            "Name": "dipnode-test",
            "StorageDirectory": str(self.workdir / "db"),
            "IndexDirectory": str(self.workdir / "db"),
            "DicomAet": aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,  # HTTP from localhost only
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,  # unknown SCUs may store
            "UnknownSopClassAccepted": True,
            "DicomModalities": {},
            "Plugins": [],
            "SaveJobs": False,
            "StorageCompression": False,
        }
        own = ("StorageDirectory", "IndexDirectory", "DicomPort", "HttpPort", "DicomAet")
        config.update({k: v for k, v in (overlay or {}).items() if k not in own})
        cfg = self.workdir / "orthanc.json"
        cfg.write_text(json.dumps(config, indent=2))
        self._log = open(self.workdir / "orthanc.log", "ab")  # a restart on the same storage appends
        self._proc: subprocess.Popen[bytes] | None = subprocess.Popen(
            [require(ORTHANC), str(cfg)], stdout=self._log, stderr=subprocess.STDOUT,
            env=_env(), cwd=self.workdir,
        )
        try:
            _poll(self._up, timeout_s, "Orthanc", self._proc)
        except BaseException:
            self.stop()
            raise

    def _up(self) -> bool:
        try:
            self.get("/system")
            return True
        except OSError:
            return False

    def get(self, path: str) -> Any:
        """GET http://127.0.0.1:<http_port><path> and decode the JSON answer."""
        url = f"http://{LOOPBACK}:{self.http_port}{path}"
        with urllib.request.urlopen(url, timeout=5) as rsp:
            return json.loads(rsp.read())

    def get_bytes(self, path: str) -> bytes:
        """GET a raw resource, e.g. ``/instances/<id>/file`` (the stored DICOM file)."""
        with urllib.request.urlopen(f"http://{LOOPBACK}:{self.http_port}{path}", timeout=10) as rsp:
            return rsp.read()

    def instance_count(self) -> int:
        return len(self.get("/instances"))

    def stop(self) -> None:
        _stop(self._proc)  # waits for the PID: the DICOM port is free only after exit
        self._proc = None
        self._log.close()

    def __enter__(self) -> OrthancPeer:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def tiny_pet_files(folder: Path, n: int = 3,
                   transfer_syntax: str = ExplicitVRLittleEndian) -> list[Path]:
    """Write ``n`` 8x8 PET slices of one new study/series to ``folder``; return the paths.

    ``transfer_syntax`` must be uncompressed (Explicit or Implicit VR Little Endian).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    paths = []
    for i in range(n):
        ds = pet_dataset(StudyInstanceUID=study, SeriesInstanceUID=series, FrameOfReferenceUID=frame,
                         PatientID="TEST-0001", PatientName="Test^Wire", InstanceNumber=i + 1,
                         ImagePositionPatient=[0.0, 0.0, float(2 * i)],
                         PixelData=(np.arange(64, dtype=np.uint16) * (i + 1)).tobytes())
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = transfer_syntax
        ds.file_meta = meta
        path = folder / f"pet{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
