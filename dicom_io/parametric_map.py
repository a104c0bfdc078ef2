"""SDIP's per-voxel maps as highdicom Parametric Maps on the PET grid: build, and write.

Two maps, each its own series (a viewer shows one Parametric Map series as one image; few
show a second channel): the stability map S (a standard deviation of network outputs, so
in the PET's unit, Bq/mL) and the data weight w in [0, 1], the fraction of the measured
OSEM value that the blend kept in each voxel (UCUM unit "1", no units).

Float pixels (Float Pixel Data, PS3.3 C.7.6.3) with a Real World Value Mapping in a UCUM unit,
plane positions from the source slices, and references to the source PET images. An MR from
another study cannot be a further source image (PS3.3 C.7.6.16.2.6: sources are in the same
study), so it is named in the derivation description instead.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from highdicom import ContributingEquipment, PlanePositionSequence, CoordinateSystemNames
from highdicom.content import (
    PixelMeasuresSequence,
    PlaneOrientationSequence,
    VOILUTTransformation,
)
from highdicom.pm import ParametricMap, RealWorldValueMapping
from highdicom.sr import CodedConcept
from pydicom.sr.codedict import codes

from dipnode.dicom_io.derived_pet import keep_text_bytes
from dipnode.dicom_io.errors import DicomOutputError
from dipnode.dicom_io.files import write_datasets
from dipnode.dicom_io.provenance import OutputSpec, _ST_MAX
from dipnode.dicom_io.uids import derive_uid
from dipnode.dicom_io.volume import Volume

_DEFAULT_UNIT = ("Bq/mL", "UCUM", "Bq/mL")
# UCUM's unit for a dimensionless ratio is "1" (PS3.16 CID 7181 / UCUM "no units").
UNIT_ONE = ("1", "UCUM", "no units")


def build_stability_map(
    source: Volume,
    stability: np.ndarray,
    spec: OutputSpec,
    *,
    unit: tuple[str, str, str] = _DEFAULT_UNIT,
    mr_reference_note: str = "",
) -> ParametricMap:
    """Return a Parametric Map of ``stability`` (k, j, i) on ``source``'s grid."""
    return _parametric_map(
        source, stability, spec, who="build_stability_map", name="stability", unit=unit,
        lut_label="SDIP_STD", lut_explanation="SDIP stability: std of network outputs",
        content_label="STABILITY", content_description="SDIP stability map",
        uid_role="stability-map", mr_reference_note=mr_reference_note)


def build_data_weight_map(
    source: Volume,
    weight: np.ndarray,
    spec: OutputSpec,
    *,
    mr_reference_note: str = "",
) -> ParametricMap:
    """Return a Parametric Map of the data weight ``w`` (k, j, i, values in [0, 1]).

    w is the fraction of the measured OSEM value in each voxel of the denoised image
    (x = w·OSEM + (1 − w)·network): 1 where the measured value was kept (unstable fit or the
    data-consistency guard), 0 where the network's value was used.
    """
    arr = source.values_on_grid(weight, "build_data_weight_map", "weight")
    if not np.all((arr >= 0) & (arr <= 1)):
        raise DicomOutputError("build_data_weight_map: weight expected values in [0, 1], got "
                               f"[{float(np.min(arr)):g}, {float(np.max(arr)):g}]")
    return _parametric_map(
        source, arr, spec, who="build_data_weight_map", name="weight", unit=UNIT_ONE,
        lut_label="DATA_WEIGHT",
        lut_explanation="fraction of measured OSEM value kept (1 = OSEM)",
        content_label="DATAWEIGHT",
        content_description="SDIP data weight: share of the measured PET value",
        uid_role="data-weight-map", mr_reference_note=mr_reference_note,
        value_range=(0.0, 1.0))


