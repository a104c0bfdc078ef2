"""The typed hand-off from the DICOM boundary: a volume with its geometry and its sources.

Array axis order is (slice, row, column) = (k, j, i). The affine maps a voxel index
(i, j, k, 1) — column, row, slice — to patient coordinates (LPS, mm), as DICOM's Image
Position/Orientation (PS3.3 C.7.6.2.1.1) define them. No torch here.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydicom.dataset import Dataset


@dataclass(frozen=True)
class Geometry:
    """Grid of a volume: shape (k, j, i) and the 4x4 voxel (i, j, k) -> patient LPS affine."""

    shape: tuple[int, int, int]
    affine: np.ndarray = field(repr=False)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm in array order (slice, row, column)."""
        cols = np.linalg.norm(self.affine[:3, :3], axis=0)  # |d/di|, |d/dj|, |d/dk|
        return (float(cols[2]), float(cols[1]), float(cols[0]))

    @property
    def origin(self) -> np.ndarray:
        """Patient position of voxel (0, 0, 0): the first slice's Image Position (Patient)."""
        return self.affine[:3, 3].copy()

    @property
    def direction(self) -> np.ndarray:
        """3x3 unit column vectors (row direction i, column direction j, slice normal k)."""
        return self.affine[:3, :3] / np.linalg.norm(self.affine[:3, :3], axis=0)


@dataclass(frozen=True)
class Volume:
    """One series as a float32 volume, in slice order along the slice normal.

    values: float32 array (k, j, i) in real-world units (PET: Bq/ml after per-slice rescale).
    headers: the source datasets in the same slice order, without Pixel Data, for provenance
        (Source Image Sequence), copying attributes into derived series and SUV.
    units: PET Units (0054,1001) or "" for other modalities.
    raw_text: per header, its top-level text elements (PN, LO, SH, ST, LT, UT, UC) as the bytes
        that were received, undecoded (dicom_io.series), so that writers copy names byte for
        byte even where the bytes do not decode in the declared character set.
    """

    values: np.ndarray = field(repr=False)
    geometry: Geometry
    modality: str
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    sop_class_uid: str
    sop_instance_uids: tuple[str, ...]
    headers: tuple[Dataset, ...] = field(repr=False)
    units: str = ""
    notes: tuple[str, ...] = ()  # what the loader corrected and why (e.g. dropped duplicates)
    raw_text: tuple[Mapping[int, Any], ...] = field(default=(), repr=False)

    def values_on_grid(self, values: np.ndarray, who: str, what: str) -> np.ndarray:
        """``values`` as an array on this volume's grid, all finite; writers call this first.

        who, what: the writer and its argument, named in the error (DicomOutputError).
        """
        from dipnode.dicom_io.errors import DicomOutputError

        arr = np.asarray(values)
        if arr.shape != self.geometry.shape:
            raise DicomOutputError(f"{who}: {what} shape expected {self.geometry.shape} "
                                   f"(source grid), got {arr.shape}")
        if not np.all(np.isfinite(arr)):
            raise DicomOutputError(f"{who}: {what} expected finite numbers, got NaN or inf")
        return arr
