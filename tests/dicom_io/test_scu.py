"""The sending SCU against real peers: Orthanc, DCMTK storescp, and our own SCP."""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import RLELossless, generate_uid

from peers import OrthancPeer, StorescpPeer, free_port, tiny_pet_files  # noqa: E402

from dipnode.dicom_io.scp import ConfigError, ReceivedInstance, ReceiverConfig, start_receiver  # noqa: E402
from dipnode.dicom_io.scu import (  # noqa: E402
    MAX_CONTEXTS,
    PARAMETRIC_MAP_STORAGE,
    Destination,
    _batches,
    _Item,
    build_contexts,
    echo,
    send_files,
)
from dipnode.dicom_io.status import Status, StoreRefused  # noqa: E402

PET = "1.2.840.10008.5.1.4.1.1.128"


def _dataset_bytes(path: Path) -> bytes:
    with open(path, "rb") as f:
        pydicom.filereader.read_preamble(f, force=False)
        pydicom.filereader._read_file_meta_info(f)
        return f.read()


# --- Destination -----------------------------------------------------------------------------

def test_destination_parse() -> None:
    assert Destination.parse("PACS@10.0.0.5:104") == Destination("PACS", "10.0.0.5", 104)
    assert Destination.parse(" ORTHANC@localhost:4242 ") == Destination("ORTHANC", "localhost", 4242)
    assert Destination.parse("X@[::1]:11112") == Destination("X", "::1", 11112)
    assert str(Destination("A", "h", 1)) == "A@h:1"


@pytest.mark.parametrize("bad", ["PACS", "PACS@host", "@host:104", "PACS@:104", "PACS@host:abc",
                                 "PACS@host:0", "PACS@host:70000", "A" * 17 + "@h:104"])
def test_destination_parse_rejects_bad_strings(bad: str) -> None:
    with pytest.raises(ConfigError):
        Destination.parse(bad)


# --- presentation contexts -------------------------------------------------------------------

