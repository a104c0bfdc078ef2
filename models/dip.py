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
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from dipnode.models.params import DipParams
from dipnode.models.stability import TorchWelford
from dipnode.models.unet import UNet3d, activation_bytes, parameter_count

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


class DipOutOfMemoryError(RuntimeError):
    """The fit ran out of device memory (or would exceed ``params.memory_limit_mb``).

    The message names the device, the volume and the network, so that a job's reason says
    what to change; ``device`` is where it happened.
    """

    def __init__(self, device: str, shape: tuple[int, ...], params: DipParams, what: str) -> None:
        super().__init__(
            f"out of memory on {device} for a {'x'.join(map(str, shape))} volume with U-Net base "
            f"{params.base_channels} depth {params.depth} ({what}); use a smaller preset, "
            f"fewer concurrent jobs, or [workers] on_oom = \"cpu\" | \"gaussian\"")
        self.device = device

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled as its message and device: it crosses process boundaries (a Ray worker to the
        # node), where the default (the class called with the message alone) cannot rebuild it.
        return _rebuild_oom, (str(self), self.device)


def _rebuild_oom(message: str, device: str) -> DipOutOfMemoryError:
    err = DipOutOfMemoryError.__new__(DipOutOfMemoryError)
    RuntimeError.__init__(err, message)
    err.device = device
    return err


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
    passes_per_epoch: per epoch, the forward+backward passes L-BFGS made (calls of its
        closure: inner iterations plus strong-Wolfe line-search evaluations).
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
    passes_per_epoch: tuple[int, ...] = ()

    @property
    def passes(self) -> int:
        """Forward+backward passes the fit ran (closure calls, line-search ones included);
        the sampling forwards (no backward) are not counted."""
        return sum(self.passes_per_epoch)


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


class _LBFGS(torch.optim.LBFGS):
    """torch's L-BFGS, with gradients gathered by ``reshape`` instead of ``view``.

    torch flattens each gradient with ``view(-1)``, which fails for a channels-last-3d
    gradient (its memory is not in logical order). ``reshape`` gives the same logical-order
    vector (copying only then); the concatenation copies anyway, and ``_add_grad`` reads the
    update back in the same logical order, so contiguous parameters take exactly torch's path.
    """

    def _gather_flat_grad(self) -> torch.Tensor:
        views = []
        for p in self._params:
            if p.grad is None:
                views.append(p.new_zeros(p.numel()))
            else:
                views.append(p.grad.reshape(-1))
        return torch.cat(views, 0)


def make_lbfgs(parameters: Iterable[torch.nn.Parameter], params: DipParams) -> torch.optim.LBFGS:
    """The paper's optimiser with the preset's lr, inner iterations and history.

    line_search_fn="strong_wolfe": with lr=1 and no line search, L-BFGS takes the raw
    quasi-Newton step, which on the first iterations (identity Hessian guess) can overshoot
    and blow the loss up; the strong-Wolfe search bounds each step at the cost of a few extra
    closure evaluations (at most max_iter·1.25 per epoch, torch's default max_eval).
    """
    return _LBFGS(parameters, lr=params.lr, max_iter=params.max_iter,
                  history_size=params.history_size, line_search_fn="strong_wolfe")


def fit_memory_bytes(shape: tuple[int, int, int], params: DipParams) -> int:
    """Estimated peak memory of one fit (bytes): what ``memory_limit_mb`` is checked against.

    Activations kept for backward (``unet.activation_bytes``, halved under bf16 autocast) plus
    the float32 weights, their gradient and L-BFGS's state (2·history_size direction pairs and
    about 4 more parameter-sized vectors: flat gradient, previous gradient, direction, the
    line search's copy), plus the volumes themselves (input, target, float64 accumulators).
    A planning figure; bench/cost.py measures the real peak beside it.
    """
    bytes_act = 2 if params.precision == "bf16" else 4
    act = activation_bytes(tuple(shape), params.base_channels, params.depth, bytes_act)
    n_param = parameter_count(UNet3d(1, 1, params.base_channels, params.depth))
    vox = int(np.prod(shape))
    return int(act + 4 * n_param * (2 + 2 * params.history_size + 4) + vox * (4 * 2 + 8 * 3))


def check_memory_limit(shape: tuple[int, ...], params: DipParams, device: torch.device) -> None:
    """Raise DipOutOfMemoryError (caused by torch.OutOfMemoryError) when the fit's estimated
    peak exceeds ``params.memory_limit_mb``, before any work.

    A limit reached here and a device that is really full take the same path
    (``DipOutOfMemoryError``, then the node's on_oom policy).
    """
    if params.memory_limit_mb <= 0:
        return
    need = fit_memory_bytes(tuple(shape), params)  # type: ignore[arg-type]
    if need > params.memory_limit_mb * 1024 * 1024:
        raise DipOutOfMemoryError(
            str(device), tuple(shape), params,
            f"estimated {need / 2**20:.0f} MiB, limit memory_limit_mb = {params.memory_limit_mb}"
        ) from torch.OutOfMemoryError("memory_limit_mb")


@contextlib.contextmanager
def autocast_for(device: torch.device, precision: str) -> Iterator[None]:
    """bfloat16 autocast of the network's forward for precision "bf16"; else nothing."""
    if precision != "bf16":
        yield
        return
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
        yield


@contextlib.contextmanager
def backend_flags(device: torch.device, params: DipParams) -> Iterator[None]:
    """cuDNN autotuning and the float32 precision of CUDA convolutions/matmuls, for the fit only.

    "fp32" turns TF32 *off* for convolutions too (PyTorch's cuDNN default is TF32 on), so the
    fp32 figures are IEEE float32. The flags are process-wide: the previous values come back
    afterwards, and jobs running side by side in one node use the same settings anyway.
    """
    if device.type != "cuda":
        yield
        return
    cudnn = torch.backends.cudnn
    matmul = torch.backends.cuda.matmul
    new_api = hasattr(cudnn, "conv") and hasattr(matmul, "fp32_precision")
    before_bench = cudnn.benchmark
    if new_api:
        before = (cudnn.conv.fp32_precision, matmul.fp32_precision)
    else:
        before = (cudnn.allow_tf32, matmul.allow_tf32)
    tf32 = params.precision == "tf32"
    try:
        cudnn.benchmark = params.cudnn_benchmark
        if new_api:
            cudnn.conv.fp32_precision = matmul.fp32_precision = "tf32" if tf32 else "ieee"
        else:
            cudnn.allow_tf32 = matmul.allow_tf32 = tf32
        yield
    finally:
        cudnn.benchmark = before_bench
        if new_api:
            cudnn.conv.fp32_precision, matmul.fp32_precision = before
        else:
            cudnn.allow_tf32, matmul.allow_tf32 = before


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
    check_memory_limit(pet.shape, params, device)
    try:
        return _fit(pet, mr, params, device, snaps, progress, t_start)
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        # torch.OutOfMemoryError: a CUDA device is full. The CPU allocator raises a plain
        # RuntimeError with its own words instead: the same condition on a GPU-less host.
        if not isinstance(exc, torch.OutOfMemoryError) and "can't allocate memory" not in str(exc):
            raise
        what = (str(exc).splitlines() or ["the allocator's OutOfMemoryError"])[0]
        err = DipOutOfMemoryError(str(device), pet.shape, params, what)
        err.__cause__ = exc.with_traceback(None)  # the traceback would keep the fit's tensors alive
    # Out of the except block the failed fit's tensors are unreferenced: give their blocks back
    # to the device for whatever runs next (an on_oom retry, another job).
    if device.type == "cuda":
        torch.cuda.empty_cache()
    raise err


def _fit(pet: np.ndarray, mr: np.ndarray, params: DipParams, device: torch.device,
         snaps: frozenset[int], progress: Progress | None, t_start: float) -> DipFit:
    scale = pet_scale(pet)
    target_np = (pet.astype(np.float64) / scale).astype(np.float32)
    input_np = standardise_mr(mr)
    samples = frozenset(params.sample_epochs)
    memory_format = torch.channels_last_3d if params.channels_last else torch.contiguous_format

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(params.seed)
        net = UNet3d(1, 1, params.base_channels, params.depth)
    net.check_input((1, 1) + pet.shape)  # fail before any work for too-small volumes
    # train(): BN batch statistics, as the paper's outputs (docs/DESIGN.md)
    net.to(device=device, memory_format=memory_format).train()
    x = torch.from_numpy(input_np)[None, None].to(device).contiguous(memory_format=memory_format)
    y = torch.from_numpy(target_np)[None, None].to(device)
    optimizer = make_lbfgs(net.parameters(), params)
    # The compiled module shares the parameters with ``net``: the optimiser steps the same
    # tensors either way. Compilation happens on the first pass (counted in the first epoch).
    model = torch.compile(net) if params.compile else net
    jitter_rng = torch.Generator().manual_seed(params.seed + 1) if params.input_jitter > 0 else None

    def forward(inp: torch.Tensor) -> torch.Tensor:
        with autocast_for(device, params.precision):
            return model(inp).float()

    welford = TorchWelford()
    history: list[float] = []
    sampled: list[int] = []
    snapshots: dict[int, np.ndarray] = {}
    passes_per_epoch: list[int] = []
    output: np.ndarray | None = None
    t_sampling = 0.0
    log.debug("DIP fit: shape %s, device %s, %d epochs, %d samples",
              pet.shape, device, params.epochs, len(samples))
    t_fit = time.perf_counter()
    with _deterministic(device.type == "cpu" and not params.compile), backend_flags(device, params):
        for epoch in range(1, params.epochs + 1):
            x_in = x
            if jitter_rng is not None:
                noise = torch.randn(x.shape, generator=jitter_rng) * params.input_jitter
                x_in = (x + noise.to(device)).contiguous(memory_format=memory_format)
            passes = [0]

            def closure(epoch: int = epoch, x_in: torch.Tensor = x_in,
                        passes: list[int] = passes) -> torch.Tensor:
                passes[0] += 1
                optimizer.zero_grad()
                loss = F.mse_loss(forward(x_in), y)
                loss.backward()
                # Checked after backward, not before: L-BFGS reads float(loss) right after the
                # closure returns, so this waits for nothing the optimiser does not wait for
                # (a check before backward would stall the GPU's queue once per pass).
                if not torch.isfinite(loss):
                    raise DipDivergedError(epoch, "the loss")
                return loss

            loss_value = float(optimizer.step(closure).detach())
            passes_per_epoch.append(passes[0])
            history.append(loss_value)
            if progress is not None:
                progress(epoch, params.epochs, loss_value)
            if epoch in samples or epoch in snaps or epoch == params.epochs:
                t0 = time.perf_counter()
                # train() mode with no_grad: BN uses this forward's batch statistics (its
                # running-stat update is unused in train mode), exactly the fitted function.
                # The sample stays on the device (TorchWelford); only snapshots and the last
                # output are copied to the host.
                with torch.no_grad():
                    out_t = forward(x)[0, 0].double() * scale
                if not bool(torch.isfinite(out_t).all()):
                    raise DipDivergedError(epoch, "the network output")
                if epoch in samples:
                    welford.add(out_t)
                    sampled.append(epoch)
                if epoch in snaps or epoch == params.epochs:
                    out = out_t.float().cpu().numpy()
                    if epoch in snaps:
                        snapshots[epoch] = out
                    if epoch == params.epochs:
                        output = out
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
                  sample_mean=sample_mean, passes_per_epoch=tuple(passes_per_epoch))
