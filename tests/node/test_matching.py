import dataclasses

import pytest

from dipnode.models.params import Method
from dipnode.node.jobs.matching import DecisionKind, MatchRules, choose_mr, decide, rank_mr
from dipnode.node.settings import Settings
from dipnode.node.jobs.rows import SeriesRow, SeriesState


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


# -- a real MR exam: exclusions, grace period, pass-over, sources ---------------------------------

from pydicom.dataset import Dataset  # noqa: E402

from dipnode.node.jobs.matching import remote_candidate  # noqa: E402
from dipnode.node.jobs.rows import FetchRow, FetchState  # noqa: E402


def exam() -> dict[str, SeriesRow]:
    """The series of a realistic MR exam 3 days before the PET (another study)."""
    common = dict(study="MRX", study_date="20260107", first_received_at=10.0)
    return {
        "localizer": row("LOC", series_description="localizer", image_type="ORIGINAL\\PRIMARY\\M\\NORM",
                         orientations_mixed=True, mr_acquisition_type="2D", slice_thickness=8.0, **common),
        "t2": row("T2", series_description="t2_tse_tra", image_type="ORIGINAL\\PRIMARY\\M\\NORM",
                  mr_acquisition_type="2D", slice_thickness=6.0, **common),
        "dwi": row("DWI", series_description="ep2d_diff_b0_1000_tra", positions_repeated=True,
                   image_type="ORIGINAL\\PRIMARY\\DIFFUSION\\NONE", mr_acquisition_type="2D", **common),
        "adc": row("ADC", series_description="ep2d_diff_b0_1000_tra_ADC",
                   image_type="DERIVED\\PRIMARY\\DIFFUSION\\ADC", mr_acquisition_type="2D", **common),
        "t1": row("T1", series_description="t1_mprage_sag_p2_iso", image_type="ORIGINAL\\PRIMARY\\M\\ND\\NORM",
                  mr_acquisition_type="3D", slice_thickness=1.0, **common),
    }


def test_real_exam_chooses_the_t1_and_says_why_each_other_series_was_passed_over():
    rows = exam()
    report = rank_mr(PET, list(rows.values()), RULES)
    assert report.chosen == rows["t1"]
    why = dict(report.rejected)
    assert set(why) == {"LOC", "DWI", "ADC"}
    assert "matches exclusion" in why["LOC"]  # "localizer"; it also mixes orientations
    assert "DIFFUSION is excluded" in why["DWI"]
    assert "DERIVED is excluded" in why["ADC"]
    assert [r.series_uid for r in report.ranked] == ["T1", "T2"]
    d = decide(PET, list(rows.values()), now=1000.0, settings=settings())
    assert d.kind is DecisionKind.PAIR and d.mr == rows["t1"]
    assert "chose MR T1 't1_mprage_sag_p2_iso' (other study 3 days earlier, 3D, 1 mm)" in d.choice
    assert "LOC 'localizer'" in d.choice and "ADC 'ep2d_diff_b0_1000_tra_ADC'" in d.choice
    assert "ranked lower: T2 't2_tse_tra'" in d.choice


@pytest.mark.parametrize("field,value,expected", [
    ("image_type", "ORIGINAL\\PRIMARY\\LOCALIZER", "LOCALIZER is excluded"),
    ("image_type", "DERIVED\\SECONDARY\\MPR", "DERIVED is excluded"),
    ("image_type", "ORIGINAL\\PRIMARY\\P\\ND", "P is excluded"),  # a phase image
    ("orientations_mixed", True, "several Image Orientations"),
    ("positions_repeated", True, "repeat slice positions"),
    ("series_description", "AAHead_Scout_64ch", "matches exclusion"),
    ("series_description", "T1 3D MPR COR", "matches exclusion '(?<![a-z])mpr"),
    ("series_description", "ep2d_diff_TRACEW", "matches exclusion"),
])
def test_each_exclusion_rule_alone_keeps_a_t1_looking_series_out(field, value, expected):
    t1 = row("X", series_description="T1 MPRAGE 3D", mr_acquisition_type="3D")
    assert choose_mr(PET, [t1], RULES) == t1
    bad = dataclasses.replace(t1, **{field: value})
    report = rank_mr(PET, [bad], RULES)
    assert report.chosen is None and expected in report.rejected[0][1]


