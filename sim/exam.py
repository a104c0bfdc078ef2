"""A realistic PET/CT study and the patient's earlier MR exam, as a PACS would hold them.

A PET/CT study is a PET series and a CT series; an MR exam is many series, of which only the
3D T1 is a good prior for the DIP. The exam written here (tiny volumes, for tests) is:

1. a 3-plane localizer: axial, sagittal and coronal slices in ONE series;
2. an axial 2D T2 (thick slices);
3. a DWI with two b-values (0 and 1000) at the same slice positions;
4. the ADC map derived from it (Image Type DERIVED\\PRIMARY\\DIFFUSION\\ADC);
5. a sagittal 3D T1 MPRAGE (the prior the node should choose).

Headers follow a common vendor's conventions (Image Type values, Series Descriptions such as
``t1_mprage_sag_p2_iso``). The MR exam is its own study, ``mr_days_before`` days before the
PET, in its own Frame of Reference with a rigid head motion, so the node must register it. The
MR images are the phantom's T1-like image resampled onto each series' grid (T2 and DWI invert
its contrast), so the T1 and the T2 both register to the PET.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, MRImageStorage

from dipnode.dicom_io.uids import derive_uid
from dipnode.models.align import resample_to_grid
from dipnode.sim.dicom_study import (
    StudyInfo,
    _base_dataset,
    _check_affine,
    _ds_time,
    _finish,
    _pixels,
    _plane,
    new_study,
    write_pet_series,
)
from dipnode.sim.pet_sim import simulate_osem
from dipnode.sim.phantom import Phantom, make_phantom, phantom_affine
from dipnode.sim.study import rigid_motion

__all__ = [
    "AXIAL", "CORONAL", "MR_SERIES", "SAGITTAL", "MrPart", "RealisticExam", "head_centre", "head_extent", "mr_image",
    "write_ct_series", "write_mr_images", "write_realistic_exam",
]

# The exam's MR series in acquisition (and push) order: name -> (number, description).
MR_SERIES: dict[str, tuple[int, str]] = {
    "localizer": (1, "localizer"),
    "t2": (2, "t2_tse_tra"),
    "dwi": (3, "ep2d_diff_b0_1000_tra"),
    "adc": (4, "ep2d_diff_b0_1000_tra_ADC"),
    "t1": (5, "t1_mprage_sag_p2_iso"),
}


@dataclass(frozen=True)
class MrPart:
    """One stack of slices of an MR series: values (k, j, i) on ``affine``'s grid, with an
    optional Diffusion b-value for every slice of it."""

    values: np.ndarray = field(repr=False)
    affine: np.ndarray = field(repr=False)
    b_value: float | None = None


def _grid(centre: np.ndarray, axes: np.ndarray, spacing: tuple[float, float, float],
          extent_mm: tuple[float, float, float]) -> tuple[np.ndarray, tuple[int, int, int]]:
    """An affine with unit axes (columns i, j, k) and spacings, centred on ``centre``, covering
    ``extent_mm`` along each axis; returns (affine, (k, j, i) shape)."""
    n = [max(2, int(np.ceil(e / s))) for e, s in zip(extent_mm, spacing)]
    a = np.eye(4)
    a[:3, :3] = axes * np.asarray(spacing)
    a[:3, 3] = centre - a[:3, :3] @ ((np.asarray(n) - 1) / 2.0)
    return a, (n[2], n[1], n[0])


# Unit axes (columns: along a row, down a column, slice normal) in patient LPS.
AXIAL = np.array([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]).T
SAGITTAL = np.array([[0, 1.0, 0], [0, 0, -1.0], [-1.0, 0, 0]]).T  # rows A->P, columns S->I
CORONAL = np.array([[1.0, 0, 0], [0, 0, -1.0], [0, 1.0, 0]]).T  # rows R->L, columns S->I


def head_centre(phantom: Phantom) -> np.ndarray:
    """The centre of the phantom's grid in patient LPS mm."""
    shape_kji = np.asarray(phantom.shape, float)
    return (phantom_affine(phantom) @ np.r_[(shape_kji[::-1] - 1) / 2.0, 1.0])[:3]


