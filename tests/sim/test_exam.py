"""The realistic exam on disk: what each series' headers say, and that every file is valid."""
from __future__ import annotations

import numpy as np
import pydicom

from dipnode.sim.exam import MR_SERIES, RealisticExam
from peers import dciodvfy_errors


def headers(paths):
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]


def test_every_series_is_valid_dicom(realistic_exam: RealisticExam) -> None:
    ex = realistic_exam
    firsts = [ex.pet_files[0], ex.ct_files[0]] + [ex.mr_files[name][0] for name in MR_SERIES]
    firsts += [ex.mr_files["localizer"][4], ex.mr_files["localizer"][8], ex.mr_files["dwi"][-1]]
    for path in firsts:
        assert dciodvfy_errors(path) == [], path


def test_the_exam_looks_like_a_scanners(realistic_exam: RealisticExam) -> None:
    ex = realistic_exam
    pet, ct = headers(ex.pet_files[:1])[0], headers(ex.ct_files[:1])[0]
    assert (pet.Modality, ct.Modality) == ("PT", "CT")
    assert pet.StudyInstanceUID == ct.StudyInstanceUID and pet.FrameOfReferenceUID == ct.FrameOfReferenceUID
    mr = {name: headers(ex.mr_files[name]) for name in MR_SERIES}
    first = mr["t1"][0]
    assert first.StudyInstanceUID != pet.StudyInstanceUID and first.FrameOfReferenceUID != pet.FrameOfReferenceUID
    assert (first.PatientID, first.IssuerOfPatientID) == (pet.PatientID, pet.IssuerOfPatientID) == ("EXAM01", "HOSP")
    assert int(pet.StudyDate) - int(first.StudyDate) == 3
    # A 3-plane localizer: three orientations in one series.
    iops = {tuple(np.round(np.asarray(d.ImageOrientationPatient, float), 3)) for d in mr["localizer"]}
    assert len(iops) == 3
    # DWI: every position twice, b = 0 and b = 1000.
    positions = [tuple(np.round(np.asarray(d.ImagePositionPatient, float), 2)) for d in mr["dwi"]]
    assert len(set(positions)) == len(positions) // 2
    assert sorted({float(d.DiffusionBValue) for d in mr["dwi"]}) == [0.0, 1000.0]
    assert list(mr["adc"][0].ImageType) == ["DERIVED", "PRIMARY", "DIFFUSION", "ADC"]
    # The T1 is a sagittal 3D acquisition: its slice normal runs left-right.
    row, col = np.asarray(first.ImageOrientationPatient[:3], float), np.asarray(first.ImageOrientationPatient[3:], float)
    assert abs(np.cross(row, col)[0]) > 0.99 and first.MRAcquisitionType == "3D"
    assert first.SeriesDescription == "t1_mprage_sag_p2_iso"
