"""Write synthetic PET and MR series as DICOM files, for tests and the demo.

The headers look like a scanner's: the PET carries what the SUV recipe and the loader need
(Units BQML, Decay Correction START, Radiopharmaceutical Information, Patient Weight, per-slice
Rescale Slope); the MR is a 3D acquisition that may sit in its own Frame of Reference with any
orientation, so registration can be tested. Every file passes dciodvfy without errors.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    MRImageStorage,
    PositronEmissionTomographyImageStorage,
)

from dipnode.dicom_io.uids import derive_uid

F18_HALF_LIFE_S = 6586.2  # s, the 18F half-life scanners write in Radionuclide Half Life


@dataclass(frozen=True)
class StudyInfo:
    """Patient and study attributes shared by every series of one synthetic study."""

    patient_id: str
    patient_name: str
    study_instance_uid: str
    frame_of_reference_uid: str
    accession_number: str
    study_date: dt.date
    study_time: dt.time = dt.time(9, 0, 0)
    study_id: str = "1"
    patient_birth_date: str = "19600101"
    patient_sex: str = "O"
    referring_physician_name: str = ""


def new_study(patient_id: str, seed: str | int = 0) -> StudyInfo:
    """A StudyInfo whose UIDs depend only on ``patient_id`` and ``seed``."""
    if not patient_id:
        raise ValueError(f"new_study: argument patient_id expected a non-empty str, got {patient_id!r}")
    key = f"{patient_id}/{seed}"
    return StudyInfo(
        patient_id=patient_id,
        patient_name=f"SIM^{patient_id}",
        study_instance_uid=derive_uid("sim-study", key),
        frame_of_reference_uid=derive_uid("sim-for", key),
        accession_number=f"ACC{str(seed)[:12]}",
        study_date=dt.date(2024, 5, 17),
    )


def _check_affine(affine: np.ndarray, shape: tuple[int, int, int], who: str) -> np.ndarray:
    a = np.asarray(affine, dtype=float)
    if a.shape != (4, 4):
        raise ValueError(f"{who}: argument affine expected shape (4, 4), got {a.shape}")
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"{who}: argument values expected a 3D array (k, j, i), got shape {shape}")
    cols = a[:3, :3]
    norms = np.linalg.norm(cols, axis=0)
    if np.any(norms <= 0):
        raise ValueError(f"{who}: argument affine expected non-zero voxel steps, got norms {norms}")
    u = cols / norms
    # The classic single-frame IODs describe a stack only through IOP and per-slice IPP; a
    # slice step that is not along the row x column normal would be a gantry tilt.
    normal = np.cross(u[:, 0], u[:, 1])
    if abs(u[:, 0] @ u[:, 1]) > 1e-6 or abs(abs(normal @ u[:, 2]) - 1) > 1e-6:
        raise ValueError(f"{who}: argument affine expected orthogonal axes, got\n{a}")
    return a


def _ds_time(t: dt.datetime) -> str:
    return t.strftime("%H%M%S.%f")[:13]


def _base_dataset(study: StudyInfo, sop_class: UID, sop_uid: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian  # compress() switches it when asked
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.PatientName = study.patient_name
    ds.PatientID = study.patient_id
    ds.PatientBirthDate = study.patient_birth_date
    ds.PatientSex = study.patient_sex
    ds.StudyInstanceUID = study.study_instance_uid
    ds.StudyDate = study.study_date.strftime("%Y%m%d")
    ds.StudyTime = study.study_time.strftime("%H%M%S")
    ds.StudyID = study.study_id
    ds.AccessionNumber = study.accession_number
    ds.ReferringPhysicianName = study.referring_physician_name
    ds.FrameOfReferenceUID = study.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = "dipnode simulator"
    ds.ManufacturerModelName = "sim"
    ds.BodyPartExamined = "HEAD"  # not a paired structure, so Laterality may be absent
    return ds


def _plane(ds: Dataset, affine: np.ndarray, k: int) -> None:
    """Image Plane module (PS3.3 C.7.6.2) for slice k of the affine's grid."""
    cols = affine[:3, :3]
    norms = np.linalg.norm(cols, axis=0)
    u = cols / norms
    ds.ImageOrientationPatient = [float(f"{x:.8f}") for x in (*u[:, 0], *u[:, 1])]
    ipp = affine @ np.array([0.0, 0.0, float(k), 1.0])
    ds.ImagePositionPatient = [float(f"{x:.6f}") for x in ipp[:3]]
    # PixelSpacing is (row spacing = step along j, column spacing = step along i).
    ds.PixelSpacing = [float(f"{norms[1]:.6f}"), float(f"{norms[0]:.6f}")]
    ds.SliceThickness = float(f"{norms[2]:.6f}")
    normal = np.cross(u[:, 0], u[:, 1])
    ds.SliceLocation = float(f"{float(ipp[:3] @ normal):.6f}")


