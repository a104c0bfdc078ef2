"""The durable spool: received instances become fsync'd files before the SCP answers success.

Layout under ``root``::

    incoming/<random>.tmp                               being written; never a whole instance
    instances/<study uid>/<series uid>/<sop uid>.dcm    complete PS3.10 files, bytes as received
    quarantine/<name>                                   files found at start-up that no index
                                                        can take (see Node.index_orphans)

A file appears under ``instances/`` only by ``os.replace`` of a fully written and fsync'd temp
file, and the folder is fsync'd after the rename, so after a crash a name under ``instances/``
always holds a whole instance.

The spool checks and parses the header once (``dicom_io.intake.read_received``: sizes, bounded
inflation, the encoding against the negotiated transfer syntax, UIDs) because it needs the study
and series UIDs to file the instance, and hands that header back in :class:`StoredInstance` so
that the caller (series assembly, the index) does not parse the same bytes a second time.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import Dataset

from dipnode.dicom_io.intake import Header, read_received
from dipnode.dicom_io.vr import InvalidUIDError, check_uid
from dipnode.dicom_io.scp import ReceivedInstance
from dipnode.dicom_io.status import Status, StoreRefused

__all__ = ["DEFAULT_MAX_INSTANCE_BYTES", "GIB", "InvalidUIDError", "Spool", "StoredInstance",
           "check_uid", "read_header"]

log = logging.getLogger(__name__)

GIB = 1 << 30
DEFAULT_MAX_INSTANCE_BYTES = 64 << 20
_TMP_SUFFIX = ".tmp"


@dataclass(frozen=True)
class StoredInstance:
    """Where an instance now lives and its header (pixels not read; treat as read-only)."""

    path: Path
    header: Dataset = field(repr=False)

    @property
    def study_instance_uid(self) -> str:
        return str(self.header.StudyInstanceUID)

    @property
    def series_instance_uid(self) -> str:
        return str(self.header.SeriesInstanceUID)

    @property
    def sop_instance_uid(self) -> str:
        return str(self.header.SOPInstanceUID)


def read_header(raw: bytes, transfer_syntax: str | None = None, *,
                max_bytes: int = DEFAULT_MAX_INSTANCE_BYTES) -> Dataset:
    """The checked header of a PS3.10 byte string (``transfer_syntax`` defaults to the file
    meta's); raises :class:`StoreRefused` with the status to answer (see dicom_io.intake)."""
    return read_received(raw, transfer_syntax, max_bytes=max_bytes).dataset


def fsync_dir(path: Path) -> None:
    """Make a rename, creation or removal in ``path`` durable (POSIX: only once the directory
    holding the name is fsync'd). The spool's and retention's one way to do it."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """Durable store of received instances; safe to call from several SCP threads."""

    def __init__(self, root: Path, min_free_bytes: int = GIB,
                 max_instance_bytes: int = DEFAULT_MAX_INSTANCE_BYTES) -> None:
        if min_free_bytes < 0:
            raise ValueError(f"min_free_bytes: expected >= 0, got {min_free_bytes}")
        if max_instance_bytes < 1:
            raise ValueError(f"max_instance_bytes: expected >= 1, got {max_instance_bytes}")
        self.root = Path(root)
        self.min_free_bytes = min_free_bytes
        self.max_instance_bytes = max_instance_bytes
        self.incoming = self.root / "incoming"
        self.instances = self.root / "instances"
        self.quarantine_dir = self.root / "quarantine"
        self.incoming.mkdir(parents=True, exist_ok=True)
        self.instances.mkdir(parents=True, exist_ok=True)

    def parse(self, instance: ReceivedInstance) -> Header:
        """Check and parse ``instance`` against the negotiated syntax; raises StoreRefused."""
        try:
            check_uid("sop_instance_uid", instance.sop_instance_uid)
        except InvalidUIDError as exc:
            raise StoreRefused(Status.CANNOT_UNDERSTAND, str(exc)) from exc
        header = read_received(instance.raw, instance.transfer_syntax_uid,
                               max_bytes=self.max_instance_bytes)
        sop_uid = str(header.dataset.SOPInstanceUID)
        if sop_uid != instance.sop_instance_uid:
            # PS3.7 9.1.1.1: Affected SOP Instance UID names the data set being sent.
            raise StoreRefused(
                Status.CANNOT_UNDERSTAND,
                f"SOP Instance UID: command says {instance.sop_instance_uid}, "
                f"data set says {sop_uid}",
            )
        return header

    def path_for(self, study_uid: str, series_uid: str, sop_instance_uid: str) -> Path:
        """Where an instance lives; every part is checked against the UID grammar first."""
        return (
            self.instances
            / check_uid("study_uid", study_uid)
            / check_uid("series_uid", series_uid)
            / f"{check_uid('sop_instance_uid', sop_instance_uid)}.dcm"
        )

    def store(self, instance: ReceivedInstance, header: Header | None = None) -> StoredInstance:
        """Write ``instance.raw`` durably; return its final path and parsed header.

        ``header``: what :meth:`parse` returned for this instance (parsed here when None).
        Raises :class:`StoreRefused` (OUT_OF_RESOURCES below the free-space mark, the statuses
        of dicom_io.intake for what must not be kept). A second store of the same SOP Instance
        UID replaces the file: the caller (Node.on_store) applies the re-send policy first.
        """
        parsed = header if header is not None else self.parse(instance)
        header_ds = parsed.dataset
        sop_uid = str(header_ds.SOPInstanceUID)
        free = shutil.disk_usage(self.root).free
        if free - len(instance.raw) < self.min_free_bytes:
            raise StoreRefused(
                Status.OUT_OF_RESOURCES,
                f"spool below free-space mark: {free} bytes free, instance {len(instance.raw)}, "
                f"mark {self.min_free_bytes}",
            )

        final = self.path_for(
            str(header_ds.StudyInstanceUID), str(header_ds.SeriesInstanceUID), sop_uid
        )
        tmp = self.incoming / f"{uuid.uuid4().hex}{_TMP_SUFFIX}"
        try:
            with open(tmp, "wb") as f:
                f.write(instance.raw)
                f.flush()
                os.fsync(f.fileno())
            self._make_dirs(final.parent)
            os.replace(tmp, final)  # atomic: a duplicate replaces the old file in one step
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(final.parent)
        log.debug("spooled %s", sop_uid)
        return StoredInstance(final, header_ds)

    def discard(self, path: Path) -> None:
        """Remove a spooled file whose indexing failed: the peer is told it was not stored, so
        nothing of it may stay (a start-up would otherwise meet it)."""
        try:
            path.unlink()
        except FileNotFoundError:
            return
        fsync_dir(path.parent)
        log.debug("discarded %s", path)

    def quarantine(self, path: Path) -> Path:
        """Move a spool file no index can take out of ``instances/`` (kept for a person to look
        at, never deleted); returns its new path."""
        self.quarantine_dir.mkdir(exist_ok=True)
        rel = path.relative_to(self.instances) if path.is_relative_to(self.instances) else Path(path.name)
        name = "_".join(rel.parts)
        target = self.quarantine_dir / name
        n = 1
        while target.exists():
            target = self.quarantine_dir / f"{name}.{n}"
            n += 1
        os.replace(path, target)
        fsync_dir(self.quarantine_dir)
        fsync_dir(path.parent)
        return target

    def quarantined(self) -> list[Path]:
        """Files in the quarantine folder."""
        if not self.quarantine_dir.is_dir():
            return []
        return sorted(p for p in self.quarantine_dir.iterdir() if p.is_file())

    def _make_dirs(self, folder: Path) -> None:
        # Create study/series folders one by one, fsync'ing each parent so the new entries
        # survive a crash as well as the file inside them.
        for path in (folder.parent, folder):
            if not path.is_dir():
                path.mkdir(exist_ok=True)
                fsync_dir(path.parent)

    def recover(self) -> int:
        """Delete temp files left by a crash; call once at start-up. Returns how many."""
        removed = 0
        for path in self.incoming.iterdir():
            if path.is_file():
                path.unlink(missing_ok=True)
                removed += 1
        if removed:
            fsync_dir(self.incoming)
            log.info("spool recovery removed %d temp file(s)", removed)
        return removed
