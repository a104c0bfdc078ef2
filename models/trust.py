"""Trust numbers of one denoised study: how much of the brain the output took from the
measured data, and how far it moved the brain's mean and its hottest 1 % (issue 13).

Arrays in, numbers out (no DICOM, no files). The brain is the PET's own support: voxels of
the OSEM image, smoothed by a Gaussian of 2 voxels FWHM, above ``BRAIN_FRACTION`` of its
99.5th percentile; the hottest 1 % are the brain voxels at or above the 99th percentile of that
smoothed OSEM image. Selecting on the smoothed OSEM (not on either noisy image, not on the
output) keeps the selection the same for every method and free of the noise's own extremes,
which would show any denoiser as lowering the peaks.

SUV is Bq/ml times one factor per study (dose, weight, decay), so a relative change of the
mean in Bq/ml is the same relative change in SUV.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from dipnode.models.gaussian import gaussian_filter_fwhm

__all__ = ["BRAIN_FRACTION", "TrustError", "TrustNumbers", "brain_mask", "trust_numbers"]

BRAIN_FRACTION = 0.3
_SMOOTH_FWHM_VOXELS = 2.0


class TrustError(ValueError):
    """An input the trust numbers cannot use; the message names it."""


@dataclass(frozen=True)
class TrustNumbers:
    """measured_fraction: mean OSEM weight over brain voxels (SDIP: mean S_norm; plain
    conditional DIP 0; None for a method that blends nothing, the Gaussian filter);
    mean_change / hot_change: (output - OSEM) / OSEM of the mean over the brain and over its
    hottest 1 %, as fractions (-0.05 is 5 % lower); brain_voxels / hot_voxels: how many."""

    measured_fraction: float | None
    mean_change: float
    hot_change: float
    brain_voxels: int
    hot_voxels: int

    def as_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


def _check(name: str, a: object, shape: tuple[int, ...] | None = None) -> np.ndarray:
    arr = np.asarray(a, dtype=np.float64)
    if arr.ndim != 3:
        raise TrustError(f"{name}: expected a 3-D array, got shape {arr.shape}")
    if shape is not None and arr.shape != shape:
        raise TrustError(f"{name}: expected the OSEM image's shape {shape}, got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise TrustError(f"{name}: expected finite values, got NaN or inf")
    return arr


def brain_mask(osem: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mask, smoothed OSEM): voxels of the smoothed OSEM above BRAIN_FRACTION of its 99.5th
    percentile (module docstring)."""
    smooth = gaussian_filter_fwhm(np.asarray(osem, dtype=np.float32), _SMOOTH_FWHM_VOXELS).astype(np.float64)
    top = float(np.percentile(smooth, 99.5))
    if not top > 0:
        raise TrustError("osem: expected some activity (99.5th percentile > 0), got none")
    return smooth > BRAIN_FRACTION * top, smooth


def trust_numbers(osem: np.ndarray, output: np.ndarray, osem_weight: np.ndarray | None, *,
                  blends: bool = True) -> TrustNumbers:
    """The numbers for one study. ``osem_weight``: the per-voxel weight of the OSEM image in
    the output (SDIP's S_norm), None for none; ``blends``: False for a method that is no blend
    of OSEM and network (Gaussian), whose measured fraction is then None."""
    x0 = _check("osem", osem)
    out = _check("output", output, x0.shape)
    w = _check("osem_weight", osem_weight, x0.shape) if osem_weight is not None else None
    brain, smooth = brain_mask(x0)
    n = int(brain.sum())
    hot = brain & (smooth >= np.percentile(smooth[brain], 99.0))
    base, hot_base = float(x0[brain].mean()), float(x0[hot].mean())
    if not (base > 0 and hot_base > 0):
        raise TrustError(f"osem: expected a positive mean over the brain, got {base!r}")
    measured = (float(w[brain].mean()) if w is not None else 0.0) if blends else None
    numbers = TrustNumbers(
        measured_fraction=measured,
        mean_change=float(out[brain].mean()) / base - 1.0,
        hot_change=float(out[hot].mean()) / hot_base - 1.0,
        brain_voxels=n, hot_voxels=int(hot.sum()))
    if not all(math.isfinite(v) for v in (numbers.mean_change, numbers.hot_change)):
        raise TrustError("output: the changes are not finite")
    return numbers
