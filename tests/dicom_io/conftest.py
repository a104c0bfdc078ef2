"""Shared fixtures for the DICOM file boundary tests: dciodvfy and tiny synthetic studies."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import peers
from dipnode.sim.dicom_study import StudyInfo, new_study


@pytest.fixture
def dciodvfy_errors() -> Callable[[Path], list[str]]:
    return peers.dciodvfy_errors


@pytest.fixture
def study() -> StudyInfo:
    return new_study("PAT001", seed=1)


def _axial_affine(spacing: tuple[float, float, float] = (2.0, 2.0, 3.0)) -> np.ndarray:
    """Axial grid: i -> +x (L), j -> +y (P), k -> +z (S), spacing in (i, j, k) order."""
    a = np.diag([*spacing, 1.0])
    a[:3, 3] = [-15.0, -20.0, -10.0]
    return a


def _oblique_affine(spacing: tuple[float, float, float] = (2.0, 2.5, 3.0)) -> np.ndarray:
    """Rotated 20 deg about z then 10 deg about x: a proper rotation, no tilt."""
    cz, sz = np.cos(np.radians(20)), np.sin(np.radians(20))
    cx, sx = np.cos(np.radians(10)), np.sin(np.radians(10))
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    a = np.eye(4)
    a[:3, :3] = rx @ rz @ np.diag(spacing)
    a[:3, 3] = [12.0, -7.5, 30.0]
    return a


def _pet_values(shape: tuple[int, int, int] = (6, 16, 16), seed: int = 0) -> np.ndarray:
    """A non-negative, slice-varying Bq/ml volume so per-slice slopes differ."""
    rng = np.random.default_rng(seed)
    base = rng.gamma(2.0, 2500.0, size=shape)
    return base * (1.0 + np.arange(shape[0])[:, None, None])


# Fixtures rather than imports from conftest: several test folders have a conftest.py, and
# "import conftest" would pick whichever one Python found first.
@pytest.fixture
def axial_affine() -> np.ndarray:
    return _axial_affine()


@pytest.fixture
def oblique_affine() -> np.ndarray:
    return _oblique_affine()


@pytest.fixture
def pet_values() -> Callable[..., np.ndarray]:
    return _pet_values
