"""Conditional deep image prior fit with the stability samples (docs/METHOD.md, steps 1-2).

The MR ``g`` is the network input and the OSEM PET ``x0`` the target:
``θ* = argmin_θ ||x0 − f(θ|g)||²`` by L-BFGS, one epoch = one ``optimizer.step(closure)``.
Outputs at the epochs ``params.sample_epochs`` are accumulated online (Welford) into the
stability map ``S``. Arrays in, arrays out: no DICOM, no files.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from dipnode.models.params import DipParams
from dipnode.models.stability import Welford
from dipnode.models.unet import UNet3d

log = logging.getLogger(__name__)

Progress = Callable[[int, int, float], None]


class DipInputError(ValueError):
    """PET/MR arrays or fit options that the fit cannot use."""


class DeviceUnavailableError(ValueError):
    """The requested torch device does not exist on this machine."""


class DipDivergedError(RuntimeError):
    """The loss or the network output became non-finite; ``epoch`` says when."""

    def __init__(self, epoch: int, what: str) -> None:
        super().__init__(f"conditional DIP diverged at epoch {epoch}: {what} is not finite; "
                         "try a smaller lr or a different seed")
        self.epoch = epoch


@dataclass(frozen=True)
class DipFit:
    """Result of one conditional DIP fit; every volume is float32 in PET units.

    output: f(θ*|g), the network output after the last epoch (train() mode, as the samples).
    stability: S, the voxel-wise sample std (ddof=1) of the outputs at the sampled epochs,
        or None if there were fewer than two samples.
    sample_mean: the voxel-wise mean of those same outputs (Welford's running mean; free,
        since S needs it), or None without samples.
    n_samples: how many outputs entered S; sample_epochs: which epochs they came from.
    loss_history: one value per epoch: the MSE in normalised units at the start of that
        epoch's L-BFGS step (what ``LBFGS.step`` returns), so entry 0 is the untrained loss.
    snapshots: outputs at the requested ``snapshot_epochs`` (the DIP-epochs trade-off curve).
    timings: seconds: "setup", "fit" (all epochs incl. sampling), "per_epoch", "sampling", "total".
    device: the torch device the fit ran on, e.g. "cpu" or "cuda:0".
    pet_scale: the divisor that normalised the PET (its 99.5th percentile).
    """

    output: np.ndarray = field(repr=False)
    stability: np.ndarray | None = field(repr=False)
    n_samples: int
    loss_history: tuple[float, ...]
    snapshots: dict[int, np.ndarray] = field(repr=False)
    timings: dict[str, float]
    device: str
    sample_epochs: tuple[int, ...] = ()
    pet_scale: float = 1.0
    sample_mean: np.ndarray | None = field(repr=False, default=None)


def resolve_device(name: str) -> torch.device:
    """"auto" -> CUDA if present else CPU; "cpu", "cuda", "cuda:N" are forced (checked)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise DeviceUnavailableError(
                f"device: expected an available CUDA device for {name!r}, got none "
                f"(torch {torch.__version__} built with CUDA {torch.version.cuda}); use 'auto' or 'cpu'")
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceUnavailableError(
                f"device: expected an index below {torch.cuda.device_count()}, got {name!r}")
        return dev
    raise DeviceUnavailableError(f"device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}")


def pet_scale(pet: np.ndarray) -> float:
    """Robust PET scale: the 99.5th percentile, so one hot voxel does not set it.

    Falls back to max|x| when the percentile is not positive (sparse images), and to 1 for
    an all-zero image, so the division is always defined and exactly invertible.
    """
    scale = float(np.percentile(pet, 99.5))
    if not scale > 0:
        scale = float(np.max(np.abs(pet)))
    return scale if scale > 0 else 1.0


def standardise_mr(mr: np.ndarray) -> np.ndarray:
    """Z-score the MR (any MR units/scaling give the same network input); float32."""
    mr64 = np.asarray(mr, dtype=np.float64)
    std = float(mr64.std())
    return ((mr64 - mr64.mean()) / (std if std > 0 else 1.0)).astype(np.float32)


def make_lbfgs(parameters: Iterable[torch.nn.Parameter], params: DipParams) -> torch.optim.LBFGS:
    """The paper's optimiser with the preset's lr, inner iterations and history.

    line_search_fn="strong_wolfe": with lr=1 and no line search, L-BFGS takes the raw
    quasi-Newton step, which on the first iterations (identity Hessian guess) can overshoot
    and blow the loss up; the strong-Wolfe search bounds each step at the cost of a few extra
    closure evaluations (at most max_iter·1.25 per epoch, torch's default max_eval).
    """
    return torch.optim.LBFGS(parameters, lr=params.lr, max_iter=params.max_iter,
                             history_size=params.history_size, line_search_fn="strong_wolfe")


@contextlib.contextmanager
def _deterministic(enabled: bool) -> Iterator[None]:
    """Turn on torch's deterministic algorithms for the fit, restoring the caller's setting.

    Only on CPU: on CUDA several ops the U-Net uses (e.g. trilinear upsampling backward) have
    no deterministic kernel and would raise; CUDA fits are reproducible only to rounding.
    """
    if not enabled:
        yield
        return
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)


