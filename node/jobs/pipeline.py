"""The pipeline: the only place that knows the order of the stages.

read PET (+ MR) series -> align MR to the PET grid -> denoise -> encode DICOM outputs -> write.

Each stage hands the next a small immutable object; the stages themselves live in dicom_io/
(files) and models/ (numerics). `dipnode denoise` and the node's worker both call `run`.
"""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from dipnode.dicom_io.derived_pet import write_derived_pet
from dipnode.dicom_io.parametric_map import write_data_weight_map, write_stability_map
from dipnode.dicom_io.provenance import OutputSpec, software_version
from dipnode.dicom_io.series import load_volume, read_datasets, split_series
from dipnode.dicom_io.uids import derive_uid
from dipnode.dicom_io.volume import Volume
from dipnode.models.align import AlignedMr, align_mr_to_pet
from dipnode.models.denoise import DenoiseResult, denoise
from dipnode.models.guard import GuardParams
from dipnode.models.params import DipParams, Method
from dipnode.node.settings import OutputSettings

log = logging.getLogger(__name__)

Progress = Callable[[int, int, float], None]


class PipelineError(ValueError):
    """A study cannot be processed; the message says why in words a technologist can act on."""


class MrUnusableError(PipelineError):
    """The MR series could not be loaded or put on the PET grid: the node passes it over and
    chooses another MR (or falls back) rather than failing the job while another may serve."""


@dataclass(frozen=True)
class OutputOptions:
    """What to write and how to label it. Series number 0: not written. The defaults live in
    one place, the settings' [output] (:meth:`from_settings`)."""

    series_number_pet: int
    series_number_map: int
    series_number_map_plain: int
    series_number_weight: int
    series_number_weight_plain: int
    description_prefix: str
    research: bool
    # Output UIDs derive from this seed; None: from the sources and the parameters, so running
    # the same inputs again gives the same UIDs (a re-send is idempotent). The node passes its
    # job's seed, which a deliberate re-run changes.
    uid_seed: str | None = None

    @classmethod
    def from_settings(cls, output: OutputSettings | None = None, *, study_job_index: int = 0,
                      uid_seed: str | None = None) -> OutputOptions:
        """``output`` (default: the defaults of [output]) for the n-th job of a study
        (:func:`output_series_numbers`); `dipnode denoise` writes what the node sends."""
        o = output if output is not None else OutputSettings()
        numbers = output_series_numbers(
            (o.series_number_pet or 0, o.series_number_map or 0, o.series_number_map_plain or 0,
             o.series_number_weight or 0, o.series_number_weight_plain or 0), study_job_index)
        return cls(*numbers, description_prefix=o.description_prefix, research=o.research,
                   uid_seed=uid_seed)


def output_series_numbers(configured: tuple[int, ...], study_job_index: int) -> tuple[int, ...]:
    """Series Numbers for the n-th job of a study (n = ``study_job_index``, from 0).

    Two PET series of one study (or a re-run) must not come back under one number: the n-th
    job adds n times the span of the configured numbers (highest - lowest + 1) to each, so the
    blocks never overlap - with the defaults 1001-1005, then 1006-1010, ... Unset (0) stays 0.
    The node's index counts every job of the study in job order, so a job's numbers never change.
    """
    used = [n for n in configured if n]
    span = max(used) - min(used) + 1
    offset = study_job_index * span
    return tuple(n + offset if n else 0 for n in configured)


@dataclass(frozen=True)
class PetMrPair:
    pet: Volume
    mr: Volume | None


@dataclass(frozen=True)
class AlignedPair:
    pet: Volume
    mr_on_pet: np.ndarray | None = field(repr=False)
    alignment: AlignedMr | None


@dataclass(frozen=True)
class PipelineResult:
    method: Method
    params: DipParams
    pet_files: tuple[Path, ...]
    map_files: tuple[Path, ...]
    denoised: DenoiseResult = field(repr=False)
    alignment: AlignedMr | None
    pet: Volume = field(repr=False)
    mr_on_pet: np.ndarray | None = field(repr=False, default=None)
    weight_files: tuple[Path, ...] = ()

    @property
    def files(self) -> tuple[Path, ...]:
        return self.pet_files + self.map_files + self.weight_files


def load_single_series(paths: Sequence[Path], modality: str) -> Volume:
    """The one series of `modality` among `paths` (a folder may hold several series)."""
    datasets = read_datasets(paths)
    groups = [g for g in split_series(datasets).values() if str(g[0].get("Modality", "")) == modality]
    if not groups:
        raise PipelineError(f"no {modality} series among {len(datasets)} DICOM files")
    if len(groups) > 1:
        uids = ", ".join(str(g[0].SeriesInstanceUID) for g in groups)
        raise PipelineError(f"several {modality} series found ({uids}); pass one series")
    return load_volume(groups[0], modality=modality)


