"""The SDIP stability map as one highdicom Parametric Map on the PET grid.

Float pixels (Float Pixel Data, PS3.3 C.7.6.3) with a Real World Value Mapping in a UCUM unit
(the stability map is a standard deviation of network outputs, so it has the PET's unit),
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

from dipnode.dicom_io.errors import DicomOutputError
from dipnode.dicom_io.files import write_datasets
from dipnode.dicom_io.provenance import OutputSpec, _ST_MAX
from dipnode.dicom_io.uids import derive_uid
from dipnode.dicom_io.volume import Volume

_DEFAULT_UNIT = ("Bq/mL", "UCUM", "Bq/mL")


def build_stability_map(
    source: Volume,
    stability: np.ndarray,
    spec: OutputSpec,
    *,
    unit: tuple[str, str, str] = _DEFAULT_UNIT,
    mr_reference_note: str = "",
) -> ParametricMap:
    """Return a Parametric Map of ``stability`` (k, j, i) on ``source``'s grid."""
    arr = source.values_on_grid(stability, "build_stability_map", "stability")
    value, scheme, meaning = unit
    if scheme != "UCUM":
        raise DicomOutputError(f"build_stability_map: unit coding scheme expected UCUM, got {scheme}")
    arr = arr.astype(np.float32)
    lo, hi = float(arr.min()), float(arr.max())
    mapping = RealWorldValueMapping(
        lut_label="SDIP_STD",
        lut_explanation="SDIP stability: std of network outputs",
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
        sop_instance_uid=derive_uid(spec.uid_seed, source.series_instance_uid, "stability-map"),
        instance_number=1,
        manufacturer=spec.manufacturer,
        manufacturer_model_name=spec.software_name,
        software_versions=spec.software_version,
        device_serial_number="0",
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        content_description="SDIP stability map",
        content_label="STABILITY",
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
