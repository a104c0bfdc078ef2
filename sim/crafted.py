"""Crafted DICOM bytes: what a buggy or hostile sender makes (for tests and bench/hostile.py).

The node must answer each of these with a named status or a closed connection, and go on.

- ``pet_dataset(**attrs) -> Dataset``: one 8x8 PET slice (as peers.tiny_pet_files makes), with
  ``attrs`` set (``None`` deletes the attribute).
- ``file_bytes(ds, transfer_syntax=ExplicitVRLittleEndian, *, encode_as=None) -> bytes``: a
  PS3.10 file whose meta says ``transfer_syntax``; the data set is encoded as ``encode_as``
  (default: the same) - a mismatch on purpose when they differ.
- ``write_file(path, raw) -> Path``.
- ``meta_syntax(raw) -> str``: the Transfer Syntax UID a PS3.10 byte string's meta names.
- ``deflate_bomb(inflated_bytes) -> bytes``: a Deflated Explicit VR Little Endian PET file whose
  data set inflates to about ``inflated_bytes`` (zeros in a private OB element compress ~1000:1).
- ``associate_rq(called, calling, contexts, max_pdu) -> bytes``: a raw A-ASSOCIATE-RQ PDU with
  AE title fields as given (NUL and control bytes included).
"""
from __future__ import annotations

import zlib
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_preamble
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian,
                         ImplicitVRLittleEndian, generate_uid)

PET = "1.2.840.10008.5.1.4.1.1.128"


def pet_dataset(**attrs: object) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = PET
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.FrameOfReferenceUID = generate_uid()
    ds.PatientID = "CRAFT-0001"
    ds.PatientName = "Craft^Test"
    ds.Modality = "PT"
    ds.InstanceNumber = 1
    ds.ImagePositionPatient = [0.0, 0.0, 0.0]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [2.0, 2.0]
    ds.SliceThickness = 2.0
    ds.Units = "BQML"
    ds.RescaleSlope = 1.0
    ds.RescaleIntercept = 0.0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = np.arange(64, dtype=np.uint16).tobytes()
    for name, value in attrs.items():
        if value is None:
            if name in ds:
                delattr(ds, name)
        else:
            setattr(ds, name, value)
    return ds


def _dataset_bytes(ds: Dataset, syntax: str) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = syntax == ImplicitVRLittleEndian
    write_dataset(fp, ds)
    return fp.getvalue()


def _preamble_and_meta(ds: Dataset, transfer_syntax: str) -> bytes:
    """The PS3.10 preamble, "DICM" and the file meta group of ``ds`` under ``transfer_syntax``."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = "1.2.826.0.1.3680043.9.7156.1"
    head = DicomBytesIO()
    head.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(head, meta, enforce_standard=True)
    return head.getvalue()


def file_bytes(ds: Dataset, transfer_syntax: str = ExplicitVRLittleEndian, *,
               encode_as: str | None = None) -> bytes:
    head = _preamble_and_meta(ds, transfer_syntax)
    encoding = encode_as or transfer_syntax
    if encoding == DeflatedExplicitVRLittleEndian:
        body = _dataset_bytes(ds, ExplicitVRLittleEndian)
        c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        body = c.compress(body) + c.flush()
    else:
        body = _dataset_bytes(ds, encoding)
    return head + body


def write_file(path: Path, raw: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(raw)
    return path


def meta_syntax(raw: bytes) -> str:
    fp = BytesIO(raw)
    read_preamble(fp, False)
    return str(pydicom.filereader._read_file_meta_info(fp).TransferSyntaxUID)


def deflate_bomb(inflated_bytes: int, **attrs: object) -> bytes:
    """A deflated PET file that inflates to ~inflated_bytes: zeros in a private OB element.

    The body is built in pieces (never the whole inflated data set in memory at once)."""
    ds = pet_dataset(**attrs)
    head_ds = Dataset()
    for elem in ds:
        if elem.tag < 0x00090010:
            head_ds.add(elem)
    tail_ds = Dataset()
    for elem in ds:
        if elem.tag >= 0x00090010:
            tail_ds.add(elem)
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [c.compress(_dataset_bytes(head_ds, ExplicitVRLittleEndian))]
    # (0009,0010) private creator, then (0009,1000) OB of `inflated_bytes` zeros.
    creator = b"CRAFT "
    parts.append(c.compress(b"\x09\x00\x10\x00LO" + len(creator).to_bytes(2, "little") + creator))
    n = inflated_bytes + (inflated_bytes % 2)
    parts.append(c.compress(b"\x09\x00\x00\x10OB\x00\x00" + n.to_bytes(4, "little")))
    chunk = bytes(1 << 20)
    left = n
    while left:
        step = min(left, len(chunk))
        parts.append(c.compress(chunk[:step]))
        left -= step
    parts.append(c.compress(_dataset_bytes(tail_ds, ExplicitVRLittleEndian)))
    parts.append(c.flush())
    return _preamble_and_meta(ds, DeflatedExplicitVRLittleEndian) + b"".join(parts)


def _item(kind: int, payload: bytes) -> bytes:
    return bytes([kind, 0]) + len(payload).to_bytes(2, "big") + payload


def associate_rq(called: bytes, calling: bytes,
                 contexts: tuple[tuple[str, tuple[str, ...]], ...] = (("1.2.840.10008.1.1", ("1.2.840.10008.1.2",)),),
                 max_pdu: int = 16384) -> bytes:
    """A raw A-ASSOCIATE-RQ PDU (PS3.8 9.3.2) with AE title fields taken as given (16 bytes,
    space padded or cut): what no toolkit lets you send, e.g. NUL or control bytes."""
    body = b"\x00\x01\x00\x00" + called[:16].ljust(16, b" ") + calling[:16].ljust(16, b" ") + bytes(32)
    body += _item(0x10, b"1.2.840.10008.3.1.1.1")
    for i, (abstract, syntaxes) in enumerate(contexts):
        sub = _item(0x30, abstract.encode()) + b"".join(_item(0x40, ts.encode()) for ts in syntaxes)
        body += _item(0x20, bytes([2 * i + 1, 0, 0, 0]) + sub)
    body += _item(0x50, _item(0x51, max_pdu.to_bytes(4, "big"))
                  + _item(0x52, b"1.2.826.0.1.3680043.9.7156.1"))
    return bytes([0x01, 0]) + len(body).to_bytes(4, "big") + body
