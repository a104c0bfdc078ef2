"""Acceptance test of the method on the phantom at 1/10 dose (the issue's three claims).

A 4 mm phantom is reconstructed whole (OSEM, 4 iterations x 16 subsets, 1/10 of full dose),
then SDIP runs on a crop holding the midbrain nuclei, the valley and the white-matter lesion
with its background shell, so that the fit takes about a minute on two CPU cores.

Claims (Hashimoto et al. 2025):
1. SDIP (alpha 0.6) has lower white-matter noise than OSEM.
2. SDIP has a higher nuclei peak-to-valley ratio than OSEM + Gaussian at equal WM noise. The
   Gaussian's WM noise is not monotone in FWHM (past a point grey matter spills into the WM
   ROI), so we bisect on the falling branch; if no Gaussian gets as quiet as SDIP, we compare
   with the quietest Gaussian, which is blurred less than an equal-noise one would need to be
   and so is the Gaussian's best case for peak-to-valley.
3. SDIP keeps the MR-invisible lesion's contrast at least as well as plain conditional DIP
   (alpha 0: the same fit, blended with alpha 0): not below cDIP's by more than 0.1 (see the
   test for why a tolerance), and at least 80 % of the OSEM image's.

Measured with the paper's SDIP (now ``sdip-paper``; the test runs ``sdip``, which adds the
data-consistency guard and blends the mean of the sampled outputs, see bench/FIDELITY.md
for both measured side by side) (noise seeds 0 / 1 / 2): WM std OSEM 579 / 657 / 599, SDIP 263 / 365 / 170 Bq/ml;
PVR SDIP 1.94 / 1.67 / 2.13 vs equal-noise Gaussian 1.38 / 1.42 / 1.40; lesion contrast
OSEM 0.51 / 0.68 / 0.59, SDIP 0.55 / 0.67 / -0.14, cDIP 0.59 / 0.68 / -0.21. The test runs
seed 0. Seed 2 shows the short fit's limit: the 20-epoch network never fits the lesion, so
it is *stable* there (S_norm 0.08), and SDIP loses the lesion with cDIP. With 40 epochs
seed 2 gives lesion SDIP 0.49, cDIP 0.43, S_norm 0.87 (about twice the run time).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from dipnode.models.denoise import denoise  # noqa: E402
from dipnode.models.gaussian import gaussian_filter_fwhm  # noqa: E402
from dipnode.models.metrics import lesion_contrast, peak_to_valley, wm_noise  # noqa: E402
from dipnode.models.params import preset  # noqa: E402
from dipnode.models.stability import blend  # noqa: E402
from dipnode.sim.pet_sim import simulate_osem  # noqa: E402
from dipnode.sim.phantom import make_phantom  # noqa: E402

DOSE = 0.1
# Small and quick, tuned on this crop: 20 L-BFGS epochs of 8 inner iterations, stability from
# epoch 10 on every epoch (11 samples), a 2-level U-Net 4 channels wide.
PARAMS = preset("tiny").replace(epochs=20, sample_from=10, sample_every=1, max_iter=8,
                                base_channels=4, depth=2, alpha=0.6, seed=0, device="cpu")


@dataclass(frozen=True)
class Case:
    osem_full: np.ndarray  # whole-volume OSEM, for the Gaussian (filter before cropping)
    box: tuple[slice, slice, slice]
    osem: np.ndarray
    mr: np.ndarray
    masks: dict[str, np.ndarray]
    spacing: tuple[float, float, float]


@pytest.fixture(scope="module")
def two_threads() -> Iterator[None]:
    # The CPU fit is bit-identical for a seed *and thread count*: pin it, then restore.
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def case() -> Case:
    p = make_phantom(4.0)
    osem_full = simulate_osem(p.activity, DOSE, iterations=4, subsets=16, seed=0)
    roi = p.masks["nuclei"] | p.masks["valley"] | p.masks["lesion_background"] | p.masks["lesion"]
    idx = np.argwhere(roi)
    lo = np.maximum(idx.min(0) - 3, 0)
    hi = np.minimum(idx.max(0) + 4, p.shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    masks = {k: v[box] for k, v in p.masks.items()}
    return Case(osem_full, box, np.ascontiguousarray(osem_full[box]),
                np.ascontiguousarray(p.mr[box]), masks, p.spacing)


@pytest.fixture(scope="module")
def sdip(case: Case, two_threads: None):  # noqa: ANN201 - DenoiseResult
    return denoise(case.osem, case.mr, case.spacing, PARAMS, method="sdip")


def _pvr(img: np.ndarray, masks: dict[str, np.ndarray]) -> float:
    return peak_to_valley(img, (masks["nucleus_left"], masks["nucleus_right"]), masks["valley"])


def _gauss_noise(case: Case, fwhm: float) -> float:
    return wm_noise(gaussian_filter_fwhm(case.osem_full, fwhm)[case.box], case.masks["wm"]).std


def _matching_fwhm(case: Case, target_std: float) -> float:
    """FWHM (voxels) whose WM noise equals ``target_std`` on the falling branch, by bisection."""
    grid = np.arange(0.0, 4.01, 0.25)
    noise = [_gauss_noise(case, f) for f in grid]
    f_quiet = float(grid[int(np.argmin(noise))])
    if min(noise) >= target_std:
        return f_quiet  # no Gaussian is as quiet as SDIP: use the quietest (see module doc)
    lo, hi = 0.0, f_quiet  # noise(lo) > target >= noise(hi); noise falls on [0, f_quiet]
    for _ in range(30):
        mid = 0.5 * (lo + hi)
        if _gauss_noise(case, mid) > target_std:
            lo = mid
        else:
            hi = mid
    return hi


@pytest.mark.slow
@pytest.mark.timeout(600)  # ~70 s alone; generous for a shared, loaded CI runner
def test_sdip_lowers_white_matter_noise(case: Case, sdip) -> None:  # noqa: ANN001
    wm = case.masks["wm"]
    assert sdip.denoised.shape == case.osem.shape
    osem_noise = wm_noise(case.osem, wm)
    sdip_noise = wm_noise(sdip.denoised, wm)
    assert sdip_noise.std < 0.7 * osem_noise.std, (sdip_noise, osem_noise)
    # and it does so without shifting the WM level (bias against OSEM within 10 %)
    assert sdip_noise.mean == pytest.approx(osem_noise.mean, rel=0.1)


@pytest.mark.slow
@pytest.mark.timeout(600)  # ~70 s alone; generous for a shared, loaded CI runner
def test_sdip_beats_gaussian_of_equal_noise_on_peak_to_valley(case: Case, sdip) -> None:  # noqa: ANN001
    target = wm_noise(sdip.denoised, case.masks["wm"]).std
    fwhm = _matching_fwhm(case, target)
    assert fwhm > 0.5  # a real filter, not the raw OSEM
    gauss = gaussian_filter_fwhm(case.osem_full, fwhm)[case.box]
    assert wm_noise(gauss, case.masks["wm"]).std >= 0.98 * target  # never quieter than SDIP
    pvr_sdip, pvr_gauss = _pvr(sdip.denoised, case.masks), _pvr(gauss, case.masks)
    assert pvr_sdip > 1.05 * pvr_gauss, (pvr_sdip, pvr_gauss, fwhm)
    # the stability map is why: the nuclei are unstable, WM is stable
    s = sdip.stability_norm
    assert s[case.masks["nuclei"]].mean() > 2 * s[case.masks["wm"]].mean()


@pytest.mark.slow
@pytest.mark.timeout(600)  # ~70 s alone; generous for a shared, loaded CI runner
def test_sdip_keeps_mr_invisible_lesion_at_least_as_well_as_cdip(case: Case, sdip) -> None:  # noqa: ANN001
    les, bg = case.masks["lesion"], case.masks["lesion_background"]
    cdip, _ = blend(case.osem, sdip.dip, sdip.stability, 0.0)
    assert np.allclose(cdip, sdip.dip, rtol=1e-5, atol=1e-3)  # alpha 0 is plain conditional DIP
    c_sdip = lesion_contrast(sdip.denoised, les, bg)
    c_cdip = lesion_contrast(cdip, les, bg)
    c_osem = lesion_contrast(case.osem, les, bg)
    assert c_osem > 0.2  # the lesion is visible in the OSEM image
    # At least cDIP's contrast, up to 0.1: in one noise realisation of a 7-voxel lesion cDIP
    # can land above the OSEM value (seed 0: OSEM 0.51, cDIP 0.59, SDIP 0.55), and a blend
    # towards OSEM then lowers it a little.
    assert c_sdip >= c_cdip - 0.1, (c_sdip, c_cdip, c_osem)
    assert c_sdip > 0.8 * c_osem, (c_sdip, c_osem)
    # the mechanism: the network is unstable at the lesion, so the blend keeps OSEM there
    s = sdip.stability_norm
    assert s[les].mean() > 2 * s[case.masks["wm"]].mean()
