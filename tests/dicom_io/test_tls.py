"""TLS (PS3.15 B.1) against DCMTK in both directions, and the receiver's resource limits:
max_associations and the idle timeout. Certificates come from a throwaway CA made by openssl.
"""
from __future__ import annotations

import os
import socket
import subprocess
import time
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pynetdicom import AE

from dipnode.dicom_io.scp import ReceiverConfig, start_receiver
from dipnode.dicom_io.scu import Destination, send_files
from dipnode.dicom_io.status import Status
from dipnode.node import wire
from dipnode.node.settings import Settings
from nodeproc import wait_for
from peers import _poll, _stop, free_port, require, run_storescu, storescu_statuses, tiny_pet_files


PET = "1.2.840.10008.5.1.4.1.1.128"
ENV = {**os.environ, "TCP_NODELAY": "1"}


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run([require("openssl"), *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ca.pem/ca.key, server.pem/server.key (CN/SAN 127.0.0.1), client.pem/client.key."""
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test-ca",
             "-keyout", "ca.key", "-out", "ca.pem", cwd=d)
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
                 "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d)
        (d / f"{name}.ext").write_text("subjectAltName=IP:127.0.0.1\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-days", "1", "-extfile", f"{name}.ext", "-out", f"{name}.pem",
                 cwd=d)
    return d


def _settings(pki: Path, **node: object) -> Settings:
    return Settings(node={"allowed_calling_aets": ["*"], "port": 0, **node})


@pytest.mark.network
@pytest.mark.timeout(90)
def test_dcmtk_storescu_over_tls_to_our_receiver(pki: Path, tmp_path: Path) -> None:
    s = _settings(pki, tls_cert=pki / "server.pem", tls_key=pki / "server.key",
                  tls_ca=pki / "ca.pem", tls_require_client_cert=True)
    got: list[str] = []
    files = tiny_pet_files(tmp_path / "src", n=2)
    with start_receiver(wire.receiver_config(s), lambda i: (got.append(i.sop_instance_uid),
                                                            Status.SUCCESS)[1]) as rx:
        tls = ["+tls", str(pki / "client.key"), str(pki / "client.pem"), "+cf", str(pki / "ca.pem")]
        ok = run_storescu(files, rx.port, called="DIPNODE", extra=tls)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert storescu_statuses(ok) == [0, 0]
        # Without a client certificate (anonymous TLS) the handshake must fail.
        anon = run_storescu(files[:1], rx.port, called="DIPNODE",
                            extra=["+tla", "+cf", str(pki / "ca.pem")], timeout_s=20)
        assert anon.returncode != 0
        # Plain TCP to a TLS port never gets an association.
        plain = run_storescu(files[:1], rx.port, called="DIPNODE", timeout_s=20)
        assert plain.returncode != 0
    assert len(got) == 2


@pytest.mark.network
@pytest.mark.timeout(90)
def test_our_tls_sender_to_dcmtk_storescp(pki: Path, tmp_path: Path) -> None:
    out = tmp_path / "rx"
    out.mkdir()
    port = free_port()
    log = open(tmp_path / "storescp.log", "wb")
    proc = subprocess.Popen(
        [require("storescp"), "-aet", "STORESCP", "+B", "-od", str(out),
         "+tls", str(pki / "server.key"), str(pki / "server.pem"), "+cf", str(pki / "ca.pem"),
         "-rc", str(port)], stdout=log, stderr=subprocess.STDOUT, env=ENV)
    try:
        # Readiness: the TLS port accepts a TCP connection (echoscu would need TLS too).
        def listening() -> bool:
            with socket.socket() as sock:
                return sock.connect_ex(("127.0.0.1", port)) == 0
        _poll(listening, 10, "storescp +tls", proc)
        s = Settings(node={"allowed_calling_aets": ["*"]},
                     destinations=[{"ae_title": "STORESCP", "host": "127.0.0.1", "port": port,
                                    "tls": True}],
                     sender={"tls_ca": pki / "ca.pem", "tls_cert": pki / "client.pem",
                             "tls_key": pki / "client.key"})
        label = s.destinations[0].label
        route = wire.destination_routes(s, wire.client_tls(s))[label]
        assert route.tls is not None
        files = tiny_pet_files(tmp_path / "src", n=2)
        report = send_files(files, route.peer, calling_ae=s.calling_ae, timeout_s=s.sender.timeout_s,
                            tls=route.tls)
        assert report.all_ok, report
        assert len(list(out.iterdir())) == 2
        # The same destination with tls=false: DCMTK's TLS port refuses plain DICOM.
        plain = send_files(files[:1], Destination.parse(label), calling_ae="DIPNODE", timeout_s=5)
        assert not plain.all_ok
    finally:
        _stop(proc)
        log.close()


def test_destination_tls_overrides_sender_default(pki: Path) -> None:
    s = Settings(node={"allowed_calling_aets": ["*"]}, sender={"tls": True},
                 destinations=[{"ae_title": "A", "host": "127.0.0.1", "port": 1, "tls": False},
                               {"ae_title": "B", "host": "127.0.0.1", "port": 2}])
    routes = wire.destination_routes(s, wire.client_tls(s))
    assert routes["A@127.0.0.1:1"].tls is None
    assert routes["B@127.0.0.1:2"].tls is not None


@pytest.mark.parametrize("node", [
    {"tls_cert": "x.pem"},  # key missing
    {"tls_require_client_cert": True},  # no cert / CA
    {"max_pdu": 100},
])
def test_bad_tls_and_pdu_settings_are_refused(node: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Settings(node={"allowed_calling_aets": ["*"], **node})


def test_unreadable_key_names_the_setting(tmp_path: Path) -> None:
    s = Settings(node={"allowed_calling_aets": ["*"], "tls_cert": tmp_path / "no.pem",
                       "tls_key": tmp_path / "no.key"})
    with pytest.raises(ValueError, match="node.tls_cert"):
        wire.receiver_config(s)


def _associate(port: int) -> object:
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(PET)
    return ae.associate("127.0.0.1", port, ae_title="DIPNODE")


@pytest.mark.network
@pytest.mark.timeout(60)
def test_association_beyond_max_is_rejected_then_accepted_again() -> None:
    cfg = ReceiverConfig(port=0, max_associations=1)
    with start_receiver(cfg, lambda i: Status.SUCCESS) as rx:
        first = _associate(rx.port)
        assert first.is_established
        second = _associate(rx.port)
        # PS3.8 7.1.1.9: rejected-transient, "local limit exceeded" (service-provider ACSE).
        assert second.is_rejected
        assert second.acceptor.primitive.result == 0x02
        first.release()
        third = wait_for(lambda: (a := _associate(rx.port)).is_established and a, 10,
                         "a slot after the release")
        third.release()


@pytest.mark.network
@pytest.mark.timeout(60)
def test_idle_association_is_dropped_after_idle_timeout() -> None:
    cfg = ReceiverConfig(port=0, idle_timeout_s=1.0)
    with start_receiver(cfg, lambda i: Status.SUCCESS) as rx:
        assoc = _associate(rx.port)
        assert assoc.is_established
        t0 = time.monotonic()
        wait_for(lambda: not assoc.is_established, 10, "the idle association to end",
                 interval_s=0.1)
        took = time.monotonic() - t0
        assert 0.5 <= took <= 8.0, took
        assert assoc.is_aborted or assoc.is_released


@pytest.mark.network
@pytest.mark.timeout(60)
def test_closed_node_and_address_networks(tmp_path: Path) -> None:
    files = tiny_pet_files(tmp_path / "src", n=1)
    closed = Settings(node={"allowed_calling_aets": [], "port": 0})
    with start_receiver(wire.receiver_config(closed), lambda i: Status.SUCCESS) as rx:
        assert _associate(rx.port).is_rejected
    # A CIDR network that holds 127.0.0.1 admits; one that does not rejects.
    for network, admitted in (("127.0.0.0/8", True), ("10.0.0.0/8", False)):
        s = Settings(node={"allowed_calling_aets": ["STORESCU"], "allowed_addresses": [network],
                           "port": 0})
        with start_receiver(wire.receiver_config(s), lambda i: Status.SUCCESS) as rx:
            result = run_storescu(files, rx.port, aet="STORESCU", called="DIPNODE", timeout_s=20)
            assert (result.returncode == 0) is admitted, result.stdout + result.stderr


@pytest.mark.network
@pytest.mark.timeout(60)
def test_max_pdu_is_announced_and_large_instances_still_arrive(tmp_path: Path) -> None:
    # PS3.8 D.3.3.1: the acceptor announces its maximum PDU length; the peer must fragment.
    got: list[bytes] = []
    cfg = ReceiverConfig(port=0, max_pdu_length=4096)
    with start_receiver(cfg, lambda i: (got.append(i.raw), Status.SUCCESS)[1]) as rx:
        assoc = _associate(rx.port)
        try:
            assert assoc.acceptor.maximum_length == 4096
        finally:
            assoc.release()
        path = tiny_pet_files(tmp_path / "src", n=1)[0]
        ds = pydicom.dcmread(path)
        ds.Rows = ds.Columns = 64  # 8 KiB of pixels: at least three PDUs of 4096 bytes
        ds.PixelData = np.arange(64 * 64, dtype=np.uint16).tobytes()
        ds.save_as(path)
        report = send_files([path], Destination("DIPNODE", "127.0.0.1", rx.port), timeout_s=10)
    assert report.all_ok and len(got) == 1
    assert pydicom.dcmread(BytesIO(got[0])).PixelData == ds.PixelData


@pytest.mark.slow
@pytest.mark.network
@pytest.mark.timeout(60)
def test_silent_tls_client_does_not_hold_the_accept_loop(pki: Path, tmp_path: Path) -> None:
    # pynetdicom does the TLS handshake in its accept loop, with no timeout: one client that
    # connects and sends nothing stopped every other connection. Ours does it in the
    # connection's thread, bounded by request_timeout_s.
    s = _settings(pki, tls_cert=pki / "server.pem", tls_key=pki / "server.key")
    files = tiny_pet_files(tmp_path / "src", n=1)
    with start_receiver(wire.receiver_config(s), lambda i: Status.SUCCESS) as rx:
        silent = [socket.create_connection(("127.0.0.1", rx.port)) for _ in range(3)]
        try:
            t0 = time.monotonic()
            ok = run_storescu(files, rx.port, called="DIPNODE", timeout_s=20,
                              extra=["+tla", "+cf", str(pki / "ca.pem")])
            assert ok.returncode == 0 and storescu_statuses(ok) == [0], ok.stdout + ok.stderr
            assert time.monotonic() - t0 < 4.0  # not after the silent ones' timeouts
            for sock in silent:  # and the silent ones are closed by the request timer
                sock.settimeout(15)
                assert sock.recv(1) == b""
        finally:
            for sock in silent:
                sock.close()
