"""The receive path (Node.on_store): acknowledged means durable AND indexed, or a failure
status with nothing left behind; the policy for a re-sent SOP Instance UID; headers the index
cannot take are refused before anything is written.

These call ``Node.on_store`` directly (what the SCP handler calls for each C-STORE); the wire
itself is covered in tests/dicom_io and tests/node/test_hostile.py.
"""
from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from craft import file_bytes, pet_dataset, received
from dipnode.dicom_io.status import Status, StoreRefused
from dipnode.node.server import Node
from dipnode.node.settings import Settings


@pytest.fixture
def node(tmp_path: Path):
    settings = Settings(node={"port": 0, "allowed_calling_aets": ["*"]},
                        storage={"spool_dir": tmp_path / "spool",
                                 "database": tmp_path / "db.sqlite", "min_free_mb": 0})
    n = Node(settings)
    try:
        yield n
    finally:
        n.stop()


def _spooled(node: Node) -> list[Path]:
    return sorted(node.spool.instances.rglob("*.dcm"))


def _refused(node: Node, raw: bytes, **kw) -> StoreRefused:
    with pytest.raises(StoreRefused) as info:
        node.on_store(received(raw, **kw))
    return info.value


def test_missing_modality_is_refused_before_anything_is_written(node: Node) -> None:
    exc = _refused(node, file_bytes(pet_dataset(Modality=None)))
    assert exc.status is Status.CANNOT_UNDERSTAND
    assert "Modality" in exc.reason
    assert _spooled(node) == [] and node.store.indexed_paths() == set()


def test_count_too_large_for_sqlite_is_treated_as_absent(node: Node) -> None:
    # Images in Acquisition (IS) of 10^20 does not fit an SQLite INTEGER; like any malformed count it
    # is ignored (completion then waits for the stable age), and the instance is indexed.
    ds = pet_dataset(ImagesInAcquisition="99999999999999999999")
    assert node.on_store(received(file_bytes(ds))) == Status.SUCCESS
    [path] = _spooled(node)
    assert node.store.indexed_paths() == {path}
    assert node.store.series(str(ds.SeriesInstanceUID)).expected_count is None


def test_any_index_failure_removes_the_spool_file(node: Node, monkeypatch) -> None:
    def broken(*_a, **_k):
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(node.store, "record_instance", broken)
    with pytest.raises(sqlite3.OperationalError):
        node.on_store(received(file_bytes(pet_dataset())))
    assert _spooled(node) == []  # the peer gets a failure status and nothing stays behind
    assert list(node.spool.incoming.iterdir()) == []


def test_multi_valued_patient_id_is_refused_not_indexed_as_list_text(node: Node) -> None:
    ds = pet_dataset()
    ds.PatientID = ["A1", "B2"]  # LO with VM 1 (PS3.6): two values make the identity ambiguous
    exc = _refused(node, file_bytes(ds))
    assert exc.status is Status.DATASET_DOES_NOT_MATCH_SOP_CLASS
    assert "Patient ID" in exc.reason and "A1" not in exc.reason
    assert _spooled(node) == [] and node.store.indexed_paths() == set()


def test_other_multi_valued_text_is_indexed_in_dicom_form(node: Node) -> None:
    ds = pet_dataset(SeriesDescription=["PET", "AC"])
    assert node.on_store(received(file_bytes(ds))) == Status.SUCCESS
    row = node.store.series(str(ds.SeriesInstanceUID))
    assert row.series_description == "PET\\AC"  # never "['PET', 'AC']"


def test_data_encoded_against_another_syntax_is_refused_and_not_stored(node: Node) -> None:
    # The association negotiated Explicit VR Little Endian; the bytes are Implicit VR.
    raw = file_bytes(pet_dataset(), ExplicitVRLittleEndian, encode_as=ImplicitVRLittleEndian)
    exc = _refused(node, raw)
    assert exc.status is Status.TRANSFER_SYNTAX_MISMATCH
    assert _spooled(node) == []
    # ... and the other way round.
    raw = file_bytes(pet_dataset(), ImplicitVRLittleEndian, encode_as=ExplicitVRLittleEndian)
    assert _refused(node, raw).status is Status.TRANSFER_SYNTAX_MISMATCH
    assert _spooled(node) == []


# -- a re-sent SOP Instance UID ---------------------------------------------------------------

def test_same_content_again_is_idempotent(node: Node, caplog) -> None:
    raw = file_bytes(pet_dataset())
    caplog.set_level(logging.DEBUG, logger="dipnode")
    assert node.on_store(received(raw)) == Status.SUCCESS
    [path] = _spooled(node)
    mtime = path.stat().st_mtime_ns
    assert node.on_store(received(raw, calling_ae="OTHER")) == Status.SUCCESS
    assert _spooled(node) == [path] and path.stat().st_mtime_ns == mtime  # not rewritten
    assert any("identical" in r.getMessage() and r.levelno == logging.DEBUG for r in caplog.records)


def test_different_content_under_the_same_uid_is_refused_and_the_first_kept(node: Node, caplog) -> None:
    ds = pet_dataset()
    first = file_bytes(ds)
    assert node.on_store(received(first)) == Status.SUCCESS
    [path] = _spooled(node)
    ds.PixelData = bytes(128)  # other pixels, same SOP Instance UID
    caplog.set_level(logging.WARNING, logger="dipnode")
    exc = _refused(node, file_bytes(ds))
    assert exc.status is Status.DUPLICATE_SOP_INSTANCE
    assert path.read_bytes() == first  # never silently replaced
    assert str(ds.SOPInstanceUID) in exc.reason and str(ds.SeriesInstanceUID) in exc.reason
    assert node.store.series(str(ds.SeriesInstanceUID)).instance_count == 1


def test_same_uid_under_another_series_is_refused_never_acknowledged_and_dropped(node: Node) -> None:
    ds = pet_dataset()
    assert node.on_store(received(file_bytes(ds))) == Status.SUCCESS
    first_series = str(ds.SeriesInstanceUID)
    ds.SeriesInstanceUID = generate_uid()
    exc = _refused(node, file_bytes(ds))
    assert exc.status is Status.DUPLICATE_SOP_INSTANCE
    assert first_series in exc.reason and str(ds.SeriesInstanceUID) in exc.reason
    assert node.store.series(str(ds.SeriesInstanceUID)) is None
    assert len(_spooled(node)) == 1


def test_same_instance_in_another_transfer_syntax_is_refused_as_different_bytes(node: Node) -> None:
    # Stated policy: "same content" means the same data-set bytes; a re-encoding is refused
    # (the first copy is kept) rather than compared element by element.
    ds = pet_dataset()
    assert node.on_store(received(file_bytes(ds, ExplicitVRLittleEndian))) == Status.SUCCESS
    exc = _refused(node, file_bytes(ds, ImplicitVRLittleEndian))
    assert exc.status is Status.DUPLICATE_SOP_INSTANCE and "transfer syntax" in exc.reason


def test_resent_uid_with_the_file_gone_from_disk_is_stored_again(node: Node) -> None:
    raw = file_bytes(pet_dataset())
    assert node.on_store(received(raw)) == Status.SUCCESS
    [path] = _spooled(node)
    path.unlink()  # someone cleaned the spool by hand: the index still names the file
    assert node.on_store(received(raw)) == Status.SUCCESS
    assert path.read_bytes() == raw
    assert pydicom.dcmread(path).SOPInstanceUID == received(raw).sop_instance_uid
