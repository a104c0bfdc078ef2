"""Synthetic study writer: valid DICOM, realistic PET headers, deterministic identity."""
from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from dipnode.sim.dicom_study import new_study, write_mr_series, write_pet_series
from peers import dciodvfy_errors


def _affine() -> np.ndarray:
    a = np.diag([2.0, 2.0, 2.5, 1.0])
    a[:3, 3] = [-8.0, -8.0, 0.0]
    return a


def test_new_study_is_deterministic() -> None:
    a, b = new_study("P9", seed=3), new_study("P9", seed=3)
    assert a == b
    c = new_study("P9", seed=4)
    assert c.study_instance_uid != a.study_instance_uid
    assert c.frame_of_reference_uid != a.frame_of_reference_uid
    with pytest.raises(ValueError, match="patient_id"):
        new_study("")


def test_pet_headers_are_realistic_and_valid(tmp_path: Path) -> None:
    study = new_study("P1", seed=1)
    start = dt.datetime(2024, 5, 17, 10, 15, 0)
    values = np.random.default_rng(0).gamma(2.0, 3000.0, (4, 8, 8))
    paths = write_pet_series(values, _affine(), tmp_path, study=study, series_datetime=start,
                             injected_dose_bq=200e6, weight_kg=81.5)
    assert len(paths) == 4
    for path in paths:
        assert dciodvfy_errors(path) == []
    ds = dcmread(paths[2])
    assert (ds.Modality, ds.Units, ds.DecayCorrection) == ("PT", "BQML", "START")
    assert list(ds.CorrectedImage) == ["DECY", "ATTN", "SCAT", "DTIM", "RAN", "NORM"]
    assert list(ds.SeriesType) == ["STATIC", "IMAGE"]
    assert (ds.NumberOfSlices, ds.ImageIndex, ds.InstanceNumber) == (4, 3, 3)
    assert float(ds.PatientWeight) == 81.5 and float(ds.RescaleIntercept) == 0
    rp = ds.RadiopharmaceuticalInformationSequence[0]
    code = rp.RadionuclideCodeSequence[0]
    assert (code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning) == ("C-111A1", "SRT", "^18^Fluorine")
    assert float(rp.RadionuclideHalfLife) == 6586.2 and float(rp.RadionuclideTotalDose) == 200e6
    injected = dt.datetime.strptime(rp.RadiopharmaceuticalStartDateTime[:14], "%Y%m%d%H%M%S")
    assert start - injected == dt.timedelta(minutes=60)
    assert ds.PatientID == "P1" and ds.StudyInstanceUID == study.study_instance_uid
    # stored integers times the per-slice slope give the Bq/ml values
    np.testing.assert_allclose(ds.pixel_array * float(ds.RescaleSlope), values[2],
                               atol=float(ds.RescaleSlope))
    assert dcmread(paths[0]).RescaleSlope != ds.RescaleSlope


def test_unsigned_pet_and_same_uids_on_rewrite(tmp_path: Path) -> None:
    study = new_study("P1", seed=1)
    values = np.full((2, 4, 4), 5000.0)
    a = write_pet_series(values, _affine(), tmp_path / "a", study=study, signed=False)
    b = write_pet_series(values, _affine(), tmp_path / "b", study=study, signed=False)
    da, db = dcmread(a[0]), dcmread(b[0])
    assert da.PixelRepresentation == 0 and int(da.pixel_array.max()) == 65535
    assert (da.SOPInstanceUID, da.SeriesInstanceUID) == (db.SOPInstanceUID, db.SeriesInstanceUID)
    with pytest.raises(ValueError, match="values_bqml"):
        write_pet_series(-values, _affine(), tmp_path / "c", study=study, signed=False)


def test_mr_is_3d_in_its_own_frame_and_valid(tmp_path: Path) -> None:
    study = new_study("P1", seed=1)
    theta = np.radians(25)
    rot = np.array([[np.cos(theta), 0, np.sin(theta)], [0, 1, 0], [-np.sin(theta), 0, np.cos(theta)]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([1.0, 1.2, 1.5])
    paths = write_mr_series(np.random.default_rng(2).random((3, 8, 6)), affine, tmp_path, study=study,
                            frame_of_reference_uid="1.2.826.0.1.3680043.2.1125.77")
    for path in paths:
        assert dciodvfy_errors(path) == []
    ds = dcmread(paths[0])
    assert (ds.Modality, ds.MRAcquisitionType) == ("MR", "3D")
    assert ds.FrameOfReferenceUID == "1.2.826.0.1.3680043.2.1125.77"
    assert ds.StudyInstanceUID == study.study_instance_uid
    np.testing.assert_allclose([float(x) for x in ds.ImageOrientationPatient],
                               [*rot[:, 0], *rot[:, 1]], atol=1e-7)
    assert [float(x) for x in ds.PixelSpacing] == [1.2, 1.0]
    assert int(ds.pixel_array.max()) <= 4095


def test_tilted_affine_rejected(tmp_path: Path) -> None:
    tilted = _affine()
    tilted[1, 2] = 0.8  # slice step leaves the row x column normal
    with pytest.raises(ValueError, match="orthogonal"):
        write_pet_series(np.ones((2, 4, 4)), tilted, tmp_path, study=new_study("P1"))
