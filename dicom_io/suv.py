"""Body-weight SUV factor from a PET header: SUVbw = (Bq/ml) * factor.

Follows the vendor-neutral QIBA/UW recipe (QIBA FDG-PET profile, "SUV calculation"):
factor = weight [g] / decay-corrected injected dose [Bq], with the dose decayed from the
injection time to the time the image is decay corrected to (Decay Correction START: series
date/time, or acquisition date/time when the series time is later than the acquisition time,
i.e. a post-processed series; ADMIN: the injection time itself, no decay).
"""
from __future__ import annotations

import datetime as dt
import math

from pydicom.dataset import Dataset
from pydicom.valuerep import DA, DT, TM

from dipnode.dicom_io.errors import UnsupportedPetError, missing


def _series(header: Dataset) -> str:
    return str(header.get("SeriesInstanceUID", "?"))


def _required(ds: Dataset, name: str, series: str) -> object:
    value = ds.get(name)
    if value is None or value == "":
        raise missing(name, series, "the SUV factor")
    return value


def _combine(date: object, time: object) -> dt.datetime:
    d = DA(str(date))
    t = TM(str(time))
    return dt.datetime.combine(d, t)


def _injection_time(rp: Dataset, header: Dataset, series: str) -> dt.datetime:
    start_dt = rp.get("RadiopharmaceuticalStartDateTime")
    if start_dt:
        value = DT(str(start_dt))
        return value.replace(tzinfo=None)
    start_t = rp.get("RadiopharmaceuticalStartTime")
    if not start_t:
        raise missing("RadiopharmaceuticalStartDateTime or RadiopharmaceuticalStartTime", series,
                      "the SUV factor (injection time)")
    # Only a time: QIBA takes the Series Date as the injection date.
    return _combine(_required(header, "SeriesDate", series), start_t)


def decay_reference_time(header: Dataset) -> dt.datetime:
    """The time the image's activity refers to under Decay Correction START."""
    series = _series(header)
    ref = _combine(_required(header, "SeriesDate", series), _required(header, "SeriesTime", series))
    acq_date, acq_time = header.get("AcquisitionDate"), header.get("AcquisitionTime")
    if acq_time:
        acq = _combine(acq_date or header.SeriesDate, acq_time)
        if ref > acq:
            # Series time after acquisition time means the series was re-created later
            # (post-processing); the acquisition time is then the true scan start.
            ref = acq
    return ref


def suv_bw_factor(header: Dataset) -> float:
    """Return the factor that turns Bq/ml into body-weight SUV (g/ml) for this PET header."""
    series = _series(header)
    units = str(_required(header, "Units", series))
    if units != "BQML":
        raise UnsupportedPetError(f"series {series}: Units expected BQML for SUV, got {units}")
    weight_kg = float(_required(header, "PatientWeight", series))
    if weight_kg <= 0:
        raise UnsupportedPetError(f"series {series}: PatientWeight expected > 0 kg, got {weight_kg}")
    seq = header.get("RadiopharmaceuticalInformationSequence")
    if not seq:
        raise missing("RadiopharmaceuticalInformationSequence", series, "the SUV factor")
    rp = seq[0]
    dose = float(_required(rp, "RadionuclideTotalDose", series))
    half_life = float(_required(rp, "RadionuclideHalfLife", series))
    if dose <= 0 or half_life <= 0:
        raise UnsupportedPetError(f"series {series}: RadionuclideTotalDose and RadionuclideHalfLife "
                                  f"expected > 0, got {dose} Bq and {half_life} s")
    correction = str(_required(header, "DecayCorrection", series))
    if correction == "ADMIN":
        decayed = dose  # image already decay corrected to the administration time
    elif correction == "START":
        elapsed = (decay_reference_time(header) - _injection_time(rp, header, series)).total_seconds()
        if elapsed < 0:
            raise UnsupportedPetError(f"series {series}: injection time expected before the scan start, "
                                      f"got {-elapsed:.0f} s after it")
        decayed = dose * math.exp(-math.log(2.0) * elapsed / half_life)
    else:
        raise UnsupportedPetError(f"series {series}: DecayCorrection expected START or ADMIN, got {correction}")
    return weight_kg * 1000.0 / decayed
