"""Fidelity benchmark: does denoising keep what the measured data show? (bench/FIDELITY.md)

The project's brain FDG phantom (sim/phantom.py) at 2 mm with twelve lesions the MR does not
show (hot and cold; 6, 8 and 12 mm; in white matter and in cortex), reconstructed whole by
OSEM (4 iterations x 16 subsets, as the demo) at doses 1/4, 1/10 and 1/20 with five noise
seeds each, then cropped to the 48x64x64 box that holds the nuclei and the lesions
(FIDELITY_REGION_MNI), which is what the networks see.

Stages (each reads what the previous wrote under --results, so the table can be rebuilt
without refitting):

    python bench/fidelity.py fit   --network fast  --doses 0.25 0.1 0.05 --seeds 0 1 2 3 4
    python bench/fidelity.py fit   --network paper --doses 0.1 --seeds 0
    python bench/fidelity.py fit   --network fast  --doses 0.1 --seeds 0 1 2 3 4 --jitter 0.05
    python bench/fidelity.py null  --doses 0.25 0.1 0.05 --realisations 20
    python bench/fidelity.py table --out bench/FIDELITY.md

``fit`` runs one conditional DIP per (network, dose, seed[, jitter]) and caches its arrays
(``<results>/fits/*.npz``: the OSEM crop it was fitted to, the last output, the mean of the
sampled outputs, S, snapshots); it skips fits already cached. The paper's SDIP, cDIP and the
new SDIP all come from the same fit; the guard and the blends are post-fit steps, done in
``table``. ``null`` measures the guard's false alarms on the lesion-free phantom with the
noise-free reconstruction as the network's image (the guard's statistics alone).
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dipnode.models.params import DipParams, preset
from dipnode.sim.pet_sim import simulate_osem
from dipnode.sim.phantom import (FIDELITY_LESIONS, FIDELITY_REGION_MNI, Phantom, _sphere_fraction,
                                 make_phantom)

log = logging.getLogger("fidelity")

HERE = Path(__file__).resolve().parent
DEFAULT_RESULTS = HERE / "results" / "fidelity"
VOXEL_MM = 2.0
OSEM_ITERATIONS, OSEM_SUBSETS = 4, 16  # as sim/study.py writes the demo's PET
FULL_DOSE_SEED_OFFSET = 1000  # the full-dose reference of seed s uses noise seed 1000 + s
DOSES = (0.25, 0.1, 0.05)
SEEDS = (0, 1, 2, 3, 4)


def network_params(name: str, seed: int, jitter: float = 0.0) -> DipParams:
    """The fit's parameters: the ``fast`` preset (what a CPU runs) or the paper's network."""
    if name == "fast":
        base = preset("fast")
    elif name == "paper":
        base = preset("paper")
    else:
        raise ValueError(f"network: expected 'fast' or 'paper', got {name!r}")
    return base.replace(seed=seed, device="cpu", input_jitter=jitter)


def snapshot_epochs(params: DipParams) -> tuple[int, ...]:
    """Every epoch for short fits, every M-th (the sampling step) for long ones."""
    step = 1 if params.epochs <= 60 else params.sample_every
    return tuple(range(step, params.epochs + 1, step))


@functools.lru_cache(maxsize=1)
def phantom() -> Phantom:
    return make_phantom(VOXEL_MM, lesions=FIDELITY_LESIONS, region_mni=FIDELITY_REGION_MNI)


@functools.lru_cache(maxsize=1)
def lesion_free_activity() -> np.ndarray:
    """The same phantom without its lesions (every lesion's factor divided out)."""
    p = phantom()
    act = p.activity.astype(np.float64)
    for les, c in p.lesions:
        frac = _sphere_fraction(p.shape, np.asarray(p.spacing), np.asarray(c), les.diameter_mm / 2)
        act = act / (1.0 + (les.factor - 1.0) * frac)
    return act.astype(np.float32)


@functools.lru_cache(maxsize=16)
def osem(dose: float, seed: int | None, lesions: bool = True) -> np.ndarray:
    """Whole-volume OSEM of the phantom at ``dose``; seed None = noise-free (expected counts)."""
    act = phantom().activity if lesions else lesion_free_activity()
    out = simulate_osem(act, dose, iterations=OSEM_ITERATIONS, subsets=OSEM_SUBSETS,
                        seed=0 if seed is None else seed, poisson=seed is not None)
    out.setflags(write=False)
    return out


def crop(vol: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(vol[phantom().region])


def fit_name(network: str, dose: float, seed: int, jitter: float = 0.0) -> str:
    name = f"{network}-d{dose:g}-s{seed}"
    return name + (f"-j{jitter:g}" if jitter else "")


def run_fit(results: Path, network: str, dose: float, seed: int, jitter: float = 0.0,
            force: bool = False) -> Path:
    """One conditional DIP fit on the crop, cached as ``fits/<name>.npz``."""
    from dipnode.models.dip import fit_conditional_dip

    path = results / "fits" / f"{fit_name(network, dose, seed, jitter)}.npz"
    if path.exists() and not force:
        log.info("%s: cached", path.name)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    params = network_params(network, seed, jitter)
    x0 = crop(osem(dose, seed))
    mr = crop(phantom().mr)
    snaps = snapshot_epochs(params)
    t0 = time.time()

    def progress(epoch: int, epochs: int, loss: float) -> None:
        if epoch % max(1, epochs // 10) == 0:
            log.info("%s: epoch %d/%d loss %.4g (%.0f s)", path.stem, epoch, epochs, loss,
                     time.time() - t0)

    fit = fit_conditional_dip(x0, mr, params, progress=progress, snapshot_epochs=snaps)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(
        tmp, x0=x0, output=fit.output, sample_mean=fit.sample_mean, stability=fit.stability,
        snapshot_epochs=np.array(sorted(fit.snapshots)),
        snapshots=np.stack([fit.snapshots[e] for e in sorted(fit.snapshots)]).astype(np.float16),
        loss=np.array(fit.loss_history), params=json.dumps(params.as_dict()),
        timings=json.dumps(fit.timings))
    tmp.replace(path)
    log.info("%s: fit in %.0f s", path.stem, fit.timings["fit"])
    return path


@dataclass(frozen=True)
class CachedFit:
    name: str
    x0: np.ndarray
    output: np.ndarray
    sample_mean: np.ndarray
    stability: np.ndarray
    snapshot_epochs: np.ndarray
    snapshots: np.ndarray
    loss: np.ndarray
    params: dict
    timings: dict


def load_fit(path: Path) -> CachedFit:
    with np.load(path) as z:
        return CachedFit(path.stem, z["x0"], z["output"], z["sample_mean"], z["stability"],
                         z["snapshot_epochs"], z["snapshots"].astype(np.float32), z["loss"],
                         json.loads(str(z["params"])), json.loads(str(z["timings"])))


def cmd_fit(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(args.threads)  # a shared 2-core machine: 1 thread is fastest here
    for dose in args.doses:
        for seed in args.seeds:
            run_fit(args.results, args.network, dose, seed, args.jitter, force=args.force)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("stage", choices=["fit", "null", "table"])
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    p.add_argument("--network", choices=["fast", "paper"], default="fast")
    p.add_argument("--doses", type=float, nargs="+", default=list(DOSES))
    p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    p.add_argument("--jitter", type=float, default=0.0, help="input jitter std (fit stage)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--force", action="store_true", help="refit even if cached")
    p.add_argument("--realisations", type=int, default=20, help="null stage: noise draws per dose")
    p.add_argument("--out", type=Path, default=HERE / "FIDELITY.md")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    handler = {"fit": cmd_fit}.get(args.stage)
    if handler is None:
        raise SystemExit(f"stage {args.stage}: not yet")
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
