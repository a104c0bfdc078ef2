"""The one entry point of the denoising engine: arrays in, a DenoiseResult out.

``denoise`` validates its inputs once, here at the boundary, then runs the chosen method:
SDIP (conditional DIP + stability map + data-consistency guard + blend, docs/METHOD.md), the
paper's SDIP exactly (no guard, last output), plain conditional DIP, or OSEM + Gaussian.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

# The fit's errors are re-exported: callers of the engine catch them from this one module.
from dipnode.models.dip import DeviceUnavailableError, DipDivergedError, Progress, fit_conditional_dip
from dipnode.models.gaussian import gaussian_filter_fwhm
from dipnode.models.guard import GuardParams, GuardResult, data_guard
from dipnode.models.params import DipParams, Method
from dipnode.models.stability import blend_weight, normalised_stability

__all__ = ["DenoiseInputError", "DenoiseResult", "DeviceUnavailableError", "DipDivergedError", "denoise"]

log = logging.getLogger(__name__)


class DenoiseInputError(ValueError):
    """An argument of ``denoise`` that the engine cannot use; the message names it."""


@dataclass(frozen=True)
class DenoiseResult:
    """What the engine hands the pipeline. Volumes are float32 on the PET grid, PET units.

    denoised: the method's image (SDIP: the blend; CDIP: f(θ*|g); Gaussian: the filtered PET).
    dip: f(θ*|g) for the DIP methods (the last output), else None.
    network_image: the network's image the blend used: the mean of the sampled outputs for
        SDIP with ``params.average``, else ``dip``; None for Gaussian.
    stability: S (PET units) for the DIP methods, else None.
    stability_norm: S_norm in [0, 1], the paper's OSEM weight, for the blending methods.
    guard: G in [0, 1], the data-consistency guard (SDIP only, else None).
    data_weight: w in [0, 1], the weight the blend gave the measured OSEM value in each
        voxel: max(S_norm, G) for SDIP, S_norm for the paper's SDIP; None otherwise.
    guard_info: the guard's threshold and statistics (SDIP only).
    loss_history: per-epoch loss (see DipFit), () for Gaussian.
    snapshots: DIP outputs at the requested epochs, {} for Gaussian.
    timings: seconds; always "total", and "fit", "per_epoch" (plus "setup", "sampling",
        "blend") for the DIP methods.
    device: where the work ran ("cpu" for the Gaussian filter).
    spacing: voxel size in mm, array order (slice, row, column), as given.
    """

    method: Method
    params: DipParams
    denoised: np.ndarray = field(repr=False)
    dip: np.ndarray | None = field(repr=False)
    stability: np.ndarray | None = field(repr=False)
    stability_norm: np.ndarray | None = field(repr=False)
    loss_history: tuple[float, ...]
    snapshots: dict[int, np.ndarray] = field(repr=False)
    timings: dict[str, float]
    device: str
    spacing: tuple[float, float, float]
    network_image: np.ndarray | None = field(repr=False, default=None)
    guard: np.ndarray | None = field(repr=False, default=None)
    data_weight: np.ndarray | None = field(repr=False, default=None)
    guard_info: GuardResult | None = field(repr=False, default=None)


def _as_method(method: Method | str) -> Method:
    try:
        return Method(method)
    except ValueError:
        raise DenoiseInputError(
            f"method: expected one of {[m.value for m in Method]}, got {method!r}") from None


def _check_volume(name: str, arr: object, shape: tuple[int, ...] | None = None) -> np.ndarray:
    a = np.asarray(arr)
    if a.ndim != 3:
        raise DenoiseInputError(f"{name}: expected a 3-D array, got shape {a.shape}")
    if shape is not None and a.shape != shape:
        raise DenoiseInputError(f"{name}: expected the PET's shape {shape}, got {a.shape}")
    if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise DenoiseInputError(f"{name}: expected a real numeric array, got dtype {a.dtype}")
    n_bad = int(a.size - np.count_nonzero(np.isfinite(a)))
    if n_bad:
        raise DenoiseInputError(f"{name}: expected finite values, got {n_bad} NaN/inf voxels")
    return a.astype(np.float32, copy=False)


def _check_spacing(spacing: Sequence[float]) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in spacing)
    except (TypeError, ValueError):
        raise DenoiseInputError(f"spacing: expected 3 positive numbers (mm), got {spacing!r}") from None
    if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
        raise DenoiseInputError(f"spacing: expected 3 positive numbers (mm), got {spacing!r}")
    return values  # type: ignore[return-value]


def denoise(pet: np.ndarray, mr: np.ndarray | None, spacing: Sequence[float], params: DipParams,
            method: Method | str = Method.SDIP, progress: Progress | None = None,
            snapshot_epochs: Iterable[int] = ()) -> DenoiseResult:
    """Denoise a PET volume with ``method`` (SDIP by default).

    pet: 3-D OSEM PET (Bq/ml); mr: the MR on the PET grid, same shape (required for SDIP and
    CDIP, ignored but still checked if given for Gaussian); spacing: voxel size in mm, array
    order (recorded; the Gaussian FWHM is in voxels). Raises DenoiseInputError naming the
    argument for bad inputs; DipDivergedError / DeviceUnavailableError from the fit.
    """
    t0 = time.perf_counter()
    if not isinstance(params, DipParams):
        raise DenoiseInputError(f"params: expected DipParams, got {type(params).__name__}")
    m = _as_method(method)
    pet_f = _check_volume("pet", pet)
    if mr is None and m.needs_mr:
        raise DenoiseInputError(f"mr: expected an MR volume on the PET grid for method "
                                f"{m.value!r}, got None (use 'gaussian' without MR)")
    mr_f = _check_volume("mr", mr, pet_f.shape) if mr is not None else None
    sp = _check_spacing(spacing)

    if m is Method.GAUSSIAN:
        out = gaussian_filter_fwhm(pet_f, params.fwhm_voxels)
        return DenoiseResult(method=m, params=params, denoised=out, dip=None, stability=None,
                             stability_norm=None, loss_history=(), snapshots={},
                             timings={"total": time.perf_counter() - t0}, device="cpu", spacing=sp)

    if mr_f is None:  # unreachable (checked above); narrows the type without assert
        raise DenoiseInputError("mr: expected an MR volume, got None")
    fit = fit_conditional_dip(pet_f, mr_f, params, progress=progress,
                              snapshot_epochs=snapshot_epochs)
    timings = dict(fit.timings)
    s_norm = guard = weight = None
    guard_info: GuardResult | None = None
    network = fit.output
    if m.blends:
        if fit.stability is None:
            raise DenoiseInputError(
                f"params: SDIP needs at least two stability samples, got {fit.n_samples}")
        t_blend = time.perf_counter()
        s_norm = normalised_stability(fit.stability, params.alpha)
        weight = s_norm
        if m is Method.SDIP:
            if params.average and fit.sample_mean is not None:
                network = fit.sample_mean
            guard_info = data_guard(pet_f, network, sp, GuardParams(fwe=params.guard_fwe))
            guard = guard_info.weight
            weight = np.maximum(s_norm, guard)
            log.debug("guard: threshold |T| > %.2f, %.2f %% of voxels kept by it",
                      guard_info.threshold, 100.0 * float(np.mean(guard > 0)))
        denoised = blend_weight(pet_f, network, weight)
        timings["blend"] = time.perf_counter() - t_blend
    else:
        denoised = fit.output
    timings["total"] = time.perf_counter() - t0
    log.debug("denoise %s: shape %s on %s in %.2f s", m.value, pet_f.shape, fit.device, timings["total"])
    return DenoiseResult(method=m, params=params, denoised=denoised, dip=fit.output,
                         stability=fit.stability, stability_norm=s_norm,
                         loss_history=fit.loss_history, snapshots=fit.snapshots,
                         timings=timings, device=fit.device, spacing=sp,
                         network_image=network, guard=guard, data_weight=weight,
                         guard_info=guard_info)
