"""A file made durable in the spool but not indexed (a crash between the two) is indexed at start."""
from __future__ import annotations

from pathlib import Path

import pydicom

from dipnode.dicom_io.scp import ReceivedInstance
from dipnode.node.server import Node
from dipnode.node.settings import Settings
from peers import tiny_pet_files


def test_unindexed_spool_files_are_indexed_once(tmp_path: Path) -> None:
    settings = Settings(node={"port": 0, "allowed_calling_aets": ["*"]},
                        storage={"spool_dir": tmp_path / "spool", "database": tmp_path / "db.sqlite",
                                 "min_free_mb": 0})
    node = Node(settings)
    try:
        files = tiny_pet_files(tmp_path / "src", n=3)
        stored = []
        for f in files:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            stored.append(node.spool.store(ReceivedInstance(
                str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.file_meta.TransferSyntaxUID),
                "TEST", "127.0.0.1", f.read_bytes())))
        series_uid = str(stored[0].header.SeriesInstanceUID)
        assert node.store.series_instances(series_uid) == []
        assert node.index_orphans() == 3
        assert sorted(node.store.series_instances(series_uid)) == sorted(s.path for s in stored)
        assert node.index_orphans() == 0  # idempotent
    finally:
        node.stop()
