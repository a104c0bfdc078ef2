"""MR -> PET alignment on arrays and affines: resampling on a shared frame, rigid registration otherwise.

Conventions (the same as the DICOM boundary's ``Geometry``):
- arrays are indexed (k, j, i) = (slice, row, column);
- a 4x4 affine maps a voxel index (i, j, k, 1) to patient LPS coordinates in mm.
SimpleITK indexes images (i, j, k) and ``GetArrayFromImage`` returns (k, j, i), so an array in
our order becomes an image without any transpose; only the affine has to be split into origin,
spacing and a direction matrix.

Transforms are 4x4 matrices in patient mm that map a point of the TARGET (fixed, PET) space to
the point of the MOVING (MR) space holding the same anatomy: ``p_mr = T @ p_pet``. That is the
direction ITK resamples in (every output voxel asks where to read the input) and the direction
its registration estimates, so no inversion happens anywhere.

No DICOM, files or sockets here: the caller decides from the Frame of Reference UIDs whether the
two series share patient coordinates.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import SimpleITK as sitk

log = logging.getLogger(__name__)

Interpolation = Literal["linear", "nearest", "bspline"]
Initial = Literal["geometry", "moments"]

_INTERPOLATORS = {
    "linear": sitk.sitkLinear,
    "nearest": sitk.sitkNearestNeighbor,
    "bspline": sitk.sitkBSpline,
}
# Direction columns must be orthonormal: ITK images have no shear. DICOM volumes with gantry
# tilt are sheared and must be resampled upstream, not silently squared off here.
_ORTHO_TOL = 1e-4
_THREADS_LOCK = threading.Lock()


class AlignmentError(ValueError):
    """The MR could not be put onto the PET grid with enough confidence to condition the DIP on it."""


@dataclass(frozen=True)
class RigidResult:
    """A rigid PET -> MR transform found by mutual-information registration.

    matrix: 4x4 in patient mm, maps PET (fixed) points to MR (moving) points.
    rotation_deg: Euler angles about x, y, z in degrees, rotation = Rz @ Rx @ Ry (ITK's
        Euler3DTransform order); the angles do not depend on the centre of rotation.
    translation_mm: how far the matrix moves the centre of the PET grid (patient mm), a
        centre-independent way to report the shift.
    metric_value: Mattes mutual information at full resolution (negative; lower is better).
    initial_metric_value: the same metric for the initial alignment, for the sanity check.
    iterations: optimiser iterations at the last (full-resolution) level.
    stop_condition: the optimiser's own description of why it stopped.
    overlap_fraction: share of PET support voxels that map inside the MR's field of view.
    """

    matrix: np.ndarray = field(repr=False)
    rotation_deg: np.ndarray
    translation_mm: np.ndarray
    metric_value: float
    initial_metric_value: float
    iterations: int
    stop_condition: str
    overlap_fraction: float


@dataclass(frozen=True)
class AlignedMr:
    """The MR on the PET grid, ready to be the network input.

    values: float32 (k, j, i) on the PET grid; 0 outside the MR's field of view.
    method: "resample" (shared frame of reference) or "rigid" (registered).
    transform: 4x4 PET -> MR patient-mm transform used for resampling (identity for "resample").
    metric: final Mattes MI for "rigid", None for "resample".
    overlap_fraction: share of PET support voxels covered by the MR's field of view.
    """

    values: np.ndarray = field(repr=False)
    method: Literal["resample", "rigid"]
    transform: np.ndarray = field(repr=False)
    metric: float | None
    overlap_fraction: float


# --- affine <-> SimpleITK -------------------------------------------------------------------

def _check_affine(name: str, affine: np.ndarray) -> np.ndarray:
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4):
        raise ValueError(f"{name}: expected a 4x4 affine, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name}: expected finite values, got {a.tolist()}")
    if not np.allclose(a[3], [0.0, 0.0, 0.0, 1.0]):
        raise ValueError(f"{name}: expected last row [0, 0, 0, 1], got {a[3].tolist()}")
    return a


def _split_affine(name: str, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Origin, spacing (i, j, k) and direction (unit columns) of a voxel -> patient affine."""
    a = _check_affine(name, affine)
    spacing = np.linalg.norm(a[:3, :3], axis=0)
    if not np.all(spacing > 0):
        raise ValueError(f"{name}: expected non-zero voxel sizes, got {spacing.tolist()}")
    direction = a[:3, :3] / spacing
    gram = direction.T @ direction
    if not np.allclose(gram, np.eye(3), atol=_ORTHO_TOL):
        raise ValueError(
            f"{name}: expected orthogonal axes (no shear, e.g. gantry tilt resampled upstream), "
            f"got direction cosines {direction.round(6).tolist()}"
        )
    return a[:3, 3].copy(), spacing, direction


