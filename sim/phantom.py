"""An FDG-like brain phantom with an MR, built offline from nilearn's bundled MNI152 files.

Activity is ``2500 * (4 * GM + 1 * WM)`` Bq/ml (pure GM 10000, pure WM 2500, docs/DESIGN.md
"Real peers and test data") plus a little background in a scalp shell. Two features the method
is judged on are added to the activity only, never to the MR:

- two small hot midbrain nuclei (left/right, 1.6x GM) with a "valley" ROI between them: where the
  MR shows nothing distinct, a conditional DIP tends to flatten them, SDIP should keep them;
- one hot white-matter lesion (3x WM, 10 mm diameter) that the MR does not show at all;
- or, instead of that one, a set of ``Lesion`` s (``lesions=FIDELITY_LESIONS``: hot and cold,
  6, 8 and 12 mm, in white matter and in cortex) for the fidelity benchmark, placed inside a
  region given in MNI millimetres (``FIDELITY_REGION_MNI``, a 48x64x64 box at 2 mm).

Array axes are (k, j, i) = (slice inferior->superior, row anterior->posterior, column
right->left): DICOM's usual axial orientation, Image Orientation (Patient) ``1\\0\\0\\0\\1\\0``
(PS3.3 C.7.6.2.1.1), so the voxel -> LPS affine is diagonal (see ``phantom_affine``).
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Sequence

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
# Background ring of a lesion ROI: from the lesion's edge + max(4 mm, a voxel) outwards,
# max(6 mm, two voxels) wide (the contrast's reference, clear of the lesion's partial volume).
RING_GAP_MM = 4.0
RING_WIDTH_MM = 6.0
# Cortex = grey matter within this distance of the outside of the brain mask (not deep GM).
CORTEX_DEPTH_MM = 10.0
# Centres of two lesions at least this far apart beyond their radii, so that neither lies in
# the other's background ring.
LESION_SPACING_MM = 2 * (RING_GAP_MM + RING_WIDTH_MM)


@dataclass(frozen=True)
class Lesion:
    """A sphere of changed uptake that the MR does not show.

    name: ROI key suffix (masks ``lesion:<name>`` and ``lesion_background:<name>``).
    tissue: "wm" (deep white matter) or "cortex" (cortical grey matter).
    diameter_mm: sphere diameter. factor: the activity inside is multiplied by it (partial
    volume at the edge): > 1 hot, < 1 cold.
    """

    name: str
    tissue: str
    diameter_mm: float
    factor: float

    def __post_init__(self) -> None:
        if self.tissue not in ("wm", "cortex"):
            raise PhantomError(f"Lesion.tissue: expected 'wm' or 'cortex', got {self.tissue!r}")
        if not self.diameter_mm > 0:
            raise PhantomError(f"Lesion.diameter_mm: expected > 0, got {self.diameter_mm!r}")
        if not (self.factor >= 0 and self.factor != 1):
            raise PhantomError(f"Lesion.factor: expected >= 0 and != 1, got {self.factor!r}")

    @property
    def hot(self) -> bool:
        return self.factor > 1


def _fidelity_lesions() -> tuple[Lesion, ...]:
    # Hot: a tumour-like 3x in white matter (the demo lesion's uptake), 1.5x in cortex.
    # Cold: 0.5x in white matter; 0.6x in cortex (an interictal FDG focus, -40 %).
    factors = {("wm", "hot"): 3.0, ("wm", "cold"): 0.5,
               ("cortex", "hot"): 1.5, ("cortex", "cold"): 0.6}
    return tuple(Lesion(f"{t}-{k}-{d}mm", t, float(d), factors[t, k])
                 for d in (12, 8, 6) for t in ("wm", "cortex") for k in ("hot", "cold"))


FIDELITY_LESIONS: tuple[Lesion, ...] = _fidelity_lesions()
# RAS mm bounds [lo, hi) per axis (x right->left... as MNI: x, y, z): 128 x 128 x 96 mm, i.e.
# 64 x 64 x 48 voxels at 2 mm; holds the midbrain nuclei and the centrum semiovale.
FIDELITY_REGION_MNI: tuple[tuple[float, float], ...] = ((-64.0, 64.0), (-82.0, 46.0), (-32.0, 64.0))


class PhantomError(ValueError):
    """A bad argument to the phantom builder."""


@dataclass(frozen=True)
class Phantom:
    """The phantom on one grid.

    activity: float32 (k, j, i) true activity in Bq/ml.
    mr: float32 (k, j, i) T1-like image (arbitrary units, 0..~1000) on the same grid.
    spacing: voxel size in mm in array order (k, j, i).
    masks: bool (k, j, i) ROIs: brain, gm, wm (eroded, for noise), nuclei, nucleus_left,
        nucleus_right, valley, lesions (every lesion voxel, partial ones too), and per lesion
        either lesion, lesion_background (the default single lesion) or
        ``lesion:<name>``, ``lesion_background:<name>`` (``lesions=`` given).
    origin_lps: patient (LPS, mm) position of voxel (0, 0, 0)'s centre.
    lesions: the lesions placed, with their centres in voxels (k, j, i).
    region: the box (slices) the lesions were placed in; the whole grid if none was asked.
    """

    activity: np.ndarray = field(repr=False)
    mr: np.ndarray = field(repr=False)
    spacing: tuple[float, float, float]
    masks: dict[str, np.ndarray] = field(repr=False)
    origin_lps: tuple[float, float, float] = (0.0, 0.0, 0.0)
    lesions: tuple[tuple[Lesion, tuple[float, float, float]], ...] = ()
    region: tuple[slice, slice, slice] = (slice(None), slice(None), slice(None))

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


def _region_box(region_mni: Sequence[Sequence[float]], origin_kji: np.ndarray, spacing: np.ndarray,
                shape: tuple[int, ...]) -> tuple[slice, slice, slice]:
    """Voxel box (k, j, i) of an MNI RAS region ((x0, x1), (y0, y1), (z0, z1)), clipped."""
    try:
        (x0, x1), (y0, y1), (z0, z1) = ((float(a), float(b)) for a, b in region_mni)
    except (TypeError, ValueError):
        raise PhantomError(f"region_mni: expected ((x0, x1), (y0, y1), (z0, z1)) in mm, "
                           f"got {region_mni!r}") from None
    if not (x1 > x0 and y1 > y0 and z1 > z0):
        raise PhantomError(f"region_mni: expected lo < hi on every axis, got {region_mni!r}")
    # RAS -> LPS flips x and y; array order is (z, y, x).
    lo_lps = np.array([z0, -y1, -x1])
    size = np.array([z1 - z0, y1 - y0, x1 - x0])
    lo = np.ceil((lo_lps - origin_kji) / spacing - 1e-6).astype(int)
    n = np.round(size / spacing).astype(int)
    lo = np.clip(lo, 0, np.array(shape))
    hi = np.clip(lo + n, 0, np.array(shape))
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))  # type: ignore[return-value]


def region_box(phantom: Phantom, region_mni: Sequence[Sequence[float]]) -> tuple[slice, slice, slice]:
    """The (k, j, i) voxel box of ``phantom`` covering an MNI RAS region (mm, [lo, hi))."""
    spacing = np.asarray(phantom.spacing, dtype=float)
    origin_kji = np.asarray(phantom.origin_lps[::-1], dtype=float)
    return _region_box(region_mni, origin_kji, spacing, phantom.shape)


def _ring(dist: np.ndarray, radius: float, voxel_mm: float) -> np.ndarray:
    inner = radius + max(RING_GAP_MM, voxel_mm)
    return (dist >= inner) & (dist <= inner + max(RING_WIDTH_MM, 2 * voxel_mm))


def _place_lesions(lesions: Sequence[Lesion], *, shape: tuple[int, int, int], spacing: np.ndarray,
                   wm_f: np.ndarray, gm_f: np.ndarray, brain_f: np.ndarray, box: tuple[slice, ...],
                   keep_out: np.ndarray, seed: int) -> list[tuple[Lesion, np.ndarray]]:
    """Centres (k, j, i voxels) for ``lesions``, biggest first, each whole inside ``box``.

    White matter: the centre lies at least radius + a voxel deep in white matter (wm > 0.9).
    Cortex: a grey-matter voxel within CORTEX_DEPTH_MM of the outside of the brain whose
    sphere holds the most grey matter among the candidates (the cortical ribbon is thinner
    than a lesion, so the sphere also covers white matter and CSF; the ROI keeps its GM).
    No sphere or background ring touches another lesion or ``keep_out`` (the nuclei); among
    the admissible sites one is drawn with ``seed`` (deterministic).
    """
    rng = np.random.default_rng(seed)
    voxel = float(spacing.min())
    in_box = np.zeros(shape, bool)
    in_box[box] = True
    wm_core = (wm_f > 0.9) & (brain_f > 0.5)
    wm_depth = ndimage.distance_transform_edt(wm_core, sampling=spacing)
    outside_depth = ndimage.distance_transform_edt(brain_f > 0.5, sampling=spacing)
    keep_out_dist = ndimage.distance_transform_edt(~keep_out, sampling=spacing)
    grid = np.indices(shape, dtype=float)
    placed: list[tuple[Lesion, np.ndarray]] = []
    order = sorted(range(len(lesions)), key=lambda n: -lesions[n].diameter_mm)
    gm_share_cache: dict[float, np.ndarray] = {}
    out: dict[int, tuple[Lesion, np.ndarray]] = {}
    for n in order:
        les = lesions[n]
        r = les.diameter_mm / 2
        reach = r + max(RING_GAP_MM, voxel) + max(RING_WIDTH_MM, 2 * voxel)
        # the whole ring inside the box
        margin = np.ceil(reach / spacing).astype(int)
        ok = np.zeros(shape, bool)
        inner = tuple(slice(b.start + m, b.stop - m) for b, m in zip(box, margin))
        ok[inner] = True
        ok &= keep_out_dist > reach
        for other, c in placed:
            d = np.sqrt(sum(((grid[a] - c[a]) * spacing[a]) ** 2 for a in range(3)))
            ok &= d >= r + other.diameter_mm / 2 + LESION_SPACING_MM
        if les.tissue == "wm":
            cand = np.argwhere(ok & (wm_depth >= r + voxel))
        else:
            if r not in gm_share_cache:
                ball = _ball(r / voxel)
                gm_share_cache[r] = ndimage.convolve(np.clip(gm_f, 0, 1), ball / ball.sum(),
                                                     mode="constant")
            share = gm_share_cache[r]
            site = ok & (gm_f > 0.5) & (outside_depth <= CORTEX_DEPTH_MM) & in_box
            cand = np.argwhere(site)
            if len(cand):
                s = share[tuple(cand.T)]
                cand = cand[s >= np.quantile(s, 0.9)]  # the GM-richest tenth of the sites
        if len(cand) == 0:
            raise PhantomError(f"lesion {les.name!r}: no site left in the region for a "
                               f"{les.diameter_mm:g} mm {les.tissue} lesion")
        c = cand[int(rng.integers(len(cand)))].astype(float)
        placed.append((les, c))
        out[n] = (les, c)
    return [out[n] for n in range(len(lesions))]


def make_phantom(voxel_mm: float = 2.0, *, crop_margin_vox: int = 2, seed: int = 0,
                 lesions: Sequence[Lesion] | None = None,
                 region_mni: Sequence[Sequence[float]] | None = None) -> Phantom:
    """Build the phantom at ``voxel_mm`` (2 mm native, or an integer multiple by block averaging).

    crop_margin_vox: voxels (at the output size) kept around the head's bounding box.
    seed: picks the lesion site(s) (0 = for the default lesion, the deep white-matter site
        nearest the midbrain nuclei); everything else is deterministic.
    lesions: None = the default single 10 mm hot WM lesion (masks ``lesion``,
        ``lesion_background``); else these lesions (``lesion:<name>``, ...), placed inside
        ``region_mni`` (RAS mm bounds, default the whole grid).
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

    grid = np.indices(shape, dtype=float)
    nuclei_near = ndimage.binary_dilation(frac_nuc > 0, iterations=1)
    if lesions is None:
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

        dist_les = np.sqrt(sum(((grid[a] - lesion_c[a]) * spacing[a]) ** 2 for a in range(3)))
        inner = LESION_RADIUS_MM + max(4.0, voxel_mm)
        outer = inner + max(6.0, 2 * voxel_mm)
        lesion_masks = {
            "lesion": frac_les >= 0.5,
            "lesion_background": (dist_les >= inner) & (dist_les <= outer) & (wm_f > 0.5) & (frac_les == 0),
        }
        near_lesion = dist_les <= inner
        frac_all = frac_les
        region = (slice(None), slice(None), slice(None))
        placed: list[tuple[Lesion, np.ndarray]] = []
    else:
        region = ((slice(None), slice(None), slice(None)) if region_mni is None
                  else _region_box(region_mni, origin_kji, spacing, shape))
        if any(sl.stop is not None and sl.stop - sl.start < 1 for sl in region):
            raise PhantomError(f"region_mni: {region_mni!r} misses the head's grid")
        placed = _place_lesions(list(lesions), shape=shape, spacing=spacing, wm_f=wm_f, gm_f=gm_f,
                                brain_f=brain_f, box=region, keep_out=frac_nuc > 0, seed=seed)
        frac_all = np.zeros(shape, np.float32)
        near_lesion = np.zeros(shape, bool)
        rois: list[tuple[Lesion, np.ndarray, np.ndarray]] = []
        for les, c in placed:
            r = les.diameter_mm / 2
            frac = _sphere_fraction(shape, spacing, c, r)
            # The uptake inside changes by the factor; tissue and MR stay as they are.
            activity = activity * (1 + (les.factor - 1) * frac)
            frac_all = np.maximum(frac_all, frac)
            dist = np.sqrt(sum(((grid[a] - c[a]) * spacing[a]) ** 2 for a in range(3)))
            near_lesion |= dist <= r + max(RING_GAP_MM, voxel_mm)
            tissue = (wm_f > 0.5) if les.tissue == "wm" else (gm_f > 0.5)
            roi = frac >= 0.5
            if les.tissue == "cortex":
                roi &= tissue  # the lesion's grey matter, not the CSF/WM its sphere covers
            rois.append((les, roi, _ring(dist, r, voxel_mm) & tissue))
        lesion_masks = {}
        for les, roi, ring in rois:
            lesion_masks[f"lesion:{les.name}"] = roi
            lesion_masks[f"lesion_background:{les.name}"] = ring & (frac_all == 0) & (frac_nuc == 0)

    wm_mask = ndimage.binary_erosion(wm_f > 0.9, iterations=1) & ~near_lesion & ~nuclei_near
    gm_mask = (gm_f > 0.6) & (frac_nuc == 0) & (frac_all == 0)
    masks = {
        "brain": brain_f > 0.5,
        "gm": gm_mask,
        "wm": wm_mask,
        "nuclei": frac_nuc >= 0.5,
        "nucleus_left": frac_left >= 0.5,
        "nucleus_right": frac_right >= 0.5,
        "valley": valley,
        "lesions": frac_all > 0,
        **lesion_masks,
    }
    for name, m in masks.items():
        if not m.any():
            raise PhantomError(f"voxel_mm={voxel_mm}: ROI {name!r} came out empty")
        m.setflags(write=False)
    activity = activity.astype(np.float32)
    mr = mr.astype(np.float32)
    activity.setflags(write=False)
    mr.setflags(write=False)
    logger.debug("phantom %s at %.1f mm, %d lesion(s)", shape, voxel_mm, max(len(placed), 1))
    return Phantom(activity=activity, mr=mr, spacing=tuple(float(s) for s in spacing),
                   masks=masks, origin_lps=origin_lps,
                   lesions=tuple((les, tuple(float(v) for v in c)) for les, c in placed),
                   region=region)
