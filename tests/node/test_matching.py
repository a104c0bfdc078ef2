import dataclasses

import pytest

from dipnode.models.params import Method
from dipnode.node.matching import DecisionKind, MatchRules, choose_mr, decide, rank_mr
from dipnode.node.settings import Settings
from dipnode.node.store import SeriesRow, SeriesState


def row(uid: str, modality: str = "MR", study: str = "S1", patient: str = "P1", **kw) -> SeriesRow:
    base = dict(
        series_uid=uid, study_uid=study, patient_id=patient, issuer="HOSP", modality=modality,
        series_description="", frame_of_reference_uid="F1", mr_acquisition_type="", slice_thickness=None,
        study_date="20260110", series_date="20260110", expected_count=None, instance_count=10,
        first_received_at=0.0, last_received_at=100.0, completed_at=130.0, state=SeriesState.COMPLETE,
        late_instances=0,
    )
    base.update(kw)
    return SeriesRow(**base)


PET = row("PET", modality="PT")


def settings(**matching) -> Settings:
    return Settings(node={"allowed_calling_aets": ["*"]}, matching=matching)


RULES = MatchRules.from_settings(settings())


def test_same_study_mr_is_chosen():
    mr = row("MR1", series_description="T1 MPRAGE")
    assert choose_mr(PET, [PET, mr], RULES) == mr


def test_other_study_of_same_patient_within_window():
    mr = row("MR2", study="S0", study_date="20251220")  # 21 days earlier
    assert choose_mr(PET, [mr], RULES) == mr


def test_other_study_out_of_window_is_rejected():
    mr = row("MR3", study="S0", study_date="20251201")  # 40 days
    report = rank_mr(PET, [mr], RULES)
    assert report.chosen is None and "40 days apart (window 30)" in report.rejected[0][1]


def test_other_study_with_unknown_date_is_rejected():
    assert choose_mr(PET, [row("MR", study="S0", study_date="")], RULES) is None


@pytest.mark.parametrize("kw", [{"patient": "P2"}, {"issuer": "OTHER"}])
def test_different_patient_is_rejected(kw):
    mr = row("MR4", study="S0", **kw)
    report = rank_mr(PET, [mr], RULES)
    assert report.chosen is None and "different" in report.rejected[0][1]


def test_same_study_different_patient_id_is_rejected():
    assert choose_mr(PET, [row("MR", patient="P9")], RULES) is None


def test_empty_patient_id_never_matches_across_studies():
    pet = row("PET", modality="PT", patient="")
    assert choose_mr(pet, [row("MR", study="S0", patient="")], RULES) is None
    same_study = row("MR", patient="")
    assert choose_mr(pet, [same_study], RULES) == same_study


def test_t1_3d_preferred_over_other_mr():
    flair = row("FLAIR", series_description="AX T2 FLAIR", mr_acquisition_type="2D", slice_thickness=5.0)
    t1 = row("T1", series_description="sag 3D T1 MPRAGE", mr_acquisition_type="3D", slice_thickness=1.0)
    dwi = row("DWI", series_description="DWI b1000", mr_acquisition_type="2D", slice_thickness=4.0)
    assert choose_mr(PET, [flair, dwi, t1], RULES) == t1


def test_tie_breaks_3d_then_finest_slices_then_most_recent():
    a = row("A", series_description="T1", mr_acquisition_type="2D", slice_thickness=1.0)
    b = row("B", series_description="T1", mr_acquisition_type="3D", slice_thickness=1.2)
    assert choose_mr(PET, [a, b], RULES) == b
    c = row("C", series_description="T1", mr_acquisition_type="3D", slice_thickness=0.9)
    assert choose_mr(PET, [a, b, c], RULES) == c
    d = row("D", series_description="T1", mr_acquisition_type="3D", slice_thickness=0.9, last_received_at=500.0)
    assert choose_mr(PET, [d, c], RULES) == d


def test_same_study_beats_better_mr_elsewhere():
    here = row("HERE", series_description="T1")
    elsewhere = row("ELSE", study="S0", series_description="3D T1 MPRAGE", mr_acquisition_type="3D")
    assert choose_mr(PET, [elsewhere, here], RULES) == here


def test_require_3d():
    rules = dataclasses.replace(RULES, require_3d=True)
    two_d = row("2D", series_description="T1", mr_acquisition_type="2D")
    assert choose_mr(PET, [two_d], rules) is None
    assert choose_mr(PET, [two_d], RULES) == two_d


def test_decide_pairs_when_mr_present():
    mr = row("MR1", series_description="T1")
    d = decide(PET, [mr], now=131.0, settings=settings())
    assert d.kind is DecisionKind.PAIR and d.mr == mr and d.method is Method.SDIP


def test_decide_waits_then_falls_back_after_mr_wait_s():
    s = settings(mr_wait_s=600)
    d = decide(PET, [], now=130.0 + 599, settings=s)
    assert d.kind is DecisionKind.WAIT and d.wait_until == 730.0
    d = decide(PET, [], now=730.0, settings=s)
    assert d.kind is DecisionKind.FALLBACK and d.method is Method.GAUSSIAN and "mr_wait_s=600" in d.reason


def test_decide_fails_when_configured_and_names_rejections():
    s = settings(mr_wait_s=10, fallback="fail")
    far = row("MRFAR", study="S0", study_date="20250101")
    d = decide(PET, [far], now=1000.0, settings=s)
    assert d.kind is DecisionKind.FAIL and d.method is None and "MRFAR" in d.reason and "days apart" in d.reason


def test_decide_waits_longer_for_an_mr_still_arriving():
    arriving = row("MRA", series_description="T1", state=SeriesState.RECEIVING, completed_at=None)
    s = settings(mr_wait_s=100)
    d = decide(PET, [arriving], now=250.0, settings=s)  # past 130 + 100, MR on its way
    assert d.kind is DecisionKind.WAIT and "MRA" in d.reason
    assert decide(PET, [arriving], now=330.0, settings=s).kind is DecisionKind.FALLBACK


def test_gaussian_method_needs_no_mr():
    s = Settings(node={"allowed_calling_aets": ["*"]}, method={"name": "gaussian"})
    d = decide(PET, [], now=0.0, settings=s)
    assert d.kind is DecisionKind.NO_MR_NEEDED and d.method is Method.GAUSSIAN


def test_decide_keeps_the_jobs_method_for_a_qa_rerun():
    mr = row("MR1", series_description="T1")
    d = decide(PET, [mr], now=131.0, settings=settings(), method=Method.CDIP)
    assert d.kind is DecisionKind.PAIR and d.method is Method.CDIP
    # A Gaussian re-run on an SDIP node needs no MR.
    d = decide(PET, [], now=131.0, settings=settings(), method=Method.GAUSSIAN)
    assert d.kind is DecisionKind.NO_MR_NEEDED and d.method is Method.GAUSSIAN


def test_mr_wait_does_not_count_the_nodes_downtime():
    s = settings(mr_wait_s=600)
    # The PET completed at 130; the node was down until 5000: the MR gets 600 s from then.
    d = decide(PET, [], now=5000.0 + 599, settings=s, listening_since=5000.0)
    assert d.kind is DecisionKind.WAIT and d.wait_until == 5600.0
    assert decide(PET, [], now=5600.0, settings=s, listening_since=5000.0).kind is DecisionKind.FALLBACK
