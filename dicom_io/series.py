"""Read DICOM files, split them into series and turn one series into a checked Volume.

Slices are ordered along the slice normal (row x column direction of Image Orientation
(Patient), PS3.3 C.7.6.2.1.1), never by Instance Number, and the loader refuses anything that
is not one regular orthogonal grid of a static image: a wrong geometry would silently misplace
the MR on the PET, and dynamic or non-BQML PET would make SUV wrong.
"""
from __future__ import annotations

import copy
import logging
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.tag import Tag

from dipnode.dicom_io.errors import (
    MalformedDicomError,
    DicomInputError,
    GeometryError,
    MixedSeriesError,
    UnsupportedImageError,
    UnsupportedPetError,
    missing,
)
from dipnode.dicom_io.volume import Geometry, Volume

log = logging.getLogger(__name__)

_MEDIA_DIRECTORY = "1.2.840.10008.1.3.10"  # Media Storage Directory Storage (DICOMDIR)
_ORIENTATION_TOL = 1e-4   # direction cosines written with ~6-8 decimals
_POSITION_TOL_MM = 0.01   # in-plane drift of IPP tolerated between slices
_SPACING_REL_TOL = 0.01   # 1 % of the slice step, as ITK/dcm2niix tolerate
# Value representations whose bytes depend on Specific Character Set (PS3.5 6.1.2.3): kept as
# received, never decoded and re-encoded (a name must survive byte for byte, PS3.5 6.1).
_TEXT_VRS = frozenset({"PN", "LO", "SH", "ST", "LT", "UT", "UC"})
# What every instance of one series shares with the others (PS3.3 C.7.1-C.7.4: Patient,
# Study, Frame of Reference modules are the same for all images of a series).
_IDENTITY = (("PatientID", "Patient ID"), ("IssuerOfPatientID", "Issuer of Patient ID"),
             ("StudyInstanceUID", "Study Instance UID"),
             ("FrameOfReferenceUID", "Frame of Reference UID"))


def raw_text_elements(ds: Dataset) -> dict[int, RawDataElement]:
    """The top-level text elements of ``ds`` that are still undecoded, by tag."""
    out: dict[int, RawDataElement] = {}
    for tag in list(ds.keys()):
        elem = ds.get_item(tag)
        if not isinstance(elem, RawDataElement):
            continue
        vr = elem.VR
        if vr is None:  # implicit VR: the dictionary's
            try:
                vr = dictionary_VR(tag)
            except KeyError:
                continue
        if vr in _TEXT_VRS:
            out[int(tag)] = elem
    return out


def _identity_value(ds: Dataset, keyword: str) -> bytes:
    """The value of ``keyword`` for comparison, without decoding text that is still raw."""
    tag = Tag(keyword)
    if tag not in ds:
        return b""
    elem = ds.get_item(tag)
    if isinstance(elem, RawDataElement):
        return bytes(elem.value or b"").rstrip(b" \x00")
    value = elem.value
    return ("" if value is None else str(value)).strip().encode("utf-8", "surrogateescape")


@dataclass(frozen=True)
class ReadReport:
    """What read_files found: the DICOM image datasets and the files skipped, with why."""

    datasets: tuple[Dataset, ...]
    skipped: tuple[tuple[Path, str], ...]