def test_mprage_is_not_taken_for_a_reformat_and_exclusions_are_configurable():
    assert choose_mr(PET, [row("X", series_description="t1_mprage_sag")], RULES) is not None
    rules = MatchRules.from_settings(settings(mr_exclude_patterns=[], mr_exclude_image_types=[]))
    loc = row("L", series_description="localizer", image_type="ORIGINAL\\PRIMARY\\LOCALIZER")
    assert choose_mr(PET, [loc], rules) == loc
    # Header facts are not configurable: a mixed-orientation series never loads as a volume.
    assert choose_mr(PET, [dataclasses.replace(loc, orientations_mixed=True)], rules) is None


def test_grace_period_waits_for_a_better_series_of_the_exam():
    s = settings(mr_grace_s=60)
    t2 = exam()["t2"]  # the exam's first series arrived at 10.0
    d = decide(PET, [t2], now=40.0, settings=s)
    assert d.kind is DecisionKind.WAIT and d.wait_until == 70.0 and "mr_grace_s" in d.reason
    t1_arriving = dataclasses.replace(exam()["t1"], state=SeriesState.RECEIVING, completed_at=None)
    # Past the grace period, a better-ranked series still arriving is waited for ...
    d = decide(PET, [t2, t1_arriving], now=80.0, settings=s)
    assert d.kind is DecisionKind.WAIT and "T1" in d.reason
    # ... and taken once complete.
    d = decide(PET, [t2, exam()["t1"]], now=90.0, settings=s)
    assert d.kind is DecisionKind.PAIR and d.mr.series_uid == "T1"
    # Without a better one arriving, the T2 is taken when the grace period ends.
    d = decide(PET, [t2], now=70.0, settings=s)
    assert d.kind is DecisionKind.PAIR and d.mr.series_uid == "T2"


def test_a_passed_over_mr_gives_way_to_the_next_then_the_fallback():
    rows = exam()
    failed = {"T1": "MR unusable: AlignmentError: registration: Mattes MI -0.0010 above max_metric"}
    d = decide(PET, list(rows.values()), now=1000.0, settings=settings(), passed_over=failed)
    assert d.kind is DecisionKind.PAIR and d.mr.series_uid == "T2"
    assert "T1 't1_mprage_sag_p2_iso': failed in this job: MR unusable: AlignmentError" in d.choice
    both = {**failed, "T2": "MR unusable: GeometryError: slice step"}
    d = decide(PET, list(rows.values()), now=1000.0, settings=settings(), passed_over=both)
    assert d.kind is DecisionKind.FALLBACK and "failed in this job" in d.reason and d.choice.startswith("no MR:")


def _fetch(state: FetchState, series_uid: str | None = None, note: str = "") -> FetchRow:
    return FetchRow(job_id=1, state=state, attempts=0, next_attempt_at=0.0, source="PACS@h:104",
                    study_uid="MRX" if series_uid else None, series_uid=series_uid, note=note,
                    created_at=0.0, updated_at=0.0)


def with_source(**matching) -> Settings:
    return Settings(node={"allowed_calling_aets": ["*"]}, matching={"mr_wait_s": 600, **matching},
                    sources=[{"ae_title": "PACS", "host": "h", "port": 104}], retrieve={"query_delay_s": 30})