def align(pair: PetMrPair) -> AlignedPair:
    if pair.mr is None:
        return AlignedPair(pair.pet, None, None)
    same_for = pair.mr.frame_of_reference_uid == pair.pet.frame_of_reference_uid
    aligned = align_mr_to_pet(
        pair.mr.values, pair.mr.geometry.affine, pair.pet.values, pair.pet.geometry.affine,
        same_frame_of_reference=same_for,
    )
    log.info("aligned MR %s to PET %s by %s (metric %s)", pair.mr.series_instance_uid,
             pair.pet.series_instance_uid, aligned.method, aligned.metric)
    return AlignedPair(pair.pet, aligned.values, aligned)


def describe(method: Method, params: DipParams, pair: PetMrPair,
             result: DenoiseResult | None = None) -> str:
    """Derivation Description (0008,2111): the method, its formula and parameters (<= 1024 chars).

    For SDIP the guard's threshold is the one this run used (``result.guard_info``).
    """
    if method is Method.GAUSSIAN:
        text = f"OSEM + Gaussian post-filter, FWHM {params.fwhm_voxels:g} voxels"
    else:
        names = {Method.SDIP: "SDIP with data-consistency guard (docs/METHOD.md)",
                 Method.SDIP_PAPER: "Stability-weighted conditional DIP, the paper's method "
                                    "(Hashimoto et al. 2025)",
                 Method.CDIP: "Conditional DIP (Hashimoto et al. 2025 baseline)"}
        text = (f"{names[method]}: f = 3D U-Net(MR) base {params.base_channels} depth "
                f"{params.depth}, L-BFGS {params.epochs} epochs lr {params.lr:g} max_iter "
                f"{params.max_iter}, seed {params.seed}")
        if params.input_jitter:
            text += f", input jitter {params.input_jitter:g}"
        if method.blends:
            text += (f"; S = std of outputs at epochs >= {params.sample_from} every "
                     f"{params.sample_every} ({params.n_samples} samples); "
                     f"S_norm = min({params.alpha:g}*S/mean(S), 1)")
        if method is Method.SDIP:
            f_is = "mean of those outputs" if params.average else "last output"
            info = result.guard_info if result is not None else None
            t = f"{info.threshold:.2f}" if info is not None and math.isfinite(info.threshold) else "t"
            text += (f"; f = {f_is}; G = guard: z = 2(sqrt(x0) - sqrt(f)) in the object, "
                     f"ball filters {'/'.join(f'{d:g}' for d in GuardParams().diameters_mm)} mm, "
                     f"T = (z_d - median)/(1.4826 MAD), detections = local max |T| > {t} "
                     f"(random-field FWE {params.guard_fwe:g}, two-sided), "
                     f"G = min(|T| - {t}, 1) over the ball; w = max(S_norm, G); "
                     f"x = w*x0 + (1-w)*f")
        elif method is Method.SDIP_PAPER:
            text += "; x = S_norm*x0 + (1-S_norm)*f (f = last output)"
    if pair.mr is not None:
        text += f"; MR prior series {pair.mr.series_instance_uid}"
        if pair.mr.study_instance_uid != pair.pet.study_instance_uid:
            text += f" of study {pair.mr.study_instance_uid}"
    return text[:1024]


def series_descriptions(prefix: str, method: Method, params: DipParams) -> dict[str, str]:
    """Series Description (0008,103E, LO: <= 64 characters) of each output, as a PACS lists it:
    the prefix (routing rules match it so that outputs are not routed back), what the series
    is, and the method: "dipnode PET SDIP a0.6", "dipnode stability map", "dipnode data
    weight". The writers append " [RESEARCH]" while outputs are labelled research."""
    if method is Method.SDIP:
        name = f"SDIP a{params.alpha:g}"
    elif method is Method.SDIP_PAPER:
        # two significant digits: with the longest prefix the name has 16 characters of LO's 64
        name = f"SDIP-paper a{params.alpha:.2g}"
    elif method is Method.CDIP:
        name = "cDIP"
    else:
        name = f"Gaussian {params.fwhm_voxels:.3g} vx"
    lead = f"{prefix} " if prefix else ""
    return {"pet": f"{lead}PET {name}", "map": f"{lead}stability map",
            "map-plain": f"{lead}stability map Bq/ml", "weight": f"{lead}data weight",
            "weight-plain": f"{lead}data weight %"}


