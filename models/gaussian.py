"""The paper's first baseline: OSEM + Gaussian post-filter, FWHM given in voxels."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import ndimage

# FWHM = 2·sqrt(2·ln 2)·sigma ≈ 2.3548·sigma
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


def gaussian_filter_fwhm(volume: np.ndarray, fwhm_voxels: float | Sequence[float]) -> np.ndarray:
    """Gaussian-filter a 3-D volume; ``fwhm_voxels`` is one FWHM or one per axis (array order).

    Returns float32. FWHM 0 (on every axis) returns a copy. Edges use scipy's default
    'reflect' mode, which keeps the total activity of the volume unchanged.
    """
    vol = np.asarray(volume)
    if vol.ndim != 3:
        raise ValueError(f"volume: expected a 3-D array, got shape {vol.shape}")
    if np.ndim(fwhm_voxels) == 0:
        fwhm = (float(fwhm_voxels),) * 3  # type: ignore[arg-type]
    else:
        fwhm = tuple(float(v) for v in fwhm_voxels)  # type: ignore[union-attr]
    if len(fwhm) != 3 or not all(math.isfinite(v) and v >= 0 for v in fwhm):
        raise ValueError(
            f"fwhm_voxels: expected a number or 3 numbers, finite and >= 0, got {fwhm_voxels!r}")
    if all(v == 0 for v in fwhm):
        return vol.astype(np.float32, copy=True)
    sigma = tuple(v / FWHM_PER_SIGMA for v in fwhm)
    # Filter in float64 so a float32 input loses nothing in the separable passes.
    out = ndimage.gaussian_filter(vol.astype(np.float64), sigma=sigma)
    return out.astype(np.float32)
