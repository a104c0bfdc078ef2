"""Stability map as a Parametric Map: valid, float values on the PET grid, referencing the PET."""
from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from dipnode.dicom_io.errors import DicomOutputError
from dipnode.dicom_io.parametric_map import (build_data_weight_map, build_stability_map,
                                                write_data_weight_map, write_stability_map)
from dipnode.dicom_io.provenance import OutputSpec
from dipnode.dicom_io.series import load_series_dir
from dipnode.dicom_io.uids import derive_uid
from dipnode.dicom_io.volume import Volume
from dipnode.sim.dicom_study import write_pet_series

WHEN = dt.datetime(2024, 5, 17, 13, 45, 12)
SPEC = OutputSpec(derive_uid("job-3", "map"), 1002, "PET SDIP stability map",
                  "SDIP stability: std of U-Net outputs, epochs 100..200 step 5", "job-3", WHEN,
                  software_version="0.1.0")


@pytest.fixture
def source(tmp_path: Path, study, oblique_affine, pet_values) -> Volume:
    write_pet_series(pet_values((4, 8, 12)), oblique_affine, tmp_path / "src", study=study)
    return load_series_dir(tmp_path / "src")[0]


def test_map_passes_dciodvfy_and_reads_back(source: Volume, tmp_path: Path, dciodvfy_errors) -> None:
    stability = np.random.default_rng(1).random(source.values.shape).astype(np.float32) * 50.0
    path = write_stability_map(source, stability, SPEC, tmp_path / "map",
                               mr_reference_note="MR 1.2.3.4 (other study)")
    assert dciodvfy_errors(path) == []

    ds = dcmread(path)
    assert path == tmp_path / "map" / f"{ds.SOPInstanceUID}.dcm"  # the writer names it by its UID
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30"  # Parametric Map Storage
    assert "FloatPixelData" in ds and int(ds.NumberOfFrames) == stability.shape[0]
    assert ds.StudyInstanceUID == source.study_instance_uid
    assert ds.FrameOfReferenceUID == source.frame_of_reference_uid
    assert ds.SeriesInstanceUID == SPEC.series_instance_uid
    assert ds.SeriesDescription.endswith("[RESEARCH]") and ds.ContentQualification == "RESEARCH"
    unit = ds.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0].MeasurementUnitsCodeSequence[0]
    assert (unit.CodeValue, unit.CodingSchemeDesignator) == ("Bq/mL", "UCUM")
    # highdicom orders frames along its own volume convention (here the reverse of the slice
    # normal); each frame carries its position, so match frames to PET slices by position.
    ipps = np.array([[float(x) for x in h.ImagePositionPatient] for h in source.headers])
    seen = set()
    for f, frame in enumerate(ds.PerFrameFunctionalGroupsSequence):
        ipp = np.array([float(x) for x in frame.PlanePositionSequence[0].ImagePositionPatient])
        k = int(np.argmin(np.linalg.norm(ipps - ipp, axis=1)))
        np.testing.assert_allclose(ipp, ipps[k], atol=1e-4)
        np.testing.assert_array_equal(ds.pixel_array[f], stability[k])
        derivation = frame.DerivationImageSequence[0]
        assert "MR 1.2.3.4" in derivation.DerivationDescription
        refs = {r.ReferencedSOPInstanceUID for r in derivation.SourceImageSequence}
        assert source.sop_instance_uids[k] in refs
        seen.add(k)
    assert seen == set(range(stability.shape[0]))
    referenced = {r.ReferencedSOPInstanceUID
                  for s in ds.ReferencedSeriesSequence for r in s.ReferencedInstanceSequence}
    assert referenced == set(source.sop_instance_uids)
    shared = ds.SharedFunctionalGroupsSequence[0]
    np.testing.assert_allclose([float(x) for x in shared.PlaneOrientationSequence[0].ImageOrientationPatient],
                               [float(x) for x in source.headers[0].ImageOrientationPatient], atol=1e-6)


def test_map_uid_deterministic(source: Volume) -> None:
    stability = np.ones(source.values.shape, dtype=np.float32)
    a = build_stability_map(source, stability, SPEC).SOPInstanceUID
    assert a == build_stability_map(source, stability, SPEC).SOPInstanceUID


def test_map_rejects_bad_input(source: Volume) -> None:
    with pytest.raises(DicomOutputError, match="shape expected"):
        build_stability_map(source, np.ones((1, 2, 3)), SPEC)
    with pytest.raises(DicomOutputError, match="UCUM"):
        build_stability_map(source, np.ones(source.values.shape), SPEC, unit=("x", "99LOCAL", "x"))


def test_data_weight_map_passes_dciodvfy_with_unit_one_and_labels(source: Volume, tmp_path: Path,
                                                                  dciodvfy_errors) -> None:
    weight = np.random.default_rng(2).random(source.values.shape).astype(np.float32)
    weight[0] = 1.0  # a slice wholly kept from the measured data
    weight[1, 0, 0] = 0.0
    spec = OutputSpec(derive_uid("job-3", "weight"), 1004, "PET SDIP data weight",
                      "SDIP data weight w = max(S_norm, G)", "job-3", WHEN, software_version="0.1.0")
    path = write_data_weight_map(source, weight, spec, tmp_path / "weight", mr_reference_note="MR 1.2.3.4")
    assert dciodvfy_errors(path) == []

    ds = dcmread(path)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30"
    assert ds.ContentLabel == "DATAWEIGHT" and "data weight" in ds.ContentDescription
    rwvm = ds.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    unit = rwvm.MeasurementUnitsCodeSequence[0]
    assert (unit.CodeValue, unit.CodingSchemeDesignator, unit.CodeMeaning) == ("1", "UCUM", "no units")
    assert rwvm.LUTLabel == "DATA_WEIGHT" and "OSEM" in rwvm.LUTExplanation
    assert (rwvm.DoubleFloatRealWorldValueFirstValueMapped,
            rwvm.DoubleFloatRealWorldValueLastValueMapped) == (0.0, 1.0)
    ipps = np.array([[float(x) for x in h.ImagePositionPatient] for h in source.headers])
    for f, frame in enumerate(ds.PerFrameFunctionalGroupsSequence):
        ipp = np.array([float(x) for x in frame.PlanePositionSequence[0].ImagePositionPatient])
        k = int(np.argmin(np.linalg.norm(ipps - ipp, axis=1)))
        np.testing.assert_array_equal(ds.pixel_array[f], weight[k])
    # its own instance, distinct from the stability map's of the same job
    assert ds.SOPInstanceUID != build_stability_map(source, weight, SPEC).SOPInstanceUID
    assert path.name == f"{ds.SOPInstanceUID}.dcm"


def test_data_weight_map_rejects_values_outside_0_1(source: Volume) -> None:
    bad = np.full(source.values.shape, 1.5, dtype=np.float32)
    with pytest.raises(DicomOutputError, match=r"\[0, 1\]"):
        build_data_weight_map(source, bad, SPEC)
