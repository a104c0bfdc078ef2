"""Fixtures shared by the node tests."""
from __future__ import annotations

import pytest

from statusnode import StatusNode, start_status_node


@pytest.fixture(scope="session")
def status_node(tmp_path_factory) -> StatusNode:
    """A running node with jobs in several states (tests/node/statusnode.py)."""
    sn = start_status_node(tmp_path_factory.mktemp("status-node"))
    yield sn
    sn.node.stop()
    sn.pacs.stop()
