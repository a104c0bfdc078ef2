"""The receiving SCP against real DCMTK peers on loopback."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pydicom
import pytest
from pydicom.filereader import read_preamble
from pydicom.uid import ImplicitVRLittleEndian

from peers import run_echoscu, run_storescu, storescu_statuses, tiny_pet_files  # noqa: E402

from dipnode.dicom_io.scp import (  # noqa: E402
    ConfigError,
    ReceivedInstance,
    ReceiverConfig,
    start_receiver,
)
from dipnode.dicom_io.status import Status, StoreRefused  # noqa: E402
from dipnode.node.ingest.spool import Spool  # noqa: E402



def _dataset_bytes(path: Path) -> bytes:
    """The encoded data set after the PS3.10 preamble and file meta group."""
    with open(path, "rb") as f:
        read_preamble(f, force=False)
        pydicom.filereader._read_file_meta_info(f)
        return f.read()


def _config(**kw: object) -> ReceiverConfig:
    return ReceiverConfig(ae_title="DIPNODE", host="127.0.0.1", port=0, **kw)  # type: ignore[arg-type]


@pytest.mark.network
@pytest.mark.timeout(60)
def test_storescu_to_spool_is_byte_identical(tmp_path: Path) -> None:
    sent = tiny_pet_files(tmp_path / "src", n=3)
    spool = Spool(tmp_path / "spool", min_free_bytes=0)
    got: list[ReceivedInstance] = []

    def on_store(inst: ReceivedInstance) -> Status:
        spool.store(inst)
        got.append(inst)
        return Status.SUCCESS

    with start_receiver(_config(), on_store) as rx:
        assert rx.port > 0
        res = run_storescu(sent, rx.port, aet="SCANNER", called="DIPNODE")
    assert res.returncode == 0, res.stderr
    assert storescu_statuses(res) == [Status.SUCCESS] * 3
    assert len(got) == 3
    assert {i.calling_ae for i in got} == {"SCANNER"}
    assert {i.peer_address for i in got} == {"127.0.0.1"}
    for src in sent:
        ds = pydicom.dcmread(src)
        stored = spool.path_for(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        assert _dataset_bytes(stored) == _dataset_bytes(src)
        back = pydicom.dcmread(stored)
        assert back.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert back.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
    assert list(spool.incoming.iterdir()) == []


@pytest.mark.network
@pytest.mark.timeout(60)
def test_implicit_vr_is_kept_as_received(tmp_path: Path) -> None:
    sent = tiny_pet_files(tmp_path / "src", n=1, transfer_syntax=ImplicitVRLittleEndian)
    got: list[ReceivedInstance] = []
    with start_receiver(_config(), lambda i: (got.append(i), Status.SUCCESS)[1]) as rx:
        res = run_storescu(sent, rx.port, called="DIPNODE", extra=["-xi"])
    assert res.returncode == 0, res.stderr
    [inst] = got
    assert inst.transfer_syntax_uid == ImplicitVRLittleEndian
    copy = tmp_path / "copy.dcm"
    copy.write_bytes(inst.raw)
    assert _dataset_bytes(copy) == _dataset_bytes(sent[0])


@pytest.mark.network
@pytest.mark.timeout(30)
def test_echoscu_is_answered(tmp_path: Path) -> None:
    with start_receiver(_config(), lambda i: Status.SUCCESS) as rx:
        res = run_echoscu(rx.port, aet="ANYONE", called="DIPNODE")
    assert res.returncode == 0, res.stderr


@pytest.mark.network
@pytest.mark.timeout(60)
def test_unknown_calling_aet_is_rejected_at_association(tmp_path: Path) -> None:
    sent = tiny_pet_files(tmp_path / "src", n=1)
    got: list[ReceivedInstance] = []
    cfg = _config(allowed_calling_aets=frozenset({"SCANNER"}))
    with start_receiver(cfg, lambda i: (got.append(i), Status.SUCCESS)[1]) as rx:
        bad_echo = run_echoscu(rx.port, aet="BAD", called="DIPNODE")
        bad_store = run_storescu(sent, rx.port, aet="BAD", called="DIPNODE")
        good_echo = run_echoscu(rx.port, aet="SCANNER", called="DIPNODE")
    assert bad_echo.returncode != 0
    assert "Calling AE Title Not Recognized" in bad_echo.stdout + bad_echo.stderr
    assert bad_store.returncode != 0
    assert "Association Rejected" in bad_store.stdout + bad_store.stderr
    assert got == []
    assert good_echo.returncode == 0, good_echo.stderr


@pytest.mark.network
@pytest.mark.timeout(30)
def test_address_not_allowed_is_rejected(tmp_path: Path) -> None:
    cfg = _config(allowed_addresses=frozenset({"192.0.2.1"}))  # TEST-NET-1: never us
    with start_receiver(cfg, lambda i: Status.SUCCESS) as rx:
        res = run_echoscu(rx.port, called="DIPNODE")
    assert res.returncode != 0
    assert "Association Rejected" in res.stdout + res.stderr


@pytest.mark.network
@pytest.mark.timeout(60)
def test_refusal_answers_a700_and_server_keeps_serving(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first, second = tiny_pet_files(tmp_path / "a", n=1), tiny_pet_files(tmp_path / "b", n=1)
    refuse = threading.Event()
    refuse.set()
    got: list[ReceivedInstance] = []

    def on_store(inst: ReceivedInstance) -> Status:
        if refuse.is_set():
            raise StoreRefused(Status.OUT_OF_RESOURCES, "spool below free-space mark")
        got.append(inst)
        return Status.SUCCESS

    with caplog.at_level(logging.WARNING, logger="dipnode.dicom_io.scp"):
        with start_receiver(_config(), on_store) as rx:
            refused = run_storescu(first, rx.port, called="DIPNODE")
            refuse.clear()
            accepted = run_storescu(second, rx.port, called="DIPNODE")
    assert storescu_statuses(refused) == [Status.OUT_OF_RESOURCES]
    assert storescu_statuses(accepted) == [Status.SUCCESS]
    assert got and got[0].sop_instance_uid == pydicom.dcmread(second[0]).SOPInstanceUID
    assert accepted.returncode == 0, accepted.stderr
    refusals = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 1


@pytest.mark.network
@pytest.mark.timeout(60)
def test_handler_exception_is_processing_failure(tmp_path: Path) -> None:
    files = tiny_pet_files(tmp_path / "src", n=2)
    calls: list[str] = []

    def on_store(inst: ReceivedInstance) -> Status:
        calls.append(inst.sop_instance_uid)
        if len(calls) == 1:
            raise RuntimeError("bug in consumer")
        return Status.SUCCESS

    with start_receiver(_config(), on_store) as rx:
        # -nh: storescu would otherwise stop after the first failure.
        res = run_storescu(files, rx.port, called="DIPNODE", extra=["-nh"])
    assert storescu_statuses(res) == [Status.PROCESSING_FAILURE, Status.SUCCESS]
    assert len(calls) == 2  # the second instance on the same association still got through


@pytest.mark.network
@pytest.mark.timeout(60)
def test_enospc_maps_to_out_of_resources(tmp_path: Path) -> None:
    files = tiny_pet_files(tmp_path / "src", n=1)

    def on_store(inst: ReceivedInstance) -> Status:
        raise OSError(28, "No space left on device")

    with start_receiver(_config(), on_store) as rx:
        res = run_storescu(files, rx.port, called="DIPNODE")
    assert storescu_statuses(res) == [Status.OUT_OF_RESOURCES]


@pytest.mark.network
@pytest.mark.timeout(60)
def test_unsupported_sop_class_gets_no_context(tmp_path: Path) -> None:
    files = tiny_pet_files(tmp_path / "src", n=1)
    got: list[ReceivedInstance] = []
    cfg = _config(sop_classes=("1.2.840.10008.5.1.4.1.1.4",))  # MR only
    with start_receiver(cfg, lambda i: (got.append(i), Status.SUCCESS)[1]) as rx:
        res = run_storescu(files, rx.port, called="DIPNODE")
    assert res.returncode != 0
    assert got == []


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"ae_title": ""}, "ae_title"),
        ({"ae_title": "X" * 17}, "ae_title"),
        ({"port": 70000}, "port: expected 0-65535, got 70000"),
        ({"max_associations": 0}, "max_associations"),
        ({"max_pdu_length": 100}, "max_pdu_length"),
        ({"idle_timeout_s": 0}, "idle_timeout_s"),
        ({"allowed_calling_aets": frozenset()}, "allowed_calling_aets"),
        ({"sop_classes": ()}, "sop_classes"),
    ],
)
def test_config_validation(kw: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ReceiverConfig(**kw)  # type: ignore[arg-type]


def test_store_refused_needs_a_failure_status() -> None:
    with pytest.raises(ValueError, match="StoreRefused status"):
        StoreRefused(Status.SUCCESS, "x")  # type: ignore[arg-type]


def test_accept_compressed_false_offers_native_syntaxes_only() -> None:
    # Deflate (PS3.5 A.5) is a compression too: no inflation of any kind (issue 16).
    cfg = ReceiverConfig(accept_compressed=False)
    assert set(cfg.offered_transfer_syntaxes) == {"1.2.840.10008.1.2.1", "1.2.840.10008.1.2"}
    with pytest.raises(ConfigError, match="uncompressed"):
        ReceiverConfig(accept_compressed=False, transfer_syntaxes=("1.2.840.10008.1.2.5",))


@pytest.mark.network
@pytest.mark.timeout(30)
def test_accept_compressed_false_refuses_rle_context(tmp_path: Path) -> None:
    from pydicom.uid import RLELossless

    from dipnode.dicom_io.scu import Destination, send_files

    [plain] = tiny_pet_files(tmp_path / "src", n=1)
    ds = pydicom.dcmread(plain)
    ds.compress(RLELossless)
    rle = tmp_path / "rle.dcm"
    ds.save_as(rle, enforce_file_format=True)
    with start_receiver(_config(accept_compressed=False), lambda i: Status.SUCCESS) as rx:
        report = send_files([rle], Destination("DIPNODE", "127.0.0.1", rx.port))
    assert report.association_ok and not report.results[0].ok
