"""Values from the wire reach the log escaped and cut: no raw NUL or control bytes, no
10k-character lines (dicom_io.logsafe.shown is the one helper; the node's log handler applies
the same helper as a filter to every record)."""
from __future__ import annotations

import logging
import socket
from pathlib import Path

import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pynetdicom import AE

from craft import associate_rq, file_bytes, pet_dataset, write_file
from dipnode.dicom_io.logsafe import SafeValuesFilter, shown
from dipnode.dicom_io.scp import ReceiverConfig, start_receiver
from dipnode.dicom_io.status import Status
from dipnode.node.ingest.spool import Spool

MAX_LINE = 1000


@given(st.one_of(st.text(max_size=20000), st.binary(max_size=20000)))
@settings(max_examples=200, deadline=None)
def test_shown_is_printable_and_bounded(value: object) -> None:
    out = shown(value, limit=80)
    assert out.isprintable() and len(out) <= 80 + 40
    assert "\x00" not in out


def test_shown_says_what_it_cut() -> None:
    assert shown("1.2." + "9" * 10000, limit=40).endswith("(10004 characters)")
    assert shown("A\x00B") == "A\\x00B"
    assert shown(b"M\xfcller") == "M\\xfcller"
    assert shown("ÄÖ\u202e") == "ÄÖ\\u202e"  # printable letters stay; a bidi override does not


def test_filter_cleans_message_and_arguments() -> None:
    rec = logging.LogRecord("x", logging.WARNING, __file__, 1, "got %s and %r", ("a\x00b", "c" * 5000), None)
    assert SafeValuesFilter().filter(rec)
    msg = rec.getMessage()
    assert "\x00" not in msg and len(msg) < MAX_LINE


def _as_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Every record as the node's log handler writes it (serve() installs SafeValuesFilter on
    its handlers): ours and the libraries' (pynetdicom logs the AE title it refuses)."""
    out = []
    for r in caplog.records:
        if r.name.startswith(("dipnode", "pynetdicom")):
            SafeValuesFilter().filter(r)
            out.append(r.getMessage() + ("\n" + r.exc_text if r.exc_text else ""))
    return out


@pytest.mark.network
@pytest.mark.timeout(60)
def test_nul_bytes_and_huge_values_from_the_wire_never_reach_the_log(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="dipnode")
    caplog.set_level(logging.DEBUG, logger="pynetdicom")
    spool = Spool(tmp_path / "spool", min_free_bytes=0)
    huge = "1." + "2" * 10000 + "\x00"
    bad = write_file(tmp_path / "bad.dcm", file_bytes(pet_dataset(StudyInstanceUID=huge)))
    cfg = ReceiverConfig(port=0, allowed_calling_aets=frozenset({"STORESCU"}))
    with start_receiver(cfg, lambda i: (spool.store(i), Status.SUCCESS)[1]) as rx:
        # A calling AE title with NUL and control bytes, refused and accepted-then-closed.
        for calling in (b"EVIL\x00\x01\x1b[2J", b"STORESCU"):
            with socket.create_connection(("127.0.0.1", rx.port)) as s:
                s.sendall(associate_rq(b"DIPNODE", calling))
                s.settimeout(5)
                s.recv(4096)
        ae = AE(ae_title="STORESCU")
        ae.add_requested_context(pydicom.dcmread(bad, force=True).SOPClassUID)
        assoc = ae.associate("127.0.0.1", rx.port, ae_title="DIPNODE")
        assert assoc.is_established
        assert assoc.send_c_store(bad).Status == Status.CANNOT_UNDERSTAND
        assoc.release()
    messages = _as_logged(caplog)
    assert any("EVIL" in m for m in messages)
    assert any("CANNOT_UNDERSTAND" in m for m in messages)
    for m in messages:
        assert "\x00" not in m and "\x1b" not in m, repr(m)
        assert max(len(line) for line in m.splitlines()) < MAX_LINE, m