def read_files(paths: Iterable[str | Path]) -> ReadReport:
    """Read every path; skip non-DICOM files, DICOMDIRs and objects without Pixel Data."""
    datasets: list[Dataset] = []
    skipped: list[tuple[Path, str]] = []
    for p in map(Path, paths):
        try:
            ds = dcmread(p)
            text = raw_text_elements(ds)
            # pydicom converts element values lazily: touch them all now, so a malformed
            # element (unknown VR, bad length) is found here and not in a later stage.
            for _ in ds.iterall():
                pass
            for tag, elem in text.items():  # text stays as received (raw_text_elements)
                ds[tag] = elem
        except (InvalidDicomError, EOFError, OSError) as exc:
            skipped.append((p, f"not a readable DICOM file: {exc}"))
            continue
        except Exception as exc:  # untrusted bytes: pydicom raises many types on bad input
            skipped.append((p, f"malformed DICOM ({type(exc).__name__}: {exc})"))
            continue
        sop_class = str(getattr(ds.get("file_meta", Dataset()), "MediaStorageSOPClassUID", ""))
        if p.name.upper() == "DICOMDIR" or sop_class == _MEDIA_DIRECTORY:
            skipped.append((p, "DICOMDIR (media directory), not an image"))
            continue
        if "PixelData" not in ds:
            skipped.append((p, "no Pixel Data (not an image object)"))
            continue
        datasets.append(ds)
    for p, why in skipped:
        log.debug("skipped %s: %s", p, why)
    return ReadReport(tuple(datasets), tuple(skipped))


def read_datasets(paths: Iterable[str | Path]) -> list[Dataset]:
    """The image datasets among ``paths`` (see read_files for the skipped ones and why)."""
    return list(read_files(paths).datasets)


def split_series(datasets: Iterable[Dataset]) -> dict[str, list[Dataset]]:
    """Group datasets by Series Instance UID, keeping input order within a series."""
    out: dict[str, list[Dataset]] = defaultdict(list)
    for ds in datasets:
        uid = str(ds.get("SeriesInstanceUID", ""))
        if not uid:
            raise missing("SeriesInstanceUID", f"(SOP instance {ds.get('SOPInstanceUID', '?')})",
                          "grouping slices into series")
        out[uid].append(ds)
    return dict(out)


def load_series_dir(path: str | Path) -> list[Volume]:
    """Load every image series found under ``path`` (recursively), ordered by Series Number."""
    root = Path(path)
    if not root.is_dir():
        raise DicomInputError(f"load_series_dir: argument path expected a directory, got {root}")
    files = sorted(p for p in root.rglob("*") if p.is_file())
    groups = split_series(read_datasets(files))
    vols = [load_volume(g) for g in groups.values()]
    return sorted(vols, key=lambda v: (int(v.headers[0].get("SeriesNumber", 0) or 0),
                                       v.series_instance_uid))


def _floats(ds: Dataset, name: str, n: int, series: str) -> np.ndarray:
    value = ds.get(name)
    if value is None or len(value) != n:
        raise missing(name, series, f"geometry (expected {n} values, got {value!r})")
    return np.asarray([float(x) for x in value], dtype=float)


def _check_common(datasets: list[Dataset], modality: str | None) -> tuple[str, str]:
    """Same series, modality, no multi-frame; return (series UID, modality)."""
    series_uids = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
    if len(series_uids) != 1:
        raise MixedSeriesError(
            f"load_volume: expected datasets of one series, got {len(series_uids)}: "
            f"{sorted(series_uids)}"
        )
    series = series_uids.pop()
    modalities = {str(ds.get("Modality", "")) for ds in datasets}
    if len(modalities) != 1:
        raise MixedSeriesError(f"series {series}: Modality expected one value, got {sorted(modalities)}")
    found = modalities.pop()
    if modality is not None and found != modality:
        raise MixedSeriesError(f"series {series}: Modality expected {modality}, got {found}")
    first = datasets[0]
    for keyword, name in _IDENTITY:
        # Defence in depth behind the index (node/jobs/store.py): never one volume of two patients.
        # The message names UIDs and the attribute only, never a patient's values.
        expected = _identity_value(first, keyword)
        for ds in datasets[1:]:
            if _identity_value(ds, keyword) != expected:
                raise MixedSeriesError(
                    f"series {series}: {name} differs between instances {first.get('SOPInstanceUID', '?')} "
                    f"and {ds.get('SOPInstanceUID', '?')}; one series must be one patient, study and "
                    "frame of reference")
    for ds in datasets:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        if frames > 1 or "PerFrameFunctionalGroupsSequence" in ds:
            # Enhanced PET/MR keep geometry per frame in functional groups (PS3.3 C.7.6.16);
            # supporting them is future work, refusing is safer than guessing.
            raise UnsupportedImageError(
                f"series {series}: NumberOfFrames expected 1 (classic single-frame images), "
                f"got {frames} (enhanced multi-frame SOP class {ds.get('SOPClassUID', '?')})"
            )
    return series, found


