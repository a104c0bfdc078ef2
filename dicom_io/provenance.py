"""What a derived series says about itself: identity, derivation, equipment, research label.

Codes, checked against pydicom 3.0's PS3.16 tables (pydicom/sr/_concepts_dict.py) rather than
memory:
- Contributing Equipment purpose, CID 7005: (109102, DCM, "Processing Equipment"). Note that
  109103 is "Modifying Equipment" (for edits of an existing instance), not a processing step;
  highdicom's ContributingEquipment accepts exactly the CID 7005 codes.
- Derivation, CID 7203 "Image Derivation": it has no "denoising" concept; the nearest is
  (113087, DCM, "Smoothing"), which is what noise suppression is. The free-text Derivation
  Description names the actual method.
- Source Image purpose, CID 7202: (121322, DCM, "Source image for image processing operation").
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from importlib import metadata

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from dipnode.dicom_io.errors import DicomOutputError
from dipnode.dicom_io.vr import is_uid

PROCESSING_EQUIPMENT = ("109102", "DCM", "Processing Equipment")
ACQUISITION_EQUIPMENT = ("109101", "DCM", "Acquisition Equipment")
DERIVATION_SMOOTHING = ("113087", "DCM", "Smoothing")
SOURCE_FOR_PROCESSING = ("121322", "DCM", "Source image for image processing operation")
RESEARCH_SUFFIX = " [RESEARCH]"
_LO_MAX = 64      # Long String (PS3.5 6.2)
_ST_MAX = 1024    # Short Text


def software_version() -> str:
    """dipnode's version for Software Versions (0018,1020) and the logs: the installed
    package's, or ``0+unknown`` when running from a source tree that was not installed."""
    try:
        return metadata.version("dipnode")
    except metadata.PackageNotFoundError:
        return "0+unknown"


@dataclass(frozen=True)
class OutputSpec:
    """Identity and provenance of one derived series, decided by the caller (the pipeline)."""

    series_instance_uid: str
    series_number: int
    series_description: str
    derivation_description: str
    uid_seed: str
    content_datetime: dt.datetime
    software_name: str = "dipnode"
    software_version: str = field(default_factory=software_version)
    manufacturer: str = "dipnode project"
    research: bool = True

    def __post_init__(self) -> None:
        if not is_uid(self.series_instance_uid, strict=True):  # PS3.5 9.1
            raise DicomOutputError(f"OutputSpec: series_instance_uid expected a valid UID, got "
                                   f"{self.series_instance_uid!r}")
        if not 0 <= self.series_number <= 2**31 - 1:
            raise DicomOutputError(f"OutputSpec: series_number expected 0..2147483647 (IS), got "
                                   f"{self.series_number}")
        if not self.uid_seed:
            raise DicomOutputError(f"OutputSpec: uid_seed expected a non-empty str, got {self.uid_seed!r}")
        if len(self.derivation_description) > _ST_MAX:
            raise DicomOutputError(f"OutputSpec: derivation_description expected <= {_ST_MAX} chars, "
                                   f"got {len(self.derivation_description)}")
        for name in ("software_name", "software_version", "manufacturer"):
            value = getattr(self, name)
            if not value or len(value) > _LO_MAX or "\\" in value:
                raise DicomOutputError(f"OutputSpec: {name} expected 1..{_LO_MAX} chars without '\\', "
                                       f"got {value!r}")

    @property
    def labelled_description(self) -> str:
        """Series Description with the research label, kept within LO's 64 characters."""
        if not self.research:
            return self.series_description[:_LO_MAX]
        return self.series_description[: _LO_MAX - len(RESEARCH_SUFFIX)] + RESEARCH_SUFFIX


def code_item(code: tuple[str, str, str]) -> Dataset:
    """A Code Sequence Macro item (PS3.3 Table 8.8-1)."""
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code
    return item


def contributing_equipment(spec: OutputSpec, source: Dataset | None = None) -> Sequence:
    """Contributing Equipment Sequence (PS3.3 C.12.1): the acquiring scanner and this node."""
    items = []
    if source is not None and source.get("Manufacturer"):
        scanner = Dataset()
        scanner.PurposeOfReferenceCodeSequence = Sequence([code_item(ACQUISITION_EQUIPMENT)])
        scanner.Manufacturer = source.Manufacturer
        for name in ("ManufacturerModelName", "SoftwareVersions", "DeviceSerialNumber", "StationName"):
            if source.get(name):
                setattr(scanner, name, source.get(name))
        scanner.ContributionDescription = "Acquisition of the source PET"
        items.append(scanner)
    node = Dataset()
    node.PurposeOfReferenceCodeSequence = Sequence([code_item(PROCESSING_EQUIPMENT)])
    node.Manufacturer = spec.manufacturer
    node.ManufacturerModelName = spec.software_name
    node.SoftwareVersions = spec.software_version
    node.ContributionDateTime = spec.content_datetime.strftime("%Y%m%d%H%M%S")
    node.ContributionDescription = spec.derivation_description[:_ST_MAX]
    items.append(node)
    return Sequence(items)


def source_image_item(header: Dataset) -> Dataset:
    """One Source Image Sequence item (PS3.3 C.7.6.1.1.4) pointing at a source instance."""
    item = Dataset()
    item.ReferencedSOPClassUID = header.SOPClassUID
    item.ReferencedSOPInstanceUID = header.SOPInstanceUID
    item.PurposeOfReferenceCodeSequence = Sequence([code_item(SOURCE_FOR_PROCESSING)])
    return item


def apply_derivation(ds: Dataset, spec: OutputSpec, source: Dataset) -> None:
    """General Image derivation attributes (PS3.3 C.7.6.1) and SOP Common provenance."""
    ds.DerivationDescription = spec.derivation_description
    ds.DerivationCodeSequence = Sequence([code_item(DERIVATION_SMOOTHING)])
    ds.SourceImageSequence = Sequence([source_image_item(source)])
    ds.ContributingEquipmentSequence = contributing_equipment(spec, source)
