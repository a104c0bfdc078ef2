"""Derived PET writer: valid objects, faithful values and SUV, provenance, deterministic UIDs."""
from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from dipnode.dicom_io.derived_pet import build_derived_pet, write_derived_pet
from dipnode.dicom_io.errors import DicomOutputError
from dipnode.dicom_io.provenance import OutputSpec
from dipnode.dicom_io.series import load_series_dir
from dipnode.dicom_io.suv import suv_bw_factor
from dipnode.dicom_io.uids import derive_uid
from dipnode.dicom_io.volume import Volume
from dipnode.sim.dicom_study import write_mr_series, write_pet_series

WHEN = dt.datetime(2024, 5, 17, 13, 45, 12)
COPIED = ("SeriesDate", "SeriesTime", "AcquisitionDate", "AcquisitionTime", "Units",
          "DecayCorrection", "CorrectedImage", "RadiopharmaceuticalInformationSequence",
          "PatientWeight", "FrameReferenceTime", "ImageIndex", "NumberOfSlices", "PatientID",
          "PatientName", "PatientBirthDate", "StudyInstanceUID", "StudyDate", "StudyID",
          "AccessionNumber", "FrameOfReferenceUID", "ImageOrientationPatient",
          "ImagePositionPatient", "PixelSpacing", "SliceThickness", "SOPClassUID", "Modality")


def _spec(seed: str = "job-7") -> OutputSpec:
    return OutputSpec(
        series_instance_uid=derive_uid(seed, "derived-pet"),
        series_number=1001,
        series_description="PET SDIP denoised",
        derivation_description="SDIP (alpha 0.6, 200 epochs) of the OSEM PET, MR-conditioned",
        uid_seed=seed,
        content_datetime=WHEN,
        software_version="0.1.0",
    )


@pytest.fixture
def source(tmp_path: Path, study, axial_affine, pet_values) -> Volume:
    write_pet_series(pet_values((5, 8, 8)), axial_affine, tmp_path / "src", study=study)
    return load_series_dir(tmp_path / "src")[0]


def test_written_files_pass_dciodvfy(source: Volume, tmp_path: Path, dciodvfy_errors) -> None:
    paths = write_derived_pet(source, source.values * 0.5, _spec(), tmp_path / "out")
    assert len(paths) == source.values.shape[0]
    for path in paths:
        assert dciodvfy_errors(path) == []


def test_values_round_trip_with_per_slice_slope(source: Volume, tmp_path: Path) -> None:
    processed = source.values * np.linspace(0.2, 1.5, source.values.shape[0])[:, None, None]
    processed[0, 0, 0] = -123.0  # signed pixels keep a small undershoot
    write_derived_pet(source, processed, _spec(), tmp_path / "out")
    back = load_series_dir(tmp_path / "out")[0]
    rel = np.max(np.abs(back.values - processed), axis=(1, 2)) / np.max(np.abs(processed), axis=(1, 2))
    assert np.all(rel < 1e-4)
    assert back.values[0, 0, 0] == pytest.approx(-123.0, abs=float(back.headers[0].RescaleSlope))
    np.testing.assert_allclose(back.geometry.affine, source.geometry.affine, atol=1e-6)
    assert len({float(h.RescaleSlope) for h in back.headers}) == processed.shape[0]
    assert all(float(h.RescaleIntercept) == 0 for h in back.headers)


def test_suv_preserved(source: Volume, tmp_path: Path) -> None:
    write_derived_pet(source, source.values, _spec(), tmp_path / "out")
    back = load_series_dir(tmp_path / "out")[0]
    f_src, f_out = suv_bw_factor(source.headers[0]), suv_bw_factor(back.headers[0])
    assert f_out == f_src
    region = (slice(1, 4), slice(2, 6), slice(2, 6))
    suv_src = float(np.mean(source.values[region])) * f_src
    suv_out = float(np.mean(back.values[region])) * f_out
    assert abs(suv_out - suv_src) / suv_src < 0.005


