"""The stability map and the blend (docs/METHOD.md steps 2 and 3).

``S = Std[f(θ_n | g)]`` over the sampled epochs is accumulated online with Welford's algorithm
so that the fit never holds 21 volumes; ``blend`` turns S into the per-voxel weight of the
OSEM image (the paper's blend); ``blend_weight`` applies any such weight, e.g. the guarded
``w = max(S_norm, G)`` (models/guard.py).
"""
from __future__ import annotations

import math

import numpy as np
import torch


class StabilityError(ValueError):
    """Bad input to the stability map or the blend."""


class Welford:
    """Online voxel-wise mean and variance of equally shaped arrays (float64 accumulators).

    Welford's update keeps the sum of squared deviations M2 instead of sum(x²), which avoids
    the cancellation that sum(x²) − n·mean² suffers when the spread is small against the
    mean — exactly the stable white-matter voxels the map is about.
    """

    def __init__(self) -> None:
        self._n = 0
        self._mean: np.ndarray | None = None
        self._m2: np.ndarray | None = None

    @property
    def count(self) -> int:
        return self._n

    def add(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float64)
        if self._mean is not None and x.shape != self._mean.shape:
            raise StabilityError(
                f"Welford.add: expected an array of shape {self._mean.shape}, got {x.shape}")
        self._update(x, np.copy, np.zeros_like)

    def _update(self, x, copy, zeros) -> None:  # noqa: ANN001 - numpy arrays or torch tensors
        if self._mean is None or self._m2 is None:
            self._mean = copy(x)
            self._m2 = zeros(x)
        else:
            delta = x - self._mean
            self._mean += delta / (self._n + 1)
            self._m2 += delta * (x - self._mean)
        self._n += 1

    @property
    def mean(self) -> np.ndarray:
        if self._mean is None:
            raise StabilityError("Welford.mean: expected at least 1 sample, got 0")
        return self._mean * 1  # a copy, for arrays and tensors alike

    def std(self, ddof: int = 1) -> np.ndarray:
        """Voxel-wise standard deviation with ``ddof`` (1: sample std, as numpy.std(ddof=1))."""
        if self._m2 is None or self._n - ddof <= 0:
            raise StabilityError(
                f"Welford.std: expected more than ddof={ddof} samples, got {self._n}")
        # M2 can round to a tiny negative value; clip so sqrt never gives NaN.
        return (self._m2.clip(min=0.0) / (self._n - ddof)) ** 0.5


class TorchWelford(Welford):
    """Welford's accumulator on a torch device: the fit's samples never leave the GPU.

    ``Welford``'s own update (the same arithmetic works on tensors, float64 accumulators by
    default), so the stability map costs no host copy per sample; ``mean`` and ``std`` come
    back as numpy arrays once, at the end.
    """

    def __init__(self, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self._dtype = dtype

    def add(self, x: torch.Tensor) -> None:  # type: ignore[override]
        x = x.detach().to(self._dtype)
        if self._mean is not None and x.shape != self._mean.shape:
            raise StabilityError(
                f"TorchWelford.add: expected a tensor of shape {tuple(self._mean.shape)}, got {tuple(x.shape)}")
        self._update(x, lambda v: v.clone(), torch.zeros_like)

    @property
    def mean(self) -> np.ndarray:
        return self._numpy(super().mean)

    def std(self, ddof: int = 1) -> np.ndarray:
        return self._numpy(super().std(ddof))

    @staticmethod
    def _numpy(v: object) -> np.ndarray:
        return v.cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)


def normalised_stability(stability: np.ndarray, alpha: float) -> np.ndarray:
    """``S_norm = min(alpha * S / mean(S), 1)`` voxel-wise, float32 in [0, 1].

    mean(S) is over the whole volume. If mean(S) == 0 (a network that never moved, S ≡ 0)
    there is no instability to weight: S_norm = 0 (the DIP output is used). alpha = inf gives
    1 wherever S > 0 and 0 where S == 0 (inf·0 would be NaN).
    """
    s = np.asarray(stability, dtype=np.float64)
    try:
        alpha = float(alpha)
    except (TypeError, ValueError):
        raise StabilityError(f"alpha: expected a number >= 0 (inf allowed), got {alpha!r}") from None
    if not alpha >= 0:  # also rejects NaN
        raise StabilityError(f"alpha: expected a number >= 0 (inf allowed), got {alpha!r}")
    if not np.all(np.isfinite(s)) or np.any(s < 0):
        raise StabilityError("stability: expected finite values >= 0, got negative or non-finite")
    mean = float(s.mean()) if s.size else 0.0
    if mean == 0.0 or alpha == 0:
        return np.zeros(s.shape, dtype=np.float32)
    if math.isinf(alpha):
        return (s > 0).astype(np.float32)
    return np.minimum(alpha * s / mean, 1.0).astype(np.float32)


def blend(x0: np.ndarray, f: np.ndarray, S: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """``x = S_norm·x0 + (1 − S_norm)·f``; returns ``(x, S_norm)``, both float32.

    x0: the OSEM image, f: the DIP output f(θ*|g), S: the stability map, all one shape.
    alpha = 0 returns f exactly; S_norm = 1 voxels return x0 exactly.
    """
    x0 = np.asarray(x0, dtype=np.float32)
    f = np.asarray(f, dtype=np.float32)
    S = np.asarray(S)
    if not (x0.shape == f.shape == S.shape):
        raise StabilityError(
            f"blend: expected x0, f and S of one shape, got {x0.shape}, {f.shape}, {S.shape}")
    s_norm = normalised_stability(S, alpha)
    x = s_norm * x0 + (np.float32(1) - s_norm) * f
    return x.astype(np.float32, copy=False), s_norm


def blend_weight(x0: np.ndarray, f: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``x = w·x0 + (1 − w)·f`` for a per-voxel weight ``w`` in [0, 1]; float32.

    ``w = 1`` voxels return x0 exactly and ``w = 0`` voxels f exactly.
    """
    x0 = np.asarray(x0, dtype=np.float32)
    f = np.asarray(f, dtype=np.float32)
    w = np.asarray(w, dtype=np.float32)
    if not (x0.shape == f.shape == w.shape):
        raise StabilityError(
            f"blend_weight: expected x0, f and w of one shape, got {x0.shape}, {f.shape}, {w.shape}")
    if not np.all((w >= 0) & (w <= 1)):
        raise StabilityError("w: expected weights in [0, 1], got values outside")
    return (w * x0 + (np.float32(1) - w) * f).astype(np.float32, copy=False)
