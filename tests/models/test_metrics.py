"""The paper's metrics on hand-made arrays whose answers are known."""
from __future__ import annotations

import numpy as np
import pytest

from dipnode.models.metrics import (
    MetricsError,
    away_from,
    lesion_contrast,
    metrics_table,
    peak_to_valley,
    roi_bias,
    roi_mean,
    wm_noise,
)


def _masks(shape: tuple[int, int, int] = (4, 6, 12)) -> dict[str, np.ndarray]:
    z = lambda: np.zeros(shape, bool)  # noqa: E731
    m = {k: z() for k in ("wm", "nucleus_left", "nucleus_right", "valley", "lesion",
                          "lesion_background", "brain")}
    m["brain"][:] = True
    m["wm"][0] = True
    m["nucleus_right"][2, 2:4, 1:3] = True
    m["nucleus_left"][2, 2:4, 7:9] = True
    m["valley"][2, 2:4, 4:6] = True
    m["lesion"][3, 2:4, 2:4] = True
    m["lesion_background"][3, 2:4, 6:10] = True
    m["nuclei"] = m["nucleus_left"] | m["nucleus_right"]
    return m


def test_roi_mean_and_bias() -> None:
    img = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    mask = img >= 12
    assert roi_mean(img, mask) == pytest.approx(17.5)
    assert roi_bias(img * 1.1, img, mask) == pytest.approx(10.0)
    assert roi_bias(img * 0.8, img, mask) == pytest.approx(-20.0)


def test_wm_noise() -> None:
    rng = np.random.default_rng(0)
    img = 100.0 + 5.0 * rng.standard_normal((10, 20, 20))
    img[5:] = 1e6  # outside the mask: must not count
    mask = np.zeros(img.shape, bool)
    mask[:5] = True
    n = wm_noise(img, mask)
    assert n.mean == pytest.approx(100.0, abs=0.5)
    assert n.std == pytest.approx(5.0, rel=0.05)
    assert n.cov_percent == pytest.approx(5.0, rel=0.05)


def test_peak_to_valley_mean_and_max() -> None:
    m = _masks()
    img = np.full(m["wm"].shape, 10.0)
    img[m["valley"]] = 4.0
    img[m["nucleus_left"]] = 12.0
    img[m["nucleus_right"]] = 8.0
    img[2, 2, 1] = 16.0  # one hot voxel in the right nucleus
    right_mean = (8.0 * 3 + 16.0) / 4
    assert peak_to_valley(img, (m["nucleus_left"], m["nucleus_right"]), m["valley"]) == \
        pytest.approx((12.0 + right_mean) / 2 / 4.0)
    assert peak_to_valley(img, (m["nucleus_left"], m["nucleus_right"]), m["valley"], peak="max") == \
        pytest.approx((12.0 + 16.0) / 2 / 4.0)
    # a combined mask is split into its connected nuclei: same answer
    assert peak_to_valley(img, m["nuclei"], m["valley"]) == \
        pytest.approx(peak_to_valley(img, (m["nucleus_left"], m["nucleus_right"]), m["valley"]))


def test_lesion_contrast() -> None:
    m = _masks()
    img = np.full(m["wm"].shape, 50.0)
    img[m["lesion"]] = 125.0
    assert lesion_contrast(img, m["lesion"], m["lesion_background"]) == pytest.approx(1.5)
    flat = np.full(m["wm"].shape, 50.0)
    assert lesion_contrast(flat, m["lesion"], m["lesion_background"]) == pytest.approx(0.0)


def test_metrics_table() -> None:
    m = _masks()
    rng = np.random.default_rng(3)
    ref = np.full(m["wm"].shape, 10.0)
    ref[m["nuclei"]] = 20.0
    ref[m["lesion"]] = 30.0
    img = ref * 1.05 + rng.normal(0, 0.1, ref.shape)
    t = metrics_table(img, ref, m)
    assert set(t) >= {"wm_std", "wm_cov_percent", "pvr_mean", "pvr_max", "lesion_contrast",
                      "lesion_contrast_ref", "bias_brain_percent", "bias_wm_percent",
                      "bias_nuclei_percent", "bias_lesion_percent"}
    assert t["bias_wm_percent"] == pytest.approx(5.0, abs=0.5)
    assert t["pvr_mean"] == pytest.approx(2.0, rel=0.05)
    assert t["lesion_contrast_ref"] == pytest.approx(2.0)
    assert t["wm_cov_percent"] == pytest.approx(100 * 0.1 / 10.5, rel=0.2)
    assert all(isinstance(v, float) for v in t.values())


def test_errors_name_the_argument() -> None:
    img = np.ones((2, 2, 2))
    good = np.ones((2, 2, 2), bool)
    with pytest.raises(MetricsError, match="wm_mask.*non-empty"):
        wm_noise(img, np.zeros((2, 2, 2), bool))
    with pytest.raises(MetricsError, match="boolean"):
        roi_mean(img, np.ones((2, 2, 2)))
    with pytest.raises(MetricsError, match="shape"):
        roi_mean(img, np.ones((2, 2, 3), bool))
    with pytest.raises(MetricsError, match="valley_mask"):
        peak_to_valley(np.zeros((2, 2, 2)), [good], good)
    with pytest.raises(MetricsError, match="peak"):
        peak_to_valley(img, [good], good, peak="median")
    with pytest.raises(MetricsError, match="missing"):
        metrics_table(img, img, {"wm": good})
    assert issubclass(MetricsError, ValueError)


def test_away_from_keeps_voxels_at_the_margin_in_mm() -> None:
    mask = np.ones((1, 1, 10), bool)
    grey = np.zeros_like(mask)
    grey[0, 0, 0] = True
    # 3 mm voxels: voxel i lies 3*i mm from voxel 0; >= 9 mm keeps i = 3..9 (the margin inclusive).
    kept = away_from(mask, grey, (1.0, 1.0, 3.0), 9.0)
    assert np.flatnonzero(kept[0, 0]).tolist() == list(range(3, 10))
    # Anisotropic: the distance is in mm along each axis, not in voxels.
    mask3 = np.ones((5, 1, 5), bool)
    grey3 = np.zeros_like(mask3)
    grey3[0, 0, 0] = True
    kept3 = away_from(mask3, grey3, (4.0, 1.0, 1.0), 4.0)
    assert kept3[1, 0, 0] and not kept3[0, 0, 3] and kept3[0, 0, 4]
    assert away_from(mask, np.zeros_like(mask), (1, 1, 1), 50.0).all()
    assert not away_from(mask, grey, (1, 1, 1), 100.0).any()


def test_away_from_errors_name_the_argument() -> None:
    m = np.ones((2, 2, 2), bool)
    with pytest.raises(MetricsError, match="exclude: expected the mask's shape"):
        away_from(m, np.ones((2, 2, 3), bool), (1, 1, 1), 1.0)
    with pytest.raises(MetricsError, match="spacing"):
        away_from(m, m, (1, 0, 1), 1.0)
    with pytest.raises(MetricsError, match="margin_mm"):
        away_from(m, m, (1, 1, 1), -1.0)
    with pytest.raises(MetricsError, match="mask: expected a boolean"):
        away_from(m.astype(int), m, (1, 1, 1), 1.0)