def content_uid_seed(method: Method, params: DipParams, pair: PetMrPair) -> str:
    """Outputs derive from the sources and the parameters: a re-send of the same run is idempotent."""
    payload = {
        "pet": pair.pet.series_instance_uid,
        "pet_instances": list(pair.pet.sop_instance_uids),
        "mr": pair.mr.series_instance_uid if pair.mr else None,
        "method": method.value,
        "params": {k: v for k, v in params.as_dict().items() if k != "device"},
    }
    return derive_uid("dipnode-run", json.dumps(payload, sort_keys=True))


def encode_and_write(aligned: AlignedPair, result: DenoiseResult, pair: PetMrPair,
                     options: OutputOptions, out_dir: Path) -> tuple[list[Path], list[Path], list[Path]]:
    """Write the derived PET, the stability map and the data weight; return their files."""
    method, params = result.method, result.params
    seed = options.uid_seed or content_uid_seed(method, params, pair)
    now = datetime.now(timezone.utc).astimezone()
    derivation = describe(method, params, pair, result)
    descriptions = series_descriptions(options.description_prefix, method, params)
    # The writers append " [RESEARCH]" to the description while spec.research is set.

    def spec(role: str, number: int, description: str) -> OutputSpec:
        return OutputSpec(
            series_instance_uid=derive_uid(seed, role), series_number=number,
            series_description=description[:64], derivation_description=derivation,
            uid_seed=derive_uid(seed, role, "instances"), content_datetime=now,
            software_version=software_version(), research=options.research,
        )

    pet_files = write_derived_pet(aligned.pet, result.denoised,
                                  spec("pet", options.series_number_pet, descriptions["pet"]), out_dir / "pet")
    map_files: list[Path] = []
    if result.stability is not None and options.series_number_map:
        map_files.append(write_stability_map(aligned.pet, result.stability,
                                             spec("map", options.series_number_map, descriptions["map"]),
                                             out_dir / "map", mr_reference_note=derivation))
        if options.series_number_map_plain:
            map_files += write_derived_pet(aligned.pet, result.stability,
                                           spec("map-plain", options.series_number_map_plain,
                                                descriptions["map-plain"]), out_dir / "map-plain")
    weight_files: list[Path] = []
    if result.data_weight is not None and options.series_number_weight:
        weight_files.append(write_data_weight_map(aligned.pet, result.data_weight,
                                                  spec("weight", options.series_number_weight,
                                                       descriptions["weight"]),
                                                  out_dir / "weight", mr_reference_note=derivation))
        if options.series_number_weight_plain:
            # Percent, Units PCNT: a plain viewer shows "share of the measured value, %".
            weight_files += write_derived_pet(aligned.pet, 100.0 * result.data_weight,
                                              spec("weight-plain", options.series_number_weight_plain,
                                                   descriptions["weight-plain"]),
                                              out_dir / "weight-plain", units="PCNT")
    return pet_files, map_files, weight_files


def run(pet_paths: Sequence[Path], mr_paths: Sequence[Path] | None, out_dir: Path, *,
        method: Method, params: DipParams, options: OutputOptions | None = None,
        progress: Progress | None = None, snapshot_epochs: Sequence[int] = ()) -> PipelineResult:
    """Denoise one PET series (with its MR for the DIP methods) and write the DICOM outputs."""
    if method.needs_mr and not mr_paths:
        raise PipelineError(f"method {method.value} needs an MR series; none was given")
    options = options if options is not None else OutputOptions.from_settings()
    pet = load_single_series(pet_paths, "PT")
    try:
        mr = load_single_series(mr_paths, "MR") if (mr_paths and method.needs_mr) else None
        pair = PetMrPair(pet, mr)
        aligned = align(pair)
    except ValueError as exc:  # DicomInputError, AlignmentError, PipelineError: all ValueErrors
        if mr_paths and method.needs_mr:
            raise MrUnusableError(f"MR unusable: {type(exc).__name__}: {exc}") from exc
        raise
    result = denoise(pet.values, aligned.mr_on_pet, pet.geometry.spacing, params, method=method,
                     progress=progress, snapshot_epochs=snapshot_epochs)
    pet_files, map_files, weight_files = encode_and_write(aligned, result, pair, options, out_dir)
    log.info("series %s denoised by %s in %.1f s: %d PET + %d map + %d weight files",
             pet.series_instance_uid, method.value, result.timings.get("total", float("nan")),
             len(pet_files), len(map_files), len(weight_files))
    return PipelineResult(method, params, tuple(pet_files), tuple(map_files), result,
                          aligned.alignment, pet, aligned.mr_on_pet, tuple(weight_files))
