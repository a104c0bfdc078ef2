"""Shared fixtures: a realistic PET/CT study and MR exam (sim/exam.py), written once per session."""
from __future__ import annotations

import os

import pytest

# Every node a test starts (in this process or as `dipnode serve`, which inherits the
# environment) takes a free HTTP port for its status page and metrics rather than the default
# 8480: tests run beside other nodes. A test that needs a port gives it as a constructor
# argument, which overrides the environment (node/settings.py).
os.environ["DIPNODE_HTTP__PORT"] = "0"

from dipnode.sim.exam import RealisticExam, write_realistic_exam


@pytest.fixture(scope="session")
def realistic_exam(tmp_path_factory) -> RealisticExam:
    return write_realistic_exam(tmp_path_factory.mktemp("exam"))


@pytest.fixture(scope="session")
def exam_with_bad_t1(tmp_path_factory) -> RealisticExam:
    """The same exam (other patient) whose T1 pixels are noise: it fails to register."""
    return write_realistic_exam(tmp_path_factory.mktemp("exam-bad-t1"), patient_id="EXAM02", seed=1,
                                corrupt_t1=True)