def test_contexts_cover_parametric_map_and_compressed_syntax() -> None:
    contexts = build_contexts([(PARAMETRIC_MAP_STORAGE, "1.2.840.10008.1.2.1"),
                               (PET, RLELossless), (PET, "1.2.840.10008.1.2")])
    got = {(c.abstract_syntax, tuple(c.transfer_syntax)) for c in contexts}
    assert got == {
        (PARAMETRIC_MAP_STORAGE, ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")),
        (PET, ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")),
        (PET, (RLELossless,)),
    }


def test_more_than_128_contexts_split_into_batches() -> None:
    items = [_Item(Path(f"{i}.dcm"), str(i), f"1.2.3.{i}", f"1.2.4.{i}", "1.2.840.10008.1.2.1")
             for i in range(MAX_CONTEXTS + 5)]
    batches = _batches(items)
    assert [len(b) for b in batches] == [MAX_CONTEXTS, 5]
    with pytest.raises(ValueError, match="at most 128"):
        build_contexts([(i.sop_class_uid, i.transfer_syntax_uid) for i in items])


# --- real peers ------------------------------------------------------------------------------

@pytest.mark.network
@pytest.mark.timeout(60)
def test_send_to_orthanc_delivers_each_instance(tmp_path: Path) -> None:
    files = tiny_pet_files(tmp_path / "src", n=3)
    progress: list[tuple[int, int]] = []
    with OrthancPeer(tmp_path / "orthanc") as orthanc:
        dest = Destination(orthanc.aet, "127.0.0.1", orthanc.dicom_port)
        report = send_files(files, dest, calling_ae="DIPNODE",
                            progress=lambda done, total: progress.append((done, total)))
        count = orthanc.instance_count()
    assert report.association_ok and report.error is None
    assert report.all_ok and report.n_ok == 3 and report.n_failed == 0
    assert [r.status for r in report.results] == [Status.SUCCESS] * 3
    assert {r.sop_instance_uid for r in report.results} == {
        pydicom.dcmread(f).SOPInstanceUID for f in files}
    assert count == 3
    assert progress == [(1, 3), (2, 3), (3, 3)]


@pytest.mark.network
@pytest.mark.timeout(60)
def test_send_to_storescp_is_bit_identical_and_takes_datasets(tmp_path: Path) -> None:
    files = tiny_pet_files(tmp_path / "src", n=2)
    ds = pydicom.dcmread(tiny_pet_files(tmp_path / "mem", n=1)[0])
    with StorescpPeer(tmp_path / "storescp" / "out") as peer:
        dest = Destination(peer.aet, "127.0.0.1", peer.port)
        assert echo(dest)
        report = send_files([*files, ds], dest)
        received = peer.files()
    assert report.all_ok, report
    assert report.results[2].path_or_uid == ds.SOPInstanceUID
    assert len(received) == 3
    by_uid = {pydicom.dcmread(p).SOPInstanceUID: p for p in received}
    for f in files:
        assert _dataset_bytes(by_uid[pydicom.dcmread(f).SOPInstanceUID]) == _dataset_bytes(f)


@pytest.mark.network
@pytest.mark.timeout(60)
def test_parametric_map_context_is_negotiated(tmp_path: Path) -> None:
    # A Parametric Map Storage object as far as the wire is concerned (the IOD itself is the
    # writer's business): pynetdicom's presets would not even request this SOP class.
    [path] = tiny_pet_files(tmp_path / "src", n=1)
    ds = pydicom.dcmread(path)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = PARAMETRIC_MAP_STORAGE
    ds.Modality = "OT"
    ds.save_as(path)
    got: list[ReceivedInstance] = []
    cfg = ReceiverConfig(port=0, sop_classes=(PARAMETRIC_MAP_STORAGE,))
    with start_receiver(cfg, lambda i: (got.append(i), Status.SUCCESS)[1]) as rx:
        report = send_files([path], Destination("DIPNODE", "127.0.0.1", rx.port))
    assert report.all_ok, report
    assert [i.sop_class_uid for i in got] == [PARAMETRIC_MAP_STORAGE]


@pytest.mark.network
@pytest.mark.timeout(30)
def test_closed_port_is_reported_not_raised(tmp_path: Path) -> None:
    files = tiny_pet_files(tmp_path / "src", n=2)
    dest = Destination("NOBODY", "127.0.0.1", free_port())
    report = send_files(files, dest, timeout_s=5)
    assert not report.association_ok
    assert report.error and "NOBODY@127.0.0.1" in report.error
    assert [r.ok for r in report.results] == [False, False]
    assert all(r.status is None for r in report.results)
    assert not report.all_ok
    assert not echo(dest, timeout_s=5)


@pytest.mark.network
@pytest.mark.timeout(30)
def test_rejected_association_names_the_reason(tmp_path: Path) -> None:
    files = tiny_pet_files(tmp_path / "src", n=1)
    cfg = ReceiverConfig(port=0, allowed_calling_aets=frozenset({"SCANNER"}))
    with start_receiver(cfg, lambda i: Status.SUCCESS) as rx:
        dest = Destination("DIPNODE", "127.0.0.1", rx.port)
        report = send_files(files, dest, calling_ae="STRANGER")
        ok = send_files(files, dest, calling_ae="SCANNER")
    assert not report.association_ok
    assert "Calling AE title not recognised" in (report.error or "")
    assert ok.all_ok


@pytest.mark.network
@pytest.mark.timeout(30)
def test_per_instance_failure_is_reported(tmp_path: Path) -> None:
    files = tiny_pet_files(tmp_path / "src", n=3)
    refused_uid = pydicom.dcmread(files[1]).SOPInstanceUID

    def on_store(inst: ReceivedInstance) -> Status:
        if inst.sop_instance_uid == refused_uid:
            raise StoreRefused(Status.OUT_OF_RESOURCES, "full")
        return Status.SUCCESS

    with start_receiver(ReceiverConfig(port=0), on_store) as rx:
        report = send_files(files, Destination("DIPNODE", "127.0.0.1", rx.port))
    assert report.association_ok
    assert [r.status for r in report.results] == [Status.SUCCESS, Status.OUT_OF_RESOURCES,
                                                  Status.SUCCESS]
    assert [r.ok for r in report.results] == [True, False, True]
    assert "OUT_OF_RESOURCES" in report.results[1].message
    assert report.n_failed == 1 and not report.all_ok


@pytest.mark.network
@pytest.mark.timeout(30)
def test_unreadable_file_fails_alone(tmp_path: Path) -> None:
    files = tiny_pet_files(tmp_path / "src", n=1)
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"nope")
    with start_receiver(ReceiverConfig(port=0), lambda i: Status.SUCCESS) as rx:
        report = send_files([junk, *files], Destination("DIPNODE", "127.0.0.1", rx.port))
    assert [r.ok for r in report.results] == [False, True]
    assert report.results[0].message.startswith("not a DICOM file")
    assert "force" not in report.results[0].message  # pydicom's advice is for programmers


# --- TLS ---------------------------------------------------------------------------------------

def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=30,
    )
    return key, cert


