from __future__ import annotations

import pytest
from pydicom.uid import UID

from dipnode.dicom_io.errors import DicomOutputError
from dipnode.dicom_io.uids import derive_uid


def test_same_parts_same_uid_and_valid() -> None:
    a = derive_uid("job-1", "1.2.3.4")
    assert a == derive_uid("job-1", "1.2.3.4")
    assert UID(a).is_valid and a.startswith("2.25.") and len(a) <= 64


def test_different_seed_or_order_or_split_differs() -> None:
    base = derive_uid("job-1", "1.2.3.4")
    assert derive_uid("job-2", "1.2.3.4") != base
    assert derive_uid("1.2.3.4", "job-1") != base
    assert derive_uid("job-11.2.3.4") != base  # part boundaries matter


@pytest.mark.parametrize("parts", [(), ("",), ("a", "")])
def test_bad_parts_rejected(parts: tuple[str, ...]) -> None:
    with pytest.raises(DicomOutputError, match="parts"):
        derive_uid(*parts)

