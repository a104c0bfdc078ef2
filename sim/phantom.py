"""An FDG-like brain phantom with an MR, built offline from nilearn's bundled MNI152 files.

Activity is ``2500 * (4 * GM + 1 * WM)`` Bq/ml (pure GM 10000, pure WM 2500, docs/DESIGN.md
"Real peers and test data") plus a little background in a scalp shell. Two features the method
is judged on are added to the activity only, never to the MR:

- two small hot midbrain nuclei (left/right, 1.6x GM) with a "valley" ROI between them: where the
  MR shows nothing distinct, a conditional DIP tends to flatten them, SDIP should keep them;
- one hot white-matter lesion (3x WM, 10 mm diameter) that the MR does not show at all.

Array axes are (k, j, i) = (slice inferior->superior, row anterior->posterior, column
right->left): DICOM's usual axial orientation, Image Orientation (Patient) ``1\\0\\0\\0\\1\\0``
(PS3.3 C.7.6.2.1.1), so the voxel -> LPS affine is diagonal (see ``phantom_affine``).
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

logger = logging.getLogger(__name__)

WM_ACTIVITY = 2500.0          # Bq/ml of pure white matter
GM_ACTIVITY = 4 * WM_ACTIVITY  # FDG grey/white uptake ratio ~4
SCALP_ACTIVITY = 400.0        # small background in the non-brain head shell
NUCLEUS_ACTIVITY = 1.6 * GM_ACTIVITY
LESION_ACTIVITY = 3.0 * WM_ACTIVITY
NUCLEUS_RADIUS_MM = 5.0
NUCLEUS_HALF_SEPARATION_MM = 10.0  # centres ~20 mm apart, snapped to the grid
LESION_RADIUS_MM = 5.0
MIDBRAIN_MNI_RAS = (0.0, -18.0, -8.0)  # between the substantia nigra / red nuclei
_NATIVE_MM = 2.0  # nilearn's resolution=2 templates


class PhantomError(ValueError):
    """A bad argument to the phantom builder."""


@dataclass(frozen=True)
class Phantom:
    """The phantom on one grid.

    activity: float32 (k, j, i) true activity in Bq/ml.
    mr: float32 (k, j, i) T1-like image (arbitrary units, 0..~1000) on the same grid.
    spacing: voxel size in mm in array order (k, j, i).
    masks: bool (k, j, i) ROIs: brain, gm, wm (eroded, for noise), nuclei, nucleus_left,
        nucleus_right, valley, lesion, lesion_background.
    origin_lps: patient (LPS, mm) position of voxel (0, 0, 0)'s centre.
    """

    activity: np.ndarray = field(repr=False)
    mr: np.ndarray = field(repr=False)
    spacing: tuple[float, float, float]
    masks: dict[str, np.ndarray] = field(repr=False)
    origin_lps: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.activity.shape)  # type: ignore[return-value]


def phantom_affine(phantom: Phantom) -> np.ndarray:
    """4x4 voxel (i, j, k, 1) -> patient LPS mm affine, as dicom_io.volume.Geometry expects.

    Axial slices: i runs to the patient's left (+x), j to posterior (+y), k to superior (+z).
    """
    dk, dj, di = phantom.spacing
    affine = np.diag([di, dj, dk, 1.0])
    affine[:3, 3] = phantom.origin_lps
    return affine


@functools.lru_cache(maxsize=1)
def _load_mni() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """T1, GM, WM, brain mask as (k, j, i) LPS arrays at 2 mm, and the 2 mm affine (LPS)."""
    # Imported here: nilearn is heavy and only the simulator needs it.
    from nilearn import datasets

    imgs = [
        datasets.load_mni152_template(resolution=2),
        datasets.load_mni152_gm_template(resolution=2),
        datasets.load_mni152_wm_template(resolution=2),
        datasets.load_mni152_brain_mask(resolution=2),
    ]
    ras = imgs[0].affine
    if not np.allclose(ras[:3, :3], np.diag([2.0, 2.0, 2.0])):
        raise PhantomError(f"MNI152 affine: expected diagonal 2 mm RAS, got {ras.tolist()}")
    # NIfTI arrays are (x, y, z) in RAS; flip x and y to LPS and transpose to (k, j, i).
    arrays = [np.asarray(im.get_fdata(), dtype=np.float32)[::-1, ::-1, :].transpose(2, 1, 0) for im in imgs]
    nx, ny, _ = imgs[0].shape
    # LPS x of flipped index i = -(x_ras of native index nx-1-i); same for y.
    origin = np.array([
        -(ras[0, 3] + 2.0 * (nx - 1)),
        -(ras[1, 3] + 2.0 * (ny - 1)),
        ras[2, 3],
    ])
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = origin
    t1, gm, wm, brain = (np.ascontiguousarray(a) for a in arrays)
    for a in (t1, gm, wm, brain):
        a.setflags(write=False)  # cached: callers must not change them
    return t1, gm, wm, brain, affine


def _crop_and_bin(arrays: list[np.ndarray], box: tuple[slice, ...], factor: int) -> list[np.ndarray]:
    out = []
    for a in arrays:
        c = a[box]
        pad = [(0, (-n) % factor) for n in c.shape]
        c = np.pad(c, pad)
        if factor > 1:
            k, j, i = (n // factor for n in c.shape)
            c = c.reshape(k, factor, j, factor, i, factor).mean(axis=(1, 3, 5))
        out.append(np.ascontiguousarray(c, dtype=np.float32))
    return out


def _sphere_fraction(shape: tuple[int, int, int], spacing: np.ndarray, centre_kji: np.ndarray,
                     radius_mm: float, supersample: int = 4) -> np.ndarray:
    """Partial-volume fraction of a sphere in each voxel (centre in voxel units, (k, j, i))."""
    frac = np.zeros(shape, dtype=np.float32)
    reach = np.ceil(radius_mm / spacing).astype(int) + 1
    lo = np.maximum(np.floor(centre_kji).astype(int) - reach, 0)
    hi = np.minimum(np.ceil(centre_kji).astype(int) + reach + 1, shape)
    offs = (np.arange(supersample) + 0.5) / supersample - 0.5
    grids = [np.add.outer(np.arange(lo[a], hi[a]), offs).ravel() for a in range(3)]
    dk, dj, di = ((g - centre_kji[a]) * spacing[a] for a, g in enumerate(grids))
    inside = (dk[:, None, None] ** 2 + dj[None, :, None] ** 2 + di[None, None, :] ** 2) <= radius_mm**2
    n = [hi[a] - lo[a] for a in range(3)]
    sub = inside.reshape(n[0], supersample, n[1], supersample, n[2], supersample).mean(axis=(1, 3, 5))
    frac[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = sub
    return frac


def _ball(radius_vox: float) -> np.ndarray:
    r = int(np.ceil(radius_vox))
    g = np.mgrid[-r:r + 1, -r:r + 1, -r:r + 1]
    return (g**2).sum(0) <= radius_vox**2 + 1e-6


def make_phantom(voxel_mm: float = 2.0, *, crop_margin_vox: int = 2, seed: int = 0) -> Phantom:
    """Build the phantom at ``voxel_mm`` (2 mm native, or an integer multiple by block averaging).

    crop_margin_vox: voxels (at the output size) kept around the head's bounding box.
    seed: picks the lesion site among deep white-matter candidates of the left hemisphere
        (0 = the one nearest the midbrain nuclei); everything else is deterministic.
    """
    factor_f = voxel_mm / _NATIVE_MM
    factor = int(round(factor_f))
    if factor < 1 or abs(factor_f - factor) > 1e-9:
        raise PhantomError(f"voxel_mm: expected a positive multiple of {_NATIVE_MM} mm, got {voxel_mm!r}")
    if crop_margin_vox < 0:
        raise PhantomError(f"crop_margin_vox: expected an integer >= 0, got {crop_margin_vox!r}")

    t1, gm, wm, brain, affine2 = _load_mni()
    brain_b = brain > 0.5
    # Head = brain plus a ~6 mm scalp shell: the templates are skull-stripped, and a PET of a
    # head has some activity outside the brain.
    head = ndimage.binary_dilation(brain_b, structure=_ball(3.0))
    tissue = np.clip(gm, 0, 1) + np.clip(wm, 0, 1)
    activity2 = WM_ACTIVITY * (4.0 * np.clip(gm, 0, 1) + np.clip(wm, 0, 1))
    activity2 += SCALP_ACTIVITY * np.clip(1.0 - tissue, 0, 1) * head
    activity2[~head] = 0.0
    mr2 = 1000.0 * np.clip(t1, 0, None)

    idx = np.argwhere(head)
    margin = crop_margin_vox * factor
    lo = np.maximum(idx.min(0) - margin, 0)
    hi = np.minimum(idx.max(0) + 1 + margin, head.shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    activity, mr, gm_f, wm_f, brain_f = _crop_and_bin(
        [activity2, mr2, gm, wm, brain_b.astype(np.float32)], box, factor)
    shape = activity.shape
    spacing = np.array([voxel_mm] * 3, dtype=float)
    # Centre of output voxel 0 = mean of the native centres it averages.
    origin_kji = affine2[[2, 1, 0], 3] + (lo + (factor - 1) / 2.0) * _NATIVE_MM
    origin_lps = (float(origin_kji[2]), float(origin_kji[1]), float(origin_kji[0]))

    def mni_to_kji(ras: tuple[float, float, float]) -> np.ndarray:
        lps = np.array([-ras[0], -ras[1], ras[2]])
        return (lps[::-1] - origin_kji) / spacing

    # Nuclei: snap the valley centre to a voxel and the nuclei centres to whole voxels either
    # side along i, so the valley ROI (3x3 in k, j; as wide in i as the gap allows) holds no
    # partial-volume nucleus voxel on any grid.
    valley_c = np.round(mni_to_kji(MIDBRAIN_MNI_RAS))
    d_vox = max(int(np.ceil(NUCLEUS_HALF_SEPARATION_MM / voxel_mm - 1e-9)), 2)
    frac_left = _sphere_fraction(shape, spacing, valley_c + [0, 0, d_vox], NUCLEUS_RADIUS_MM)   # +i = left
    frac_right = _sphere_fraction(shape, spacing, valley_c - [0, 0, d_vox], NUCLEUS_RADIUS_MM)
    frac_nuc = np.clip(frac_left + frac_right, 0, 1)
    activity = (1 - frac_nuc) * activity + frac_nuc * NUCLEUS_ACTIVITY
    half = max(int(np.floor((d_vox * voxel_mm - NUCLEUS_RADIUS_MM - voxel_mm / 2) / voxel_mm)), 0)
    valley = np.zeros(shape, bool)
    kc, jc, ic = valley_c.astype(int)
    valley[kc - 1:kc + 2, jc - 1:jc + 2, ic - half:ic + half + 1] = True
    valley &= frac_nuc == 0

    # Lesion: deep white matter in the left hemisphere, clear of the nuclei.
    wm_core = (wm_f > 0.9) & (brain_f > 0.5)
    depth = ndimage.distance_transform_edt(wm_core, sampling=spacing)
    ii = np.arange(shape[2])[None, None, :]
    depth = np.where(ii > valley_c[2] + d_vox + 2 * NUCLEUS_RADIUS_MM / voxel_mm, depth, 0.0)
    need = LESION_RADIUS_MM + voxel_mm
    candidates = np.argwhere(depth >= need)
    if len(candidates) == 0:
        raise PhantomError(f"voxel_mm={voxel_mm}: no white matter deep enough for the lesion")
    if seed == 0:
        # The deep-WM site nearest the nuclei: a crop holding both stays small (fast tests).
        gap = (candidates - valley_c) * spacing
        lesion_c = tuple(candidates[int(np.argmin((gap**2).sum(axis=1)))])
    else:
        lesion_c = tuple(candidates[np.random.default_rng(seed).integers(len(candidates))])
    lesion_c = np.asarray(lesion_c, dtype=float)
    frac_les = _sphere_fraction(shape, spacing, lesion_c, LESION_RADIUS_MM)
    activity = (1 - frac_les) * activity + frac_les * LESION_ACTIVITY

    grid = np.indices(shape, dtype=float)
    dist_les = np.sqrt(sum(((grid[a] - lesion_c[a]) * spacing[a]) ** 2 for a in range(3)))
    inner = LESION_RADIUS_MM + max(4.0, voxel_mm)
    outer = inner + max(6.0, 2 * voxel_mm)
    lesion = frac_les >= 0.5
    lesion_bg = (dist_les >= inner) & (dist_les <= outer) & (wm_f > 0.5) & (frac_les == 0)

    nuclei_near = ndimage.binary_dilation(frac_nuc > 0, iterations=1)
    wm_mask = ndimage.binary_erosion(wm_f > 0.9, iterations=1) & (dist_les > inner) & ~nuclei_near
    gm_mask = (gm_f > 0.6) & (frac_nuc == 0) & (frac_les == 0)
    masks = {
        "brain": brain_f > 0.5,
        "gm": gm_mask,
        "wm": wm_mask,
        "nuclei": frac_nuc >= 0.5,
        "nucleus_left": frac_left >= 0.5,
        "nucleus_right": frac_right >= 0.5,
        "valley": valley,
        "lesion": lesion,
        "lesion_background": lesion_bg,
    }
    for name, m in masks.items():
        if not m.any():
            raise PhantomError(f"voxel_mm={voxel_mm}: ROI {name!r} came out empty")
        m.setflags(write=False)
    activity = activity.astype(np.float32)
    mr = mr.astype(np.float32)
    activity.setflags(write=False)
    mr.setflags(write=False)
    logger.debug("phantom %s at %.1f mm, lesion at voxel %s", shape, voxel_mm, lesion_c)
    return Phantom(activity=activity, mr=mr, spacing=tuple(float(s) for s in spacing),
                   masks=masks, origin_lps=origin_lps)
