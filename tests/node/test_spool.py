"""The durable spool: atomic files, free-space mark, idempotent duplicates, recovery, safe names."""

from __future__ import annotations

import os
from pathlib import Path

import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peers import tiny_pet_files  # noqa: E402

from dipnode.dicom_io.scp import ReceivedInstance  # noqa: E402
from dipnode.dicom_io.status import Status, StoreRefused  # noqa: E402
from dipnode.node.ingest.spool import InvalidUIDError, Spool, check_uid  # noqa: E402


def _instance(path: Path, sop_instance_uid: str | None = None) -> ReceivedInstance:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return ReceivedInstance(
        sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uid=sop_instance_uid or str(ds.SOPInstanceUID),
        transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
        calling_ae="SCANNER",
        peer_address="127.0.0.1",
        raw=path.read_bytes(),
    )


@pytest.fixture
def pet(tmp_path: Path) -> list[Path]:
    return tiny_pet_files(tmp_path / "src", n=2)


def test_store_writes_bytes_under_study_series_and_leaves_no_temp(tmp_path: Path, pet: list[Path]) -> None:
    spool = Spool(tmp_path / "spool", min_free_bytes=0)
    ds = pydicom.dcmread(pet[0])
    stored = spool.store(_instance(pet[0]))
    out = stored.path
    assert stored.header.PatientID == "TEST-0001" and "PixelData" not in stored.header
    assert stored.series_instance_uid == ds.SeriesInstanceUID
    assert out == (spool.instances / ds.StudyInstanceUID / ds.SeriesInstanceUID
                   / f"{ds.SOPInstanceUID}.dcm")
    assert out.read_bytes() == pet[0].read_bytes()
    assert list(spool.incoming.iterdir()) == []


def test_duplicate_sop_instance_is_idempotent(tmp_path: Path, pet: list[Path]) -> None:
    spool = Spool(tmp_path / "spool", min_free_bytes=0)
    first = spool.store(_instance(pet[0])).path
    second = spool.store(_instance(pet[0])).path
    assert first == second
    assert second.read_bytes() == pet[0].read_bytes()
    assert len(list(spool.instances.rglob("*.dcm"))) == 1
    assert list(spool.incoming.iterdir()) == []


def test_free_space_mark_refuses_with_out_of_resources(tmp_path: Path, pet: list[Path]) -> None:
    spool = Spool(tmp_path / "spool", min_free_bytes=1 << 62)  # more than any disk has
    with pytest.raises(StoreRefused) as info:
        spool.store(_instance(pet[0]))
    assert info.value.status == Status.OUT_OF_RESOURCES
    assert "free-space mark" in str(info.value)
    assert list(spool.instances.rglob("*.dcm")) == []
    assert list(spool.incoming.iterdir()) == []


def test_recover_removes_leftover_temp_files(tmp_path: Path, pet: list[Path]) -> None:
    spool = Spool(tmp_path / "spool", min_free_bytes=0)
    kept = spool.store(_instance(pet[0])).path
    # What a crash between write and rename leaves behind.
    for name in ("a.tmp", "b.tmp"):
        (spool.incoming / name).write_bytes(pet[1].read_bytes()[:100])
    again = Spool(tmp_path / "spool", min_free_bytes=0)
    assert again.recover() == 2
    assert list(again.incoming.iterdir()) == []
    assert kept.read_bytes() == pet[0].read_bytes()
    assert again.recover() == 0


def test_failed_rename_leaves_no_temp_and_no_final(tmp_path: Path, pet: list[Path],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    spool = Spool(tmp_path / "spool", min_free_bytes=0)

    def broken_replace(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        spool.store(_instance(pet[0]))
    assert list(spool.incoming.iterdir()) == []
    assert list(spool.instances.rglob("*.dcm")) == []


@pytest.mark.parametrize("bad", ["../../etc/passwd", "1.2/../3", "1.2.", ".1.2", "1..2", "",
                                 "1.2.abc", "1" * 65, "1.2\x00.3"])
def test_unsafe_uid_is_refused(bad: str) -> None:
    with pytest.raises(InvalidUIDError, match="PS3.5 9.1"):
        check_uid("sop_instance_uid", bad)


def test_path_traversal_in_command_uid_is_refused(tmp_path: Path, pet: list[Path]) -> None:
    spool = Spool(tmp_path / "spool", min_free_bytes=0)
    with pytest.raises(StoreRefused) as info:
        spool.store(_instance(pet[0], sop_instance_uid="../../../evil"))
    assert info.value.status == Status.CANNOT_UNDERSTAND
    assert not (tmp_path / "evil.dcm").exists()
    assert list(spool.instances.rglob("*")) == []


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_path_traversal_in_dataset_uid_is_refused(tmp_path: Path) -> None:
    [path] = tiny_pet_files(tmp_path / "src", n=1)
    ds = pydicom.dcmread(path)
    ds.SeriesInstanceUID = "../../x"
    ds.save_as(path)
    spool = Spool(tmp_path / "spool", min_free_bytes=0)
    with pytest.raises(StoreRefused) as info:
        spool.store(_instance(path))
    assert info.value.status == Status.CANNOT_UNDERSTAND
    assert "SeriesInstanceUID" in str(info.value)
    assert list(spool.instances.rglob("*")) == []


def test_command_and_dataset_uid_mismatch_is_refused(tmp_path: Path, pet: list[Path]) -> None:
    spool = Spool(tmp_path / "spool", min_free_bytes=0)
    with pytest.raises(StoreRefused, match="command says 1.2.3"):
        spool.store(_instance(pet[0], sop_instance_uid="1.2.3"))


def test_garbage_bytes_are_cannot_understand(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", min_free_bytes=0)
    junk = ReceivedInstance("1.2", "1.2.3", "1.2.840.10008.1.2.1", "X", "127.0.0.1", b"not dicom")
    with pytest.raises(StoreRefused) as info:
        spool.store(junk)
    assert info.value.status == Status.CANNOT_UNDERSTAND


def test_negative_mark_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="min_free_bytes: expected >= 0, got -1"):
        Spool(tmp_path, min_free_bytes=-1)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="0123456789./\\:abc\x00", max_size=70))
def test_any_accepted_uid_stays_inside_the_spool(text: str) -> None:
    try:
        uid = check_uid("uid", text)
    except InvalidUIDError:
        return
    root = Path("/spool/instances")
    path = (root / uid / uid / f"{uid}.dcm").resolve()
    assert path.is_relative_to(root) and path.parent.parent.parent == root
    assert set(uid) <= set("0123456789.") and len(uid) <= 64