def _check_volume(name: str, values: np.ndarray) -> np.ndarray:
    v = np.asarray(values)
    if v.ndim != 3 or min(v.shape) < 1:
        raise ValueError(f"{name}: expected a non-empty 3-D (k, j, i) array, got shape {v.shape}")
    if not np.all(np.isfinite(v)):
        raise ValueError(f"{name}: expected finite values, got {int(np.sum(~np.isfinite(v)))} non-finite")
    return v


def image_from_array(values: np.ndarray, affine: np.ndarray, name: str = "values") -> sitk.Image:
    """A float32 SimpleITK image of a (k, j, i) array whose index (i, j, k) maps through ``affine``.

    name: how errors call the pair (``name`` and ``name_affine``), e.g. "mr" or "pet".
    """
    v = _check_volume(name, values)
    origin, spacing, direction = _split_affine(f"{name}_affine" if name != "values" else "affine", affine)
    # GetImageFromArray reads a C-ordered (k, j, i) array as an image of size (i, j, k).
    img = sitk.GetImageFromArray(np.ascontiguousarray(v, dtype=np.float32))
    img.SetOrigin(tuple(float(x) for x in origin))
    img.SetSpacing(tuple(float(x) for x in spacing))
    # ITK's direction is row-major with the axis unit vectors as columns: exactly ours.
    img.SetDirection(tuple(float(x) for x in direction.ravel()))
    return img


def affine_from_image(image: sitk.Image) -> np.ndarray:
    """The 4x4 voxel (i, j, k) -> patient affine of a 3-D SimpleITK image."""
    if image.GetDimension() != 3:
        raise ValueError(f"image: expected 3 dimensions, got {image.GetDimension()}")
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = direction * np.asarray(image.GetSpacing())
    affine[:3, 3] = image.GetOrigin()
    return affine


def _reference(shape: tuple[int, int, int], affine: np.ndarray, name: str) -> sitk.Image:
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"{name}: expected a (k, j, i) shape of three positive sizes, got {shape}")
    return image_from_array(np.zeros(tuple(int(s) for s in shape), np.float32), affine, "target")


def _sitk_transform(matrix: np.ndarray, name: str = "transform") -> sitk.AffineTransform:
    m = _check_affine(name, matrix)
    tx = sitk.AffineTransform(3)
    tx.SetMatrix(tuple(float(x) for x in m[:3, :3].ravel()))
    tx.SetTranslation(tuple(float(x) for x in m[:3, 3]))  # centre stays (0, 0, 0): offset == translation
    return tx


def _matrix_of(tx: sitk.Euler3DTransform) -> np.ndarray:
    """4x4 of an ITK matrix-offset transform: T(x) = R (x - c) + c + t."""
    r = np.asarray(tx.GetMatrix()).reshape(3, 3)
    c = np.asarray(tx.GetCenter())
    t = np.asarray(tx.GetTranslation())
    m = np.eye(4)
    m[:3, :3] = r
    m[:3, 3] = c + t - r @ c
    return m


# --- resampling -----------------------------------------------------------------------------

