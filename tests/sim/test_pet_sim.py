"""Projection-based low-dose simulation: adjointness, calibration, noise vs dose, determinism."""
from __future__ import annotations

import numpy as np
import pytest

from dipnode.sim.pet_sim import SimulationError, make_projector, osem, simulate_osem
from dipnode.sim.phantom import Phantom, make_phantom


@pytest.fixture(scope="module")
def p4() -> Phantom:
    return make_phantom(4.0)


def _cov(img: np.ndarray, mask: np.ndarray) -> float:
    return float(img[mask].std() / img[mask].mean())


def test_projector_is_adjoint() -> None:
    proj = make_projector((13, 17), n_subsets=4)
    rng = np.random.default_rng(1)
    x = rng.random((3, 13, 17))
    y = rng.random((3, proj.n_angles, proj.n_bins))
    lhs = float((proj.forward(x) * y).sum())
    rhs = float((x * proj.adjoint(y)).sum())
    assert lhs == pytest.approx(rhs, rel=1e-10)
    # and the subsets tile the full matrix: their sensitivities add up to the full one
    full = np.asarray(proj.matrix.sum(axis=0)).ravel()
    assert np.allclose(sum(s[2] for s in proj.subsets), full)


def test_projection_conserves_mass_per_angle() -> None:
    # a point anywhere inside the slice projects its full value onto every view
    proj = make_projector((9, 11), n_subsets=2)
    x = np.zeros((1, 9, 11))
    x[0, 2, 7] = 5.0
    sino = proj.forward(x)[0]
    assert np.allclose(sino.sum(axis=1), 5.0)


def test_osem_recovers_a_disc() -> None:
    proj = make_projector((32, 32), n_subsets=4)
    jj, ii = np.mgrid[:32, :32]
    x = ((jj - 15.5) ** 2 + (ii - 15.5) ** 2 < 10**2).astype(float)[None] * 100.0
    rec = osem(proj.forward(x), proj, iterations=10)
    inner = ((jj - 15.5) ** 2 + (ii - 15.5) ** 2 < 6**2)[None]
    assert rec[inner].mean() == pytest.approx(100.0, rel=0.03)
    assert rec[~((jj - 15.5) ** 2 + (ii - 15.5) ** 2 < 12**2)[None]].max() < 10.0


def test_noise_free_osem_matches_truth(p4: Phantom) -> None:
    rec = simulate_osem(p4.activity, 1.0, poisson=False)
    assert rec.dtype == np.float32 and rec.shape == p4.activity.shape
    brain = p4.masks["brain"]
    assert rec[brain].mean() == pytest.approx(p4.activity[brain].mean(), rel=0.03)
    # calibration does not depend on the dose fraction
    rec_low = simulate_osem(p4.activity, 0.1, poisson=False)
    assert np.allclose(rec_low, rec, rtol=1e-4, atol=1e-2)
    # the grey/white contrast survives the reconstruction
    assert rec[p4.masks["gm"]].mean() > 2.0 * rec[p4.masks["wm"]].mean()


def test_noise_grows_as_dose_falls(p4: Phantom) -> None:
    wm = p4.masks["wm"]
    clean = simulate_osem(p4.activity, 1.0, poisson=False)
    # the noise alone: difference to the noise-free reconstruction, relative to WM mean
    noise = {d: float((simulate_osem(p4.activity, d, seed=4) - clean)[wm].std() / clean[wm].mean())
             for d in (1.0, 0.5, 0.2, 0.1)}
    assert noise[1.0] < noise[0.5] < noise[0.2] < noise[0.1]
    # Poisson: noise ~ 1/sqrt(dose); OSEM is non-linear, so allow a generous band
    ratio = noise[0.1] / noise[1.0]
    assert 0.6 * np.sqrt(10) < ratio < 1.4 * np.sqrt(10)
    # and the image's own WM CoV (noise + structure) rises too
    assert _cov(simulate_osem(p4.activity, 0.1, seed=4), wm) > _cov(simulate_osem(p4.activity, 1.0, seed=4), wm)


def test_deterministic_for_a_seed(p4: Phantom) -> None:
    a = simulate_osem(p4.activity, 0.2, seed=7)
    b = simulate_osem(p4.activity, 0.2, seed=7)
    c = simulate_osem(p4.activity, 0.2, seed=8)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_post_filter_smooths(p4: Phantom) -> None:
    wm = p4.masks["wm"]
    raw = simulate_osem(p4.activity, 0.1, seed=2)
    smooth = simulate_osem(p4.activity, 0.1, seed=2, post_filter_fwhm_vox=2.0)
    assert _cov(smooth, wm) < _cov(raw, wm)


@pytest.mark.parametrize(
    "kwargs, word",
    [({"dose_fraction": 0.0}, "dose_fraction"), ({"dose_fraction": 1.5}, "dose_fraction"),
     ({"dose_fraction": 0.5, "counts_full": 0}, "counts_full"),
     ({"dose_fraction": 0.5, "iterations": 0}, "iterations"),
     ({"dose_fraction": 0.5, "subsets": 3, "n_angles": 16}, "n_angles")],
)
def test_bad_arguments(kwargs: dict, word: str) -> None:
    act = np.ones((2, 8, 8), np.float32)
    with pytest.raises(SimulationError, match=word):
        simulate_osem(act, **kwargs)


def test_rejects_negative_activity() -> None:
    act = -np.ones((2, 8, 8), np.float32)
    with pytest.raises(SimulationError, match="activity"):
        simulate_osem(act, 1.0)
