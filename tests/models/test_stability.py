"""Welford matches numpy; the blend honours alpha = 0, alpha -> inf and S_norm's bounds."""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from dipnode.models.stability import StabilityError, Welford, blend, normalised_stability


@pytest.mark.parametrize("offset", [0.0, 1e6])
def test_welford_equals_numpy_std_ddof1(offset):
    rng = np.random.default_rng(1)
    samples = offset + rng.normal(size=(21, 4, 5, 6)).astype(np.float32)
    w = Welford()
    for s in samples:
        w.add(s)
    assert w.count == 21
    ref = samples.astype(np.float64)
    np.testing.assert_allclose(w.mean, ref.mean(axis=0), rtol=1e-12)
    # 1e6 offset: a naive sum-of-squares in float64 loses ~6 digits here; Welford does not.
    np.testing.assert_allclose(w.std(ddof=1), ref.std(axis=0, ddof=1), rtol=1e-7)


def test_welford_constant_samples_give_zero_std():
    w = Welford()
    for _ in range(5):
        w.add(np.full((2, 2, 2), 3.3))
    assert np.all(w.std() == 0)


def test_welford_rejects_too_few_samples_and_shape_changes():
    w = Welford()
    with pytest.raises(StabilityError, match="got 0"):
        w.std()
    w.add(np.zeros((2, 3)))
    with pytest.raises(StabilityError, match="more than ddof=1 samples, got 1"):
        w.std(ddof=1)
    with pytest.raises(StabilityError, match=r"\(2, 3\).*\(3, 2\)"):
        w.add(np.zeros((3, 2)))


def _volumes(seed=0, shape=(4, 5, 6)):
    rng = np.random.default_rng(seed)
    x0 = rng.gamma(2.0, 1000.0, shape).astype(np.float32)
    f = rng.gamma(2.0, 1000.0, shape).astype(np.float32)
    s = rng.gamma(1.0, 50.0, shape).astype(np.float32)
    s[0, 0, :3] = 0.0
    return x0, f, s


def test_alpha_zero_gives_the_dip_output_exactly():
    x0, f, s = _volumes()
    x, s_norm = blend(x0, f, s, 0.0)
    assert np.array_equal(x, f)
    assert np.all(s_norm == 0)


@pytest.mark.parametrize("alpha", [1e12, math.inf])
def test_huge_alpha_gives_the_osem_image_where_s_positive(alpha):
    x0, f, s = _volumes()
    x, s_norm = blend(x0, f, s, alpha)
    pos = s > 0
    assert np.array_equal(x[pos], x0[pos])
    assert np.array_equal(x[~pos], f[~pos])  # S == 0: perfectly stable, DIP value kept
    assert np.isfinite(x).all() and np.all(s_norm[~pos] == 0)


def test_s_norm_formula_on_a_hand_case():
    s = np.array([[[1.0, 3.0]]])  # mean 2
    np.testing.assert_allclose(normalised_stability(s, 0.6), [[[0.3, 0.9]]], rtol=1e-6)
    np.testing.assert_allclose(normalised_stability(s, 1.0), [[[0.5, 1.0]]], rtol=1e-6)
    x, _ = blend(np.array([[[10.0, 10.0]]]), np.array([[[0.0, 0.0]]]), s, 0.6)
    np.testing.assert_allclose(x, [[[3.0, 9.0]]], rtol=1e-6)


def test_zero_mean_stability_gives_the_dip_output():
    x0, f, _ = _volumes()
    for alpha in (0.6, math.inf):
        x, s_norm = blend(x0, f, np.zeros_like(f), alpha)
        assert np.array_equal(x, f) and np.all(s_norm == 0)


@settings(max_examples=60, deadline=None)
@given(s=hnp.arrays(np.float64, (3, 2, 4), elements=st.floats(0, 1e6)),
       alpha=st.one_of(st.floats(0, 1e9), st.just(math.inf)))
def test_s_norm_is_within_0_and_1(s, alpha):
    s_norm = normalised_stability(s, alpha)
    assert s_norm.dtype == np.float32
    assert np.all((s_norm >= 0) & (s_norm <= 1))
    # Monotone in S: a less stable voxel never gets a smaller OSEM weight.
    order = np.argsort(s, axis=None, kind="stable")
    assert np.all(np.diff(s_norm.ravel()[order]) >= 0)


@pytest.mark.parametrize("alpha", [-0.1, math.nan, "a"])
def test_bad_alpha_is_named(alpha):
    x0, f, s = _volumes()
    with pytest.raises(StabilityError, match="alpha"):
        blend(x0, f, s, alpha)


def test_bad_stability_and_shapes_are_named():
    x0, f, s = _volumes()
    with pytest.raises(StabilityError, match="one shape"):
        blend(x0, f[:-1], s, 0.6)
    s[0, 0, 0] = -1.0
    with pytest.raises(StabilityError, match="stability"):
        blend(x0, f, s, 0.6)
