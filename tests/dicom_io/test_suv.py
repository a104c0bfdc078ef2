from __future__ import annotations

import copy
import datetime as dt
from pathlib import Path

import pytest
from pydicom import dcmread

from dipnode.dicom_io.errors import MissingAttributeError, UnsupportedPetError
from dipnode.dicom_io.suv import suv_bw_factor
from dipnode.sim.dicom_study import write_pet_series

# Hand computation (F-18, 70 kg, 185 MBq injected 3600 s before series start):
# decay = 2 ** (-3600 / 6586.2) = exp(-0.693147 * 0.546597) = exp(-0.378876) = 0.684675
# dose at start = 185e6 * 0.684675 = 1.266648e8 Bq; factor = 70 000 g / 1.266648e8 Bq
HAND_FACTOR = 5.52667e-4


@pytest.fixture
def header(tmp_path: Path, study, axial_affine, pet_values) -> object:
    paths = write_pet_series(pet_values((2, 4, 4)), axial_affine, tmp_path, study=study,
                             series_datetime=dt.datetime(2024, 5, 17, 10, 0, 0))
    return dcmread(paths[0], stop_before_pixels=True)


def test_factor_matches_hand_computation(header) -> None:
    assert suv_bw_factor(header) == pytest.approx(HAND_FACTOR, rel=2e-5)


def test_time_only_injection_uses_series_date(header) -> None:
    rp = header.RadiopharmaceuticalInformationSequence[0]
    del rp.RadiopharmaceuticalStartDateTime
    assert rp.RadiopharmaceuticalStartTime.startswith("0900")
    assert suv_bw_factor(header) == pytest.approx(HAND_FACTOR, rel=2e-5)


def test_series_time_after_acquisition_uses_acquisition_time(header) -> None:
    later = copy.deepcopy(header)
    later.SeriesTime = "113000"  # re-created series: QIBA takes the acquisition time instead
    assert suv_bw_factor(later) == pytest.approx(HAND_FACTOR, rel=2e-5)
    earlier_acq = copy.deepcopy(header)
    earlier_acq.SeriesTime, earlier_acq.AcquisitionTime = "100000", "101000"
    # series time is earlier than acquisition: series time stays the reference
    assert suv_bw_factor(earlier_acq) == pytest.approx(HAND_FACTOR, rel=2e-5)


def test_admin_decay_correction_uses_injected_dose(header) -> None:
    header.DecayCorrection = "ADMIN"
    assert suv_bw_factor(header) == pytest.approx(70_000 / 185e6, rel=1e-9)


@pytest.mark.parametrize("name", ["PatientWeight", "Units", "DecayCorrection"])
def test_missing_attribute_is_named(header, name: str) -> None:
    delattr(header, name)
    with pytest.raises(MissingAttributeError, match=name):
        suv_bw_factor(header)


def test_missing_half_life_is_named(header) -> None:
    del header.RadiopharmaceuticalInformationSequence[0].RadionuclideHalfLife
    with pytest.raises(MissingAttributeError, match="RadionuclideHalfLife"):
        suv_bw_factor(header)


def test_cnts_refused(header) -> None:
    header.Units = "CNTS"
    with pytest.raises(UnsupportedPetError, match="CNTS"):
        suv_bw_factor(header)
