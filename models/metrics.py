"""The paper's image-quality metrics, on arrays and boolean masks only.

Definitions (Hashimoto et al. 2025 report noise in white matter, peak-to-valley of small
midbrain nuclei, and bias against the full-dose image; we fix the details here):

- ``roi_mean``: arithmetic mean of the voxels in the mask.
- ``wm_noise``: standard deviation (ddof 0) of the voxels in a white-matter mask, and the
  coefficient of variation ``100 * std / mean`` in %. WM is the most uniform tissue, so its
  spread is mostly noise.
- ``peak_to_valley``: the mean over the nuclei of each nucleus' *peak* value, divided by the
  valley ROI's mean. A nucleus' peak is the mean of its ROI by default (``peak="mean"``, robust
  to noise) or its maximum (``peak="max"``, the line-profile convention).
- ``roi_bias``: ``100 * (mean(img) - mean(reference)) / mean(reference)`` in the mask, in %
  (the reference is the full-dose image or the true activity).
- ``lesion_contrast``: ``(mean(lesion) - mean(background)) / mean(background)``.
- ``away_from``: the voxels of a mask at least a distance (mm) from any voxel of another: a
  white-matter ROI clear of grey matter, so that smoothing does not mix grey matter into it
  and raise its spread (partial volume read as noise).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np


class MetricsError(ValueError):
    """Bad input to a metric: wrong shape, empty ROI, non-boolean mask, zero denominator."""


@dataclass(frozen=True)
class NoiseStats:
    """Spread within an ROI: standard deviation, mean and CoV in %."""

    std: float
    mean: float
    cov_percent: float


def _values(img: np.ndarray, mask: np.ndarray, name: str) -> np.ndarray:
    img = np.asarray(img)
    mask = np.asarray(mask)
    if mask.dtype != bool:
        raise MetricsError(f"{name}: expected a boolean mask, got dtype {mask.dtype}")
    if mask.shape != img.shape:
        raise MetricsError(f"{name}: expected the image's shape {img.shape}, got {mask.shape}")
    if not mask.any():
        raise MetricsError(f"{name}: expected a non-empty mask, got 0 voxels")
    return img[mask].astype(np.float64)


def _nonzero(value: float, name: str) -> float:
    if value == 0 or not np.isfinite(value):
        raise MetricsError(f"{name}: expected a finite non-zero mean as denominator, got {value!r}")
    return value


def roi_mean(img: np.ndarray, mask: np.ndarray) -> float:
    """Mean of ``img`` inside ``mask``."""
    return float(_values(img, mask, "mask").mean())


def wm_noise(img: np.ndarray, wm_mask: np.ndarray) -> NoiseStats:
    """Standard deviation (ddof 0) and CoV (%) of ``img`` in the white-matter mask."""
    v = _values(img, wm_mask, "wm_mask")
    mean = float(v.mean())
    std = float(v.std())
    return NoiseStats(std=std, mean=mean, cov_percent=100.0 * std / _nonzero(mean, "wm_mask"))


def peak_to_valley(
    img: np.ndarray,
    nuclei_masks: Sequence[np.ndarray] | np.ndarray,
    valley_mask: np.ndarray,
    *,
    peak: str = "mean",
) -> float:
    """Mean over the nuclei of each nucleus' peak (ROI mean or max) over the valley mean.

    nuclei_masks: a sequence of masks, one per nucleus (e.g. ``(left, right)``), or one mask
        holding all nuclei, which is then split into its connected components.
    """
    if peak not in ("mean", "max"):
        raise MetricsError(f"peak: expected 'mean' or 'max', got {peak!r}")
    if isinstance(nuclei_masks, np.ndarray):
        from scipy import ndimage  # only needed to split a combined mask

        combined = nuclei_masks
        if combined.dtype != bool:
            raise MetricsError(f"nuclei_masks: expected a boolean mask, got dtype {combined.dtype}")
        labels, n = ndimage.label(combined)
        masks = [labels == lab for lab in range(1, n + 1)]
        if not masks:
            raise MetricsError("nuclei_masks: expected at least one nucleus, got an empty mask")
    else:
        masks = list(nuclei_masks)
        if not masks:
            raise MetricsError("nuclei_masks: expected at least one mask, got none")
    reduce = np.mean if peak == "mean" else np.max
    peaks = [float(reduce(_values(img, m, f"nuclei_masks[{i}]"))) for i, m in enumerate(masks)]
    valley = _nonzero(roi_mean(img, valley_mask), "valley_mask")
    return float(np.mean(peaks)) / valley


def away_from(mask: np.ndarray, exclude: np.ndarray, spacing: Sequence[float],
              margin_mm: float) -> np.ndarray:
    """The voxels of ``mask`` whose centre is at least ``margin_mm`` from every voxel of
    ``exclude`` (Euclidean, voxel centres, ``spacing`` in mm in array order). May be empty."""
    from scipy import ndimage

    mask = np.asarray(mask)
    exclude = np.asarray(exclude)
    for name, m in (("mask", mask), ("exclude", exclude)):
        if m.dtype != bool:
            raise MetricsError(f"{name}: expected a boolean mask, got dtype {m.dtype}")
    if exclude.shape != mask.shape:
        raise MetricsError(f"exclude: expected the mask's shape {mask.shape}, got {exclude.shape}")
    sp = tuple(float(v) for v in spacing)
    if len(sp) != mask.ndim or not all(np.isfinite(v) and v > 0 for v in sp):
        raise MetricsError(f"spacing: expected {mask.ndim} positive numbers (mm), got {spacing!r}")
    if not (np.isfinite(margin_mm) and margin_mm >= 0):
        raise MetricsError(f"margin_mm: expected a finite number >= 0, got {margin_mm!r}")
    if not exclude.any():
        return mask.copy()
    distance = ndimage.distance_transform_edt(~exclude, sampling=sp)
    return mask & (distance >= margin_mm)


def roi_bias(img: np.ndarray, reference: np.ndarray, mask: np.ndarray) -> float:
    """Bias of the ROI mean against ``reference``'s, in %."""
    ref = np.asarray(reference)
    if ref.shape != np.asarray(img).shape:
        raise MetricsError(f"reference: expected the image's shape {np.asarray(img).shape}, got {ref.shape}")
    m_ref = _nonzero(roi_mean(ref, mask), "reference mean")
    return 100.0 * (roi_mean(img, mask) - m_ref) / m_ref


