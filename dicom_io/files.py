"""Writing DICOM objects as PS3.10 files: the one place the writers' datasets reach the disk."""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from pydicom import dcmwrite
from pydicom.dataset import Dataset

__all__ = ["write_datasets"]


def write_datasets(datasets: Iterable[Dataset], out_dir: str | Path) -> list[Path]:
    """Write each dataset (with its file meta) as ``out_dir/<SOPInstanceUID>.dcm``; return the
    paths. ``enforce_file_format``: a preamble and a complete file meta (PS3.10 7.1)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        path = out / f"{ds.SOPInstanceUID}.dcm"
        dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return paths
