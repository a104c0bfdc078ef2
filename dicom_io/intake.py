"""What a received instance must be before the node keeps it, checked on its bytes.

:func:`read_received` parses the header of a PS3.10 byte string (pixels are never decoded) and
refuses, with a named status (:class:`~dipnode.dicom_io.status.StoreRefused`), anything the
node could not keep safely:

- larger than ``max_bytes`` on the wire, or a Deflated Explicit VR Little Endian data set that
  inflates beyond it (inflation is bounded: ``zlib`` never produces more than the limit + 1),
  or pixel data whose declared decoded size (Rows x Columns x Frames x Samples x Bits) is
  beyond it - INSTANCE_TOO_LARGE / INFLATED_TOO_LARGE (PS3.4 B.2.3 "Refused: Out of
  Resources" range);
- data encoded against another transfer syntax than the one negotiated (implicit VR under an
  explicit syntax and the other way round, big-endian bytes, native pixel data under an
  encapsulated syntax or encapsulated under a native one) - TRANSFER_SYNTAX_MISMATCH
  ("Error: Cannot understand" range): stored, such a file is unreadable by every other tool;
- an unparsable header or UIDs that are not UIDs (they become file names) - CANNOT_UNDERSTAND;
- no Pixel Data in an image SOP instance, or a multi-valued Patient ID (VM 1, PS3.6: two values
  make the patient's identity ambiguous, so the instance is refused rather than guessed at) -
  DATASET_DOES_NOT_MATCH_SOP_CLASS.

The same checks run on spool files at start-up, so what was accepted once is accepted again.
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from io import BytesIO

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset, read_preamble
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian
from pydicom.valuerep import VR

from .logsafe import shown
from .status import Status, StoreRefused
from .vr import InvalidUIDError, check_uid

__all__ = ["Header", "dataset_bytes", "read_received"]

_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})  # Pixel, Float, Double Float
_UNDEFINED = 0xFFFFFFFF
_VRS = frozenset(v.value.encode() for v in VR)


@dataclass(frozen=True)
class Header:
    """The parsed header of a received instance: attributes up to the pixel data."""

    dataset: Dataset  # no pixel data; file_meta attached
    transfer_syntax: str
    data_offset: int  # where the data set starts in the received bytes


def _refuse(status: Status, reason: str) -> StoreRefused:
    return StoreRefused(status, reason)


def _meta(raw: bytes) -> tuple[FileMetaDataset, int]:
    fp = BytesIO(raw)
    try:
        read_preamble(fp, False)
        # pydicom's own reader for group 0002 (PS3.10 7.1), which leaves fp at the data set.
        meta = pydicom.filereader._read_file_meta_info(fp)
    except Exception as exc:  # noqa: BLE001 - untrusted bytes: pydicom raises many types here
        # (found by fuzzing: NotImplementedError for an unknown VR, BytesLengthException, ...)
        raise _refuse(Status.CANNOT_UNDERSTAND,
                      f"file meta unreadable: {type(exc).__name__}: {shown(exc, 120)}") from exc
    # A mangled VR in (0002,0000) makes pydicom fall back to implicit VR and read the rest of
    # the file as the group length's value; whether that raises depends on the file's length
    # (found by fuzzing). PS3.10 7.1: the group length is one UL value.
    length = meta.get("FileMetaInformationGroupLength")
    if length is not None and not isinstance(length, int):
        raise _refuse(Status.CANNOT_UNDERSTAND,
                      "file meta unreadable: (0002,0000) File Meta Information Group Length is not "
                      "one UL value")
    return meta, fp.tell()


def dataset_bytes(raw: bytes) -> memoryview:
    """The encoded data set of a PS3.10 byte string (after preamble and file meta), as received."""
    return memoryview(raw)[_meta(raw)[1]:]


def _inflate(body: memoryview, max_bytes: int) -> bytes:
    # PS3.5 A.5: the data set is a raw deflate stream (no zlib header). Ask zlib for at most
    # max_bytes + 1 bytes: one byte more than allowed proves the limit is exceeded without
    # ever holding more than that in memory.
    d = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        out = d.decompress(body, max_bytes + 1)
    except zlib.error as exc:
        raise _refuse(Status.CANNOT_UNDERSTAND, f"deflated data set corrupt: {exc}") from exc
    if len(out) > max_bytes:
        raise _refuse(Status.INFLATED_TOO_LARGE,
                      f"deflated data set of {len(body)} bytes inflates beyond max_instance_bytes "
                      f"({max_bytes})")
    return out


def _check_encoding(fp: BytesIO, implicit: bool, syntax: str) -> None:
    """The first element must read as the negotiated syntax says (as pydicom's own guess does:
    an explicit VR is two upper-case letters, PS3.5 7.1.2-7.1.3)."""
    start = fp.tell()
    head = fp.read(8)
    fp.seek(start)
    if len(head) < 8:
        raise _refuse(Status.CANNOT_UNDERSTAND, "empty or truncated data set")
    group = struct.unpack("<H", head[:2])[0]
    if group > 0x00FF:
        # Every image IOD starts with group 0008 (SOP Common); 0x0800 is that group in big endian.
        swapped = struct.unpack(">H", head[:2])[0]
        how = "big endian" if swapped <= 0x00FF else f"first group 0x{group:04X}"
        raise _refuse(Status.TRANSFER_SYNTAX_MISMATCH,
                      f"data set is not little endian as {UID(syntax).name} says ({how})")
    looks_explicit = head[4:6] in _VRS
    if looks_explicit == implicit:
        found, expected = ("explicit", "implicit") if implicit else ("implicit", "explicit")
        raise _refuse(Status.TRANSFER_SYNTAX_MISMATCH,
                      f"data set encoded with {found} VR, negotiated {UID(syntax).name} ({expected} VR)")


def _pixel_element(fp: BytesIO, implicit: bool, end: int) -> tuple[int, int] | None:
    """(tag, value length) of the pixel element the parse stopped at, or None at the end."""
    at = fp.tell()
    head = fp.read(12)
    fp.seek(at)
    if len(head) < 8:
        return None
    group, elem = struct.unpack("<HH", head[:4])
    tag = (group << 16) | elem
    if tag not in _PIXEL_TAGS:
        return None
    if implicit:
        length = struct.unpack("<I", head[4:8])[0]
    elif len(head) < 12:
        raise _refuse(Status.CANNOT_UNDERSTAND, "pixel data element header truncated")
    else:
        length = struct.unpack("<I", head[8:12])[0]
    header_len = 8 if implicit else 12
    if length != _UNDEFINED and at + header_len + length > end:
        raise _refuse(Status.CANNOT_UNDERSTAND,
                      f"pixel data claims {length} bytes, {end - at - header_len} present")
    return tag, length


def _at_pixels(tag: object, vr: object, length: object) -> bool:
    return int(tag) in _PIXEL_TAGS  # type: ignore[call-overload]


def _decoded_size(ds: Dataset) -> int:
    def n(keyword: str, default: int) -> int:
        v = ds.get(keyword)
        try:
            return max(int(v), 0) if v not in (None, "") else default
        except (TypeError, ValueError):
            return default

    bits = n("BitsAllocated", 16)
    return n("Rows", 0) * n("Columns", 0) * n("NumberOfFrames", 1) * n("SamplesPerPixel", 1) * ((bits + 7) // 8)


def read_received(raw: bytes, transfer_syntax: str | None, *, max_bytes: int) -> Header:
    """Check and parse the header of a received PS3.10 byte string (see the module docstring).

    ``transfer_syntax`` is the negotiated one (the presentation context's); None takes the file
    meta's (a file found in the spool). Raises :class:`StoreRefused` with the status to answer.
    """
    if max_bytes < 1:
        raise ValueError(f"read_received: max_bytes expected >= 1, got {max_bytes}")
    meta, offset = _meta(raw)
    if transfer_syntax is None:
        transfer_syntax = str(meta.get("TransferSyntaxUID", ""))
        if not transfer_syntax:
            raise _refuse(Status.CANNOT_UNDERSTAND, "file meta has no (0002,0010) Transfer Syntax UID")
    if len(raw) - offset > max_bytes:
        raise _refuse(Status.INSTANCE_TOO_LARGE,
                      f"data set of {len(raw) - offset} bytes exceeds max_instance_bytes ({max_bytes})")
    syntax = UID(transfer_syntax)
    body = memoryview(raw)[offset:]
    if syntax == DeflatedExplicitVRLittleEndian:
        fp = BytesIO(_inflate(body, max_bytes))
    else:
        fp = BytesIO(raw)
        fp.seek(offset)
    end = len(fp.getbuffer())
    implicit = syntax == ImplicitVRLittleEndian
    if not syntax.is_transfer_syntax or not syntax.is_little_endian:
        # The receiver offers no big-endian or private syntax; a file that says so is refused.
        raise _refuse(Status.TRANSFER_SYNTAX_MISMATCH, f"transfer syntax {shown(syntax, 64)} is not accepted")
    _check_encoding(fp, implicit, syntax)
    try:
        ds = read_dataset(fp, implicit, True, stop_when=_at_pixels)
        for _ in ds:  # convert every element now: malformed values fail here, not later
            pass
    except StoreRefused:
        raise
    except Exception as exc:  # noqa: BLE001 - untrusted bytes: pydicom raises many types
        raise _refuse(Status.CANNOT_UNDERSTAND,
                      f"header unreadable: {type(exc).__name__}: {shown(exc, 120)}") from exc
    try:
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            check_uid(keyword, str(ds[keyword].value) if keyword in ds else None)
    except InvalidUIDError as exc:
        raise _refuse(Status.CANNOT_UNDERSTAND, str(exc)) from exc
    pixels = _pixel_element(fp, implicit, end)
    if pixels is None:
        # The node accepts image SOP classes only, whose IODs require Pixel Data (PS3.3 C.7.6.3).
        raise _refuse(Status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                      "no Pixel Data (7FE0,0010) in an image SOP instance")
    encapsulated = pixels[1] == _UNDEFINED
    if encapsulated != syntax.is_encapsulated:
        # PS3.5 A.4: encapsulated (compressed) pixel data has undefined length; native has not.
        raise _refuse(Status.TRANSFER_SYNTAX_MISMATCH,
                      f"pixel data is {'encapsulated' if encapsulated else 'native'}, negotiated "
                      f"{syntax.name} is {'encapsulated' if syntax.is_encapsulated else 'native'}")
    decoded = _decoded_size(ds)
    if decoded > max_bytes:
        raise _refuse(Status.INSTANCE_TOO_LARGE,
                      f"pixel data decodes to {decoded} bytes (Rows x Columns x Frames x Samples x "
                      f"Bits Allocated), beyond max_instance_bytes ({max_bytes})")
    patient = ds.get("PatientID")
    if patient is not None and not isinstance(patient, (str, bytes)) and len(patient) > 1:
        raise _refuse(Status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                      f"Patient ID (0010,0020) has {len(patient)} values, VM is 1 (PS3.6): "
                      "the patient's identity is ambiguous")
    ds.file_meta = meta
    return Header(ds, str(syntax), offset)