def resample_to_grid(
    moving: np.ndarray,
    moving_affine: np.ndarray,
    target_shape: tuple[int, int, int],
    target_affine: np.ndarray,
    transform: np.ndarray | None = None,
    interpolation: Interpolation = "linear",
    default: float = 0.0,
) -> np.ndarray:
    """Resample ``moving`` onto the target grid; float32 (k, j, i) of ``target_shape``.

    transform: optional 4x4 in patient mm mapping TARGET points to MOVING points
        (``p_moving = transform @ p_target``); None means both share patient coordinates.
    default: value for target voxels that fall outside the moving field of view.
    """
    if interpolation not in _INTERPOLATORS:
        raise ValueError(f"interpolation: expected one of {sorted(_INTERPOLATORS)}, got {interpolation!r}")
    img = image_from_array(moving, moving_affine, "moving")
    ref = _reference(tuple(target_shape), target_affine, "target_shape")
    tx = sitk.Transform(3, sitk.sitkIdentity) if transform is None else _sitk_transform(transform)
    out = sitk.Resample(img, ref, tx, _INTERPOLATORS[interpolation], float(default), sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out)


def _support(values: np.ndarray, threshold: float) -> np.ndarray:
    """Voxels above ``threshold`` x the 99th percentile of the positive values (robust to hot spots)."""
    pos = values[values > 0]
    if pos.size == 0:
        return np.zeros(values.shape, bool)
    return values > threshold * float(np.percentile(pos, 99))


def overlap_fraction(
    support: np.ndarray,
    target_affine: np.ndarray,
    moving_shape: tuple[int, int, int],
    moving_affine: np.ndarray,
    transform: np.ndarray | None = None,
) -> float:
    """Share of the ``support`` voxels (a boolean mask on the target grid) inside the moving grid."""
    if not support.any():
        return 0.0
    inside = resample_to_grid(
        np.ones(tuple(moving_shape), np.float32), moving_affine, support.shape, target_affine,
        transform, interpolation="nearest", default=0.0,
    )
    return float(np.mean(inside[support] > 0.5))


# --- rigid registration ---------------------------------------------------------------------

def _registration(n_fixed_voxels: tuple[int, ...], sampling: int, seed: int, bins: int) -> sitk.ImageRegistrationMethod:
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=bins)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    # A fixed number of samples per level rather than a percentage: the coarse level of a small
    # PET would otherwise get a few hundred samples and a noisy metric.
    pct = [min(1.0, sampling / max(n, 1)) for n in n_fixed_voxels]
    # SimpleITK treats seed 0 as "seed from the wall clock", which would make runs differ.
    reg.SetMetricSamplingPercentagePerLevel(pct, seed + 1)
    # ITK otherwise filters the whole moving image into a gradient image at every level: ~200 MB
    # and most of the time for a 1 mm MR, when only the sample points need a gradient.
    reg.SetMetricUseFixedImageGradientFilter(False)
    reg.SetMetricUseMovingImageGradientFilter(False)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetNumberOfThreads(1)  # threaded sums are order-dependent: see _execute_single_threaded
    return reg


def _execute_single_threaded(reg: sitk.ImageRegistrationMethod, fixed: sitk.Image, moving: sitk.Image) -> None:
    # ITK sums the metric over threads in whatever order they finish, which changed the result
    # run to run (measured: ~1e-5 in the matrix, 4e-6 in MI). The method's own thread count does
    # not reach everything Execute builds; the global default does, so it is lowered for the
    # call (under a lock, so concurrent registrations cannot leave it at 1) and restored.
    with _THREADS_LOCK:
        before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
        try:
            reg.Execute(fixed, moving)
        finally:
            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before)


def _metric(fixed: sitk.Image, moving: sitk.Image, tx: sitk.Transform, sampling: int, seed: int, bins: int) -> float:
    """Mattes MI at full resolution with a fixed sample set, so that two transforms compare fairly."""
    reg = _registration((fixed.GetNumberOfPixels(),), sampling, seed, bins)
    reg.SetInitialTransform(tx, inPlace=False)
    return float(reg.MetricEvaluate(fixed, moving))