def test_no_mr_at_hand_queries_the_sources_after_query_delay_s():
    s = with_source()
    d = decide(PET, [], now=130.0 + 29, settings=s)  # the PET completed at 130
    assert d.kind is DecisionKind.WAIT and d.wait_until == 160.0
    assert decide(PET, [], now=160.0, settings=s).kind is DecisionKind.FETCH
    # While the retrieval works, the job waits, even past mr_wait_s.
    d = decide(PET, [], now=5000.0, settings=s, fetch=_fetch(FetchState.QUERY, note="C-MOVE ... attempt 1"))
    assert d.kind is DecisionKind.WAIT and "attempt 1" in d.reason
    # A retrieved series still arriving is waited for; complete and eligible, it is paired at once.
    arriving = dataclasses.replace(exam()["t1"], state=SeriesState.RECEIVING, first_received_at=5000.0)
    fetch = _fetch(FetchState.RETRIEVED, "T1")
    assert decide(PET, [arriving], now=5001.0, settings=s, fetch=fetch).kind is DecisionKind.WAIT
    done = dataclasses.replace(arriving, state=SeriesState.COMPLETE)
    d = decide(PET, [done], now=5002.0, settings=s, fetch=fetch)
    assert d.kind is DecisionKind.PAIR and d.mr.series_uid == "T1"  # no grace: chosen at the source


def test_a_retrieved_series_found_unusable_asks_the_sources_again():
    s = with_source()
    # The C-FIND answer did not tell; its own headers showed several orientations once retrieved.
    overview = dataclasses.replace(exam()["localizer"], series_description="T1 overview")
    d = decide(PET, [overview], now=5000.0, settings=s, fetch=_fetch(FetchState.RETRIEVED, "LOC"))
    assert d.kind is DecisionKind.FETCH and "several Image Orientations" in d.reason


def test_sources_exhausted_or_failed_fall_back_with_their_reason():
    s = with_source(fallback="fail")
    d = decide(PET, [], now=200.0, settings=s, fetch=_fetch(FetchState.EXHAUSTED, note="no eligible MR at PACS@h:104"))
    assert d.kind is DecisionKind.WAIT  # mr_wait_s has not passed: a pushed MR may still come
    note = "C-MOVE of series X from PACS@h:104 failed: refused: UNABLE_TO_PROCESS (0xC000) (gave up after 4 attempts)"
    d = decide(PET, [], now=800.0, settings=s, fetch=_fetch(FetchState.FAILED, note=note))
    assert d.kind is DecisionKind.FAIL and d.reason.endswith("sources: " + note)


def test_remote_candidate_ranks_c_find_identifiers_by_the_same_rules():
    def ident(uid: str, desc: str, image_type: list[str], acq: str = "", thickness: str = "") -> Dataset:
        ds = Dataset()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = "1.2.3", uid, "MR"
        ds.SeriesDescription, ds.ImageType, ds.StudyDate = desc, image_type, "20260107"
        ds.MRAcquisitionType, ds.SliceThickness, ds.NumberOfSeriesRelatedInstances = acq, thickness, "40"
        return ds

    rows = [remote_candidate(ident("1.2.3.1", "localizer", ["ORIGINAL", "PRIMARY", "M"]), "P1", "HOSP"),
            remote_candidate(ident("1.2.3.2", "ep2d_ADC", ["DERIVED", "PRIMARY", "DIFFUSION", "ADC"]), "P1", "HOSP"),
            remote_candidate(ident("1.2.3.3", "t2_tse_tra", ["ORIGINAL", "PRIMARY"], "2D", "6"), "P1", "HOSP"),
            remote_candidate(ident("1.2.3.4", "t1_mprage_sag", ["ORIGINAL", "PRIMARY"], "3D", "1.0"), "P1", "HOSP")]
    assert rows[3].slice_thickness == 1.0 and rows[3].image_type == "ORIGINAL\\PRIMARY"
    report = rank_mr(PET, rows, RULES)
    assert [r.series_uid for r in report.ranked] == ["1.2.3.4", "1.2.3.3"]
    assert {uid for uid, _ in report.rejected} == {"1.2.3.1", "1.2.3.2"}