def _check_pet(datasets: list[Dataset], series: str) -> str:
    """Static, BQML PET only (PS3.3 C.8.9.1); return Units."""
    first = datasets[0]
    units = str(first.get("Units", ""))
    if units != "BQML":
        # CNTS, GML (already SUV), PROPCPS ... need vendor factors or would double-convert.
        raise UnsupportedPetError(f"series {series}: Units expected BQML, got {units or 'none'}")
    series_type = [str(v) for v in (first.get("SeriesType") or [])]
    if series_type and series_type[0] in ("DYNAMIC", "GATED"):
        raise UnsupportedPetError(
            f"series {series}: SeriesType value 1 expected STATIC or WHOLE BODY, got "
            f"{series_type[0]} (one static volume is denoised, not a time series)"
        )
    for name in ("NumberOfTimeSlices", "NumberOfTimeSlots"):
        n = first.get(name)
        if n is not None and int(n) > 1:
            raise UnsupportedPetError(
                f"series {series}: {name} expected 1 for a static image, got {int(n)}"
            )
    frame_times = {float(ds.FrameReferenceTime) for ds in datasets if "FrameReferenceTime" in ds}
    if len(frame_times) > 1:
        raise UnsupportedPetError(
            f"series {series}: FrameReferenceTime expected one value for a static image, got "
            f"{len(frame_times)} different values (dynamic frames)"
        )
    return units


def _check_same(datasets: list[Dataset], name: str, series: str) -> None:
    values = {tuple(np.round(np.asarray(ds.get(name), dtype=float).ravel(), 6)) for ds in datasets}
    if len(values) != 1:
        raise GeometryError(f"series {series}: {name} expected one value for all slices, got "
                            f"{sorted(values)}")


def load_volume(datasets: Iterable[Dataset], modality: str | None = None) -> Volume:
    """Turn the datasets of one series into a float32 Volume (k, j, i) in real-world units.

    Every failure is a DicomInputError: ours name the attribute and the expected and actual
    values; anything pydicom or numpy raise on malformed data (short pixel data, bad values)
    becomes a MalformedDicomError naming the series.
    """
    dss = list(datasets)
    try:
        return _load_volume(dss, modality)
    except DicomInputError:
        raise
    except Exception as exc:  # untrusted data: decoding can fail in many ways
        series = str(dss[0].get("SeriesInstanceUID", "?")) if dss else "?"
        raise MalformedDicomError(
            f"series {series}: malformed data ({type(exc).__name__}: {exc})") from exc