def _parametric_map(
    source: Volume,
    values: np.ndarray,
    spec: OutputSpec,
    *,
    who: str,
    name: str,
    unit: tuple[str, str, str],
    lut_label: str,
    lut_explanation: str,
    content_label: str,
    content_description: str,
    uid_role: str,
    mr_reference_note: str = "",
    value_range: tuple[float, float] | None = None,
) -> ParametricMap:
    arr = source.values_on_grid(values, who, name)
    value, scheme, meaning = unit
    if scheme != "UCUM":
        raise DicomOutputError(f"{who}: unit coding scheme expected UCUM, got {scheme}")
    arr = arr.astype(np.float32)
    lo, hi = value_range if value_range is not None else (float(arr.min()), float(arr.max()))
    mapping = RealWorldValueMapping(
        lut_label=lut_label,
        lut_explanation=lut_explanation,
        unit=CodedConcept(value, scheme, meaning),
        value_range=(lo, hi if hi > lo else lo + 1.0),
        slope=1.0,
        intercept=0.0,
    )
    geom = source.geometry
    row_spacing, col_spacing = geom.spacing[1], geom.spacing[2]
    direction = geom.direction
    orientation = PlaneOrientationSequence(
        coordinate_system=CoordinateSystemNames.PATIENT,
        image_orientation=[*map(float, direction[:, 0]), *map(float, direction[:, 1])],
    )
    measures = PixelMeasuresSequence(
        pixel_spacing=[row_spacing, col_spacing],
        slice_thickness=geom.spacing[0],
        spacing_between_slices=geom.spacing[0],
    )
    positions = [
        PlanePositionSequence(
            coordinate_system=CoordinateSystemNames.PATIENT,
            image_position=[float(x) for x in (geom.affine @ np.array([0.0, 0.0, k, 1.0]))[:3]],
        )
        for k in range(geom.shape[0])
    ]
    description = spec.derivation_description
    if mr_reference_note:
        description = f"{description}; {mr_reference_note}"
    description = description[:_ST_MAX]
    node = ContributingEquipment(
        manufacturer=spec.manufacturer,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=spec.software_name,
        software_versions=spec.software_version,
        contribution_datetime=spec.content_datetime,
        contribution_description=description,
    )
    pm = ParametricMap(
        source_images=list(source.headers),
        pixel_array=arr,
        series_instance_uid=spec.series_instance_uid,
        series_number=spec.series_number,
        sop_instance_uid=derive_uid(spec.uid_seed, source.series_instance_uid, uid_role),
        instance_number=1,
        manufacturer=spec.manufacturer,
        manufacturer_model_name=spec.software_name,
        software_versions=spec.software_version,
        device_serial_number="0",
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        content_description=content_description,
        content_label=content_label,
        pixel_measures=measures,
        plane_orientation=orientation,
        plane_positions=positions,
        content_qualification="RESEARCH" if spec.research else "PRODUCT",
        contributing_equipment=[node],
        # A display window over the full value range, so viewers show the map sensibly.
        voi_lut_transformations=[VOILUTTransformation(
            window_center=(lo + hi) / 2.0, window_width=max(hi - lo, 1e-6),
            window_explanation="full range",
        )],
    )
    pm.SeriesDescription = spec.labelled_description
    # General Series needs Laterality (2C) unless the body part is unpaired; the node only
    # sees brain PET, so name the head when the source does not.
    pm.BodyPartExamined = source.headers[0].get("BodyPartExamined") or "HEAD"
    date, time = spec.content_datetime.strftime("%Y%m%d"), spec.content_datetime.strftime("%H%M%S")
    pm.ContentDate, pm.ContentTime = date, time
    pm.InstanceCreationDate, pm.InstanceCreationTime = date, time
    # The derivation text rides in each frame's Derivation Image item (PS3.3 C.7.6.16.2.6),
    # the place the multi-frame IOD defines for it.
    for frame in pm.PerFrameFunctionalGroupsSequence:
        for item in frame.get("DerivationImageSequence", []):
            item.DerivationDescription = description
    # The patient's name and other copied text are carried byte for byte, as in the derived
    # PET: a name that is not valid in its character set must not come back with U+FFFD.
    if source.raw_text:
        keep_text_bytes(pm, dict(source.raw_text[0]))  # any text highdicom decoded
        # pydicom's writer decodes and re-encodes every raw element of a data set whose original
        # character set differs from its own; a new data set has none, so name the one the
        # copied bytes are in (the source's, which highdicom copied) and the syntax it writes.
        syntax = pm.file_meta.TransferSyntaxUID
        pm.set_original_encoding(is_implicit_vr=syntax.is_implicit_VR,
                                 is_little_endian=syntax.is_little_endian,
                                 character_encoding=pm._character_set)
    return pm


def write_stability_map(
    source: Volume,
    stability: np.ndarray,
    spec: OutputSpec,
    out_dir: Path,
    *,
    unit: tuple[str, str, str] = _DEFAULT_UNIT,
    mr_reference_note: str = "",
) -> Path:
    """Build the Parametric Map (:func:`build_stability_map`) and write it to ``out_dir`` as
    ``<SOPInstanceUID>.dcm``; returns the path."""
    pm = build_stability_map(source, stability, spec, unit=unit, mr_reference_note=mr_reference_note)
    [path] = write_datasets([pm], out_dir)
    return path


def write_data_weight_map(
    source: Volume,
    weight: np.ndarray,
    spec: OutputSpec,
    out_dir: Path,
    *,
    mr_reference_note: str = "",
) -> Path:
    """Build the data-weight Parametric Map (:func:`build_data_weight_map`) and write it to
    ``out_dir`` as ``<SOPInstanceUID>.dcm``; returns the path."""
    pm = build_data_weight_map(source, weight, spec, mr_reference_note=mr_reference_note)
    [path] = write_datasets([pm], out_dir)
    return path