def lesion_contrast(img: np.ndarray, lesion: np.ndarray, background: np.ndarray) -> float:
    """``(mean(lesion) - mean(background)) / mean(background)``."""
    bg = _nonzero(roi_mean(img, background), "background")
    return (roi_mean(img, lesion) - bg) / bg


def metrics_table(img: np.ndarray, ref: np.ndarray, masks: Mapping[str, np.ndarray]) -> dict[str, float]:
    """All metrics for a report, from the phantom's masks (sim.phantom names).

    Needs masks "wm", "nucleus_left", "nucleus_right", "valley", "lesion",
    "lesion_background"; adds a bias entry for each of "brain", "gm", "wm", "nuclei", "lesion"
    that is present. Keys: wm_std, wm_cov_percent, pvr_mean, pvr_max, lesion_contrast,
    lesion_contrast_ref (the reference's), bias_<roi>_percent.
    """
    need = ("wm", "nucleus_left", "nucleus_right", "valley", "lesion", "lesion_background")
    missing = [n for n in need if n not in masks]
    if missing:
        raise MetricsError(f"masks: expected keys {list(need)}, missing {missing}")
    noise = wm_noise(img, masks["wm"])
    nuclei = (masks["nucleus_left"], masks["nucleus_right"])
    table = {
        "wm_std": noise.std,
        "wm_cov_percent": noise.cov_percent,
        "pvr_mean": peak_to_valley(img, nuclei, masks["valley"], peak="mean"),
        "pvr_max": peak_to_valley(img, nuclei, masks["valley"], peak="max"),
        "lesion_contrast": lesion_contrast(img, masks["lesion"], masks["lesion_background"]),
        "lesion_contrast_ref": lesion_contrast(ref, masks["lesion"], masks["lesion_background"]),
    }
    for roi in ("brain", "gm", "wm", "nuclei", "lesion"):
        if roi in masks:
            table[f"bias_{roi}_percent"] = roi_bias(img, ref, masks[roi])
    return table