def test_headers_copied_and_replaced(source: Volume, tmp_path: Path) -> None:
    spec = _spec()
    paths = write_derived_pet(source, source.values, spec, tmp_path / "out")
    back = load_series_dir(tmp_path / "out")[0]
    for src, out in zip(source.headers, back.headers, strict=True):
        for name in COPIED:
            assert out.get(name) == src.get(name), name
        assert out.SeriesInstanceUID == spec.series_instance_uid != src.SeriesInstanceUID
        assert out.SOPInstanceUID == derive_uid(spec.uid_seed, src.SOPInstanceUID)
        assert list(out.ImageType) == ["DERIVED", "PRIMARY"]
        assert out.PixelRepresentation == 1 and out.BitsAllocated == 16
        assert (out.ContentDate, out.ContentTime) == ("20240517", "134512")
        assert (out.InstanceCreationDate, out.InstanceCreationTime) == ("20240517", "134512")
        assert out.SeriesDescription == "PET SDIP denoised [RESEARCH]"
        ref = out.SourceImageSequence[0]
        assert ref.ReferencedSOPInstanceUID == src.SOPInstanceUID
        assert ref.PurposeOfReferenceCodeSequence[0].CodeValue == "121322"
        assert out.DerivationDescription == spec.derivation_description
        assert out.DerivationCodeSequence[0].CodeValue == "113087"
        purposes = [e.PurposeOfReferenceCodeSequence[0].CodeValue
                    for e in out.ContributingEquipmentSequence]
        assert purposes == ["109101", "109102"]
        node = out.ContributingEquipmentSequence[1]
        assert (node.ManufacturerModelName, node.SoftwareVersions) == ("dipnode", "0.1.0")
    assert dcmread(paths[0]).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"


def test_uids_deterministic(source: Volume) -> None:
    a = [d.SOPInstanceUID for d in build_derived_pet(source, source.values, _spec("job-7"))]
    b = [d.SOPInstanceUID for d in build_derived_pet(source, source.values, _spec("job-7"))]
    c = [d.SOPInstanceUID for d in build_derived_pet(source, source.values, _spec("job-8"))]
    assert a == b and len(set(a)) == len(a)
    assert not set(a) & set(c)


def test_private_tags_dropped(source: Volume) -> None:
    source.headers[0].add_new(0x70531000, "DS", "1.23")  # a vendor SUV scale factor
    out = build_derived_pet(source, source.values, _spec())
    assert 0x70531000 not in out[0]


def test_bad_arguments_rejected(source: Volume, tmp_path: Path, study, axial_affine) -> None:
    with pytest.raises(DicomOutputError, match=r"shape expected \(5, 8, 8\)"):
        build_derived_pet(source, source.values[:-1], _spec())
    bad = source.values.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(DicomOutputError, match="finite"):
        build_derived_pet(source, bad, _spec())
    write_mr_series(np.ones((2, 4, 4)), axial_affine, tmp_path / "mr", study=study)
    mr = load_series_dir(tmp_path / "mr")[0]
    with pytest.raises(DicomOutputError, match="PET Image Storage"):
        build_derived_pet(mr, mr.values, _spec())


def test_output_spec_validates() -> None:
    with pytest.raises(DicomOutputError, match="series_instance_uid"):
        OutputSpec("not a uid", 1, "d", "d", "seed", WHEN)
    with pytest.raises(DicomOutputError, match="series_number"):
        OutputSpec("1.2.3", -1, "d", "d", "seed", WHEN)
    long = OutputSpec("1.2.3", 1, "x" * 80, "d", "seed", WHEN)
    assert len(long.labelled_description) == 64 and long.labelled_description.endswith("[RESEARCH]")


def test_units_override_for_a_map_that_is_not_activity(source: Volume, tmp_path: Path,
                                                       dciodvfy_errors) -> None:
    weight = np.linspace(0, 100, source.values.size).reshape(source.values.shape)
    paths = write_derived_pet(source, weight, _spec("w"), tmp_path / "w", units="PCNT")
    for path in paths:
        assert dciodvfy_errors(path) == []
    for k, path in enumerate(paths):  # in slice order; the loader refuses non-BQML PET
        ds = dcmread(path)
        assert ds.Units == "PCNT"
        values = ds.pixel_array * float(ds.RescaleSlope)
        assert np.max(np.abs(values - weight[k])) < 1e-2
    with pytest.raises(DicomOutputError, match="units expected"):
        build_derived_pet(source, weight, _spec(), units="SUV")