def head_extent(phantom: Phantom) -> tuple[float, float, float]:
    """The phantom grid's size along x, y, z in mm."""
    e = np.asarray(phantom.shape, float)[::-1] * np.asarray(phantom.spacing)[::-1]
    return float(e[0]), float(e[1]), float(e[2])


def mr_image(phantom: Phantom, motion: np.ndarray, axes: np.ndarray, spacing: tuple[float, float, float],
             extent_mm: tuple[float, float, float], contrast: str = "t1") -> MrPart:
    """The phantom's anatomy as an MR stack in a session where the head moved by ``motion``
    (a PET point p lies at motion @ p): scanner planes ``axes`` (columns: row, column, normal
    directions, e.g. SAGITTAL) follow the moved head, ``spacing`` and ``extent_mm`` along them.
    contrast "t2" inverts the T1-like image inside the head (CSF and grey matter bright)."""
    centre = (motion @ np.r_[head_centre(phantom), 1.0])[:3]
    affine, shape = _grid(centre, motion[:3, :3] @ axes, spacing, extent_mm)
    # Resampling asks, for each MR voxel, where its anatomy is in the PET frame: inv(motion).
    values = resample_to_grid(phantom.mr, phantom_affine(phantom), shape, affine, transform=np.linalg.inv(motion))
    if contrast == "t2":
        inside = values > 0.05 * float(values.max())
        values = np.where(inside, float(values.max()) * 1.1 - values, 0.0)
    return MrPart(values.astype(np.float32), affine)


