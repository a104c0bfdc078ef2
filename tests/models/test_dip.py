"""The conditional DIP fit: reproducible, lowers the loss, samples exactly params.sample_epochs."""
import numpy as np
import pytest
import torch

from dipnode.models.dip import (DeviceUnavailableError, DipDivergedError, DipInputError,
                                fit_conditional_dip, pet_scale, resolve_device)
from dipnode.models.params import preset
from dipnode.models.unet import UNetShapeError
from volumes import disc_phantom

# The tiny preset with fewer inner L-BFGS iterations: same schedule (12 epochs, samples at
# 6, 8, 10, 12), a few hundred milliseconds per fit.
PARAMS = preset("tiny").replace(max_iter=5, device="cpu")
SHAPE = (8, 12, 10)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/models/conftest.py


def phantom(seed=0, shape=SHAPE):
    return disc_phantom(seed, shape)


@pytest.fixture(scope="module")
def fits():
    pet, mr = phantom()
    return {
        "a": fit_conditional_dip(pet, mr, PARAMS, snapshot_epochs=(3, 12)),
        "b": fit_conditional_dip(pet, mr, PARAMS, snapshot_epochs=(3, 12)),
        "c": fit_conditional_dip(pet, mr, PARAMS.replace(seed=1)),
        "pet": pet,
    }


def test_same_seed_is_bit_identical_on_cpu(fits):
    a, b = fits["a"], fits["b"]
    assert np.array_equal(a.output, b.output)
    assert np.array_equal(a.stability, b.stability)
    assert a.loss_history == b.loss_history
    assert np.array_equal(a.snapshots[3], b.snapshots[3])


def test_different_seed_gives_a_different_output(fits):
    assert not np.array_equal(fits["a"].output, fits["c"].output)
    assert fits["a"].loss_history[0] != fits["c"].loss_history[0]


def test_fit_lowers_the_loss_and_returns_pet_units(fits):
    a, pet = fits["a"], fits["pet"]
    assert len(a.loss_history) == PARAMS.epochs
    assert a.loss_history[-1] < 0.5 * a.loss_history[0]
    assert a.output.dtype == np.float32 and a.output.shape == pet.shape
    # Back in Bq/ml: the fitted image's mean is the PET's to within a few percent, and its
    # MSE after undoing the scale is at most the last step's starting loss (the strong-Wolfe
    # search only accepts decreasing steps), which fails if the inverse scaling is wrong.
    assert abs(a.output.mean() - pet.mean()) < 0.1 * pet.mean()
    mse_normalised = np.mean(((a.output.astype(np.float64) - pet) / pet_scale(pet)) ** 2)
    assert mse_normalised <= a.loss_history[-1] * (1 + 1e-4)
    assert mse_normalised > 0.5 * a.loss_history[-1]


def test_stability_uses_exactly_the_sample_schedule(fits):
    a = fits["a"]
    assert a.sample_epochs == PARAMS.sample_epochs == (6, 8, 10, 12)
    assert a.n_samples == PARAMS.n_samples == 4
    assert a.stability.shape == SHAPE and a.stability.dtype == np.float32
    assert np.all(a.stability >= 0) and a.stability.max() > 0


def test_other_schedule_and_progress_callback():
    pet, mr = phantom(1)
    params = PARAMS.replace(epochs=7, sample_from=3, sample_every=2)
    calls = []
    fit = fit_conditional_dip(pet, mr, params, progress=lambda e, n, loss: calls.append((e, n, loss)))
    assert fit.sample_epochs == (4, 6) and fit.n_samples == 2
    assert [c[:2] for c in calls] == [(e, 7) for e in range(1, 8)]
    assert tuple(c[2] for c in calls) == fit.loss_history


def test_snapshots_are_the_requested_epochs_and_the_last_is_the_output(fits):
    a = fits["a"]
    assert sorted(a.snapshots) == [3, 12]
    assert np.array_equal(a.snapshots[12], a.output)
    assert not np.array_equal(a.snapshots[3], a.output)


def test_timings_and_device_recorded(fits):
    a = fits["a"]
    assert a.device == "cpu"
    assert {"setup", "fit", "per_epoch", "sampling", "total"} <= set(a.timings)
    assert a.timings["per_epoch"] == pytest.approx(a.timings["fit"] / PARAMS.epochs)


def test_fit_leaves_global_rng_and_determinism_flag_alone():
    pet, mr = phantom()
    rng_before = torch.random.get_rng_state()
    flag_before = torch.are_deterministic_algorithms_enabled()
    fit_conditional_dip(pet, mr, PARAMS.replace(epochs=2, sample_from=1, sample_every=1))
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    assert torch.are_deterministic_algorithms_enabled() == flag_before


def test_divergence_names_the_epoch():
    pet, mr = phantom()
    # A step of 1e38 overflows float32 weights on the first line-search trial.
    with pytest.raises(DipDivergedError, match="epoch 1") as info:
        fit_conditional_dip(pet, mr, PARAMS.replace(lr=1e38))
    assert info.value.epoch == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_but_absent_is_a_clear_error():
    with pytest.raises(DeviceUnavailableError, match="'cuda'.*use 'auto' or 'cpu'"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")
    pet, mr = phantom()
    with pytest.raises(DeviceUnavailableError):
        fit_conditional_dip(pet, mr, PARAMS.replace(device="cuda:0"))


def test_bad_inputs_are_named():
    pet, mr = phantom()
    with pytest.raises(DipInputError, match=r"mr: expected the PET's shape \(8, 12, 10\), got \(8, 12, 9\)"):
        fit_conditional_dip(pet, mr[..., :9], PARAMS)
    bad = pet.copy()
    bad[1, 1, 1] = np.nan
    with pytest.raises(DipInputError, match="pet: expected finite"):
        fit_conditional_dip(bad, mr, PARAMS)
    with pytest.raises(DipInputError, match="pet: expected a 3-D array"):
        fit_conditional_dip(pet[0], mr[0], PARAMS)
    with pytest.raises(DipInputError, match=r"snapshot_epochs: expected epochs in 1..12, got \[0, 13\]"):
        fit_conditional_dip(pet, mr, PARAMS, snapshot_epochs=(0, 13, 5))
    with pytest.raises(UNetShapeError, match="one voxel"):
        fit_conditional_dip(pet[:2, :2, :2], mr[:2, :2, :2], PARAMS)