def register_rigid(
    fixed: np.ndarray,
    fixed_affine: np.ndarray,
    moving: np.ndarray,
    moving_affine: np.ndarray,
    *,
    initial: Initial = "moments",
    sampling: int = 50_000,
    seed: int = 0,
    bins: int = 32,
    iterations: int = 200,
    support_threshold: float = 0.1,
) -> RigidResult:
    """Rigid (6-parameter) registration of ``moving`` (MR) to ``fixed`` (PET) by Mattes MI.

    initial: "geometry" trusts both affines as they are (identity start, which needs the two
        volumes to overlap already); "moments" first aligns the centres of mass, for an MR in
        its own frame of reference that may lie anywhere in patient space.
    sampling: random fixed-image samples per resolution level (all voxels if fewer); with
        ``seed`` and the single-threaded optimisation it makes the result repeatable bit for bit.
    bins, iterations: Mattes histogram bins; optimiser iterations per level at most.
    support_threshold: PET support (for ``overlap_fraction``) as a fraction of its 99th percentile.
    Raises AlignmentError if ITK fails (e.g. no samples inside the moving image).
    The result is not judged here; ``align_mr_to_pet`` applies the acceptance checks.
    """
    if initial not in ("geometry", "moments"):
        raise ValueError(f"initial: expected 'geometry' or 'moments', got {initial!r}")
    if sampling < 100:
        raise ValueError(f"sampling: expected at least 100 samples per level, got {sampling}")
    if seed < 0:
        raise ValueError(f"seed: expected an integer >= 0, got {seed}")
    if bins < 4 or iterations < 1:
        raise ValueError(f"bins, iterations: expected >= 4 and >= 1, got {bins} and {iterations}")
    fixed_img = image_from_array(fixed, fixed_affine, "fixed")
    moving_img = image_from_array(moving, moving_affine, "moving")

    tx = sitk.Euler3DTransform()
    if initial == "moments":
        tx = sitk.Euler3DTransform(sitk.CenteredTransformInitializer(
            fixed_img, moving_img, tx, sitk.CenteredTransformInitializerFilter.MOMENTS))
    else:
        # Rotate about the PET's centre rather than the patient origin: the optimiser's
        # rotations then barely move the brain's centre, and the parameters decouple.
        centre = fixed_img.TransformContinuousIndexToPhysicalPoint(
            [(s - 1) / 2.0 for s in fixed_img.GetSize()])
        tx.SetCenter(centre)

    shrink = [4, 2, 1]
    sizes = tuple(int(np.prod([max(1, s // f) for s in fixed_img.GetSize()])) for f in shrink)
    reg = _registration(sizes, sampling, seed, bins)
    reg.SetShrinkFactorsPerLevel(shrink)
    # Sigmas in full-resolution PET voxels (ITK scales them by its spacing), so the blur of the
    # coarse levels follows the PET's own voxel size rather than a fixed number of mm.
    reg.SetSmoothingSigmasPerLevel([2.0, 1.0, 0.0])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    # Steps in mm of the largest voxel displacement, whatever mix of angles and shifts.
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=2.0, minStep=1e-3, numberOfIterations=iterations,
        relaxationFactor=0.5, gradientMagnitudeTolerance=1e-8)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetInitialTransform(tx, inPlace=True)

    try:
        initial_metric = _metric(fixed_img, moving_img, tx, sampling, seed, bins)
    except RuntimeError as exc:
        raise AlignmentError(f"registration: the initial alignment ({initial}) cannot be evaluated: {exc}") from exc
    try:
        _execute_single_threaded(reg, fixed_img, moving_img)
        final_metric = _metric(fixed_img, moving_img, tx, sampling, seed, bins)
    except RuntimeError as exc:
        raise AlignmentError(f"registration failed (initial={initial}): {exc}") from exc

    matrix = _matrix_of(tx)
    centre = np.asarray(fixed_img.TransformContinuousIndexToPhysicalPoint(
        [(s - 1) / 2.0 for s in fixed_img.GetSize()]))
    fixed_arr = sitk.GetArrayViewFromImage(fixed_img)
    overlap = overlap_fraction(_support(fixed_arr, support_threshold), fixed_affine,
                               tuple(np.asarray(moving).shape), moving_affine, matrix)
    result = RigidResult(
        matrix=matrix,
        rotation_deg=np.degrees([tx.GetAngleX(), tx.GetAngleY(), tx.GetAngleZ()]),
        translation_mm=(matrix[:3, :3] @ centre + matrix[:3, 3]) - centre,
        metric_value=final_metric,
        initial_metric_value=initial_metric,
        iterations=int(reg.GetOptimizerIteration()),
        stop_condition=reg.GetOptimizerStopConditionDescription(),
        overlap_fraction=overlap,
    )
    log.debug("rigid registration: rotation %s deg, translation %s mm, MI %.4f (initial %.4f), %d it",
              result.rotation_deg.round(2), result.translation_mm.round(2), final_metric,
              initial_metric, result.iterations)
    return result


# --- the stage ------------------------------------------------------------------------------

def align_mr_to_pet(
    mr: np.ndarray,
    mr_affine: np.ndarray,
    pet: np.ndarray,
    pet_affine: np.ndarray,
    *,
    same_frame_of_reference: bool,
    min_overlap: float = 0.5,
    max_metric: float = -0.1,
    initial: Initial = "moments",
    sampling: int = 50_000,
    seed: int = 0,
    support_threshold: float = 0.1,
) -> AlignedMr:
    """Put the MR on the PET grid: resample when the frames agree, register rigidly otherwise.

    PET support: voxels above ``support_threshold`` x the 99th percentile of positive PET values.
    Refuses (AlignmentError) when less than ``min_overlap`` of that support lies inside the MR's
    field of view, when registration raises or gives a non-finite metric, when the final Mattes
    MI is above ``max_metric`` (MI is negated by ITK: about 0 means the MR tells nothing about
    the PET, as for noise or the wrong series), or when it ended worse than it started.
    The default -0.1 sits between what was measured here (32 bins): -0.59 for the MNI152 T1
    against a 4*GM + WM FDG phantom, -0.001 for uniform noise. Clinical pairs are untested.
    """
    if not 0.0 < min_overlap <= 1.0:
        raise ValueError(f"min_overlap: expected 0 < value <= 1, got {min_overlap}")
    if not 0.0 < support_threshold < 1.0:
        raise ValueError(f"support_threshold: expected 0 < value < 1, got {support_threshold}")
    pet_v = _check_volume("pet", pet)
    mr_v = _check_volume("mr", mr)
    _split_affine("pet_affine", pet_affine)  # fail here, under the caller's names
    _split_affine("mr_affine", mr_affine)
    support = _support(pet_v.astype(np.float32), support_threshold)
    if not support.any():
        raise AlignmentError("pet: no voxel above the support threshold; nothing to align to")

    if same_frame_of_reference:
        transform = np.eye(4)
        metric: float | None = None
        method: Literal["resample", "rigid"] = "resample"
        overlap = overlap_fraction(support, pet_affine, mr_v.shape, mr_affine, transform)
    else:
        res = register_rigid(pet_v, pet_affine, mr_v, mr_affine, initial=initial,
                             sampling=sampling, seed=seed, support_threshold=support_threshold)
        if not (np.isfinite(res.metric_value) and np.all(np.isfinite(res.matrix))):
            raise AlignmentError(f"registration: non-finite result (metric {res.metric_value})")
        if res.metric_value > max_metric:
            raise AlignmentError(
                f"registration: Mattes MI {res.metric_value:.4f} above max_metric {max_metric:.4f}; "
                "the MR shares too little information with the PET (wrong series, noise, no overlap)")
        # Allow a sliver of sampling noise: a start that is already right may end a hair worse.
        if res.metric_value > res.initial_metric_value + 0.01 * abs(res.initial_metric_value):
            raise AlignmentError(
                f"registration: ended worse (MI {res.metric_value:.4f}) than it started "
                f"({res.initial_metric_value:.4f}); the optimiser diverged")
        transform, metric, method = res.matrix, res.metric_value, "rigid"
        overlap = res.overlap_fraction

    if overlap < min_overlap:
        raise AlignmentError(
            f"overlap: expected at least {min_overlap:.2f} of the PET support inside the MR field "
            f"of view, got {overlap:.2f} (method {method})")
    values = resample_to_grid(mr_v, mr_affine, pet_v.shape, pet_affine, transform)
    return AlignedMr(values=values, method=method, transform=transform, metric=metric,
                     overlap_fraction=overlap)
