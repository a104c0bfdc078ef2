"""The value rules of PS3.5 the node checks in several places (dicom_io/vr.py): one rule each."""
from __future__ import annotations

import pytest


@pytest.mark.parametrize("value", ["A\tB", "PACS\n", "\x01X", "A\\B", "X" * 17, "   ", ""])
def test_one_ae_title_rule_for_receiver_sender_and_settings(value: str) -> None:
    # One rule (dicom_io/vr.py, PS3.5 6.2): before, a tab or a control character passed the
    # receiver's and the sender's check and failed the settings'.
    from dipnode.dicom_io.errors import ConfigError
    from dipnode.dicom_io.scp import ReceiverConfig
    from dipnode.dicom_io.scu import Destination
    from dipnode.node.settings import Settings

    with pytest.raises(ConfigError, match="PS3.5 6.2 AE"):
        ReceiverConfig(ae_title=value)
    with pytest.raises(ConfigError, match="PS3.5 6.2 AE"):
        Destination(value, "127.0.0.1", 104)
    with pytest.raises(ValueError, match="PS3.5 6.2 AE"):
        Settings(node={"ae_title": value, "allowed_calling_aets": ["*"]})


def test_ae_title_padding_is_not_significant() -> None:
    from dipnode.dicom_io.vr import check_ae_title

    assert check_ae_title("ae_title", "  PACS ") == "PACS"
    assert check_ae_title("ae_title", "MY AE") == "MY AE"  # an inner space is a character


@pytest.mark.parametrize("uid,strict,ok", [
    ("1.2.840.10008.1.2.1", True, True), ("1.02.3", True, False), ("1.02.3", False, True),
    ("0.1", True, True), ("1..2", False, False), ("1" * 65, False, False), ("1.2.", False, False),
])
def test_one_uid_grammar_strict_for_what_we_write_lenient_for_what_we_receive(uid, strict, ok) -> None:
    from dipnode.dicom_io.vr import is_uid

    assert is_uid(uid, strict=strict) is ok
