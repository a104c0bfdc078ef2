"""Bad input on the wire, against a real receiver + spool: each gets its DIMSE status (or a
rejected association / context), one log line, and the next good store still succeeds.

Where each check lives (docs/DESIGN.md "The pipeline": the SCP handler never decodes pixels):
- association / presentation context (pynetdicom, ReceiverConfig): calling AE, address,
  SOP class, transfer syntax -> A-ASSOCIATE-RJ or a rejected context, no DIMSE status at all;
- spool header parse (node/ingest/spool.read_header, stop_before_pixels): truncation, wrong VRs,
  absurd lengths, unsafe UIDs -> CANNOT_UNDERSTAND; no Pixel Data tag in an image instance ->
  DATASET_DOES_NOT_MATCH_SOP_CLASS;
- series loader (dicom_io/series.load_volume): pixel data shorter than Rows x Columns is only
  found when pixels are decoded, so the instance is stored and the JOB fails with the reason.
"""
from __future__ import annotations

import logging
import struct
from pathlib import Path

import pydicom
import pytest
from pydicom.filereader import read_preamble
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian
from pynetdicom import AE, build_context

from dipnode.dicom_io.scp import ReceiverConfig, start_receiver
from dipnode.dicom_io.series import load_volume, read_files
from dipnode.dicom_io.status import Status
from dipnode.node.ingest.spool import Spool
from nodeproc import wait_for
from peers import tiny_pet_files


PET = "1.2.840.10008.5.1.4.1.1.128"
CT = "1.2.840.10008.5.1.4.1.1.2"
VERIFICATION = "1.2.840.10008.1.1"
SCP_LOGGER = "dipnode.dicom_io.scp"


def _split(path: Path) -> tuple[bytes, bytes]:
    """(preamble + file meta, data set) bytes of a PS3.10 file."""
    raw = path.read_bytes()
    with open(path, "rb") as f:
        read_preamble(f, False)
        pydicom.filereader._read_file_meta_info(f)
        n = f.tell()
    return raw[:n], raw[n:]


def _element_offset(dataset: bytes, group: int, element: int) -> int:
    tag = struct.pack("<HH", group, element)
    at = dataset.find(tag)
    assert at >= 0, f"({group:04X},{element:04X}) not found"
    return at


def _patched(src: Path, out: Path, dataset: bytes) -> Path:
    meta, _ = _split(src)
    out.write_bytes(meta + dataset)
    return out


def _make_bad(src: Path, folder: Path) -> dict[str, Path]:
    """Crafted variants of one good explicit-VR little-endian PET file."""
    _, ds = _split(src)
    bad: dict[str, Path] = {}
    # Cut in the middle of the header (inside the Study Instance UID's value).
    cut = _element_offset(ds, 0x0020, 0x000D) + 12
    bad["truncated"] = _patched(src, folder / "truncated.dcm", ds[:cut])
    # Study Instance UID (UI) re-labelled as VR US: the value is no longer a UID.
    at = _element_offset(ds, 0x0020, 0x000D)
    wrong_vr = ds[:at + 4] + b"US" + ds[at + 6:]
    bad["wrong_vr"] = _patched(src, folder / "wrong_vr.dcm", wrong_vr)
    # Patient ID (LO, 2-byte length) claims 0xFFFF bytes: runs far past the end.
    at = _element_offset(ds, 0x0010, 0x0020)
    absurd = ds[:at + 6] + b"\xff\xff" + ds[at + 8:]
    bad["absurd_length"] = _patched(src, folder / "absurd_length.dcm", absurd)
    # Everything from Pixel Data on removed.
    at = _element_offset(ds, 0x7FE0, 0x0010)
    bad["no_pixels"] = _patched(src, folder / "no_pixels.dcm", ds[:at])
    return bad


def _store_raw(port: int, path: Path, sop_class: str = PET,
               syntaxes: tuple[str, ...] = (ExplicitVRLittleEndian,)) -> int | None:
    """C-STORE ``path`` as its bytes are (pynetdicom sends a file's data set undecoded)."""
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(sop_class, list(syntaxes))
    assoc = ae.associate("127.0.0.1", port, ae_title="DIPNODE")
    assert assoc.is_established
    try:
        rsp = assoc.send_c_store(path)
        return int(rsp.Status) if "Status" in rsp else None
    finally:
        assoc.release()


@pytest.fixture
def receiver(tmp_path: Path):
    spool = Spool(tmp_path / "spool", min_free_bytes=0)
    cfg = ReceiverConfig(port=0, allowed_calling_aets=frozenset({"STORESCU"}))
    with start_receiver(cfg, lambda i: (spool.store(i), Status.SUCCESS)[1]) as rx:
        yield rx, spool


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == SCP_LOGGER and r.levelno >= logging.WARNING]


