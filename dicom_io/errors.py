"""Errors raised at the DICOM boundary (files, wire configuration).

Every error is a ValueError subclass (bad input, not a bug) and names the series UID, the
attribute, the expected and the actual value, so an operator can act on the log line alone.
"""
from __future__ import annotations


class DicomInputError(ValueError):
    """Base class: a DICOM input the node cannot turn into a trustworthy volume."""


class MixedSeriesError(DicomInputError):
    """Datasets from several series (or modalities) were handed over as one."""


class GeometryError(DicomInputError):
    """Slices do not form one regular, orthogonal grid (tilt, gaps, uneven spacing, ...)."""


class UnsupportedPetError(DicomInputError):
    """A PET series the node refuses: not BQML, dynamic or gated, not decay corrected."""


class UnsupportedImageError(DicomInputError):
    """An image kind the loader does not handle (e.g. enhanced multi-frame objects)."""


class MissingAttributeError(DicomInputError):
    """A required attribute is absent or empty."""


class MalformedDicomError(DicomInputError):
    """A file or data set that pydicom cannot decode (bad VR, lengths, pixel data size)."""


class DicomOutputError(ValueError):
    """Arguments to a writer that would produce an invalid or misleading object."""


class ConfigError(ValueError):
    """A receiver, sender or TLS setting is out of range; the message names it."""


def missing(attribute: str, series_uid: str, needed_for: str) -> MissingAttributeError:
    """Build the standard message for an absent attribute."""
    return MissingAttributeError(
        f"series {series_uid}: attribute {attribute} is required for {needed_for}, "
        "expected a value, got none"
    )
