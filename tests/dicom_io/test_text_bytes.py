"""Names and other text are carried byte for byte from the source PET into the derived PET and
the parametric maps: invalid UTF-8 under ISO_IR 192, or any other bytes, are never re-encoded
with U+FFFD."""
from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dipnode.dicom_io.derived_pet import write_derived_pet
from dipnode.dicom_io.parametric_map import write_data_weight_map, write_stability_map
from dipnode.dicom_io.provenance import OutputSpec
from dipnode.dicom_io.series import load_volume, read_datasets
from dipnode.dicom_io.uids import derive_uid
from dipnode.sim.dicom_study import new_study, write_pet_series
from peers import dciodvfy_errors

# "Müller^Zoë" in Latin-1 under a UTF-8 character set: invalid UTF-8 (0xFC, 0xEB).
NAME = b"M\xfcller^Zo\xeb"
DESCRIPTION = b"Hirn \xff\xfe Studie"  # Study Description (LO): any bytes


def _source(folder: Path) -> list[Path]:
    study = new_study("BYTES-1", seed=3)
    files = write_pet_series(np.full((4, 8, 8), 1000.0), np.diag([2.0, 2.0, 2.0, 1.0]), folder,
                             study=study)
    for f in files:
        ds = pydicom.dcmread(f)
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.PatientName = "PLACEHOLDER^NAME"
        ds.StudyDescription = "PLACEHOLDER DESCRIPTION"
        ds.save_as(f)
        raw = f.read_bytes()
        # Same lengths (even), so the element lengths stay right.
        raw = raw.replace(b"PLACEHOLDER^NAME", NAME.ljust(16, b" "))
        raw = raw.replace(b"PLACEHOLDER DESCRIPTION ", DESCRIPTION.ljust(24, b" "))
        f.write_bytes(raw)
    return files


def _value_bytes(path: Path, keyword: str) -> bytes:
    ds = pydicom.dcmread(path)
    elem = ds.get_item(keyword)  # the raw element: bytes as stored, not decoded
    return bytes(elem.value).rstrip(b" ")


@pytest.mark.filterwarnings("ignore:Failed to decode byte string")
def test_invalid_utf8_name_is_copied_byte_for_byte(tmp_path: Path) -> None:
    src = _source(tmp_path / "src")
    assert _value_bytes(src[0], "PatientName") == NAME
    vol = load_volume(read_datasets(src), modality="PT")
    spec = OutputSpec(series_instance_uid=derive_uid("bytes", "pet"), series_number=1001,
                      series_description="SDIP", derivation_description="test", uid_seed="bytes",
                      content_datetime=dt.datetime(2024, 5, 17, 12, 0, 0))
    out = write_derived_pet(vol, vol.values, spec, tmp_path / "out")
    for path in out:
        raw = path.read_bytes()
        assert "\ufffd".encode() not in raw
        assert _value_bytes(path, "PatientName") == NAME
        assert _value_bytes(path, "StudyDescription") == DESCRIPTION
        # Written by us: our own text, not the source's.
        assert pydicom.dcmread(path).SeriesDescription.startswith("SDIP")
    # dciodvfy finds nothing in the output that it does not find in the source.
    src_errors = {e.split(" - ")[-1] for e in dciodvfy_errors(src[0])}
    out_errors = {e.split(" - ")[-1] for e in dciodvfy_errors(out[0])}
    assert out_errors <= src_errors, out_errors - src_errors


@pytest.mark.filterwarnings("ignore:Failed to decode byte string")
@pytest.mark.parametrize("writer", ["stability", "data weight"])
def test_parametric_maps_copy_the_name_byte_for_byte(tmp_path: Path, writer: str) -> None:
    # highdicom copies the patient and study modules from the source image as raw bytes, but
    # pydicom's writer re-encoded them (a new data set has no original character set) until the
    # map named it: the received bytes must reach the file, as in the derived PET.
    vol = load_volume(read_datasets(_source(tmp_path / "src")), modality="PT")
    spec = OutputSpec(series_instance_uid=derive_uid("bytes", "map"), series_number=1002,
                      series_description="SDIP stability", derivation_description="test",
                      uid_seed="bytes", content_datetime=dt.datetime(2024, 5, 17, 12, 0, 0))
    write = write_stability_map if writer == "stability" else write_data_weight_map
    path = write(vol, np.zeros(vol.values.shape), spec, tmp_path / "out")
    assert "\ufffd".encode() not in path.read_bytes()
    assert _value_bytes(path, "PatientName") == NAME
    assert _value_bytes(path, "StudyDescription") == DESCRIPTION
    assert pydicom.dcmread(path).SpecificCharacterSet == "ISO_IR 192"
    assert pydicom.dcmread(path).SeriesDescription.startswith("SDIP")
