"""MR -> PET alignment on the MNI152 template shipped inside nilearn (no network).

PET: an FDG-like 4*GM + WM phantom, smoothed, on a 4 mm grid. MR: the 2 mm T1 template. To give
the MR its own frame of reference its pixels stay and its affine moves by a known rigid G, so
the PET -> MR transform to recover is exactly G.
"""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from nilearn.datasets import load_mni152_gm_template, load_mni152_template, load_mni152_wm_template
from scipy import ndimage

from dipnode.models.align import (
    AlignedMr,
    AlignmentError,
    RigidResult,
    affine_from_image,
    align_mr_to_pet,
    image_from_array,
    overlap_fraction,
    register_rigid,
    resample_to_grid,
)

pytestmark = pytest.mark.timeout(120)


def _rot(deg_x: float, deg_y: float, deg_z: float) -> np.ndarray:
    x, y, z = np.radians([deg_x, deg_y, deg_z])
    rx = np.array([[1, 0, 0], [0, np.cos(x), -np.sin(x)], [0, np.sin(x), np.cos(x)]])
    ry = np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])
    rz = np.array([[np.cos(z), -np.sin(z), 0], [np.sin(z), np.cos(z), 0], [0, 0, 1]])
    return rz @ rx @ ry


def _rigid(deg: tuple[float, float, float], shift: tuple[float, float, float]) -> np.ndarray:
    g = np.eye(4)
    g[:3, :3] = _rot(*deg)
    g[:3, 3] = shift
    return g


def _to_ours(img) -> tuple[np.ndarray, np.ndarray]:
    """nibabel (i, j, k) RAS -> our (k, j, i) array and LPS affine."""
    arr = np.asarray(img.get_fdata(), np.float32).transpose(2, 1, 0).copy()
    aff = np.asarray(img.affine, np.float64).copy()
    aff[:2] *= -1  # RAS -> LPS: x and y change sign
    return arr, aff


@pytest.fixture(scope="module")
def brain() -> dict[str, np.ndarray]:
    mr, mr_aff = _to_ours(load_mni152_template(resolution=2))
    gm, _ = _to_ours(load_mni152_gm_template(resolution=2))
    wm, _ = _to_ours(load_mni152_wm_template(resolution=2))
    pet = ndimage.gaussian_filter(4.0 * gm + wm, 1.5)[::2, ::2, ::2].copy()
    pet_aff = mr_aff.copy()
    pet_aff[:3, :3] *= 2.0  # every second voxel: PET voxel (i, j, k) sits on MNI voxel (2i, 2j, 2k)
    return {"mr": mr, "mr_aff": mr_aff, "pet": pet, "pet_aff": pet_aff}


def _brain_points(brain: dict[str, np.ndarray]) -> np.ndarray:
    pet = brain["pet"]
    kji = np.argwhere(pet > 0.1 * np.percentile(pet[pet > 0], 99))
    ijk1 = np.c_[kji[:, ::-1], np.ones(len(kji))]
    return ijk1 @ brain["pet_aff"].T


