"""Bounded resources at the door: a maximum instance size on the wire, a bounded inflation of
Deflated Explicit VR Little Endian, and what ``accept_compressed = false`` really negotiates.
Each refusal is a named status and one log line; the association (and the node) go on."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian,
                         ImplicitVRLittleEndian, JPEG2000Lossless, RLELossless)
from pynetdicom import AE, build_context

from craft import deflate_bomb, write_file
from dipnode.dicom_io.scp import ReceiverConfig, start_receiver
from dipnode.dicom_io.status import Status
from dipnode.node.ingest.spool import Spool
from peers import run_storescu, storescu_statuses, tiny_pet_files


PET = "1.2.840.10008.5.1.4.1.1.128"
MIB = 1 << 20
SCP_LOGGER = "dipnode.dicom_io.scp"


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == SCP_LOGGER and r.levelno >= logging.WARNING]


@pytest.fixture
def raw_sending(monkeypatch: pytest.MonkeyPatch) -> None:
    """pynetdicom sends a file's data set as its bytes are (no decode, no re-encode)."""
    from pynetdicom import _config

    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


def _send(port: int, paths: list[Path], syntaxes: list[str]) -> list[int]:
    ae = AE(ae_title="STORESCU")
    for ts in syntaxes:  # one context per syntax: each file goes in its own syntax
        ae.add_requested_context(PET, [ts])
    assoc = ae.associate("127.0.0.1", port, ae_title="DIPNODE")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(p).Status) for p in paths]
    finally:
        assoc.release()


def _big_pet(path: Path, rows: int) -> Path:
    [src] = tiny_pet_files(path.parent / f"{path.stem}-src", n=1)
    ds = pydicom.dcmread(src)
    ds.Rows = ds.Columns = rows
    ds.PixelData = np.zeros((rows, rows), dtype=np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.network
@pytest.mark.timeout(120)
def test_instance_over_the_size_limit_is_refused_and_the_association_goes_on(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=SCP_LOGGER)
    spool = Spool(tmp_path / "spool", min_free_bytes=0, max_instance_bytes=MIB)
    got: list[int] = []
    cfg = ReceiverConfig(port=0, max_instance_bytes=MIB)

    def on_store(i):
        spool.store(i)
        got.append(len(i.raw))
        return Status.SUCCESS

    big = _big_pet(tmp_path / "big.dcm", rows=1024)  # 2 MiB of pixels
    small = tiny_pet_files(tmp_path / "small", n=1)
    with start_receiver(cfg, on_store) as rx:
        res = run_storescu([big, *small], rx.port, called="DIPNODE", extra=["-nh"], timeout_s=60)
    assert storescu_statuses(res) == [Status.INSTANCE_TOO_LARGE, Status.SUCCESS], res.stdout
    assert len(got) == 1 and got[0] < MIB
    assert len(list(spool.instances.rglob("*.dcm"))) == 1
    [line] = _warnings(caplog)
    assert "INSTANCE_TOO_LARGE" in line and "max_instance" in line


@pytest.mark.network
@pytest.mark.timeout(120)
def test_deflate_bomb_is_refused_by_a_bounded_inflation(tmp_path: Path, raw_sending: None,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=SCP_LOGGER)
    bomb = write_file(tmp_path / "bomb.dcm", deflate_bomb(64 * MIB))  # ~64 kB on the wire
    assert bomb.stat().st_size < MIB
    spool = Spool(tmp_path / "spool", min_free_bytes=0, max_instance_bytes=8 * MIB)
    cfg = ReceiverConfig(port=0, max_instance_bytes=8 * MIB)
    with start_receiver(cfg, lambda i: (spool.store(i), Status.SUCCESS)[1]) as rx:
        statuses = _send(rx.port, [bomb, *tiny_pet_files(tmp_path / "ok", n=1)],
                         [DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian])
    assert statuses == [Status.INFLATED_TOO_LARGE, Status.SUCCESS]
    assert len(list(spool.instances.rglob("*.dcm"))) == 1
    [line] = _warnings(caplog)
    assert "INFLATED_TOO_LARGE" in line


@pytest.mark.network
def test_a_small_deflated_instance_is_still_accepted(tmp_path: Path, raw_sending: None) -> None:
    spool = Spool(tmp_path / "spool", min_free_bytes=0, max_instance_bytes=8 * MIB)
    [src] = tiny_pet_files(tmp_path / "src", n=1)
    ds = pydicom.dcmread(src)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    deflated = tmp_path / "deflated.dcm"
    ds.save_as(deflated, enforce_file_format=True)
    with start_receiver(ReceiverConfig(port=0), lambda i: (spool.store(i), Status.SUCCESS)[1]) as rx:
        assert _send(rx.port, [deflated], [DeflatedExplicitVRLittleEndian]) == [Status.SUCCESS]
    [stored] = spool.instances.rglob("*.dcm")
    assert pydicom.dcmread(stored).PixelData == ds.PixelData


def test_declared_pixel_size_over_the_limit_is_refused_before_any_decoding(tmp_path: Path) -> None:
    # A compressed frame can decode to Rows x Columns x Bits: the header says how much.
    from craft import file_bytes, pet_dataset, received
    from dipnode.dicom_io.status import StoreRefused

    spool = Spool(tmp_path / "spool", min_free_bytes=0, max_instance_bytes=MIB)
    ds = pet_dataset(Rows=4096, Columns=4096)  # 32 MiB once decoded; 128 bytes on the wire
    with pytest.raises(StoreRefused) as info:
        spool.store(received(file_bytes(ds)))
    assert info.value.status is Status.INSTANCE_TOO_LARGE
    assert not list(spool.instances.rglob("*.dcm"))


@pytest.mark.network
@pytest.mark.timeout(60)
def test_accept_compressed_false_negotiates_native_syntaxes_only() -> None:
    cfg = ReceiverConfig(port=0, accept_compressed=False)
    assert cfg.offered_transfer_syntaxes == (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
    with start_receiver(cfg, lambda i: Status.SUCCESS) as rx:
        ae = AE(ae_title="STORESCU")
        offered = [DeflatedExplicitVRLittleEndian, RLELossless, JPEG2000Lossless,
                   ExplicitVRLittleEndian, ImplicitVRLittleEndian]
        contexts = [build_context(PET, [ts]) for ts in offered]
        assoc = ae.associate("127.0.0.1", rx.port, ae_title="DIPNODE", contexts=contexts)
        try:
            assert assoc.is_established
            accepted = sorted(str(c.transfer_syntax[0]) for c in assoc.accepted_contexts)
            assert accepted == sorted([ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        finally:
            assoc.release()


@pytest.mark.network
@pytest.mark.timeout(60)
def test_with_accept_compressed_false_a_deflate_bomb_has_no_context(tmp_path: Path,
                                                                   raw_sending: None) -> None:
    bomb = write_file(tmp_path / "bomb.dcm", deflate_bomb(16 * MIB))
    got: list[object] = []
    cfg = ReceiverConfig(port=0, accept_compressed=False)
    with start_receiver(cfg, lambda i: (got.append(i), Status.SUCCESS)[1]) as rx:
        ae = AE(ae_title="STORESCU")
        ae.add_requested_context(PET, [DeflatedExplicitVRLittleEndian])
        ae.add_requested_context("1.2.840.10008.1.1")  # keeps the association up
        assoc = ae.associate("127.0.0.1", rx.port, ae_title="DIPNODE")
        try:
            assert assoc.is_established
            with pytest.raises(ValueError, match="presentation context"):
                assoc.send_c_store(bomb)
        finally:
            assoc.release()
    assert got == []
