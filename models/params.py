"""Method parameters for SDIP and its baselines: the named presets and the one place their rules
live (:func:`resolve_params`).

One immutable object carries every knob of the method so that a job, a derived series'
provenance and a deterministic UID can all be computed from it. The command line, the TOML
settings, a QA re-run and the tests resolve parameters here, so the rules cannot drift apart:

- a preset (or a job's own parameters) with overrides on top;
- ``epochs`` given without ``sample_from`` moves m to ``epochs // 2`` (at least 1): the
  stability map samples the second half of any fit (the paper's 100 of 200);
- ``cdip`` is the paper's SDIP with alpha 0 (docs/METHOD.md "4. Blend"): it forces alpha to 0
  and refuses another explicit alpha rather than ignoring it.

Every bad value is a ValueError naming the field as ``DipParams.<field>``, which each caller
turns into its own words (``--epochs``, ``method.epochs``).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, fields
from enum import Enum
from typing import Any


class Method(str, Enum):
    """The denoising methods the node offers (docs/METHOD.md "The method, exactly")."""

    SDIP = "sdip"              # SDIP with the data-consistency guard (docs/METHOD.md)
    SDIP_PAPER = "sdip-paper"  # the paper's SDIP exactly: last output, S-only blend
    CDIP = "cdip"              # plain conditional DIP (alpha = 0)
    GAUSSIAN = "gaussian"      # OSEM + Gaussian post-filter

    @property
    def blends(self) -> bool:
        """Whether the method blends the network's image with the OSEM image."""
        return self in (Method.SDIP, Method.SDIP_PAPER)

    @property
    def needs_mr(self) -> bool:
        return self is not Method.GAUSSIAN


@dataclass(frozen=True)
class DipParams:
    """Parameters of the conditional DIP fit, the stability map and the blend.

    epochs: number of ``optimizer.step(closure)`` calls (one epoch = one L-BFGS step).
    sample_from (m), sample_every (M): the stability map uses outputs at epochs
        ``n >= m`` with ``n % M == 0``; epochs are counted from 1 (after the n-th step).
    alpha: blend strength; 0 is plain conditional DIP, large values return the OSEM image.
    lr, max_iter, history_size: L-BFGS learning rate, inner iterations per step and memory.
        lr=1 is L-BFGS's natural (unit) quasi-Newton step; max_iter=20 is torch's default
        number of inner iterations per ``step(closure)``, so the paper's 200 epochs are up to
        4000 forward+backward passes; a history of 10 pairs keeps the optimiser's memory to
        20 parameter-sized vectors (~0.4 GB for the paper network) instead of torch's 100.
    base_channels, depth: U-Net width at the first level and number of levels (paper 16, 4).
    fwhm_voxels: Gaussian baseline FWHM in voxels.
    seed: seeds weight initialisation; the CPU fit is deterministic for a given seed.
    device: "auto" (CUDA when present), "cpu", "cuda" or "cuda:N".
    input_jitter: std of the noise added to the z-scored MR input per epoch during training
        (0: none, as the paper).
    guard_fwe: the data-consistency guard's family-wise false-alarm probability per volume
        (models/guard.py); method ``sdip`` only.
    average: method ``sdip`` blends the mean of the sampled outputs (the ones S is the std
        of) instead of the last one; ``sdip-paper`` and ``cdip`` always use the last.
    """

    epochs: int = 200
    sample_from: int = 100
    sample_every: int = 5
    alpha: float = 0.6
    lr: float = 1.0
    max_iter: int = 20
    history_size: int = 10
    base_channels: int = 16
    depth: int = 4
    fwhm_voxels: float = 2.0
    seed: int = 0
    device: str = "auto"
    input_jitter: float = 0.0
    guard_fwe: float = 0.05
    average: bool = True

    def __post_init__(self) -> None:
        def bad(name: str, expected: str) -> ValueError:
            return ValueError(f"DipParams.{name}: expected {expected}, got {getattr(self, name)!r}")

        if self.epochs < 1:
            raise bad("epochs", "an integer >= 1")
        if self.sample_every < 1:
            raise bad("sample_every", "an integer >= 1")
        if not 1 <= self.sample_from <= self.epochs:
            raise bad("sample_from", f"1 <= m <= epochs ({self.epochs})")
        if self.n_samples < 2:
            raise ValueError(
                "DipParams: the stability map needs at least two samples; "
                f"epochs={self.epochs}, sample_from={self.sample_from}, "
                f"sample_every={self.sample_every} give {self.n_samples}"
            )
        if not self.alpha >= 0:
            raise bad("alpha", "a number >= 0")
        if not self.lr > 0:
            raise bad("lr", "a number > 0")
        if self.max_iter < 1:
            raise bad("max_iter", "an integer >= 1")
        if self.history_size < 1:
            raise bad("history_size", "an integer >= 1")
        if self.base_channels < 1:
            raise bad("base_channels", "an integer >= 1")
        if not 1 <= self.depth <= 6:
            raise bad("depth", "an integer from 1 to 6")
        if not self.fwhm_voxels >= 0:
            raise bad("fwhm_voxels", "a number >= 0")
        if not 0 < self.guard_fwe < 1:
            raise bad("guard_fwe", "a probability 0 < p < 1")
        if not isinstance(self.average, bool):
            raise bad("average", "true or false")
        if not self.input_jitter >= 0:
            raise bad("input_jitter", "a number >= 0")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise bad("device", "'auto', 'cpu', 'cuda' or 'cuda:N'")

    @property
    def sample_epochs(self) -> tuple[int, ...]:
        """Epochs whose outputs enter the stability map: ``{n : m <= n <= epochs, n % M == 0}``."""
        return tuple(n for n in range(self.sample_from, self.epochs + 1) if n % self.sample_every == 0)

    @property
    def n_samples(self) -> int:
        return len(self.sample_epochs)

    def replace(self, **changes: Any) -> "DipParams":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRESETS: dict[str, DipParams] = {
    # Hashimoto et al. 2025: 200 L-BFGS epochs, stability from epoch 100 every 5th (21 samples),
    # alpha 0.6, U-Net 16/32/64/128 (+256 bottleneck).
    "paper": DipParams(),
    # Small and quick for CPU demos: the narrow, shallow network the quality test uses (it
    # fits the 4 mm phantom's structure before its noise), 30 epochs of 8 inner iterations,
    # stability over epochs 10-30 (21 samples, as many as the paper's). About 300 forward+
    # backward passes: a few minutes on two CPU cores at the 4 mm phantom (43x52x44).
    # Measured on the demo phantom at 1/10 dose (alpha 0.6): WM CoV 23.6 % -> 13.0 %, PVR
    # kept (1.94 vs 1.94 for OSEM), where plain cDIP loses the lesion and the nuclei' peaks.
    "fast": DipParams(epochs=30, sample_from=10, sample_every=1, base_channels=4, depth=2,
                      max_iter=8),
    # Tiny, for tests of the plumbing (node, CLI) on small volumes: ~30 passes.
    "tiny": DipParams(epochs=12, sample_from=6, sample_every=2, base_channels=4, depth=2,
                      max_iter=2),
}


