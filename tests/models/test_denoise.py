"""The engine's entry point: method dispatch, the SDIP blend, the Gaussian baseline, validation."""
import math

import numpy as np
import pytest

from dipnode.models.denoise import DenoiseInputError, DenoiseResult, denoise
from dipnode.models.gaussian import FWHM_PER_SIGMA, gaussian_filter_fwhm
from dipnode.models.params import DipParams, Method, preset
from dipnode.models.guard import GuardParams, data_guard
from dipnode.models.stability import blend, blend_weight

PARAMS = preset("tiny").replace(max_iter=4, device="cpu")
SPACING = (2.0, 2.5, 2.5)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/models/conftest.py


def phantom(shape=(8, 10, 12)):
    rng = np.random.default_rng(3)
    k, j, i = np.indices(shape)
    blob = ((k - 4) ** 2 + (j - 5) ** 2 + (i - 6) ** 2 < 8).astype(np.float32)
    mr = (500 + 300 * blob).astype(np.float32)
    pet = (rng.poisson(30 * (3 * blob + 1)) * 100.0).astype(np.float32)
    return pet, mr


@pytest.fixture(scope="module")
def results():
    pet, mr = phantom()
    return {
        "sdip": denoise(pet, mr, SPACING, PARAMS, snapshot_epochs=(4,)),
        "paper": denoise(pet, mr, SPACING, PARAMS, method="sdip-paper"),
        "cdip": denoise(pet, mr, SPACING, PARAMS, method="cdip"),
        "sdip0": denoise(pet, mr, SPACING, PARAMS.replace(alpha=0.0), method=Method.SDIP_PAPER),
        "pet": pet,
        "mr": mr,
    }


def test_sdip_paper_is_the_blend_of_pet_and_the_last_output_with_alpha(results):
    r, pet = results["paper"], results["pet"]
    assert isinstance(r, DenoiseResult) and r.method is Method.SDIP_PAPER
    expected, s_norm = blend(pet, r.dip, r.stability, PARAMS.alpha)
    assert np.array_equal(r.denoised, expected)
    assert np.array_equal(r.stability_norm, s_norm)
    assert r.network_image is r.dip and r.guard is None
    assert np.array_equal(r.data_weight, s_norm)
    # the same fit as SDIP's (same seed): only the post-fit steps differ
    assert np.array_equal(r.dip, results["sdip"].dip)


def test_sdip_blends_the_sample_mean_with_the_guarded_weight(results):
    r, pet = results["sdip"], results["pet"]
    assert isinstance(r, DenoiseResult) and r.method is Method.SDIP
    assert PARAMS.average and not np.array_equal(r.network_image, r.dip)
    _, s_norm = blend(pet, r.dip, r.stability, PARAMS.alpha)
    assert np.array_equal(r.stability_norm, s_norm)
    g = data_guard(pet, r.network_image, SPACING, GuardParams(fwe=PARAMS.guard_fwe)).weight
    assert np.array_equal(r.guard, g)
    assert np.array_equal(r.data_weight, np.maximum(s_norm, g))
    assert np.array_equal(r.denoised, blend_weight(pet, r.network_image, r.data_weight))
    # without averaging, the network image is the last output
    last = denoise(pet, results["mr"], SPACING, PARAMS.replace(average=False))
    assert last.network_image is last.dip
    assert np.all((r.stability_norm >= 0) & (r.stability_norm <= 1))
    assert 0 < r.stability_norm.mean() < 1  # the map really weights some voxels
    assert r.denoised.dtype == np.float32 and r.denoised.shape == pet.shape
    assert r.spacing == SPACING and r.params == PARAMS and r.device == "cpu"
    assert {"total", "fit", "per_epoch", "blend"} <= set(r.timings)
    assert sorted(r.snapshots) == [4] and len(r.loss_history) == PARAMS.epochs