def _validate(pet: np.ndarray, mr: np.ndarray, params: DipParams,
              snapshot_epochs: Iterable[int]) -> tuple[np.ndarray, np.ndarray, frozenset[int]]:
    pet = np.asarray(pet)
    mr = np.asarray(mr)
    if not isinstance(params, DipParams):
        raise DipInputError(f"params: expected DipParams, got {type(params).__name__}")
    for name, arr in (("pet", pet), ("mr", mr)):
        if arr.ndim != 3:
            raise DipInputError(f"{name}: expected a 3-D array, got shape {arr.shape}")
        if not np.issubdtype(arr.dtype, np.number) or not np.all(np.isfinite(arr)):
            raise DipInputError(f"{name}: expected finite numbers, got non-finite values or dtype {arr.dtype}")
    if pet.shape != mr.shape:
        raise DipInputError(f"mr: expected the PET's shape {pet.shape}, got {mr.shape}")
    snaps = frozenset(int(e) for e in snapshot_epochs)
    bad = sorted(e for e in snaps if not 1 <= e <= params.epochs)
    if bad:
        raise DipInputError(f"snapshot_epochs: expected epochs in 1..{params.epochs}, got {bad}")
    return pet, mr, snaps


def fit_conditional_dip(pet: np.ndarray, mr: np.ndarray, params: DipParams,
                        progress: Progress | None = None,
                        snapshot_epochs: Iterable[int] = ()) -> DipFit:
    """Fit f(θ|g) to the PET with the MR as input; return f(θ*|g), S and the fit's record.

    pet, mr: 3-D arrays of one shape on the PET grid (MR already aligned). The PET is divided
    by ``pet_scale`` and the MR z-scored; outputs are multiplied back into PET units.
    The weights are initialised from ``params.seed`` on the CPU (so the start does not depend
    on the device) without touching the caller's global RNG; on CPU the fit is bit-identical
    for a given seed (and thread count).

    ``params.input_jitter`` > 0 perturbs the network input during training (the DIP's
    regularising input noise, Ulyanov et al. 2018): a fresh N(0, jitter²) field, drawn from
    the seed, is added to the z-scored MR for each epoch and held fixed within it (L-BFGS's
    line search needs one function per step); outputs for S, the mean and the result are
    taken on the clean input.
    """
    t_start = time.perf_counter()
    pet, mr, snaps = _validate(pet, mr, params, snapshot_epochs)
    device = resolve_device(params.device)
    scale = pet_scale(pet)
    target_np = (pet.astype(np.float64) / scale).astype(np.float32)
    input_np = standardise_mr(mr)
    samples = frozenset(params.sample_epochs)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(params.seed)
        net = UNet3d(1, 1, params.base_channels, params.depth)
    net.check_input((1, 1) + pet.shape)  # fail before any work for too-small volumes
    net.to(device).train()  # train(): BN batch statistics, as the paper's outputs (docs/DESIGN.md)
    x = torch.from_numpy(input_np)[None, None].to(device)
    y = torch.from_numpy(target_np)[None, None].to(device)
    optimizer = make_lbfgs(net.parameters(), params)
    jitter_rng = torch.Generator().manual_seed(params.seed + 1) if params.input_jitter > 0 else None

    welford = Welford()
    history: list[float] = []
    sampled: list[int] = []
    snapshots: dict[int, np.ndarray] = {}
    output: np.ndarray | None = None
    t_sampling = 0.0
    log.debug("DIP fit: shape %s, device %s, %d epochs, %d samples",
              pet.shape, device, params.epochs, len(samples))
    t_fit = time.perf_counter()
    with _deterministic(device.type == "cpu"):
        for epoch in range(1, params.epochs + 1):
            x_in = x
            if jitter_rng is not None:
                noise = torch.randn(x.shape, generator=jitter_rng) * params.input_jitter
                x_in = x + noise.to(device)

            def closure(epoch: int = epoch, x_in: torch.Tensor = x_in) -> torch.Tensor:
                optimizer.zero_grad()
                loss = F.mse_loss(net(x_in), y)
                if not torch.isfinite(loss):
                    raise DipDivergedError(epoch, "the loss")
                loss.backward()
                return loss

            loss_value = float(optimizer.step(closure).detach())
            history.append(loss_value)
            if progress is not None:
                progress(epoch, params.epochs, loss_value)
            if epoch in samples or epoch in snaps or epoch == params.epochs:
                t0 = time.perf_counter()
                # train() mode with no_grad: BN uses this forward's batch statistics (its
                # running-stat update is unused in train mode), exactly the fitted function.
                with torch.no_grad():
                    out = net(x)[0, 0].double().cpu().numpy() * scale
                if not np.all(np.isfinite(out)):
                    raise DipDivergedError(epoch, "the network output")
                if epoch in samples:
                    welford.add(out)
                    sampled.append(epoch)
                if epoch in snaps:
                    snapshots[epoch] = out.astype(np.float32)
                if epoch == params.epochs:
                    output = out.astype(np.float32)
                t_sampling += time.perf_counter() - t0
    t_end = time.perf_counter()
    if output is None:  # unreachable: the last epoch always sets it
        raise RuntimeError("conditional DIP produced no output")
    stability = welford.std(ddof=1).astype(np.float32) if welford.count >= 2 else None
    sample_mean = welford.mean.astype(np.float32) if welford.count >= 1 else None
    fit_s = t_end - t_fit
    timings = {"setup": t_fit - t_start, "fit": fit_s, "per_epoch": fit_s / params.epochs,
               "sampling": t_sampling, "total": t_end - t_start}
    return DipFit(output=output, stability=stability, n_samples=welford.count,
                  loss_history=tuple(history), snapshots=snapshots, timings=timings,
                  device=str(device), sample_epochs=tuple(sampled), pet_scale=scale,
                  sample_mean=sample_mean)
