"""Delivery by routes built once at start: the peer comes from the settings' own fields (never
parsed back from the label a delivery is stored under) and one TLS context serves every
destination that uses TLS."""
from __future__ import annotations

import socket
from pathlib import Path

import pytest

from dipnode.dicom_io.scu import Destination as Peer
from dipnode.models.params import DipParams
from dipnode.node import wire
from dipnode.node.jobs.rows import InstanceRecord, JobState
from dipnode.node.server import Node
from dipnode.node.settings import Settings
from peers import tiny_pet_files


def _settings(tmp_path: Path, destinations: list[dict], **sender: object) -> Settings:
    return Settings(node={"allowed_calling_aets": ["*"], "port": 0},
                    storage={"spool_dir": tmp_path / "spool", "database": tmp_path / "db.sqlite",
                             "min_free_mb": 0},
                    destinations=destinations, sender={"retries": 2, "timeout_s": 5.0, **sender})


def test_routes_come_from_the_settings_and_share_one_tls_context(tmp_path: Path) -> None:
    s = _settings(tmp_path, [{"ae_title": "A", "host": "::1", "port": 104},
                             {"ae_title": "B", "host": "pacs.example", "port": 11112},
                             {"ae_title": "C", "host": "127.0.0.1", "port": 105, "tls": False}],
                  tls=True)
    node = Node(s)
    try:
        routes = node.delivery.routes
        assert routes["A@::1:104"].peer == Peer("A", "::1", 104)  # "A@::1:104" does not parse back
        assert routes["A@::1:104"].tls is routes["B@pacs.example:11112"].tls is not None
        assert routes["C@127.0.0.1:105"].tls is None
    finally:
        node.stop()
    with pytest.raises(ValueError, match="expected a client context"):
        wire.destination_routes(s, None)


def _closed_ipv6_port() -> int:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
            return sock.getsockname()[1]  # closed again when the block ends
    except OSError as exc:
        pytest.fail(f"no IPv6 loopback here ({exc}); the test needs ::1")


@pytest.mark.network
@pytest.mark.timeout(60)
def test_an_ipv6_destination_is_attempted_and_retried(tmp_path: Path) -> None:
    # Before the routes, the delivery parsed its label "PACS@::1:PORT" back into a peer, which
    # fails (IPv6 needs brackets there): every scheduler step raised and nothing was attempted.
    port = _closed_ipv6_port()
    node = Node(_settings(tmp_path, [{"ae_title": "PACS", "host": "::1", "port": port}]))
    try:
        outputs = tiny_pet_files(tmp_path / "spool" / "outputs" / "job-1", n=1)
        node.store.record_instance(InstanceRecord("1.2.3.1", "1.2.840.10008.5.1.4.1.1.128", tmp_path / "x.dcm",
                                                  "1.2.3", "1.2.3.4", "PT", "1.2.840.10008.1.2.1"), 0.0)
        job = node.store.create_job("1.2.3.4", method="gaussian", params=DipParams(), now=0.0)
        node.store.claim_next_queued(1.0)
        node.store.transition(job.id, JobState.SENDING, 2.0, output_dir=str(outputs[0].parent))
        node.delivery.hand_over(job.id, str(outputs[0].parent), 2.0)
        node.tick(3.0)
        [d] = node.store.deliveries(job.id)
        assert d.destination == f"PACS@::1:{port}" and d.attempts == 1
        assert d.last_error and d.next_attempt_at > 3.0  # refused: retried later, not dropped
        assert node.store.job(job.id).state is JobState.SENDING
    finally:
        node.stop()