def test_cdip_is_the_dip_output_and_sdip_alpha0_equals_it(results):
    c = results["cdip"]
    assert c.method is Method.CDIP and c.stability_norm is None
    assert np.array_equal(c.denoised, c.dip)
    assert c.stability is not None  # still reported for the record
    # Same seed: same fit; alpha = 0 makes the paper's SDIP plain conditional DIP, bit for bit.
    assert np.array_equal(results["sdip"].dip, c.dip)
    assert np.array_equal(results["sdip0"].denoised, c.denoised)


def test_gaussian_needs_no_mr_and_keeps_total_activity():
    pet, _ = phantom()
    r = denoise(pet, None, SPACING, PARAMS.replace(fwhm_voxels=3.0), method="gaussian")
    assert r.method is Method.GAUSSIAN and r.dip is None and r.stability is None
    assert r.loss_history == () and r.snapshots == {} and "total" in r.timings
    assert r.denoised.std() < pet.std()
    assert math.isclose(float(r.denoised.sum(dtype=np.float64)), float(pet.sum(dtype=np.float64)), rel_tol=1e-5)


def test_gaussian_fwhm_zero_is_a_copy():
    pet, _ = phantom()
    out = gaussian_filter_fwhm(pet, 0)
    assert np.array_equal(out, pet) and out is not pet and not np.shares_memory(out, pet)


def test_gaussian_fwhm_sets_sigma_and_anisotropy_filters_one_axis():
    vol = np.zeros((41, 9, 9), np.float32)
    vol[20, 4, 4] = 1.0
    out = gaussian_filter_fwhm(vol, (6.0, 0.0, 0.0))
    assert np.count_nonzero(out[:, [0, 1, 2, 3, 5, 6, 7, 8], :]) == 0  # nothing leaks along rows
    profile = out[:, 4, 4].astype(np.float64)
    z = np.arange(41) - 20
    sigma = math.sqrt((profile * z**2).sum() / profile.sum())
    assert sigma == pytest.approx(6.0 / FWHM_PER_SIGMA, rel=0.02)
    assert FWHM_PER_SIGMA == pytest.approx(2.3548, abs=1e-4)


@pytest.mark.parametrize("fwhm", [-1.0, (1.0, 2.0), math.nan])
def test_gaussian_bad_fwhm_is_named(fwhm):
    with pytest.raises(ValueError, match="fwhm_voxels"):
        gaussian_filter_fwhm(np.zeros((3, 3, 3)), fwhm)


def test_bad_inputs_are_named():
    pet, mr = phantom()
    with pytest.raises(DenoiseInputError, match="mr: expected an MR volume.*'sdip'"):
        denoise(pet, None, SPACING, PARAMS)
    with pytest.raises(DenoiseInputError, match="mr: expected an MR volume.*'cdip'"):
        denoise(pet, None, SPACING, PARAMS, method="cdip")
    with pytest.raises(DenoiseInputError, match=r"mr: expected the PET's shape \(8, 10, 12\), got \(8, 10, 11\)"):
        denoise(pet, mr[..., :11], SPACING, PARAMS)
    bad = pet.copy()
    bad[0, 0, 0] = np.inf
    with pytest.raises(DenoiseInputError, match="pet: expected finite values, got 1 NaN/inf"):
        denoise(bad, mr, SPACING, PARAMS)
    bad_mr = mr.copy()
    bad_mr[2, 2, 2] = np.nan
    with pytest.raises(DenoiseInputError, match="mr: expected finite"):
        denoise(pet, bad_mr, SPACING, PARAMS)
    with pytest.raises(DenoiseInputError, match="pet: expected a 3-D array"):
        denoise(pet[None], mr[None], SPACING, PARAMS)
    for spacing in [(2.0, 2.0), (2.0, 0.0, 2.0), (2.0, -1.0, 2.0), ("a", 1, 1)]:
        with pytest.raises(DenoiseInputError, match="spacing"):
            denoise(pet, mr, spacing, PARAMS)
    with pytest.raises(DenoiseInputError, match="method: expected one of"):
        denoise(pet, mr, SPACING, PARAMS, method="median")
    with pytest.raises(DenoiseInputError, match="params: expected DipParams"):
        denoise(pet, mr, SPACING, {"epochs": 3})  # type: ignore[arg-type]
    assert isinstance(PARAMS, DipParams)
