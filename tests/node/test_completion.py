from pathlib import Path

import pytest

from dipnode.node.ingest.completion import complete_due, due_for_completion, expected_count, instance_record
from dipnode.node.jobs.rows import InstanceRecord, JobState, SeriesState
from dipnode.node.jobs.store import Store
from dipnode.models.params import DipParams

AGE = 30.0


def inst(n: int, series: str = "1.9.1", expected: int | None = None) -> InstanceRecord:
    return InstanceRecord(
        sop_instance_uid=f"{series}.{n}", sop_class_uid="1.2.840.10008.5.1.4.1.1.128",
        path=Path(f"/spool/{n}.dcm"), study_uid="1.9", series_uid=series, modality="PT",
        transfer_syntax="1.2.840.10008.1.2.1", patient_id="P", expected_count=expected,
    )


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "s.sqlite") as s:
        yield s


def test_expected_count_rules():
    assert expected_count("PT", number_of_slices=47) == 47
    assert expected_count("PT", number_of_slices=47, series_type="DYNAMIC\\IMAGE", number_of_time_slices=6) == 282
    assert expected_count("PT", number_of_slices=10, series_type="GATED\\IMAGE",
                          number_of_rr_intervals=2, number_of_time_slots=8) == 160
    assert expected_count("PT", number_of_slices=47, series_type="STATIC\\IMAGE", number_of_time_slices=6) == 47
    assert expected_count("MR", images_in_acquisition=176) == 176
    assert expected_count("PT", images_in_acquisition=90) == 90  # no Number of Slices
    assert expected_count("MR") is None
    with pytest.raises(ValueError, match="number_of_slices: expected an integer >= 1, got -2"):
        expected_count("PT", number_of_slices=-2)


def test_complete_by_count_before_stable_age(store):
    for n in range(3):
        store.record_instance(inst(n, expected=3), 100.0 + n)
    assert due_for_completion(store, 102.5, AGE) == ["1.9.1"]
    [c] = complete_due(store, 102.5, AGE)
    assert c.by_count and not c.short and not c.rerun
    assert store.series("1.9.1").state is SeriesState.COMPLETE
    assert store.series("1.9.1").completed_at == 102.5
    assert due_for_completion(store, 1e6, AGE) == []


def test_not_complete_while_short_of_count_and_young(store):
    store.record_instance(inst(0, expected=3), 100.0)
    store.record_instance(inst(1, expected=3), 101.0)
    assert due_for_completion(store, 101.0 + AGE - 0.01, AGE) == []


def test_stable_age_restarts_with_each_instance(store):
    store.record_instance(inst(0), 0.0)
    assert due_for_completion(store, 29.0, AGE) == []
    store.record_instance(inst(1), 29.0)  # the clock restarts here
    assert due_for_completion(store, 31.0, AGE) == []
    assert due_for_completion(store, 59.0, AGE) == ["1.9.1"]
    [c] = complete_due(store, 59.0, AGE)
    assert not c.by_count and not c.short  # no expected count known


def test_short_series_completes_by_age_and_says_so(store):
    store.record_instance(inst(0, expected=5), 0.0)
    [c] = complete_due(store, AGE, AGE)
    assert c.short and not c.by_count and c.series.instance_count == 1


def test_association_end_is_not_completion(store):
    # Two associations deliver halves of a series with a pause shorter than the stable age:
    # nothing between them (e.g. an association release) completes the series.
    for n in range(2):
        store.record_instance(inst(n), 0.0)
    assert complete_due(store, 10.0, AGE) == []  # first association released at t=0
    for n in range(2, 4):
        store.record_instance(inst(n), 20.0)
    assert complete_due(store, 45.0, AGE) == []
    [c] = complete_due(store, 50.0, AGE)
    assert c.series.instance_count == 4


def test_late_instance_reopens_and_completion_asks_for_a_rerun(store):
    for n in range(2):
        store.record_instance(inst(n, expected=2), 0.0)
    [first] = complete_due(store, 1.0, AGE)
    job = store.create_job("1.9.1", method="sdip", params=DipParams(), now=1.0)
    store.record_instance(inst(2, expected=2), 100.0)  # late
    s = store.series("1.9.1")
    assert s.state is SeriesState.RECEIVING and s.late_instances == 1
    # Count is already above expected: complete again at once, flagged as a re-run.
    [again] = complete_due(store, 100.0, AGE)
    assert again.rerun and again.series.instance_count == 3
    rerun = store.create_job("1.9.1", method="sdip", params=DipParams(), now=100.0, rerun=True)
    assert rerun.rerun_of == job.id and rerun.state is JobState.QUEUED


def test_instance_between_check_and_mark_keeps_series_open(store, monkeypatch):
    store.record_instance(inst(0), 0.0)
    real = store.mark_series_complete

    def racing(uid, at, *, if_instance_count=None):
        store.record_instance(inst(1), at)  # arrives just before the mark
        return real(uid, at, if_instance_count=if_instance_count)

    monkeypatch.setattr(store, "mark_series_complete", racing)
    assert complete_due(store, AGE, AGE) == []
    assert store.series("1.9.1").state is SeriesState.RECEIVING


def test_bad_stable_age(store):
    with pytest.raises(ValueError, match="stable_age_s: expected a number > 0, got 0"):
        due_for_completion(store, 0.0, 0)


def test_instance_record_from_a_pydicom_header():
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.SOPInstanceUID, ds.SOPClassUID = "1.9.1.1", "1.2.840.10008.5.1.4.1.1.128"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = "1.9", "1.9.1", "PT"
    ds.PatientID, ds.IssuerOfPatientID = "P", "HOSP"
    ds.SeriesType = ["DYNAMIC", "IMAGE"]
    ds.NumberOfSlices, ds.NumberOfTimeSlices = 47, 3
    ds.SliceThickness = "2.0"
    ds.StudyDate = "20260110"
    rec = instance_record(ds, Path("/spool/x.dcm"), "1.2.840.10008.1.2.1")
    assert (rec.series_uid, rec.patient_id, rec.issuer_of_patient_id) == ("1.9.1", "P", "HOSP")
    assert rec.expected_count == 141 and rec.slice_thickness == 2.0 and rec.study_date == "20260110"
    assert rec.mr_acquisition_type == "" and rec.series_description == ""
    mr = Dataset()
    mr.Modality, mr.MRAcquisitionType, mr.ImagesInAcquisition = "MR", "3D", "176"
    assert instance_record(mr, Path("/y"), "x").expected_count == 176
    mr.ImagesInAcquisition = "0"  # malformed counts are absent, not an error
    assert instance_record(mr, Path("/y"), "x").expected_count is None
