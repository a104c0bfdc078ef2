"""A processed PET volume as a derived PET series that a PACS and SUV tools accept.

One PET Image Storage instance per source slice, on the source geometry and in the source
study, with everything SUV depends on copied unchanged (docs/DESIGN.md "Outputs that a PACS and a
radiologist accept"). Pixels are signed 16-bit with a per-slice Rescale Slope and Rescale
Intercept 0 (PS3.3 C.8.9.4.1.2 requires 0 for PET): signed so that a slightly negative value
(possible after blending or filtering) stays representable instead of being clipped, at the
cost of one bit; the quantisation step is then 1/32767 of the slice maximum (<= 1.6e-5
relative error), far below PET noise.
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
from pydicom.dataelem import RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, PositronEmissionTomographyImageStorage

from dipnode.dicom_io.errors import DicomOutputError
from dipnode.dicom_io.files import write_datasets
from dipnode.dicom_io.provenance import OutputSpec, apply_derivation
from dipnode.dicom_io.uids import derive_uid
from dipnode.dicom_io.volume import Volume

_QMAX = 32767
# Attributes that describe the source's pixel encoding or display, not the new pixels;
# leaving them would mislead a viewer (e.g. a window or padding value for other numbers).
_DROP = (
    "SmallestImagePixelValue", "LargestImagePixelValue", "WindowCenter", "WindowWidth",
    "WindowCenterWidthExplanation", "PixelPaddingValue", "IconImageSequence",
    "RedPaletteColorLookupTableDescriptor", "VOILUTSequence", "LossyImageCompressionRatio",
    "LossyImageCompressionMethod", "ReferencedImageSequence",
)


def _check(source: Volume, values: np.ndarray) -> np.ndarray:
    if source.sop_class_uid != PositronEmissionTomographyImageStorage:
        raise DicomOutputError(f"build_derived_pet: source.sop_class_uid expected PET Image Storage "
                               f"{PositronEmissionTomographyImageStorage}, got {source.sop_class_uid}")
    arr = source.values_on_grid(values, "build_derived_pet", "values")
    if len(source.headers) != arr.shape[0]:
        raise DicomOutputError(f"build_derived_pet: source.headers expected {arr.shape[0]} slices, "
                               f"got {len(source.headers)}")
    return arr.astype(np.float64)


def _encode_slice(plane: np.ndarray) -> tuple[bytes, float]:
    peak = float(np.max(np.abs(plane)))
    slope = float(f"{peak / _QMAX:.10g}") if peak > 0 else 1.0
    # DS holds 16 characters; the slope is formatted first so the stored value is what we
    # divide by (otherwise the reader's slope differs from the encoder's).
    stored = np.clip(np.rint(plane / slope), -_QMAX, _QMAX).astype("<i2")
    return stored.tobytes(), slope


def keep_text_bytes(ds: Dataset, raw: dict[int, RawDataElement]) -> None:
    """Put back, as received, every source text element that ``ds`` still carries unchanged.

    Copying decodes (pydicom) and re-encodes text; bytes that do not decode in the declared
    character set (invalid UTF-8 under ISO_IR 192, say) would come back as U+FFFD. A patient's
    name must be carried byte for byte, so an element whose value is still the source's is
    replaced by the source's raw element; what the writer set itself stays its own. Both
    writers that copy source attributes call it (this module and parametric_map).
    """
    encodings = ds._character_set
    for tag, elem in raw.items():
        if tag not in ds:
            continue  # removed on purpose (e.g. moved to Contributing Equipment)
        current = ds.get_item(tag)
        if isinstance(current, RawDataElement):
            continue
        if convert_raw_data_element(elem, encoding=encodings).value == current.value:
            ds[tag] = elem


# PET Units (0054,1001) defined terms (PS3.3 C.8.9.1.1.3) a derived map may carry instead of
# the source's: PCNT (percent) for a weight, NONE for a unitless value.
_UNITS = ("BQML", "PCNT", "NONE")


def build_derived_pet(source: Volume, values: np.ndarray, spec: OutputSpec, *,
                      units: str | None = None) -> list[Dataset]:
    """Return one derived PET dataset per source slice (k order), ready for dcmwrite.

    units: None keeps the source's Units (the denoised PET: SUV reads as on the source);
    "PCNT" or "NONE" for a map that is not an activity (a viewer then offers no SUV).
    """
    if units is not None and units not in _UNITS:
        raise DicomOutputError(f"build_derived_pet: units expected one of {_UNITS}, got {units!r}")
    arr = _check(source, values)
    date = spec.content_datetime.strftime("%Y%m%d")
    time = spec.content_datetime.strftime("%H%M%S")
    out: list[Dataset] = []
    for k, header in enumerate(source.headers):
        ds = copy.deepcopy(header)
        ds.remove_private_tags()  # vendor scale factors refer to the source pixel values
        for name in _DROP:
            if name in ds:
                delattr(ds, name)
        sop_uid = derive_uid(spec.uid_seed, str(header.SOPInstanceUID))
        ds.SOPInstanceUID = sop_uid
        ds.SeriesInstanceUID = spec.series_instance_uid
        ds.SeriesNumber = spec.series_number
        ds.SeriesDescription = spec.labelled_description
        ds.ImageType = ["DERIVED", "PRIMARY"]  # the PET IOD allows only PRIMARY as value 2
        ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
        ds.ContentDate, ds.ContentTime = date, time
        # General Equipment describes who made this instance; the scanner moves to
        # Contributing Equipment (see provenance.contributing_equipment).
        ds.Manufacturer = spec.manufacturer
        ds.ManufacturerModelName = spec.software_name
        ds.SoftwareVersions = spec.software_version
        for name in ("DeviceSerialNumber", "StationName", "InstitutionName"):
            if name in ds:
                delattr(ds, name)
        apply_derivation(ds, spec, header)
        if units is not None:
            ds.Units = units
        if not ds.get("BodyPartExamined") and "Laterality" not in ds:
            # General Series needs Laterality (2C) unless the part is unpaired: brain PET.
            ds.BodyPartExamined = "HEAD"
        if k < len(source.raw_text):
            keep_text_bytes(ds, dict(source.raw_text[k]))
        pixels, slope = _encode_slice(arr[k])
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 1
        ds.RescaleSlope = slope
        ds.RescaleIntercept = 0
        ds.PixelData = pixels
        ds["PixelData"].VR = "OW"
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        out.append(ds)
    return out


def write_derived_pet(source: Volume, values: np.ndarray, spec: OutputSpec, out_dir: Path, *,
                      units: str | None = None) -> list[Path]:
    """Build the derived PET series (:func:`build_derived_pet`) and write it to ``out_dir``."""
    return write_datasets(build_derived_pet(source, values, spec, units=units), out_dir)
