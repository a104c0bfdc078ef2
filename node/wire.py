"""The node's DICOM wire options from its settings: what the receiver and the sender get."""
from __future__ import annotations

from typing import Any

from dipnode.dicom_io.scp import ReceiverConfig
from dipnode.node.settings import Settings


def receiver_config(settings: Settings) -> ReceiverConfig:
    n = settings.node
    return ReceiverConfig(
        ae_title=n.ae_title, host=n.host, port=n.port,
        allowed_calling_aets=None if n.accepts_any_caller() else frozenset(n.allowed_calling_aets),
        allowed_addresses=frozenset(n.allowed_addresses) or None,
        max_pdu_length=n.max_pdu, max_associations=n.max_associations,
        idle_timeout_s=n.idle_timeout_s, accept_compressed=n.accept_compressed,
    )


def sender_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for dicom_io.scu.send_files besides the files and the destination."""
    return {"calling_ae": settings.calling_ae, "timeout_s": settings.sender.timeout_s}
