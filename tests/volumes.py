"""Small synthetic PET/MR pairs for the fit's unit tests (tests/models)."""
from __future__ import annotations

import numpy as np


def disc_phantom(seed: int, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """MR with a disc-shaped structure through every slice; PET = 4·structure + 1 plus Poisson
    noise, in Bq/ml-like units. Returns (pet, mr), float32."""
    rng = np.random.default_rng(seed)
    _, j, i = np.indices(shape)
    structure = ((j - shape[1] / 2) ** 2 + (i - shape[2] / 2) ** 2 < 9).astype(np.float32)
    mr = (600 + 400 * structure + rng.normal(0, 10, shape)).astype(np.float32)
    pet = (rng.poisson(20 * (4 * structure + 1)) * 250.0).astype(np.float32)
    return pet, mr