def _errors(brain: dict[str, np.ndarray], found: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Max displacement (mm) over brain points and residual rotation angle (deg)."""
    pts = _brain_points(brain)
    disp = np.linalg.norm(pts @ found.T - pts @ truth.T, axis=1).max()
    r = found[:3, :3] @ truth[:3, :3].T
    angle = np.degrees(np.arccos(np.clip((np.trace(r) - 1) / 2, -1.0, 1.0)))
    return float(disp), float(angle)


# --- affine <-> SimpleITK ---------------------------------------------------------------------

def _oblique_affine() -> np.ndarray:
    """Rotated, anisotropic, left-handed (one flipped axis) affine: every conversion bug shows."""
    a = np.eye(4)
    a[:3, :3] = _rot(20, -35, 50) @ np.diag([0.8, -1.3, 2.5])
    a[:3, 3] = [-101.5, 37.25, 12.0]
    return a


def test_index_to_physical_point_matches_affine():
    aff = _oblique_affine()
    values = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)  # (k, j, i)
    img = image_from_array(values, aff)
    assert img.GetSize() == (6, 5, 4)  # SimpleITK's (i, j, k)
    for ijk in [(0, 0, 0), (5, 0, 0), (0, 4, 0), (0, 0, 3), (2, 3, 1), (5, 4, 3)]:
        expected = aff @ np.array([*ijk, 1.0])
        np.testing.assert_allclose(img.TransformIndexToPhysicalPoint(ijk), expected[:3], atol=1e-9)
        # the voxel at that index is the array's [k, j, i]
        assert img[ijk] == values[ijk[2], ijk[1], ijk[0]]
    np.testing.assert_allclose(affine_from_image(img), aff, atol=1e-12)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), values)


@pytest.mark.parametrize("bad,match", [
    (np.diag([1.0, 1.0, 1.0, 2.0]), "last row"),
    (np.eye(3), "4x4"),
    (np.array([[1, 0.3, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]]), "orthogonal"),
    (np.diag([1.0, 0.0, 1.0, 1.0]), "non-zero voxel"),
])
def test_bad_affines_are_named(bad, match):
    with pytest.raises(ValueError, match=match):
        image_from_array(np.zeros((2, 2, 2), np.float32), bad)


def test_bad_arrays_and_options_are_named():
    with pytest.raises(ValueError, match="3-D"):
        image_from_array(np.zeros((2, 2), np.float32), np.eye(4))
    with pytest.raises(ValueError, match="non-finite"):
        image_from_array(np.full((2, 2, 2), np.nan, np.float32), np.eye(4))
    with pytest.raises(ValueError, match="interpolation"):
        resample_to_grid(np.zeros((2, 2, 2)), np.eye(4), (2, 2, 2), np.eye(4), interpolation="cubic")
    with pytest.raises(ValueError, match="initial"):
        register_rigid(np.ones((4, 4, 4)), np.eye(4), np.ones((4, 4, 4)), np.eye(4), initial="centre")
    with pytest.raises(ValueError, match="mr_affine"):
        align_mr_to_pet(np.ones((4, 4, 4)), np.eye(3), np.ones((4, 4, 4)), np.eye(4),
                        same_frame_of_reference=True)
    with pytest.raises(ValueError, match="min_overlap"):
        align_mr_to_pet(np.ones((4, 4, 4)), np.eye(4), np.ones((4, 4, 4)), np.eye(4),
                        same_frame_of_reference=True, min_overlap=0.0)


# --- resampling -------------------------------------------------------------------------------

def test_identity_geometry_gives_back_the_array():
    rng = np.random.default_rng(1)
    values = rng.random((7, 8, 9)).astype(np.float32)
    aff = _oblique_affine()
    out = resample_to_grid(values, aff, values.shape, aff)
    assert out.dtype == np.float32 and out.shape == values.shape
    np.testing.assert_allclose(out, values, atol=1e-5)


def test_grid_shifted_by_one_column_reads_the_next_column():
    rng = np.random.default_rng(2)
    values = rng.random((5, 6, 7)).astype(np.float32)
    aff = _oblique_affine()
    target = aff.copy()
    target[:3, 3] += aff[:3, 0]  # origin one voxel along i
    out = resample_to_grid(values, aff, values.shape, target, default=-1.0)
    np.testing.assert_allclose(out[:, :, :-1], values[:, :, 1:], atol=1e-5)
    np.testing.assert_array_equal(out[:, :, -1], -1.0)  # outside the moving field of view
    # half a voxel along j with linear interpolation: the mean of neighbouring rows
    half = aff.copy()
    half[:3, 3] += 0.5 * aff[:3, 1]
    out = resample_to_grid(values, aff, (5, 5, 7), half)
    np.testing.assert_allclose(out, 0.5 * (values[:, :-1, :] + values[:, 1:, :]), atol=1e-5)


def test_transform_maps_target_points_to_moving_points():
    rng = np.random.default_rng(3)
    values = rng.random((5, 6, 7)).astype(np.float32)
    aff = _oblique_affine()
    t = np.eye(4)
    t[:3, 3] = 2 * aff[:3, 2]  # target point p reads the moving image at p + two slices
    out = resample_to_grid(values, aff, values.shape, aff, transform=t)
    np.testing.assert_allclose(out[:-2], values[2:], atol=1e-5)
    np.testing.assert_array_equal(out[-2:], 0.0)


def test_reoriented_storage_resamples_to_the_same_image(brain):
    """A sagittally stored, flipped copy of the MR (other array order, other affine) is the same
    object in patient space, so it must land on the PET grid identically."""
    mr, aff = brain["mr"], brain["mr_aff"]
    # new array axes (k', j', i') = (i, k reversed, j); index of old axis: i = k', j = i', k = n-1-j'
    stored = np.ascontiguousarray(mr.transpose(2, 0, 1)[:, ::-1, :])
    nk = mr.shape[0]
    perm = np.zeros((4, 4))
    perm[0, 2] = 1.0             # old i = new k
    perm[1, 0] = 1.0             # old j = new i
    perm[2, 1], perm[2, 3] = -1.0, nk - 1  # old k = nk - 1 - new j
    perm[3, 3] = 1.0
    stored_aff = aff @ perm
    direct = resample_to_grid(mr, aff, brain["pet"].shape, brain["pet_aff"])
    via = resample_to_grid(stored, stored_aff, brain["pet"].shape, brain["pet_aff"])
    np.testing.assert_allclose(via, direct, atol=1e-4)
    assert direct.max() > 0.5  # the comparison is not between two empty volumes


# --- registration -----------------------------------------------------------------------------

@pytest.mark.parametrize("initial,deg,shift", [
    ("geometry", (5, -3, 4), (10, -6, 8)),
    ("moments", (5, -3, 4), (120, -80, 200)),  # own frame of reference, far from the PET
])
def test_rigid_registration_recovers_known_transform(brain, initial, deg, shift):
    truth = _rigid(deg, shift)
    res = register_rigid(brain["pet"], brain["pet_aff"], brain["mr"], truth @ brain["mr_aff"],
                         initial=initial)
    assert isinstance(res, RigidResult)
    disp, angle = _errors(brain, res.matrix, truth)
    assert disp < 1.0, f"max displacement {disp:.2f} mm"
    assert angle < 1.0, f"residual rotation {angle:.2f} deg"
    np.testing.assert_allclose(res.rotation_deg, deg, atol=1.0)
    assert res.metric_value < res.initial_metric_value < 0
    assert res.overlap_fraction == pytest.approx(1.0)
    assert res.iterations > 0 and res.stop_condition


def test_registration_is_deterministic(brain):
    moving_aff = _rigid((5, -3, 4), (10, -6, 8)) @ brain["mr_aff"]
    a = register_rigid(brain["pet"], brain["pet_aff"], brain["mr"], moving_aff, sampling=5000)
    b = register_rigid(brain["pet"], brain["pet_aff"], brain["mr"], moving_aff, sampling=5000)
    np.testing.assert_array_equal(a.matrix, b.matrix)
    assert a.metric_value == b.metric_value


# --- the stage --------------------------------------------------------------------------------

def test_same_frame_resamples_only(brain):
    out = align_mr_to_pet(brain["mr"], brain["mr_aff"], brain["pet"], brain["pet_aff"],
                          same_frame_of_reference=True)
    assert isinstance(out, AlignedMr) and out.method == "resample" and out.metric is None
    np.testing.assert_array_equal(out.transform, np.eye(4))
    # PET voxel (i, j, k) is MNI voxel (2i, 2j, 2k): resampling is exact there
    np.testing.assert_allclose(out.values, brain["mr"][::2, ::2, ::2], atol=1e-5)
    assert out.values.dtype == np.float32 and out.overlap_fraction == 1.0


def test_other_frame_registers_then_resamples(brain):
    truth = _rigid((5, -3, 4), (120, -80, 200))
    out = align_mr_to_pet(brain["mr"], truth @ brain["mr_aff"], brain["pet"], brain["pet_aff"],
                          same_frame_of_reference=False)
    assert out.method == "rigid" and out.metric is not None and out.metric < -0.1
    disp, _ = _errors(brain, out.transform, truth)
    assert disp < 1.0
    expected = brain["mr"][::2, ::2, ::2]
    support = brain["pet"] > 0.1 * brain["pet"].max()
    err = np.abs(out.values - expected)[support]
    assert np.median(err) < 0.05 * expected[support].mean()


def test_partial_coverage_is_refused(brain):
    top = brain["mr"][70:]  # the top 50 of 95 axial MR slices: the same frame, too little brain
    aff = brain["mr_aff"].copy()
    aff[:3, 3] = (brain["mr_aff"] @ [0, 0, 70, 1])[:3]
    frac = overlap_fraction(brain["pet"] > 0.1 * np.percentile(brain["pet"][brain["pet"] > 0], 99),
                            brain["pet_aff"], top.shape, aff)
    assert 0.0 < frac < 0.5
    with pytest.raises(AlignmentError, match="overlap"):
        align_mr_to_pet(top, aff, brain["pet"], brain["pet_aff"], same_frame_of_reference=True)
    # the same volume is accepted when the caller allows that little coverage
    out = align_mr_to_pet(top, aff, brain["pet"], brain["pet_aff"], same_frame_of_reference=True,
                          min_overlap=frac / 2)
    assert out.overlap_fraction == pytest.approx(frac)


def test_far_away_mr_without_moments_is_refused(brain):
    far = _rigid((0, 0, 0), (400, 0, 0)) @ brain["mr_aff"]
    with pytest.raises(AlignmentError, match="initial alignment .geometry. cannot be evaluated"):
        align_mr_to_pet(brain["mr"], far, brain["pet"], brain["pet_aff"],
                        same_frame_of_reference=False, initial="geometry")


def test_noise_mr_is_refused(brain):
    noise = np.random.default_rng(0).random((48, 59, 50)).astype(np.float32)
    with pytest.raises(AlignmentError, match="max_metric"):
        align_mr_to_pet(noise, brain["pet_aff"], brain["pet"], brain["pet_aff"],
                        same_frame_of_reference=False)
