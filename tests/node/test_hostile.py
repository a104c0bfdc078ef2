"""Hostile and buggy peers against a real `dipnode serve` (tests/harness/hostile.py holds the attacks):
each attack gets its answer (a named status, a rejection with its reason, or a closed
connection), and after each the node still serves (C-ECHO + a DCMTK storescu store) and
restarts on the same spool. Header values are also fuzzed with hypothesis over the wire.
The table in bench/RELIABILITY.md comes from the same attacks (``bench/hostile.py``).
"""
from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from harness import hostile
from dipnode.sim.crafted import file_bytes, pet_dataset, write_file

pytestmark = [pytest.mark.network, pytest.mark.slow]


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory):
    t = hostile.Target(tmp_path_factory.mktemp("hostile"))
    try:
        yield t
    finally:
        t.stop()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("name", list(hostile.ATTACKS))
def test_attack_is_answered_and_the_node_serves_and_restarts(target, name: str) -> None:
    row = hostile.run_attack(target, name, hostile.ATTACKS[name])
    assert row.as_expected, row.answer
    assert row.kept_serving, f"{name}: no C-ECHO or store after the attack ({row.answer})"
    assert row.restarted, f"{name}: no restart on the same spool ({row.answer})"


# Text VRs whose length field is 2 bytes in explicit VR: values up to 1000 bytes of anything.
_TEXT = {"PatientID": "LO", "PatientName": "PN", "IssuerOfPatientID": "LO", "StudyDescription": "LO",
         "SeriesDescription": "LO", "Modality": "CS", "ImagesInAcquisition": "IS",
         "SliceThickness": "DS", "StudyDate": "DA", "AccessionNumber": "SH"}


@st.composite
def headers(draw: st.DrawFn) -> dict[str, bytes]:
    keys = draw(st.lists(st.sampled_from(sorted(_TEXT)), min_size=1, max_size=4, unique=True))
    return {k: draw(st.binary(max_size=1000)) for k in keys}


@pytest.mark.timeout(600)
def test_fuzzed_header_values_are_answered_and_acknowledged_means_indexed(target) -> None:
    seen: dict[str, int] = {}

    @settings(max_examples=60, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(values=headers())
    def run(values: dict[str, bytes]) -> None:
        ds = pet_dataset()
        for keyword, raw in values.items():
            tag = Tag(keyword)
            ds[tag] = RawDataElement(tag, _TEXT[keyword], len(raw), raw, 0, False, True)
        path = write_file(target.path("fuzz.dcm"), file_bytes(ds))
        [code] = hostile.store_raw(target, [path], source="127.0.0.9")
        assert isinstance(code, int), code  # a status, never a dropped association
        key = hostile.describe(code)
        seen[key] = seen.get(key, 0) + 1
        if code == 0:
            assert target.indexed(str(ds.SOPInstanceUID))

    run()
    assert target.serving()
    # What was acknowledged is indexable again at start-up: nothing gets quarantined.
    assert target.restart() and target.serving()
    jobs = subprocess.run([sys.executable, "-m", "dipnode.node.cli.main", "jobs", "--config", str(target.config)],
                          capture_output=True, text=True, timeout=60)
    assert "quarantined" not in jobs.stdout, (jobs.stdout, seen)


def test_node_log_is_free_of_raw_control_bytes_and_floods(target) -> None:
    assert hostile._log_clean(target)