def write_mr_images(parts: list[MrPart], out_dir: Path, *, study: StudyInfo, series_uid: str,
                    series_number: int, description: str, image_type: list[str] | tuple[str, ...],
                    acquisition_type: str = "2D", frame_of_reference_uid: str | None = None,
                    scanning_sequence: tuple[str, ...] = ("SE",), sequence_variant: tuple[str, ...] = ("SK",),
                    repetition_time: float = 4000.0, echo_time: float = 90.0,
                    inversion_time: float | None = None) -> list[Path]:
    """Write one MR series made of ``parts`` (instances numbered on across parts).

    Unlike dicom_study.write_mr_series, a series here may hold several orientations (a
    localizer) or several slices at one position (DWI b-values), as real exams do. Values are
    scaled to 12 bits over the whole series (the MR IOD has no Rescale Slope, PS3.3 C.8.3.1).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hi = max(float(np.max(p.values)) for p in parts)
    when = dt.datetime.combine(study.study_date, dt.time(9, 0, 0)) + dt.timedelta(minutes=5 * series_number)
    paths: list[Path] = []
    n = 0
    for part in parts:
        a = _check_affine(part.affine, np.asarray(part.values).shape, "write_mr_images")
        scaled = np.clip(np.asarray(part.values, float), 0, None) / (hi if hi > 0 else 1.0) * 4095.0
        for k in range(scaled.shape[0]):
            n += 1
            ds = _base_dataset(study, MRImageStorage, derive_uid(series_uid, str(n)))
            if frame_of_reference_uid:
                ds.FrameOfReferenceUID = frame_of_reference_uid
            ds.Modality = "MR"
            ds.SeriesInstanceUID = series_uid
            ds.SeriesNumber = series_number
            ds.SeriesDescription = description
            ds.ProtocolName = description
            ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = when.strftime("%Y%m%d")
            ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = _ds_time(when)
            ds.InstanceNumber = n
            ds.ImageType = list(image_type)
            ds.ScanningSequence = list(scanning_sequence)
            ds.SequenceVariant = list(sequence_variant)
            ds.ScanOptions = ""
            ds.PatientPosition = "HFS"
            ds.MRAcquisitionType = acquisition_type
            ds.RepetitionTime = repetition_time
            ds.EchoTime = echo_time
            ds.EchoTrainLength = 1
            ds.MagneticFieldStrength = 3.0
            ds.LossyImageCompression = "00"
            if part.b_value is not None:
                ds.DiffusionBValue = float(part.b_value)  # (0018,9087)
            if inversion_time is not None:  # type 2C: required with IR in Scanning Sequence
                ds.InversionTime = inversion_time
            _plane(ds, a, k)
            _pixels(ds, np.rint(scaled[k]), signed=False)
            paths.append(_finish(ds, out / f"MR_{series_number:03d}_{n:04d}.dcm", UID(ExplicitVRLittleEndian)))
    return paths


def write_ct_series(hu: np.ndarray, affine: np.ndarray, out_dir: Path, *, study: StudyInfo,
                    series_number: int = 2, description: str = "CT Brain AC") -> list[Path]:
    """The CT of a PET/CT (attenuation correction), one file per slice: CT Image IOD, HU as
    stored + Rescale Intercept -1024 (PS3.3 C.8.2.1)."""
    a = _check_affine(affine, hu.shape, "write_ct_series")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    series_uid = derive_uid("sim-ct-series", study.study_instance_uid, str(series_number))
    when = dt.datetime.combine(study.study_date, dt.time(9, 50, 0))
    paths = []
    for k in range(hu.shape[0]):
        ds = _base_dataset(study, CTImageStorage, derive_uid(series_uid, str(k)))
        ds.Modality = "CT"
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = series_number
        ds.SeriesDescription = description
        ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = when.strftime("%Y%m%d")
        ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = _ds_time(when)
        ds.InstanceNumber = k + 1
        ds.AcquisitionNumber = 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.KVP = 120.0
        ds.PatientPosition = "HFS"
        ds.RescaleIntercept = -1024.0
        ds.RescaleSlope = 1.0
        ds.RescaleType = "HU"
        _plane(ds, a, k)
        _pixels(ds, np.clip(np.rint(hu[k] + 1024.0), 0, 4095), signed=False)
        ds.BitsStored = 12
        ds.HighBit = 11
        paths.append(_finish(ds, out / f"CT_{series_number:03d}_{k + 1:04d}.dcm", UID(ExplicitVRLittleEndian)))
    return paths


@dataclass(frozen=True)
class RealisticExam:
    """What was written: files by series, the UIDs a test checks, and the ground truth."""

    pet_files: tuple[Path, ...]
    ct_files: tuple[Path, ...]
    mr_files: dict[str, tuple[Path, ...]]  # by MR_SERIES name, in acquisition order
    mr_series_uids: dict[str, str]
    pet_series_uid: str
    pet_study: StudyInfo
    mr_study: StudyInfo
    phantom: Phantom = field(repr=False)
    mr_motion: np.ndarray = field(repr=False)

    @property
    def all_mr_files(self) -> list[Path]:
        return [p for name in MR_SERIES for p in self.mr_files[name]]


def _stamp(paths: list[Path], **attributes: str) -> None:
    for p in paths:
        ds = dcmread(p)
        for k, v in attributes.items():
            setattr(ds, k, v)
        ds.save_as(p, enforce_file_format=True)


def write_realistic_exam(out_dir: Path, *, voxel_mm: float = 4.0, dose_fraction: float = 0.1,
                         patient_id: str = "EXAM01", issuer: str = "HOSP", seed: int = 0,
                         mr_days_before: int = 3, t1_voxel_mm: float = 3.0,
                         corrupt_t1: bool = False) -> RealisticExam:
    """Write out_dir/pet, out_dir/ct and out_dir/mr/<name> (see the module docstring).

    corrupt_t1: the T1's pixels are noise (its headers unchanged), so it fails to register:
    the node must pass it over for the next usable MR (the axial T2).
    """
    out = Path(out_dir)
    phantom = make_phantom(voxel_mm)
    pet_affine = phantom_affine(phantom)
    osem = simulate_osem(phantom.activity, dose_fraction, seed=seed, iterations=4, subsets=16)
    pet_study = new_study(patient_id, seed=f"petct-{seed}")
    mr_study = replace(new_study(patient_id, seed=f"mrexam-{seed}"), accession_number=f"ACCMR{seed}",
                       study_date=pet_study.study_date - dt.timedelta(days=mr_days_before))
    pet_uid = derive_uid("sim-pet-series", patient_id, "petct", str(seed))
    pet_files = write_pet_series(osem, pet_affine, out / "pet", study=pet_study, series_number=3,
                                 description="PET Brain FDG AC", series_uid=pet_uid)
    head = phantom.activity > 0
    hu = np.where(head, 40.0, -1000.0)
    hu[phantom.masks["brain"]] = 35.0
    ct_files = write_ct_series(hu, pet_affine, out / "ct", study=pet_study)

    motion = rigid_motion((3.0, -4.0, 5.0), (5.0, -6.0, 7.0), head_centre(phantom))

    def image(axes: np.ndarray, spacing: tuple[float, float, float], extent_mm: tuple[float, float, float],
              contrast: str = "t1") -> MrPart:
        return mr_image(phantom, motion, axes, spacing, extent_mm, contrast)

    xyz = head_extent(phantom)
    uid = {name: derive_uid("sim-mr-series", mr_study.study_instance_uid, name) for name in MR_SERIES}
    common = dict(study=mr_study, frame_of_reference_uid=mr_study.frame_of_reference_uid)
    mr: dict[str, list[Path]] = {}
    mr_dir = out / "mr"

    # 1. 3-plane localizer: three thick slices per plane, one series.
    loc_parts = []
    for axes, ext in ((AXIAL, (xyz[0], xyz[1], 20.0)), (SAGITTAL, (xyz[1], xyz[2], 20.0)),
                      (CORONAL, (xyz[0], xyz[2], 20.0))):
        loc_parts.append(image(axes, (4.0, 4.0, 8.0), ext))
    n, d = MR_SERIES["localizer"]
    mr["localizer"] = write_mr_images(loc_parts, mr_dir / "localizer", series_uid=uid["localizer"],
                                      series_number=n, description=d,
                                      image_type=["ORIGINAL", "PRIMARY", "M", "NORM", "DIS2D"],
                                      scanning_sequence=["GR"], sequence_variant=["SP"],
                                      repetition_time=8.6, echo_time=4.0, **common)
    # 2. axial 2D T2, 6 mm slices.
    n, d = MR_SERIES["t2"]
    mr["t2"] = write_mr_images([image(AXIAL, (3.0, 3.0, 6.0), xyz, "t2")], mr_dir / "t2",
                               series_uid=uid["t2"], series_number=n, description=d,
                               image_type=["ORIGINAL", "PRIMARY", "M", "NORM", "DIS2D"], **common)
    # 3. DWI: b = 0 and b = 1000 at the same positions; 4. its ADC map.
    b0 = image(AXIAL, (4.0, 4.0, 6.0), xyz, "t2")
    b1000 = MrPart(b0.values * 0.3, b0.affine, 1000.0)
    n, d = MR_SERIES["dwi"]
    epi = dict(scanning_sequence=["EP"], sequence_variant=["SK", "SP"], repetition_time=5000.0, echo_time=70.0)
    mr["dwi"] = write_mr_images([replace(b0, b_value=0.0), b1000], mr_dir / "dwi", series_uid=uid["dwi"],
                                series_number=n, description=d,
                                image_type=["ORIGINAL", "PRIMARY", "DIFFUSION", "NONE"], **epi, **common)
    n, d = MR_SERIES["adc"]
    mr["adc"] = write_mr_images([MrPart(b0.values * 0.8, b0.affine)], mr_dir / "adc", series_uid=uid["adc"],
                                series_number=n, description=d,
                                image_type=["DERIVED", "PRIMARY", "DIFFUSION", "ADC"], **epi, **common)
    # 5. sagittal 3D T1 MPRAGE.
    t1 = image(SAGITTAL, (t1_voxel_mm,) * 3, (xyz[1], xyz[2], xyz[0]))
    if corrupt_t1:
        t1 = MrPart(np.random.default_rng(seed).uniform(0, 1000, t1.values.shape).astype(np.float32), t1.affine)
    n, d = MR_SERIES["t1"]
    mr["t1"] = write_mr_images([t1], mr_dir / "t1", series_uid=uid["t1"], series_number=n, description=d,
                               image_type=["ORIGINAL", "PRIMARY", "M", "ND", "NORM"], acquisition_type="3D",
                               scanning_sequence=["GR", "IR"], sequence_variant=["SP", "MP"],
                               repetition_time=2300.0, echo_time=2.98, inversion_time=900.0, **common)
    if issuer:
        _stamp([*pet_files, *ct_files, *(p for ps in mr.values() for p in ps)], IssuerOfPatientID=issuer)
    return RealisticExam(tuple(pet_files), tuple(ct_files), {k: tuple(v) for k, v in mr.items()}, uid,
                         pet_uid, pet_study, mr_study, phantom, motion)
