import pytest

from dipnode.models.params import PRESETS, DipParams, Method, preset


def test_paper_schedule_is_21_samples_from_100_every_5():
    p = preset("paper")
    assert p.sample_epochs == tuple(range(100, 201, 5))
    assert p.n_samples == 21


@pytest.mark.parametrize("epochs,m,M", [(10, 3, 2), (7, 1, 3), (20, 20, 1), (200, 100, 5)])
def test_schedule_is_exactly_n_ge_m_and_n_mod_M(epochs, m, M):
    p = DipParams(epochs=epochs, sample_from=m, sample_every=M) if len(
        [n for n in range(m, epochs + 1) if n % M == 0]) >= 2 else None
    if p is None:
        with pytest.raises(ValueError, match="at least two samples"):
            DipParams(epochs=epochs, sample_from=m, sample_every=M)
        return
    assert set(p.sample_epochs) == {n for n in range(1, epochs + 1) if n >= m and n % M == 0}


@pytest.mark.parametrize("changes,field", [
    ({"sample_from": 300}, "sample_from"),
    ({"epochs": 0}, "epochs"),
    ({"alpha": -0.1}, "alpha"),
    ({"device": "tpu"}, "device"),
    ({"sample_from": 200, "sample_every": 5}, "two samples"),
])
def test_bad_params_are_named(changes, field):
    with pytest.raises(ValueError, match=field):
        preset("paper").replace(**changes)


def test_presets_valid_and_unknown_named():
    assert {"paper", "fast", "tiny"} <= set(PRESETS)
    with pytest.raises(ValueError, match="paper"):
        preset("nope")
    assert Method("sdip").needs_mr and not Method.GAUSSIAN.needs_mr


def test_resolve_params_is_the_one_rule() -> None:
    from dipnode.models.params import resolve_params

    assert resolve_params(preset_name="paper") == preset("paper")
    p = resolve_params(preset_name="paper", overrides={"epochs": 50, "alpha": None})
    assert (p.epochs, p.sample_from, p.alpha) == (50, 25, 0.6)  # None is unset
    assert resolve_params(preset_name="tiny", overrides={"epochs": 3, "sample_every": 1}).sample_from == 1
    # A job's own parameters are the base unless a preset is named.
    job = preset("fast").replace(seed=7)
    assert resolve_params(base=job, overrides={"alpha": 1.0}) == job.replace(alpha=1.0)
    assert resolve_params(preset_name="tiny", base=job) == preset("tiny")
    # cdip is SDIP with alpha 0: forced, and another explicit alpha is refused.
    assert resolve_params(preset_name="paper", method="cdip").alpha == 0.0
    assert resolve_params(base=job, method=Method.CDIP).alpha == 0.0
    with pytest.raises(ValueError, match=r"DipParams\.alpha: expected 0 or unset with method 'cdip'"):
        resolve_params(preset_name="paper", overrides={"alpha": 0.5}, method="cdip")


@pytest.mark.parametrize("kwargs,match", [
    ({}, "expected a preset name or base parameters"),
    ({"preset_name": "huge"}, r"^preset: unknown preset 'huge'"),
    ({"preset_name": "paper", "overrides": {"epoch": 3}}, r"DipParams\.epoch: expected one of"),
    ({"preset_name": "paper", "overrides": {"epochs": "many"}}, r"DipParams\.epochs: expected an integer"),
    ({"preset_name": "paper", "overrides": {"epochs": 3, "sample_every": 5}}, "at least two samples"),
])
def test_resolve_params_errors_name_the_field(kwargs, match) -> None:
    from dipnode.models.params import resolve_params

    with pytest.raises(ValueError, match=match):
        resolve_params(**kwargs)
