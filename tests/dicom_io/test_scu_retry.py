"""The sender re-sends, once, the instances left unanswered by an association that aborted."""
from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import PositronEmissionTomographyImageStorage

from dipnode.dicom_io.scu import Destination, send_files
from peers import tiny_pet_files


@pytest.mark.slow
@pytest.mark.network
@pytest.mark.timeout(60)
def test_instances_unanswered_before_an_abort_are_sent_again(tmp_path: Path, caplog) -> None:
    stored: list[str] = []
    calls = {"n": 0}
    lock = threading.Lock()

    def on_store(event):
        with lock:
            calls["n"] += 1
            if calls["n"] == 2:  # the second store: no response, the association goes down
                event.assoc.abort()
                return 0xC000
            stored.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    ae = AE(ae_title="FLAKY")
    ae.add_supported_context(PositronEmissionTomographyImageStorage)
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        port = server.socket.getsockname()[1]
        files = tiny_pet_files(tmp_path, n=3)
        with caplog.at_level(logging.WARNING, logger="dipnode.dicom_io.scu"):
            report = send_files(files, Destination("FLAKY", "127.0.0.1", port), timeout_s=5)
    finally:
        server.shutdown()
    assert report.all_ok, report
    assert len(report.results) == 3
    assert len(set(stored)) == 3  # every instance reached the peer
    assert "sending them again" in caplog.text


@pytest.mark.slow
@pytest.mark.network
@pytest.mark.timeout(60)
def test_a_peer_that_always_aborts_is_reported_not_retried_forever(tmp_path: Path) -> None:
    def on_store(event):
        event.assoc.abort()
        return 0xC000

    ae = AE(ae_title="BROKEN")
    ae.add_supported_context(PositronEmissionTomographyImageStorage)
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        port = server.socket.getsockname()[1]
        report = send_files(tiny_pet_files(tmp_path, n=2), Destination("BROKEN", "127.0.0.1", port),
                            timeout_s=5)
    finally:
        server.shutdown()
    assert not report.all_ok and not report.association_ok
    assert report.n_failed == 2 and "aborted" in (report.error or "")
