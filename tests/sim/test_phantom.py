"""The MNI152 phantom: ROIs, the features the MR must not show, orientation and resampling."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from dipnode.dicom_io.volume import Geometry
from dipnode.sim.phantom import (
    FIDELITY_LESIONS,
    FIDELITY_REGION_MNI,
    GM_ACTIVITY,
    WM_ACTIVITY,
    Lesion,
    Phantom,
    PhantomError,
    make_phantom,
    phantom_affine,
    region_box,
)

ROIS = ("brain", "gm", "wm", "nuclei", "nucleus_left", "nucleus_right", "valley", "lesion",
        "lesion_background")


@pytest.fixture(scope="module")
def p4() -> Phantom:
    return make_phantom(4.0)


@pytest.fixture(scope="module")
def p2() -> Phantom:
    return make_phantom(2.0)


def _shell(mask: np.ndarray, inner: int, outer: int) -> np.ndarray:
    return ndimage.binary_dilation(mask, iterations=outer) & ~ndimage.binary_dilation(mask, iterations=inner)


@pytest.mark.parametrize("name", ["p2", "p4"])
def test_masks_non_empty_and_disjoint(name: str, request: pytest.FixtureRequest) -> None:
    p: Phantom = request.getfixturevalue(name)
    for roi in ROIS:
        m = p.masks[roi]
        assert m.dtype == bool and m.shape == p.shape
        assert m.any(), roi
    disjoint = [("gm", "wm"), ("nucleus_left", "nucleus_right"), ("nuclei", "valley"),
                ("lesion", "lesion_background"), ("lesion", "wm"), ("nuclei", "wm"),
                ("lesion_background", "nuclei")]
    for a, b in disjoint:
        assert not (p.masks[a] & p.masks[b]).any(), (a, b)
    assert np.array_equal(p.masks["nuclei"], p.masks["nucleus_left"] | p.masks["nucleus_right"])
    for roi in ROIS[1:]:
        # every ROI lies in the brain (or, for WM shells, almost entirely)
        assert (p.masks[roi] & p.masks["brain"]).sum() >= 0.9 * p.masks[roi].sum(), roi


@pytest.mark.parametrize("name", ["p2", "p4"])
def test_activity_levels(name: str, request: pytest.FixtureRequest) -> None:
    p: Phantom = request.getfixturevalue(name)
    assert p.activity.dtype == np.float32 and p.mr.dtype == np.float32
    assert p.activity.min() >= 0
    wm = p.activity[p.masks["wm"]].mean()
    gm = p.activity[p.masks["gm"]].mean()
    assert wm == pytest.approx(WM_ACTIVITY, rel=0.1)
    assert 0.7 * GM_ACTIVITY < gm < GM_ACTIVITY
    # 0 outside the head: the corners of the cropped box are air
    assert p.activity[0, 0, 0] == 0 and p.activity[-1, -1, -1] == 0


@pytest.mark.parametrize("name", ["p2", "p4"])
def test_nuclei_hot_in_pet_but_weak_in_mr(name: str, request: pytest.FixtureRequest) -> None:
    p: Phantom = request.getfixturevalue(name)
    nuc, val = p.masks["nuclei"], p.masks["valley"]
    around = _shell(nuc, 1, 2) & ~val

    def contrast(img: np.ndarray, ref_mask: np.ndarray) -> float:
        return img[nuc].mean() / img[ref_mask].mean() - 1.0

    assert contrast(p.activity, val) > 0.8
    assert contrast(p.activity, around) > 0.5
    # the MR shows at most a weak difference (intrinsic midbrain T1 contrast, not the nuclei)
    assert abs(contrast(p.mr, around)) < 0.1
    assert abs(contrast(p.mr, val)) < 0.15
    # left is the patient's left: +x in LPS, i.e. larger column index
    il = np.argwhere(p.masks["nucleus_left"])[:, 2].mean()
    ir = np.argwhere(p.masks["nucleus_right"])[:, 2].mean()
    assert il > ir


@pytest.mark.parametrize("name", ["p2", "p4"])
def test_lesion_hot_in_pet_absent_from_mr(name: str, request: pytest.FixtureRequest) -> None:
    p: Phantom = request.getfixturevalue(name)
    les, bg = p.masks["lesion"], p.masks["lesion_background"]
    assert p.activity[les].mean() / p.activity[bg].mean() > 1.8
    assert abs(p.mr[les].mean() / p.mr[bg].mean() - 1.0) < 0.03
    # lesion diameter 10 mm: volume ~524 mm^3
    vox = float(np.prod(p.spacing))
    assert 250 < les.sum() * vox < 900


def test_orientation_axial_lps(p2: Phantom) -> None:
    aff = phantom_affine(p2)
    geom = Geometry(shape=p2.shape, affine=aff)
    assert geom.spacing == p2.spacing == (2.0, 2.0, 2.0)
    assert np.allclose(geom.direction, np.eye(3))
    # superior is +k: the lesion (centrum semiovale, above the AC) has a larger k than the
    # midbrain nuclei (below the AC)
    assert np.argwhere(p2.masks["lesion"])[:, 0].mean() > np.argwhere(p2.masks["nuclei"])[:, 0].mean()
    # MNI origin (anterior commissure) is inside the brain near the grid's centre
    centre = np.linalg.solve(aff, [0, 0, 0, 1])[:3]  # (i, j, k)
    i, j, k = np.round(centre).astype(int)
    assert p2.masks["brain"][k, j, i]
    # posterior is +j: the midbrain lies posterior of the AC, i.e. at larger j
    assert np.argwhere(p2.masks["nuclei"])[:, 1].mean() > j


def test_resampling_preserves_activity_and_geometry(p2: Phantom, p4: Phantom) -> None:
    # the same patient point maps to the same anatomy on both grids
    a2, a4 = phantom_affine(p2), phantom_affine(p4)
    c2 = np.argwhere(p2.masks["nuclei"]).mean(0)[::-1]  # (i, j, k)
    c4 = np.argwhere(p4.masks["nuclei"]).mean(0)[::-1]
    assert np.allclose((a2 @ [*c2, 1])[:3], (a4 @ [*c4, 1])[:3], atol=2.5)
    # block averaging keeps the total activity (up to the crop margin, which is zero activity)
    assert p4.activity.sum() * 8 == pytest.approx(p2.activity.sum(), rel=0.02)
    assert p4.shape[0] < p2.shape[0] / 1.8


def test_deterministic_and_seeded(p4: Phantom) -> None:
    again = make_phantom(4.0)
    assert np.array_equal(again.activity, p4.activity)
    other = make_phantom(4.0, seed=3)
    assert other.masks["lesion"].any()
    assert not np.array_equal(other.masks["lesion"], p4.masks["lesion"])
    with pytest.raises(ValueError):
        p4.activity[0, 0, 0] = 1.0  # read-only


@pytest.mark.parametrize("kwargs", [{"voxel_mm": 3.0}, {"voxel_mm": 0.0}, {"crop_margin_vox": -1}])
def test_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(PhantomError, match=next(iter(kwargs))):
        make_phantom(**kwargs)


@pytest.fixture(scope="module")
def fidelity() -> Phantom:
    return make_phantom(2.0, lesions=FIDELITY_LESIONS, region_mni=FIDELITY_REGION_MNI)


def test_fidelity_region_is_the_48x64x64_crop_holding_nuclei_and_lesions(fidelity: Phantom) -> None:
    box = fidelity.region
    assert tuple(sl.stop - sl.start for sl in box) == (48, 64, 64)
    assert region_box(fidelity, FIDELITY_REGION_MNI) == box
    inside = np.zeros(fidelity.shape, bool)
    inside[box] = True
    for name in ("nuclei", "valley", "lesions"):
        assert (fidelity.masks[name] & ~inside).sum() == 0, name


def test_fidelity_lesions_hot_and_cold_absent_from_mr(fidelity: Phantom) -> None:
    assert len(fidelity.lesions) == 12
    assert {(les.tissue, les.hot, les.diameter_mm) for les, _ in fidelity.lesions} == {
        (t, h, d) for t in ("wm", "cortex") for h in (True, False) for d in (6.0, 8.0, 12.0)}
    vox = float(np.prod(fidelity.spacing))
    for les, _ in fidelity.lesions:
        roi = fidelity.masks[f"lesion:{les.name}"]
        bg = fidelity.masks[f"lesion_background:{les.name}"]
        assert roi.any() and bg.sum() > 100, les.name
        assert not (roi & bg).any()
        c = fidelity.activity[roi].mean() / fidelity.activity[bg].mean()
        # the uptake changes by the factor (up to partial volume at the edge and the tissue mix)
        if les.hot:
            assert c > 1 + 0.4 * (les.factor - 1), (les.name, c)
        else:
            assert c < 1 - 0.4 * (1 - les.factor), (les.name, c)
        assert abs(fidelity.mr[roi].mean() / fidelity.mr[bg].mean() - 1) < 0.06, les.name
        sphere = np.pi / 6 * les.diameter_mm ** 3
        if les.tissue == "wm":  # whole sphere in white matter: the ROI is about its volume
            assert 0.5 * sphere < roi.sum() * vox < 1.5 * sphere, les.name
            assert (roi & fidelity.masks["gm"]).sum() == 0
        else:  # the cortical ribbon: the ROI is the sphere's grey matter
            assert roi.sum() * vox < 1.5 * sphere
    # lesions and their rings stay out of the noise ROI and the nuclei
    assert not (fidelity.masks["lesions"] & fidelity.masks["wm"]).any()
    assert not (fidelity.masks["lesions"] & fidelity.masks["nuclei"]).any()


def test_lesion_arguments_checked() -> None:
    with pytest.raises(PhantomError, match="tissue"):
        Lesion("x", "csf", 6.0, 2.0)
    with pytest.raises(PhantomError, match="factor"):
        Lesion("x", "wm", 6.0, 1.0)
    with pytest.raises(PhantomError, match="region_mni"):
        make_phantom(4.0, lesions=FIDELITY_LESIONS[:1], region_mni=((0, 0), (0, 10), (0, 10)))
    with pytest.raises(PhantomError, match="no site left"):
        # a 12 mm white-matter lesion cannot fit in a 20 mm box of cortex and CSF
        make_phantom(4.0, lesions=FIDELITY_LESIONS[:1], region_mni=((50, 70), (-10, 10), (0, 20)))
