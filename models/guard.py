"""The data-consistency guard: keep the measured value where the data disagree with the network.

SDIP's stability map ``S`` is high only where the network starts to fit a structure and then
wavers. A lesion that the MR-conditioned network never fits leaves a *stable*, wrong output:
``S`` stays low there and the blend takes the network's value, erasing the lesion. The guard
looks at what the network left out, the residual between ``x0`` (OSEM) and ``f`` (network),
and marks where it differs from noise at lesion scale; there the blend keeps ``x0``.

The guard, exactly (on the PET grid; the numbers are ``GuardParams``' defaults):

1. Residual on a noise-stabilised scale. PET noise grows with the activity: through OSEM,
   Poisson counts give a voxel variance roughly proportional to its mean (measured on the
   phantom at 1/10 dose: the residual divided by sqrt(activity) has the same spread in white
   and grey matter to 5 %, where a constant-noise model is off by 2x). The square root
   stabilises such variance and removes most of the skew of low-count noise:
   ``z = 2·(sqrt(max(x0, 0)) − sqrt(max(f, 0)))``, tested only in the object
   ``obj = {Gσ * f > object_fraction · P99(Gσ * f)}`` (``Gσ``: FWHM ``activity_fwhm_mm``),
   i.e. brain tissue, not scalp, CSF or air; ``z = 0`` elsewhere.
2. Matched filter per lesion size: for each diameter ``d`` in ``diameters_mm``,
   ``z_d = B_d * z`` with ``B_d`` the ball of diameter ``d`` in mm on the voxel grid
   (partial-volume weights, sum 1), kept only where the whole ball lies in ``obj``. The
   noise level is estimated from the data itself, robustly, so lesions and misfit (a few
   percent of the voxels) do not inflate it: ``T_d = (z_d − median(z_d)) / (1.4826 ·
   MAD(z_d))`` over the tested voxels. In noise ``T_d`` is close to N(0, 1), whatever the
   noise's spatial correlation.
3. Threshold from a multiple-comparison argument. ``T_d`` is a smooth random field; its
   smoothness (FWHM per axis, voxels) is estimated from the field itself (Forman et al.
   1995: ``FWHM = sqrt(−2 ln 2 / ln(1 − Var(ΔT) / (2 Var(T))))``), giving ``R_d`` resels
   (tested voxels / product of the FWHMs). The expected Euler characteristic of the excursion
   set above ``t`` of a 3-D Gaussian field, ``R · (4 ln 2)^(3/2) (2π)^(−2) (t² − 1)
   e^(−t²/2)`` (Worsley et al. 1996), bounds the probability that the field exceeds ``t``
   anywhere. ``t`` solves ``2 · Σ_d R_d · ρ3(t) = fwe`` (two-sided, hot and cold; summed
   over the scales, a Bonferroni bound across them) and is never above the voxel-wise
   Bonferroni threshold for ``2 · n_scales · |obj|`` tests. Pure noise therefore triggers
   the guard anywhere in the volume with probability at most about ``fwe`` (0.05).
4. Where to keep, and how much: a detection is a local extremum of ``|T_d|`` over the ball
   ``B_d`` with ``|T_d| > t``; its weight ``g = min((|T_d| − t) / ramp, 1)`` applies to the
   whole ball of diameter ``d`` around it (the structure the test found), so a strong lesion
   does not spread the guard over every ball that merely touches it.
   ``G = max over scales and detections`` ∈ [0, 1].

The blend (``stability.blend_guarded``): ``w = max(S_norm, G)``, ``x = w·x0 + (1 − w)·f``.
Arrays in, arrays out: no DICOM, no files.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from scipy import ndimage, optimize, special

from dipnode.models.gaussian import FWHM_PER_SIGMA

MAD_TO_SD = 1.4826  # 1 / Φ⁻¹(3/4): the MAD of a normal variable times this is its sd


class GuardError(ValueError):
    """Bad input to the guard; the message names the argument."""


@dataclass(frozen=True)
class GuardParams:
    """The guard's knobs (see the module docstring for what each does).

    diameters_mm: lesion diameters to test for (matched-filter scales), mm.
    fwe: family-wise probability that pure noise triggers the guard anywhere in the volume.
    ramp: z units from the threshold (G = 0) to full keep (G = 1).
    activity_fwhm_mm, object_fraction: the tested object is where f, smoothed to this FWHM,
    exceeds this fraction of its 99th percentile (brain tissue; G = 0 elsewhere).
    threshold: a fixed |T| threshold instead of the FWE one (for measuring the trade-off;
    None, the default, derives it from ``fwe``).
    """

    diameters_mm: tuple[float, ...] = (4.0, 6.5, 10.0, 15.0)
    fwe: float = 0.05
    ramp: float = 1.0
    activity_fwhm_mm: float = 6.0
    object_fraction: float = 0.15
    threshold: float | None = None

    def __post_init__(self) -> None:
        def bad(name: str, expected: str) -> GuardError:
            return GuardError(f"GuardParams.{name}: expected {expected}, got {getattr(self, name)!r}")

        if not self.diameters_mm or not all(math.isfinite(d) and d > 0 for d in self.diameters_mm):
            raise bad("diameters_mm", "one or more positive numbers (mm)")
        if not 0 < self.fwe < 1:
            raise bad("fwe", "a probability 0 < fwe < 1")
        if not self.ramp > 0:
            raise bad("ramp", "a number > 0")
        if not self.activity_fwhm_mm >= 0:
            raise bad("activity_fwhm_mm", "a number >= 0")
        if not 0 < self.object_fraction < 1:
            raise bad("object_fraction", "a number in (0, 1)")
        if self.threshold is not None and not self.threshold > 0:
            raise bad("threshold", "None or a number > 0")

    def describe(self) -> str:
        d = "/".join(f"{v:g}" for v in self.diameters_mm)
        return f"guard: balls {d} mm, FWE {self.fwe:g} two-sided, ramp {self.ramp:g}"


@dataclass(frozen=True)
class GuardResult:
    """What the guard found. ``weight`` is G in [0, 1] (float32, the PET's shape).

    threshold: t, the |T| above which the guard starts to keep x0.
    resels: per scale, the search volume in resolution elements. fwhm_vox: per scale, the
        estimated smoothness (k, j, i) of T_d in voxels.
    max_abs_t: per scale, the largest |T_d| in the object (how far from firing the data are).
    """

    weight: np.ndarray = field(repr=False)
    threshold: float
    resels: tuple[float, ...]
    fwhm_vox: tuple[tuple[float, float, float], ...]
    max_abs_t: tuple[float, ...]
    scores: dict[float, np.ndarray] = field(repr=False, default_factory=dict)


def ball_kernel(diameter_mm: float, spacing: Sequence[float], supersample: int = 5) -> np.ndarray:
    """A ball of ``diameter_mm`` on a grid of ``spacing`` (mm, array order), sum 1.

    Each voxel's weight is the fraction of it inside the ball (``supersample``³ points), so
    a ball smaller than a voxel is still the centre voxel, and sizes between voxels differ.
    """
    sp = np.asarray(spacing, dtype=float)
    r = diameter_mm / 2.0
    reach = np.ceil(r / sp - 0.5).astype(int)
    axes = []
    offs = (np.arange(supersample) + 0.5) / supersample - 0.5
    for a in range(3):
        centres = np.arange(-reach[a], reach[a] + 1)
        axes.append(np.add.outer(centres, offs).ravel() * sp[a])
    inside = (axes[0][:, None, None] ** 2 + axes[1][None, :, None] ** 2
              + axes[2][None, None, :] ** 2) <= r * r
    n = 2 * reach + 1
    w = inside.reshape(n[0], supersample, n[1], supersample, n[2], supersample).mean(axis=(1, 3, 5))
    if w.sum() == 0:  # a ball smaller than the supersampling: the centre voxel alone
        w[tuple(reach)] = 1.0
    return w / w.sum()


def ec_density_3d(t: float) -> float:
    """Expected Euler characteristic per resel of a 3-D Gaussian field above ``t``."""
    return (4 * math.log(2)) ** 1.5 / (2 * math.pi) ** 2 * (t * t - 1) * math.exp(-t * t / 2)


def smoothness_fwhm(field_: np.ndarray, mask: np.ndarray) -> tuple[float, float, float]:
    """FWHM (voxels, per axis) of a stationary field from its first differences (Forman 1995).

    Only differences between two voxels of ``mask`` count. Returns at least 1 voxel per
    axis (a field cannot be resolved more finely than its grid).
    """
    var = float(np.var(field_[mask]))
    out = []
    for a in range(3):
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[a], hi[a] = slice(0, -1), slice(1, None)
        both = mask[tuple(lo)] & mask[tuple(hi)]
        if var <= 0 or not both.any():
            out.append(1.0)
            continue
        d = (field_[tuple(hi)] - field_[tuple(lo)])[both]
        rho = 1.0 - float(np.mean(d * d)) / (2 * var)
        if not 0 < rho < 1:
            out.append(1.0)
            continue
        out.append(max(1.0, math.sqrt(-2 * math.log(2) / math.log(rho))))
    return tuple(out)  # type: ignore[return-value]


def threshold_for(resels: Sequence[float], n_tests: int, fwe: float) -> float:
    """|T| threshold with family-wise error ``fwe`` over all scales, both signs.

    The smaller of the random-field threshold (``2 Σ R_d ρ3(t) = fwe``) and the Bonferroni
    one (``2 Φ(−t) · n_tests = fwe``, n_tests = voxels × scales): each controls the FWE, so
    the smaller one does too (SPM's rule).
    """
    total = float(sum(resels))
    t_bonf = float(-special.ndtri(fwe / (2.0 * max(n_tests, 1))))
    if total <= 0:
        return t_bonf

    def excess(t: float) -> float:
        return 2.0 * total * ec_density_3d(t) - fwe

    # ρ3 falls for t > sqrt(3); search above it.
    lo, hi = math.sqrt(3.0), 12.0
    if excess(lo) <= 0:
        return min(lo, t_bonf)
    t_rft = float(optimize.brentq(excess, lo, hi))
    return min(t_rft, t_bonf)


def data_guard(x0: np.ndarray, f: np.ndarray, spacing: Sequence[float],
               params: GuardParams = GuardParams(), keep_scores: bool = False) -> GuardResult:
    """G ∈ [0, 1]: where ``x0 − f`` is significant at lesion scale (module docstring, steps 1–4).

    x0: the measured (OSEM) image; f: the network's image; both 3-D, one shape, PET units.
    spacing: voxel size in mm, array order. keep_scores: also return each scale's T_d.
    """
    x0 = np.asarray(x0, dtype=np.float64)
    f = np.asarray(f, dtype=np.float64)
    if x0.ndim != 3:
        raise GuardError(f"x0: expected a 3-D array, got shape {x0.shape}")
    if f.shape != x0.shape:
        raise GuardError(f"f: expected x0's shape {x0.shape}, got {f.shape}")
    if not (np.all(np.isfinite(x0)) and np.all(np.isfinite(f))):
        raise GuardError("x0, f: expected finite values")
    sp = np.asarray(spacing, dtype=float)
    if sp.shape != (3,) or not np.all(sp > 0):
        raise GuardError(f"spacing: expected 3 positive numbers (mm), got {spacing!r}")
    if not isinstance(params, GuardParams):
        raise GuardError(f"params: expected GuardParams, got {type(params).__name__}")

    if params.activity_fwhm_mm > 0:
        sigma_vox = params.activity_fwhm_mm / FWHM_PER_SIGMA / sp
        activity = ndimage.gaussian_filter(f, sigma_vox)
    else:
        activity = f
    p99 = float(np.percentile(activity, 99))
    obj = activity > params.object_fraction * p99
    weight = np.zeros(x0.shape, dtype=np.float32)
    if p99 <= 0 or obj.sum() < 100:
        return GuardResult(weight, float("inf"), (), (), ())
    z = 2.0 * (np.sqrt(np.maximum(x0, 0.0)) - np.sqrt(np.maximum(f, 0.0)))
    z[~obj] = 0.0  # the background is not tested and does not leak into the balls

    fields, resels, fwhms = [], [], []
    for d in params.diameters_mm:
        k = ball_kernel(d, sp)
        zd = ndimage.convolve(z, k, mode="constant")
        # Only balls wholly inside the object: one reaching past its edge averages in zeros.
        inside = (ndimage.convolve(obj.astype(np.float64), k, mode="constant") > 0.999) & obj
        if inside.sum() < 10:
            continue
        v = zd[inside]
        med = float(np.median(v))
        s = MAD_TO_SD * float(np.median(np.abs(v - med)))
        if not s > 0:
            continue
        t_d = np.where(inside, (zd - med) / s, 0.0)
        fw = smoothness_fwhm(np.clip(t_d, -6, 6), inside)
        fields.append((d, k, t_d, inside))
        resels.append(float(inside.sum()) / float(np.prod(fw)))
        fwhms.append(fw)
    n_tests = int(obj.sum()) * max(len(fields), 1)
    t = threshold_for(resels, n_tests, params.fwe) if params.threshold is None else params.threshold
    scores: dict[float, np.ndarray] = {}
    max_abs = []
    for d, k, t_d, inside in fields:
        a_t = np.abs(t_d)
        max_abs.append(float(a_t[inside].max()))
        footprint = k > 0
        peaks = (a_t > t) & (a_t >= ndimage.maximum_filter(a_t, footprint=footprint, mode="constant"))
        if peaks.any():
            g = np.where(peaks, np.minimum((a_t - t) / params.ramp, 1.0), 0.0)
            g = ndimage.grey_dilation(g, footprint=footprint, mode="constant")
            np.maximum(weight, g.astype(np.float32), out=weight)
        if keep_scores:
            scores[d] = t_d.astype(np.float32)
    return GuardResult(weight=weight, threshold=t, resels=tuple(resels), fwhm_vox=tuple(fwhms),
                       max_abs_t=tuple(max_abs), scores=scores)
