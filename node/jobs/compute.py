"""The part of a job that needs the GPU: arrays in, arrays out, no files, no DICOM, no database.

MR -> PET alignment, then the method (SDIP: fit, stability map, blend). The node reads the
series and writes the DICOM outputs itself (node/jobs/pipeline.py); what runs here may run in the
node's own thread (the local executor) or on a Ray worker on another machine
(node/jobs/ray_bridge.py), so the request and the result are plain picklable values.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from dipnode.models.align import AlignedMr, align_mr_to_pet
from dipnode.models.denoise import DenoiseResult, denoise
from dipnode.models.params import DipParams, Method

__all__ = ["AlignmentFailed", "Compute", "ComputeRequest", "ComputeResult", "compute_local"]

log = logging.getLogger(__name__)

Progress = Callable[[int, int, float], None]


class AlignmentFailed(ValueError):
    """The MR could not be put on the PET grid (the pipeline passes that MR over)."""


@dataclass(frozen=True)
class ComputeRequest:
    """One job's inputs: the PET and (for the DIP methods) the MR, each with its 4x4 voxel ->
    patient affine and Frame of Reference UID; the method and its resolved parameters."""

    pet: np.ndarray = field(repr=False)
    pet_affine: np.ndarray = field(repr=False)
    pet_frame_of_reference: str
    spacing: tuple[float, float, float]
    method: Method
    params: DipParams
    mr: np.ndarray | None = field(default=None, repr=False)
    mr_affine: np.ndarray | None = field(default=None, repr=False)
    mr_frame_of_reference: str = ""
    snapshot_epochs: tuple[int, ...] = ()

    @property
    def nbytes(self) -> int:
        return int(self.pet.nbytes + (self.mr.nbytes if self.mr is not None else 0))


@dataclass(frozen=True)
class ComputeResult:
    """What comes back: the alignment (its ``values`` are the MR on the PET grid), the engine's
    result, where it ran (``worker``: host and process) and how long it took there (seconds)."""

    alignment: AlignedMr | None
    denoised: DenoiseResult
    worker: str
    seconds: float


#: How the node runs a job's computation: ``compute(request, progress)``.
Compute = Callable[[ComputeRequest, "Progress | None"], ComputeResult]


def worker_name() -> str:
    return f"pid {os.getpid()} on {socket.gethostname()}"


def compute_local(request: ComputeRequest, progress: Progress | None = None) -> ComputeResult:
    """Align and denoise in this process. AlignmentFailed when the MR cannot be aligned; the
    engine's own errors (DenoiseInputError, DipDivergedError, DeviceUnavailableError) as raised."""
    t0 = time.perf_counter()
    alignment: AlignedMr | None = None
    if request.mr is not None and request.method.needs_mr:
        if request.mr_affine is None:
            raise ValueError("mr_affine: expected the MR's 4x4 affine with its values, got None")
        try:
            alignment = align_mr_to_pet(
                request.mr, request.mr_affine, request.pet, request.pet_affine,
                same_frame_of_reference=request.mr_frame_of_reference == request.pet_frame_of_reference,
            )
        except ValueError as exc:  # AlignmentError and the checks of its arguments
            raise AlignmentFailed(f"{type(exc).__name__}: {exc}") from exc
        log.info("aligned MR to PET by %s (metric %s)", alignment.method, alignment.metric)
    result = denoise(request.pet, alignment.values if alignment is not None else None, request.spacing,
                     request.params, method=request.method, progress=progress,
                     snapshot_epochs=request.snapshot_epochs)
    return ComputeResult(alignment, result, worker_name(), time.perf_counter() - t0)