@pytest.mark.network
@pytest.mark.timeout(60)
@pytest.mark.parametrize(("kind", "status"), [
    ("truncated", Status.CANNOT_UNDERSTAND),
    ("wrong_vr", Status.CANNOT_UNDERSTAND),
    ("absurd_length", Status.CANNOT_UNDERSTAND),
    ("no_pixels", Status.DATASET_DOES_NOT_MATCH_SOP_CLASS),
])
def test_bad_instance_gets_status_one_log_line_and_node_goes_on(
        receiver, tmp_path: Path, caplog: pytest.LogCaptureFixture, kind: str, status: Status) -> None:
    rx, spool = receiver
    good = tiny_pet_files(tmp_path / "src", n=2)
    bad = _make_bad(good[0], tmp_path)[kind]
    caplog.set_level(logging.INFO, logger=SCP_LOGGER)
    assert _store_raw(rx.port, bad) == status
    assert len(_warnings(caplog)) == 1, _warnings(caplog)
    assert status.name in _warnings(caplog)[0]
    # Nothing of the bad instance reached the spool; the next good store succeeds.
    assert not list(spool.instances.rglob("*.dcm"))
    assert _store_raw(rx.port, good[1]) == Status.SUCCESS
    assert len(list(spool.instances.rglob("*.dcm"))) == 1
    assert len(_warnings(caplog)) == 1


@pytest.mark.network
@pytest.mark.timeout(60)
def test_unsupported_sop_class_and_transfer_syntax_get_no_context(receiver, tmp_path: Path) -> None:
    rx, spool = receiver
    ae = AE(ae_title="STORESCU")
    # CT is not accepted at all; PET offered only in (retired) explicit big endian.
    # Verification keeps the association up (pynetdicom's requestor aborts with no context).
    contexts = [build_context(CT, [ExplicitVRLittleEndian]), build_context(PET, [ExplicitVRBigEndian]),
                build_context(VERIFICATION)]
    assoc = ae.associate("127.0.0.1", rx.port, ae_title="DIPNODE", contexts=contexts)
    try:
        # PS3.8 9.3.3.2: the association is accepted, each context is rejected on its own.
        assert assoc.is_established
        assert [c.abstract_syntax for c in assoc.accepted_contexts] == [VERIFICATION]
        with pytest.raises(ValueError, match="presentation context"):
            assoc.send_c_store(tiny_pet_files(tmp_path / "ct", n=1)[0])
        results = {c.abstract_syntax: c.result for c in assoc.rejected_contexts}
        assert results[CT] == 0x03  # abstract syntax not supported
        assert results[PET] == 0x04  # transfer syntaxes not supported
    finally:
        assoc.release()
    good = tiny_pet_files(tmp_path / "src", n=1)
    assert _store_raw(rx.port, good[0]) == Status.SUCCESS


@pytest.mark.network
@pytest.mark.timeout(60)
def test_peer_aborting_mid_association_keeps_what_was_stored(
        receiver, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rx, spool = receiver
    files = tiny_pet_files(tmp_path / "src", n=3)
    caplog.set_level(logging.INFO, logger=SCP_LOGGER)
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(PET, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", rx.port, ae_title="DIPNODE")
    assert assoc.is_established
    assert assoc.send_c_store(files[0]).Status == Status.SUCCESS
    assoc.abort()  # A-ABORT after one of three instances
    # The receiver notices the abort and logs exactly one line about that association.

    def aborted_lines() -> list[str]:
        return [r.getMessage() for r in caplog.records
                if r.name == SCP_LOGGER and "aborted" in r.getMessage()]

    wait_for(aborted_lines, 10, "the receiver to log the abort", interval_s=0.05)
    assert len(aborted_lines()) == 1 and "1 instance(s) stored" in aborted_lines()[0]
    assert len(list(spool.instances.rglob("*.dcm"))) == 1
    assert _store_raw(rx.port, files[1]) == Status.SUCCESS
    assert len(list(spool.instances.rglob("*.dcm"))) == 2


def test_short_pixel_data_is_stored_then_refused_by_the_loader(tmp_path: Path) -> None:
    # The SCP must not decode pixels, so a pixel length mismatch passes the spool and is
    # the series loader's to find: the job fails with a DicomInputError-family reason.
    files = tiny_pet_files(tmp_path / "src", n=3)
    meta, ds = _split(files[1])
    at = _element_offset(ds, 0x7FE0, 0x0010)
    # Explicit VR OW: tag(4) VR(2) reserved(2) length(4) then 128 bytes; keep 64 of them.
    short = ds[:at + 8] + struct.pack("<I", 64) + ds[at + 12:at + 12 + 64]
    files[1].write_bytes(meta + short)
    datasets = read_files(files).datasets
    assert len(datasets) == 3
    with pytest.raises(ValueError) as info:
        load_volume(datasets, modality="PT")
    # Named precisely so a change of contract (e.g. a DicomInputError) shows here.
    assert "64" in str(info.value) or "128" in str(info.value), str(info.value)
