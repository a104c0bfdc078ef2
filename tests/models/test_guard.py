"""The data-consistency guard: keeps a lesion the network left out, hot and cold; quiet in noise.

The noise is PET's own: the project's simulator projects a two-tissue head (white-matter
core, grey-matter rim at four times the activity), draws Poisson counts and reconstructs by
OSEM, so the noise is correlated, skewed at low counts and its variance grows with the
activity. The network's image ``f`` is the noise-free reconstruction of the object *without*
the lesion: the case the guard exists for (a stable network that never fits an MR-invisible
lesion).
"""
from __future__ import annotations

import functools
import math

import numpy as np
import pytest
from scipy import ndimage

from dipnode.models.guard import (GuardError, GuardParams, ball_kernel, data_guard,
                                  smoothness_fwhm, threshold_for)
from dipnode.models.stability import blend_weight
from dipnode.sim.pet_sim import simulate_osem

SHAPE = (24, 40, 40)
SPACING = (2.0, 2.0, 2.0)
COUNTS = 3e6  # white-matter noise CoV ~31 %, grey matter ~20 % per voxel
CENTRE = np.array([12, 19, 12])  # in the white-matter core


def _radius() -> np.ndarray:
    _, j, i = np.indices(SHAPE)
    return np.sqrt((j - 19.5) ** 2 + (i - 19.5) ** 2)


def truth() -> np.ndarray:
    r = _radius()
    return (np.where(r < 13, 2500.0, 0.0) + np.where((r >= 13) & (r < 17), 10000.0, 0.0)).astype(np.float32)


def osem(activity: np.ndarray, seed: int | None) -> np.ndarray:
    return simulate_osem(activity, 1.0, counts_full=COUNTS, iterations=4, subsets=8,
                         seed=seed or 0, poisson=seed is not None)


@functools.lru_cache(maxsize=1)
def network() -> np.ndarray:
    """f: the noise-free reconstruction of the lesion-free object."""
    return osem(truth(), None)


def ball(diameter_mm: float) -> np.ndarray:
    d = np.sqrt((((np.indices(SHAPE) - CENTRE[:, None, None, None]) * 2.0) ** 2).sum(0))
    return d <= diameter_mm / 2


def contrast(img: np.ndarray, lesion: np.ndarray, ring: np.ndarray) -> float:
    return float(img[lesion].mean() / img[ring].mean() - 1)


@pytest.mark.parametrize("factor", [2.0, 0.5], ids=["hot", "cold"])
def test_a_lesion_the_network_left_out_is_kept(factor: float) -> None:
    lesion = ball(10.0)
    ring = ball(24.0) & ~ball(16.0) & (_radius() < 12)
    t = truth()
    t[lesion] *= factor
    x0 = osem(t, 7)
    f = network()  # the network shows no lesion
    g = data_guard(x0, f, SPACING)
    assert g.weight.dtype == np.float32 and g.weight.shape == SHAPE
    assert g.weight[lesion].min() == 1.0  # every lesion voxel keeps its measured value
    x = blend_weight(x0, f, g.weight)
    c0 = contrast(x0, lesion, ring)
    assert abs(c0) > 0.3  # the lesion is there in the measured data
    # the blend keeps its contrast (the ring, mostly not kept, is the network's: unbiased)
    assert contrast(x, lesion, ring) == pytest.approx(c0, rel=0.05)
    # and the guard stays local: it keeps a lesion-sized region, not the volume
    assert (g.weight > 0).sum() < 4 * ball(15.0).sum()


def test_a_lesion_below_the_noise_is_not_claimed() -> None:
    # 6 mm, -20 %: a matched-filter SNR of about 1; indistinguishable from noise
    t = truth()
    t[ball(6.0)] *= 0.8
    assert data_guard(osem(t, 3), network(), SPACING).weight.max() == 0.0


def test_pure_noise_fires_at_most_at_the_stated_family_wise_rate() -> None:
    # FWE 0.05 per volume: in 40 noise volumes the guard may fire in about 2; 6 or more
    # would have probability < 1.5 % if the rate were right. Per voxel it must be tiny.
    # The noise is twice as strong (in sd) in the rim as in the core: a constant-noise
    # guard would fire in the rim every time.
    fired, fired_rim, voxel_rate = 0, 0, []
    rim = _radius() >= 13
    for seed in range(40):
        g = data_guard(osem(truth(), 100 + seed), network(), SPACING)
        fired += bool(g.weight.max() > 0)
        fired_rim += bool(g.weight[rim].max() > 0)
        voxel_rate.append(float(np.mean(g.weight > 0)))
        assert 4.0 < g.threshold < 6.5  # a multiple-comparison threshold, not a per-voxel one
    assert fired <= 5, fired
    assert fired_rim <= 3, fired_rim
    assert np.mean(voxel_rate) < 1e-3


def test_ball_kernel_sums_to_one_and_scales_with_spacing() -> None:
    k = ball_kernel(10.0, (2.0, 2.0, 2.0))
    assert k.sum() == pytest.approx(1.0)
    assert k.shape == (5, 5, 5)
    assert np.allclose(k, k[::-1, ::-1, ::-1])
    # 4 mm voxels: the same ball spans fewer voxels; anisotropic spacing: fewer along the coarse axis
    assert ball_kernel(10.0, (4.0, 4.0, 4.0)).shape == (3, 3, 3)
    assert ball_kernel(10.0, (4.0, 2.0, 2.0)).shape == (3, 5, 5)
    # smaller than a voxel: the centre voxel
    tiny = ball_kernel(0.5, (2.0, 2.0, 2.0))
    assert tiny.shape == (1, 1, 1) and tiny[0, 0, 0] == 1.0


def test_smoothness_estimate_recovers_a_known_fwhm() -> None:
    sigma = 1.5
    field_ = ndimage.gaussian_filter(np.random.default_rng(0).standard_normal((40, 40, 40)), sigma)
    fwhm = smoothness_fwhm(field_, np.ones(field_.shape, bool))
    expected = sigma * 2 * math.sqrt(2 * math.log(2))  # the smoothing kernel's FWHM
    assert all(abs(v - expected) / expected < 0.15 for v in fwhm), (fwhm, expected)


def test_threshold_grows_with_the_search_volume_and_falls_with_fwe() -> None:
    small = threshold_for([100.0], 10_000, 0.05)
    big = threshold_for([10_000.0], 1_000_000, 0.05)
    assert 3.0 < small < big < 7.0
    assert threshold_for([10_000.0], 1_000_000, 0.5) < big
    # never above Bonferroni over the voxels
    from scipy.special import ndtri
    assert threshold_for([1e9], 100, 0.05) <= -ndtri(0.05 / 200) + 1e-9


def test_bad_inputs_are_named() -> None:
    f = truth()
    with pytest.raises(GuardError, match="x0"):
        data_guard(np.zeros((3, 3)), np.zeros((3, 3)), SPACING)
    with pytest.raises(GuardError, match="f: expected"):
        data_guard(f, f[1:], SPACING)
    with pytest.raises(GuardError, match="spacing"):
        data_guard(f, f, (2.0, 0.0, 2.0))
    bad = f.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(GuardError, match="finite"):
        data_guard(bad, f, SPACING)
    with pytest.raises(GuardError, match="fwe"):
        GuardParams(fwe=0.0)
    with pytest.raises(GuardError, match="diameters_mm"):
        GuardParams(diameters_mm=())


def test_empty_or_flat_input_gives_no_weight() -> None:
    z = np.zeros(SHAPE, np.float32)
    assert data_guard(z, z, SPACING).weight.max() == 0.0