@pytest.mark.network
@pytest.mark.timeout(60)
def test_tls_round_trip(tmp_path: Path) -> None:
    key, cert = _self_signed(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
    files = tiny_pet_files(tmp_path / "src", n=2)
    got: list[ReceivedInstance] = []
    cfg = ReceiverConfig(port=0, tls=server_ctx)
    with start_receiver(cfg, lambda i: (got.append(i), Status.SUCCESS)[1]) as rx:
        dest = Destination("DIPNODE", "127.0.0.1", rx.port)
        report = send_files(files, dest, tls=client_ctx)
        plain = send_files(files[:1], dest, timeout_s=5)  # no TLS: must not get through
    assert report.all_ok, report
    assert len(got) == 2
    assert not plain.association_ok


@pytest.mark.network
@pytest.mark.timeout(30)
def test_tcp_nodelay_is_set_on_both_ends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # docs/DESIGN.md "Networking facts": Nagle + delayed ACK cap pynetdicom at ~20 images/s.
    import socket

    import dipnode.dicom_io.scp as scp_mod
    import dipnode.dicom_io.scu as scu_mod

    seen: list[tuple[str, int]] = []
    original = scp_mod.set_tcp_nodelay

    def recording(event: object) -> None:
        original(event)  # type: ignore[arg-type]
        sock = event.assoc.dul.socket.socket  # type: ignore[attr-defined]
        seen.append((event.assoc.mode,  # type: ignore[attr-defined]
                     sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)))

    monkeypatch.setattr(scp_mod, "set_tcp_nodelay", recording)
    monkeypatch.setattr(scu_mod, "set_tcp_nodelay", recording)
    files = tiny_pet_files(tmp_path / "src", n=1)
    with start_receiver(ReceiverConfig(port=0), lambda i: Status.SUCCESS) as rx:
        report = send_files(files, Destination("DIPNODE", "127.0.0.1", rx.port))
    assert report.all_ok
    assert sorted(mode for mode, _ in seen) == ["acceptor", "requestor"]
    assert all(flag != 0 for _, flag in seen)


def _rle_copy(src: Path, dst: Path) -> Path:
    ds = pydicom.dcmread(src)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.compress(RLELossless)
    ds.save_as(dst, enforce_file_format=True)
    return dst


@pytest.mark.network
@pytest.mark.timeout(60)
def test_compressed_syntax_is_sent_as_is_or_reported(tmp_path: Path) -> None:
    [plain] = tiny_pet_files(tmp_path / "src", n=1)
    rle = _rle_copy(plain, tmp_path / "rle.dcm")
    got: list[ReceivedInstance] = []

    def on_store(inst: ReceivedInstance) -> Status:
        got.append(inst)
        return Status.SUCCESS

    with start_receiver(ReceiverConfig(port=0), on_store) as rx:
        both = send_files([plain, rle], Destination("DIPNODE", "127.0.0.1", rx.port))
    assert both.all_ok, both
    assert [i.transfer_syntax_uid for i in got] == ["1.2.840.10008.1.2.1", RLELossless]
    copy = tmp_path / "copy.dcm"
    copy.write_bytes(got[1].raw)
    assert _dataset_bytes(copy) == _dataset_bytes(rle)

    # A peer that takes uncompressed data only: the RLE instance fails alone, with a reason.
    uncompressed_only = ReceiverConfig(port=0, transfer_syntaxes=("1.2.840.10008.1.2.1",))
    with start_receiver(uncompressed_only, lambda i: Status.SUCCESS) as rx:
        part = send_files([plain, rle], Destination("DIPNODE", "127.0.0.1", rx.port))
    assert part.association_ok
    assert [r.ok for r in part.results] == [True, False]
    assert part.results[1].status is None and "not sent" in part.results[1].message


@pytest.mark.timeout(60)
def test_unresolvable_host_is_a_failed_association_not_an_exception(tmp_path: Path) -> None:
    # ".invalid" never resolves (RFC 2606). Before: socket.gaierror escaped send_files and
    # echo (a traceback in `dipnode send`, a scheduler step failing at every tick in the node).
    files = tiny_pet_files(tmp_path / "src", n=2)
    dest = Destination("PACS", "nohost.invalid", 104)
    report = send_files(files, dest)
    assert not report.association_ok and not report.all_ok and report.n_failed == 2
    assert "cannot resolve or use host 'nohost.invalid'" in (report.error or "")
    result = echo(dest)
    assert not result.ok and "cannot resolve or use host 'nohost.invalid'" in result.message
