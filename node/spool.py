"""The durable spool: received instances become fsync'd files before the SCP answers success.

Layout under ``root``::

    incoming/<random>.tmp                               being written; never a whole instance
    instances/<study uid>/<series uid>/<sop uid>.dcm    complete PS3.10 files, bytes as received

A file appears under ``instances/`` only by ``os.replace`` of a fully written and fsync'd temp
file, and the folder is fsync'd after the rename, so after a crash a name under ``instances/``
always holds a whole instance.

The spool parses the header once (``stop_before_pixels``) because it needs the study and series
UIDs to file the instance, and hands that header back in :class:`StoredInstance` so that the
caller (series assembly, the index) does not parse the same bytes a second time.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import struct
import uuid
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import pydicom
from pydicom import Dataset
from pydicom.errors import InvalidDicomError

from dipnode.dicom_io.scp import ReceivedInstance
from dipnode.dicom_io.status import Status, StoreRefused

__all__ = ["GIB", "InvalidUIDError", "Spool", "StoredInstance", "check_uid", "read_header"]

log = logging.getLogger(__name__)

GIB = 1 << 30
# Pixel Data (7FE0,0010), Float Pixel Data (7FE0,0008) and Double Float Pixel Data (7FE0,0009)
# as little-endian group, element: an image object carries one of them (the float ones in a
# Parametric Map, PS3.3 C.7.6.3).
_PIXEL_DATA_TAGS = (b"\xe0\x7f\x10\x00", b"\xe0\x7f\x08\x00", b"\xe0\x7f\x09\x00")
_DEFLATED = "1.2.840.10008.1.2.1.99"
_TMP_SUFFIX = ".tmp"

# PS3.5 9.1: a UID is digit components separated by '.', at most 64 characters. The grammar also
# forbids leading zeros in a component, but some vendors emit them; accepting them is harmless
# here because only digits and dots reach the file system, which is what keeps names safe.
_UID_RE = re.compile(r"[0-9]+(\.[0-9]+)*")
_UID_MAX = 64


class InvalidUIDError(ValueError):
    """A UID that does not follow PS3.5 9.1 and so cannot name a file."""


def check_uid(name: str, value: object) -> str:
    """Return ``value`` if it is a PS3.5 9.1 UID (digits and dots, <= 64 chars), else raise."""
    if not isinstance(value, str) or len(value) > _UID_MAX or not _UID_RE.fullmatch(value):
        raise InvalidUIDError(
            f"{name}: expected a DICOM UID (PS3.5 9.1: digits and '.', at most {_UID_MAX} "
            f"characters), got {value!r}"
        )
    return value


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


def read_header(raw: bytes) -> Dataset:
    """Parse the header of a PS3.10 byte string (stops before pixel data) and check the UIDs
    the spool turns into path parts; raises :class:`StoreRefused` CANNOT_UNDERSTAND."""
    try:
        ds = pydicom.dcmread(BytesIO(raw), stop_before_pixels=True)
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            check_uid(keyword, str(ds[keyword].value) if keyword in ds else None)
        return ds
    except InvalidUIDError as exc:
        raise StoreRefused(Status.CANNOT_UNDERSTAND, str(exc)) from exc
    except (InvalidDicomError, AttributeError, KeyError, EOFError, ValueError, OSError,
            struct.error) as exc:  # struct.error: pydicom on a length cut short
        # PS3.4 B.2.3: a data set we cannot parse is "cannot understand".
        raise StoreRefused(
            Status.CANNOT_UNDERSTAND, f"header unreadable: {type(exc).__name__}: {exc}"
        ) from exc


def _fsync_dir(path: Path) -> None:
    # POSIX: a rename is durable only once the directory holding the new name is fsync'd.
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """Durable store of received instances; safe to call from several SCP threads."""

    def __init__(self, root: Path, min_free_bytes: int = GIB) -> None:
        if min_free_bytes < 0:
            raise ValueError(f"min_free_bytes: expected >= 0, got {min_free_bytes}")
        self.root = Path(root)
        self.min_free_bytes = min_free_bytes
        self.incoming = self.root / "incoming"
        self.instances = self.root / "instances"
        self.incoming.mkdir(parents=True, exist_ok=True)
        self.instances.mkdir(parents=True, exist_ok=True)

    def path_for(self, study_uid: str, series_uid: str, sop_instance_uid: str) -> Path:
        """Where an instance lives; every part is checked against the UID grammar first."""
        return (
            self.instances
            / check_uid("study_uid", study_uid)
            / check_uid("series_uid", series_uid)
            / f"{check_uid('sop_instance_uid', sop_instance_uid)}.dcm"
        )

    def store(self, instance: ReceivedInstance) -> StoredInstance:
        """Write ``instance.raw`` durably; return its final path and parsed header.

        Raises :class:`StoreRefused` (OUT_OF_RESOURCES below the free-space mark,
        CANNOT_UNDERSTAND for an unparsable header or unsafe / mismatching UIDs).
        A second store of the same SOP Instance UID atomically replaces the first.
        """
        try:
            check_uid("sop_instance_uid", instance.sop_instance_uid)
        except InvalidUIDError as exc:
            raise StoreRefused(Status.CANNOT_UNDERSTAND, str(exc)) from exc
        header = read_header(instance.raw)
        sop_uid = str(header.SOPInstanceUID)
        if sop_uid != instance.sop_instance_uid:
            # PS3.7 9.1.1.1: Affected SOP Instance UID names the data set being sent.
            raise StoreRefused(
                Status.CANNOT_UNDERSTAND,
                f"SOP Instance UID: command says {instance.sop_instance_uid}, "
                f"data set says {sop_uid}",
            )
        if instance.transfer_syntax_uid != _DEFLATED and not any(
                tag in instance.raw for tag in _PIXEL_DATA_TAGS):
            # The node only accepts image SOP classes, whose IODs require Pixel Data (PS3.3
            # C.7.6.3). Absent tag bytes prove absence without decoding (little endian only;
            # a deflated stream hides them). Pixel *length* is the series loader's check.
            raise StoreRefused(Status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                               "no Pixel Data (7FE0,0010) in an image SOP instance")
        free = shutil.disk_usage(self.root).free
        if free - len(instance.raw) < self.min_free_bytes:
            raise StoreRefused(
                Status.OUT_OF_RESOURCES,
                f"spool below free-space mark: {free} bytes free, instance {len(instance.raw)}, "
                f"mark {self.min_free_bytes}",
            )

        final = self.path_for(
            str(header.StudyInstanceUID), str(header.SeriesInstanceUID), sop_uid
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
        _fsync_dir(final.parent)
        log.debug("spooled %s", sop_uid)
        return StoredInstance(final, header)

    def _make_dirs(self, folder: Path) -> None:
        # Create study/series folders one by one, fsync'ing each parent so the new entries
        # survive a crash as well as the file inside them.
        for path in (folder.parent, folder):
            if not path.is_dir():
                path.mkdir(exist_ok=True)
                _fsync_dir(path.parent)

    def recover(self) -> int:
        """Delete temp files left by a crash; call once at start-up. Returns how many."""
        removed = 0
        for path in self.incoming.iterdir():
            if path.is_file():
                path.unlink(missing_ok=True)
                removed += 1
        if removed:
            _fsync_dir(self.incoming)
            log.info("spool recovery removed %d temp file(s)", removed)
        return removed
