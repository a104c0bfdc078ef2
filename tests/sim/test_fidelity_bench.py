"""bench/fidelity.py's measuring stick: CR is 1 on its own reference, the Gaussian matches noise."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

# bench/fidelity.py is a measurement script (bench/ is not a package), and this test checks its
# measuring stick, so it loads that one file by path.
_spec = importlib.util.spec_from_file_location(
    "fidelity", Path(__file__).resolve().parents[2] / "bench" / "fidelity.py")
fidelity = sys.modules["fidelity"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
_spec.loader.exec_module(fidelity)


@pytest.mark.slow
def test_reference_contrast_recovery_is_one_and_noise_lowers_nothing_systematically() -> None:
    ref = fidelity.reference(0.1, 0)
    m = fidelity.metrics(ref.expected, ref)
    for name in fidelity.lesion_names():
        assert m[f"cr:{name}"] == pytest.approx(1.0)
    assert abs(m["gm_bias"]) < 1e-9
    # the full-dose scan recovers the big lesions' contrast (noise is small at full dose)
    full = fidelity.metrics(ref.full_dose, ref)
    for name in fidelity.lesion_names():
        if name.endswith("12mm"):
            assert full[f"cr:{name}"] == pytest.approx(1.0, abs=0.15), name
    # the Gaussian matched to a target noise is at most that noisy (or the quietest one)
    target = 20.0
    fwhm, img = fidelity.matched_gaussian(ref, target)
    assert fwhm > 0 and fidelity.metrics(img, ref)["wm_cov"] <= target + 1e-6


def test_networks_and_fit_names() -> None:
    fast = fidelity.network_params("fast", 3)
    assert (fast.seed, fast.device, fast.base_channels) == (3, "cpu", 4)
    paper_net = fidelity.network_params("papernet", 0)
    assert (paper_net.base_channels, paper_net.depth, paper_net.epochs) == (16, 4, 12)
    assert fidelity.network_params("paper", 0).epochs == 200
    with pytest.raises(ValueError, match="network"):
        fidelity.network_params("huge", 0)
    assert fidelity.fit_name("fast", 0.1, 2) == "fast-d0.1-s2"
    assert fidelity.fit_name("fast", 0.1, 2, 0.1) == "fast-d0.1-s2-j0.1"
