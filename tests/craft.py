"""Crafted DICOM for tests of the receive path (the bytes come from dipnode.sim.crafted).

    from craft import pet_dataset, file_bytes, received, write_file, deflate_bomb, associate_rq

- ``received(raw, transfer_syntax=None, calling_ae="STORESCU") -> ReceivedInstance``: what the
  SCP hands ``on_store`` for those bytes (the transfer syntax defaults to the meta's).
"""
from __future__ import annotations

from io import BytesIO

import pydicom

from dipnode.dicom_io.scp import ReceivedInstance
from dipnode.sim.crafted import (associate_rq, deflate_bomb, file_bytes, meta_syntax,  # noqa: F401
                                 pet_dataset, write_file)


def received(raw: bytes, transfer_syntax: str | None = None,
             calling_ae: str = "STORESCU") -> ReceivedInstance:
    ds = pydicom.dcmread(BytesIO(raw), stop_before_pixels=True, force=True)
    return ReceivedInstance(str(ds.SOPClassUID), str(ds.SOPInstanceUID),
                            transfer_syntax or meta_syntax(raw), calling_ae, "127.0.0.1", raw)
