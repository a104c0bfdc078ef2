"""Connection slots against peers that connect and say nothing, connect and close, hold many
connections from one address, or send half a PDU - while a real DCMTK peer still gets through.

PS3.8 9.1.5 (ARTIM): an acceptor that has not received an A-ASSOCIATE-RQ within the timer
closes the transport connection. The receiver's ``request_timeout_s`` is that timer.
"""
from __future__ import annotations

import logging
import socket
import struct
import time
from pathlib import Path

import pytest

from dipnode.dicom_io.scp import ReceiverConfig, start_receiver
from dipnode.dicom_io.status import Status
from peers import run_echoscu, run_storescu, storescu_statuses, tiny_pet_files

pytestmark = pytest.mark.network

SCP_LOGGER = "dipnode.dicom_io.scp"


def _connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    """A raw TCP connection to the receiver from ``source`` (any 127/8 address is loopback)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    return s


def _closed_after(s: socket.socket, limit_s: float) -> float | None:
    """Seconds until the server closed ``s`` (recv gives EOF or a reset), None if still open."""
    t0 = time.monotonic()
    s.settimeout(limit_s)
    try:
        data = s.recv(65536)
        while data:  # e.g. an A-ASSOCIATE-RJ or A-ABORT before the close
            data = s.recv(65536)
    except socket.timeout:
        return None
    except OSError:
        pass
    return time.monotonic() - t0


def _echo_within(port: int, limit_s: float) -> float | None:
    """Seconds until a DCMTK C-ECHO succeeds (retrying), None if it never did."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit_s:
        if run_echoscu(port, aet="SCANNER", called="DIPNODE", timeout_s=5).returncode == 0:
            return time.monotonic() - t0
        time.sleep(0.1)
    return None


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_silent_connections_are_closed_by_the_request_timer() -> None:
    # Defaults except the slot count: ten silent connections used to hold every slot for
    # idle_timeout_s (60 s); the request timer (default 5 s) closes them.
    cfg = ReceiverConfig(port=0, max_associations=2, max_associations_per_address=2)
    with start_receiver(cfg, lambda i: Status.SUCCESS) as rx:
        socks = [_connect(rx.port) for _ in range(2)]
        try:
            closed = [_closed_after(s, 15.0) for s in socks]
            assert all(c is not None and c < cfg.request_timeout_s + 2.0 for c in closed), closed
            assert _echo_within(rx.port, 3.0) is not None
        finally:
            for s in socks:
                s.close()


@pytest.mark.timeout(60)
def test_a_peer_that_closes_releases_its_slot_at_once() -> None:
    cfg = ReceiverConfig(port=0, max_associations=1)
    with start_receiver(cfg, lambda i: Status.SUCCESS) as rx:
        for _ in range(3):  # a bare connect-and-close, again and again
            _connect(rx.port).close()
            took = _echo_within(rx.port, cfg.request_timeout_s - 1.0)
            assert took is not None and took < 1.5, took


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_one_address_cannot_take_every_slot(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=SCP_LOGGER)
    # A long request timer: here only the per-address limit protects the other peers.
    cfg = ReceiverConfig(port=0, max_associations=4, max_associations_per_address=2,
                         request_timeout_s=30.0)
    files = tiny_pet_files(tmp_path / "src", n=2)
    with start_receiver(cfg, lambda i: Status.SUCCESS) as rx:
        socks = [_connect(rx.port, source="127.0.0.2") for _ in range(8)]
        try:
            closed = [_closed_after(s, 2.0) for s in socks]
            # Two, and one more (a peer that asks would get an A-ASSOCIATE-RJ saying why);
            # the other five are closed at once.
            assert sum(c is not None for c in closed) == 5, closed
            res = run_storescu(files, rx.port, aet="SCANNER", called="DIPNODE", timeout_s=20)
            assert res.returncode == 0 and storescu_statuses(res) == [0, 0], res.stdout + res.stderr
        finally:
            for s in socks:
                s.close()
    lines = [r.getMessage() for r in caplog.records if r.name == SCP_LOGGER]
    refusals = [m for m in lines if "127.0.0.2" in m and "max_associations_per_address" in m]
    assert len(refusals) == 5, lines