def _pixels(ds: Dataset, stored: np.ndarray, signed: bool) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(stored.shape[0]), int(stored.shape[1])
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if signed else 0
    ds.PixelData = np.ascontiguousarray(stored.astype("<i2" if signed else "<u2")).tobytes()


def _finish(ds: Dataset, path: Path, transfer_syntax: UID) -> Path:
    if UID(transfer_syntax) != ExplicitVRLittleEndian:
        # Lossless encoders only (J2K lossless, RLE, JPEG-LS lossless) via pydicom's plugins.
        ds.compress(UID(transfer_syntax))
    ds.save_as(path, enforce_file_format=True)
    return path


def write_pet_series(
    values_bqml: np.ndarray,
    affine: np.ndarray,
    out_dir: str | Path,
    *,
    study: StudyInfo,
    series_number: int = 1,
    description: str = "PET Brain FDG",
    transfer_syntax: str | UID = ExplicitVRLittleEndian,
    injected_dose_bq: float = 185e6,
    weight_kg: float = 70.0,
    series_datetime: dt.datetime | None = None,
    uptake_s: float = 3600.0,
    frame_duration_ms: int = 600000,
    units: str = "BQML",
    series_type: tuple[str, str] = ("STATIC", "IMAGE"),
    signed: bool = True,
    series_uid: str | None = None,
) -> list[Path]:
    """Write one static PET series, one file per slice (k), and return the paths in k order.

    values_bqml (k, j, i) are stored as 16-bit integers with a per-slice Rescale Slope
    (signed int16 by default, uint16 with signed=False). transfer_syntax may be JPEG 2000
    Lossless, RLE Lossless or JPEG-LS Lossless: encoded with Dataset.compress(); OpenJPEG's
    default six wavelet levels need at least 32 rows and columns for JPEG 2000.
    series_datetime defaults to 10:00 on the study date; injection is uptake_s earlier.
    """
    vol = np.asarray(values_bqml, dtype=np.float64)
    a = _check_affine(affine, vol.shape, "write_pet_series")
    if weight_kg <= 0 or injected_dose_bq <= 0:
        raise ValueError(
            f"write_pet_series: arguments weight_kg, injected_dose_bq expected > 0, "
            f"got {weight_kg}, {injected_dose_bq}"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = series_datetime or dt.datetime.combine(study.study_date, dt.time(10, 0, 0))
    injection = start - dt.timedelta(seconds=uptake_s)
    series_uid = series_uid or derive_uid("sim-pet-series", study.study_instance_uid, str(series_number))
    nslices = vol.shape[0]
    qmax = 32767 if signed else 65535
    paths: list[Path] = []
    for k in range(nslices):
        sop_uid = derive_uid(series_uid, str(k))
        ds = _base_dataset(study, PositronEmissionTomographyImageStorage, sop_uid)
        ds.Modality = "PT"
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = series_number
        ds.SeriesDescription = description
        ds.SeriesDate = start.strftime("%Y%m%d")
        ds.SeriesTime = _ds_time(start)
        ds.AcquisitionDate = ds.SeriesDate
        ds.AcquisitionTime = ds.SeriesTime
        ds.ContentDate = ds.SeriesDate
        ds.ContentTime = ds.SeriesTime
        ds.InstanceNumber = k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        # PET Series module (PS3.3 C.8.9.1)
        ds.Units = units
        ds.CountsSource = "EMISSION"
        ds.SeriesType = list(series_type)
        ds.NumberOfSlices = nslices
        ds.CorrectedImage = ["DECY", "ATTN", "SCAT", "DTIM", "RAN", "NORM"]
        ds.DecayCorrection = "START"
        ds.RandomsCorrectionMethod = "DLYD"
        ds.ReconstructionMethod = "OSEM3D 4i8s"
        ds.CollimatorType = "NONE"
        # PET Isotope module (PS3.3 C.8.9.2)
        rp = Dataset()
        nuclide = Dataset()
        nuclide.CodeValue = "C-111A1"
        nuclide.CodingSchemeDesignator = "SRT"
        nuclide.CodeMeaning = "^18^Fluorine"
        rp.RadionuclideCodeSequence = Sequence([nuclide])
        rp.Radiopharmaceutical = "Fluorodeoxyglucose"
        rp.RadiopharmaceuticalStartTime = _ds_time(injection)
        rp.RadiopharmaceuticalStartDateTime = injection.strftime("%Y%m%d%H%M%S.%f")[:21]
        rp.RadionuclideTotalDose = float(injected_dose_bq)
        rp.RadionuclideHalfLife = F18_HALF_LIFE_S
        rp.RadionuclidePositronFraction = 0.9673
        ds.RadiopharmaceuticalInformationSequence = Sequence([rp])
        # NM/PET Patient Orientation module (PS3.3 C.8.4.6): type 2 sequences, left empty
        ds.PatientOrientationCodeSequence = Sequence([])
        ds.PatientGantryRelationshipCodeSequence = Sequence([])
        ds.PatientWeight = float(weight_kg)
        ds.PatientSize = 1.75
        # PET Image module (PS3.3 C.8.9.4)
        ds.FrameReferenceTime = 0.0
        ds.ActualFrameDuration = int(frame_duration_ms)
        ds.ImageIndex = k + 1
        # Type 1C when Decay Correction is not NONE; the simulated values are already the
        # activity at series start, so the factor applied within the frame is taken as 1.
        ds.DecayFactor = 1.0
        ds.DoseCalibrationFactor = 1.0
        ds.RescaleIntercept = 0  # PS3.3 C.8.9.4.1.2: shall be 0 for PET
        ds.LossyImageCompression = "00"
        _plane(ds, a, k)
        sl = vol[k]
        peak = float(np.max(np.abs(sl))) if signed else float(np.max(sl))
        if not signed and float(np.min(sl)) < 0:
            raise ValueError("write_pet_series: argument values_bqml expected >= 0 for signed=False, "
                             f"got min {float(np.min(sl))}")
        slope = peak / qmax if peak > 0 else 1.0
        ds.RescaleSlope = float(f"{slope:.10g}")
        stored = np.rint(sl / float(ds.RescaleSlope))
        _pixels(ds, np.clip(stored, -qmax if signed else 0, qmax), signed)
        paths.append(_finish(ds, out / f"PT_{series_number:03d}_{k + 1:04d}.dcm", UID(transfer_syntax)))
    return paths


def write_mr_series(
    values: np.ndarray,
    affine: np.ndarray,
    out_dir: str | Path,
    *,
    study: StudyInfo,
    description: str = "T1 MPRAGE 3D",
    series_number: int = 2,
    frame_of_reference_uid: str | None = None,
    transfer_syntax: str | UID = ExplicitVRLittleEndian,
    series_uid: str | None = None,
) -> list[Path]:
    """Write one 3D MR series, one file per slice (k), and return the paths in k order.

    The MR Image IOD has no Rescale Slope (PS3.3 C.8.3.1), so the volume is scaled once so
    its maximum is 4095 (12-bit, like most scanners) and stored as unsigned integers; the
    loader returns these stored values. frame_of_reference_uid defaults to the study's (PET
    and MR then share one patient frame); give another to simulate a separate MR session.
    """
    vol = np.asarray(values, dtype=np.float64)
    a = _check_affine(affine, vol.shape, "write_mr_series")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lo, hi = float(vol.min()), float(vol.max())
    scaled = np.zeros_like(vol) if hi <= lo else (vol - lo) / (hi - lo) * 4095.0
    series_uid = series_uid or derive_uid("sim-mr-series", study.study_instance_uid, str(series_number))
    when = dt.datetime.combine(study.study_date, dt.time(9, 30, 0))
    paths: list[Path] = []
    for k in range(vol.shape[0]):
        sop_uid = derive_uid(series_uid, str(k))
        ds = _base_dataset(study, MRImageStorage, sop_uid)
        if frame_of_reference_uid:
            ds.FrameOfReferenceUID = frame_of_reference_uid
        ds.Modality = "MR"
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = series_number
        ds.SeriesDescription = description
        ds.SeriesDate = when.strftime("%Y%m%d")
        ds.SeriesTime = _ds_time(when)
        ds.AcquisitionDate = ds.SeriesDate
        ds.AcquisitionTime = ds.SeriesTime
        ds.ContentDate = ds.SeriesDate
        ds.ContentTime = ds.SeriesTime
        ds.InstanceNumber = k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        # MR Image module (PS3.3 C.8.3.1)
        ds.ScanningSequence = ["GR", "IR"]
        ds.SequenceVariant = ["SP", "MP"]
        ds.ScanOptions = ""  # type 2; IR is in Scanning Sequence, not a Scan Option
        ds.PatientPosition = "HFS"  # General Series; the PET IOD uses its orientation codes instead
        ds.MRAcquisitionType = "3D"
        ds.RepetitionTime = 2300.0
        ds.EchoTime = 2.98
        ds.InversionTime = 900.0
        ds.EchoTrainLength = 1
        ds.FlipAngle = 9.0
        ds.MagneticFieldStrength = 3.0
        ds.LossyImageCompression = "00"
        _plane(ds, a, k)
        _pixels(ds, np.rint(scaled[k]), signed=False)
        paths.append(_finish(ds, out / f"MR_{series_number:03d}_{k + 1:04d}.dcm", UID(transfer_syntax)))
    return paths
