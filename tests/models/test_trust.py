"""Trust numbers (models/trust.py) on arrays whose answers are known."""
from __future__ import annotations

import numpy as np
import pytest

from dipnode.models.trust import TrustError, brain_mask, trust_numbers


def phantom(shape=(16, 24, 24)) -> np.ndarray:
    """A ball of 1000 Bq/ml with a hot core of 3000 in a cold background (10)."""
    z, y, x = np.indices(shape)
    c = [(s - 1) / 2 for s in shape]
    r = np.sqrt((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2)
    img = np.where(r < 6, 1000.0, 10.0)
    img[r < 1.8] = 3000.0
    return img.astype(np.float32)


def test_identity_changes_nothing_and_weight_is_its_brain_mean() -> None:
    x0 = phantom()
    w = np.full(x0.shape, 0.25, dtype=np.float32)
    t = trust_numbers(x0, x0, w)
    assert t.mean_change == pytest.approx(0.0, abs=1e-12) and t.hot_change == pytest.approx(0.0, abs=1e-12)
    assert t.measured_fraction == pytest.approx(0.25)
    mask, _ = brain_mask(x0)
    assert t.brain_voxels == int(mask.sum()) and 0 < t.hot_voxels < t.brain_voxels
    # The weight outside the brain does not count.
    w2 = np.where(mask, 0.5, 1.0).astype(np.float32)
    assert trust_numbers(x0, x0, w2).measured_fraction == pytest.approx(0.5)


def test_a_flattened_peak_shows_in_the_hot_change_not_much_in_the_mean() -> None:
    x0 = phantom()
    out = np.minimum(x0, 1500.0)  # a denoiser that clips the hot core
    t = trust_numbers(x0, out, None)
    assert t.hot_change < -0.3
    assert -0.1 < t.mean_change < 0.0
    assert t.measured_fraction == 0.0  # no OSEM weight given: plain conditional DIP
    scaled = trust_numbers(x0, x0 * 1.1, None, blends=False)
    assert scaled.mean_change == pytest.approx(0.1) and scaled.hot_change == pytest.approx(0.1)
    assert scaled.measured_fraction is None  # Gaussian: not a blend


def test_bad_inputs_name_the_argument() -> None:
    x0 = phantom()
    with pytest.raises(TrustError, match="output: expected the OSEM image's shape"):
        trust_numbers(x0, x0[:-1], None)
    with pytest.raises(TrustError, match="osem: expected some activity"):
        trust_numbers(np.zeros_like(x0), x0, None)
    bad = x0.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(TrustError, match="output: expected finite values"):
        trust_numbers(x0, bad, None)
