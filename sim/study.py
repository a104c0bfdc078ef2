"""A whole synthetic brain FDG PET/MR study on disk: phantom -> low-dose OSEM -> DICOM.

The MR is written as its own study with its own Frame of Reference and a known rigid
motion (the paper's case: MR from a separate session), so the node must register it.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from scipy.spatial.transform import Rotation

from dipnode.dicom_io.uids import derive_uid
from dipnode.sim.dicom_study import StudyInfo, new_study, write_mr_series, write_pet_series
from dipnode.sim.pet_sim import simulate_osem
from dipnode.sim.phantom import Phantom, make_phantom, phantom_affine


@dataclass(frozen=True)
class PhantomStudy:
    """Paths and ground truth of a written study."""

    pet_dir: Path
    mr_dir: Path
    pet_files: tuple[Path, ...]
    mr_files: tuple[Path, ...]
    phantom: Phantom = field(repr=False)
    osem: np.ndarray = field(repr=False)             # the low-dose OSEM written as the PET series
    osem_full_dose: np.ndarray = field(repr=False)   # reference for bias
    pet_affine: np.ndarray = field(repr=False)
    mr_affine: np.ndarray = field(repr=False)
    mr_motion: np.ndarray = field(repr=False)        # 4x4, PET patient point -> MR patient point
    pet_study: StudyInfo
    mr_study: StudyInfo
    dose_fraction: float


def rigid_motion(rotation_deg: tuple[float, float, float], translation_mm: tuple[float, float, float],
                 centre: np.ndarray) -> np.ndarray:
    """4x4 rigid transform rotating about `centre` (patient mm), then translating."""
    r = Rotation.from_euler("xyz", rotation_deg, degrees=True).as_matrix()
    m = np.eye(4)
    m[:3, :3] = r
    m[:3, 3] = centre - r @ centre + np.asarray(translation_mm, float)
    return m


def write_phantom_study(out_dir: Path, *, voxel_mm: float = 4.0, dose_fraction: float = 0.1,
                        patient_id: str = "PHANTOM01", seed: int = 0,
                        mr_own_study: bool = True,
                        mr_rotation_deg: tuple[float, float, float] = (4.0, -3.0, 5.0),
                        mr_translation_mm: tuple[float, float, float] = (6.0, -4.0, 8.0),
                        phantom: Phantom | None = None) -> PhantomStudy:
    """Write PET (low dose) to out_dir/pet and MR to out_dir/mr; return paths and ground truth.

    mr_own_study=False writes the MR into the PET's study and frame of reference, unmoved
    (a PET/MR scanner's case).
    """
    phantom = phantom or make_phantom(voxel_mm)
    # 4 iterations x 16 subsets: closer to convergence than 3 x 8 (white matter +12 % there).
    osem = simulate_osem(phantom.activity, dose_fraction, seed=seed, iterations=4, subsets=16)
    full = simulate_osem(phantom.activity, 1.0, seed=seed + 1, iterations=4, subsets=16)
    pet_affine = phantom_affine(phantom)
    pet_study = new_study(patient_id, seed=f"pet-{seed}")
    if mr_own_study:
        mr_study = replace(new_study(patient_id, seed=f"mr-{seed}"),
                           accession_number=f"ACCMR{seed}",
                           study_date=pet_study.study_date - dt.timedelta(days=7))
        centre = (pet_affine @ np.r_[(np.array(phantom.shape[::-1]) - 1) / 2.0, 1.0])[:3]
        motion = rigid_motion(mr_rotation_deg, mr_translation_mm, centre)
    else:
        mr_study, motion = pet_study, np.eye(4)
    # The MR pixels are the phantom's; its geometry moves: a PET point p lies at motion @ p
    # in the MR's patient coordinates, so the MR voxel grid is motion @ pet_affine.
    mr_affine = motion @ pet_affine
    out_dir = Path(out_dir)
    pet_files = write_pet_series(osem, pet_affine, out_dir / "pet", study=pet_study,
                                 series_uid=derive_uid("sim-pet-series", patient_id, str(seed)))
    mr_files = write_mr_series(phantom.mr, mr_affine, out_dir / "mr", study=mr_study,
                               series_uid=derive_uid("sim-mr-series", patient_id, str(seed)))
    return PhantomStudy(out_dir / "pet", out_dir / "mr", tuple(pet_files), tuple(mr_files),
                        phantom, osem, full, pet_affine, mr_affine, motion, pet_study, mr_study,
                        dose_fraction)