def preset(name: str) -> DipParams:
    """The named preset; a clear error names the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}") from None


#: Fields a caller may override (every DipParams field).
PARAM_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(DipParams))


def resolve_params(*, preset_name: str | None = None, base: DipParams | None = None,
                   overrides: Mapping[str, Any] | None = None,
                   method: Method | str | None = None) -> DipParams:
    """The parameters a run uses: ``base`` (a job's own parameters) unless ``preset_name`` is
    given, else the named preset; then ``overrides`` (fields set by the user; None values are
    unset) under the rules of the module docstring. Raises ValueError naming the field.
    """
    if preset_name is not None or base is None:
        if preset_name is None:
            raise ValueError("resolve_params: expected a preset name or base parameters, got neither")
        if preset_name not in PRESETS:
            raise ValueError(f"preset: unknown preset {preset_name!r}; expected one of {sorted(PRESETS)}")
        base = PRESETS[preset_name]
    changes = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = sorted(set(changes) - set(PARAM_FIELDS))
    if unknown:
        raise ValueError(f"DipParams.{unknown[0]}: expected one of {list(PARAM_FIELDS)}, got {unknown[0]!r}")
    if "epochs" in changes and "sample_from" not in changes:
        try:
            changes["sample_from"] = max(1, int(changes["epochs"]) // 2)
        except (TypeError, ValueError):
            raise ValueError(f"DipParams.epochs: expected an integer >= 1, got {changes['epochs']!r}") from None
    if method is not None and Method(method) is Method.CDIP:
        if changes.get("alpha", 0.0) != 0.0:
            raise ValueError(f"DipParams.alpha: expected 0 or unset with method 'cdip' (plain "
                             f"conditional DIP is SDIP with alpha 0), got {changes['alpha']!r}")
        changes["alpha"] = 0.0
    try:
        return base.replace(**changes)
    except TypeError as exc:  # a value of the wrong type fails a comparison in the checks
        raise ValueError(f"DipParams: expected numbers for {sorted(changes)}, got {changes!r} ({exc})") from None


# -- parameters at rest -----------------------------------------------------------------------
#: The format of :func:`params_record`. Bump it when a field is renamed or removed, or when a
#: new field's default would change what an old record computed; :func:`params_from_record`
#: and :func:`stored_method` then read each older version as it ran.
#: 1: the paper's method under the name "sdip". 2: "sdip" is SDIP with the data-consistency
#: guard and the mean of the sampled outputs (fields input_jitter, guard_fwe, average), the
#: paper's method is "sdip-paper".
PARAMS_VERSION = 2


def stored_method(name: str, version: int) -> Method:
    """The method a job stored under ``name`` with parameters format ``version`` ran: a format-1
    "sdip" job ran the paper's method, so it reads back (and re-runs) as ``sdip-paper``."""
    method = Method(name)
    if version == 1 and method is Method.SDIP:
        return Method.SDIP_PAPER
    return method


def params_record(params: DipParams) -> dict[str, Any]:
    """``params`` as plain values (JSON-able) in format :data:`PARAMS_VERSION`."""
    return params.as_dict()


def params_from_record(record: Mapping[str, Any], version: int) -> DipParams:
    """The parameters a record of format ``version`` describes; ValueError for a version this
    dipnode does not know (written by a newer one) or a record it cannot read."""
    if not 1 <= version <= PARAMS_VERSION:
        raise ValueError(f"parameters record: expected format 1 to {PARAMS_VERSION}, got {version} "
                         "(written by a newer dipnode?)")
    unknown = sorted(set(record) - set(PARAM_FIELDS))
    if unknown:
        raise ValueError(f"parameters record (format {version}): unknown fields {unknown}")
    return DipParams(**record)