def _load_volume(dss: list[Dataset], modality: str | None) -> Volume:
    if not dss:
        raise DicomInputError("load_volume: argument datasets expected at least 2, got 0")
    series, found_modality = _check_common(dss, modality)
    units = _check_pet(dss, series) if found_modality == "PT" else ""

    for ds in dss:
        tilt = float(ds.get("GantryDetectorTilt", 0) or 0)
        if abs(tilt) > 1e-6:
            raise GeometryError(f"series {series}: GantryDetectorTilt expected 0, got {tilt}")
        for name in ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing"):
            if name not in ds:
                raise missing(name, series, "placing the slice in patient space")
    for name in ("Rows", "Columns", "PixelSpacing"):
        _check_same(dss, name, series)
    iops = np.array([_floats(ds, "ImageOrientationPatient", 6, series) for ds in dss])
    if np.max(np.abs(iops - iops[0])) > _ORIENTATION_TOL:
        raise GeometryError(f"series {series}: ImageOrientationPatient expected one orientation, "
                            f"got {len(np.unique(np.round(iops, 4), axis=0))} different ones")
    row, col = iops[0, :3], iops[0, 3:]
    normal = np.cross(row, col)
    ipps = np.array([_floats(ds, "ImagePositionPatient", 3, series) for ds in dss])
    dist = ipps @ normal
    order = np.argsort(dist, kind="stable")
    dss, ipps, dist = [dss[i] for i in order], ipps[order], dist[order]

    notes: list[str] = []
    keep = [0]
    for i in range(1, len(dss)):
        if abs(dist[i] - dist[keep[-1]]) < _POSITION_TOL_MM:
            # Same position twice (a re-sent or duplicated slice): keep the first, say so,
            # like MONAI Deploy's DICOMDataLoaderOperator.
            notes.append(f"dropped SOP instance {dss[i].SOPInstanceUID}: duplicate slice position "
                         f"{dist[i]:.3f} mm along the normal (kept {dss[keep[-1]].SOPInstanceUID})")
            continue
        keep.append(i)
    dss, ipps, dist = [dss[i] for i in keep], ipps[keep], dist[keep]
    if len(dss) < 2:
        raise GeometryError(f"series {series}: number of distinct slice positions expected >= 2, "
                            f"got {len(dss)} (a volume needs a slice step)")

    # Stacking must run along the normal: any in-plane drift between slices is a tilt or shear.
    offsets = ipps - ipps[0]
    drift = offsets - np.outer(offsets @ normal, normal)
    if np.max(np.linalg.norm(drift, axis=1)) > _POSITION_TOL_MM:
        raise GeometryError(f"series {series}: ImagePositionPatient expected to move along the slice "
                            f"normal, got in-plane drift up to {np.max(np.linalg.norm(drift, axis=1)):.3f} mm "
                            "(gantry tilt or sheared stack)")
    steps = np.diff(dist)
    step = float(np.min(steps))
    bad = np.abs(steps - step) > _SPACING_REL_TOL * step
    if np.any(bad):
        i = int(np.argmax(bad))
        ratio = steps[i] / step
        if abs(ratio - round(ratio)) <= _SPACING_REL_TOL and round(ratio) >= 2:
            raise GeometryError(f"series {series}: slice step expected {step:.3f} mm, got "
                                f"{steps[i]:.3f} mm after {dist[i]:.3f} mm: "
                                f"{round(ratio) - 1} missing slice(s) (gap)")
        raise GeometryError(f"series {series}: slice step expected uniform {step:.3f} mm, got "
                            f"{steps[i]:.3f} mm after {dist[i]:.3f} mm (uneven spacing)")
    step = float(np.mean(steps))

    planes = []
    for ds in dss:
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
        # Per-slice rescale (PS3.3 C.11.1.1.2); PET scanners scale every slice separately.
        planes.append(ds.pixel_array.astype(np.float64) * slope + intercept)
    values = np.stack(planes).astype(np.float32)

    row_spacing, col_spacing = (float(x) for x in dss[0].PixelSpacing)
    affine = np.eye(4)
    affine[:3, 0] = row * col_spacing   # i runs along a row: column spacing
    affine[:3, 1] = col * row_spacing   # j runs down a column: row spacing
    affine[:3, 2] = normal * step
    affine[:3, 3] = ipps[0]

    raw_text = tuple(raw_text_elements(ds) for ds in dss)
    headers = []
    for ds in dss:
        h = ds.copy()
        del h.PixelData
        headers.append(copy.deepcopy(h))
    first = dss[0]
    for note in notes:
        log.info("series %s: %s", series, note)
    return Volume(
        values=values,
        geometry=Geometry(shape=tuple(values.shape), affine=affine),
        modality=found_modality,
        study_instance_uid=str(first.StudyInstanceUID),
        series_instance_uid=series,
        frame_of_reference_uid=str(first.get("FrameOfReferenceUID", "")),
        sop_class_uid=str(first.SOPClassUID),
        sop_instance_uids=tuple(str(ds.SOPInstanceUID) for ds in dss),
        headers=tuple(headers),
        units=units,
        notes=tuple(notes),
        raw_text=raw_text,
    )