@pytest.mark.timeout(90)
def test_every_rejection_says_why(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=SCP_LOGGER)

    def reasons() -> list[str]:
        return [r.getMessage() for r in caplog.records
                if r.name == SCP_LOGGER and r.levelno >= logging.WARNING and "rejected" in r.getMessage()]

    cfg = ReceiverConfig(port=0, allowed_calling_aets=frozenset({"SCANNER"}), max_associations=1)
    with start_receiver(cfg, lambda i: Status.SUCCESS) as rx:
        assert run_echoscu(rx.port, aet="INTRUDER", called="DIPNODE").returncode != 0
        assert "calling AE title INTRUDER not allowed" in reasons()[-1]
        assert "127.0.0.1" in reasons()[-1]
        # A connection from another address, slow to ask, holds the one slot.
        held = _connect(rx.port, source="127.0.0.2")
        try:
            assert run_echoscu(rx.port, aet="SCANNER", called="DIPNODE").returncode != 0
            assert "too many associations (max_associations = 1)" in reasons()[-1]
        finally:
            held.close()
    cfg = ReceiverConfig(port=0, max_associations=4, max_associations_per_address=1)
    with start_receiver(cfg, lambda i: Status.SUCCESS) as rx:
        held = _connect(rx.port)
        try:
            assert run_echoscu(rx.port, aet="SCANNER", called="DIPNODE").returncode != 0
            assert ("too many associations from address 127.0.0.1 "
                    "(max_associations_per_address = 1)") in reasons()[-1]
        finally:
            held.close()
    with start_receiver(ReceiverConfig(port=0, allowed_addresses=frozenset({"192.0.2.0/24"})),
                        lambda i: Status.SUCCESS) as rx:
        assert run_echoscu(rx.port, aet="SCANNER", called="DIPNODE").returncode != 0
        assert "address 127.0.0.1 not allowed" in reasons()[-1]
    with start_receiver(ReceiverConfig(port=0, closed=True), lambda i: Status.SUCCESS) as rx:
        assert run_echoscu(rx.port, aet="SCANNER", called="DIPNODE").returncode != 0
        assert "node closed" in reasons()[-1]


@pytest.mark.timeout(60)
def test_half_a_pdu_is_cut_off_by_the_request_timer() -> None:
    cfg = ReceiverConfig(port=0, request_timeout_s=1.0)
    with start_receiver(cfg, lambda i: Status.SUCCESS) as rx:
        s = _connect(rx.port)
        try:
            # A-ASSOCIATE-RQ header announcing 200 bytes, then 10 of them, then silence.
            s.sendall(struct.pack(">BBL", 0x01, 0, 200) + b"\x00\x01" + b"\x00" * 8)
            took = _closed_after(s, 20.0)
            assert took is not None and took < 4.0, took
        finally:
            s.close()
        assert _echo_within(rx.port, 3.0) is not None


@pytest.mark.timeout(60)
def test_a_pdu_longer_than_any_we_accept_is_refused_without_reading_it() -> None:
    cfg = ReceiverConfig(port=0)
    with start_receiver(cfg, lambda i: Status.SUCCESS) as rx:
        s = _connect(rx.port)
        try:
            # A P-DATA-TF header announcing 4 GiB - 1: nothing is buffered, the link is cut.
            s.sendall(struct.pack(">BBL", 0x01, 0, 0xFFFFFFFF) + b"\x00" * 4096)
            took = _closed_after(s, 10.0)
            assert took is not None and took < 2.0, took
        finally:
            s.close()
        assert _echo_within(rx.port, 3.0) is not None
